"""Torch's CPU threads, lowered while other processes take CPUs this process may use,
and raised back when they leave.

torch's OpenMP threads meet at the end of every parallel region, thousands of times a
step. Waiting there by spinning is what an idle host rewards: on the 2-core benchmark
machine, libgomp's default (spin a while, then sleep) ran issue 21's workload about a
quarter faster than sleeping at once (docs/throughput_cpu.md). But when another
process holds one of the cores, a spinning thread burns its time slices waiting for a
sibling that is not running, and a step takes several times longer. A team no larger
than the CPUs others leave free has nobody descheduled to wait for, so it can spin.

How busy the host will be is not known at start-up (a neighbour's burst, a steady
job, a CI runner), so the engine measures it while it runs: at most once a second,
between steps, it reads how much CPU time the machine's CPUs in this process's
affinity were busy (/proc/stat, steal included) and how much of it was this process
(/proc/self/stat, every thread of it), and sizes the pool to the CPUs the others left:
round(CPUs - others' share), between 1 and the start-up plan (affinity and cgroup
quota, cpu_env). An explicit `cpu_threads` is kept as given: no governor. Resizing
the pool between steps changes no result: a step's logits are bitwise the same at any
thread count (tests/test_cpu_governor.py checks it).

Everything that reads the machine takes its paths and clock as arguments, so tests
drive it with fake /proc files and time.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass
from typing import Callable

log = logging.getLogger(__name__)

PROC_STAT = "/proc/stat"
PROC_SELF_STAT = "/proc/self/stat"
# Seconds between two readings: long enough that the tick counters (usually 100 a
# second per CPU) resolve a core's share to a few percent, short enough that a
# neighbour's start costs at most about a second of slow steps.
INTERVAL_S = 1.0


@dataclass(frozen=True)
class CpuTimes:
    busy: float  # seconds the CPUs counted were busy, whoever ran
    own: float   # seconds this process ran, all its threads


def read_cpu_times(cpus: frozenset[int], proc_stat: str = PROC_STAT,
                   proc_self_stat: str = PROC_SELF_STAT) -> CpuTimes | None:
    """Busy time of the CPUs in `cpus` and this process's own CPU time, or None when
    either file cannot be read (no /proc: the governor then leaves the pool alone)."""
    try:
        with open(proc_stat) as f:
            stat = f.read()
        with open(proc_self_stat) as f:
            self_stat = f.read()
    except OSError:
        return None
    ticks = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    busy = 0
    for line in stat.splitlines():
        name, _, rest = line.partition(" ")
        if not name.startswith("cpu") or name == "cpu" or int(name[3:]) not in cpus:
            continue
        # user nice system idle iowait irq softirq steal [guest guest_nice]: guest time
        # is already inside user and nice.
        fields = [int(v) for v in rest.split()]
        user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
        busy += user + nice + system + irq + softirq + steal
    # Fields after the command name (which may hold spaces and parentheses): utime and
    # stime are the 12th and 13th.
    after = self_stat.rpartition(")")[2].split()
    own = int(after[11]) + int(after[12])
    return CpuTimes(busy / ticks, own / ticks)


def threads_for(cpus: int, others: float, ceiling: int) -> int:
    """Threads worth running when other processes use `others` CPUs' worth of `cpus`."""
    return max(1, min(ceiling, math.floor(cpus - others + 0.5)))


class ThreadGovernor:
    """Call `poll()` between steps, on the thread that runs them (OpenMP thread counts
    belong to the calling thread). It returns the new count when it changed the pool."""

    def __init__(self, ceiling: int, cpus: frozenset[int] | None = None,
                 read: Callable[[frozenset[int]], CpuTimes | None] = read_cpu_times,
                 clock: Callable[[], float] = time.monotonic,
                 set_threads: Callable[[int], None] | None = None,
                 interval: float = INTERVAL_S):
        if cpus is None:
            cpus = frozenset(os.sched_getaffinity(0))
        if set_threads is None:
            import torch

            set_threads = torch.set_num_threads
        self.ceiling, self.cpus, self.interval = ceiling, cpus, interval
        self._read, self._clock, self._set = read, clock, set_threads
        self.threads = ceiling
        self._last = (clock(), read(cpus))

    def poll(self) -> int | None:
        now = self._clock()
        then, before = self._last
        if now - then < self.interval:
            return None
        times = self._read(self.cpus)
        self._last = (now, times)
        if times is None or before is None:
            return None
        others = max(0.0, (times.busy - before.busy) - (times.own - before.own)) / (now - then)
        threads = threads_for(len(self.cpus), others, self.ceiling)
        if threads == self.threads:
            return None
        log.info("other processes use %.1f of this process's %d CPUs: %d torch threads",
                 others, len(self.cpus), threads)
        self._set(threads)
        self.threads = threads
        return threads

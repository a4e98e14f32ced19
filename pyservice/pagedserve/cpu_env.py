"""How many CPUs this process may really use, what they can do, and torch's thread pool.

torch sizes its intra-op (OpenMP) pool to the host's cores. In a container limited to
2 CPUs on a 64-core node that is 64 threads sharing 2 CPUs of time: every parallel
region waits at its barrier for threads the kernel has descheduled, and throughput
collapses. The CPUs that count are the fewer of

- the affinity mask (`os.sched_getaffinity`: cpusets, `taskset`, Kubernetes' static
  CPU manager), and
- the CFS bandwidth quota of the process's cgroup and its ancestors (cgroup v2
  `cpu.max`, v1 `cpu.cfs_quota_us / cpu.cfs_period_us`: a Kubernetes CPU limit),
  rounded down, at least 1: a thread team synchronised at every op runs at the pace
  of its slowest thread, so a fractional CPU cannot hold one more thread.

Everything that reads the machine takes its paths as arguments, so tests drive it with
fake cgroup trees.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

CGROUP_ROOT = "/sys/fs/cgroup"
PROC_SELF_CGROUP = "/proc/self/cgroup"
PROC_CPUINFO = "/proc/cpuinfo"
# /proc/cpuinfo flag -> the name the start-up line prints.
FEATURE_FLAGS = {"avx2": "AVX2", "avx512f": "AVX-512", "avx512_bf16": "AVX512-BF16",
                 "avx512_vnni": "AVX512-VNNI", "amx_bf16": "AMX-BF16", "amx_int8": "AMX-INT8"}


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _cgroup_paths(proc_self_cgroup: str) -> tuple[str | None, str | None]:
    """(v2 path, v1 cpu-controller path) of this process, as /proc/self/cgroup names them."""
    text = _read(proc_self_cgroup) or ""
    v2 = v1 = None
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":
            v2 = path
        elif "cpu" in controllers.split(","):
            v1 = path
    return v2, v1


def _ancestors(base: str, path: str) -> list[str]:
    """base/path and each of its parents up to base itself (a limit anywhere above the
    process's own group applies to it too). Inside a container's cgroup namespace the
    path is often "/", and then only base is read."""
    parts = [p for p in path.split("/") if p and p != ".."]
    return [os.path.join(base, *parts[:i]) for i in range(len(parts), -1, -1)]


def _quota_v2(text: str | None) -> float | None:
    """`cpu.max` is "QUOTA PERIOD" or "max PERIOD"."""
    if not text:
        return None
    fields = text.split()
    if len(fields) != 2 or fields[0] == "max":
        return None
    try:
        quota, period = int(fields[0]), int(fields[1])
    except ValueError:
        return None
    return quota / period if quota > 0 and period > 0 else None


def _quota_v1(quota_text: str | None, period_text: str | None) -> float | None:
    try:
        quota, period = int(quota_text or ""), int(period_text or "")
    except ValueError:
        return None
    return quota / period if quota > 0 and period > 0 else None  # -1: no limit


def cgroup_cpu_quota(root: str = CGROUP_ROOT, proc_self_cgroup: str = PROC_SELF_CGROUP) -> float | None:
    """CPUs' worth of time per period the process's cgroups allow (the tightest limit
    of its group and every ancestor; v2 first, then v1), or None when unlimited."""
    v2_path, v1_path = _cgroup_paths(proc_self_cgroup)
    limits: list[float] = []
    if v2_path is not None:
        for d in _ancestors(root, v2_path):
            q = _quota_v2(_read(os.path.join(d, "cpu.max")))
            if q is not None:
                limits.append(q)
    if not limits and v1_path is not None:
        for mount in ("cpu,cpuacct", "cpu", "cpuacct,cpu"):
            base = os.path.join(root, mount)
            if not os.path.isdir(base):
                continue
            for d in _ancestors(base, v1_path):
                q = _quota_v1(_read(os.path.join(d, "cpu.cfs_quota_us")),
                              _read(os.path.join(d, "cpu.cfs_period_us")))
                if q is not None:
                    limits.append(q)
            break
    return min(limits) if limits else None


def usable_cpus(affinity: int, quota: float | None) -> int:
    """Threads worth running: the affinity count, capped by the quota rounded down, at
    least one."""
    n = max(affinity, 1)
    if quota is not None:
        n = min(n, max(1, math.floor(quota + 1e-9)))
    return n


def cpu_features(cpuinfo: str = PROC_CPUINFO) -> tuple[str, list[str]]:
    """(model name, features of FEATURE_FLAGS present) from the first processor entry."""
    model, flags = "", set()
    for line in (_read(cpuinfo) or "").splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and not model:
            model = value.strip()
        elif key in ("flags", "Features") and not flags:
            flags = set(value.split())
        if model and flags:
            break
    return model, [name for flag, name in FEATURE_FLAGS.items() if flag in flags]


@dataclass
class CpuPlan:
    threads: int            # torch intra-op threads the engine runs with
    source: str             # why: "setting", "quota", "affinity"
    affinity: int           # CPUs in the affinity mask
    quota: float | None     # cgroup CPU quota, None when unlimited
    model: str = ""
    features: list[str] = field(default_factory=list)

    def describe(self) -> str:
        quota = "none" if self.quota is None else f"{self.quota:g} CPUs"
        feats = ", ".join(self.features) or "none of AVX2/AVX-512/AMX"
        return (f"CPU: {self.model or 'unknown'}; features: {feats}; {self.threads} torch "
                f"threads ({self.source}; affinity {self.affinity} CPUs, cgroup quota {quota})")


def plan_cpu_threads(setting: int | None, *, affinity: int | None = None,
                     quota: float | None = None, detect_quota: bool = True,
                     cpuinfo: str = PROC_CPUINFO, current: int | None = None) -> CpuPlan:
    """The thread count for `setting` (None = auto). Explicit settings are kept as given
    (an operator may oversubscribe on purpose). Auto only ever lowers `current` (torch's
    pool as it is): a pool someone already made smaller (OMP_NUM_THREADS,
    torch.set_num_threads) stays as it is."""
    if affinity is None:
        affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if quota is None and detect_quota:
        quota = cgroup_cpu_quota()
    model, features = cpu_features(cpuinfo)
    auto = usable_cpus(affinity, quota)
    if setting is not None:
        threads, source = setting, "setting"
    elif current is not None and current < auto:
        threads, source = current, "torch's pool, already smaller"
    else:
        threads = auto
        source = "quota" if quota is not None and auto < affinity else "affinity"
    return CpuPlan(threads, source, affinity, quota, model, features)


_APPLIED: dict[str, CpuPlan] = {}


def omp_wait_policy() -> str:
    """How torch's OpenMP threads wait: OMP_WAIT_POLICY as libgomp read it when torch
    loaded (a value in the environment; pagedserve sets none)."""
    return os.environ.get("OMP_WAIT_POLICY", "").strip().lower() or "default (spin, then sleep)"


def huge_pages(thp_mode_path: str = "/sys/kernel/mm/transparent_hugepage/enabled") -> str:
    """Whether torch's large CPU allocations get transparent huge pages: its switch
    (THP_MEM_ALLOC_ENABLE, which pagedserve sets when imported before torch) and the
    kernel's mode (`never` turns them off whatever torch asks)."""
    asked = os.environ.get("THP_MEM_ALLOC_ENABLE", "") == "1"
    text = _read(thp_mode_path) or ""
    mode = text[text.find("[") + 1:text.find("]")] if "[" in text else "unknown"
    if not asked:
        return f"off (THP_MEM_ALLOC_ENABLE unset; kernel {mode})"
    return ("on" if mode in ("always", "madvise") else "off") + f" (kernel {mode})"


def configure_torch_threads(setting: int | None) -> CpuPlan:
    """Sizes torch's intra-op pool and logs one line saying what the engine uses. The
    pool is process-wide: the last engine built in a process sets it. With `setting`
    None the pool then follows the host's load (cpu_governor, started by the model
    runner); an explicit setting stays fixed."""
    import torch

    plan = plan_cpu_threads(setting, current=torch.get_num_threads())
    if torch.get_num_threads() != plan.threads:
        torch.set_num_threads(plan.threads)
    capability = torch.backends.cpu.get_cpu_capability()
    if _APPLIED.get("last") != plan:
        follows = "fixed" if setting is not None else "fewer while other processes use these CPUs"
        log.info("%s; torch kernels: %s; OpenMP wait policy: %s; threads: %s; huge pages: %s",
                 plan.describe(), capability, omp_wait_policy(), follows, huge_pages())
    _APPLIED["last"] = plan
    return plan

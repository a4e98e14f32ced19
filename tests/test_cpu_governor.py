"""cpu_governor: torch's pool follows the CPU time other processes take on this
process's CPUs, read from (fake) /proc files at a (fake) clock."""

import os

import pytest

from pagedserve.cpu_governor import CpuTimes, ThreadGovernor, read_cpu_times, threads_for

TICKS = os.sysconf("SC_CLK_TCK")


def write_stat(path, per_cpu):
    """/proc/stat with (user, system, idle, steal) ticks per CPU."""
    lines = ["cpu  1 2 3 4 5 6 7 8 0 0"]
    for n, (user, system, idle, steal) in enumerate(per_cpu):
        lines.append(f"cpu{n} {user} 0 {system} {idle} 7 1 1 {steal} 0 0")
    lines += ["intr 123 4 5", "ctxt 99", "btime 1", "processes 5"]
    path.write_text("\n".join(lines) + "\n")


def write_self_stat(path, utime, stime):
    # A command name with spaces and a parenthesis, as /proc allows.
    fields = ["S", "1", "1", "1", "0", "-1", "4194560", "10", "0", "0", "0", str(utime),
              str(stime), "0", "0", "20", "0", "3", "0", "100"]
    path.write_text("4242 (python (x) y) " + " ".join(fields) + "\n")


def test_read_cpu_times_counts_only_the_affinity_cpus_and_steal(tmp_path):
    stat, self_stat = tmp_path / "stat", tmp_path / "self_stat"
    write_stat(stat, [(100, 50, 900, 10), (200, 0, 800, 0), (5000, 0, 0, 0)])
    write_self_stat(self_stat, 120, 30)
    got = read_cpu_times(frozenset({0, 1}), str(stat), str(self_stat))
    # cpu0: 100 + 50 + irq 1 + softirq 1 + steal 10; cpu1: 200 + 1 + 1; cpu2 not ours
    assert got == CpuTimes(busy=(162 + 202) / TICKS, own=150 / TICKS)


def test_read_cpu_times_without_proc_is_none(tmp_path):
    assert read_cpu_times(frozenset({0}), str(tmp_path / "no"), str(tmp_path / "no")) is None


@pytest.mark.parametrize("cpus, others, ceiling, expected", [
    (2, 0.0, 2, 2), (2, 0.3, 2, 2), (2, 0.67, 2, 1), (2, 1.0, 2, 1), (2, 2.0, 2, 1),
    (8, 2.2, 8, 6), (8, 0.0, 4, 4), (1, 0.9, 1, 1)])
def test_threads_for(cpus, others, ceiling, expected):
    assert threads_for(cpus, others, ceiling) == expected


class FakeHost:
    """CPU times that advance as told, a clock, and the pool the governor sets."""

    def __init__(self):
        self.now, self.busy, self.own, self.pool = 0.0, 0.0, 0.0, []

    def run(self, seconds, ours, others):
        self.now += seconds
        self.own += ours * seconds
        self.busy += (ours + others) * seconds

    def read(self, cpus):
        return CpuTimes(self.busy, self.own)


def governor(host, ceiling=2):
    return ThreadGovernor(ceiling, cpus=frozenset({0, 1}), read=host.read,
                          clock=lambda: host.now, set_threads=host.pool.append)


def test_a_busy_neighbour_lowers_the_pool_and_leaving_raises_it():
    host = FakeHost()
    g = governor(host)
    host.run(0.5, ours=2.0, others=0.0)
    assert g.poll() is None                       # before the interval: not read
    host.run(0.5, ours=2.0, others=0.0)
    assert g.poll() is None and g.threads == 2    # idle host: keep both
    host.run(1.0, ours=1.33, others=0.67)         # a neighbour spins on one core
    assert g.poll() == 1 and host.pool == [1]
    host.run(1.0, ours=1.0, others=1.0)
    assert g.poll() is None and g.threads == 1    # still there: stay
    host.run(1.0, ours=1.0, others=0.05)          # gone
    assert g.poll() == 2 and host.pool == [1, 2]


def test_own_time_is_never_taken_for_others():
    """All of the busy time being this process's (its threads spinning included) never
    lowers the pool, whatever the numbers' rounding."""
    host = FakeHost()
    g = governor(host)
    for _ in range(5):
        host.run(1.0, ours=2.0, others=0.0)
        assert g.poll() is None
    assert host.pool == []


def test_unreadable_proc_leaves_the_pool_alone():
    host = FakeHost()
    g = ThreadGovernor(2, cpus=frozenset({0, 1}), read=lambda cpus: None,
                       clock=lambda: host.now, set_threads=host.pool.append)
    host.now = 10.0
    assert g.poll() is None and host.pool == []


def test_the_runner_governs_only_automatic_cpu_threads(monkeypatch):
    import torch

    from pagedserve import EngineConfig
    from pagedserve.runner.model_runner import ModelRunner

    made = []
    monkeypatch.setattr("pagedserve.runner.model_runner.ThreadGovernor",
                        lambda ceiling: made.append(ceiling) or "governor")
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)  # the pool stays as it is
    monkeypatch.setattr("pagedserve.cpu_env.plan_cpu_threads",
                        lambda setting, **kw: cpu_governor_plan(setting or 2))
    auto = ModelRunner(EngineConfig(device="cpu", num_kv_blocks=8, max_model_len=64), num_gpu_blocks=8,
                       num_cpu_blocks=0)
    fixed = ModelRunner(EngineConfig(device="cpu", num_kv_blocks=8, max_model_len=64, cpu_threads=2),
                        num_gpu_blocks=8, num_cpu_blocks=0)
    assert (auto.cpu_governor, fixed.cpu_governor, made) == ("governor", None, [2])


def cpu_governor_plan(threads):
    from pagedserve.cpu_env import CpuPlan

    return CpuPlan(threads, "test", threads, None)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_changing_the_pool_changes_no_result(dtype, tmp_path):
    """The governor may resize the pool between any two steps, so a step's logits must
    not depend on the thread count: the projections (oneDNN splits outputs, not sums),
    the decode kernel (one thread per item) and the reductions (per row) all hold."""
    import torch

    from model_families import save_tiny
    from test_model_families import _chunked_logits

    from pagedserve import EngineConfig
    from pagedserve.runner.model_runner import ModelRunner

    save_tiny("qwen3", tmp_path, head_dim=64)  # head 64: the decode kernel's register path
    runner = ModelRunner(EngineConfig(model=str(tmp_path), device="cpu", dtype=dtype, block_size=4,
                                      num_kv_blocks=200, swap_space_gb=0, cpu_threads=2))
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(3, 320, (n,), generator=g).tolist() for n in (150, 37, 20, 64)]
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _chunked_logits(runner, seqs)
        torch.set_num_threads(2)
        two = _chunked_logits(runner, seqs)
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(one[i], two[i]) for i in one)

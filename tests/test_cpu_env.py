"""CPU thread sizing from fake cgroup trees, affinity counts and cpuinfo files."""

from __future__ import annotations

import os
import sys

import pytest

from pagedserve import cpu_env
from pagedserve.config import EngineConfig


def _write(path, text: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


def _tree(tmp_path, self_cgroup: str, files: dict[str, str]):
    root = tmp_path / "cgroup"
    root.mkdir(parents=True)
    for rel, text in files.items():
        _write(root / rel, text)
    proc = tmp_path / "self_cgroup"
    proc.write_text(self_cgroup)
    return str(root), str(proc)


def test_v2_quota_of_the_process_group(tmp_path):
    root, proc = _tree(tmp_path, "0::/kubepods/pod1/ctr\n", {
        "kubepods/pod1/ctr/cpu.max": "250000 100000\n", "cpu.max": "max 100000\n"})
    assert cpu_env.cgroup_cpu_quota(root, proc) == 2.5


def test_v2_tightest_ancestor_wins(tmp_path):
    root, proc = _tree(tmp_path, "0::/kubepods/pod1/ctr\n", {
        "kubepods/pod1/ctr/cpu.max": "max 100000",
        "kubepods/pod1/cpu.max": "150000 100000",
        "kubepods/cpu.max": "800000 100000"})
    assert cpu_env.cgroup_cpu_quota(root, proc) == 1.5


def test_v2_namespaced_root_and_unlimited(tmp_path):
    root, proc = _tree(tmp_path, "0::/\n", {"cpu.max": "50000 100000"})
    assert cpu_env.cgroup_cpu_quota(root, proc) == 0.5
    root2, proc2 = _tree(tmp_path / "b", "0::/\n", {"cpu.max": "max 100000"})
    assert cpu_env.cgroup_cpu_quota(root2, proc2) is None


def test_v1_cfs_quota(tmp_path):
    root, proc = _tree(tmp_path, "12:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n0::/\n", {
        "cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "300000",
        "cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000",
        "cpu,cpuacct/cpu.cfs_quota_us": "-1", "cpu,cpuacct/cpu.cfs_period_us": "100000"})
    assert cpu_env.cgroup_cpu_quota(root, proc) == 3.0


def test_v1_unlimited_and_garbage(tmp_path):
    root, proc = _tree(tmp_path, "1:cpu:/\n", {
        "cpu/cpu.cfs_quota_us": "-1", "cpu/cpu.cfs_period_us": "100000"})
    assert cpu_env.cgroup_cpu_quota(root, proc) is None
    root2, proc2 = _tree(tmp_path / "b", "0::/x\n", {"x/cpu.max": "lots 100000"})
    assert cpu_env.cgroup_cpu_quota(root2, proc2) is None
    assert cpu_env.cgroup_cpu_quota(str(tmp_path / "missing"), str(tmp_path / "nofile")) is None


@pytest.mark.parametrize("affinity, quota, expected", [
    (64, None, 64), (64, 2.0, 2), (64, 2.5, 2), (64, 0.5, 1), (4, 8.0, 4), (2, 1.999, 1),
    (3, 3.0, 3), (0, None, 1)])
def test_usable_cpus(affinity, quota, expected):
    assert cpu_env.usable_cpus(affinity, quota) == expected


def test_plan_sources(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: Test Xeon\n"
                    "flags\t\t: fpu avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n\n"
                    "processor\t: 1\nmodel name\t: other\nflags\t\t: fpu\n")
    p = cpu_env.plan_cpu_threads(None, affinity=16, quota=4.0, cpuinfo=str(info))
    assert (p.threads, p.source, p.model) == (4, "quota", "Test Xeon")
    assert p.features == ["AVX2", "AVX-512", "AVX512-BF16", "AMX-BF16"]
    assert "4 torch threads (quota; affinity 16 CPUs, cgroup quota 4 CPUs)" in p.describe()
    assert "AMX-BF16" in p.describe()
    p = cpu_env.plan_cpu_threads(None, affinity=2, quota=None, detect_quota=False, cpuinfo=str(info))
    assert (p.threads, p.source) == (2, "affinity")
    p = cpu_env.plan_cpu_threads(3, affinity=2, quota=1.0, cpuinfo=str(info))
    assert (p.threads, p.source) == (3, "setting")
    p = cpu_env.plan_cpu_threads(None, affinity=8, quota=4.0, cpuinfo=str(info), current=64)
    assert (p.threads, p.source) == (4, "quota")    # torch's default pool: the host's cores
    p = cpu_env.plan_cpu_threads(None, affinity=8, quota=4.0, cpuinfo=str(info), current=1)
    assert (p.threads, p.source) == (1, "torch's pool, already smaller")
    p = cpu_env.plan_cpu_threads(6, affinity=8, quota=None, detect_quota=False, cpuinfo=str(info),
                                 current=1)
    assert (p.threads, p.source) == (6, "setting")
    p = cpu_env.plan_cpu_threads(None, affinity=2, detect_quota=False, cpuinfo=str(tmp_path / "x"))
    assert (p.model, p.features) == ("", [])
    assert "none of AVX2/AVX-512/AMX" in p.describe()


def test_configure_sets_torch_pool_and_logs(caplog):
    import torch

    before = torch.get_num_threads()
    try:
        with caplog.at_level("INFO", logger="pagedserve.cpu_env"):
            plan = cpu_env.configure_torch_threads(1)
        assert torch.get_num_threads() == 1 and plan.threads == 1
        assert any("1 torch threads (setting" in r.message for r in caplog.records)
    finally:
        torch.set_num_threads(before)


def test_config_setting():
    assert EngineConfig(device="cpu").cpu_threads is None
    assert EngineConfig(device="cpu", cpu_threads=3).cpu_threads == 3
    for bad in (0, -1, 1.5, "2", True):
        with pytest.raises(ValueError, match="cpu_threads must be"):
            EngineConfig(device="cpu", cpu_threads=bad)


def test_cli_flag_and_env(monkeypatch):
    import argparse

    from pagedserve.cli import add_engine_flags

    p = argparse.ArgumentParser()
    add_engine_flags(p)
    assert p.parse_args(["--cpu-threads", "3"]).cpu_threads == 3
    assert p.parse_args([]).cpu_threads is None
    monkeypatch.setenv("PAGEDSERVE_CPU_THREADS", "5")
    p = argparse.ArgumentParser()
    add_engine_flags(p)
    assert p.parse_args([]).cpu_threads == 5


@pytest.mark.parametrize("preset, expected", [(None, "unset"), ("PASSIVE", "PASSIVE")])
def test_openmp_wait_policy_is_left_to_the_environment(preset, expected):
    """libgomp's default (spin, then sleep) is what an idle host rewards; busy hosts are
    handled by lowering the thread count (cpu_governor), not by sleeping at every
    region. An explicit policy is the user's."""
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    # -S: no site module, so no sitecustomize of this machine sets the variable for us;
    # this process's import path stands in for it.
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    if preset:
        env["OMP_WAIT_POLICY"] = preset
    code = "import os, pagedserve; print(os.environ.get('OMP_WAIT_POLICY', 'unset'))"
    out = subprocess.run([sys.executable, "-S", "-c", code], env=env, capture_output=True, text=True,
                         timeout=120, check=True).stdout.strip()
    assert out == expected


@pytest.mark.parametrize("preset, torch_first, expected", [
    (None, False, "1"), ("0", False, "0"), (None, True, "unset")])
def test_huge_pages_asked_before_torch_allocates(preset, torch_first, expected):
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    if preset:
        env["THP_MEM_ALLOC_ENABLE"] = preset
    code = ("import torch; " if torch_first else "") + (
        "import os, pagedserve; print(os.environ.get('THP_MEM_ALLOC_ENABLE', 'unset'))")
    out = subprocess.run([sys.executable, "-S", "-c", code], env=env, capture_output=True, text=True,
                         timeout=120, check=True).stdout.strip()
    assert out == expected


@pytest.mark.parametrize("asked, mode, expected", [
    ("1", "always [madvise] never", "on (kernel madvise)"),
    ("1", "always madvise [never]", "off (kernel never)"),
    (None, "[always] madvise never", "off (THP_MEM_ALLOC_ENABLE unset; kernel always)")])
def test_huge_pages_line(asked, mode, expected, tmp_path, monkeypatch):
    f = tmp_path / "enabled"
    f.write_text(mode + "\n")
    if asked is None:
        monkeypatch.delenv("THP_MEM_ALLOC_ENABLE", raising=False)
    else:
        monkeypatch.setenv("THP_MEM_ALLOC_ENABLE", asked)
    assert cpu_env.huge_pages(str(f)) == expected

"""The benchmark harness's CUDA timers (benchmarks/harness.py), run with `pytest -m gpu`."""

import pytest
import torch

import harness

pytestmark = pytest.mark.gpu


def test_events_time_device_work_and_wall_time_waits_for_it():
    x = torch.randn(4096, 4096, device="cuda")
    wall, device = harness.timed(lambda: x @ x, cuda=True, reps=5)
    assert 0 < device <= wall * 1.05  # the wall clock ends after the second event completed


def test_device_median_and_copy_bandwidth():
    src = torch.empty(1 << 26, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    eager = harness.device_median(lambda: dst.copy_(src), iters=5, graph=False)
    graphed = harness.device_median(lambda: dst.copy_(src), iters=5, calls=4)
    assert eager > 0 and graphed > 0 and torch.equal(dst, src)
    assert 1e9 < harness.copy_bandwidth(1 << 28, iters=5) < 1e14  # bytes/s, read + write

"""How torch's OpenMP threads wait, on a loaded host: decode-shaped projections of
SmolLM2-135M (48 rows; qkv, o, gate/up, down for 30 layers = one "step") for 6 s.

The wait policy is read once, when torch loads libgomp, so each setting is its own
process:

    for p in ACTIVE PASSIVE; do OMP_WAIT_POLICY=$p python benchmarks/omp_wait.py float32 2; done
    env -u OMP_WAIT_POLICY python benchmarks/omp_wait.py float32 2   # libgomp's default
    python benchmarks/omp_wait.py float32 1

Prints steps per second and the load average.
"""

import sys
import time

import torch
import torch.nn.functional as F


def main() -> None:
    dtype, threads = getattr(torch, sys.argv[1]), int(sys.argv[2])
    torch.manual_seed(0)
    torch.set_num_threads(threads)
    ws = [torch.randn(n, k).to(dtype) for n, k in [(960, 576), (576, 576), (3072, 576), (576, 1536)]]
    x = torch.randn(48, 576).to(dtype)

    def step():
        for _ in range(30):
            y = F.linear(x, ws[0])
            y = F.linear(y[:, :576], ws[1])
            g = F.linear(y, ws[2])
            F.linear(F.silu(g[:, :1536]) * g[:, 1536:], ws[3])

    step()
    start, n = time.perf_counter(), 0
    while time.perf_counter() - start < 6:
        step()
        n += 1
    with open("/proc/loadavg") as f:
        load = " ".join(f.read().split()[:3])
    import os

    print(f"{sys.argv[1]} threads={threads} OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}: "
          f"{n / (time.perf_counter() - start):.1f} steps/s (load {load})")


if __name__ == "__main__":
    main()

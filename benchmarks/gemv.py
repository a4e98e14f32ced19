"""Small-batch decode projections on the GPU: the GEMV kernel against torch's
`F.linear` (cuBLAS) on the same weights, in the same run (`ops.linear` takes the
kernel up to `GEMV_MAX_ROWS` rows, cuBLAS above).

Llama-3.1-8B's projections in bf16 (QKV, O, gate/up, down, the output head) at 1 to 8
rows of x. Each figure is device time from a CUDA graph of back-to-back calls that
cycle over enough copies of the weight that none is served from L2; rate = weight
bytes read per second, and that rate as a fraction of a device-to-device copy
(read + write bytes per second) measured in the same run.

    python benchmarks/gemv.py --out docs/gemv_h100.json
"""

from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F

from harness import copy_bandwidth, device_median, environment, write_json
from pagedserve import ops
from pagedserve.ops import _cuda_layer_ops

SHAPES = {  # name: (N out features, K in features)
    "qkv": (6144, 4096),
    "o": (4096, 4096),
    "gate_up": (28672, 4096),
    "down": (4096, 14336),
    "lm_head": (128256, 4096),
}
L2_BYTES = 50 << 20


def case(name: str, n: int, k: int, m: int, iters: int) -> dict:
    wbytes = n * k * 2
    copies = max(2, math.ceil(3 * L2_BYTES / wbytes))
    ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(copies)]
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    ref = (x.double() @ ws[0].double().T)
    got = _cuda_layer_ops.gemv(x, ws[0]).double()
    lib = F.linear(x, ws[0]).double()
    scale = ref.abs().max().item()
    t_gemv = device_median(lambda: [_cuda_layer_ops.gemv(x, w) for w in ws], iters, calls=1) / copies
    t_torch = device_median(lambda: [F.linear(x, w) for w in ws], iters, calls=1) / copies
    return {"name": name, "n": n, "k": k, "rows": m, "weight_bytes": wbytes,
            "gemv_s": t_gemv, "gemv_Bps": wbytes / t_gemv,
            "torch_s": t_torch, "torch_Bps": wbytes / t_torch,
            "gemv_max_rel_err": (got - ref).abs().max().item() / scale,
            "torch_max_rel_err": (lib - ref).abs().max().item() / scale}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", default="1,2,4,8")  # rows of x (sequences in the step)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--out")
    args = ap.parse_args()
    copy = copy_bandwidth()
    rows = []
    for m in (int(r) for r in args.rows.split(",")):
        for name, (n, k) in SHAPES.items():
            rows.append(case(name, n, k, m, args.iters))
            torch.cuda.empty_cache()
    report = {"env": environment(loader=ops.get_loader().name), "copy_Bps": copy, "cases": rows}
    write_json(args.out, report)
    print(f"{report['env'].get('gpu', '')}: D2D copy {copy / 1e12:.2f} TB/s (read + write)")
    print(f"{'proj':<8}{'rows':>5}{'MB':>8}{'gemv us':>9}{'TB/s':>7}{'% copy':>8}"
          f"{'torch us':>10}{'TB/s':>7}{'torch/gemv':>12}{'rel err':>9}")
    for r in rows:
        print(f"{r['name']:<8}{r['rows']:>5}{r['weight_bytes'] / 1e6:>8.1f}{r['gemv_s'] * 1e6:>9.1f}"
              f"{r['gemv_Bps'] / 1e12:>7.2f}{100 * r['gemv_Bps'] / copy:>7.0f}%"
              f"{r['torch_s'] * 1e6:>10.1f}{r['torch_Bps'] / 1e12:>7.2f}"
              f"{r['torch_s'] / r['gemv_s']:>12.2f}{r['gemv_max_rel_err']:>9.1e}")
    total_g = sum(r["gemv_s"] for r in rows if r["rows"] == 1 and r["name"] != "lm_head")
    total_t = sum(r["torch_s"] for r in rows if r["rows"] == 1 and r["name"] != "lm_head")
    if total_g:
        print(f"one layer's four projections at 1 row: gemv {total_g * 1e6:.0f} us, "
              f"torch {total_t * 1e6:.0f} us (x 32 layers: {32 * total_g * 1e3:.2f} vs "
              f"{32 * total_t * 1e3:.2f} ms)")


if __name__ == "__main__":
    main()

"""Paged decode attention and swap transfers on the GPU, against baselines
measured in the same run.

Llama-3-8B attention heads (32 query, 8 KV, head 128, bf16, block 16). For each
batch x context shape: median kernel time over CUDA events, KV bytes read per
second, that rate as a fraction of a device-to-device copy (read + write bytes
per second), torch SDPA on the same KV laid out contiguously, and
gather-then-SDPA on the paged copy. Swap: scattered blocks GPU <-> pinned CPU vs
one plain pinned copy of the same bytes.

    python benchmarks/kernels.py --out docs/kernels_h100.json [--loader compiled|cupy]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics

import torch
import torch.nn.functional as F

from pagedserve import ops
from pagedserve.ops import _cuda_ops

SHAPES = [(32, 1024), (64, 2048), (128, 4096), (16, 16384), (1, 32768)]
HQ, HKV, D, BS = 32, 8, 128, 16


def bench(fn, iters: int, warmup: int = 3, graph: bool = True, calls: int = 10) -> float:
    """Median seconds of one fn() over iters, timed with CUDA events.

    With graph=True, `calls` back-to-back calls are captured in one CUDA graph
    and replayed, so Python launch overhead does not starve the GPU and the
    figure is device time (as an engine that runs decode under CUDA graphs sees it)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    run, per = fn, 1
    if graph:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(calls):
                fn()
        run, per = g.replay, calls
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        run()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3 / per)
    return statistics.median(times)


def copy_rate(nbytes: int, iters: int) -> float:
    """Device-to-device copy, bytes read + written per second."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    t = bench(lambda: dst.copy_(src), iters, graph=False)  # a graph memcpy node would use the copy engines
    return 2 * nbytes / t


def decode_case(b: int, l: int, iters: int, gen: torch.Generator) -> dict:
    nb = l // BS
    num_blocks = b * nb
    kc, vc = ops.allocate_kv_cache(num_blocks, BS, HKV, D, torch.bfloat16, "cuda")
    kc.normal_(generator=gen)
    vc.normal_(generator=gen)
    perm = torch.randperm(num_blocks, device="cuda", generator=gen)  # scattered block ids
    bt = perm.view(b, nb).to(torch.int32)
    ctx = torch.full((b,), l, dtype=torch.int32, device="cuda")
    q = torch.randn(b, HQ, D, device="cuda", generator=gen).bfloat16()
    scale = D ** -0.5
    kv_bytes = 2 * b * l * HKV * D * 2

    out = torch.empty_like(q)
    t_paged = bench(lambda: ops.decode_attention(q, kc, vc, bt, ctx, scale, out=out), iters)
    plan = _cuda_ops.decode_plan(b, HQ, HKV, nb * BS, _cuda_ops._num_sms(0), _cuda_ops._tc_ctas_per_sm(0, D))

    def gathered(cache):  # [B, HKV, L, D]
        return cache[bt.long()].permute(0, 2, 1, 3, 4).reshape(b, HKV, l, D)

    k_c, v_c = gathered(kc).contiguous(), gathered(vc).contiguous()
    q4 = q.view(b, HQ, 1, D)
    ref = F.scaled_dot_product_attention(q4, k_c, v_c, scale=scale, enable_gqa=True).view(b, HQ, D)
    err = float((out.float() - ref.float()).abs().max())
    t_sdpa = bench(lambda: F.scaled_dot_product_attention(q4, k_c, v_c, scale=scale, enable_gqa=True), iters)
    del k_c, v_c
    t_gather = bench(lambda: F.scaled_dot_product_attention(
        q4, gathered(kc), gathered(vc), scale=scale, enable_gqa=True), max(5, iters // 4), calls=2)
    return {
        "batch": b, "context": l, "kv_bytes": kv_bytes, "plan_qpb_part_nparts": list(plan),
        "paged_s": t_paged, "paged_Bps": kv_bytes / t_paged,
        "sdpa_contiguous_s": t_sdpa, "sdpa_contiguous_Bps": kv_bytes / t_sdpa,
        "gather_sdpa_s": t_gather, "gather_sdpa_Bps": kv_bytes / t_gather,
        "max_abs_diff_vs_sdpa": err,
    }


def swap_case(iters: int, gen: torch.Generator, num_gpu: int = 4096, n: int = 1024) -> dict:
    """n scattered blocks of one layer's K cache (32 KiB each) out and back in."""
    gpu = torch.randn(num_gpu, HKV, BS, D, device="cuda", generator=gen).bfloat16()
    cpu = torch.empty(num_gpu, HKV, BS, D, dtype=torch.bfloat16).pin_memory()
    src = torch.randperm(num_gpu, generator=torch.Generator().manual_seed(1))[:n]
    dst = torch.randperm(num_gpu, generator=torch.Generator().manual_seed(2))[:n]
    out_map = torch.stack([src, dst], 1)
    in_map = torch.stack([dst, src], 1)
    nbytes = n * gpu[0].numel() * 2
    plain_h = torch.empty(nbytes, dtype=torch.uint8).pin_memory()
    plain_d = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    res = {"blocks": n, "bytes": nbytes,
           "plain_d2h_Bps": nbytes / bench(lambda: plain_h.copy_(plain_d, non_blocking=True), iters, graph=False),
           "plain_h2d_Bps": nbytes / bench(lambda: plain_d.copy_(plain_h, non_blocking=True), iters, graph=False)}
    for method in ("kernel", "memcpy"):
        res[f"{method}_out_Bps"] = nbytes / bench(
            lambda: _cuda_ops.swap_blocks(gpu, cpu, out_map, method=method), iters, graph=False)
        res[f"{method}_in_Bps"] = nbytes / bench(
            lambda: _cuda_ops.swap_blocks(cpu, gpu, in_map, method=method), iters, graph=False)
    # contiguous runs (a whole sequence swapped into a fresh region): memcpy per run
    run_map = torch.stack([torch.arange(n), torch.arange(n) + 7], 1)
    res["default_out_contiguous_Bps"] = nbytes / bench(lambda: ops.swap_blocks(gpu, cpu, run_map), iters, graph=False)
    return res


def environment() -> dict:
    p = torch.cuda.get_device_properties(0)
    env = {"gpu": p.name, "sms": p.multi_processor_count, "torch": torch.__version__,
           "cuda": torch.version.cuda, "python": platform.python_version(),
           "loader": ops.get_loader().name}
    try:
        import pynvml  # noqa: optional

        pynvml.nvmlInit()
        env["driver"] = pynvml.nvmlSystemGetDriverVersion()
    except Exception:
        env["driver"] = f"CUDA driver API {torch.cuda.driver_version() if hasattr(torch.cuda, 'driver_version') else '?'}"
    return env


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="JSON results path")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--loader", choices=["compiled", "cupy"], default=None)
    args = ap.parse_args()
    ops.set_loader(args.loader)
    gen = torch.Generator(device="cuda").manual_seed(0)
    result = {"env": environment(), "copy_Bps": copy_rate(1 << 30, args.iters), "decode": [], "swap": None}
    for b, l in SHAPES:
        result["decode"].append(decode_case(b, l, args.iters, gen))
        torch.cuda.empty_cache()
    result["swap"] = swap_case(args.iters, gen)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)

    tb = 1e12
    print(f"{result['env']['gpu']}  torch {torch.__version__}  loader {result['env']['loader']}")
    print(f"device copy (read+write): {result['copy_Bps'] / tb:.2f} TB/s")
    print(f"{'B x L':>10} {'paged us':>9} {'TB/s':>6} {'%copy':>6} {'sdpa TB/s':>9} {'gather TB/s':>11} {'x gather':>8} {'plan':>16}")
    for r in result["decode"]:
        print(f"{r['batch']:>4} x {r['context']:<5}{r['paged_s'] * 1e6:9.1f} {r['paged_Bps'] / tb:6.2f} "
              f"{100 * r['paged_Bps'] / result['copy_Bps']:5.1f}% {r['sdpa_contiguous_Bps'] / tb:9.2f} "
              f"{r['gather_sdpa_Bps'] / tb:11.2f} {r['gather_sdpa_s'] / r['paged_s']:8.1f} "
              f"{str(tuple(r['plan_qpb_part_nparts'])):>16}")
    s = result["swap"]
    gb = 1e9
    print(f"swap {s['blocks']} scattered blocks ({s['bytes'] / 2**20:.0f} MiB): plain pinned d2h "
          f"{s['plain_d2h_Bps'] / gb:.1f} GB/s, h2d {s['plain_h2d_Bps'] / gb:.1f} GB/s")
    for m in ("kernel", "memcpy"):
        print(f"  {m:>7}: out {s[f'{m}_out_Bps'] / gb:.1f} GB/s ({100 * s[f'{m}_out_Bps'] / s['plain_d2h_Bps']:.0f}%)"
              f", in {s[f'{m}_in_Bps'] / gb:.1f} GB/s ({100 * s[f'{m}_in_Bps'] / s['plain_h2d_Bps']:.0f}%)")
    print(f"  contiguous run, default: out {s['default_out_contiguous_Bps'] / gb:.1f} GB/s")


if __name__ == "__main__":
    main()

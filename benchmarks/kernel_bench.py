"""Paged decode attention and swap transfers on the GPU, against baselines
measured in the same run.

Llama-3-8B attention heads (32 query, 8 KV, head 128, bf16, block 16). For each
batch x context shape: median kernel time over CUDA events, KV bytes read per
second, that rate as a fraction of a device-to-device copy (read + write bytes
per second), torch SDPA on the same KV laid out contiguously, and
gather-then-SDPA on the paged copy; the paged kernel is also timed with each
sequence's blocks in ascending adjacent ids ("in order"), to separate what the
scattered ids cost from the rest. Swap: scattered blocks GPU <-> pinned CPU vs
one plain pinned copy of the same bytes, for one layer and for a whole sequence
across all 32 layers in one call.

    python benchmarks/kernel_bench.py --out docs/kernels_h100.json [--loader compiled|cupy]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from harness import copy_bandwidth, device_median, environment, write_json
from pagedserve import ops
from pagedserve.ops import _cuda_ops, launch_plan

SHAPES = [(32, 1024), (64, 2048), (128, 4096), (16, 16384), (1, 32768)]
HQ, HKV, D, BS = 32, 8, 128, 16


def host_time(fn, iters: int = 20) -> float:
    """Median host seconds of one fn() call, the GPU idle before each."""
    times = []
    for _ in range(iters):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    torch.cuda.synchronize()
    return statistics.median(times)


def paged_inputs(b: int, l: int, gen: torch.Generator):
    """Query, K/V caches and block tables (scattered block ids) of one B x L shape."""
    nb = l // BS
    num_blocks = b * nb
    kc, vc = ops.allocate_kv_cache(num_blocks, BS, HKV, D, torch.bfloat16, "cuda")
    kc.normal_(generator=gen)
    vc.normal_(generator=gen)
    perm = torch.randperm(num_blocks, device="cuda", generator=gen)
    bt = perm.view(b, nb).to(torch.int32)
    ctx = torch.full((b,), l, dtype=torch.int32, device="cuda")
    q = torch.randn(b, HQ, D, device="cuda", generator=gen).bfloat16()
    return q, kc, vc, bt, ctx


def decode_case(b: int, l: int, iters: int, gen: torch.Generator) -> dict:
    nb = l // BS
    q, kc, vc, bt, ctx = paged_inputs(b, l, gen)
    scale = D ** -0.5
    kv_bytes = 2 * b * l * HKV * D * 2

    out = torch.empty_like(q)
    t_paged = device_median(lambda: ops.decode_attention(q, kc, vc, bt, ctx, scale, out=out), iters)
    # the same bytes with each sequence's blocks in ascending, adjacent ids (as a fresh
    # pool hands out a prompt's blocks): what the scattered ids themselves cost
    in_order = torch.arange(b * nb, dtype=torch.int32, device="cuda").view(b, nb)
    t_in_order = device_median(lambda: ops.decode_attention(q, kc, vc, in_order, ctx, scale), iters)
    device = ops.cuda_device(q.device)
    plan = device.decode_plan(b, HQ, HKV, nb * BS, D, q.dtype)
    by_stages = {}  # both pipeline depths, to check the planner's choice (plan[3])
    for stages in (2, 3):
        with device.override(decode_tc_stages=stages):
            by_stages[str(stages)] = device_median(lambda: ops.decode_attention(q, kc, vc, bt, ctx, scale), iters)

    def gathered(cache):  # [B, HKV, L, D]
        return cache[bt.long()].permute(0, 2, 1, 3, 4).reshape(b, HKV, l, D)

    k_c, v_c = gathered(kc).contiguous(), gathered(vc).contiguous()
    q4 = q.view(b, HQ, 1, D)
    ref = F.scaled_dot_product_attention(q4, k_c, v_c, scale=scale, enable_gqa=True).view(b, HQ, D)
    err = float((out.float() - ref.float()).abs().max())
    t_sdpa = device_median(lambda: F.scaled_dot_product_attention(q4, k_c, v_c, scale=scale, enable_gqa=True), iters)
    del k_c, v_c
    t_gather = device_median(lambda: F.scaled_dot_product_attention(
        q4, gathered(kc), gathered(vc), scale=scale, enable_gqa=True), max(5, iters // 4), calls=2)
    return {
        "batch": b, "context": l, "kv_bytes": kv_bytes, "plan_qpb_part_nparts_stages": list(plan),
        "paged_s": t_paged, "paged_s_by_stages": by_stages, "paged_Bps": kv_bytes / t_paged,
        "paged_in_order_s": t_in_order,
        "sdpa_contiguous_s": t_sdpa, "sdpa_contiguous_Bps": kv_bytes / t_sdpa,
        "gather_sdpa_s": t_gather, "gather_sdpa_Bps": kv_bytes / t_gather,
        "max_abs_diff_vs_sdpa": err,
    }


def _plain_rates(nbytes: int, iters: int) -> tuple[float, float]:
    """(d2h, h2d) bytes per second of one plain pinned copy of nbytes."""
    plain_h = torch.empty(nbytes, dtype=torch.uint8).pin_memory()
    plain_d = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    d2h = nbytes / device_median(lambda: plain_h.copy_(plain_d, non_blocking=True), iters, graph=False)
    h2d = nbytes / device_median(lambda: plain_d.copy_(plain_h, non_blocking=True), iters, graph=False)
    return d2h, h2d


def swap_case(iters: int, gen: torch.Generator, num_gpu: int = 4096, n: int = 1024) -> dict:
    """n scattered blocks of one layer's K cache (32 KiB each) out and back in.
    Timed without a graph: the host work of each call is part of the figure."""
    gpu = torch.randn(num_gpu, HKV, BS, D, device="cuda", generator=gen).bfloat16()
    cpu = torch.empty(num_gpu, HKV, BS, D, dtype=torch.bfloat16).pin_memory()
    src = torch.randperm(num_gpu, generator=torch.Generator().manual_seed(1))[:n]
    dst = torch.randperm(num_gpu, generator=torch.Generator().manual_seed(2))[:n]
    out_map = torch.stack([src, dst], 1)
    in_map = torch.stack([dst, src], 1)
    nbytes = n * gpu[0].numel() * 2
    d2h, h2d = _plain_rates(nbytes, iters)
    res = {"blocks": n, "bytes": nbytes, "plain_d2h_Bps": d2h, "plain_h2d_Bps": h2d}
    for method in ("kernel", "memcpy"):
        res[f"{method}_out_Bps"] = nbytes / device_median(
            lambda: _cuda_ops.swap_blocks(gpu, cpu, out_map, method=method), iters, graph=False)
        res[f"{method}_in_Bps"] = nbytes / device_median(
            lambda: _cuda_ops.swap_blocks(cpu, gpu, in_map, method=method), iters, graph=False)
    res["kernel_out_host_s"] = host_time(lambda: _cuda_ops.swap_blocks(gpu, cpu, out_map, method="kernel"))
    # contiguous runs (a whole sequence swapped into a fresh region): memcpy per run
    run_map = torch.stack([torch.arange(n), torch.arange(n) + 7], 1)
    res["default_out_contiguous_Bps"] = nbytes / device_median(lambda: ops.swap_blocks(gpu, cpu, run_map), iters, graph=False)
    return res


def swap_layers_case(iters: int, layers: int = 32, seq_tokens: int = 2048, gpu_blocks: int = 1024,
                     cpu_blocks: int = 512) -> dict:
    """One 2048-token sequence of Llama-3-8B swapped out and in across all 32
    layers (K and V: 64 caches, 128 scattered blocks each, 256 MiB), as the
    engine swaps a preempted group: one call for every layer, the per-layer
    loop of one call per cache for comparison, and a contiguous region."""
    nt = 2 * layers
    gpu = torch.empty(nt, gpu_blocks, HKV, BS, D, dtype=torch.bfloat16, device="cuda")
    cpu = torch.empty(nt, cpu_blocks, HKV, BS, D, dtype=torch.bfloat16, pin_memory=True)
    gpu_caches, cpu_caches = list(gpu.unbind(0)), list(cpu.unbind(0))
    n = seq_tokens // BS
    g_ids = torch.randperm(gpu_blocks, generator=torch.Generator().manual_seed(3))[:n]
    c_ids = torch.randperm(cpu_blocks, generator=torch.Generator().manual_seed(4))[:n]
    out_map, in_map = torch.stack([g_ids, c_ids], 1), torch.stack([c_ids, g_ids], 1)
    nbytes = nt * n * HKV * BS * D * 2
    d2h, h2d = _plain_rates(nbytes, iters)
    res = {"layers": layers, "caches": nt, "blocks_per_cache": n, "bytes": nbytes,
           "plain_d2h_Bps": d2h, "plain_h2d_Bps": h2d}
    for method in (None, "memcpy"):
        name = method or "default"
        res[f"{name}_out_Bps"] = nbytes / device_median(
            lambda: _cuda_ops.swap_blocks(gpu_caches, cpu_caches, out_map, method=method), iters, graph=False)
        res[f"{name}_in_Bps"] = nbytes / device_median(
            lambda: _cuda_ops.swap_blocks(cpu_caches, gpu_caches, in_map, method=method), iters, graph=False)

    def per_cache(src, dst, m):
        for s_, d_ in zip(src, dst):
            ops.swap_blocks(s_, d_, m)

    res["default_out_host_s"] = host_time(lambda: _cuda_ops.swap_blocks(gpu_caches, cpu_caches, out_map))
    res["per_cache_calls_out_Bps"] = nbytes / device_median(lambda: per_cache(gpu_caches, cpu_caches, out_map),
                                                    max(5, iters // 5), graph=False)
    run_map = torch.stack([torch.arange(n) + 100, torch.arange(n) + 7], 1)
    res["default_out_contiguous_Bps"] = nbytes / device_median(
        lambda: ops.swap_blocks(gpu_caches, cpu_caches, run_map), iters, graph=False)
    res["default_in_contiguous_Bps"] = nbytes / device_median(
        lambda: ops.swap_blocks(cpu_caches, gpu_caches, run_map[:, [1, 0]]), iters, graph=False)
    return res


def long_context_variants(iters: int, gen: torch.Generator) -> list[dict]:
    """Other partition plans (part tokens, partitions) than the planner's one CTA per
    SM: 1 x 32768 in 96 CTAs, in 136 (a few SMs with two), in 256 (two per SM, the
    plan before), in 512; 16 x 16384 split in two (256 CTAs)."""
    chosen = launch_plan.tc_split
    rows = []
    try:
        for b, l, plan in ((1, 32768, (2736, 12)), (1, 32768, (1936, 17)), (1, 32768, (1024, 32)),
                           (1, 32768, (512, 64)), (16, 16384, (8192, 2))):
            launch_plan.tc_split = lambda *_, plan=plan: plan
            r = decode_case(b, l, iters, gen)
            r["forced_plan"] = list(plan)
            rows.append(r)
    finally:
        launch_plan.tc_split = chosen
    return rows


# Batches between one CTA per SM and one resident wave of the shallow pipeline, where
# the planner's choice of pipeline depth changes (decode_plan's stages).
STAGE_SHAPES = [(16, 1024), (24, 1024), (40, 1024), (48, 1024), (32, 2048)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", help="JSON results path")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--loader", choices=["compiled", "cupy"], default=None)
    ap.add_argument("--decode-once", action="store_true",
                    help="only run one paged decode per shape, eagerly (for profilers such as ncu)")
    args = ap.parse_args()
    ops.set_loader(args.loader)
    gen = torch.Generator(device="cuda").manual_seed(0)
    if args.decode_once:
        for b, l in SHAPES:
            q, kc, vc, bt, ctx = paged_inputs(b, l, gen)
            ops.decode_attention(q, kc, vc, bt, ctx, D ** -0.5)
            torch.cuda.synchronize()
            del q, kc, vc, bt, ctx
        return
    if args.out is None:
        ap.error("--out is required")
    result = {"env": environment(loader=ops.get_loader().name),
              "copy_Bps": copy_bandwidth(1 << 30, args.iters), "decode": [], "swap": None}
    for b, l in SHAPES:
        result["decode"].append(decode_case(b, l, args.iters, gen))
        torch.cuda.empty_cache()
    result["decode_variants"] = long_context_variants(args.iters, gen)
    result["decode_stage_shapes"] = []
    for b, l in STAGE_SHAPES:
        result["decode_stage_shapes"].append(decode_case(b, l, args.iters, gen))
        torch.cuda.empty_cache()
    result["swap"] = swap_case(args.iters, gen)
    torch.cuda.empty_cache()
    result["swap_all_layers"] = swap_layers_case(args.iters)
    write_json(args.out, result)

    tb = 1e12
    print(f"{result['env']['gpu']}  torch {torch.__version__}  loader {result['env']['loader']}")
    print(f"device copy (read+write): {result['copy_Bps'] / tb:.2f} TB/s")
    print(f"{'B x L':>10} {'paged us':>9} {'TB/s':>6} {'%copy':>6} {'sdpa TB/s':>9} {'vs sdpa':>7} "
          f"{'in order':>8} {'2 stages':>8} {'3 stages':>8} {'gather TB/s':>11} {'x gather':>8} {'plan':>19}")
    for r in result["decode"] + result["decode_stage_shapes"]:
        print(f"{r['batch']:>4} x {r['context']:<5}{r['paged_s'] * 1e6:9.1f} {r['paged_Bps'] / tb:6.2f} "
              f"{100 * r['paged_Bps'] / result['copy_Bps']:5.1f}% {r['sdpa_contiguous_Bps'] / tb:9.2f} "
              f"{100 * r['sdpa_contiguous_s'] / r['paged_s']:6.1f}% "
              f"{100 * r['sdpa_contiguous_s'] / r['paged_in_order_s']:7.1f}% "
              f"{100 * r['sdpa_contiguous_s'] / r['paged_s_by_stages']['2']:7.1f}% "
              f"{100 * r['sdpa_contiguous_s'] / r['paged_s_by_stages']['3']:7.1f}% "
              f"{r['gather_sdpa_Bps'] / tb:11.2f} {r['gather_sdpa_s'] / r['paged_s']:8.1f} "
              f"{str(tuple(r['plan_qpb_part_nparts_stages'])):>19}")
    s = result["swap"]
    gb = 1e9
    print(f"swap {s['blocks']} scattered blocks ({s['bytes'] / 2**20:.0f} MiB): plain pinned d2h "
          f"{s['plain_d2h_Bps'] / gb:.1f} GB/s, h2d {s['plain_h2d_Bps'] / gb:.1f} GB/s")
    for m in ("kernel", "memcpy"):
        print(f"  {m:>7}: out {s[f'{m}_out_Bps'] / gb:.1f} GB/s ({100 * s[f'{m}_out_Bps'] / s['plain_d2h_Bps']:.0f}%)"
              f", in {s[f'{m}_in_Bps'] / gb:.1f} GB/s ({100 * s[f'{m}_in_Bps'] / s['plain_h2d_Bps']:.0f}%)")
    print(f"  kernel call, host time: {s['kernel_out_host_s'] * 1e6:.0f} us")
    print(f"  contiguous run, default: out {s['default_out_contiguous_Bps'] / gb:.1f} GB/s")
    for r in result["decode_variants"]:
        print(f"{r['batch']} x {r['context']} forced plan {tuple(r['forced_plan'])}: {r['paged_s'] * 1e6:.1f} us "
              f"{r['paged_Bps'] / tb:.2f} TB/s plan {tuple(r['plan_qpb_part_nparts_stages'])} "
              f"(sdpa {r['sdpa_contiguous_Bps'] / tb:.2f})")
    a = result["swap_all_layers"]
    print(f"swap all {a['layers']} layers ({a['caches']} caches x {a['blocks_per_cache']} blocks, "
          f"{a['bytes'] / 2**20:.0f} MiB): plain pinned d2h {a['plain_d2h_Bps'] / gb:.1f} GB/s, "
          f"h2d {a['plain_h2d_Bps'] / gb:.1f} GB/s")
    for m in ("default", "memcpy"):
        print(f"  {m:>7}: out {a[f'{m}_out_Bps'] / gb:.1f} GB/s ({100 * a[f'{m}_out_Bps'] / a['plain_d2h_Bps']:.0f}%)"
              f", in {a[f'{m}_in_Bps'] / gb:.1f} GB/s ({100 * a[f'{m}_in_Bps'] / a['plain_h2d_Bps']:.0f}%)")
    print(f"  default call, host time: {a['default_out_host_s'] * 1e6:.0f} us")
    print(f"  one call per cache (64 calls): out {a['per_cache_calls_out_Bps'] / gb:.1f} GB/s "
          f"({100 * a['per_cache_calls_out_Bps'] / a['plain_d2h_Bps']:.0f}%)")
    print(f"  contiguous region, default: out {a['default_out_contiguous_Bps'] / gb:.1f} GB/s "
          f"({100 * a['default_out_contiguous_Bps'] / a['plain_d2h_Bps']:.0f}%), in "
          f"{a['default_in_contiguous_Bps'] / gb:.1f} GB/s ({100 * a['default_in_contiguous_Bps'] / a['plain_h2d_Bps']:.0f}%)")


if __name__ == "__main__":
    main()

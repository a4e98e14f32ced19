"""CPU paged attention: the torch reference against the fast CPU paths (decode: the
compiled kernel, ops.cpu_kernels; prefill: ops.cpu_attention).

Shapes of the SmolLM2-135M CPU workload (30 layers, 9 query / 3 KV heads, head 64,
block 16), fp32 and bf16:

  decode   64 sequences, contexts U[100, 300] (mean ~200), scattered block ids
  prefill  1,902 new tokens: 13 prompts without a cached prefix (the first prompt
           lengths of benchmarks/throughput_cpu.py's workload, the last one a chunk)

Each call is timed cold, as in a forward pass where every layer has its own pool: the
calls rotate over 8 layers' pools (more than the last-level cache). Floors measured in
the same run: decode reads every live K/V byte once (KV bytes / the read bandwidth of a
plain sum over a cold pool); prefill does 2 * heads * head * n^2 FLOPs per sequence of
n tokens (causal Q K^T and P V) at the rate of one large matmul in that dtype.
With the model (default), one real decode step of 64 sequences through the model runner
gives the attention's share of a step.

    python benchmarks/cpu_attention.py --threads 1   (docs/kernels.md; --out FILE writes JSON)
"""

from __future__ import annotations

import argparse
import random
import time

import torch

from harness import environment, write_json
from pagedserve import ops
from pagedserve.ops import cpu_attention, reference

LAYERS, HEADS, KV_HEADS, HEAD, BLOCK = 30, 9, 3, 64, 16
PREFILL_LENS = [232, 120, 182, 196, 246, 90, 32, 202, 77, 107, 145, 201, 72]  # 1,902 tokens
POOLS = 8


def decode_lens(seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randint(100, 300) for _ in range(64)]


def make_pools(lens, dtype, seed):
    """POOLS layers of random K/V holding `lens` tokens through one scattered table."""
    gen = torch.Generator().manual_seed(seed)
    need = [-(-n // BLOCK) for n in lens]
    num_blocks = sum(need) + 64
    shape = (num_blocks, KV_HEADS, BLOCK, HEAD)
    pools = [(torch.randn(shape, generator=gen).to(dtype), torch.randn(shape, generator=gen).to(dtype))
             for _ in range(POOLS)]
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    tables = torch.zeros(len(lens), max(need) + 1, dtype=torch.int32)
    for s, n in enumerate(need):
        tables[s, :n] = torch.tensor([perm.pop() for _ in range(n)], dtype=torch.int32)
    return pools, tables


def time_cold(fn, pools, rounds: int) -> float:
    """Best over `rounds` of the mean time of one call, each call on the next layer's pool."""
    for kc, vc in pools:
        fn(kc, vc)
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for kc, vc in pools:
            fn(kc, vc)
        best = min(best, (time.perf_counter() - start) / len(pools))
    return best


def read_bandwidth(pools, rounds: int) -> float:
    """Bytes/s of a plain reduction over cold pools: what a one-pass decode could reach."""
    seconds = time_cold(lambda kc, vc: (kc.sum(), vc.sum()), pools, rounds)
    kc, vc = pools[0]
    return (kc.numel() * kc.element_size() + vc.numel() * vc.element_size()) / seconds


def matmul_rate(dtype, rounds: int) -> float:
    a = torch.randn(1024, 1024).to(dtype)
    b = torch.randn(1024, 1024).to(dtype)
    a @ b
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * 1024 ** 3 / best


def bench_decode(dtype, args) -> dict:
    lens = decode_lens(args.seed)
    pools, tables = make_pools(lens, dtype, args.seed)
    ctx = torch.tensor(lens, dtype=torch.int32)
    q = torch.randn(len(lens), HEADS, HEAD).to(dtype)
    scale = HEAD ** -0.5
    want = reference.decode_attention(q.double(), pools[0][0].double(), pools[0][1].double(),
                                      tables, ctx, scale)
    got = ops.decode_attention(q, *pools[0], tables, ctx, scale)
    kv_bytes = 2 * sum(lens) * KV_HEADS * HEAD * pools[0][0].element_size()
    return {
        "reference_s": time_cold(lambda kc, vc: reference.decode_attention(q, kc, vc, tables, ctx, scale),
                                 pools, max(1, args.rounds // 2)),
        "fast_s": time_cold(lambda kc, vc: ops.decode_attention(q, kc, vc, tables, ctx, scale),
                            pools, args.rounds),
        "floor_s": kv_bytes / read_bandwidth(pools, args.rounds),
        "kv_bytes": kv_bytes,
        "rel_err_vs_float64": float((got.double() - want).norm() / want.norm()),
    }


def bench_prefill(dtype, args) -> dict:
    lens = PREFILL_LENS
    pools, tables = make_pools(lens, dtype, args.seed)
    ctx = torch.tensor(lens, dtype=torch.int32)
    qsl = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    q = torch.randn(sum(lens), HEADS, HEAD).to(dtype)
    scale = HEAD ** -0.5
    want = reference.prefill_attention(q.double(), pools[0][0].double(), pools[0][1].double(),
                                       tables, qsl, ctx, scale)
    got = cpu_attention.prefill_attention(q, *pools[0], tables, qsl, ctx, scale)
    flops = sum(2 * HEADS * HEAD * n * n for n in lens)
    return {
        "reference_s": time_cold(lambda kc, vc: reference.prefill_attention(q, kc, vc, tables, qsl, ctx, scale),
                                 pools, max(1, args.rounds // 2)),
        "fast_s": time_cold(lambda kc, vc: cpu_attention.prefill_attention(q, kc, vc, tables, qsl, ctx, scale),
                            pools, args.rounds),
        "floor_s": flops / matmul_rate(dtype, args.rounds),
        "causal_flops": flops,
        "rel_err_vs_float64": float((got.double() - want).norm() / want.norm()),
    }


def bench_step(dtype, args) -> dict:
    """One decode step of 64 sequences through the real model runner, with the reference
    attention and with the fast path."""
    from pagedserve import LLM, SamplingParams
    from pagedserve.engine.batch import ScheduledBatch, SeqWork

    lens = decode_lens(args.seed)
    llm = LLM(device="cpu", dtype=str(dtype).removeprefix("torch."),
              num_kv_blocks=sum(-(-n // BLOCK) for n in lens) + 8, swap_space_gb=0.01)
    runner = llm.engine.runner
    params = SamplingParams(temperature=0.0)
    work, first = [], 0
    for i, n in enumerate(lens):
        nb = -(-n // BLOCK)
        work.append(SeqWork(i, [1000], n - 1, list(range(first, first + nb)), True, params,
                            [1000] * (n - 1), [], 0))
        first += nb
    batch = ScheduledBatch(work)

    def step_time() -> float:
        runner.execute(batch)
        best = float("inf")
        for _ in range(args.rounds):
            start = time.perf_counter()
            runner.execute(batch)
            best = min(best, time.perf_counter() - start)
        return best

    fast = step_time()
    saved = ops.decode_attention
    ops.decode_attention = lambda q, kc, vc, bt, ctx, scale, out=None, window=None: (
        reference.decode_attention(q, kc, vc, bt, ctx, scale, window=window))
    try:
        ref = step_time()
    finally:
        ops.decode_attention = saved
    return {"reference_step_s": ref, "fast_step_s": fast}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-model", action="store_true", help="skip the decode step through the model")
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    results = {}
    for dtype in (torch.float32, torch.bfloat16):
        name = str(dtype).removeprefix("torch.")
        results[name] = {"decode": bench_decode(dtype, args), "prefill": bench_prefill(dtype, args)}
        if not args.no_model:
            results[name]["decode_step"] = bench_step(dtype, args)

    print(f"\nper layer call, {args.threads} threads; floor = KV bytes / read bandwidth (decode), "
          "causal FLOPs / matmul rate (prefill)")
    print(f"{'case':<16}{'reference ms':>13}{'fast ms':>9}{'speedup':>9}{'floor ms':>10}"
          f"{'fast/floor':>11}{'rel err':>9}")
    for name, r in results.items():
        for case in ("decode", "prefill"):
            c = r[case]
            print(f"{case + ' ' + name:<16}{c['reference_s'] * 1e3:>13.2f}{c['fast_s'] * 1e3:>9.2f}"
                  f"{c['reference_s'] / c['fast_s']:>8.1f}x{c['floor_s'] * 1e3:>10.2f}"
                  f"{c['fast_s'] / c['floor_s']:>10.1f}x{c['rel_err_vs_float64']:>9.1e}")
    if not args.no_model:
        print(f"\ndecode step of 64 sequences ({LAYERS} layers): attention share = "
              f"{LAYERS} x per-call time / step time")
        print(f"{'dtype':<10}{'reference step ms':>18}{'share':>7}{'fast step ms':>14}{'share':>7}")
        for name, r in results.items():
            st, dec = r["decode_step"], r["decode"]
            print(f"{name:<10}{st['reference_step_s'] * 1e3:>18.1f}"
                  f"{LAYERS * dec['reference_s'] / st['reference_step_s']:>7.0%}"
                  f"{st['fast_step_s'] * 1e3:>14.1f}{LAYERS * dec['fast_s'] / st['fast_step_s']:>7.0%}")
    if args.out:
        report = {"shapes": {"layers": LAYERS, "heads": HEADS, "kv_heads": KV_HEADS, "head_size": HEAD,
                             "block_size": BLOCK, "decode_context_lens": decode_lens(args.seed),
                             "prefill_lens": PREFILL_LENS},
                  "results": results,
                  "environment": environment(threads=args.threads)}
        write_json(args.out, report)


if __name__ == "__main__":
    main()

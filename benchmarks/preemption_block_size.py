"""Swap against recompute: preemption latency for block sizes 8, 16, 32, 64, 128 (the
vLLM paper's block-size study, §7.3 / Fig. 19(a)), with a plot.

For each block size and each sequence length, on one ModelRunner (loaded once; its KV
pools are re-created at each block size):

  swap out   the preempted sequences' KV blocks, GPU pool -> pinned CPU swap pool, all
             layers' K and V, through the runner's own swap path (ModelRunner._swap ->
             ops.swap_blocks, which picks a memcpy per contiguous run or one copy
             kernel). The GPU blocks are a seeded random sample of the pool, as a
             fragmented pool after a while of serving holds them; so are the CPU ones.
  swap in    the same blocks back, CPU -> other random GPU blocks (a sequence swapped
             back in gets whatever blocks are free).
  recompute  what recompute preemption costs instead: one prefill of the sequences'
             tokens (prompt + outputs so far) through runner.execute, sampling
             included, as the engine runs it when the request is re-admitted.

Each is timed alone between two synchronisations (wall clock; on CUDA also the device
time between two events), `--warmup` untimed repeats then the median of `--reps`. The
first timed repeat checks that the swapped-in blocks equal the swapped-out ones
bit for bit (layers 0 and last, K and V). Reported per block size and length: swap-out,
swap-in and swap total ms, recompute ms, bytes moved each way, the swap's GB/s.
Model: by default the random-weight Llama-3.1-8B-shaped model in bf16 (harness.py's
LLAMA_8B, `load_format="dummy"`), CUDA graphs off.

    python benchmarks/preemption_block_size.py --out docs/preemption_block_size.json \\
        --plot docs/preemption_block_size.png
    python benchmarks/preemption_block_size.py --model default --device cpu --block-sizes 8,16 \\
        --seq-lens 16,48 --reps 2 --pool-tokens 1024 --out pbs_cpu.json     # CPU smoke run
"""

from __future__ import annotations

import argparse
import gc
import random
import statistics
import tempfile
import time

import torch

from harness import add_model_args, environment, model_spec, timed, write_json


def timed_ms(fn, cuda: bool) -> tuple[float, float | None]:
    """(wall ms, device ms or None) of fn() run alone."""
    wall, device = timed(fn, cuda)
    return 1e3 * wall, None if device is None else 1e3 * device


def resize_kv_cache(runner, block_size: int, num_gpu_blocks: int, num_cpu_blocks: int) -> None:
    """New empty KV pools at another block size on the loaded runner (the model loads
    once for the whole study); the old pools are freed first. Only this study changes
    the block size of a live runner, so it reaches into the runner's pool setup here."""
    if runner.graphs is not None:
        raise ValueError("resize_kv_cache: CUDA graphs hold the old pools; use cuda_graphs=False")
    runner.gpu_cache, runner.cpu_cache = [], []
    runner._bind_caches()
    if runner.device.type == "cuda":
        torch.cuda.empty_cache()
    runner.block_size, runner.num_gpu_blocks, runner.num_cpu_blocks = block_size, num_gpu_blocks, num_cpu_blocks
    runner._allocate_caches()


def swap_fn(runner, method: str, pairs, src_cache, dst_cache):
    """The runner's own swap for `auto`; ops' CUDA swap with a forced method otherwise."""
    if method == "auto":
        return lambda: runner._swap(pairs, src_cache, dst_cache)
    from pagedserve.ops import _cuda_ops

    mapping = torch.tensor(pairs, dtype=torch.int64)
    srcs = [k for k, _ in src_cache] + [v for _, v in src_cache]
    dsts = [k for k, _ in dst_cache] + [v for _, v in dst_cache]
    return lambda: _cuda_ops.swap_blocks(srcs, dsts, mapping, method=method)


def clear_blocks(runner, blocks: list[int]) -> None:
    index = torch.tensor(blocks, device=runner.device)
    for pair in runner.gpu_cache:
        for cache in pair:
            cache.index_fill_(0, index, 0)


def same_blocks(runner, a: list[int], b: list[int]) -> bool:
    """Blocks a[i] and b[i] hold the same bits in the first and last layer (K and V),
    and hold something (the prefill wrote them)."""
    layers = {0, len(runner.gpu_cache) - 1}
    ia, ib = torch.tensor(a, device=runner.device), torch.tensor(b, device=runner.device)
    return all(torch.equal(cache[ia], cache[ib]) and bool(cache[ia].abs().sum() > 0)
               for i in layers for cache in runner.gpu_cache[i])


def measure(runner, block_size: int, seq_len: int, args, vocab: int, cuda: bool) -> dict:
    from pagedserve import SamplingParams
    from pagedserve.engine.batch import ScheduledBatch, SeqWork

    rng = random.Random(args.seed * 1_000_003 + block_size * 10_007 + seq_len)
    per_seq = -(-seq_len // block_size)
    total = per_seq * args.num_seqs
    params = SamplingParams(temperature=0.0)
    times: dict[str, list] = {"recompute": []}
    for m in args.swap_methods:
        times[f"{m}_out"], times[f"{m}_in"] = [], []
    exact = None
    for rep in range(args.warmup + args.reps):
        gpu = rng.sample(range(runner.num_gpu_blocks), 2 * total)
        first, second = gpu[:total], gpu[total:]
        cpu = rng.sample(range(runner.num_cpu_blocks), total)
        work = []
        for s in range(args.num_seqs):
            tokens = [rng.randrange(min(1000, vocab // 2), vocab) for _ in range(seq_len)]
            work.append(SeqWork(s, tokens, 0, first[s * per_seq:(s + 1) * per_seq], True, params,
                                tokens, [], 0))
        batch = ScheduledBatch(work)
        sample = [timed_ms(lambda: runner.execute(batch), cuda)]  # writes the KV that is swapped
        check = rep == args.warmup
        for m in args.swap_methods:
            if check:  # so that each method's swap-in has to bring the data back itself
                clear_blocks(runner, second)
            out = swap_fn(runner, m, list(zip(first, cpu)), runner.gpu_cache, runner.cpu_cache)
            back = swap_fn(runner, m, list(zip(cpu, second)), runner.cpu_cache, runner.gpu_cache)
            sample += [timed_ms(out, cuda), timed_ms(back, cuda)]
            if check:
                exact = (exact is not False) and same_blocks(runner, first, second)
        if rep >= args.warmup:
            for key, value in zip(times, sample):
                times[key].append(value)

    def med(key: str, which: int) -> float | None:
        values = [t[which] for t in times[key]]
        return None if values[0] is None else statistics.median(values)

    nbytes = total * runner.block_bytes
    row = {"block_size": block_size, "seq_len": seq_len, "num_seqs": args.num_seqs, "blocks": total,
           "block_bytes": runner.block_bytes, "bytes_each_way": nbytes,
           "recompute_ms": med("recompute", 0), "recompute_device_ms": med("recompute", 1),
           "roundtrip_exact": exact, "swap": {}}
    for m in args.swap_methods:
        out_ms, in_ms = med(f"{m}_out", 0), med(f"{m}_in", 0)
        row["swap"][m] = {"out_ms": out_ms, "in_ms": in_ms, "total_ms": out_ms + in_ms,
                          "out_device_ms": med(f"{m}_out", 1), "in_device_ms": med(f"{m}_in", 1),
                          "gb_per_s": 2 * nbytes / ((out_ms + in_ms) / 1e3) / 1e9}
    primary = row["swap"][args.swap_methods[0]]
    row.update({"swap_out_ms": primary["out_ms"], "swap_in_ms": primary["in_ms"],
                "swap_total_ms": primary["total_ms"], "swap_gb_per_s": primary["gb_per_s"],
                "swap_over_recompute": primary["total_ms"] / row["recompute_ms"]})
    return row


def plot(report: dict, path: str) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed"
    rows = report["results"]["rows"]
    fig, ax = plt.subplots(figsize=(6, 4))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for k, length in enumerate(sorted({r["seq_len"] for r in rows})):
        mine = sorted((r for r in rows if r["seq_len"] == length), key=lambda r: r["block_size"])
        x = [r["block_size"] for r in mine]
        c = colors[k % len(colors)]
        ax.plot(x, [r["swap_total_ms"] for r in mine], "o-", color=c, label=f"swap out+in, {length} tok")
        ax.plot(x, [r["recompute_ms"] for r in mine], "s--", color=c, label=f"recompute, {length} tok")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(report["args"]["block_sizes"], [str(b) for b in report["args"]["block_sizes"]])
    ax.set_xlabel("block size (tokens)")
    ax.set_ylabel("latency (ms)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(f"{report['environment'].get('gpu') or 'CPU'}: {report['args']['model']}, "
                 f"{report['args']['num_seqs']} seq(s)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


def print_table(report: dict) -> None:
    others = report["args"]["swap_methods"][1:]  # forced methods, swap total only
    print(f"{'block':>6}{'tokens':>8}{'blocks':>8}{'MB':>8}{'out ms':>9}{'in ms':>9}{'swap ms':>9}"
          f"{'GB/s':>7}{'recomp ms':>11}{'swap/rec':>10}" + "".join(f"{m + ' ms':>11}" for m in others))
    for r in report["results"]["rows"]:
        print(f"{r['block_size']:>6}{r['seq_len'] * r['num_seqs']:>8}{r['blocks']:>8}"
              f"{r['bytes_each_way'] / 1e6:>8.1f}{r['swap_out_ms']:>9.2f}{r['swap_in_ms']:>9.2f}"
              f"{r['swap_total_ms']:>9.2f}{r['swap_gb_per_s']:>7.1f}{r['recompute_ms']:>11.2f}"
              f"{r['swap_over_recompute']:>10.2f}"
              + "".join(f"{r['swap'][m]['total_ms']:>11.2f}" for m in others))


def _ints(ap, name: str, value: str) -> list[int]:
    try:
        out = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        ap.error(f"--{name} must be comma-separated integers, got {value!r}")
    if not out or any(v < 1 for v in out):
        ap.error(f"--{name} must be positive integers, got {value!r}")
    return out


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_args(ap)
    ap.add_argument("--block-sizes", default="8,16,32,64,128")
    ap.add_argument("--seq-lens", default="256,1024,2048", help="tokens of each preempted sequence")
    ap.add_argument("--num-seqs", type=int, default=1, help="sequences preempted (and recomputed) together")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--pool-tokens", type=int,
                    help="device KV pool per block size, in tokens (default: 8x what one repeat uses, "
                         "at least 16384), so the random blocks are scattered")
    ap.add_argument("--swap-methods", default="auto",
                    help="auto (the runner's path), and on CUDA also memcpy and/or kernel; the first is reported")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="write the results as JSON here")
    ap.add_argument("--plot", help="write latency against block size as a PNG here")
    args = ap.parse_args(argv)
    args.block_sizes = _ints(ap, "block-sizes", args.block_sizes)
    if any(b & (b - 1) for b in args.block_sizes):
        ap.error(f"--block-sizes must be powers of two, got {args.block_sizes}")
    args.seq_lens = _ints(ap, "seq-lens", args.seq_lens)
    args.swap_methods = [m.strip() for m in args.swap_methods.split(",") if m.strip()]
    if not args.swap_methods or any(m not in ("auto", "memcpy", "kernel") for m in args.swap_methods):
        ap.error(f"--swap-methods must be auto, memcpy or kernel, got {args.swap_methods}")
    if args.num_seqs < 1 or args.reps < 1 or args.warmup < 0:
        ap.error("--num-seqs and --reps must be >= 1, --warmup >= 0")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    from pagedserve.config import EngineConfig
    from pagedserve.runner.model_runner import ModelRunner

    need = 2 * args.num_seqs * max(args.seq_lens)  # tokens one repeat holds in the device pool
    pool_tokens = args.pool_tokens or max(8 * need, 16384)
    if pool_tokens < need + max(args.block_sizes) * 2 * args.num_seqs:
        raise SystemExit(f"--pool-tokens {pool_tokens} is too small: one repeat needs {need} tokens "
                         "of blocks (plus rounding up to whole blocks)")
    cpu_tokens = need  # half of it is used each repeat: the CPU blocks are scattered too
    report: dict = {"args": vars(args), "results": {"rows": []}}

    def save():
        write_json(args.out, report)

    with tempfile.TemporaryDirectory() as tmp:
        model, load_format = model_spec(args.model, args.load_format, tmp)
        bs0 = args.block_sizes[0]
        cfg = EngineConfig(model=model, load_format=load_format, device=args.device, dtype=args.dtype,
                           block_size=bs0, max_model_len=max(args.seq_lens) + 1, swap_space_gb=0.0)
        if "kernel" in args.swap_methods or "memcpy" in args.swap_methods:
            if not cfg.on_gpu:
                raise SystemExit("--swap-methods memcpy/kernel are CUDA paths; use auto on CPU")
        start = time.perf_counter()
        runner = ModelRunner(cfg, num_gpu_blocks=pool_tokens // bs0, num_cpu_blocks=cpu_tokens // bs0,
                             cuda_graphs=False)
        report["environment"] = environment()
        report["results"].update({"device": cfg.device, "dtype": cfg.dtype,
                                  "runner_start_seconds": time.perf_counter() - start,
                                  "pool_tokens": pool_tokens, "swap_pool_tokens": cpu_tokens,
                                  "flash_prefill": runner.flash_prefill,
                                  "kv_bytes_per_token": runner.model_config.kv_block_bytes(1, runner.dtype.itemsize)})
        cuda = runner.device.type == "cuda"
        for bs in args.block_sizes:
            # At least one repeat's blocks (whole blocks per sequence) at the largest size.
            cpu_blocks = max(cpu_tokens // bs, args.num_seqs * -(-max(args.seq_lens) // bs))
            resize_kv_cache(runner, bs, pool_tokens // bs, cpu_blocks)
            for length in args.seq_lens:
                report["results"]["rows"].append(measure(runner, bs, length, args, runner.vocab_size, cuda))
                save()
        del runner
        gc.collect()
    if args.plot:
        problem = plot(report, args.plot)
        if problem:
            report["plot_error"] = problem
    save()
    env = report["environment"]
    print(f"\n{env.get('gpu') or 'CPU'}, torch {env['torch']}; {args.model} {report['results']['dtype']}, "
          f"{args.num_seqs} sequence(s), median of {args.reps}; swap: {args.swap_methods[0]}")
    print_table(report)
    return report


if __name__ == "__main__":
    main()

"""Where a CPU step's time goes, per torch op: torch.profiler over the two kinds of step
of the CPU throughput workload (benchmarks/cpu_vs_vllm.py), on the model runner.

  prefill  one step of 2048 prompt tokens (8 prompts of 256, nothing cached)
  decode   one decode step of 48 sequences at contexts of 64..300 tokens

    python benchmarks/profile_cpu.py --model DIR --dtype bfloat16 [--rows 12] [--threads 1]

With `--whole-run`, the whole workload instead (its 48 requests through LLM.generate,
prefills and decodes as the engine schedules them): op totals over the run.

On a shared machine `--threads 1` gives steadier shares: one thread is not slowed by
waiting for a sibling that another process has descheduled.

Prints a markdown table per step kind: op, self CPU ms per step, share of the step.
"""

from __future__ import annotations

import argparse
import random
import time

from pagedserve import LLM, SamplingParams

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from pagedserve.engine.batch import ScheduledBatch, SeqWork  # noqa: E402


def _batches(runner) -> dict[str, ScheduledBatch]:
    bs = runner.block_size
    params = SamplingParams(temperature=0.0)
    rng = random.Random(0)
    work, first = [], 0
    for i in range(8):
        nb = -(-256 // bs)
        work.append(SeqWork(i, [rng.randrange(1000, 40000) for _ in range(256)], 0,
                            list(range(first, first + nb)), True, params, [], [], 0))
        first += nb
    prefill = ScheduledBatch(work)
    work, first = [], 0
    for i in range(48):
        ctx = rng.randint(64, 300)
        nb = -(-ctx // bs)
        work.append(SeqWork(i, [1000], ctx - 1, list(range(first, first + nb)), True, params,
                            [1000] * (ctx - 1), [], 0))
        first += nb
    return {"prefill": prefill, "decode": ScheduledBatch(work)}


def profile_step(runner, batch: ScheduledBatch, steps: int, rows: int) -> str:
    for _ in range(2):
        runner.execute(batch)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            runner.execute(batch)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    lines = ["| op | self ms / step | share |", "|---|---|---|"]
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:rows]:
        lines.append(f"| `{e.key}` | {e.self_cpu_time_total / 1e3 / steps:.2f} | "
                     f"{100 * e.self_cpu_time_total / total:.1f}% |")
    lines.append(f"| total | {total / 1e3 / steps:.2f} | 100% |")
    return "\n".join(lines)


def profile_whole_run(llm, rows: int) -> str:
    from harness import CPU_MIX, random_requests

    workload = random_requests(48, llm.engine.vocab_size, 0, *CPU_MIX)
    warm = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    llm.generate([workload[0][0][:32]], warm, use_tqdm=False)
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for _, n in workload]
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        llm.generate([p for p, _ in workload], params, use_tqdm=False)
    wall = time.perf_counter() - start
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    lines = [f"wall {wall:.2f} s under the profiler; ops' self time {total / 1e6:.2f} s", "",
             "| op | self s | share of ops | calls |", "|---|---|---|---|"]
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:rows]:
        lines.append(f"| `{e.key}` | {e.self_cpu_time_total / 1e6:.2f} | "
                     f"{100 * e.self_cpu_time_total / total:.1f}% | {e.count} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="model directory (default: the embedded one)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--rows", type=int, default=12)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: the engine's)")
    ap.add_argument("--whole-run", action="store_true", help="profile the whole workload")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)  # before the engine: it never raises a smaller pool
    llm = LLM(args.model, device="cpu", dtype=args.dtype, num_kv_blocks=2048, swap_space_gb=0.1)
    if args.whole_run:
        print(f"\n### {args.dtype}, the whole workload ({torch.get_num_threads()} threads)\n")
        print(profile_whole_run(llm, args.rows))
        return
    runner = llm.engine.runner
    for kind, batch in _batches(runner).items():
        print(f"\n### {args.dtype} {kind} ({torch.get_num_threads()} threads)\n")
        print(profile_step(runner, batch, args.steps, args.rows))


if __name__ == "__main__":
    main()

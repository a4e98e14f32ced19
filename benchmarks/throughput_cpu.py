"""Offline throughput on CPU: transformers static batching vs pagedserve, and the
compute-bound ideal of the schedule pagedserve ran.

Workload (issue 4): 64 requests, prompts of U[16, 256] random token ids, outputs of
U[8, 128] tokens with ignore_eos, the embedded SmolLM2-135M. In one process:

  transformers  `generate` over static batches of 16 in arrival order; each batch runs
                to its longest output, and only the tokens each request asked for count.
  pagedserve    every request added at once, `step()` until done.
  ideal         on CPU the work is compute-bound, so the floor for pagedserve's schedule
                is one forward over every prompt token plus one decode step per step
                the schedule ran, at the batch size it ran (on the context lengths of a
                real step of that size), all timed here on the same model runner.

    python benchmarks/throughput_cpu.py --out docs/throughput_cpu_fp32.json
    python benchmarks/throughput_cpu.py --dtype bfloat16 --out docs/throughput_cpu_bf16.json

With `--against vllm` it runs benchmarks/cpu_vs_vllm.py instead (issue 21's workload,
pagedserve and vLLM's CPU backend in alternating processes, idle and with a core kept
busy); its flags follow, e.g. `--against vllm --vllm-python VENV/bin/python`.
"""

from __future__ import annotations

import argparse
import time
from collections import Counter

import torch

from harness import (CPU_MIX, add_workload_args, environment, make_workload, run_to_completion,
                     write_json)
from pagedserve import LLM, SamplingParams
from pagedserve.engine.batch import ScheduledBatch, SeqWork


def run_transformers(args, source, workload) -> dict:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        source.directory, **source.hf_kwargs(), dtype=getattr(torch, args.dtype)).eval()
    pad = 0
    useful = sum(n for _, n in workload)
    start = time.perf_counter()
    for i in range(0, len(workload), args.hf_batch_size):
        batch = workload[i:i + args.hf_batch_size]
        width = max(len(p) for p, _ in batch)
        longest = max(n for _, n in batch)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p, _ in batch])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p, _ in batch])
        with torch.no_grad():
            # min_new_tokens = max_new_tokens: no batch ends early on EOS (ignore_eos).
            model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=longest,
                           min_new_tokens=longest, pad_token_id=pad)
    seconds = time.perf_counter() - start
    del model
    return {"seconds": seconds, "useful_tokens": useful, "tokens_per_s": useful / seconds}


def run_pagedserve(llm: LLM, workload) -> tuple[dict, dict[int, list[int]]]:
    """Also returns, per decode batch size, the context lengths of the first step that
    ran that many decodes (what the ideal replays)."""
    engine = llm.engine
    llm.generate([list(range(1000, 1040))], SamplingParams(max_tokens=2), use_tqdm=False)  # warm-up
    contexts: dict[int, list[int]] = {}
    steps: list[tuple[int, int, float]] = []  # prefill tokens, decodes, seconds

    def observe(batch, seconds):
        decodes = [w.start_pos + 1 for w in batch.work if len(w.token_ids) == 1 and w.sample]
        contexts.setdefault(len(decodes), decodes)
        steps.append((sum(len(w.token_ids) for w in batch.work) - len(decodes), len(decodes),
                      seconds))

    for i, (prompt, n) in enumerate(workload):
        engine.add_request(f"r{i}", prompt, SamplingParams(temperature=0.0, max_tokens=n,
                                                           ignore_eos=True))
    before = engine.stats()
    produced, seconds = run_to_completion(engine, observe)
    stats = engine.stats()
    assert produced == sum(n for _, n in workload), "every request gets its tokens"
    runner_seconds = sum(t for _, _, t in steps)
    return {"seconds": seconds, "useful_tokens": produced, "tokens_per_s": produced / seconds,
            "steps": stats.num_steps - before.num_steps,
            "preemptions": stats.num_preemptions - before.num_preemptions,
            "steps_with_prefill": sum(1 for p, _, _ in steps if p),
            "seconds_in_steps_with_prefill": sum(t for p, _, t in steps if p),
            "seconds_in_decode_only_steps": sum(t for p, _, t in steps if not p),
            "seconds_outside_the_runner": seconds - runner_seconds,
            "decode_batch_sizes": dict(sorted(Counter(d for _, d, _ in steps if d).items())),
            }, contexts


def _blocks(first: int, num_tokens: int, block_size: int) -> list[int]:
    return list(range(first, first + -(-num_tokens // block_size)))


def time_ideal(llm: LLM, workload, decode_batch_sizes: dict[int, int],
               contexts: dict[int, list[int]], repeats: int) -> dict:
    """One forward over all prompts, plus, for every decode batch size the schedule
    ran, that many decode steps timed on the context lengths of one real step of that
    size. Block tables point at arbitrary blocks: timing does not depend on KV contents."""
    runner = llm.engine.runner
    bs = runner.block_size
    params = SamplingParams(temperature=0.0)
    work, first = [], 0
    for i, (p, _) in enumerate(workload):
        table = _blocks(first, len(p), bs)
        first += len(table)
        work.append(SeqWork(i, p, 0, table, True, params, p, [], 0))
    assert first <= runner.num_gpu_blocks, "the KV pool must hold every prompt at once"
    runner.execute(ScheduledBatch(work))  # warm-up
    start = time.perf_counter()
    runner.execute(ScheduledBatch(work))
    prefill = time.perf_counter() - start
    per_size = {}
    for size in decode_batch_sizes:
        work, first = [], 0
        for i, ctx in enumerate(contexts[size]):
            table = _blocks(first, ctx, bs)
            first += len(table)
            work.append(SeqWork(i, [1000], ctx - 1, table, True, params, [1000] * (ctx - 1), [], 0))
        batch = ScheduledBatch(work)
        runner.execute(batch)
        start = time.perf_counter()
        for _ in range(repeats):
            runner.execute(batch)
        per_size[size] = (time.perf_counter() - start) / repeats
    decode = sum(per_size[s] * count for s, count in decode_batch_sizes.items())
    return {"seconds": prefill + decode, "prefill_forward_seconds": prefill,
            "decode_seconds": decode, "decode_step_seconds_by_batch_size": per_size}


def main() -> None:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--against", choices=["vllm"])
    known, rest = pre.parse_known_args()
    if known.against == "vllm":
        from cpu_vs_vllm import main as against_vllm

        against_vllm(rest)
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--against", choices=["vllm"],
                    help="compare with vLLM's CPU backend (benchmarks/cpu_vs_vllm.py)")
    add_workload_args(ap, num_requests=64, mix=CPU_MIX)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--hf-batch-size", type=int, default=16)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-num-batched-tokens", type=int, default=2048)
    ap.add_argument("--num-kv-blocks", type=int, default=2048)
    ap.add_argument("--decode-repeats", type=int, default=3)
    ap.add_argument("--skip-transformers", action="store_true")
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args()

    llm = LLM(device="cpu", dtype=args.dtype, num_kv_blocks=args.num_kv_blocks,
              swap_space_gb=0.1, max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=args.max_num_batched_tokens)
    workload = make_workload(args, llm.engine.vocab_size)
    results = {}
    if not args.skip_transformers:
        results["transformers_static"] = run_transformers(args, llm.engine.runner.source, workload)
    results["pagedserve"], contexts = run_pagedserve(llm, workload)
    results["ideal"] = time_ideal(llm, workload, results["pagedserve"]["decode_batch_sizes"],
                                  contexts, args.decode_repeats)
    results["ideal"]["tokens_per_s"] = results["pagedserve"]["useful_tokens"] / results["ideal"]["seconds"]

    ps = results["pagedserve"]
    summary = {"pagedserve_vs_ideal": results["ideal"]["seconds"] / ps["seconds"]}
    if "transformers_static" in results:
        summary["speedup_vs_transformers_static"] = (
            ps["tokens_per_s"] / results["transformers_static"]["tokens_per_s"])
    report = {
        "workload": {"num_requests": args.num_requests, "prompt_tokens": sum(len(p) for p, _ in workload),
                     "output_tokens": sum(n for _, n in workload), "seed": args.seed,
                     "prompt_len": [args.min_prompt, args.max_prompt],
                     "output_len": [args.min_output, args.max_output], "dtype": args.dtype},
        "engine": {"max_num_seqs": args.max_num_seqs,
                   "max_num_batched_tokens": args.max_num_batched_tokens,
                   "num_kv_blocks": args.num_kv_blocks, "block_size": llm.engine.config.block_size},
        "results": results, "summary": summary,
        "environment": environment(),
    }
    w = report["workload"]
    print(f"\n{args.num_requests} requests, {w['prompt_tokens']} prompt tokens, "
          f"{w['output_tokens']} output tokens, {args.dtype}, {torch.get_num_threads()} threads")
    print(f"{'system':<28}{'seconds':>10}{'useful tok/s':>14}")
    for name, r in results.items():
        print(f"{name:<28}{r['seconds']:>10.1f}{r['tokens_per_s']:>14.1f}")
    print(f"pagedserve: {ps['steps']} steps ({ps['steps_with_prefill']} with prefill: "
          f"{ps['seconds_in_steps_with_prefill']:.1f} s; decode-only "
          f"{ps['seconds_in_decode_only_steps']:.1f} s; outside the runner "
          f"{ps['seconds_outside_the_runner']:.1f} s), {ps['preemptions']} preemptions")
    print(f"ideal: prompt forward {results['ideal']['prefill_forward_seconds']:.1f} s, "
          f"decode steps {results['ideal']['decode_seconds']:.1f} s")
    print(", ".join(f"{k} {v:.2f}" for k, v in summary.items()))
    write_json(args.out, report)


if __name__ == "__main__":
    main()

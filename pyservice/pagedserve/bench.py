"""`pagedserve bench`: offline throughput of the engine on a synthetic workload.

    pagedserve bench [--num-prompts N] [--input-len L] [--output-len O] [engine flags]

Every prompt is L random token ids and asks for exactly O new tokens (`ignore_eos`),
all submitted at once, so the figure is the engine's throughput with this model, this
device and these settings, not the model's taste for stopping early. A quick check of a
deployment's settings (block size, KV pool, preemption mode) on the real hardware; the
published comparisons with baselines are the scripts in benchmarks/.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import statistics
import time
from typing import Any

# Warm-up requests: the first steps build CUDA graphs and allocator pools.
WARMUP_PROMPTS = 4
WARMUP_TOKENS = 8


def add_bench_parser(subparsers: Any) -> None:
    """Hook called by pagedserve.cli.build_parser."""
    from pagedserve.cli import add_engine_flags, add_flag

    p = subparsers.add_parser(
        "bench", help="measure offline throughput on a synthetic workload",
        description="Offline throughput: NUM_PROMPTS prompts of INPUT_LEN random token ids, "
                    "OUTPUT_LEN new tokens each, all submitted at once.")
    g = p.add_argument_group("workload")
    add_flag(g, "--num-prompts", type=int, default=64, help="requests in the workload")
    add_flag(g, "--input-len", type=int, default=128, help="prompt tokens per request")
    add_flag(g, "--output-len", type=int, default=128, help="new tokens per request")
    add_flag(g, "--workload-seed", type=int, default=0,
             help="seed of the random prompt token ids")
    add_flag(g, "--json", action="store_true", default=False,
             help="print the results as one JSON object")
    add_engine_flags(p)
    p.set_defaults(func=run_bench)


def _check_workload(args: argparse.Namespace) -> None:
    for name in ("num_prompts", "input_len", "output_len"):
        value = getattr(args, name)
        if value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")


def make_prompts(num_prompts: int, input_len: int, vocab_size: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab_size) for _ in range(input_len)] for _ in range(num_prompts)]


def run_bench(args: argparse.Namespace) -> int:
    _check_workload(args)
    from pagedserve.cli import engine_config_from_args
    from pagedserve.llm import LLM

    config = engine_config_from_args(args)
    with LLM(**dataclasses.asdict(config)) as llm:  # exit stops tensor-parallel workers
        return _measure(args, config, llm)


def _measure(args: argparse.Namespace, config, llm) -> int:
    from pagedserve.sampling_params import SamplingParams

    engine = llm.engine
    prompts = make_prompts(args.num_prompts, args.input_len, engine.vocab_size, args.workload_seed)
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)

    llm.generate(prompts[:WARMUP_PROMPTS], SamplingParams(max_tokens=WARMUP_TOKENS, ignore_eos=True),
                 use_tqdm=False)
    before = engine.stats()
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    after = engine.stats()

    produced = sum(len(o.outputs[0].token_ids) for o in outputs)
    if produced != args.num_prompts * args.output_len:  # ignore_eos: every request runs to its length
        raise RuntimeError(f"{produced} tokens produced, expected {args.num_prompts * args.output_len}")
    ttft = [o.metrics.first_token_time - o.metrics.arrival_time for o in outputs
            if o.metrics.first_token_time is not None]
    result = {
        "model": config.model or "embedded SmolLM2-135M-Instruct",
        "device": str(engine.runner.device),
        "tensor_parallel_size": config.tensor_parallel_size,
        "num_prompts": args.num_prompts, "input_len": args.input_len, "output_len": args.output_len,
        "seconds": round(seconds, 4),
        "requests_per_s": round(args.num_prompts / seconds, 3),
        "output_tokens_per_s": round(produced / seconds, 1),
        "total_tokens_per_s": round((produced + args.num_prompts * args.input_len) / seconds, 1),
        "median_time_to_first_token_s": round(statistics.median(ttft), 4) if ttft else None,
        "steps": after.num_steps - before.num_steps,
        "preemptions": after.num_preemptions - before.num_preemptions,
        "kv_pool_blocks": after.num_total_gpu_blocks,
    }
    if args.json:
        print(json.dumps(result))
    else:
        width = max(len(k) for k in result)
        for key, value in result.items():
            print(f"{key:<{width}}  {value}")
    return 0

"""Prefill through the engine with the tensor-core paged prefill kernel against the
CUDA-core one, in one run, on the prompts whose attention runs over cached KV.

The engine sends a fresh prompt chunk (queries = keys) to FlashAttention-2 and every
prefill with cached context to the paged kernel (`model/layers.py`). Two workloads
of random token ids with one output token each, so prefill is what is timed:

  long prompts   --long-requests prompts of --long-tokens tokens, prefilled in chunks
                 of --max-num-batched-tokens: every chunk after the first attends to
                 the chunks before it, from the cache
  shared prefix  --prefix-requests prompts: one --prefix-tokens prefix (put in the
                 prefix cache by a warm-up request) and --suffix-tokens of their own;
                 prefix caching on, so only the suffixes are computed, over the prefix

Each workload runs once per kernel on the same model and KV pool (random weights of
Llama-3.1-8B's shape by default); the figure is prompt tokens computed per second of
wall time. On CPU there is no kernel to choose (both rows run the CPU path).

    python benchmarks/prefill_engine.py --out docs/prefill_engine_h100.json
"""

from __future__ import annotations

import argparse
import contextlib
import random
import tempfile
import time

import torch

from harness import add_model_args, environment, model_spec, write_json

KERNELS = {"tensor_cores": True, "cuda_cores": False}


def random_prompts(n: int, tokens: int, rng: random.Random, prefix: list[int] | None = None) -> list[list[int]]:
    return [(prefix or []) + [rng.randrange(1000, 30000) for _ in range(tokens)] for _ in range(n)]


def run_workload(make_engine, prompts: list[list[int]], warmup: list[int] | None) -> dict:
    from pagedserve import LLM, SamplingParams

    llm = LLM.from_engine(make_engine())
    params = SamplingParams(max_tokens=1, ignore_eos=True)
    if warmup is not None:
        llm.generate([warmup], params, use_tqdm=False)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    prompt_tokens = sum(len(o.prompt_token_ids) for o in outs)
    cached = sum(o.metrics.num_cached_tokens for o in outs)
    return {"seconds": seconds, "prompt_tokens": prompt_tokens, "cached_tokens": cached,
            "computed_tokens_per_s": (prompt_tokens - cached) / seconds}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_args(ap)
    ap.add_argument("--long-requests", type=int, default=8)
    ap.add_argument("--long-tokens", type=int, default=8192)
    ap.add_argument("--prefix-requests", type=int, default=64)
    ap.add_argument("--prefix-tokens", type=int, default=4000)
    ap.add_argument("--suffix-tokens", type=int, default=100)
    ap.add_argument("--max-num-batched-tokens", type=int, default=2048)
    ap.add_argument("--kv-cache-gb", type=float, default=None, help="KV pool size (default: the engine's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args(argv)

    from pagedserve.config import EngineConfig
    from pagedserve.engine.llm_engine import LLMEngine
    from pagedserve.runner.model_runner import ModelRunner
    from pagedserve.ops import cuda_device

    rng = random.Random(args.seed)
    long_prompts = random_prompts(args.long_requests, args.long_tokens, rng)
    prefix = random_prompts(1, args.prefix_tokens, rng)[0]
    prefixed = random_prompts(args.prefix_requests, args.suffix_tokens, rng, prefix)
    warmup = prefix + random_prompts(1, args.suffix_tokens, rng)[0]
    report = {"args": vars(args), "environment": environment(), "results": []}
    with tempfile.TemporaryDirectory() as tmp:
        model, load_format = model_spec(args.model, args.load_format, tmp)
        max_len = max(args.long_tokens, args.prefix_tokens + args.suffix_tokens) + 16
        extra = {} if args.kv_cache_gb is None else {"kv_cache_gb": args.kv_cache_gb}
        cfg = EngineConfig(model=model, load_format=load_format, device=args.device, dtype=args.dtype,
                           max_model_len=max_len, max_num_batched_tokens=args.max_num_batched_tokens,
                           swap_space_gb=0.0, **extra)
        runner = ModelRunner(cfg, cuda_graphs=False)

        def prefill_kernel(tc: bool):
            """The prefill kernel forced for a with-block (CPU has one attention path)."""
            if torch.device(cfg.device).type != "cuda":
                return contextlib.nullcontext()
            return cuda_device(cfg.device).override(prefill_tensor_cores=tc)
        report["device"], report["dtype"] = cfg.device, cfg.dtype
        report["flash_prefill"] = runner.flash_prefill
        workloads = [("long prompts", long_prompts, None, False),
                     ("shared prefix", prefixed, warmup, True)]
        for name, prompts, warm, caching in workloads:
            wcfg = EngineConfig(**{**cfg.__dict__, "enable_prefix_caching": caching})
            # a short warm-up of each kernel first (compilation, allocator)
            for kernel, tc in KERNELS.items():
                with prefill_kernel(tc):
                    run_workload(lambda: LLMEngine(wcfg, runner=runner), prompts[:1], None)
            for kernel, tc in KERNELS.items():
                with prefill_kernel(tc):
                    row = {"workload": name, "kernel": kernel, "requests": len(prompts),
                           **run_workload(lambda: LLMEngine(wcfg, runner=runner), prompts, warm)}
                    report["results"].append(row)
                    print(f"{name:>14} {kernel:>13}: {row['seconds']:7.2f} s, "
                          f"{row['prompt_tokens'] - row['cached_tokens']} tokens computed "
                          f"({row['cached_tokens']} cached): {row['computed_tokens_per_s']:9.0f} tokens/s",
                          flush=True)
    for name, *_ in workloads:
        rows = {r["kernel"]: r for r in report["results"] if r["workload"] == name}
        print(f"{name}: tensor cores {rows['cuda_cores']['seconds'] / rows['tensor_cores']['seconds']:.2f}x "
              f"the CUDA-core kernel's rate")
    write_json(args.out, report)
    return report


if __name__ == "__main__":
    main()

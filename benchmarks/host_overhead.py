"""Host (Python) time per engine step, with a model that costs nothing.

On a GPU the engine's own work each step (scheduling, token bookkeeping, stop checks,
building outputs) runs while the device idles, so it adds to every step. This times
that work alone: the real Scheduler, native BlockManager and LLMEngine, with a runner
whose `execute` returns a fixed token for every sequence that samples at once.

Workload (the GPU throughput benchmark's, issue 9): 1000 requests, prompts of
U[128, 1024] random token ids, outputs of U[32, 512] tokens with ignore_eos, greedy,
max_num_seqs 256, max_num_batched_tokens 8192, the KV pool of Llama-3.1-8B on an H100
(27408 blocks of 16). Every request is added at once, then `step()` runs until done.
Reported per repeat: steps, wall and process-CPU ms per step, and the time the cyclic
garbage collector took (by generation), which the engine's allocations drive.

    python benchmarks/host_overhead.py
    python benchmarks/host_overhead.py --profile 15      # cProfile, top 15 by own time
    python benchmarks/host_overhead.py --repeats 3 --out host_overhead.json
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import pstats
import tempfile
import time
from types import SimpleNamespace

from harness import add_workload_args, environment, make_workload, write_json
from pagedserve.config import EngineConfig
from pagedserve.engine.batch import SampleResult, ScheduledBatch
from pagedserve.engine.llm_engine import LLMEngine
from pagedserve.sampling_params import SamplingParams


class NullRunner:
    """What LLMEngine needs of a model runner, with an instant forward: every sequence
    that samples gets `token` (never an EOS, and ignore_eos is on anyway). `directory`:
    an empty model directory, so the engine finds no tokenizer (outputs carry ids only,
    as with the GPU benchmark's dummy-weight model)."""

    def __init__(self, args: argparse.Namespace, directory: str, token: int = 1234):
        self.source = SimpleNamespace(name="null", gguf_file=None, directory=directory)
        self.num_gpu_blocks = args.num_gpu_blocks
        self.num_cpu_blocks = args.num_cpu_blocks
        self.block_size = args.block_size
        self.max_model_len = args.max_model_len
        self.vocab_size = args.vocab_size
        self.model_config = SimpleNamespace(eos_token_ids=[args.vocab_size - 1])
        self.token = token

    def execute(self, batch: ScheduledBatch) -> list[SampleResult | None]:
        # A result object per sequence, as the sampler makes: allocations drive the
        # garbage collector, whose time counts here too.
        return [SampleResult(self.token, -0.5) if w.sample else None for w in batch.work]


class GcTimer:
    """Collections and seconds spent in them, by generation, while installed."""

    def __init__(self) -> None:
        self.count = [0, 0, 0]
        self.seconds = [0.0, 0.0, 0.0]
        self._start = 0.0

    def __call__(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        else:
            self.count[info["generation"]] += 1
            self.seconds[info["generation"]] += time.perf_counter() - self._start


def run_once(args: argparse.Namespace, profile: cProfile.Profile | None) -> dict:
    config = EngineConfig(model="null", block_size=args.block_size, max_num_seqs=args.max_num_seqs,
                          max_num_batched_tokens=args.max_num_batched_tokens)
    with tempfile.TemporaryDirectory() as directory:
        engine = LLMEngine(config, runner=NullRunner(args, directory))
    for i, (prompt, max_tokens) in enumerate(make_workload(args, args.vocab_size)):
        engine.add_request(f"r{i}", prompt, SamplingParams(temperature=0.0, max_tokens=max_tokens,
                                                           ignore_eos=True))
    gc_timer = GcTimer()
    gc.callbacks.append(gc_timer)
    steps = 0
    wall, cpu = time.perf_counter(), time.process_time()
    if profile is not None:
        profile.enable()
    try:
        while engine.has_unfinished_requests():
            engine.step()
            steps += 1
    finally:
        if profile is not None:
            profile.disable()
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        gc.callbacks.remove(gc_timer)
    stats = engine.stats()
    return {"steps": steps, "seconds": wall, "ms_per_step": 1e3 * wall / steps,
            "cpu_ms_per_step": 1e3 * cpu / steps,
            "gc_collections": gc_timer.count, "gc_ms_per_step": [1e3 * s / steps for s in gc_timer.seconds],
            "generation_tokens": stats.generation_tokens, "prompt_tokens": stats.prompt_tokens,
            "preemptions": stats.num_preemptions}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_workload_args(ap)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192)
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--num-gpu-blocks", type=int, default=27408, help="the KV pool of Llama-3.1-8B on an H100")
    ap.add_argument("--num-cpu-blocks", type=int, default=2048)
    ap.add_argument("--vocab-size", type=int, default=128256)
    ap.add_argument("--repeats", type=int, default=1, help="whole runs, each on a fresh engine")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="profile the last repeat with cProfile and print its top N functions "
                         "by own time (the profiler slows the run several times over)")
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args()
    if args.repeats < 1 or args.num_requests < 1:
        ap.error("--repeats and --num-requests must be >= 1")
    if not (1 <= args.min_prompt <= args.max_prompt and 1 <= args.min_output <= args.max_output):
        ap.error("prompt and output lengths must satisfy 1 <= min <= max")

    runs = []
    profile = None
    for k in range(args.repeats):
        profile = cProfile.Profile() if args.profile and k == args.repeats - 1 else None
        run = run_once(args, profile)
        runs.append(run)
        gc_ms = " / ".join(f"{ms:.3f}" for ms in run["gc_ms_per_step"])
        print(f"{run['steps']} steps, {run['seconds']:.2f} s, {run['ms_per_step']:.3f} ms/step "
              f"(cpu {run['cpu_ms_per_step']:.3f}; gc gen0/1/2 {gc_ms} ms/step)"
              + (" [profiled]" if profile is not None else ""))
    report = {"environment": environment(), "args": vars(args), "runs": runs}
    if args.profile:
        text = io.StringIO()
        pstats.Stats(profile, stream=text).sort_stats("tottime").print_stats(args.profile)
        print(text.getvalue())
    unprofiled = [r["ms_per_step"] for r in (runs[:-1] if args.profile else runs)]
    if unprofiled:
        report["best_ms_per_step"] = min(unprofiled)
        print(f"best {min(unprofiled):.3f} ms/step over {len(unprofiled)} unprofiled run(s)")
    write_json(args.out, report)


if __name__ == "__main__":
    main()

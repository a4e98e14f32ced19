"""Latency: time to first token and time per output token at three request rates
(Poisson arrivals), pagedserve against transformers continuous batching at the same rates.

Workload: throughput.py's request list (prompts of U[128, 1024] random token ids,
outputs of U[32, 512] tokens, ignore_eos, greedy), the same list at every rate. Arrival
times are one seeded sequence of Exp(1) gaps divided by the rate, so every rate sees the
same arrival pattern, only compressed. Model: by default the random-weight
Llama-3.1-8B-shaped model in bf16 (harness.py's LLAMA_8B, `load_format="dummy"`).

  pagedserve    open loop in one thread: each request is added to LLMEngine once its
                arrival time has passed, engine.step() runs in between (sleeping only
                when nothing is in flight). Times come from each request's own
                RequestMetrics (time.monotonic(), stamped by the scheduler):
                TTFT = first_token_time - arrival, TPOT = (finished_time -
                first_token_time) / (output tokens - 1), with arrival the scheduled
                arrival time (a request noticed late by the loop counts that wait).
                Prefix caching is off: the same prompts run at every rate and would
                otherwise hit the cache that the previous rate left behind.
  transformers  `init_continuous_batching` (attention as loaded, `sdpa`, which
                continuous batching runs as its paged variant: `paged|sdpa` on 5.17, its
                own paged sdpa path on 5.23; block sharing off as in pagedserve), one
                manager kept across rates, requests added at their arrival times from the
                main thread while results are drained. Per-token times come from
                `add_request(record_timestamps=True)` (GenerationOutput.timestamps,
                time.perf_counter() in the generation thread), first tokens of unfinished
                requests from `streaming=True`; without those the receipt times in the
                main thread stand in (`timing_source` says which). It runs the first
                `--hf-requests` requests with their arrival times for at most
                `--hf-time-limit` seconds per rate; what is unfinished then counts as
                unfinished (its first token included when it came) and the manager is
                stopped with `stop(block=True, hard_stop=True)` and no timeout: a stop
                whose wait times out switches the attention back to plain sdpa under a
                loop that still runs, which then fails in `sdpa_attention_forward`.
                Any transformers failure is recorded in the JSON (one retry on
                `--hf-attn-fallback`); pagedserve's numbers are written first and kept.

Per system and rate: TTFT, TPOT and end-to-end latency (mean, p50, p90, p99; TTFT over
the requests that got a first token, TPOT and end-to-end over the finished ones: past
a time limit the unserved requests are left out, so those figures are lower bounds and
`first_tokens` / `completed` say how many of `num_requests` they cover), achieved
requests/s and output tokens/s from the first arrival to the last finish (the drain after
the last arrival included), and whether the system kept up: every request finished and
the last quarter of arrivals waited for its first token at most 2x (+ 250 ms) as long as
the first quarter; otherwise the queue grew.

    python benchmarks/latency.py --out docs/latency_gpu.json --plot docs/latency_gpu.png
    python benchmarks/latency.py --model default --device cpu --rates 4,16 \\
        --num-requests 8 --min-prompt 16 --max-prompt 64 --min-output 4 --max-output 16 \\
        --hf-requests 4 --out latency_cpu.json       # CPU smoke run
"""

from __future__ import annotations

import argparse
import gc
import random
import tempfile
import time

import numpy as np
import torch

from harness import (LLAMA_8B, add_model_args, add_workload_args, environment, make_workload,
                     model_spec, write_json)


# ---- statistics -------------------------------------------------------------------------

def summary(values: list[float]) -> dict:
    """Mean and percentiles in milliseconds (None when there is nothing to summarise)."""
    if not values:
        return {"n": 0, "mean": None, "p50": None, "p90": None, "p99": None}
    a = 1e3 * np.asarray(values, dtype=np.float64)
    p50, p90, p99 = np.percentile(a, [50, 90, 99])
    return {"n": len(values), "mean": float(a.mean()), "p50": float(p50), "p90": float(p90), "p99": float(p99)}


def poisson_arrivals(n: int, rate: float, seed: int) -> list[float]:
    """Seconds after the start: the first request at 0, then Exp(rate) gaps. The same
    seed gives the same unit-rate gaps at every rate."""
    rng = random.Random(seed)
    gaps = [0.0] + [rng.expovariate(1.0) for _ in range(n - 1)]
    return [float(t) / rate for t in np.cumsum(gaps)]


def rate_report(rate: float, records: list[dict], num_requests: int, arrivals: list[float]) -> dict:
    """records: one per request that got a first token: arrival, first, finish (None
    when unfinished) in seconds on one clock, and output tokens."""
    done = [r for r in records if r["finish"] is not None]
    ttft = [r["first"] - r["arrival"] for r in records]
    tpot = [(r["finish"] - r["first"]) / (r["tokens"] - 1) for r in done if r["tokens"] > 1]
    e2e = [r["finish"] - r["arrival"] for r in done]
    out = {"rate": rate, "num_requests": num_requests, "completed": len(done),
           "first_tokens": len(records),
           "offered_rate": (num_requests - 1) / arrivals[num_requests - 1] if num_requests > 1 else None,
           "ttft_ms": summary(ttft), "tpot_ms": summary(tpot), "e2e_ms": summary(e2e)}
    if done:
        start = min(r["arrival"] for r in records)
        end = max(r["finish"] for r in done)
        out["duration_s"] = end - start
        out["achieved_rate"] = len(done) / (end - start) if end > start else None
        out["output_tokens_per_s"] = sum(r["tokens"] for r in done) / (end - start) if end > start else None
        out["drain_s"] = end - max(r["arrival"] for r in records)  # after the last arrival
    # Kept up: every request finished and the queue did not grow, i.e. the last quarter
    # of arrivals waited for their first token no longer than 2x the first quarter
    # (+ 250 ms, so that a few ms of batching noise on a tiny TTFT does not count).
    by_arrival = sorted(records, key=lambda r: r["arrival"])
    q = max(len(by_arrival) // 4, 1)
    early = float(np.mean([r["first"] - r["arrival"] for r in by_arrival[:q]])) if records else None
    late = float(np.mean([r["first"] - r["arrival"] for r in by_arrival[-q:]])) if records else None
    out["ttft_first_quarter_ms"] = None if early is None else 1e3 * early
    out["ttft_last_quarter_ms"] = None if late is None else 1e3 * late
    out["kept_up"] = bool(len(done) == num_requests and late is not None and late <= 2 * early + 0.25)
    return out


# ---- pagedserve -------------------------------------------------------------------------

def run_pagedserve_rate(engine, workload, arrivals: list[float], rate: float, tag: str) -> dict:
    from pagedserve import SamplingParams

    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for _, n in workload]
    before = engine.stats()
    records, sched = [], {}
    max_waiting = steps = i = 0
    start = time.monotonic() + 0.01
    while i < len(workload) or engine.has_unfinished_requests():
        now = time.monotonic()
        while i < len(workload) and start + arrivals[i] <= now:
            rid = f"{tag}-{i}"
            engine.add_request(rid, workload[i][0], params[i])
            sched[rid] = (i, start + arrivals[i])
            i += 1
        if not engine.has_unfinished_requests():
            time.sleep(max(0.0, start + arrivals[i] - time.monotonic()))
            continue
        max_waiting = max(max_waiting, len(engine.scheduler.waiting))
        steps += 1
        for out in engine.step():
            if out.finished:
                m, (index, arrival) = out.metrics, sched[out.request_id]
                tokens = len(out.outputs[0].token_ids)
                assert tokens == workload[index][1], f"{out.request_id}: {tokens} tokens (ignore_eos)"
                records.append({"arrival": arrival, "first": m.first_token_time, "finish": m.finished_time,
                                "tokens": tokens, "queue": m.first_scheduled_time - arrival})
    stats = engine.stats()
    rep = rate_report(rate, records, len(workload), arrivals)
    rep.update({"queue_ms": summary([r["queue"] for r in records]), "max_waiting": max_waiting,
                "steps": steps, "preemptions": stats.num_preemptions - before.num_preemptions,
                "timing_source": "RequestOutput.metrics (first_token_time, finished_time)"})
    return rep


def pagedserve_part(args, model: str | None, load_format: str, workload, rates, report, save) -> None:
    from pagedserve import LLM, SamplingParams
    from pagedserve.config import EngineConfig
    from pagedserve.engine.llm_engine import LLMEngine
    from pagedserve.runner.model_runner import ModelRunner

    start = time.perf_counter()
    cfg = EngineConfig(model=model, load_format=load_format, dtype=args.dtype, device=args.device,
                       max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
                       max_num_batched_tokens=args.max_num_batched_tokens,
                       gpu_memory_utilization=args.gpu_memory_utilization, kv_cache_gb=args.kv_cache_gb,
                       swap_space_gb=args.swap_space_gb, enable_prefix_caching=args.prefix_caching)
    runner = ModelRunner(cfg, cuda_graphs=not args.no_cuda_graphs)
    engine = LLMEngine(cfg, runner=runner)
    ps = report["results"]["pagedserve"] = {"engine_start_seconds": time.perf_counter() - start,
                                           "kv_pool_blocks": runner.num_gpu_blocks,
                                           "block_size": cfg.block_size, "rates": []}
    LLM.from_engine(engine).generate([list(range(1000, 1100))] * 4, SamplingParams(max_tokens=8, ignore_eos=True),
                                     use_tqdm=False)  # warm-up
    for k, rate in enumerate(rates):
        arrivals = poisson_arrivals(len(workload), rate, args.seed + 1)
        ps["rates"].append(run_pagedserve_rate(engine, workload, arrivals, rate, f"ps{k}"))
        save()
    del engine, runner
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---- output -------------------------------------------------------------------------------

def plot(report: dict, path: str) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed"
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for name, color in (("pagedserve", "tab:blue"), ("transformers_cb", "tab:orange")):
        rows = [r for r in report["results"].get(name, {}).get("rates", []) if "ttft_ms" in r]
        for ax, key in zip(axes, ("ttft_ms", "tpot_ms")):
            pts = [(r["rate"], r[key]["p50"], r[key]["p90"]) for r in rows if r[key]["p50"] is not None]
            if not pts:
                continue
            x, p50, p90 = zip(*pts)
            ax.plot(x, p50, "o-", color=color, label=f"{name} p50")
            ax.plot(x, p90, "s--", color=color, label=f"{name} p90")
    for ax, title in zip(axes, ("time to first token", "time per output token")):
        ax.set_xlabel("request rate (req/s)")
        ax.set_ylabel("ms")
        ax.set_yscale("log")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{report['environment'].get('gpu') or 'CPU'}: {report['args']['model']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


def print_table(report: dict) -> None:
    def ms(d, k):
        return f"{d[k]:.1f}" if d.get(k) is not None else "-"

    print(f"{'system':<16}{'rate':>6}{'done':>9}{'req/s':>8}{'TTFT p50':>10}{'p90':>9}"
          f"{'TPOT p50':>10}{'p90':>8}  kept up")
    for name in ("pagedserve", "transformers_cb"):
        part = report["results"].get(name)
        if part is None:
            print(f"{name:<16}  skipped")
            continue
        if "error" in part:
            print(f"{name:<16}  error: {part['error'][:70]}")
        for r in part.get("rates", []):
            if "error" in r and "ttft_ms" not in r:
                print(f"{name:<16}{r['rate']:>6g}  error: {r['error'][:60]}")
                continue
            ach = f"{r['achieved_rate']:.2f}" if r.get("achieved_rate") else "-"
            print(f"{name:<16}{r['rate']:>6g}{r['completed']:>5}/{r['num_requests']:<3}{ach:>8}"
                  f"{ms(r['ttft_ms'], 'p50'):>10}{ms(r['ttft_ms'], 'p90'):>9}"
                  f"{ms(r['tpot_ms'], 'p50'):>10}{ms(r['tpot_ms'], 'p90'):>8}"
                  f"  {'yes' if r['kept_up'] else 'no'}")


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_args(ap)
    ap.add_argument("--rates", default="2,8,16", help="requests/s, comma separated")
    ap.add_argument("--hf-rates", help="transformers' rates (default: --rates)")
    add_workload_args(ap, num_requests=200)  # --num-requests: per rate, pagedserve
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192)
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    ap.add_argument("--kv-cache-gb", type=float, default=2.0, help="KV pool on CPU")
    ap.add_argument("--swap-space-gb", type=float, default=1.0)
    ap.add_argument("--prefix-caching", action="store_true",
                    help="leave prefix caching on (later rates then reuse earlier rates' prompts)")
    ap.add_argument("--no-cuda-graphs", action="store_true", help="pagedserve fully eager")
    ap.add_argument("--hf-requests", type=int, default=40, help="per rate, transformers")
    ap.add_argument("--hf-time-limit", type=float, default=90.0, help="seconds per rate, transformers")
    ap.add_argument("--hf-attn", default="sdpa",
                    help="attention the transformers model is set to; continuous batching "
                         "runs its paged variant (paged|sdpa on 5.17, its own sdpa path on 5.23)")
    ap.add_argument("--hf-attn-fallback", default="eager",
                    help="retried once when a rate fails (eager is run as paged|eager); empty: none")
    ap.add_argument("--hf-cuda-graphs", default="auto", choices=["auto", "on", "off"])
    ap.add_argument("--hf-num-blocks", type=int, help="transformers KV blocks (default: its own sizing; 64 on CPU)")
    ap.add_argument("--hf-max-batch-tokens", type=int, help="(default: its own; 512 on CPU)")
    ap.add_argument("--skip-pagedserve", action="store_true")
    ap.add_argument("--skip-transformers", action="store_true")
    ap.add_argument("--out", help="write the results as JSON here")
    ap.add_argument("--plot", help="write TTFT and TPOT against the rate as a PNG here")
    args = ap.parse_args(argv)
    for name in ("rates", "hf_rates"):
        value = getattr(args, name)
        if value is not None:
            try:
                rates = [float(r) for r in value.split(",") if r.strip()]
            except ValueError:
                ap.error(f"--{name.replace('_', '-')} must be comma-separated numbers, got {value!r}")
            if not rates or any(r <= 0 for r in rates):
                ap.error(f"--{name.replace('_', '-')} must be positive request rates, got {value!r}")
            setattr(args, name, rates)
    if args.num_requests < 1 or args.hf_requests < 1:
        ap.error("--num-requests and --hf-requests must be >= 1")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    from pagedserve.config import EngineConfig

    probe = EngineConfig(device=args.device, dtype=args.dtype)  # resolves auto device/dtype once
    args.device, args.dtype = probe.device, probe.dtype
    report = {"environment": environment(), "args": vars(args), "device": args.device,
              "dtype": args.dtype, "results": {}}

    def save():
        write_json(args.out, report)

    with tempfile.TemporaryDirectory() as tmp:
        model, load_format = model_spec(args.model, args.load_format, tmp)
        vocab = LLAMA_8B["vocab_size"] if args.model == "llama8b" else _vocab_size(model)
        workload = make_workload(args, vocab)
        report["workload"] = {"num_requests": len(workload), "prompt_tokens": sum(len(p) for p, _ in workload),
                              "output_tokens": sum(n for _, n in workload), "vocab_size": vocab}
        if not args.skip_pagedserve:
            pagedserve_part(args, model, load_format, workload, args.rates, report, save)
            save()
        if not args.skip_transformers:
            from latency_transformers import transformers_part  # imports this module

            transformers_part(args, model, load_format, workload, args.hf_rates or args.rates, report, save)
            save()
    if args.plot:
        problem = plot(report, args.plot)
        if problem:
            report["plot_error"] = problem
    save()
    print(f"\n{report['environment'].get('gpu') or 'CPU'}, torch {torch.__version__}, "
          f"transformers {report['environment']['transformers']}; {report['workload']}")
    print_table(report)
    return report


def _vocab_size(model: str | None) -> int:
    from pagedserve.model.loader import load_model_config, resolve_model

    return load_model_config(resolve_model(model)).vocab_size


if __name__ == "__main__":
    main()

"""Latency: time to first token and time per output token at three request rates
(Poisson arrivals), pagedserve against transformers continuous batching at the same rates.

Workload: throughput.py's request list (prompts of U[128, 1024] random token ids,
outputs of U[32, 512] tokens, ignore_eos, greedy), the same list at every rate. Arrival
times are one seeded sequence of Exp(1) gaps divided by the rate, so every rate sees the
same arrival pattern, only compressed. Model: by default the random-weight
Llama-3.1-8B-shaped model in bf16 (throughput.py's LLAMA_8B, `load_format="dummy"`).

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
import inspect
import json
import os
import random
import sys
import tempfile
import time
import traceback

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from throughput import LLAMA_8B, environment, hf_model, make_workload  # noqa: E402


# ---- shared with preemption_block_size.py ---------------------------------------------

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
                "steps": steps, "preemptions": stats["num_preemptions"] - before["num_preemptions"],
                "timing_source": "RequestOutput.metrics (first_token_time, finished_time)"})
    return rep


def pagedserve_part(args, model: str | None, load_format: str, workload, rates, report, save) -> None:
    from pagedserve import LLM, SamplingParams
    from pagedserve.config import EngineConfig
    from pagedserve.engine.llm_engine import LLMEngine
    from pagedserve.engine.model_runner import ModelRunner

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


# ---- transformers continuous batching -----------------------------------------------------

def load_transformers_model(args, model: str | None, load_format: str, device: str, dtype: torch.dtype):
    """throughput.hf_model for the 8B dummy on CUDA; otherwise the named model (or a
    random one of its config) on `device`. `--hf-attn` other than sdpa is set afterwards."""
    if args.model == "llama8b" and device.startswith("cuda") and dtype == torch.bfloat16:
        hf = hf_model(LLAMA_8B)
    else:
        from transformers import AutoConfig, AutoModelForCausalLM

        from pagedserve.model.loader import resolve_model

        source = resolve_model(model)  # a converted-cache hit replaces the GGUF by now
        if load_format == "dummy":
            cfg = AutoConfig.from_pretrained(source.directory, **source.hf_kwargs())
            torch.manual_seed(0)
            hf = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa", dtype=dtype)
        else:
            hf = AutoModelForCausalLM.from_pretrained(source.directory, **source.hf_kwargs(),
                                                      attn_implementation="sdpa", dtype=dtype)
        hf = hf.to(device=device, dtype=dtype).eval()
        hf.generation_config.eos_token_id = None  # ignore_eos
        hf.generation_config.pad_token_id = 0
    if args.hf_attn != "sdpa":
        hf.set_attn_implementation(args.hf_attn)
    return hf


def cb_config(args, on_cpu: bool):
    """A ContinuousBatchingConfig with only the fields this transformers has, or None.
    Block sharing (its prefix cache) is off unless --prefix-caching, as in pagedserve.
    On CPU the cache is sized explicitly: the automatic sizing there takes most of the
    host memory (and an attention mask as wide as the whole cache with it)."""
    try:
        from transformers import ContinuousBatchingConfig
    except ImportError:
        return None
    import dataclasses

    fields = {f.name for f in dataclasses.fields(ContinuousBatchingConfig)}
    want = {"num_blocks": args.hf_num_blocks or (64 if on_cpu else None),
            "max_batch_tokens": args.hf_max_batch_tokens or (512 if on_cpu else None),
            "use_cuda_graph": {"auto": None, "on": True, "off": False}[args.hf_cuda_graphs],
            "allow_block_sharing": None if args.prefix_caching else False}
    kwargs = {k: v for k, v in want.items() if v is not None and k in fields}
    return ContinuousBatchingConfig(**kwargs) if kwargs else None


class CBSession:
    """One continuous-batching manager kept across rates (its warm-up paid once). A rate
    that does not finish cleanly ends it; the next rate starts a new one."""

    def __init__(self, model, args, on_cpu: bool, max_new_tokens: int):
        self.model, self.args, self.on_cpu = model, args, on_cpu
        self.max_new_tokens = max_new_tokens
        self.manager = None
        self.attn_in_use = None
        self.starts = 0

    def get(self):
        if self.manager is not None:
            return self.manager
        from transformers import GenerationConfig

        # eos -1: no token ends a request (ignore_eos); each request has its own length.
        gen = GenerationConfig(max_new_tokens=self.max_new_tokens, do_sample=False, eos_token_id=-1,
                               pad_token_id=0)
        cfg = cb_config(self.args, self.on_cpu)
        kwargs = {"continuous_batching_config": cfg} if cfg is not None else {}
        manager = self.model.init_continuous_batching(generation_config=gen, **kwargs)
        self.attn_in_use = getattr(self.model.config, "_attn_implementation", None)
        try:
            if hasattr(manager, "warmup") and not getattr(manager, "warmed_up", True):
                manager.warmup()
            manager.start()
        except BaseException:
            self.manager = manager
            self.close()
            raise
        self.manager, self.starts = manager, self.starts + 1
        return manager

    def close(self) -> None:
        """Stops the loop, failing what is still pending, and waits for it with no time
        limit: stop() switches the model's attention back as soon as it returns, and a
        loop still running then crashes in the non-paged attention."""
        manager, self.manager = self.manager, None
        if manager is None:
            return
        kwargs = {"hard_stop": True} if "hard_stop" in inspect.signature(manager.stop).parameters else {}
        manager.stop(block=True, **kwargs)


@torch.no_grad()
def run_hf_rate(session: CBSession, workload, arrivals: list[float], rate: float, tag: str,
                time_limit: float) -> dict:
    manager = session.get()
    accepts = set(inspect.signature(manager.add_request).parameters)
    extra = {k: True for k in ("streaming", "record_timestamps") if k in accepts}
    source = ("GenerationOutput.timestamps (generation thread)" if "record_timestamps" in extra
              else "receipt time of the first streamed / final output (main thread)")
    want = {f"{tag}-{i}": n for i, (_, n) in enumerate(workload)}
    sched, first, final, failed = {}, {}, {}, {}
    i = 0
    thread_error = None
    start = time.perf_counter() + 0.01
    while len(final) + len(failed) < len(workload):
        now = time.perf_counter()
        if now - start > time_limit:
            break
        while i < len(workload) and start + arrivals[i] <= now:
            rid = f"{tag}-{i}"
            manager.add_request(workload[i][0], request_id=rid, max_new_tokens=workload[i][1], **extra)
            sched[rid] = start + arrivals[i]
            i += 1
        wait = (start + arrivals[i] - time.perf_counter()) if i < len(workload) else 0.1
        r = manager.get_result(timeout=min(max(wait, 0.001), 0.1))
        got = time.perf_counter()
        if r is None:
            if not manager.is_running():
                status = getattr(manager, "background_thread_status", None)
                thread_error = repr(getattr(status, "fatal_error", None))
                break
            continue
        if r.request_id not in want:
            continue
        if getattr(r, "error", None):
            failed[r.request_id] = str(r.error)[:300]
            continue
        stamps = getattr(r, "timestamps", None) or []
        if stamps and not sched[r.request_id] - 1.0 <= stamps[0] <= got:
            stamps, source = [], "receipt times (timestamps were not on time.perf_counter())"
        if r.request_id not in first and (stamps or r.generated_tokens):
            first[r.request_id] = stamps[0] if stamps else got
        if r.is_finished():
            final[r.request_id] = (stamps[-1] if stamps else got, len(r.generated_tokens))
    elapsed = time.perf_counter() - start
    if len(final) < len(workload):
        session.close()  # unfinished or failed requests must not run into the next rate
    records = [{"arrival": sched[rid], "first": first[rid], "finish": final[rid][0] if rid in final else None,
                "tokens": final[rid][1] if rid in final else 0} for rid in first]
    rep = rate_report(rate, records, len(workload), arrivals)
    rep.update({"elapsed_s": elapsed, "submitted": i, "failed": len(failed), "timing_source": source,
                "attn_implementation": session.attn_in_use, "time_limit_hit": elapsed > time_limit})
    if failed:
        rep["first_failure"] = next(iter(failed.values()))
    if thread_error is not None:
        rep["generation_thread_error"] = thread_error
    wrong = sum(1 for rid, (_, n) in final.items() if n != want[rid])
    if wrong:
        rep["wrong_lengths"] = wrong  # ignore_eos not honoured: the numbers mean less
    return rep


def transformers_part(args, model: str | None, load_format: str, workload, rates, report, save) -> None:
    device = report["device"]
    res = report["results"]["transformers_cb"] = {"rates": []}
    try:
        hf = load_transformers_model(args, model, load_format, device, getattr(torch, report["dtype"]))
    except Exception as e:  # a transformers API change must not lose pagedserve's numbers
        res.update({"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-2000:]})
        return
    res["loaded_attn_implementation"] = hf.config._attn_implementation
    subset = workload[:args.hf_requests]
    session = CBSession(hf, args, device == "cpu", max(n for _, n in subset))
    try:
        for k, rate in enumerate(rates):
            arrivals = poisson_arrivals(len(workload), rate, args.seed + 1)[:len(subset)]
            try:
                rep = run_hf_rate(session, subset, arrivals, rate, f"hf{k}", args.hf_time_limit)
            except Exception as e:
                session.close()
                error = f"{type(e).__name__}: {e}"
                rep = {"rate": rate, "error": error, "traceback": traceback.format_exc()[-2000:]}
                # One retry on the fallback attention (eager runs as paged|eager); the
                # later rates keep it.
                fallback = args.hf_attn_fallback
                if fallback and "attn_fallback" not in res:
                    res["attn_fallback"] = {"to": fallback, "because": error}
                    try:
                        hf.set_attn_implementation(fallback)
                        rep = run_hf_rate(session, subset, arrivals, rate, f"hf{k}b", args.hf_time_limit)
                        rep["first_attempt_error"] = error
                    except Exception as e2:
                        session.close()
                        rep["fallback_error"] = f"{type(e2).__name__}: {e2}"
            res["rates"].append(rep)
            save()
    finally:
        session.close()
        res["manager_starts"] = session.starts
    del hf, session
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
    ap.add_argument("--model", default="llama8b",
                    help="llama8b (random weights of Llama-3.1-8B's shape), default (the embedded "
                         "SmolLM2) or a path")
    ap.add_argument("--load-format", default="auto", choices=["auto", "dummy"], help="for default or a path")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto", help="auto: bfloat16 on GPU, float32 on CPU")
    ap.add_argument("--rates", default="2,8,16", help="requests/s, comma separated")
    ap.add_argument("--hf-rates", help="transformers' rates (default: --rates)")
    ap.add_argument("--num-requests", type=int, default=200, help="per rate, pagedserve")
    ap.add_argument("--min-prompt", type=int, default=128)
    ap.add_argument("--max-prompt", type=int, default=1024)
    ap.add_argument("--min-output", type=int, default=32)
    ap.add_argument("--max-output", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
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
        if args.out:
            with open(args.out, "w") as f:
                json.dump(report, f, indent=2, default=str)
                f.write("\n")

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

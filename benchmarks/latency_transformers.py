"""The transformers side of benchmarks/latency.py: its continuous batching (the
manager of `init_continuous_batching`) driven at the same Poisson arrival times as
pagedserve, timed by its own generation timestamps. Split out of latency.py, which runs it.
"""

from __future__ import annotations

import gc
import inspect
import time
import traceback

import torch

from harness import LLAMA_8B
from latency import poisson_arrivals, rate_report
from throughput import hf_model


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

"""Offline throughput on one GPU: pagedserve against transformers `generate` in static
batches and transformers' own continuous batching, on one shared request list.

Model: a random-weight model of Llama-3.1-8B's shape in bf16 (`load_format="dummy"`
from a config.json; speed does not depend on the weight values; default RoPE, whose
cost is that of llama3-scaled RoPE). Workload (issue 9): 1000 requests, prompts of
U[128, 1024] random token ids, outputs of U[32, 512] tokens with ignore_eos. The
transformers systems run the first `--hf-requests` requests of the same list (their
rates are what compares). In one process, in this order:

  copy        device-to-device copy bandwidth (read + write), the bandwidth yardstick
  pagedserve  every request added at once, `step()` until done; per step: time in the
              model runner, decode-only or mixed, CUDA graph or eager, sequences
              running, KV blocks held against the tokens in them
  profile     one decode step at fixed batch sizes and context: eager, through the
              graph, staging alone, and the graph's device time
  batch-1     one request decoding alone through the engine: (weight + KV bytes per
              step) / step time against the copy bandwidth
  hf-static   `generate` over static batches of 32 in arrival order; each batch runs to
              its longest output and only requested tokens count
  hf-cb       transformers continuous batching (`init_continuous_batching`), each
              request with its own max_new_tokens

    python benchmarks/throughput.py --out docs/throughput_gpu.json
"""

from __future__ import annotations

import argparse
import gc
import random
import tempfile
import time

import torch

from harness import (LLAMA_8B, add_workload_args, copy_bandwidth, environment, make_workload,
                     run_to_completion, timed, write_json)


def run_pagedserve(llm, workload, block_size: int, async_scheduling: bool = True) -> dict:
    """The whole workload through the engine, every request added at t = 0. With
    async_scheduling off the step-by-step split (runner vs the host's work outside
    it) is measured too; with it on the two overlap, so only the totals mean much."""
    from pagedserve import SamplingParams

    engine, runner = llm.engine, llm.engine.runner
    engine.config.async_scheduling = async_scheduling
    graphs = runner.graphs
    llm.generate([list(range(1000, 1100))] * 4, SamplingParams(max_tokens=8, ignore_eos=True),
                 use_tqdm=False)  # warm-up
    steps = []  # prefill tokens, sequences, decodes, KV tokens, KV blocks, seconds, graphed
    replays = [0]  # graph replays before this step

    def observe(batch, seconds):  # seconds: launch alone, or launch and wait (synchronous)
        work = batch.work
        decodes = sum(1 for w in work if len(w.token_ids) == 1)
        now = graphs.num_replays if graphs else 0
        steps.append([sum(len(w.token_ids) for w in work) - decodes, len(work), decodes,
                      sum(w.start_pos + len(w.token_ids) for w in work),
                      sum(len(w.block_table) for w in work), seconds, now > replays[0]])
        replays[0] = now

    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for _, n in workload]
    for i, ((prompt, _), p) in enumerate(zip(workload, params)):
        engine.add_request(f"r{i}", prompt, p)
    before = engine.stats()
    replays[0] = graphs.num_replays if graphs else 0
    produced, seconds = run_to_completion(engine, observe)
    stats = engine.stats()
    assert produced == sum(n for _, n in workload), "every request gets all its tokens"
    decode_only = [s for s in steps if s[0] == 0]
    mixed = [s for s in steps if s[0] > 0]
    busy = [s for s in steps if s[1] >= 8]  # utilisation of steps that hold a real batch
    out = {
        "async_scheduling": async_scheduling,
        "seconds": seconds, "useful_tokens": produced, "tokens_per_s": produced / seconds,
        "steps": len(steps), "decode_only_steps": len(decode_only),
        "steps_scheduled_ahead": stats.num_steps_scheduled_ahead - before.num_steps_scheduled_ahead,
        "graphed_steps": sum(1 for s in steps if s[6]),
        "mean_decode_batch": sum(s[2] for s in decode_only) / max(len(decode_only), 1),
        "preemptions": stats.num_preemptions - before.num_preemptions,
        "kv_utilization": sum(s[3] for s in busy) / max(sum(s[4] for s in busy) * block_size, 1),
        "kv_pool_blocks": engine.block_manager.num_gpu_blocks,
        "mean_kv_pool_occupancy": sum(s[4] for s in busy) / max(len(busy), 1) / engine.block_manager.num_gpu_blocks,
        "peak_kv_pool_occupancy": max((s[4] for s in steps), default=0) / engine.block_manager.num_gpu_blocks,
        "peak_running": max((s[1] for s in steps), default=0),
        "mean_running": sum(s[1] for s in busy) / max(len(busy), 1),
    }
    if not async_scheduling:
        out.update({
            "seconds_in_decode_only_steps": sum(s[5] for s in decode_only),
            "seconds_in_mixed_steps": sum(s[5] for s in mixed),
            "seconds_outside_the_runner": seconds - sum(s[5] for s in steps),
            "mean_decode_only_step_ms": 1e3 * sum(s[5] for s in decode_only) / max(len(decode_only), 1),
        })
    return out


def _decode_work(sizes_ctx, block_size, params):
    from pagedserve.engine.batch import SeqWork

    work, first = [], 0
    for i, ctx in enumerate(sizes_ctx):
        n = -(-ctx // block_size)
        work.append(SeqWork(i, [1000 + i], ctx - 1, list(range(first, first + n)), True, params,
                            [1000] * (ctx - 1), [], 0))
        first += n
    return work


def decode_profile(runner, sizes: list[int], context: int) -> dict:
    """Where one decode step's time goes, at each batch size with every sequence at
    `context` tokens. Block tables point at arbitrary pool blocks: the timing does not
    depend on their contents."""
    from pagedserve import SamplingParams
    from pagedserve.engine.batch import ScheduledBatch

    g, out = runner.graphs, {}
    params = SamplingParams(temperature=0.0)

    def wall(fn, reps):  # ms per call, host work included
        fn()
        return 1e3 * timed(fn, cuda=True, reps=reps)[0]

    for b in sizes:
        batch = ScheduledBatch(_decode_work([context] * b, runner.block_size, params))
        row = {}
        if g is not None:
            g.enabled = False
        row["eager_step_ms"] = wall(lambda: runner.execute(batch), 5)
        if g is not None:
            g.enabled = True
            row["graph_step_ms"] = wall(lambda: runner.execute(batch), 10)
            row["staging_ms"] = wall(lambda: g.stage(batch.work), 10)
            key = g.stage(batch.work)
            row["graph_gpu_ms"] = 1e3 * timed(lambda: g.replay(key, b), cuda=True, reps=20)[1]
        out[b] = row
    return out


def kernel_profile(runner, context: int, decode_batch: int, prefill_seqs: int, top: int = 12) -> dict:
    """Device time by kernel (torch profiler) of one eager prefill step (prefill_seqs
    prompts of `context` tokens) and one eager decode step (decode_batch sequences at
    `context`): where the GPU time of each kind of step goes."""
    from torch.profiler import ProfilerActivity, profile

    from pagedserve import SamplingParams
    from pagedserve.engine.batch import ScheduledBatch, SeqWork

    params = SamplingParams(temperature=0.0)
    bs = runner.block_size
    prompts = [SeqWork(i, [1000 + i] * context, 0, list(range(i * 80, i * 80 + -(-context // bs))),
                       True, params, [1000] * context, [], 0) for i in range(prefill_seqs)]
    decode = ScheduledBatch(_decode_work([context] * decode_batch, bs, params))
    out = {}
    g = runner.graphs
    for name, batch in (("prefill", ScheduledBatch(prompts)), ("decode_eager", decode)):
        if g is not None:
            g.enabled = False
        runner.execute(batch)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            runner.execute(batch)
            torch.cuda.synchronize()
        if g is not None:
            g.enabled = True
        rows = [(e.key, e.count, e.device_time_total / 1e3) for e in prof.key_averages()
                if e.device_time_total > 0]
        rows.sort(key=lambda r: -r[2])
        out[name] = {"device_ms": sum(r[2] for r in rows),
                     "top": [{"kernel": k[:90], "calls": c, "ms": round(ms, 3)} for k, c, ms in rows[:top]]}
    return out


def weight_bytes_per_step(model) -> int:
    """Parameter bytes a decode step reads: all but the embedding table (one row)."""
    emb = model.model.embed_tokens.weight
    return sum(p.numel() * p.element_size() for p in model.parameters() if p is not emb)


def batch1(llm, context: int, new_tokens: int, copy_bw: float, async_scheduling: bool = True) -> dict:
    """One request alone: the mean decode step through the whole engine."""
    from pagedserve import SamplingParams

    engine = llm.engine
    engine.config.async_scheduling = async_scheduling
    rng = random.Random(1)
    engine.add_request("b1", [rng.randrange(1000, 100000) for _ in range(context)],
                       SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True))
    times = []
    while engine.has_unfinished_requests():
        start = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - start)
    step = sum(times[1:]) / len(times[1:])  # the first step is the prefill
    mc = engine.runner.model_config
    kv_per_token = 2 * mc.num_layers * mc.num_kv_heads * mc.head_dim * engine.runner.dtype.itemsize
    mean_ctx = context + new_tokens / 2
    nbytes = weight_bytes_per_step(engine.runner.model) + kv_per_token * mean_ctx
    return {"async_scheduling": async_scheduling, "context": context, "new_tokens": new_tokens,
            "step_ms": 1e3 * step,
            "weight_bytes": weight_bytes_per_step(engine.runner.model),
            "kv_bytes_per_token": kv_per_token, "bytes_per_step": nbytes, "achieved_bytes_per_s": nbytes / step,
            "fraction_of_copy_bandwidth": nbytes / step / copy_bw}


def hf_model(cfg_kwargs: dict):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**cfg_kwargs)
    torch.manual_seed(0)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            model = LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa")
    finally:
        torch.set_default_dtype(prev)
    model = model.to(torch.bfloat16).eval()
    model.generation_config.eos_token_id = None  # ignore_eos: every request runs its length
    model.generation_config.pad_token_id = 0
    return model


@torch.no_grad()
def run_hf_static(model, workload, batch_size: int, time_limit: float) -> dict:
    """Left-padded static batches in arrival order, each to its longest output."""
    ids = torch.tensor([[5] * 16, [6] * 16], device="cuda")
    model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=4)
    useful = requests = 0
    start = time.perf_counter()
    for i in range(0, len(workload), batch_size):
        if requests and time.perf_counter() - start > time_limit:
            break
        batch = workload[i:i + batch_size]
        width = max(len(p) for p, _ in batch)
        ids = torch.tensor([[0] * (width - len(p)) + p for p, _ in batch], device="cuda")
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p, _ in batch], device="cuda")
        model.generate(ids, attention_mask=mask, do_sample=False,
                       max_new_tokens=max(n for _, n in batch), pad_token_id=0)
        useful += sum(n for _, n in batch)
        requests += len(batch)
    seconds = time.perf_counter() - start
    return {"requests": requests, "seconds": seconds, "useful_tokens": useful,
            "tokens_per_s": useful / seconds}


@torch.no_grad()
def run_hf_cb(model, workload, time_limit: float) -> dict:
    from transformers import GenerationConfig

    # eos -1: no token ends a request (ignore_eos); each request has its own length.
    gen = GenerationConfig(max_new_tokens=max(n for _, n in workload), do_sample=False,
                           eos_token_id=-1, pad_token_id=0)
    manager = model.init_continuous_batching(generation_config=gen)
    if hasattr(manager, "warmup") and not getattr(manager, "warmed_up", True):
        manager.warmup()
    manager.start()
    want = {}
    useful = done = 0
    try:
        start = time.perf_counter()
        for i, (prompt, n) in enumerate(workload):
            want[f"r{i}"] = n
            manager.add_request(prompt, request_id=f"r{i}", max_new_tokens=n)
        while done < len(workload) and time.perf_counter() - start < time_limit:
            r = manager.get_result(timeout=1.0)
            if r is None or r.request_id not in want:
                continue
            done += 1
            useful += min(len(getattr(r, "generated_tokens", []) or []), want[r.request_id])
        seconds = time.perf_counter() - start
    finally:
        # A hard stop when requests are left: a soft stop that times out switches the
        # model back to plain SDPA under the still-running loop, which then crashes.
        manager.stop(block=True, hard_stop=done < len(workload))
    return {"requests": done, "seconds": seconds, "useful_tokens": useful,
            "tokens_per_s": useful / seconds}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_workload_args(ap)
    ap.add_argument("--max-num-seqs", type=int, default=512)
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192)
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    ap.add_argument("--no-cuda-graphs", action="store_true", help="pagedserve fully eager")
    ap.add_argument("--profile-sizes", default="1,16,64,128,256")
    ap.add_argument("--profile-context", type=int, default=1024)
    ap.add_argument("--hf-requests", type=int, default=160)
    ap.add_argument("--hf-batch-size", type=int, default=32)
    ap.add_argument("--hf-time-limit", type=float, default=300.0, help="seconds per transformers system")
    ap.add_argument("--skip-transformers", action="store_true")
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args()

    from transformers import LlamaConfig

    from pagedserve import LLM
    from pagedserve.engine.llm_engine import LLMEngine
    from pagedserve.runner.model_runner import ModelRunner

    report = {"environment": environment(), "args": vars(args), "results": {}}
    res = report["results"]

    def save():
        write_json(args.out, report)

    res["copy_bytes_per_s"] = copy_bw = copy_bandwidth()
    workload = make_workload(args, LLAMA_8B["vocab_size"])
    report["workload"] = {"num_requests": len(workload), "prompt_tokens": sum(len(p) for p, _ in workload),
                          "output_tokens": sum(n for _, n in workload)}
    with tempfile.TemporaryDirectory() as model_dir:
        LlamaConfig(**LLAMA_8B).save_pretrained(model_dir)
        start = time.perf_counter()
        from pagedserve.config import EngineConfig

        cfg = EngineConfig(model=model_dir, load_format="dummy", dtype="bfloat16", device="cuda",
                           max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
                           max_num_batched_tokens=args.max_num_batched_tokens,
                           gpu_memory_utilization=args.gpu_memory_utilization, swap_space_gb=1.0)
        runner = ModelRunner(cfg, cuda_graphs=not args.no_cuda_graphs)
        llm = LLM.from_engine(LLMEngine(cfg, runner=runner))
        res["engine_start_seconds"] = time.perf_counter() - start
        if runner.graphs is not None:
            res["cuda_graphs"] = {"graphs": runner.graphs.num_graphs,
                                  "capture_seconds": runner.graphs.capture_seconds}
        ps = res["pagedserve"] = run_pagedserve(llm, workload, cfg.block_size, async_scheduling=True)
        save()
        res["pagedserve_sync"] = run_pagedserve(llm, workload, cfg.block_size, async_scheduling=False)
        from pagedserve.model import layers

        ps["flash_prefill"] = bool(runner.flash_prefill and layers._FLASH["ok"])
        ps["contiguous_max_len_capacity"] = ps["kv_pool_blocks"] * cfg.block_size // args.max_model_len
        save()
        sizes = [int(s) for s in args.profile_sizes.split(",") if int(s) <= args.max_num_seqs]
        res["decode_profile"] = decode_profile(runner, sizes, args.profile_context)
        try:
            res["kernel_profile"] = kernel_profile(runner, args.profile_context, min(256, args.max_num_seqs),
                                                   args.max_num_batched_tokens // args.profile_context)
        except Exception as e:  # the profiler is a diagnosis, not a result
            res["kernel_profile"] = {"error": f"{type(e).__name__}: {e}"}
        save()
        res["batch1_sync"] = batch1(llm, args.profile_context, 256, copy_bw, async_scheduling=False)
        res["batch1"] = batch1(llm, args.profile_context, 256, copy_bw, async_scheduling=True)
        if "graph_gpu_ms" in res["decode_profile"].get(1, {}):
            b1 = res["batch1"]  # the same step as pure device time, at the profile's context
            nbytes = b1["weight_bytes"] + b1["kv_bytes_per_token"] * args.profile_context
            b1["graph_device_fraction"] = (nbytes / (res["decode_profile"][1]["graph_gpu_ms"] / 1e3)
                                           / copy_bw)
        save()
        del llm, runner
        gc.collect()
        torch.cuda.empty_cache()

    if not args.skip_transformers:
        subset = workload[:args.hf_requests]
        model = hf_model(LLAMA_8B)
        for name, fn in (("hf_static", lambda: run_hf_static(model, subset, args.hf_batch_size, args.hf_time_limit)),
                         ("hf_cb", lambda: run_hf_cb(model, subset, args.hf_time_limit))):
            try:
                res[name] = fn()
            except Exception as e:  # a transformers API change must not lose pagedserve's numbers
                res[name] = {"error": f"{type(e).__name__}: {e}"}
            torch.cuda.empty_cache()
            save()

    ps = res["pagedserve"]
    print(f"\n{report['environment']['gpu']}, torch {torch.__version__}, "
          f"copy {copy_bw / 1e12:.2f} TB/s; {report['workload']}")
    sy = res["pagedserve_sync"]
    print(f"pagedserve: flash prefill {ps['flash_prefill']}, {ps['steps']} steps ({ps['decode_only_steps']} decode-only, "
          f"{ps['steps_scheduled_ahead']} scheduled ahead, {ps['graphed_steps']} graphed, mean decode batch "
          f"{ps['mean_decode_batch']:.0f})")
    print(f"synchronous scheduling: {sy['tokens_per_s']:.0f} tok/s, {sy['steps']} steps, "
          f"{sy['mean_decode_only_step_ms']:.1f} ms per decode-only step; runner "
          f"{sy['seconds_in_decode_only_steps']:.1f} s decode-only + {sy['seconds_in_mixed_steps']:.1f} s mixed, "
          f"outside the runner {sy['seconds_outside_the_runner']:.1f} s")
    print("decode step profile (ms) at context", args.profile_context)
    for b, row in res["decode_profile"].items():
        print(f"  batch {b:>4}: " + ", ".join(f"{k} {v:.2f}" for k, v in row.items()))
    for name, prof in res.get("kernel_profile", {}).items():
        if isinstance(prof, dict) and "top" in prof:
            print(f"  {name} step device time {prof['device_ms']:.1f} ms; top: " + "; ".join(
                f"{t['kernel'][:40]} {t['ms']:.2f}" for t in prof["top"][:5]))
    print(f"{'system':<24}{'requests':>9}{'seconds':>9}{'useful tok/s':>14}{'pagedserve x':>14}")
    for name in ("pagedserve", "pagedserve_sync", "hf_static", "hf_cb"):
        r = res.get(name)
        if r is None or "error" in r:
            print(f"{name:<24}{'':>9}{'':>9}{'':>14}  {r['error'][:60] if r else 'skipped'}")
            continue
        n = r.get("requests", len(workload))
        print(f"{name:<24}{n:>9}{r['seconds']:>9.1f}{r['tokens_per_s']:>14.0f}"
              f"{ps['tokens_per_s'] / r['tokens_per_s']:>14.1f}")
    b1 = res["batch1"]
    print(f"batch-1 decode, synchronous scheduling: {res['batch1_sync']['step_ms']:.2f} ms/step = "
          f"{100 * res['batch1_sync']['fraction_of_copy_bandwidth']:.0f}% of copy")
    print(f"batch-1 decode: {b1['step_ms']:.2f} ms/step, {b1['achieved_bytes_per_s'] / 1e12:.2f} TB/s = "
          f"{100 * b1['fraction_of_copy_bandwidth']:.0f}% of copy"
          + (f" (graph device time alone: {100 * b1['graph_device_fraction']:.0f}%)"
             if "graph_device_fraction" in b1 else ""))
    print(f"KV: utilization {100 * ps['kv_utilization']:.1f}% of held slots, pool occupancy mean "
          f"{100 * ps['mean_kv_pool_occupancy']:.0f}% peak {100 * ps['peak_kv_pool_occupancy']:.0f}%; "
          f"running mean {ps['mean_running']:.0f} peak {ps['peak_running']} vs "
          f"{ps['contiguous_max_len_capacity']} max-length contiguous slots in the same memory")
    save()


if __name__ == "__main__":
    main()

"""Block manager benchmarks (CPU; no model involved).

1. Bookkeeping cost of one decode step: 256 running sequences with 2k-token contexts,
   one `append_slots` call from Python for all 256 (target: under 50 us), against 256
   single `append_slot` calls.
2. A simulated serving workload (prompts U[128,1024], outputs U[32,512], 16-token
   blocks, a fixed pool): the KV utilization of paged allocation (token slots holding
   real tokens / slots in allocated blocks) against reserving contiguous space per
   request, both for the model's maximum length and for exactly prompt + max_tokens.

    python benchmarks/block_manager.py [--out results.json]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

from harness import environment, write_json
from pagedserve._native import BlockManager


def bench_decode_step(num_seqs=256, context=2048, block_size=16, steps=512):
    blocks_per_seq = (context + steps) // block_size + 2
    bm = BlockManager(num_seqs * blocks_per_seq, 0, block_size, enable_prefix_caching=True, watermark=0.0)
    rng = random.Random(0)
    for s in range(num_seqs):
        bm.allocate(s, [rng.randrange(32000) for _ in range(context)])
    seqs = list(range(num_seqs))
    batched, single = [], []
    for step in range(steps):
        tokens = [rng.randrange(32000) for _ in seqs]
        if step % 2 == 0:
            t0 = time.perf_counter()
            bm.append_slots(seqs, tokens)
            batched.append(time.perf_counter() - t0)
        else:
            t0 = time.perf_counter()
            for s, t in zip(seqs, tokens):
                bm.append_slot(s, t)
            single.append(time.perf_counter() - t0)
    bm.check_invariants()
    return {
        "num_seqs": num_seqs, "context": context, "block_size": block_size,
        "append_slots_median_us": statistics.median(batched) * 1e6,
        "append_slots_p99_us": sorted(batched)[int(0.99 * len(batched))] * 1e6,
        "append_slot_loop_median_us": statistics.median(single) * 1e6,
    }


def simulate_serving(num_requests=2000, num_blocks=4096, block_size=16, max_model_len=2048,
                     max_num_seqs=256, seed=0):
    """Offline arrival (all requests queued at t=0), FCFS admission, one token per
    running sequence per step; when a sequence cannot grow, the latest admitted one is
    preempted by recompute (freed and requeued at the front). Utilization is averaged
    over steps, weighting each step equally, once the first request has finished (the
    steady state)."""
    rng = random.Random(seed)
    reqs = [(rng.randint(128, 1024), rng.randint(32, 512)) for _ in range(num_requests)]
    paged = _simulate_paged(reqs, num_blocks, block_size, max_num_seqs, rng)
    capacity = num_blocks * block_size
    contiguous_max = _simulate_contiguous(reqs, capacity, max_num_seqs, lambda p, o: max_model_len)
    contiguous_exact = _simulate_contiguous(reqs, capacity, max_num_seqs, lambda p, o: p + o)
    return {
        "num_requests": num_requests, "num_blocks": num_blocks, "block_size": block_size,
        "max_model_len": max_model_len, "paged": paged,
        "contiguous_max_len": contiguous_max, "contiguous_prompt_plus_max_tokens": contiguous_exact,
    }


def _simulate_paged(reqs, num_blocks, block_size, max_num_seqs, rng):
    bm = BlockManager(num_blocks, 0, block_size, enable_prefix_caching=False, watermark=0.01)
    waiting = list(range(len(reqs)))
    running: list[int] = []
    generated = [0] * len(reqs)
    samples, batch_sizes, steps, preemptions, finished = [], [], 0, 0, 0
    while waiting or running:
        while waiting and len(running) < max_num_seqs:
            r = waiting[0]
            prompt = [rng.randrange(32000) for _ in range(reqs[r][0] + generated[r])]
            if not bm.can_allocate(prompt):
                break
            bm.allocate(r, prompt)
            running.append(waiting.pop(0))
        # Every running sequence grows by one token; preempt the newest until that fits.
        while True:
            need = sum(1 for r in running if bm.num_tokens(r) % block_size == 0)
            if need <= bm.num_free_gpu_blocks:
                break
            victim = running.pop()
            bm.free(victim)
            waiting.insert(0, victim)
            preemptions += 1
        bm.append_slots(running, [rng.randrange(32000) for _ in running])
        steps += 1
        if finished:
            samples.append(bm.utilization)
            batch_sizes.append(len(running))
        still = []
        for r in running:
            generated[r] += 1
            if generated[r] == reqs[r][1]:
                bm.free(r)
                finished += 1
            else:
                still.append(r)
        running = still
    return {"kv_utilization": statistics.mean(samples), "mean_running": statistics.mean(batch_sizes),
            "steps": steps, "preemptions": preemptions}


def _simulate_contiguous(reqs, capacity, max_num_seqs, reserve):
    """Each admitted request reserves reserve(prompt, output) slots up front, as systems
    that keep a sequence's KV contiguous must."""
    waiting = list(range(len(reqs)))
    running: list[int] = []
    used = 0
    generated = [0] * len(reqs)
    samples, batch_sizes, steps, finished = [], [], 0, 0
    while waiting or running:
        while waiting and len(running) < max_num_seqs and used + reserve(*reqs[waiting[0]]) <= capacity:
            r = waiting.pop(0)
            used += reserve(*reqs[r])
            running.append(r)
        steps += 1
        for r in running:
            generated[r] += 1
        if finished:
            tokens = sum(reqs[r][0] + generated[r] for r in running)
            samples.append(tokens / used)
            batch_sizes.append(len(running))
        still = []
        for r in running:
            if generated[r] == reqs[r][1]:
                used -= reserve(*reqs[r])
                finished += 1
            else:
                still.append(r)
        running = still
    return {"kv_utilization": statistics.mean(samples), "mean_running": statistics.mean(batch_sizes),
            "steps": steps}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="write the results as JSON here")
    ap.add_argument("--requests", type=int, default=2000)
    args = ap.parse_args()
    step = bench_decode_step()
    sim = simulate_serving(num_requests=args.requests)
    result = {"environment": environment(), "decode_step": step, "serving": sim}
    write_json(args.out, result)
    print("decode-step bookkeeping, 256 sequences x 2048-token contexts:")
    print(f"  append_slots (one call)    median {step['append_slots_median_us']:7.1f} us"
          f"   p99 {step['append_slots_p99_us']:7.1f} us   (target < 50 us)")
    print(f"  append_slot x 256 (loop)   median {step['append_slot_loop_median_us']:7.1f} us")
    print(f"simulated serving, {sim['num_requests']} requests, {sim['num_blocks']} blocks of {sim['block_size']}:")
    print(f"  {'allocation':36s} {'KV utilization':>15s} {'mean running':>13s} {'steps':>7s}")
    for name, key in [("paged (pagedserve)", "paged"),
                      (f"contiguous, max length {sim['max_model_len']}", "contiguous_max_len"),
                      ("contiguous, prompt + max_tokens", "contiguous_prompt_plus_max_tokens")]:
        r = sim[key]
        print(f"  {name:36s} {100 * r['kv_utilization']:14.1f}% {r['mean_running']:13.1f} {r['steps']:7d}")


if __name__ == "__main__":
    main()

"""Scheduler decisions, step by step, against the native block manager and the oracle
runner (kv_shadow.OracleRunner).

The oracle runner plays the model: it applies each batch's cache ops in the runner's
order (swap-out, swap-in, copy-on-write), writes every fed token id into its slot, and
then reads every sequence's whole context back through its block table. A wrong
table, a lost copy, a bad swap mapping, or a prefix hit on a block nobody computed
shows up as a context that is not the sequence's own tokens. Its "model" picks the
next token as a pure function of the context (and the seed), so any preemption or
batching must leave every output unchanged.
"""

from __future__ import annotations

import random
from collections import Counter

import pytest

from kv_shadow import OracleRunner
from pagedserve._native import BlockManager
from pagedserve.engine.scheduler import Scheduler
from pagedserve.engine.sequence import Status
from pagedserve.sampling_params import SamplingParams

BS = 4


def make(num_gpu=32, num_cpu=32, *, tokens=64, seqs=8, mode="auto", prefix=False,
         max_model_len=1024):
    bm = BlockManager(num_gpu, num_cpu, BS, enable_prefix_caching=prefix, watermark=0.0)
    sched = Scheduler(bm, max_num_seqs=seqs, max_num_batched_tokens=tokens,
                      max_model_len=max_model_len, preemption_mode=mode)
    return sched, OracleRunner(bm)


def params(max_tokens=8, **kw):
    return SamplingParams(max_tokens=max_tokens, **kw)


def step(sched, runner):
    """One engine step without a tokenizer: stops only on max_tokens."""
    batch = sched.schedule()
    results = runner.execute(batch)
    for seq, _ in sched.update(batch, results):
        if len(seq.output_token_ids) >= seq.params.max_tokens:
            sched.finish_seq(seq, "length")
    sched.bm.check_invariants()
    return batch


def work(batch):
    return [(w.seq_id, w.start_pos, len(w.token_ids), w.sample) for w in batch.work]


def run_all(sched, runner, max_steps=2000):
    groups = list(sched._groups.values())
    for _ in range(max_steps):
        if not sched.has_unfinished_requests():
            break
        step(sched, runner)
    assert not sched.has_unfinished_requests(), "requests left after max_steps"
    return groups


def outputs(groups):
    return {g.request_id: [s.output_token_ids for s in g.seqs] for g in groups}


# ---- budgets and chunked prefill -----------------------------------------------------

def test_decodes_come_first_and_long_prompts_are_chunked():
    sched, runner = make(tokens=8)
    sched.add_request("a", None, [1, 2, 3], params(max_tokens=6))
    steps = [work(step(sched, runner))]
    assert steps[-1] == [(0, 0, 3, True)]
    sched.add_request("b", None, list(range(10, 30)), params(max_tokens=2))
    expected = [[(0, 3, 1, True), (1, 0, 7, False)], [(0, 4, 1, True), (1, 7, 7, False)],
                [(0, 5, 1, True), (1, 14, 6, True)], [(0, 6, 1, True), (1, 20, 1, True)],
                [(0, 7, 1, True)]]
    for want in expected:
        steps.append(work(step(sched, runner)))
        assert steps[-1] == want
    assert not sched.has_unfinished_requests()
    decodes = [sum(1 for _, _, n, sample in w if n == 1 and sample) for w in steps]
    assert Counter(n for n in decodes if n) == {1: 4, 2: 1}  # steps by decode batch size


def test_max_num_seqs_holds_back_admissions():
    sched, runner = make(seqs=2)
    for rid, mt in (("a", 2), ("b", 4), ("c", 1)):
        sched.add_request(rid, None, [5, 6, 7], params(max_tokens=mt))
    assert work(step(sched, runner)) == [(0, 0, 3, True), (1, 0, 3, True)]
    assert [g.request_id for g in sched.waiting] == ["c"]
    assert work(step(sched, runner)) == [(0, 3, 1, True), (1, 3, 1, True)]  # a finishes
    assert work(step(sched, runner)) == [(1, 4, 1, True), (2, 0, 3, True)]


def test_parallel_samples_count_against_max_num_seqs():
    sched, runner = make(seqs=3)
    sched.add_request("a", None, [5, 6, 7], params(n=2, seed=1))
    sched.add_request("b", None, [8, 9], params(n=2, seed=2))
    assert work(step(sched, runner)) == [(0, 0, 3, True)]  # b needs 2 more slots
    # The fork feeds the last prompt token again to sample its own first token.
    assert work(step(sched, runner)) == [(0, 3, 1, True), (2, 2, 1, True)]


def test_token_budget_limits_decodes_in_queue_order():
    sched, runner = make(tokens=2)
    for rid in "abc":
        sched.add_request(rid, None, [4], params(max_tokens=2))
    assert work(step(sched, runner)) == [(0, 0, 1, True), (1, 0, 1, True)]
    assert work(step(sched, runner)) == [(0, 1, 1, True), (1, 1, 1, True)]
    assert work(step(sched, runner)) == [(2, 0, 1, True)]


def test_priority_orders_admission_then_fcfs():
    sched, runner = make(seqs=1)
    owner = {}
    for rid, prio in (("late-low", 5), ("urgent", -1), ("normal-1", 0), ("normal-2", 0)):
        group = sched.add_request(rid, None, [1, 2], params(max_tokens=1), priority=prio)
        owner[group.seqs[0].seq_id] = rid
    order = [owner[step(sched, runner).work[0].seq_id] for _ in range(4)]
    assert order == ["urgent", "normal-1", "normal-2", "late-low"]


def test_head_of_line_waits_for_blocks():
    sched, runner = make(num_gpu=4)
    sched.add_request("big", None, list(range(1, 13)), params(max_tokens=4))  # 3 blocks
    sched.add_request("small", None, [1, 2, 3, 4, 5], params(max_tokens=1))  # 2 blocks
    sched.add_request("tiny", None, [1], params(max_tokens=1))  # 1 block, but FCFS
    assert work(step(sched, runner)) == [(0, 0, 12, True)]
    assert [g.request_id for g in sched.waiting] == ["small", "tiny"]


# ---- admission -----------------------------------------------------------------------

def test_request_larger_than_the_whole_cache_is_rejected():
    sched, _ = make(num_gpu=6)  # 24 slots; a sequence's last token takes none
    with pytest.raises(ValueError, match=r"^max_tokens: the request needs up to 8 KV-cache "
                                         r"blocks .* whole cache has 6"):
        sched.add_request("x", None, list(range(10)), params(max_tokens=20))
    with pytest.raises(ValueError, match="needs up to 8 KV-cache blocks"):
        sched.add_request("y", None, [1, 2], params(max_tokens=14, n=2))  # 2 x 15, unshared
    assert not sched.has_unfinished_requests()
    sched.add_request("fits", None, list(range(10)), params(max_tokens=15))  # 24 slots


def test_max_model_len_bounds_the_admission_check():
    sched, _ = make(num_gpu=6, max_model_len=24)
    sched.add_request("x", None, [1, 2, 3], params(max_tokens=1000))
    assert [g.request_id for g in sched.waiting] == ["x"]


def test_duplicate_request_id_is_rejected():
    sched, _ = make()
    sched.add_request("x", None, [1], params())
    with pytest.raises(ValueError, match="request_id 'x' is already in flight"):
        sched.add_request("x", None, [2], params())


# ---- preemption ----------------------------------------------------------------------

def _fill_until_preemption(mode, num_cpu=32):
    """Three 1-block prompts in a 6-block pool: at the 9th token every one needs its
    third block and only two fit."""
    sched, runner = make(num_gpu=6, num_cpu=num_cpu, mode=mode)
    for rid in "abc":
        sched.add_request(rid, None, [1, 2, 3, 4 + ord(rid)], params(max_tokens=8))
    for _ in range(5):
        assert [w[0] for w in work(step(sched, runner))] == [0, 1, 2]
    assert sched.bm.num_free_gpu_blocks == 0
    return sched, runner


@pytest.mark.parametrize("mode", ["recompute", "auto"])
def test_recompute_preempts_the_latest_arrival_and_requeues_it_first(mode):
    sched, runner = _fill_until_preemption(mode)
    c = sched.get_group("c")
    sched.add_request("d", None, [9, 9], params(max_tokens=1))
    assert work(step(sched, runner)) == [(0, 8, 1, True), (1, 8, 1, True)]
    assert [g.request_id for g in sched.waiting] == ["c", "d"]
    assert c.status is Status.WAITING and c.seqs[0].num_computed_tokens == 0
    assert not sched.bm.has_seq(2)
    assert sched.num_preemptions == {"swap": 0, "recompute": 1}
    assert c.metrics.num_preemptions == 1
    step(sched, runner)
    step(sched, runner)  # a and b finish: 8 tokens
    # c comes back first: its prompt and its 5 outputs are the new prefill.
    assert work(step(sched, runner)) == [(2, 0, 9, True), (3, 0, 2, True)]
    run_all(sched, runner)
    ref, ref_runner = make()
    ref.add_request("c", None, [1, 2, 3, 4 + ord("c")], params(max_tokens=8))
    assert outputs([c])["c"] == outputs(run_all(ref, ref_runner))["c"]


def test_swap_preempts_to_cpu_and_resumes_before_new_admissions():
    sched, runner = _fill_until_preemption("swap")
    c_table = sched.bm.block_table(2)
    batch = step(sched, runner)
    assert work(batch) == [(0, 8, 1, True), (1, 8, 1, True)]
    assert [g for g, _ in batch.swap_out] == c_table
    cpu_blocks = [c for _, c in batch.swap_out]
    assert sched.bm.block_table(2) == cpu_blocks and sched.bm.device_of(2) == "cpu"
    assert sched.num_preemptions == {"swap": 1, "recompute": 0}
    assert sched.num_blocks_swapped_out == 2
    sched.add_request("d", None, [9, 9], params(max_tokens=1))
    step(sched, runner)
    batch = step(sched, runner)  # a and b finish
    assert work(batch) == [(0, 10, 1, True), (1, 10, 1, True)]
    assert [g.request_id for g in sched.waiting] == ["d"]  # not admitted while c is out
    batch = step(sched, runner)
    assert [c for c, _ in batch.swap_in] == cpu_blocks
    assert sched.bm.block_table(2)[:2] == [g for _, g in batch.swap_in]
    assert work(batch) == [(2, 8, 1, True), (3, 0, 2, True)]
    assert sched.num_blocks_swapped_in == 2
    groups = [sched.get_group("c")]
    run_all(sched, runner)
    ref, ref_runner = make()
    ref.add_request("c", None, [1, 2, 3, 4 + ord("c")], params(max_tokens=8))
    assert outputs(groups)["c"] == outputs(run_all(ref, ref_runner))["c"]


def test_swap_falls_back_to_recompute_when_the_cpu_pool_is_full():
    sched, runner = _fill_until_preemption("swap", num_cpu=1)
    step(sched, runner)
    assert sched.num_preemptions == {"swap": 0, "recompute": 1}
    assert sched.get_group("c").status is Status.WAITING


def test_auto_swaps_parallel_sampling_groups():
    sched, runner = make(num_gpu=10, mode="auto")
    sched.add_request("a", None, [1, 2, 3, 4], params(max_tokens=12))
    g = sched.add_request("g", None, [5, 6, 7, 8], params(max_tokens=12, n=2, seed=3))
    run_all(sched, runner)
    assert sched.num_preemptions["recompute"] == 0
    assert sched.num_preemptions["swap"] == g.metrics.num_preemptions >= 1
    ref, ref_runner = make()
    ref.add_request("g", None, [5, 6, 7, 8], params(max_tokens=12, n=2, seed=3))
    assert outputs([g]) == outputs(run_all(ref, ref_runner))


def test_copy_on_write_pairs_go_into_the_batch():
    sched, runner = make()
    sched.add_request("g", None, [1, 2, 3, 4, 5, 6], params(max_tokens=3, n=2, seed=7))
    step(sched, runner)
    shared = sched.bm.block_table(0)
    assert sched.bm.block_table(1) == shared  # the fork shares both blocks
    batch = step(sched, runner)  # the parent appends into the shared partial block
    assert work(batch) == [(0, 6, 1, True), (1, 5, 1, True)]
    assert batch.copies == [(shared[1], sched.bm.block_table(0)[1])]
    assert sched.bm.block_table(1) == shared
    run_all(sched, runner)


def test_parallel_samples_append_without_blocks_when_none_are_needed():
    sched, runner = make(num_gpu=2)
    sched.add_request("g", None, [1, 2], params(max_tokens=3, n=2, seed=5))
    step(sched, runner)
    assert work(step(sched, runner)) == [(0, 2, 1, True), (1, 1, 1, True)]  # copy-on-write
    assert sched.bm.num_free_gpu_blocks == 0
    # Both write into blocks of their own now (the child keeps the original): no block
    # needed, so nothing is preempted although none is free.
    batch = step(sched, runner)
    assert work(batch) == [(0, 3, 1, True), (1, 2, 1, True)] and batch.copies == []
    run_all(sched, runner)
    assert sched.num_preemptions == {"swap": 0, "recompute": 0}


def test_parallel_samples_differ_by_seed_and_sample_zero_keeps_the_request_seed():
    sched, runner = make()
    g = sched.add_request("g", None, [1, 2, 3], params(max_tokens=4, n=3, seed=11))
    one = sched.add_request("one", None, [1, 2, 3], params(max_tokens=4, seed=11))
    run_all(sched, runner)
    outs = [s.output_token_ids for s in g.seqs]
    assert outs[0] == one.seqs[0].output_token_ids
    assert len({tuple(o) for o in outs}) == 3
    assert [s.params.seed for s in g.seqs][0] == 11


# ---- prefix caching ------------------------------------------------------------------

def test_prefix_hit_on_blocks_never_computed_is_recomputed():
    sched, runner = make(tokens=8, prefix=True)
    prompt = list(range(1, 13))  # 3 full blocks, all hashed at allocation
    sched.add_request("a", None, prompt, params())
    assert work(step(sched, runner)) == [(0, 0, 8, False)]  # blocks 0 and 1 computed
    sched.abort_request("a")  # its third block stays cached but was never written
    b = sched.add_request("b", None, prompt + [50], params(max_tokens=2))
    assert work(step(sched, runner)) == [(1, 8, 5, True)]
    assert b.metrics.num_cached_tokens == 8
    assert sched.prefix_cache_hits == 8
    run_all(sched, runner)


def test_prefix_hit_on_computed_blocks_skips_them():
    sched, runner = make(prefix=True)
    prompt = list(range(1, 10))
    sched.add_request("a", None, prompt, params(max_tokens=1))
    step(sched, runner)
    sched.add_request("b", None, prompt + [60, 61], params(max_tokens=1))
    assert work(step(sched, runner)) == [(1, 8, 3, True)]


# ---- aborts --------------------------------------------------------------------------

def test_abort_frees_blocks_in_every_state():
    sched, runner = _fill_until_preemption("swap")
    step(sched, runner)  # c swapped out
    sched.add_request("w", None, [1, 2], params())
    for rid in ("a", "c", "w"):
        sched.abort_request(rid)
    assert sched.get_group("c") is None and not sched.swapped and not sched.waiting
    assert [g.request_id for g in sched.running] == ["b"]
    assert sched.bm.seq_ids() == [1]
    assert sched.bm.num_free_cpu_blocks == 32
    sched.abort_request("unknown")  # a no-op
    run_all(sched, runner)
    assert sched.bm.num_free_gpu_blocks == 6


# ---- nothing lost, nothing changed -----------------------------------------------------

def _random_workload(rng):
    """40 requests that each fit the 16-block pool alone: long single prompts, short
    parallel-sampling ones, some sharing a two-block prefix."""
    reqs = []
    shared = [rng.randrange(3, 90) for _ in range(8)]
    for i in range(40):
        n = rng.choice([1, 1, 1, 2, 3])
        prompt = [rng.randrange(3, 90) for _ in range(rng.randint(1, 14 if n == 1 else 6))]
        if n == 1 and rng.random() < 0.5:
            prompt = shared + prompt
        reqs.append((f"r{i}", prompt, params(max_tokens=rng.randint(1, 12 if n == 1 else 8),
                                             n=n, seed=rng.randrange(1000)),
                     rng.choice([0, 0, 1, -1])))
    return reqs


@pytest.mark.parametrize("mode,num_cpu", [("auto", 64), ("swap", 64), ("recompute", 64),
                                          ("swap", 3)])
@pytest.mark.parametrize("prefix", [False, True])
def test_random_load_under_pressure_matches_an_unconstrained_run(mode, num_cpu, prefix):
    rng = random.Random(f"{mode}-{num_cpu}-{prefix}")
    reqs = _random_workload(rng)
    ref, ref_runner = make(num_gpu=512, tokens=512, seqs=64, prefix=prefix)
    for rid, prompt, p, prio in reqs:
        ref.add_request(rid, None, prompt, p, prio)
    expected = outputs(run_all(ref, ref_runner))

    sched, runner = make(num_gpu=16, num_cpu=num_cpu, tokens=16, seqs=10, mode=mode,
                         prefix=prefix)
    groups, pending = [], list(reqs)
    for i in range(2000):
        for _ in range(2 if pending else 0):  # arrivals keep coming while others run
            rid, prompt, p, prio = pending.pop(0)
            groups.append(sched.add_request(rid, None, prompt, p, prio))
        if not pending and not sched.has_unfinished_requests():
            break
        step(sched, runner)
    assert outputs(groups) == expected
    assert all(g.is_finished for g in groups)
    swaps, recomputes = sched.num_preemptions["swap"], sched.num_preemptions["recompute"]
    assert swaps + recomputes >= 5
    assert (swaps > 0) == (mode != "recompute")
    assert (recomputes > 0) == (mode != "swap" or num_cpu < 64)
    assert sched.bm.seq_ids() == []
    assert sched.bm.num_free_gpu_blocks == 16 and sched.bm.num_free_cpu_blocks == num_cpu

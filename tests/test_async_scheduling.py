"""Scheduling a step ahead (async_scheduling) changes no output.

With async_scheduling the engine queues step N+1 before it reads step N's tokens
(Scheduler.schedule_ahead); the runner feeds N+1 the tokens N samples, on the device,
and the slots they take are reserved with a placeholder that update() names. On CPU
the forward is synchronous, so nothing overlaps here, but every part of that path
runs: these tests hold it to the synchronous engine's outputs on the embedded SmolLM2,
through stops of every kind, seeds, logprobs, aborts, preemption and the prefix cache.
"""

from __future__ import annotations

import pytest

from pagedserve import LLM, EngineConfig, SamplingParams
from pagedserve.engine.llm_engine import LLMEngine

ENGINE = dict(device="cpu", dtype="float32", block_size=8, num_kv_blocks=256,
              swap_space_gb=0.05, max_num_batched_tokens=512)
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time,",
           "1, 2, 3, 4, 5,", "The quick brown fox", "Water boils at"]


@pytest.fixture(scope="module")
def llm():
    return LLM(**ENGINE)


def engine(llm, async_scheduling: bool, **overrides) -> LLMEngine:
    return LLMEngine(EngineConfig(**{**ENGINE, **overrides, "async_scheduling": async_scheduling}),
                     runner=llm.engine.runner, tokenizer=llm.engine.tokenizer)


def run(eng: LLMEngine, requests, abort_after: dict[str, int] | None = None) -> dict:
    """requests: (request_id, prompt, params); abort_after: request_id -> step number."""
    for rid, prompt, params in requests:
        eng.add_request(rid, prompt, params)
    done, step = {}, 0
    while eng.has_unfinished_requests():
        step += 1
        for rid, at in (abort_after or {}).items():
            if at == step:
                eng.abort_request(rid)
        for out in eng.step():
            if out.finished:
                done[out.request_id] = out
    return done


def summary(out) -> list:
    return [(c.token_ids, c.text, c.finish_reason, c.stop_reason,
             None if c.logprobs is None else [sorted(d) for d in c.logprobs])
            for c in out.outputs]


def both(llm, requests, **overrides) -> tuple[dict, dict, LLMEngine]:
    sync = run(engine(llm, False, **overrides), requests)
    eng = engine(llm, True, **overrides)
    return sync, run(eng, requests), eng


def test_outputs_equal_the_synchronous_engine_through_every_kind_of_stop(llm):
    greedy = [SamplingParams(temperature=0.0, max_tokens=n) for n in (3, 9, 16, 1, 12, 7)]
    requests = [(f"g{i}", p, sp) for i, (p, sp) in enumerate(zip(PROMPTS, greedy))]
    first = run(engine(llm, False), [("probe", PROMPTS[1], SamplingParams(temperature=0.0, max_tokens=6))])
    probe = first["probe"].outputs[0]
    requests += [
        # Ends on a token and on a string that greedy decoding reaches mid-run: the step
        # scheduled ahead for them is wasted and must not show.
        ("stop-token", PROMPTS[1], SamplingParams(temperature=0.0, max_tokens=20,
                                                  stop_token_ids=[probe.token_ids[3]])),
        ("stop-text", PROMPTS[1], SamplingParams(temperature=0.0, max_tokens=20,
                                                 stop=[probe.text[-4:]])),
        ("seeded", PROMPTS[2], SamplingParams(temperature=0.9, top_p=0.9, top_k=40, seed=7,
                                              max_tokens=10)),
        ("logprobs", PROMPTS[3], SamplingParams(temperature=0.0, max_tokens=6, logprobs=3)),
        ("min-tokens", PROMPTS[4], SamplingParams(temperature=0.0, max_tokens=8, min_tokens=5,
                                                  stop_token_ids=[probe.token_ids[0]])),
        ("eos", [504, 2988, 288], SamplingParams(temperature=0.0, max_tokens=40)),
    ]
    sync, ahead, eng = both(llm, requests)
    assert sync.keys() == ahead.keys() == {rid for rid, _, _ in requests}
    for rid in sync:
        assert summary(ahead[rid]) == summary(sync[rid]), rid
    assert ahead["stop-token"].outputs[0].finish_reason == "stop"
    assert ahead["stop-text"].outputs[0].finish_reason == "stop"
    stats = eng.stats()
    assert stats.num_steps_scheduled_ahead > 0.5 * stats.num_steps, stats
    assert stats.num_free_gpu_blocks == stats.num_total_gpu_blocks and stats.num_running == 0


def test_requests_arriving_mid_run(llm):
    """Requests added between steps: the steps with their prompts are scheduled as
    usual (waiting requests with room stop a step ahead), the decodes around them ahead."""
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)

    def staggered(eng):
        done, step, pending = {}, 0, [(str(i), p) for i, p in enumerate(PROMPTS)]
        while pending or eng.has_unfinished_requests():
            if pending and step % 3 == 0:
                rid, prompt = pending.pop(0)
                eng.add_request(rid, prompt, params)
            step += 1
            for out in eng.step():
                if out.finished:
                    done[out.request_id] = out
        return done

    sync = staggered(engine(llm, False))
    eng = engine(llm, True)
    ahead = staggered(eng)
    assert sync.keys() == ahead.keys() == {str(i) for i in range(len(PROMPTS))}
    for rid in sync:
        assert summary(ahead[rid]) == summary(sync[rid]), rid
    assert eng.stats().num_steps_scheduled_ahead > 0


def test_requests_that_need_the_host_are_scheduled_as_usual(llm):
    """Penalties, parallel samples and beam search read the outputs so far: steps with
    them are never scheduled ahead, and their outputs still match."""
    requests = [
        ("rep", PROMPTS[0], SamplingParams(temperature=0.0, max_tokens=8, repetition_penalty=1.3)),
        ("n2", PROMPTS[5], SamplingParams(temperature=0.8, seed=3, max_tokens=6, n=2)),
        ("beam", PROMPTS[1], SamplingParams(max_tokens=5, beam_width=2)),
    ]
    sync, ahead, eng = both(llm, requests)
    for rid in sync:
        assert summary(ahead[rid]) == summary(sync[rid]), rid
    assert eng.stats().num_steps_scheduled_ahead == 0


def test_a_parallel_sampling_request_beside_plain_ones(llm):
    """A request with n = 2 runs one sequence until its first token and then forks it
    (the children share its blocks): no step may be scheduled ahead of that fork."""
    requests = [("n2", PROMPTS[5], SamplingParams(temperature=0.8, seed=3, max_tokens=6, n=2)),
                ("g", PROMPTS[0], SamplingParams(temperature=0.0, max_tokens=12))]
    sync, ahead, eng = both(llm, requests)
    for rid in sync:
        assert summary(ahead[rid]) == summary(sync[rid]), rid
    stats = eng.stats()
    assert stats.num_steps_scheduled_ahead > 0  # once the n = 2 request is done
    assert stats.num_free_gpu_blocks == stats.num_total_gpu_blocks


def test_timeline_events_keep_the_time_their_step_was_scheduled(llm):
    """update() of step N runs after step N+1 was scheduled: N's events must still start
    when N was scheduled (a prompt chunk starts at its admission)."""
    eng = engine(llm, True)
    done = run(eng, [(str(i), p, SamplingParams(temperature=0.0, max_tokens=6))
                     for i, p in enumerate(PROMPTS)])
    for out in done.values():
        events = {e.kind: e for e in out.metrics.events}
        assert events["prefill_chunk"].start == events["admitted"].start
        assert events["prefill_chunk"].start <= events["prefill_chunk"].end


def test_an_abort_while_a_step_is_ahead_frees_everything(llm):
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    requests = [(str(i), p, params) for i, p in enumerate(PROMPTS[:4])]
    sync = run(engine(llm, False), requests)
    eng = engine(llm, True)
    ahead = run(eng, requests, abort_after={"1": 4, "3": 9})
    assert set(ahead) == {"0", "2"}
    for rid in ahead:
        assert summary(ahead[rid]) == summary(sync[rid]), rid
    stats = eng.stats()
    assert stats.num_steps_scheduled_ahead > 0
    assert stats.num_free_gpu_blocks == stats.num_total_gpu_blocks


@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_a_tiny_pool_preempts_and_changes_no_output(llm, mode):
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    requests = [(str(i), p, params) for i, p in enumerate(PROMPTS)]
    sync, ahead, eng = both(llm, requests, num_kv_blocks=12, preemption_mode=mode,
                            max_num_batched_tokens=64)
    for rid in sync:
        assert summary(ahead[rid]) == summary(sync[rid]), rid
    stats = eng.stats()
    assert stats.num_preemptions > 0 and stats.num_steps_scheduled_ahead > 0, stats
    assert stats.num_free_gpu_blocks == 12


def test_blocks_filled_by_steps_ahead_are_cached_under_their_real_tokens(llm):
    """The decode blocks of a request served ahead join the prefix cache named by the
    tokens sampled, not the placeholder: a second request that continues the first
    one's text is served from them and decodes the same tokens."""
    eng = engine(llm, True)
    first = run(eng, [("a", PROMPTS[2], SamplingParams(temperature=0.0, max_tokens=24,
                                                       ignore_eos=True))])["a"]
    prompt = first.prompt_token_ids + first.outputs[0].token_ids[:16]
    second = run(eng, [("b", prompt, SamplingParams(temperature=0.0, max_tokens=8,
                                                     ignore_eos=True))])["b"]
    # Every full block of the new prompt (block size 8) but the one holding its last
    # token comes from the cache, the decode blocks of the first request included.
    assert second.metrics.num_cached_tokens == (len(prompt) - 1) // 8 * 8
    assert second.metrics.num_cached_tokens > len(first.prompt_token_ids)
    assert second.outputs[0].token_ids == first.outputs[0].token_ids[16:24]


def test_the_runner_feeds_decodes_packed_after_a_prompt_chunk(llm):
    """ModelRunner.launch with feed_from_previous in a batch that also holds a prompt
    chunk: prompt tokens are packed first, so each fed decode's token row is past them.
    The tokens equal those of feeding the same decodes from the host."""
    from pagedserve.engine.batch import ScheduledBatch, SeqWork

    runner = llm.engine.runner
    greedy = SamplingParams(temperature=0.0)
    tok = llm.engine.tokenizer
    a, b, c = (tok(p)["input_ids"] for p in PROMPTS[:3])

    def work(seq_id, tokens, start, first_block, sample=True):
        blocks = list(range(first_block, first_block + 8))  # 64 slots each, disjoint
        return SeqWork(seq_id, tokens, start, blocks, sample, greedy, [], [], 0)

    def second_step(feed: bool):
        first = runner.launch(ScheduledBatch([work(0, a, 0, 0), work(1, b, 0, 8)]))
        sampled = [r.token_id for r in first.results()] if not feed else [0, 0]
        batch = ScheduledBatch([work(2, c, 0, 16), work(0, [sampled[0]], len(a), 0),
                                work(1, [sampled[1]], len(b), 8)])
        if feed:
            batch.feed_from_previous = [(1, 0), (2, 1)]
        return [r.token_id for r in runner.launch(batch, previous=first).results()]

    assert second_step(feed=True) == second_step(feed=False)


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_the_step_observer_sees_every_batch_the_runner_gets(llm, async_scheduling):
    seen = []
    eng = engine(llm, async_scheduling)
    eng.step_observer = lambda batch, seconds: seen.append((batch, seconds))
    before = eng.stats()
    run(eng, [(f"r{i}", p, SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True))
              for i, p in enumerate(PROMPTS)])
    stats = eng.stats()
    assert len(seen) == stats.num_steps - before.num_steps > 0
    assert all(seconds >= 0 and batch.work for batch, seconds in seen)
    ahead = [batch for batch, _ in seen if batch.feed_from_previous]
    assert len(ahead) == stats.num_steps_scheduled_ahead - before.num_steps_scheduled_ahead
    assert (len(ahead) > 0) == async_scheduling
    if not async_scheduling:  # every sampled row is one output token
        assert sum(w.sample for batch, _ in seen for w in batch.work) == 5 * len(PROMPTS)

"""Output kinds: DELTA outputs add up, step by step, to what CUMULATIVE ones hold;
FINAL_ONLY hands out only the final one; streams fold what their reader has not read;
EngineStats is typed."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from pagedserve import EngineConfig, SamplingParams
from pagedserve.engine.llm_engine import LLMEngine
from pagedserve.engine.stats import EngineStats, ServingStats
from pagedserve.outputs import CompletionOutput, RequestOutput, RequestOutputKind
from pagedserve.server.async_engine import RequestStream

CUMULATIVE, DELTA, FINAL_ONLY = (RequestOutputKind.CUMULATIVE, RequestOutputKind.DELTA,
                                 RequestOutputKind.FINAL_ONLY)
# No prefix caching: twins of one prompt compute the same way, so they sample alike.
ENGINE = dict(device="cpu", dtype="float32", block_size=8, num_kv_blocks=128,
              max_model_len=256, max_num_seqs=32, seed=0, enable_prefix_caching=False)
REQUESTS = {
    "greedy_stop": ("The capital of France is",
                    SamplingParams(temperature=0.0, max_tokens=12, stop=[" the", "\n\n"],
                                   logprobs=2)),
    "sampled_n2": ("Once upon a time", SamplingParams(temperature=0.8, max_tokens=10, n=2,
                                                      seed=7, logprobs=1)),
    "beam": ("Hello", SamplingParams(beam_width=2, n=2, max_tokens=5)),
}
FIELDS = ("token_ids", "text", "finish_reason", "stop_reason", "num_tokens")


@pytest.fixture(scope="module")
def llm_engine():
    return LLMEngine(EngineConfig(**ENGINE))


def whole(c: CompletionOutput) -> tuple:
    """Everything but the log-probabilities, which `assert_same` compares."""
    return tuple(getattr(c, name) for name in FIELDS)


def assert_same(a: list[CompletionOutput], b: list[CompletionOutput]) -> None:
    """Same tokens, text and finish; log-probabilities equal up to float rounding: the
    kinds run as separate rows of one batch, and a row's place in a matmul may change
    its last bits (with 2 threads it does)."""
    assert [whole(c) for c in a] == [whole(c) for c in b]
    for x, y in zip(a, b):
        assert x.cumulative_logprob == pytest.approx(y.cumulative_logprob, rel=1e-5, abs=1e-5)
        assert (x.logprobs is None) == (y.logprobs is None)
        for dx, dy in zip(x.logprobs or [], y.logprobs or []):
            assert dx.keys() == dy.keys()
            assert all(dx[k] == pytest.approx(dy[k], rel=1e-4, abs=1e-4) for k in dx)


def test_delta_outputs_add_up_to_the_cumulative_ones_at_every_step(llm_engine):
    for name, (prompt, params) in REQUESTS.items():
        for kind in (CUMULATIVE, DELTA, FINAL_ONLY):
            llm_engine.add_request(f"{kind.value}-{name}", prompt, params, output_kind=kind)
    folded: dict[str, RequestOutput] = {}
    last: dict[str, RequestOutput] = {}  # the newest cumulative output
    final_only: dict[str, RequestOutput] = {}
    steps = 0
    while llm_engine.has_unfinished_requests():
        outs = {o.request_id: o for o in llm_engine.step()}
        steps += 1
        for name, (_, params) in REQUESTS.items():
            if name in last and last[name].finished:
                continue
            cumulative, delta = outs[f"cumulative-{name}"], outs[f"delta-{name}"]
            last[name] = cumulative
            assert delta.finished == cumulative.finished
            if params.beam_width > 1 and not delta.finished:
                # Beams reorder and get replaced until the end: nothing until then.
                assert delta.outputs == [] and len(cumulative.outputs) == params.n
            for d, c in zip(delta.outputs, cumulative.outputs):
                assert d.num_tokens == c.num_tokens == len(c.token_ids)
                if not delta.finished:
                    assert len(d.token_ids) <= 1  # one decode step's worth, never more
            if name in folded:
                folded[name].add(delta, delta=True)
            else:
                folded[name] = delta
            if params.beam_width == 1:  # the folded deltas are the cumulative output
                assert_same(folded[name].outputs, cumulative.outputs)
            if f"final_only-{name}" in outs:
                final_only[name] = outs[f"final_only-{name}"]
                assert final_only[name].finished
            else:
                assert not cumulative.finished
    for name in REQUESTS:  # at the end, every kind holds the same whole result
        assert_same(folded[name].outputs, last[name].outputs)
        assert_same(final_only[name].outputs, last[name].outputs)
    assert steps > 5
    assert folded["greedy_stop"].outputs[0].logprobs is not None
    assert len(folded["sampled_n2"].outputs) == 2 and len(folded["beam"].outputs) == 2
    stats = llm_engine.stats()
    assert stats.num_free_gpu_blocks == stats.num_total_gpu_blocks
    assert llm_engine.outputs._seqs == {} and llm_engine.outputs._kinds == {}


def test_output_kind_is_checked(llm_engine):
    with pytest.raises(ValueError, match="^output_kind must be a RequestOutputKind"):
        llm_engine.add_request("bad-kind", "Hi", SamplingParams(), output_kind="delta")
    assert not llm_engine.has_unfinished_requests()


def _delta(tokens: list[int], text: str, n: int, finished: bool = False) -> RequestOutput:
    reason = "length" if finished else None
    return RequestOutput("r", None, [1], [CompletionOutput(0, text, tokens, reason, -1.0 * n,
                                                           None, None, n)], finished)


def test_a_stream_folds_the_deltas_its_reader_has_not_read():
    async def main():
        stream = RequestStream("r", DELTA)
        stream._put(_delta([5], "a", 1))
        first = await stream.__anext__()
        stream._put(_delta([6], "b", 2))  # a slow reader: three steps before it reads
        stream._put(_delta([7], "c", 3))
        stream._put(_delta([8], "d", 4, finished=True))
        second = await stream.__anext__()
        with pytest.raises(StopAsyncIteration):
            await stream.__anext__()
        return first, second

    first, second = asyncio.run(main())
    assert (first.outputs[0].token_ids, first.outputs[0].text) == ([5], "a")
    c = second.outputs[0]
    assert (c.token_ids, c.text, c.num_tokens, c.finish_reason, c.cumulative_logprob) == \
        ([6, 7, 8], "bcd", 4, "length", -4.0)
    assert second.finished


def test_a_cumulative_stream_keeps_the_newest_output():
    async def main():
        stream = RequestStream("r")
        stream._put(_delta([5], "a", 1))
        stream._put(_delta([5, 6], "ab", 2, finished=True))
        return await stream.__anext__()

    out = asyncio.run(main())
    assert (out.outputs[0].token_ids, out.outputs[0].text, out.finished) == ([5, 6], "ab", True)


def test_engine_stats_are_typed_and_frozen():
    stats = EngineStats(num_running=2, preemptions_by_mode={"swap": 1})
    with pytest.raises(AttributeError):
        stats.num_runing  # noqa: B018 - a typo fails where it is read
    with pytest.raises(dataclasses.FrozenInstanceError):
        stats.num_running = 3
    serving = ServingStats.of_engine(stats, num_in_flight=4, num_queued=1)
    assert (serving.num_running, serving.preemptions_by_mode, serving.num_in_flight,
            serving.num_queued) == (2, {"swap": 1}, 4, 1)
    with pytest.raises(TypeError):
        EngineStats(num_runing=1)

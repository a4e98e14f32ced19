"""Hostile and unlucky requests against the engine and a real loopback server.

Each test pins one failure a hostile client found: an error that belongs to one
request fails it alone (the engine keeps stepping and frees its blocks), per-request
cost is capped before any work, prefix caching never crosses a cache salt (tenant),
and a stream never loses an error queued behind an output.
"""

from __future__ import annotations

import asyncio
import threading

import grpc
import pytest

from pagedserve import EngineConfig, SamplingParams
from pagedserve.engine.beam_search import BeamState
from pagedserve.engine.llm_engine import LLMEngine
from pagedserve.engine.prompt import TokenizedPrompt
from pagedserve.errors import InvalidRequestError
from pagedserve.outputs import CompletionOutput, RequestFailedError, RequestOutput
from pagedserve.server.async_engine import AsyncEngine, EngineDeadError, RequestStream
from pagedserve.server.tenancy import cache_salt
from pagedserve.client import Client
from server_fixtures import Serving

ENGINE = dict(device="cpu", dtype="float32", block_size=8, num_kv_blocks=128,
              max_model_len=256, max_num_seqs=16, swap_space_gb=0.05, seed=0)
GREEDY = SamplingParams(temperature=0.0, max_tokens=6)
LONG_PROMPT = ("The history of the printing press begins in the fifteenth century, when "
               "movable type changed how books were made and read across Europe. ") * 3


@pytest.fixture(scope="module")
def llm_engine():
    return LLMEngine(EngineConfig(**ENGINE))


def run(eng: LLMEngine, requests) -> dict:
    for rid, prompt, params, *salt in requests:
        eng.add_request(rid, prompt, params, cache_salt=salt[0] if salt else 0)
    done = {}
    while eng.has_unfinished_requests():
        for out in eng.step():
            if out.finished:
                done[out.request_id] = out
    return done


def assert_pool_empty(eng: LLMEngine) -> None:
    stats = eng.stats()
    assert stats.num_free_gpu_blocks == stats.num_total_gpu_blocks
    assert stats.num_free_cpu_blocks == stats.num_total_cpu_blocks
    assert not eng.has_unfinished_requests()


# ---- item 1: an error in one request's processing fails that request alone --------
@pytest.mark.parametrize("penalty", [-1e30, 1e30, 1100.0, -10.5])
def test_length_penalty_outside_its_range_is_rejected(penalty):
    with pytest.raises(ValueError, match=r"^length_penalty must be in \[-10, 10\]"):
        SamplingParams(beam_width=2, length_penalty=penalty)


@pytest.mark.parametrize("penalty", [-10.0, 10.0])
def test_length_penalty_at_its_bounds_scores_finitely(llm_engine, penalty):
    params = SamplingParams(beam_width=2, max_tokens=4, length_penalty=penalty)
    done = run(llm_engine, [("b", "Hello", params)])
    assert done["b"].error is None and len(done["b"].outputs) == 1
    assert_pool_empty(llm_engine)


def test_beam_scoring_error_fails_only_that_request(llm_engine, monkeypatch):
    alone = run(llm_engine, [("ref", "The capital of France is", GREEDY)])["ref"]
    original = BeamState.score

    def score(self, cumulative, length):
        if self.params.seed == 666:  # marks the request to break
            raise ZeroDivisionError("float division by zero")
        return original(self, cumulative, length)

    monkeypatch.setattr(BeamState, "score", score)
    bad = SamplingParams(beam_width=2, max_tokens=4, seed=666)
    good_beam = SamplingParams(beam_width=2, max_tokens=4)
    done = run(llm_engine, [("bad", "Hello", bad), ("ok", "The capital of France is", GREEDY),
                            ("beam", "Hello", good_beam)])
    assert isinstance(done["bad"].error, ZeroDivisionError) and done["bad"].outputs == []
    assert done["ok"].error is None
    assert done["ok"].outputs[0].token_ids == alone.outputs[0].token_ids
    assert done["beam"].error is None and done["beam"].outputs[0].finish_reason is not None
    assert_pool_empty(llm_engine)
    # The engine keeps stepping for new requests.
    again = run(llm_engine, [("after", "The capital of France is", GREEDY)])["after"]
    assert again.outputs[0].token_ids == alone.outputs[0].token_ids


def test_stop_check_error_fails_only_that_request(llm_engine, monkeypatch):
    original = LLMEngine._check_stop

    def check_stop(self, seq, group):
        if group.request_id == "bad" and len(seq.output_token_ids) == 2:
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")
        return original(self, seq, group)

    monkeypatch.setattr(LLMEngine, "_check_stop", check_stop)
    n2 = SamplingParams(temperature=0.8, max_tokens=6, n=2, seed=3)
    done = run(llm_engine, [("bad", "Hello", n2), ("ok", "Hello", GREEDY)])
    assert isinstance(done["bad"].error, UnicodeDecodeError)
    assert done["ok"].error is None and len(done["ok"].outputs[0].token_ids) == 6
    assert_pool_empty(llm_engine)


def test_offline_api_raises_the_failed_requests_error(llm_engine, monkeypatch):
    from pagedserve import LLM

    monkeypatch.setattr(BeamState, "score", lambda self, c, n: 1 / 0)
    with pytest.raises(RequestFailedError, match=r"^request llm-\d+ failed: division by zero$"):
        LLM.from_engine(llm_engine).generate(
            ["Hello"], SamplingParams(beam_width=2, max_tokens=3), use_tqdm=False)
    assert_pool_empty(llm_engine)


# ---- item 2: bounded per-request cost ---------------------------------------------
def test_stop_ids_are_a_set_built_once():
    params = SamplingParams(beam_width=2, stop_token_ids=list(range(4096)))
    assert params.stop_token_set == frozenset(range(4096))
    state = BeamState(params, frozenset({2}))
    assert "stop_ids" in vars(state)  # an attribute, not a property rebuilt per candidate
    assert state.stop_ids == frozenset(range(4096))
    assert BeamState(params.clone(ignore_eos=True), frozenset({9999})).stop_ids == \
        frozenset(range(4096))


def test_prompts_are_tokenized_off_the_engine_thread(llm_engine):
    threads = []
    tokenize = llm_engine.prompts

    def recording(prompt):
        if not isinstance(prompt, TokenizedPrompt):  # the engine thread only passes these on
            threads.append(threading.current_thread().name)
        return tokenize(prompt)

    assert llm_engine.prompts.tokenizer is not llm_engine.tokenizer  # its own copy

    async def main():
        engine = AsyncEngine(llm_engine)
        engine.start()
        llm_engine.prompts = recording
        try:
            texts = []
            for prompt in ("Hello", [{"role": "user", "content": "Hi"}], [1, 2, 3]):
                async for out in engine.generate(f"r{len(texts)}", prompt, GREEDY):
                    pass
                texts.append(out.outputs[0].token_ids)
            return texts
        finally:
            llm_engine.prompts = tokenize
            await engine.stop()

    outs = asyncio.run(main())
    assert len(outs) == 3 and all(len(t) == 6 for t in outs)
    assert threads and all(name.startswith("pagedserve-tokenize") for name in threads)


# ---- item 3: prefix caching never crosses a salt (tenant) ---------------------------
def test_cache_salt_keeps_tenants_apart(llm_engine):
    a, b = cache_salt("tenant-a"), cache_salt("tenant-b")
    assert len({a, b, cache_salt("tenant-a", "x"), 0}) == 4 and cache_salt(None) == 0
    first = run(llm_engine, [("a1", LONG_PROMPT, GREEDY, a)])["a1"]
    other = run(llm_engine, [("b1", LONG_PROMPT, GREEDY, b)])["b1"]
    unsalted = run(llm_engine, [("u1", LONG_PROMPT, GREEDY)])["u1"]
    same = run(llm_engine, [("a2", LONG_PROMPT, GREEDY, a)])["a2"]
    assert first.metrics.num_cached_tokens == 0
    assert other.metrics.num_cached_tokens == 0
    assert unsalted.metrics.num_cached_tokens == 0
    assert same.metrics.num_cached_tokens >= 8 * (len(same.prompt_token_ids) // 8) - 8
    assert same.metrics.num_cached_tokens > 0
    # Same tokens whatever the salt: it changes sharing, not results.
    assert {tuple(o.outputs[0].token_ids) for o in (first, other, unsalted, same)} == \
        {tuple(first.outputs[0].token_ids)}
    assert_pool_empty(llm_engine)


# ---- item 4: an error queued behind an output is raised, never lost -----------------
def _output(request_id: str, finished: bool = False) -> RequestOutput:
    return RequestOutput(request_id, None, [1], [CompletionOutput(0, "a", [5])], finished)


def test_stream_raises_an_error_queued_behind_an_output():
    async def main():
        stream = RequestStream("r")
        stream._put(_output("r"))
        stream._fail(EngineDeadError("engine failure"))
        first = await asyncio.wait_for(stream.__anext__(), 5)
        with pytest.raises(EngineDeadError):
            await asyncio.wait_for(stream.__anext__(), 5)
        return first

    assert asyncio.run(main()).request_id == "r"


@pytest.mark.parametrize("path", ["fail_all", "abort_all"])
def test_engine_wide_failure_reaches_a_reader_holding_an_output(path):
    from server_fixtures import ScriptedEngine

    async def main():
        engine = AsyncEngine(ScriptedEngine())
        engine._loop = asyncio.get_running_loop()  # no engine thread: drive it by hand
        stream = engine.add_request("r", [1, 2], SamplingParams(max_tokens=4))
        engine._deliver([_output("r")])
        if path == "fail_all":
            engine._fail_all(RuntimeError("device error"))
        else:
            engine.abort_all(EngineDeadError("server stopped"))
        await asyncio.wait_for(stream.__anext__(), 5)
        with pytest.raises(EngineDeadError):
            await asyncio.wait_for(stream.__anext__(), 5)

    asyncio.run(main())


# ---- over gRPC -------------------------------------------------------------------
@pytest.fixture(scope="module")
def serving(llm_engine):
    s = Serving(llm_engine, max_queue_size=64)
    s.plain = s.add_server()
    yield s
    s.close()


@pytest.fixture(scope="module")
def client(serving):
    with Client(f"127.0.0.1:{serving.plain.port}", timeout=120) as c:
        yield c


def rpc_error(fn, *args, **kwargs) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        fn(*args, **kwargs)
    return info.value


@pytest.mark.parametrize("sampling, message", [
    (dict(beam_width=2, max_tokens=4, length_penalty=-1e30),
     "sampling.length_penalty must be in [-10, 10], got -1e+30"),
    (dict(beam_width=2, max_tokens=2, stop_token_ids=list(range(49152))),
     "sampling.stop_token_ids has 49152 ids, more than the server's cap of 1024"),
    (dict(top_p=1.0000001), "sampling.top_p must be in (0, 1], got 1.0000001"),
    (dict(stop=["x" * 257]), "sampling.stop[0] has 257 characters, more than the server's cap of 256"),
    (dict(repetition_penalty=1e-30), "sampling.repetition_penalty must be in [0.01, 100], got 1e-30"),
])
def test_hostile_values_are_invalid_argument_and_the_server_serves_on(client, sampling, message):
    err = rpc_error(client.generate, "Hello", **sampling)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details() == message
    reply = client.generate("Hello", temperature=0.0, max_tokens=4)
    assert len(reply.completions[0].token_ids) == 4


def test_a_value_error_of_the_engine_is_internal_not_the_clients(client, monkeypatch):
    """Only InvalidRequestError is the caller's mistake; a ValueError raised by a bug in
    one request's processing is INTERNAL, and its message stays in the server log."""
    original = LLMEngine._check_stop

    def check_stop(self, seq, group):
        if group.prompt == "boom":
            raise ValueError("a bug's own message")
        return original(self, seq, group)

    monkeypatch.setattr(LLMEngine, "_check_stop", check_stop)
    err = rpc_error(client.generate, "boom", max_tokens=4)
    assert err.code() == grpc.StatusCode.INTERNAL
    assert "a bug's own message" not in err.details()
    reply = client.generate("Hello", temperature=0.0, max_tokens=4)
    assert len(reply.completions[0].token_ids) == 4


def test_client_errors_are_invalid_request_errors_offline_too():
    with pytest.raises(InvalidRequestError, match="^top_p must be in") as info:
        SamplingParams(top_p=2.0)
    assert info.value.field_message().startswith("sampling.top_p")


def test_prompt_and_messages_over_the_byte_cap_are_invalid_argument(client, serving):
    cap = 32 * serving.llm_engine.max_model_len
    err = rpc_error(client.generate, "a" * (cap + 1), max_tokens=1)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details().startswith(f"prompt is {cap + 1} bytes; the server accepts at most {cap}")
    err = rpc_error(client.generate, [{"role": "user", "content": "b" * cap}], max_tokens=1)
    assert err.details().startswith("messages is")
    err = rpc_error(client.generate, [{"role": "user", "content": "c"}] * 1025, max_tokens=1)
    assert err.details() == "messages has 1025 entries, more than the server's cap of 1024"


def test_cache_salt_field_narrows_sharing(client, serving):
    def cached(salt: str) -> int:
        reply = client.generate(LONG_PROMPT, cache_salt=salt, temperature=0.0, max_tokens=1)
        return reply.usage.cached_prompt_tokens

    assert cached("grpc-salt-1") == 0
    assert cached("grpc-salt-2") == 0
    assert cached("grpc-salt-1") > 0
    serving.wait_idle()


def test_stop_leaves_a_wedged_engine_thread_behind():
    from server_fixtures import ScriptedEngine

    scripted = ScriptedEngine()
    scripted.gate.clear()  # the next step blocks until released

    async def main():
        engine = AsyncEngine(scripted)
        engine.start()
        stream = engine.add_request("r", [1, 2], SamplingParams(max_tokens=4))
        assert await asyncio.to_thread(scripted.step_started.wait, 60)
        await engine.stop(timeout=0.2)  # returns although the step never ends
        with pytest.raises(Exception, match="server stopped"):
            await asyncio.wait_for(stream.__anext__(), 5)
        return engine

    engine = asyncio.run(main())
    assert engine._thread.is_alive()
    scripted.gate.set()
    engine._thread.join(60)
    assert not engine._thread.is_alive()

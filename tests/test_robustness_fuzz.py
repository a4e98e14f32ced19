"""Random GenerateRequests (extreme floats, huge lists, odd unicode, raw bytes) against
a real loopback server on the embedded model: after each one the status is OK,
INVALID_ARGUMENT or RESOURCE_EXHAUSTED (never INTERNAL or UNKNOWN), a canary request
still gets the same greedy text, and the KV pool is empty again.

Bounded for CI: a short max_model_len keeps every accepted request cheap, and a fixed
number of examples (derandomized, so every run tries the same requests)."""

from __future__ import annotations

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pagedserve import EngineConfig
from pagedserve.client import Client
from pagedserve.engine.llm_engine import LLMEngine
from pagedserve.v1 import generate_pb2 as pb
from server_fixtures import Serving

ENGINE = dict(device="cpu", dtype="float32", block_size=8, num_kv_blocks=64,
              max_model_len=40, max_num_seqs=8, swap_space_gb=0.02, seed=0)
ALLOWED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT,
           grpc.StatusCode.RESOURCE_EXHAUSTED}
CANARY = "The capital of France is"
METHOD = "/pagedserve.v1.TextGeneration/Generate"


@pytest.fixture(scope="module")
def serving():
    s = Serving(LLMEngine(EngineConfig(**ENGINE)), max_queue_size=16)
    s.plain = s.add_server(max_n=4)
    yield s
    s.close()


@pytest.fixture(scope="module")
def client(serving):
    with Client(f"127.0.0.1:{serving.plain.port}", timeout=120) as c:
        yield c


def canary_text(client) -> str:
    return client.generate(CANARY, temperature=0.0, max_tokens=4, timeout=60).completions[0].text


texts = st.text(st.characters(exclude_categories=("Cs",)), max_size=64)  # any valid UTF-8
floats = st.floats(width=32, allow_nan=True, allow_infinity=True)
uint32 = st.integers(0, 2**32 - 1)
small = st.integers(0, 40)

sampling = st.fixed_dictionaries({}, optional={
    "max_tokens": st.one_of(small, uint32), "min_tokens": st.one_of(small, uint32),
    "temperature": floats, "top_p": floats, "top_k": st.integers(-2**31, 2**31 - 1),
    "min_p": floats, "repetition_penalty": floats, "presence_penalty": floats,
    "frequency_penalty": floats, "length_penalty": floats, "seed": st.integers(0, 2**64 - 1),
    "stop": st.lists(texts, max_size=24),
    "stop_token_ids": st.one_of(st.lists(uint32, max_size=8),
                                st.integers(0, 3000).map(lambda n: list(range(n)))),
    "n": st.integers(0, 6), "beam_width": st.integers(0, 6), "logprobs": st.integers(0, 30),
    "ignore_eos": st.booleans(), "early_stopping": st.booleans(),
})
prompts = st.one_of(
    texts.map(lambda t: {"prompt": t}),
    st.lists(st.one_of(st.integers(0, 60000), uint32), max_size=60).map(
        lambda ids: {"prompt_token_ids": pb.TokenIds(ids=ids)}),
    st.lists(st.tuples(texts, texts), max_size=4).map(lambda ms: {"messages": pb.ChatMessages(
        messages=[pb.ChatMessage(role=r, content=c) for r, c in ms])}),
)
requests = st.builds(
    lambda p, s, rid, prio, salt: pb.GenerateRequest(
        sampling=pb.SamplingParams(**s), request_id=rid, priority=prio, cache_salt=salt, **p),
    prompts, sampling, st.one_of(st.just(""), texts), st.integers(-2**31, 2**31 - 1), texts)
payloads = st.one_of(requests.map(lambda r: r.SerializeToString()), st.binary(max_size=256))


@settings(max_examples=30, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
@given(payload=payloads)
def test_random_requests_never_hurt_the_server(serving, client, payload):
    expected = getattr(serving, "canary", None) or canary_text(client)
    serving.canary = expected
    raw = client.channel.unary_unary(METHOD)  # bytes in, bytes out: no client-side checks
    try:
        raw(payload, timeout=60)
        code = grpc.StatusCode.OK
    except grpc.RpcError as err:
        code = err.code()
        assert code in ALLOWED, (code, err.details(), payload[:200])
    assert canary_text(client) == expected
    stats = serving.wait_idle(timeout=60)
    assert stats.num_free_gpu_blocks == stats.num_total_gpu_blocks
    assert stats.num_free_cpu_blocks == stats.num_total_cpu_blocks

"""Structured output over gRPC: a real server on loopback around the embedded SmolLM2.
Constrained outputs parse, validate and match; a bad constraint is INVALID_ARGUMENT
naming the field while a stream in flight at the same time finishes with exactly the
tokens it gets alone."""

from __future__ import annotations

import json
import re
import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
import jsonschema
import pytest

from pagedserve import EngineConfig, SamplingParams
from pagedserve.client import Client
from pagedserve.engine.llm_engine import LLMEngine

from server_fixtures import Serving
from test_structured import CHOICES, PROMPTS, REGEXES, SCHEMAS

ENGINE = dict(device="cpu", dtype="float32", num_kv_blocks=512, block_size=8,
              max_num_seqs=128, max_num_batched_tokens=1024, swap_space_gb=0.05, seed=0,
              structured_compile_timeout_s=300.0)
SAMPLING = dict(temperature=0.8, max_tokens=96)


@pytest.fixture(scope="module")
def serving():
    s = Serving(LLMEngine(EngineConfig(**ENGINE)), max_queue_size=512)
    s.server = s.add_server()
    yield s
    s.close()


@pytest.fixture(scope="module")
def client(serving):
    with Client(f"127.0.0.1:{serving.server.port}", timeout=600) as c:
        yield c


def generate_all(client, requests) -> list:
    """requests: (prompt, sampling kwargs), sent at once (one continuous batch)."""
    with ThreadPoolExecutor(len(requests)) as pool:
        return list(pool.map(lambda r: client.generate(r[0], **r[1]), requests))


def test_json_schemas_regex_and_choice_over_grpc(client, serving):
    requests = [(p, dict(SAMPLING, json_schema=json.dumps(schema), seed=i))
                for schema in SCHEMAS.values() for i, p in enumerate(PROMPTS)]
    requests += [(p, dict(SAMPLING, regex=REGEXES[i % len(REGEXES)], seed=i))
                 for i, p in enumerate(PROMPTS)]
    requests += [(p, dict(SAMPLING, choice=CHOICES, seed=i)) for i, p in enumerate(PROMPTS)]
    replies = generate_all(client, requests)
    from pagedserve.v1 import generate_pb2 as pb

    for (_, sampling), reply in zip(requests, replies):
        c = reply.completions[0]
        assert c.finish_reason == pb.FINISH_REASON_STOP, c.text
        if "json_schema" in sampling:
            jsonschema.validate(json.loads(c.text), json.loads(sampling["json_schema"]))
        elif "regex" in sampling:
            assert re.fullmatch(sampling["regex"], c.text), c.text
        else:
            assert c.text in CHOICES
    serving.wait_idle()


def test_streamed_constrained_output_is_the_unary_one(client):
    sampling = dict(SAMPLING, json_schema=json.dumps(SCHEMAS["nested_ref"]), seed=11)
    unary = client.generate("Output the record as JSON:", **sampling).completions[0]
    chunks = list(client.stream_generate("Output the record as JSON:", **sampling))
    assert "".join(m.text for m in chunks) == unary.text
    assert [t for m in chunks for t in m.token_ids] == list(unary.token_ids)


@pytest.mark.parametrize("sampling, message", [
    (dict(json_schema='{"type": "object", '), "json_schema is not valid JSON"),
    (dict(json_schema='{"type": "strnig"}'), "json_schema is not a valid JSON Schema"),
    (dict(regex="(ab"), "regex does not compile"),
    (dict(grammar='root ::= "a"\n' * 4000), "grammar is 52000 characters, more than the limit"),
    (dict(choice=["yes", ""]), r"choice\[1\] must be a non-empty string"),
    (dict(json_object=True, beam_width=2), "constraints are not supported with beam search"),
])
def test_bad_constraints_are_invalid_argument_while_a_stream_runs(client, serving, sampling,
                                                                   message):
    greedy = dict(temperature=0.0, max_tokens=24)
    alone = client.generate("The capital of France is", **greedy).completions[0]
    stream = client.stream_generate("The capital of France is", **greedy)
    first = next(stream)  # in flight before the bad request arrives
    with pytest.raises(grpc.RpcError) as err:
        client.generate("Hello", **dict(SAMPLING, **sampling))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert re.search(message, err.value.details()), err.value.details()
    rest = list(stream)
    assert list(first.token_ids) + [t for m in rest for t in m.token_ids] == list(alone.token_ids)
    serving.wait_idle()


def test_a_compile_past_the_limit_is_invalid_argument_while_a_stream_runs(client, serving):
    engine = serving.llm_engine
    release = threading.Event()
    real = engine.structured.compiler.compile_fn
    engine.structured.compiler.compile_fn = lambda spec: (release.wait(60), real(spec))[1]
    engine.structured.timeout_s = 0.5  # the injected compile never ends before it
    greedy = dict(temperature=0.0, max_tokens=24)
    try:
        alone = client.generate("Water boils at", **greedy).completions[0]
        stream = client.stream_generate("Water boils at", **greedy)
        first = next(stream)
        with pytest.raises(grpc.RpcError) as err:
            client.generate("Hello", **dict(SAMPLING, grammar='root ::= "slow"'))
        rest = list(stream)
    finally:
        release.set()
        engine.structured.compiler.compile_fn = real
        engine.structured.timeout_s = ENGINE["structured_compile_timeout_s"]
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "grammar: compiling the constraint took longer than the server's limit of 0.5 s" \
        in err.value.details()
    assert list(first.token_ids) + [t for m in rest for t in m.token_ids] == list(alone.token_ids)
    serving.wait_idle()


def test_sampling_params_convert_every_constraint():
    from pagedserve.server.convert import to_sampling_params
    from pagedserve.v1 import generate_pb2 as pb

    assert to_sampling_params(pb.SamplingParams(regex="a+")).regex == "a+"
    assert to_sampling_params(pb.SamplingParams(json_object=True)).json_object is True
    assert to_sampling_params(pb.SamplingParams(grammar='root ::= "a"')).grammar == 'root ::= "a"'
    assert to_sampling_params(pb.SamplingParams(json_schema='{"type": "object"}')).constraint \
        == SamplingParams(json_schema={"type": "object"}).constraint
    assert to_sampling_params(
        pb.SamplingParams(choice=pb.ChoiceList(choices=["a", "b"]))).choice == ["a", "b"]
    assert to_sampling_params(pb.SamplingParams()).constraint is None

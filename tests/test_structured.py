"""Structured output on the embedded SmolLM2 (CPU, fp32): every constrained output is
what its constraint accepts, at temperature > 0, across prompts; an unconstrained row
of the same batch gets exactly the tokens it gets alone; bad constraints fail their own
request only (ValueError naming the field), and a compile that never ends fails at the
time limit without holding anything up.

One model is loaded for the module; each test builds engines over its runner (as
tests/test_engine.py does), each used within one test.
"""

from __future__ import annotations

import json
import re
import threading

import jsonschema
import pytest

from pagedserve import LLM, EngineConfig, SamplingParams
from pagedserve.engine.llm_engine import LLMEngine
from pagedserve.structured.spec import MAX_CONSTRAINT_CHARS

# A compile time limit no real compile reaches on a loaded machine: the tests of the
# limit inject a compile that never ends and set a short one.
ENGINE = dict(device="cpu", dtype="float32", block_size=8, num_kv_blocks=512,
              swap_space_gb=0.05, max_num_batched_tokens=1024, max_num_seqs=256,
              structured_compile_timeout_s=300.0)

# 20+ prompts of all kinds: what a backend would send, and some it would not.
PROMPTS = [
    "Give me a JSON object describing a person.",
    "Output the record as JSON:",
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a land far away,",
    "List three colors:",
    "Translate to French: Good morning",
    "日本の首都は",
    "SELECT name FROM users WHERE",
    "A haiku about autumn:",
    "Q: What is the largest planet?\nA:",
    "Write a short product review.",
    "Here is the configuration file:",
    "The weather today is",
    "1, 2, 3, 4, 5,",
    "import numpy as np\nx = np.",
    "Dear customer, your order",
    "Summarise: the meeting moved to Tuesday.",
    [{"role": "user", "content": "Describe a city in JSON."}],
    [{"role": "user", "content": "Return an inventory item."}],
    [{"role": "user", "content": "Pick a colour."}],
]

# Between them: nested objects, $ref, arrays, enums, integer and number ranges,
# required and optional fields. Strings and arrays are bounded, so an output is
# complete well within MAX_TOKENS.
SCHEMAS = {
    "nested_ref": {
        "type": "object",
        "$defs": {"point": {"type": "object",
                            "properties": {"x": {"type": "integer", "minimum": 0, "maximum": 9},
                                           "y": {"type": "integer", "minimum": 0, "maximum": 9}},
                            "required": ["x", "y"], "additionalProperties": False}},
        "properties": {
            "user": {"type": "object", "properties": {
                "name": {"type": "string", "maxLength": 8},
                "home": {"$ref": "#/$defs/point"}},
                "required": ["name", "home"], "additionalProperties": False}},
        "required": ["user"], "additionalProperties": False,
    },
    "array_enum": {
        "type": "object",
        "properties": {"colors": {"type": "array", "items": {"enum": ["red", "green", "blue"]},
                                  "minItems": 1, "maxItems": 3},
                       "size": {"type": "string", "enum": ["S", "M", "L", "XL"]}},
        "required": ["colors", "size"], "additionalProperties": False,
    },
    "ranges": {
        "type": "object",
        "properties": {"age": {"type": "integer", "minimum": 18, "maximum": 99},
                       "score": {"type": "integer", "minimum": -5, "maximum": 5},
                       "ratio": {"type": "number", "minimum": 0, "maximum": 1}},
        "required": ["age", "score", "ratio"], "additionalProperties": False,
    },
    "required": {
        "type": "object",
        "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 9999},
                       "note": {"type": "string", "maxLength": 6},
                       "flag": {"type": "boolean"}},
        "required": ["id", "flag"], "additionalProperties": False,
    },
}
REGEXES = [r"\(\d{3}\) \d{3}-\d{4}", r"[A-Z][a-z]{2,8} (Street|Road|Lane)",
           r"(yes|no), because [a-z ]{5,20}\."]
CHOICES = ["positive", "negative", "neutral", "mixed feelings"]
MAX_TOKENS = 96


@pytest.fixture(scope="module")
def llm():
    return LLM(**ENGINE)


def engine(llm, **overrides) -> LLMEngine:
    return LLMEngine(EngineConfig(**{**ENGINE, **overrides}), runner=llm.engine.runner,
                     tokenizer=llm.engine.tokenizer)


def run(eng: LLMEngine, requests) -> tuple[dict, dict]:
    """requests: (request_id, prompt, params) -> (finished outputs, errors of the requests
    turned down after add_request accepted them) by id."""
    for rid, prompt, params in requests:
        eng.add_request(rid, prompt, params)
    done, rejected = {}, {}
    while eng.has_unfinished_requests():
        for out in eng.step():
            if out.error is not None:
                assert out.finished and out.outputs == []
                rejected[out.request_id] = out.error
            elif out.finished:
                done[out.request_id] = out
    return done, rejected


def params(**kw) -> SamplingParams:
    return SamplingParams(**{"temperature": 0.8, "max_tokens": MAX_TOKENS, **kw})


# ---- outputs are what the constraint accepts ------------------------------------------

def test_json_schemas_hold_across_prompts_at_temperature(llm):
    eng = engine(llm)
    requests = [(f"{name}-{i}", prompt, params(json_schema=schema, seed=i))
                for name, schema in SCHEMAS.items() for i, prompt in enumerate(PROMPTS)]
    done, rejected = run(eng, requests)
    assert not rejected and len(done) == len(requests)
    for name, schema in SCHEMAS.items():
        for i in range(len(PROMPTS)):
            c = done[f"{name}-{i}"].outputs[0]
            assert c.finish_reason == "stop", (name, i, c.text)
            assert c.token_ids[-1] in eng.eos_token_ids  # EOS only where it is complete
            jsonschema.validate(json.loads(c.text), schema)
    assert eng.structured.compiler.num_compiles == len(SCHEMAS)  # the rest hit the cache


def test_json_object_regex_and_choice_hold_across_prompts(llm):
    eng = engine(llm)
    requests = [(f"obj-{i}", p, params(json_object=True, seed=i, max_tokens=48))
                for i, p in enumerate(PROMPTS[:6])]
    requests += [(f"re{k}-{i}", p, params(regex=rx, seed=i))
                 for k, rx in enumerate(REGEXES) for i, p in enumerate(PROMPTS)]
    requests += [(f"choice-{i}", p, params(choice=CHOICES, seed=i, temperature=1.0))
                 for i, p in enumerate(PROMPTS)]
    done, rejected = run(eng, requests)
    assert not rejected
    finished = 0
    for i in range(6):
        c = done[f"obj-{i}"].outputs[0]
        if c.finish_reason == "stop":  # an object's strings are unbounded: it may run long
            assert isinstance(json.loads(c.text), dict)
            finished += 1
        else:  # then it is what a JSON object starts with
            assert c.finish_reason == "length" and c.text.startswith("{")
    for i in range(len(PROMPTS)):
        for k, rx in enumerate(REGEXES):
            c = done[f"re{k}-{i}"].outputs[0]
            assert c.finish_reason == "stop" and re.fullmatch(rx, c.text), (rx, c.text)
        c = done[f"choice-{i}"].outputs[0]
        assert c.finish_reason == "stop" and c.text in CHOICES
    assert finished >= 1
    assert len({done[f"choice-{i}"].outputs[0].text for i in range(len(PROMPTS))}) > 1


def test_grammar_in_ebnf(llm):
    grammar = 'root ::= "(" expr ")"\nexpr ::= num (("+" | "*") num){0,3}\nnum ::= [1-9] [0-9]?'
    done, rejected = run(engine(llm), [(f"g{i}", p, params(grammar=grammar, seed=i))
                                       for i, p in enumerate(PROMPTS)])
    assert not rejected
    for out in done.values():
        c = out.outputs[0]
        assert c.finish_reason == "stop"
        assert re.fullmatch(r"\([1-9][0-9]?([+*][1-9][0-9]?){0,3}\)", c.text), c.text


# ---- works with the engine's other features -------------------------------------------

def test_parallel_samples_seeds_logprobs_and_stop_strings(llm):
    schema = SCHEMAS["ranges"]
    p = params(json_schema=schema, n=3, seed=7, logprobs=2)
    first, _ = run(engine(llm), [("a", "Output the record as JSON:", p)])
    again, _ = run(engine(llm), [("a", "Output the record as JSON:", p)])
    outs = first["a"].outputs
    assert [c.token_ids for c in outs] == [c.token_ids for c in again["a"].outputs]
    assert len({tuple(c.token_ids) for c in outs}) > 1  # each sample its own matcher
    for c in outs:
        jsonschema.validate(json.loads(c.text), schema)
        assert len(c.logprobs) == len(c.token_ids)
        assert all(t in lp for t, lp in zip(c.token_ids, c.logprobs))
    # A stop string ends the output where it appears, constraint or not.
    stopped, _ = run(engine(llm), [("s", "Output the record as JSON:",
                                    params(json_schema=schema, seed=7, stop=['"score"']))])
    c = stopped["s"].outputs[0]
    assert c.finish_reason == "stop" and c.stop_reason == '"score"'
    assert outs[0].text.startswith(c.text) and '"score"' not in c.text


def seeded_requests():
    return [(f"r{i}", p, params(json_schema=SCHEMAS["nested_ref"] if i % 2 else
                               SCHEMAS["array_enum"], seed=100 + i))
            for i, p in enumerate(PROMPTS[:6])]


@pytest.fixture(scope="module")
def reference(llm):
    done, _ = run(engine(llm), seeded_requests())
    return {rid: out.outputs[0].token_ids for rid, out in done.items()}


@pytest.mark.parametrize("overrides", [
    dict(num_kv_blocks=16, preemption_mode="recompute"),
    dict(num_kv_blocks=16, preemption_mode="swap"),
    dict(max_num_batched_tokens=8),             # chunked prefill
    dict(async_scheduling=True),
], ids=["recompute", "swap", "chunked-prefill", "async-scheduling"])
def test_same_tokens_under_preemption_chunking_and_async_scheduling(llm, reference, overrides):
    eng = engine(llm, **overrides)
    done, _ = run(eng, seeded_requests())
    assert {rid: out.outputs[0].token_ids for rid, out in done.items()} == reference
    stats = eng.stats()
    if "preemption_mode" in overrides:
        assert stats.preemptions_by_mode[overrides["preemption_mode"]] > 0
    if overrides.get("async_scheduling"):
        assert stats.num_steps_scheduled_ahead == 0  # never past a constraint


def test_prefix_cache_hit_gives_the_same_output(llm):
    eng = engine(llm)
    p = params(json_schema=SCHEMAS["array_enum"], seed=3)
    prompt = "You are a careful assistant. Reply with the product's colours and size. " * 2
    first, _ = run(eng, [("a", prompt, p)])
    second, _ = run(eng, [("b", prompt, p)])
    assert second["b"].metrics.num_cached_tokens > 0
    assert second["b"].outputs[0].token_ids == first["a"].outputs[0].token_ids


def test_unconstrained_rows_of_a_mixed_batch_get_their_own_tokens(llm):
    greedy = SamplingParams(temperature=0.0, max_tokens=24)
    plain = [(f"plain-{i}", p, greedy) for i, p in enumerate(PROMPTS[:6])]
    alone, _ = run(engine(llm), plain)
    constrained = [(f"c-{i}", p, params(temperature=0.0, json_schema=SCHEMAS["nested_ref"]))
                   for i, p in enumerate(PROMPTS[:6])]
    constrained += [(f"ch-{i}", p, params(temperature=0.0, choice=CHOICES))
                    for i, p in enumerate(PROMPTS[6:9])]
    mixed, _ = run(engine(llm), [r for pair in zip(plain, constrained) for r in pair]
                   + constrained[6:])
    for rid, _, _ in plain:
        assert mixed[rid].outputs[0].token_ids == alone[rid].outputs[0].token_ids
    for rid, _, _ in constrained[:6]:
        jsonschema.validate(json.loads(mixed[rid].outputs[0].text), SCHEMAS["nested_ref"])


# ---- bad constraints fail their own request ---------------------------------------------

@pytest.mark.parametrize("kwargs, message", [
    (dict(json_schema='{"type": "object",'), "json_schema is not valid JSON"),
    (dict(json_schema="[1, 2]"), "json_schema must be a JSON object"),
    (dict(regex="x" * (MAX_CONSTRAINT_CHARS + 1)), "regex is 32769 characters"),
    (dict(grammar='root ::= "a"\n' * 4000), "grammar is"),
    (dict(choice=[]), "choice must be a non-empty list"),
    (dict(choice=["a", ""]), r"choice\[1\] must be a non-empty string"),
    (dict(regex="a+", choice=["a"]), "at most one constraint"),
    (dict(json_object=True, beam_width=2), "json_object: constraints are not supported with beam"),
    (dict(regex="a+", ignore_eos=True), "regex: ignore_eos cannot be combined"),
    (dict(regex="a+", min_tokens=2), "regex: min_tokens cannot be combined"),
])
def test_sampling_params_refuse_bad_constraints(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


@pytest.mark.parametrize("kwargs, message", [
    (dict(json_schema='{"type": "strnig"}'), r"json_schema is not a valid JSON Schema"),
    (dict(json_schema='{"type": "object", "properties": {"a": {"$ref": "#/$defs/nope"}}}'),
     r"json_schema does not compile: .*\$defs"),
    (dict(regex="(ab"), r"regex does not compile: .*parenthesis is not closed"),
    (dict(grammar='root ::= "a" |'), r"grammar does not compile: .*EBNF"),
    (dict(grammar='start ::= "a"'), r"grammar does not compile: .*root"),
])
def test_constraints_that_do_not_compile_fail_alone(llm, kwargs, message):
    eng = engine(llm)
    greedy = SamplingParams(temperature=0.0, max_tokens=12)
    alone, _ = run(engine(llm), [("ok", "The capital of France is", greedy)])
    done, rejected = run(eng, [("ok", "The capital of France is", greedy),
                               ("bad", "Hello", params(**kwargs))])
    assert list(rejected) == ["bad"] and re.search(message, str(rejected["bad"])), rejected
    assert list(done) == ["ok"]
    assert done["ok"].outputs[0].token_ids == alone["ok"].outputs[0].token_ids
    # Failures are cached: the same constraint is refused at once, without a compile.
    compiles = eng.structured.compiler.num_compiles
    with pytest.raises(ValueError, match=message):
        eng.add_request("bad-again", "Hello", params(**kwargs))
    assert eng.structured.compiler.num_compiles == compiles
    assert not eng.has_unfinished_requests()


def test_a_compile_past_the_time_limit_fails_its_request_only(llm):
    """The injected compiler never returns until released: the request must fail at the
    limit whatever the timing, while the other request runs to its end meanwhile."""
    eng = engine(llm, structured_compile_timeout_s=0.2)
    release = threading.Event()
    real = eng.structured.compiler.compile_fn

    def stuck(spec):
        release.wait(60)
        return real(spec)

    eng.structured.compiler.compile_fn = stuck
    greedy = SamplingParams(temperature=0.0, max_tokens=12)
    alone, _ = run(engine(llm), [("ok", "The capital of France is", greedy)])
    try:
        done, rejected = run(eng, [("slow", "Hello", params(grammar='root ::= "x"+')),
                                   ("ok", "The capital of France is", greedy)])
    finally:
        release.set()
    assert list(rejected) == ["slow"]
    assert re.search(r"grammar: compiling the constraint took longer than the server's "
                     r"limit of 0.2 s", str(rejected["slow"]))
    assert done["ok"].outputs[0].token_ids == alone["ok"].outputs[0].token_ids
    with pytest.raises(ValueError, match="took longer"):  # remembered: no second worker
        eng.add_request("slow-again", "Hello", params(grammar='root ::= "x"+'))


def test_a_compiling_request_waits_without_holding_others(llm):
    eng = engine(llm)
    release = threading.Event()
    real = eng.structured.compiler.compile_fn
    eng.structured.compiler.compile_fn = lambda spec: (release.wait(60), real(spec))[1]
    greedy = SamplingParams(temperature=0.0, max_tokens=6)
    eng.add_request("constrained", "Pick one:", params(choice=CHOICES, seed=1))
    eng.add_request("plain", "The capital of France is", greedy)
    assert eng.stats().num_compiling == 1
    finished = {}
    while "plain" not in finished:  # the plain request ends while the grammar compiles
        finished.update({o.request_id: o for o in eng.step() if o.finished})
    assert "constrained" not in finished and eng.stats().num_compiling == 1
    release.set()
    while eng.has_unfinished_requests():
        finished.update({o.request_id: o for o in eng.step() if o.finished})
    assert finished["constrained"].outputs[0].text in CHOICES
    assert eng.structured.compiler.num_compiles == 1


def test_abort_while_compiling(llm):
    eng = engine(llm)
    release = threading.Event()
    real = eng.structured.compiler.compile_fn
    eng.structured.compiler.compile_fn = lambda spec: (release.wait(60), real(spec))[1]
    eng.add_request("c", "Pick one:", params(choice=CHOICES))
    eng.abort_request("c")
    release.set()
    assert not eng.has_unfinished_requests() and eng.step() == []


def test_offline_generate_raises_for_a_bad_constraint(llm):
    with pytest.raises(ValueError, match="regex does not compile"):
        LLM.from_engine(engine(llm)).generate(["a", "b"], [params(), params(regex="[a-")],
                                              use_tqdm=False)


# ---- command line and client ----------------------------------------------------------

def test_cli_reads_schema_and_grammar_files_and_repeats_choice(tmp_path):
    from pagedserve.cli import build_parser, sampling_params_from_args

    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps(SCHEMAS["array_enum"]))
    args = build_parser().parse_args(["generate", "hi", "--json-schema", str(schema)])
    assert json.loads(sampling_params_from_args(args).json_schema) == SCHEMAS["array_enum"]
    args = build_parser().parse_args(["generate", "hi", "--choice", "A", "--choice", "B"])
    assert sampling_params_from_args(args).choice == ["A", "B"]
    args = build_parser().parse_args(["generate", "hi", "--regex", r"\d+"])
    assert sampling_params_from_args(args).regex == r"\d+"
    args = build_parser().parse_args(["generate", "hi", "--grammar", str(tmp_path / "nope")])
    with pytest.raises(ValueError, match="--grammar: cannot read"):
        sampling_params_from_args(args)


def test_client_builds_every_constraint():
    from pagedserve.client import build_request

    sampling = build_request("hi", choice=["A", "B"]).sampling
    assert sampling.WhichOneof("constraint") == "choice" and list(sampling.choice.choices) == ["A", "B"]
    sampling = build_request("hi", json_schema={"type": "object"}).sampling
    assert json.loads(sampling.json_schema) == {"type": "object"}
    assert build_request("hi", regex="a+").sampling.WhichOneof("constraint") == "regex"
    assert build_request("hi", json_object=True).sampling.json_object

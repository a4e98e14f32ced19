"""Tracing: OTEL_* configuration, W3C context extraction, engine spans built from a
request's timeline, and a real server exporting over OTLP/gRPC to a receiver in the test.
"""

from __future__ import annotations

import http.server
import os
import threading
from unittest import mock

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from pagedserve.observability.spans import emit_request_spans
from pagedserve.observability.timeline import PhaseEvent
from pagedserve.observability.tracing import (
    Tracing,
    extract_context,
    make_exporters,
    make_sampler,
    make_resource,
)
from pagedserve.outputs import CompletionOutput, RequestMetrics, RequestOutput
from pagedserve.sampling_params import SamplingParams

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{CALLER_SPAN}-01"


# ---- configuration ---------------------------------------------------------------------
def test_no_exporter_configured_means_no_tracing():
    with mock.patch.dict(os.environ, {}, clear=True):
        assert Tracing.from_env() is None
    assert make_exporters({}) == []
    assert make_exporters({"OTEL_TRACES_EXPORTER": "none",
                           "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4317"}) == []


@pytest.mark.parametrize("env, disabled", [
    ({"OTEL_SDK_DISABLED": "true"}, False),
    ({"PAGEDSERVE_DISABLE_TRACING": "1"}, False),
    ({}, True),
])
def test_the_switch_turns_tracing_off_even_with_an_endpoint(env, disabled):
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4317", **env}
    with mock.patch.dict(os.environ, env, clear=True):
        assert Tracing.from_env(disabled=disabled) is None


@pytest.mark.parametrize("env, module", [
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317"}, "grpc"),  # the Python SDK's default
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_EXPORTER_OTLP_PROTOCOL":
      "http/protobuf"}, "http"),
    ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/v1/traces",
      "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc",
      "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf"}, "http"),  # signal-specific wins
    ({"OTEL_TRACES_EXPORTER": "otlp"}, "grpc"),
])
def test_otlp_protocol_picks_the_exporter(env, module):
    with mock.patch.dict(os.environ, env, clear=True):
        exporters = make_exporters(env)
    assert len(exporters) == 1
    assert type(exporters[0]).__module__ == \
        f"opentelemetry.exporter.otlp.proto.{module}.trace_exporter"
    exporters[0].shutdown()


def test_console_exporter():
    (exporter,) = make_exporters({"OTEL_TRACES_EXPORTER": "console"})
    assert type(exporter).__name__ == "ConsoleSpanExporter"


@pytest.mark.parametrize("env, message", [
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_EXPORTER_OTLP_PROTOCOL":
      "http/json"}, "OTEL_EXPORTER_OTLP_PROTOCOL must be one of grpc, http/protobuf"),
    ({"OTEL_TRACES_EXPORTER": "zipkin"}, "OTEL_TRACES_EXPORTER: unknown exporter 'zipkin'"),
])
def test_bad_exporter_settings_name_the_variable(env, message):
    with pytest.raises(ValueError, match=message):
        make_exporters(env)


def test_sampler_from_env():
    assert make_sampler({}).get_description() == \
        "ParentBased{root:AlwaysOnSampler,remoteParentSampled:AlwaysOnSampler," \
        "remoteParentNotSampled:AlwaysOffSampler,localParentSampled:AlwaysOnSampler," \
        "localParentNotSampled:AlwaysOffSampler}"
    ratio = make_sampler({"OTEL_TRACES_SAMPLER": "traceidratio",
                          "OTEL_TRACES_SAMPLER_ARG": "0.25"})
    assert ratio.get_description() == "TraceIdRatioBased{0.25}"
    assert make_sampler({"OTEL_TRACES_SAMPLER": "always_off"}).get_description() == \
        "AlwaysOffSampler"
    with pytest.raises(ValueError, match="OTEL_TRACES_SAMPLER must be one of"):
        make_sampler({"OTEL_TRACES_SAMPLER": "sometimes"})
    with pytest.raises(ValueError, match="OTEL_TRACES_SAMPLER_ARG must be a ratio in"):
        make_sampler({"OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
                      "OTEL_TRACES_SAMPLER_ARG": "1.5"})
    with pytest.raises(ValueError, match="OTEL_TRACES_SAMPLER_ARG must be a ratio in"):
        make_sampler({"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "half"})


def test_resource_from_env():
    with mock.patch.dict(os.environ, {}, clear=True):
        assert make_resource().attributes["service.name"] == "pagedserve"
    env = {"OTEL_SERVICE_NAME": "llm-gateway-backend",
           "OTEL_RESOURCE_ATTRIBUTES": "k8s.pod.name=pod-1,deployment.environment=staging"}
    with mock.patch.dict(os.environ, env, clear=True):
        attrs = make_resource().attributes
    assert attrs["service.name"] == "llm-gateway-backend"
    assert attrs["k8s.pod.name"] == "pod-1" and attrs["deployment.environment"] == "staging"


def test_traceparent_from_metadata():
    ctx = extract_context([("authorization", "Bearer x"), ("traceparent", TRACEPARENT),
                           ("tracestate", "vendor=abc")])
    from opentelemetry import trace

    span_context = trace.get_current_span(ctx).get_span_context()
    assert f"{span_context.trace_id:032x}" == TRACE_ID
    assert f"{span_context.span_id:016x}" == CALLER_SPAN
    assert span_context.is_remote and span_context.trace_flags.sampled
    assert span_context.trace_state.to_header() == "vendor=abc"
    for bad in ([], [("traceparent", "00-zz-00-01")], None):
        assert not trace.get_current_span(extract_context(bad)).get_span_context().is_valid


def test_otlp_over_http_protobuf_reaches_a_receiver():
    """The http/protobuf exporter really posts to <endpoint>/v1/traces."""
    received = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers["Content-Length"]))
            received.append((self.path, trace_service_pb2.ExportTraceServiceRequest.FromString(body)))
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.end_headers()

        def log_message(self, *args):
            pass

    httpd = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{httpd.server_port}",
           "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf", "OTEL_SERVICE_NAME": "svc-http"}
    try:
        with mock.patch.dict(os.environ, env, clear=True):
            tracing = Tracing.from_env()
            tracing.tracer.start_span("hello").end()
            tracing.shutdown()
    finally:
        httpd.shutdown()
    ((path, request),) = received
    assert path == "/v1/traces"
    (rs,) = request.resource_spans
    assert {a.key: a.value.string_value for a in rs.resource.attributes}["service.name"] == "svc-http"
    assert [s.name for s in rs.scope_spans[0].spans] == ["hello"]


# ---- engine spans from a timeline ------------------------------------------------------
def _memory_tracer():
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider.get_tracer("test"), exporter


def _output(events, *, finished=100.0 + 2.0, reasons=("length",), tokens=(6,), cached=16,
            preemptions=1, first_scheduled=100.25, first_token=100.5):
    metrics = RequestMetrics(arrival_time=100.0, first_scheduled_time=first_scheduled,
                             first_token_time=first_token, finished_time=finished,
                             num_prompt_tokens=40, num_cached_tokens=cached,
                             num_preemptions=preemptions)
    metrics.events = list(events)
    completions = [CompletionOutput(index=i, text="", token_ids=list(range(n)),
                                    finish_reason=r) for i, (r, n) in enumerate(zip(reasons, tokens))]
    return RequestOutput("req-1", "prompt", list(range(40)), completions,
                         finished=finished is not None, metrics=metrics)


def _tree(exporter):
    spans = exporter.get_finished_spans()
    (root,) = [s for s in spans if s.parent is None or s.name.startswith("text_completion")]
    by_id = {s.context.span_id: s for s in spans}
    rel = lambda ns: (ns - root.start_time) / 1e9  # noqa: E731 - seconds after arrival
    rows = []
    for s in sorted(spans, key=lambda s: (s.start_time, -s.end_time, s.name)):
        parent = by_id.get(s.parent.span_id).name if s.parent and s.parent.span_id in by_id \
            else None
        rows.append((s.name, parent, rel(s.start_time), rel(s.end_time)))
    return root, rows, spans


def test_swap_preemption_timeline_becomes_nested_spans():
    events = [  # times are exact binary fractions, so differences compare exactly
        PhaseEvent("admitted", 100.25, 100.25, {"seq": 0, "uncached": 24}),
        PhaseEvent("prefill_chunk", 100.25, 100.375, {"tokens": 16, "start": 16, "seq": 0,
                                                      "sampled": False}),
        PhaseEvent("prefill_chunk", 100.375, 100.5, {"tokens": 8, "start": 32, "seq": 0,
                                                     "sampled": True}),
        PhaseEvent("preempted", 101.0, 101.0, {"mode": "swap"}),
        PhaseEvent("swapped_out", 101.0, 101.0625, {"blocks": 3}),
        PhaseEvent("swapped_in", 101.5, 101.5625, {"blocks": 3}),
        PhaseEvent("finished", 102.0, 102.0, {"reason": "length", "seq": 0, "blocks": 3}),
    ]
    tracer, exporter = _memory_tracer()
    params = SamplingParams(max_tokens=6, temperature=0.5, top_p=0.875, top_k=40, seed=7,
                            presence_penalty=0.25)
    emit_request_spans(tracer, _output(events), params, "smollm2", parent=None)
    root, rows, _ = _tree(exporter)
    R = "text_completion smollm2"
    assert rows == [
        (R, None, 0.0, 2.0),
        ("queued", R, 0.0, 0.25),
        ("prefill_chunk", R, 0.25, 0.375),
        ("prefill_chunk", R, 0.375, 0.5),
        ("decode", R, 0.5, 1.0),
        ("preemption", R, 1.0, 1.5625),
        ("swap_out", "preemption", 1.0, 1.0625),
        ("swap_in", "preemption", 1.5, 1.5625),
        ("decode", R, 1.5625, 2.0),
        ("finish", R, 2.0, 2.0),
    ]
    assert root.kind == SpanKind.INTERNAL
    assert dict(root.attributes) == {
        "gen_ai.operation.name": "text_completion", "gen_ai.provider.name": "pagedserve",
        "gen_ai.request.model": "smollm2", "gen_ai.response.model": "smollm2",
        "gen_ai.response.id": "req-1", "gen_ai.request.max_tokens": 6,
        "gen_ai.request.temperature": 0.5, "gen_ai.request.top_p": 0.875,
        "gen_ai.request.top_k": 40.0, "gen_ai.request.seed": 7,
        "gen_ai.request.presence_penalty": 0.25,
        "gen_ai.usage.input_tokens": 40, "gen_ai.usage.output_tokens": 6,
        "gen_ai.usage.cache_read.input_tokens": 16, "gen_ai.response.finish_reasons": ("length",),
        "pagedserve.prefix_cache.hit_tokens": 16, "pagedserve.preemptions": 1,
        "pagedserve.kv.blocks_held": 3, "pagedserve.time_to_first_token_s": 0.5}
    assert [(e.name, (e.timestamp - root.start_time) / 1e9) for e in root.events] == \
        [("first_token", 0.5)]
    spans = {s.name: s for s in exporter.get_finished_spans()}
    assert spans["preemption"].attributes["pagedserve.preemption.mode"] == "swap"
    assert spans["swap_out"].attributes["pagedserve.swap.blocks"] == 3
    assert dict(spans["finish"].attributes) == {
        "gen_ai.response.finish_reasons": ("length",), "pagedserve.finish.reason": "length",
        "pagedserve.sequence.index": 0, "pagedserve.kv.blocks_held": 3}
    chunks = [s for s in exporter.get_finished_spans() if s.name == "prefill_chunk"]
    assert [(c.attributes["pagedserve.prefill.tokens"],
             c.attributes["pagedserve.prefill.start_position"],
             c.attributes["pagedserve.prefill.recompute"]) for c in chunks] == \
        [(16, 16, False), (8, 32, False)]


def test_recompute_preemption_ends_at_readmission_and_marks_the_recompute():
    events = [
        PhaseEvent("admitted", 100.25, 100.25, {"seq": 0, "uncached": 40}),
        PhaseEvent("prefill_chunk", 100.25, 100.5, {"tokens": 40, "start": 0, "seq": 0,
                                                    "sampled": True}),
        PhaseEvent("preempted", 101.0, 101.0, {"mode": "recompute"}),
        PhaseEvent("admitted", 101.25, 101.25, {"seq": 0, "uncached": 43}),
        PhaseEvent("prefill_chunk", 101.25, 101.5, {"tokens": 43, "start": 0, "seq": 0,
                                                    "sampled": True}),
        PhaseEvent("finished", 102.0, 102.0, {"reason": "stop", "seq": 0, "blocks": 4}),
    ]
    tracer, exporter = _memory_tracer()
    emit_request_spans(tracer, _output(events, reasons=("stop",), cached=0),
                       SamplingParams(max_tokens=8), "m", parent=None)
    _, rows, spans = _tree(exporter)
    R = "text_completion m"
    assert rows == [
        (R, None, 0.0, 2.0),
        ("queued", R, 0.0, 0.25),
        ("prefill_chunk", R, 0.25, 0.5),
        ("decode", R, 0.5, 1.0),
        ("preemption", R, 1.0, 1.25),
        ("prefill_chunk", R, 1.25, 1.5),
        ("decode", R, 1.5, 2.0),
        ("finish", R, 2.0, 2.0),
    ]
    chunks = [s for s in spans if s.name == "prefill_chunk"]
    assert [c.attributes["pagedserve.prefill.recompute"] for c in chunks] == [False, True]
    (preemption,) = [s for s in spans if s.name == "preemption"]
    assert preemption.attributes["pagedserve.preemption.mode"] == "recompute"


def test_recompute_with_its_history_still_cached_goes_straight_back_to_decoding():
    events = [
        PhaseEvent("admitted", 100.25, 100.25, {"seq": 0, "uncached": 40}),
        PhaseEvent("prefill_chunk", 100.25, 100.5, {"tokens": 40, "start": 0, "seq": 0,
                                                    "sampled": True}),
        PhaseEvent("preempted", 101.0, 101.0, {"mode": "recompute"}),
        PhaseEvent("admitted", 101.25, 101.25, {"seq": 0, "uncached": 1}),
        PhaseEvent("finished", 102.0, 102.0, {"reason": "length", "seq": 0, "blocks": 4}),
    ]
    tracer, exporter = _memory_tracer()
    emit_request_spans(tracer, _output(events), SamplingParams(), "m", parent=None)
    _, rows, _ = _tree(exporter)
    R = "text_completion m"
    assert rows == [
        (R, None, 0.0, 2.0),
        ("queued", R, 0.0, 0.25),
        ("prefill_chunk", R, 0.25, 0.5),
        ("decode", R, 0.5, 1.0),
        ("preemption", R, 1.0, 1.25),
        ("decode", R, 1.25, 2.0),
        ("finish", R, 2.0, 2.0),
    ]


def test_swap_in_recorded_after_its_chunk_still_nests_under_the_preemption():
    # A request preempted mid-prefill: after the swap-in its next chunk runs in the same
    # step; whichever order the records were made in, the swap-in belongs to the preemption.
    events = [
        PhaseEvent("admitted", 100.25, 100.25, {"seq": 0, "uncached": 40}),
        PhaseEvent("prefill_chunk", 100.25, 100.5, {"tokens": 16, "start": 0, "seq": 0,
                                                    "sampled": False}),
        PhaseEvent("preempted", 100.75, 100.75, {"mode": "swap"}),
        PhaseEvent("swapped_out", 100.75, 100.875, {"blocks": 1}),
        PhaseEvent("prefill_chunk", 101.0, 101.25, {"tokens": 24, "start": 16, "seq": 0,
                                                    "sampled": True}),
        PhaseEvent("swapped_in", 101.0, 101.25, {"blocks": 1}),
        PhaseEvent("finished", 102.0, 102.0, {"reason": "length", "seq": 0, "blocks": 3}),
    ]
    tracer, exporter = _memory_tracer()
    emit_request_spans(tracer, _output(events), SamplingParams(), "m", parent=None)
    _, rows, _ = _tree(exporter)
    R = "text_completion m"
    assert rows == [
        (R, None, 0.0, 2.0),
        ("queued", R, 0.0, 0.25),
        ("prefill_chunk", R, 0.25, 0.5),
        ("preemption", R, 0.75, 1.25),
        ("swap_out", "preemption", 0.75, 0.875),
        ("prefill_chunk", R, 1.0, 1.25),
        ("swap_in", "preemption", 1.0, 1.25),
        ("decode", R, 1.25, 2.0),
        ("finish", R, 2.0, 2.0),
    ]


def test_full_prefix_hit_decodes_from_first_scheduling_and_parallel_samples_finish_apart():
    events = [  # no prefill chunk: the whole prompt was cached but its last token
        PhaseEvent("admitted", 100.25, 100.25, {"seq": 0, "uncached": 1}),
        PhaseEvent("finished", 101.0, 101.0, {"reason": "stop", "seq": 1, "blocks": 2}),
        PhaseEvent("finished", 101.5, 101.5, {"reason": "length", "seq": 0, "blocks": 3}),
    ]
    tracer, exporter = _memory_tracer()
    output = _output(events, finished=101.5, reasons=("length", "stop"), tokens=(5, 2),
                     preemptions=0)
    emit_request_spans(tracer, output, SamplingParams(n=2, stop=["\n"]), "m", parent=None)
    root, rows, spans = _tree(exporter)
    R = "text_completion m"
    assert rows == [
        (R, None, 0.0, 1.5),
        ("queued", R, 0.0, 0.25),
        ("decode", R, 0.25, 1.5),
        ("finish", R, 1.0, 1.0),
        ("finish", R, 1.5, 1.5),
    ]
    assert root.attributes["gen_ai.response.finish_reasons"] == ("length", "stop")
    assert root.attributes["gen_ai.request.choice.count"] == 2
    assert root.attributes["gen_ai.request.stop_sequences"] == ("\n",)
    assert root.attributes["gen_ai.usage.output_tokens"] == 7
    assert root.attributes["pagedserve.kv.blocks_held"] == 5
    finishes = sorted((s.attributes["pagedserve.sequence.index"],
                       s.attributes["pagedserve.finish.reason"]) for s in spans if s.name == "finish")
    assert finishes == [(0, "length"), (1, "stop")]


def test_abandoned_request_closes_its_open_phases_at_the_end_time():
    events = [PhaseEvent("admitted", 100.25, 100.25, {"seq": 0, "uncached": 40}),
              PhaseEvent("prefill_chunk", 100.25, 100.5, {"tokens": 40, "start": 0, "seq": 0,
                                                          "sampled": True})]
    tracer, exporter = _memory_tracer()
    output = _output(events, finished=None, reasons=(None,), tokens=(3,), preemptions=0)
    emit_request_spans(tracer, output, SamplingParams(), "m", parent=None, end_time=101.0)
    root, rows, _ = _tree(exporter)
    R = "text_completion m"
    assert rows == [(R, None, 0.0, 1.0), ("queued", R, 0.0, 0.25),
                    ("prefill_chunk", R, 0.25, 0.5), ("decode", R, 0.5, 1.0)]
    assert root.attributes["gen_ai.response.finish_reasons"] == ("abort",)


def test_request_span_is_a_child_of_the_given_parent():
    tracer, exporter = _memory_tracer()
    with tracer.start_as_current_span("rpc") as rpc:
        pass
    emit_request_spans(tracer, _output([]), SamplingParams(), "m", parent=rpc)
    root = [s for s in exporter.get_finished_spans() if s.name == "text_completion m"][0]
    assert root.parent.span_id == rpc.get_span_context().span_id
    assert root.context.trace_id == rpc.get_span_context().trace_id


# ---- a real server exporting over OTLP/gRPC ------------------------------------------------
SERVER = 2  # SpanKind in the OTLP proto: SPAN_KIND_INTERNAL = 1, SPAN_KIND_SERVER = 2
PROMPT = ("Paged attention stores the key and value cache in fixed-size blocks, so memory "
          "is allocated on demand and shared between sequences.")
SLACK_NS = 2_000_000  # the RPC span is on the wall clock, engine spans on the monotonic one


@pytest.fixture(scope="module")
def receiver():
    from otlp_receiver import OtlpReceiver

    with OtlpReceiver() as r:
        yield r


@pytest.fixture(scope="module")
def served(receiver):
    from observability_fixtures import ObservedServer, tracing_to
    from pagedserve.config import EngineConfig

    tracing = tracing_to(receiver.endpoint, OTEL_SERVICE_NAME="pagedserve-test",
                         OTEL_RESOURCE_ATTRIBUTES="deployment.environment=test")
    # Prompt chunks of 16 tokens, so the prompt is prefilled in several steps.
    s = ObservedServer(EngineConfig(device="cpu", num_kv_blocks=64, max_model_len=256,
                                    max_num_batched_tokens=16, swap_space_gb=0.01, seed=0),
                       tracing=tracing)
    yield s
    s.close()


def _traceparent(trace_id: str, span_id: str = CALLER_SPAN) -> tuple:
    return (("traceparent", f"00-{trace_id}-{span_id}-01"), ("tracestate", "caller=1"))


def _trace(receiver, trace_id: str, until) -> list:
    spans = receiver.wait_for(lambda all_: until([s for s in all_ if s.trace_id == trace_id]))
    return [s for s in spans if s.trace_id == trace_id]


def _one(spans, name):
    found = [s for s in spans if s.name == name]
    assert len(found) == 1, f"{len(found)} spans named {name!r}"
    return found[0]


def _inside(child, parent) -> bool:
    return (parent.start_ns - SLACK_NS <= child.start_ns <= child.end_ns
            <= parent.end_ns + SLACK_NS)


def test_request_trace_continues_the_callers_trace(served, receiver):
    trace_id = "5b8efff798038103d269b633813fc60c"
    reply = served.generate(PROMPT, metadata=_traceparent(trace_id), request_id="traced-1",
                            max_tokens=5, temperature=0.0, top_p=0.875, ignore_eos=True)
    usage = reply.usage
    spans = _trace(receiver, trace_id, lambda ss: any(s.name == "finish" for s in ss)
                   and any(s.kind == SERVER for s in ss))
    rpc = _one(spans, "pagedserve.v1.TextGeneration/Generate")
    assert rpc.kind == SERVER and rpc.parent_span_id == CALLER_SPAN
    assert rpc.attributes["rpc.system"] == "grpc"
    assert rpc.attributes["rpc.service"] == "pagedserve.v1.TextGeneration"
    assert rpc.attributes["rpc.method"] == "Generate"
    assert rpc.attributes["rpc.grpc.status_code"] == 0
    assert rpc.attributes["network.peer.address"] == "127.0.0.1"
    assert rpc.resource["service.name"] == "pagedserve-test"
    assert rpc.resource["deployment.environment"] == "test"

    request = _one(spans, f"text_completion {served.model}")
    assert request.parent_span_id == rpc.span_id and _inside(request, rpc)
    a = request.attributes
    assert a["gen_ai.operation.name"] == "text_completion"
    assert a["gen_ai.request.model"] == a["gen_ai.response.model"] == served.model
    assert a["gen_ai.response.id"] == "traced-1" == reply.request_id
    assert a["gen_ai.request.max_tokens"] == 5
    assert a["gen_ai.request.temperature"] == 0.0 and a["gen_ai.request.top_p"] == 0.875
    assert a["gen_ai.usage.input_tokens"] == usage.prompt_tokens
    assert a["gen_ai.usage.output_tokens"] == usage.completion_tokens == 5
    assert a["gen_ai.response.finish_reasons"] == ["length"]
    assert a["pagedserve.prefix_cache.hit_tokens"] == usage.cached_prompt_tokens == 0
    assert a["pagedserve.preemptions"] == 0
    # 5 tokens were generated; the last one needs no KV slot.
    assert a["pagedserve.kv.blocks_held"] == -(-(usage.prompt_tokens + 4) // 16)
    assert [name for name, _ in request.events] == ["first_token"]

    engine_spans = sorted((s for s in spans if s.parent_span_id == request.span_id),
                          key=lambda s: (s.start_ns, s.name))
    names = [s.name for s in engine_spans]
    n_chunks = -(-usage.prompt_tokens // 16)
    assert names == ["queued"] + ["prefill_chunk"] * n_chunks + ["decode", "finish"]
    assert all(_inside(s, request) for s in engine_spans)
    for before, after in zip(engine_spans, engine_spans[1:]):
        assert before.end_ns <= after.start_ns, (before.name, after.name)  # phases in order
    chunks = engine_spans[1:1 + n_chunks]
    assert [c.attributes["pagedserve.prefill.start_position"] for c in chunks] == \
        list(range(0, usage.prompt_tokens, 16))
    assert sum(c.attributes["pagedserve.prefill.tokens"] for c in chunks) == usage.prompt_tokens
    finish = engine_spans[-1]
    assert finish.attributes["pagedserve.finish.reason"] == "length"
    assert finish.attributes["gen_ai.response.finish_reasons"] == ["length"]
    # The first token comes with the last chunk; decoding starts there.
    decode = engine_spans[-2]
    assert decode.start_ns == chunks[-1].end_ns == request.events[0][1]


def test_streamed_request_with_a_prefix_cache_hit(served, receiver):
    served.generate(PROMPT, max_tokens=1, temperature=0.0)  # puts the prompt in the cache
    trace_id = "0af7651916cd43dd8448eb211c80319c"
    messages = served.generate(PROMPT, metadata=_traceparent(trace_id), stream=True,
                               max_tokens=3, temperature=0.0, ignore_eos=True)
    usage = messages[-1].usage
    assert usage.cached_prompt_tokens > 0
    spans = _trace(receiver, trace_id, lambda ss: any(s.name == "finish" for s in ss)
                   and any(s.kind == SERVER for s in ss))
    rpc = _one(spans, "pagedserve.v1.TextGeneration/StreamGenerate")
    assert rpc.parent_span_id == CALLER_SPAN
    request = _one(spans, f"text_completion {served.model}")
    assert request.parent_span_id == rpc.span_id
    assert request.attributes["pagedserve.prefix_cache.hit_tokens"] == usage.cached_prompt_tokens
    assert request.attributes["gen_ai.usage.cache_read.input_tokens"] == \
        usage.cached_prompt_tokens
    chunks = [s for s in spans if s.name == "prefill_chunk"]
    # Only the uncached part of the prompt is computed.
    assert chunks[0].attributes["pagedserve.prefill.start_position"] == usage.cached_prompt_tokens
    assert sum(c.attributes["pagedserve.prefill.tokens"] for c in chunks) == \
        usage.prompt_tokens - usage.cached_prompt_tokens


def test_without_traceparent_the_rpc_span_starts_a_trace(served, receiver):
    reply = served.generate([5, 6, 7, 8], request_id="untraced", max_tokens=2, ignore_eos=True)
    assert reply.usage.completion_tokens == 2
    spans = receiver.wait_for(lambda ss: any(
        s.attributes.get("gen_ai.response.id") == "untraced" for s in ss))
    request = [s for s in spans if s.attributes.get("gen_ai.response.id") == "untraced"][0]
    rpc = [s for s in spans if s.span_id == request.parent_span_id][0]
    assert rpc.kind == SERVER and rpc.parent_span_id == "" and rpc.trace_id != TRACE_ID


def test_deadline_exceeded_request_is_traced_as_aborted(served, receiver):
    trace_id = "1e2f0000000000000000000000000abc"
    with pytest.raises(grpc.RpcError) as err:
        served.generate(PROMPT, metadata=_traceparent(trace_id), timeout=1.0,
                        max_tokens=200, ignore_eos=True)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    spans = _trace(receiver, trace_id, lambda ss: any(s.name.startswith("text_completion")
                                                      for s in ss)
                   and any(s.kind == SERVER for s in ss))
    rpc = _one(spans, "pagedserve.v1.TextGeneration/Generate")
    assert rpc.attributes["rpc.grpc.status_code"] == grpc.StatusCode.CANCELLED.value[0]
    request = _one(spans, f"text_completion {served.model}")
    assert request.attributes["gen_ai.response.finish_reasons"] == ["abort"]
    assert request.attributes["gen_ai.usage.output_tokens"] >= 1
    assert request.parent_span_id == rpc.span_id
    served.wait_idle()  # the abort freed the request's blocks


def test_rejected_request_has_only_the_rpc_span_with_its_status(served, receiver):
    trace_id = "77770000000000000000000000000001"
    with pytest.raises(grpc.RpcError) as err:
        served.generate(PROMPT, metadata=_traceparent(trace_id), max_tokens=4, temperature=-1.0)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    spans = _trace(receiver, trace_id, lambda ss: any(s.kind == SERVER for s in ss))
    (rpc,) = spans  # refused before the engine saw it: no engine spans
    assert rpc.parent_span_id == CALLER_SPAN
    assert rpc.attributes["rpc.grpc.status_code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert rpc.status_code == 0  # the caller's mistake: the span status stays unset


# ---- preemption ------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["swap", "recompute"])
def test_preempted_requests_show_their_preemptions(mode, receiver, tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    from observability_fixtures import ObservedServer, tiny_model, tracing_to
    from pagedserve.config import EngineConfig

    # 16 blocks of 4 tokens; four requests growing to 11 blocks each must take turns.
    config = EngineConfig(model=tiny_model(tmp_path / "tiny"), load_format="dummy", device="cpu",
                          block_size=4, num_kv_blocks=16, swap_space_gb=0.001,
                          preemption_mode=mode, max_num_seqs=8, seed=0)
    s = ObservedServer(config, tracing=tracing_to(receiver.endpoint))
    try:
        trace_ids = [f"{mode[:4].encode().hex()}{i:024x}" for i in range(4)]

        def one(i):
            return s.generate([10 + i] * 6, metadata=_traceparent(trace_ids[i]),
                              max_tokens=38, ignore_eos=True, temperature=0.0)

        with ThreadPoolExecutor(4) as pool:
            replies = list(pool.map(one, range(4)))
        stats = s.wait_idle()
    finally:
        s.close()  # flushes the spans
    assert sum(r.usage.preemptions for r in replies) == stats.preemptions_by_mode[mode] > 0
    for trace_id, reply in zip(trace_ids, replies):
        assert reply.usage.completion_tokens == 38
        spans = _trace(receiver, trace_id, lambda ss: any(x.name == "finish" for x in ss))
        request = [x for x in spans if x.name.startswith("text_completion")][0]
        k = reply.usage.preemptions
        assert request.attributes["pagedserve.preemptions"] == k
        preemptions = sorted((x for x in spans if x.name == "preemption"),
                             key=lambda x: x.start_ns)
        assert len(preemptions) == k
        for p in preemptions:
            assert p.parent_span_id == request.span_id and _inside(p, request)
            assert p.attributes["pagedserve.preemption.mode"] == mode
            children = sorted((x for x in spans if x.parent_span_id == p.span_id),
                              key=lambda x: x.start_ns)
            if mode == "swap":
                assert [c.name for c in children] == ["swap_out", "swap_in"]
                out, back = (c.attributes["pagedserve.swap.blocks"] for c in children)
                # Blocks whose contents are still cached on the GPU come back without a copy.
                assert out > 0 and 0 <= back <= out
                assert all(_inside(c, p) for c in children)
            else:
                assert children == []
                # Re-admitted: its history is prefilled again (marked as a recompute), or
                # was all still in the prefix cache and it decodes at once.
                (resumed,) = [x for x in spans if x.start_ns == p.end_ns
                              and x.name in ("prefill_chunk", "decode")]
                if resumed.name == "prefill_chunk":
                    assert resumed.attributes["pagedserve.prefill.recompute"] is True
        # Decoding stops while preempted.
        for d in (x for x in spans if x.name == "decode"):
            assert all(d.end_ns <= p.start_ns or d.start_ns >= p.end_ns for p in preemptions)

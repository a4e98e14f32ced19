"""Prometheus metrics: the engine collector and per-request recorder on their own, then a
real server's endpoint scraped over HTTP and parsed with the Prometheus text parser."""

from __future__ import annotations

import math
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from pagedserve.engine.stats import EngineStats
from pagedserve.observability.metrics import Metrics, RequestRecorder
from pagedserve.outputs import CompletionOutput, RequestMetrics, RequestOutput

STATS = EngineStats(
    num_running=3, num_waiting=5, num_swapped=1, gpu_kv_usage=0.75,
    cpu_kv_usage=0.125, prefix_cache_queries=400, prefix_cache_hits=96,
    preemptions_by_mode={"swap": 2, "recompute": 7}, blocks_swapped_out=12,
    blocks_swapped_in=9, prompt_tokens=1234, generation_tokens=999, num_steps=321,
)


def samples(text: str) -> dict:
    """{(sample name, sorted label items): value} of an exposition."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def scrape(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        assert r.status == 200
        return samples(r.read().decode())


def value(s: dict, name: str, **labels) -> float:
    return s[(name, tuple(sorted(labels.items())))]


# ---- in isolation ------------------------------------------------------------------------
def test_engine_gauges_and_counters_come_from_the_stats_snapshot():
    metrics = Metrics()
    before = samples(generate_latest(metrics.registry).decode())
    assert not any(name.startswith("pagedserve:num_requests") for name, _ in before)  # loading
    metrics.attach_engine(lambda: STATS)
    s = samples(generate_latest(metrics.registry).decode())
    assert value(s, "pagedserve:num_requests_running") == 3
    assert value(s, "pagedserve:num_requests_waiting") == 5
    assert value(s, "pagedserve:num_requests_swapped") == 1
    assert value(s, "pagedserve:kv_cache_usage_perc") == 0.75
    assert value(s, "pagedserve:swap_space_usage_perc") == 0.125
    assert value(s, "pagedserve:prefix_cache_queries_total") == 400
    assert value(s, "pagedserve:prefix_cache_hits_total") == 96
    assert value(s, "pagedserve:num_preemptions_total", mode="swap") == 2
    assert value(s, "pagedserve:num_preemptions_total", mode="recompute") == 7
    assert value(s, "pagedserve:swapped_blocks_total", direction="out") == 12
    assert value(s, "pagedserve:swapped_blocks_total", direction="in") == 9
    assert value(s, "pagedserve:prefill_computed_tokens_total") == 1234
    assert value(s, "pagedserve:engine_steps_total") == 321
    for reason in ("stop", "length", "abort"):  # present from the start, at 0
        assert value(s, "pagedserve:requests_finished_total", finish_reason=reason) == 0


def _out(request_id, tokens_per_sample, *, finished, reasons=None, prompt=7):
    m = RequestMetrics(arrival_time=10.0, first_scheduled_time=10.25, first_token_time=10.5,
                       finished_time=12.5 if finished else None, num_prompt_tokens=prompt)
    reasons = reasons or [None] * len(tokens_per_sample)
    outs = [CompletionOutput(index=i, text="", token_ids=list(range(n)), finish_reason=r)
            for i, (n, r) in enumerate(zip(tokens_per_sample, reasons))]
    return RequestOutput(request_id, None, list(range(prompt)), outs, finished, m)


def test_request_recorder_counts_tokens_as_they_appear_and_latencies_once():
    metrics = Metrics()
    a = RequestRecorder(metrics)
    for n in (1, 3, 4):  # cumulative outputs; a slow reader may skip some
        a.on_output(_out("a", [n], finished=False))
    a.on_output(_out("a", [5], finished=True, reasons=["length"]))
    b = RequestRecorder(metrics)  # two samples, one stopped early
    b.on_output(_out("b", [1, 1], finished=False, prompt=3))
    b.on_output(_out("b", [3, 9], finished=True, reasons=["stop", "length"], prompt=3))
    c = RequestRecorder(metrics)  # cancelled by its caller after two tokens
    c.on_output(_out("c", [2], finished=False, prompt=4))
    c.on_abandoned()
    c.on_abandoned()  # counted once
    s = samples(generate_latest(metrics.registry).decode())
    assert value(s, "pagedserve:prompt_tokens_total") == 7 + 3 + 4
    assert value(s, "pagedserve:generation_tokens_total") == 5 + 12 + 2
    assert value(s, "pagedserve:requests_finished_total", finish_reason="length") == 2
    assert value(s, "pagedserve:requests_finished_total", finish_reason="stop") == 0
    assert value(s, "pagedserve:requests_finished_total", finish_reason="abort") == 1
    # Queue 0.25 s and first token 0.5 s after arrival for all three; two finished.
    assert value(s, "pagedserve:request_queue_time_seconds_count") == 3
    assert value(s, "pagedserve:request_queue_time_seconds_sum") == 0.75
    assert value(s, "pagedserve:time_to_first_token_seconds_count") == 3
    assert value(s, "pagedserve:time_to_first_token_seconds_sum") == 1.5
    assert value(s, "pagedserve:time_to_first_token_seconds_bucket", le="0.5") == 3
    assert value(s, "pagedserve:time_to_first_token_seconds_bucket", le="0.25") == 0
    assert value(s, "pagedserve:e2e_request_latency_seconds_count") == 2
    assert value(s, "pagedserve:e2e_request_latency_seconds_sum") == 5.0
    # 2 s of decoding over 4 tokens after the first (a); over 8 (b's longest sample).
    assert value(s, "pagedserve:time_per_output_token_seconds_count") == 2
    assert value(s, "pagedserve:time_per_output_token_seconds_sum") == 0.5 + 0.25


def test_tenant_label_only_when_asked():
    for tenant_label in (False, True):
        metrics = Metrics(tenant_label=tenant_label)
        for tenant, n in (("alice", 3), ("bob", 2), (None, 1)):
            r = RequestRecorder(metrics, tenant)
            r.on_output(_out(tenant or "anon", [n], finished=True, reasons=["length"]))
        RequestRecorder(metrics, "bob").on_abandoned()
        s = samples(generate_latest(metrics.registry).decode())
        if not tenant_label:  # the tenant is ignored: no label, no per-tenant series
            assert value(s, "pagedserve:generation_tokens_total") == 6
            assert value(s, "pagedserve:requests_finished_total", finish_reason="abort") == 1
            assert not any("tenant" in dict(labels) for _, labels in s)
            continue
        assert [value(s, "pagedserve:generation_tokens_total", tenant=t)
                for t in ("alice", "bob", "anonymous")] == [3, 2, 1]
        assert value(s, "pagedserve:requests_finished_total", finish_reason="abort",
                     tenant="bob") == 1
        assert value(s, "pagedserve:requests_finished_total", finish_reason="stop",
                     tenant="alice") == 0  # present at 0 once the tenant is seen
        assert value(s, "pagedserve:e2e_request_latency_seconds_count", tenant="alice") == 1


def test_endpoint_serves_over_http_and_stops():
    metrics = Metrics()
    metrics.attach_engine(lambda: STATS)
    port = metrics.serve(0, "127.0.0.1")
    try:
        assert value(scrape(port), "pagedserve:num_requests_waiting") == 5
        with pytest.raises(RuntimeError, match="already started"):
            metrics.serve(0, "127.0.0.1")
        with pytest.raises(OSError):  # the port is taken: a clear failure at startup
            Metrics().serve(port, "127.0.0.1")
    finally:
        metrics.shutdown()
    with pytest.raises(OSError):
        scrape(port)
    with pytest.raises(ValueError, match="metrics_port must be in"):
        Metrics().serve(70000)


# ---- a real server ------------------------------------------------------------------------
PROMPTS = [
    # Longer than a 16-token block, so a second request finds its first block cached.
    "Paged attention stores the key and value cache in fixed-size blocks, so memory is "
    "allocated on demand and shared between sequences.",
    "A continuous batching scheduler admits new requests every iteration",
    "def fibonacci(n):",
]


@pytest.fixture(scope="module")
def served():
    from observability_fixtures import ObservedServer
    from pagedserve.config import EngineConfig

    s = ObservedServer(EngineConfig(device="cpu", num_kv_blocks=64, max_model_len=256,
                                    swap_space_gb=0.01, seed=0), metrics=True)
    yield s
    s.close()


def test_scraped_counters_match_the_work_done(served):
    tokenizer = served.llm_engine.tokenizer
    before = scrape(served.metrics_port)
    total_blocks = served.engine.engine_stats.num_total_gpu_blocks
    # A stream, scraped while it runs: the gauges show it.
    stream = served.stub.StreamGenerate(_request(PROMPTS[0], max_tokens=24), timeout=120)
    streamed = [next(stream), next(stream)]
    live = scrape(served.metrics_port)
    streamed += list(stream)
    assert value(live, "pagedserve:num_requests_running") == 1
    assert value(live, "pagedserve:num_requests_waiting") == 0
    prompt_len = len(tokenizer(PROMPTS[0])["input_ids"])
    usage = value(live, "pagedserve:kv_cache_usage_perc")
    assert math.ceil(prompt_len / 16) / total_blocks <= usage \
        <= math.ceil((prompt_len + 24) / 16) / total_blocks
    # Then three at once, one with two samples, and the first prompt again (cache hit).
    jobs = [(PROMPTS[1], 8, 1), (PROMPTS[2], 5, 2), (PROMPTS[0], 3, 1)]
    with ThreadPoolExecutor(3) as pool:
        replies = list(pool.map(lambda j: served.stub.Generate(
            _request(j[0], max_tokens=j[1], n=j[2]), timeout=120), jobs))
    served.wait_idle()
    after = scrape(served.metrics_port)

    def delta(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    prompt_lens = [prompt_len] + [len(tokenizer(p)["input_ids"]) for p, _, _ in jobs]
    usages = [streamed[-1].usage] + [r.usage for r in replies]
    assert [u.prompt_tokens for u in usages] == prompt_lens
    assert delta("pagedserve:prompt_tokens_total") == sum(prompt_lens)
    assert delta("pagedserve:generation_tokens_total") == 24 + 8 + 5 * 2 + 3
    assert delta("pagedserve:requests_finished_total", finish_reason="length") == 4
    assert delta("pagedserve:requests_finished_total", finish_reason="stop") == 0
    assert delta("pagedserve:requests_finished_total", finish_reason="abort") == 0
    cached = sum(u.cached_prompt_tokens for u in usages)
    assert usages[-1].cached_prompt_tokens > 0 and cached == usages[-1].cached_prompt_tokens
    # Each request's prompt is looked up once (the second sample shares the first's).
    assert delta("pagedserve:prefix_cache_queries_total") == sum(prompt_lens)
    assert delta("pagedserve:prefix_cache_hits_total") == cached
    assert delta("pagedserve:prefill_computed_tokens_total") == sum(prompt_lens) - cached
    for mode in ("swap", "recompute"):
        assert delta("pagedserve:num_preemptions_total", mode=mode) == 0
    # The histograms saw each request once; their sums are the usage's phase times.
    queue = sum(u.queue_time_ns for u in usages) / 1e9
    ttft = sum(u.queue_time_ns + u.prefill_time_ns for u in usages) / 1e9
    e2e = sum(u.queue_time_ns + u.prefill_time_ns + u.decode_time_ns for u in usages) / 1e9
    for name, expected in (("request_queue_time_seconds", queue),
                           ("time_to_first_token_seconds", ttft),
                           ("e2e_request_latency_seconds", e2e)):
        assert delta(f"pagedserve:{name}_count") == 4
        assert delta(f"pagedserve:{name}_sum") == pytest.approx(expected, abs=1e-5)
    assert delta("pagedserve:time_per_output_token_seconds_count") == 4
    # Idle again.
    assert value(after, "pagedserve:num_requests_running") == 0
    assert value(after, "pagedserve:num_requests_waiting") == 0
    assert value(after, "pagedserve:kv_cache_usage_perc") == 0.0


def test_a_request_past_its_deadline_counts_as_aborted(served):
    before = scrape(served.metrics_port)
    with pytest.raises(grpc.RpcError) as err:
        served.stub.Generate(_request(PROMPTS[2], max_tokens=200), timeout=1.0)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    served.wait_idle()
    after = scrape(served.metrics_port)
    assert value(after, "pagedserve:requests_finished_total", finish_reason="abort") - \
        value(before, "pagedserve:requests_finished_total", finish_reason="abort") == 1
    assert value(after, "pagedserve:e2e_request_latency_seconds_count") == \
        value(before, "pagedserve:e2e_request_latency_seconds_count")  # only finished ones


def test_swap_preemptions_and_blocks_are_counted(tmp_path):
    from observability_fixtures import ObservedServer, tiny_model
    from pagedserve.config import EngineConfig

    config = EngineConfig(model=tiny_model(tmp_path / "tiny"), load_format="dummy", device="cpu",
                          block_size=4, num_kv_blocks=16, swap_space_gb=0.001,
                          preemption_mode="swap", max_num_seqs=8, seed=0)
    s = ObservedServer(config, metrics=True)
    try:
        before = scrape(s.metrics_port)
        with ThreadPoolExecutor(4) as pool:
            replies = list(pool.map(lambda i: s.generate(
                [20 + i] * 6, max_tokens=38, ignore_eos=True, temperature=0.0), range(4)))
        s.wait_idle()
        after = scrape(s.metrics_port)
    finally:
        s.close()

    def delta(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    preemptions = sum(r.usage.preemptions for r in replies)
    assert preemptions > 0
    assert delta("pagedserve:num_preemptions_total", mode="swap") == preemptions
    assert delta("pagedserve:num_preemptions_total", mode="recompute") == 0
    out, back = (delta("pagedserve:swapped_blocks_total", direction=d) for d in ("out", "in"))
    assert out > 0 and 0 < back <= out
    assert delta("pagedserve:generation_tokens_total") == 4 * 38
    assert delta("pagedserve:prompt_tokens_total") == 4 * 6
    assert value(after, "pagedserve:num_requests_swapped") == 0
    assert value(after, "pagedserve:swap_space_usage_perc") == 0.0


def _request(prompt: str, *, max_tokens: int, n: int = 1):
    from pagedserve.v1 import generate_pb2 as pb

    return pb.GenerateRequest(prompt=prompt, sampling=pb.SamplingParams(
        max_tokens=max_tokens, n=n, temperature=0.0, ignore_eos=True))

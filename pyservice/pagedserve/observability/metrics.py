"""Prometheus metrics on pagedserve's own registry, served over HTTP (default :9464).

Two sources, so the engine's step loop does no metrics work at all:
- engine state (queues, KV usage, prefix cache, preemptions, swaps) is read on scrape
  from the engine's latest `stats()` snapshot by `EngineCollector`;
- per-request counters and latency histograms are updated on the event loop as each
  request's outputs arrive (`RequestRecorder`).

Names carry the `pagedserve:` prefix; the README lists them with meanings.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from pagedserve.engine.stats import EngineStats

logger = logging.getLogger(__name__)

DEFAULT_PORT = 9464
# Seconds. Queue time and end-to-end latency span milliseconds (idle CPU) to minutes
# (a long generation behind a full queue); a token takes milliseconds to a second.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0,
                   40.0, 80.0, 160.0, 320.0, 640.0)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3,
                 0.5, 0.75, 1.0, 2.5, 5.0)


class EngineCollector:
    """Gauges and counters read from the engine's stats on every scrape.

    `stats` returns LLMEngine.stats() (an EngineStats) as of the engine's last step (or
    None while the model loads); it is called on the HTTP server's thread, so it must
    only hand over a snapshot, never reach into the engine.
    """

    def __init__(self, stats: Callable[[], EngineStats | None] | None = None) -> None:
        self.stats = stats

    def describe(self):
        return []  # names are dynamic in collect(); nothing to check at registration

    def collect(self):
        stats = self.stats() if self.stats is not None else None
        if stats is None:
            return
        for kind, name, doc, attribute in _ENGINE_METRICS:
            yield kind(f"pagedserve:{name}", doc, value=getattr(stats, attribute))
        preemptions = CounterMetricFamily(
            "pagedserve:num_preemptions", "Requests preempted, by mode.", labels=["mode"])
        for mode, n in sorted(stats.preemptions_by_mode.items()):
            preemptions.add_metric([mode], n)
        yield preemptions
        swapped = CounterMetricFamily(
            "pagedserve:swapped_blocks", "KV-cache blocks copied between the GPU pool and "
            "the CPU swap pool.", labels=["direction"])
        swapped.add_metric(["out"], stats.blocks_swapped_out)
        swapped.add_metric(["in"], stats.blocks_swapped_in)
        yield swapped


# The engine's gauges and plain counters: (kind, name, help, EngineStats attribute).
_ENGINE_METRICS = (
    (GaugeMetricFamily, "num_requests_running",
     "Requests whose KV cache is on the GPU (prefilling or decoding).", "num_running"),
    (GaugeMetricFamily, "num_requests_waiting",
     "Requests queued for admission, including those preempted by recompute.", "num_waiting"),
    (GaugeMetricFamily, "num_requests_swapped",
     "Requests preempted to the CPU swap pool.", "num_swapped"),
    (GaugeMetricFamily, "kv_cache_usage_perc",
     "Fraction of GPU KV-cache blocks in use (0 to 1).", "gpu_kv_usage"),
    (GaugeMetricFamily, "swap_space_usage_perc",
     "Fraction of CPU swap-pool blocks in use (0 to 1).", "cpu_kv_usage"),
    (CounterMetricFamily, "prefix_cache_queries",
     "Prompt tokens looked up in the prefix cache.", "prefix_cache_queries"),
    (CounterMetricFamily, "prefix_cache_hits",
     "Prompt tokens found computed in the prefix cache.", "prefix_cache_hits"),
    (CounterMetricFamily, "engine_steps",
     "Engine iterations (schedule, forward, sample) run.", "num_steps"),
    (CounterMetricFamily, "prefill_computed_tokens", "Tokens run through prefill forwards: "
     "prompts less prefix-cache hits, plus recomputed histories.", "prompt_tokens"),
)


class Metrics:
    """pagedserve's registry: the engine collector plus per-request metrics.

    With `tenant_label` the per-request metrics carry a `tenant` label (the caller's
    tenant, "anonymous" without authentication). Off by default: tenant names can be
    many, and a shared Prometheus is not always meant to see them.
    """

    ANONYMOUS = "anonymous"

    def __init__(self, tenant_label: bool = False) -> None:
        self.registry = CollectorRegistry()
        self.engine = EngineCollector()
        self.registry.register(self.engine)
        self.tenant_label = tenant_label
        r = self.registry
        tenant = ["tenant"] if tenant_label else []
        self.prompt_tokens = Counter(
            "pagedserve:prompt_tokens", "Prompt tokens of requests, counted when their "
            "first token is out.", tenant, registry=r)
        self.generation_tokens = Counter(
            "pagedserve:generation_tokens", "Tokens generated, all samples.", tenant,
            registry=r)
        self.requests_finished = Counter(
            "pagedserve:requests_finished", "Requests ended, by reason: stop, length, or "
            "abort (cancelled, deadline, shutdown).", ["finish_reason", *tenant], registry=r)
        if not tenant_label:
            for reason in ("stop", "length", "abort"):
                self.requests_finished.labels(reason)  # present at 0: rate() works from start
        self.time_to_first_token = Histogram(
            "pagedserve:time_to_first_token_seconds", "Arrival to first generated token.",
            tenant, buckets=LATENCY_BUCKETS, registry=r)
        self.time_per_output_token = Histogram(
            "pagedserve:time_per_output_token_seconds", "Decode time per token after the "
            "first: (finish - first token) / (tokens of the longest sample - 1).",
            tenant, buckets=TOKEN_BUCKETS, registry=r)
        self.e2e_latency = Histogram(
            "pagedserve:e2e_request_latency_seconds", "Arrival to finish.",
            tenant, buckets=LATENCY_BUCKETS, registry=r)
        self.queue_time = Histogram(
            "pagedserve:request_queue_time_seconds", "Arrival to first scheduling.",
            tenant, buckets=LATENCY_BUCKETS, registry=r)
        self.unparseable_requests = Counter(
            "pagedserve:unparseable_requests", "Requests whose bytes did not parse as the "
            "method's message (answered INVALID_ARGUMENT, not logged).", registry=r)
        self._http = None

    def for_tenant(self, tenant: str | None) -> RequestSeries:
        """The per-request metrics one request records into: labelled with its tenant
        when the tenant label is on, the plain metrics otherwise."""
        if not self.tenant_label:
            return RequestSeries(self, ())
        labels = (tenant or self.ANONYMOUS,)
        for reason in ("stop", "length", "abort"):
            self.requests_finished.labels(reason, *labels)
        return RequestSeries(self, labels)

    def attach_engine(self, stats: Callable[[], EngineStats | None]) -> None:
        self.engine.stats = stats

    def serve(self, port: int = DEFAULT_PORT, host: str = "0.0.0.0") -> int:
        """Serve the registry over HTTP on a daemon thread; returns the bound port (0
        picks a free one)."""
        if self._http is not None:
            raise RuntimeError("metrics endpoint already started")
        if not 0 <= port <= 65535:
            raise ValueError(f"metrics_port must be in [0, 65535], got {port}")
        self._http, _ = start_http_server(port, addr=host, registry=self.registry)
        bound = self._http.server_port
        logger.info("Prometheus metrics on http://%s:%d/metrics", host, bound)
        return bound

    def shutdown(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None


class RequestSeries:
    """The per-request metrics with one request's label values bound (its tenant, or
    none)."""

    def __init__(self, metrics: Metrics, labels: tuple[str, ...]) -> None:
        self._labels = labels
        bind = (lambda m: m.labels(*labels)) if labels else (lambda m: m)
        self.prompt_tokens = bind(metrics.prompt_tokens)
        self.generation_tokens = bind(metrics.generation_tokens)
        self.time_to_first_token = bind(metrics.time_to_first_token)
        self.time_per_output_token = bind(metrics.time_per_output_token)
        self.e2e_latency = bind(metrics.e2e_latency)
        self.queue_time = bind(metrics.queue_time)
        self._finished = metrics.requests_finished

    def finished(self, reason: str):
        return self._finished.labels(reason, *self._labels)


class RequestRecorder:
    """Per-request bookkeeping as its outputs go by (of any RequestOutputKind: counts
    come from each completion's cumulative `num_tokens`): token counters move as tokens
    appear, histograms and the finish counter once at the end."""

    def __init__(self, metrics: Metrics, tenant: str | None = None) -> None:
        self.metrics = metrics.for_tenant(tenant)
        self.num_generated = 0
        self.started = False
        self.done = False

    def on_output(self, output) -> None:
        m = self.metrics
        if not self.started:
            self.started = True
            m.prompt_tokens.inc(len(output.prompt_token_ids))
            t = output.metrics
            if t.first_scheduled_time is not None:
                m.queue_time.observe(max(0.0, t.first_scheduled_time - t.arrival_time))
            if t.first_token_time is not None:
                m.time_to_first_token.observe(max(0.0, t.first_token_time - t.arrival_time))
        generated = sum(c.num_tokens for c in output.outputs)
        if generated > self.num_generated:
            m.generation_tokens.inc(generated - self.num_generated)
            self.num_generated = generated
        if output.finished:
            self._finish(output)

    def on_abandoned(self) -> None:
        """The RPC ended before the request finished (cancel, deadline, error)."""
        if not self.done:
            self.done = True
            self.metrics.finished("abort").inc()

    def _finish(self, output) -> None:
        self.done = True
        m, t = self.metrics, output.metrics
        reasons = {c.finish_reason for c in output.outputs}
        reason = "abort" if "abort" in reasons else "length" if "length" in reasons else "stop"
        m.finished(reason).inc()
        if t.finished_time is None:
            return
        m.e2e_latency.observe(max(0.0, t.finished_time - t.arrival_time))
        longest = max((c.num_tokens for c in output.outputs), default=0)
        if t.first_token_time is not None and longest > 1:
            m.time_per_output_token.observe(
                max(0.0, t.finished_time - t.first_token_time) / (longest - 1))

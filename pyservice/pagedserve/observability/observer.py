"""The server's one handle on observability: tracing (optional), metrics (optional), and
the per-request hook the servicer puts around each request's output stream."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable

from pagedserve.engine.stats import EngineStats
from pagedserve.observability.metrics import Metrics, RequestRecorder
from pagedserve.observability.spans import emit_request_spans
from pagedserve.observability.tracing import Tracing, current_rpc_span
from pagedserve.server.tenancy import current_tenant

logger = logging.getLogger(__name__)


class Observability:
    """Tracing and metrics for one server process; either may be None (off)."""

    def __init__(self, tracing: Tracing | None = None, metrics: Metrics | None = None) -> None:
        self.tracing = tracing
        self.metrics = metrics

    @classmethod
    def from_settings(cls, *, disable_tracing: bool = False,
                      metrics_port: int | None = 9464, metrics_host: str = "0.0.0.0",
                      metrics_tenant_label: bool = False) -> Observability:
        """Tracing from the OTEL_* environment unless disabled; the metrics endpoint
        started on `metrics_host`:`metrics_port` (None: no metrics). The endpoint is
        started first: a port in use fails before tracing starts its exporter."""
        metrics = None
        if metrics_port is not None:
            metrics = Metrics(tenant_label=metrics_tenant_label)
            metrics.serve(metrics_port, metrics_host)
        try:
            tracing = Tracing.from_env(disabled=disable_tracing)
        except BaseException:
            if metrics is not None:
                metrics.shutdown()
            raise
        return cls(tracing, metrics)

    def interceptors(self) -> list:
        """Server interceptors to put first in the chain (the RPC span)."""
        return [self.tracing.interceptor()] if self.tracing is not None else []

    def attach_engine(self, stats: Callable[[], EngineStats | None]) -> None:
        """`stats`: the engine's latest stats snapshot, safe to call from any thread."""
        if self.metrics is not None:
            self.metrics.attach_engine(stats)

    async def observe(self, stream: AsyncIterator, params, model: str) -> AsyncIterator:
        """Yields `stream`'s RequestOutputs unchanged, recording metrics as they pass and
        the engine spans once the request is over (finished or abandoned)."""
        if self.tracing is None and self.metrics is None:
            async for output in stream:
                yield output
            return
        # Read now, in the RPC's task: cleanup may run in another one (generator close).
        parent = current_rpc_span()
        recorder = RequestRecorder(self.metrics, current_tenant.get()) \
            if self.metrics is not None else None
        last, cancelled = None, False
        try:
            async for output in stream:
                last = output
                if recorder is not None:
                    recorder.on_output(output)
                if output.finished:
                    self._trace(output, params, model, parent)
                yield output
        except (asyncio.CancelledError, GeneratorExit):
            cancelled = True
            raise
        finally:
            # Abandoned: cancelled by the caller, or failed after it started. A request
            # refused before it started (bad input, full queue) is not counted.
            if (last is None and cancelled) or (last is not None and not last.finished):
                if recorder is not None:
                    recorder.on_abandoned()
                if last is not None:
                    self._trace(last, params, model, parent, end_time=time.monotonic())

    def _trace(self, output, params, model: str, parent, end_time: float | None = None) -> None:
        if self.tracing is None or (parent is not None and not parent.is_recording()):
            return  # off, or the caller's trace is not sampled
        try:
            emit_request_spans(self.tracing.tracer, output, params, model, parent, end_time)
        except Exception:  # noqa: BLE001 - a tracing bug must not fail the request
            logger.exception("could not record the engine spans of %s", output.request_id)

    def count_unparseable(self) -> None:
        """A request whose bytes did not parse (counted, never logged)."""
        if self.metrics is not None:
            self.metrics.unparseable_requests.inc()

    def shutdown(self) -> None:
        """Flush queued spans and stop the metrics endpoint."""
        if self.tracing is not None:
            self.tracing.shutdown()
        if self.metrics is not None:
            self.metrics.shutdown()

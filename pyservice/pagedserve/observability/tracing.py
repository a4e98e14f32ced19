"""OpenTelemetry tracing, set up only when configured.

Configuration is the standard OTEL_* environment (read when the server starts, never
at import):

  OTEL_SDK_DISABLED=true, or `--disable-tracing` / PAGEDSERVE_DISABLE_TRACING: off.
  OTEL_TRACES_EXPORTER      otlp | console | none (a comma list). Unset: `otlp` when an
                            OTLP endpoint is set, otherwise no exporter and tracing off.
  OTEL_EXPORTER_OTLP_ENDPOINT, OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, ..._HEADERS,
  ..._CERTIFICATE, ..._COMPRESSION, ..._TIMEOUT: read by the OTLP exporter itself.
  OTEL_EXPORTER_OTLP_(TRACES_)PROTOCOL  grpc (default, as the Python SDK) | http/protobuf
  OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES: the resource (service.name defaults to
                            "pagedserve").
  OTEL_TRACES_SAMPLER, OTEL_TRACES_SAMPLER_ARG: the sampler (parentbased_always_on).
  OTEL_BSP_*: the batch span processor's queue and delays.

The provider is private to pagedserve (not installed as the global one), so embedding
applications keep theirs. The RPC span continues the caller's W3C trace context from
the call's metadata (`traceparent`, `tracestate`).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import os
from collections.abc import Mapping

import grpc
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace import sampling
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SpanExporter,
)
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

logger = logging.getLogger(__name__)

_TRUE = ("1", "true", "yes", "on")
_PROTOCOLS = ("grpc", "http/protobuf")
_SAMPLERS = {
    "always_on": lambda arg: sampling.ALWAYS_ON,
    "always_off": lambda arg: sampling.ALWAYS_OFF,
    "traceidratio": lambda arg: sampling.TraceIdRatioBased(arg),
    "parentbased_always_on": lambda arg: sampling.ParentBased(sampling.ALWAYS_ON),
    "parentbased_always_off": lambda arg: sampling.ParentBased(sampling.ALWAYS_OFF),
    "parentbased_traceidratio": lambda arg: sampling.ParentBased(sampling.TraceIdRatioBased(arg)),
}
# Server-side status codes that mean the server failed (OpenTelemetry RPC conventions);
# the others are the caller's doing and leave the span status unset.
_SERVER_ERRORS = frozenset({
    grpc.StatusCode.UNKNOWN, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNIMPLEMENTED,
    grpc.StatusCode.INTERNAL, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DATA_LOSS})

# The server span of the RPC being handled; the engine spans are built under it.
_rpc_span: contextvars.ContextVar[trace.Span | None] = contextvars.ContextVar(
    "pagedserve_rpc_span", default=None)


def _env(env: Mapping[str, str], *names: str, default: str = "") -> str:
    """The first of `names` set to a non-empty value (signal-specific names first)."""
    for name in names:
        value = env.get(name, "").strip()
        if value:
            return value
    return default


def make_exporters(env: Mapping[str, str]) -> list[SpanExporter]:
    """The span exporters the environment asks for; none unless one is configured."""
    names = _env(env, "OTEL_TRACES_EXPORTER")
    if not names:
        endpoint = _env(env, "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
        names = "otlp" if endpoint else "none"
    exporters: list[SpanExporter] = []
    for name in (n.strip().lower() for n in names.split(",")):
        if name == "none":
            continue
        if name == "console":
            exporters.append(ConsoleSpanExporter())
        elif name == "otlp":
            exporters.append(_otlp_exporter(env))
        else:
            raise ValueError(f"OTEL_TRACES_EXPORTER: unknown exporter {name!r} "
                             f"(use otlp, console or none)")
    return exporters


def _otlp_exporter(env: Mapping[str, str]) -> SpanExporter:
    protocol = _env(env, "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL",
                    default="grpc")
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    elif protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    else:
        raise ValueError(f"OTEL_EXPORTER_OTLP_PROTOCOL must be one of {', '.join(_PROTOCOLS)}, "
                         f"got {protocol!r}")
    # Endpoint, headers, TLS, compression and timeout come from the OTEL_* variables.
    return OTLPSpanExporter()


def make_sampler(env: Mapping[str, str]) -> sampling.Sampler:
    name = _env(env, "OTEL_TRACES_SAMPLER", default="parentbased_always_on").lower()
    if name not in _SAMPLERS:
        raise ValueError(f"OTEL_TRACES_SAMPLER must be one of {', '.join(_SAMPLERS)}, "
                         f"got {name!r}")
    arg = 1.0
    if name.endswith("traceidratio"):
        raw = _env(env, "OTEL_TRACES_SAMPLER_ARG", default="1.0")
        try:
            arg = float(raw)
        except ValueError:
            raise ValueError(f"OTEL_TRACES_SAMPLER_ARG must be a ratio in [0, 1], "
                             f"got {raw!r}") from None
        if not 0.0 <= arg <= 1.0:
            raise ValueError(f"OTEL_TRACES_SAMPLER_ARG must be a ratio in [0, 1], got {arg}")
    return _SAMPLERS[name](arg)


def make_resource() -> Resource:
    """OTEL_RESOURCE_ATTRIBUTES and OTEL_SERVICE_NAME, service.name defaulting to pagedserve."""
    resource = Resource.create({"service.version": _version()})
    if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
        resource = resource.merge(Resource({"service.name": "pagedserve"}))
    return resource


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("pagedserve")
    except PackageNotFoundError:
        return "unknown"


class Tracing:
    """A tracer provider with its exporters; `tracer` makes pagedserve's spans."""

    def __init__(self, provider: TracerProvider) -> None:
        self.provider = provider
        self.tracer = provider.get_tracer("pagedserve", _version())

    @classmethod
    def from_env(cls, disabled: bool = False,
                 env: Mapping[str, str] | None = None) -> Tracing | None:
        """Tracing as the environment configures it, or None when it is off: disabled,
        OTEL_SDK_DISABLED, or no exporter configured (spans nobody receives are not made).
        Bad values raise ValueError naming the variable."""
        env = os.environ if env is None else env
        if disabled or _env(env, "OTEL_SDK_DISABLED").lower() in _TRUE \
                or _env(env, "PAGEDSERVE_DISABLE_TRACING").lower() in _TRUE:
            return None
        sampler = make_sampler(env)
        exporters = make_exporters(env)
        if not exporters:
            return None
        provider = TracerProvider(sampler=sampler, resource=make_resource())
        for exporter in exporters:
            provider.add_span_processor(BatchSpanProcessor(exporter))
        logger.info("tracing on: %s", ", ".join(type(e).__module__ for e in exporters))
        return cls(provider)

    def interceptor(self) -> TracingInterceptor:
        return TracingInterceptor(self.tracer)

    def force_flush(self, timeout_s: float = 10.0) -> bool:
        return self.provider.force_flush(int(timeout_s * 1000))

    def shutdown(self) -> None:
        """Export what is queued, then stop the exporters."""
        self.provider.shutdown()


def current_rpc_span() -> trace.Span | None:
    """The server span of the RPC being handled (None outside one, or without tracing)."""
    return _rpc_span.get()


class _MetadataGetter:
    """Reads W3C trace headers from gRPC invocation metadata ((key, value) pairs)."""

    def get(self, carrier: Mapping[str, str], key: str) -> list[str] | None:
        value = carrier.get(key)
        return None if value is None else [value]

    def keys(self, carrier: Mapping[str, str]) -> list[str]:
        return list(carrier)


_PROPAGATOR = TraceContextTextMapPropagator()
_GETTER = _MetadataGetter()


def extract_context(metadata) -> trace.Context:
    """The caller's trace context from `traceparent` / `tracestate` metadata (an empty
    context when absent or malformed: the RPC span then starts a new trace)."""
    carrier = {}
    for key, value in metadata or ():
        if key in ("traceparent", "tracestate"):
            carrier[key] = value.decode("latin-1") if isinstance(value, bytes) else value
    return _PROPAGATOR.extract(carrier, getter=_GETTER)


class TracingInterceptor(grpc.aio.ServerInterceptor):
    """Opens a SERVER span around each pagedserve RPC, child of the caller's span.

    Put it first in the interceptor list so the span covers the error mapping and
    records the final status code. Health checks and reflection are not traced.
    """

    PREFIX = "/pagedserve."

    def __init__(self, tracer: trace.Tracer) -> None:
        self.tracer = tracer

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or not details.method.startswith(self.PREFIX):
            return handler
        service, _, method = details.method[1:].partition("/")
        kwargs = dict(request_deserializer=handler.request_deserializer,
                      response_serializer=handler.response_serializer)

        @contextlib.contextmanager
        def traced(context):
            span = self.tracer.start_span(
                f"{service}/{method}", context=extract_context(details.invocation_metadata),
                kind=SpanKind.SERVER,
                attributes={"rpc.system": "grpc", "rpc.service": service, "rpc.method": method})
            _set_peer(span, context.peer())
            _rpc_span.set(span)  # the RPC runs in its own task: no reset needed
            error = None
            try:
                yield
            except BaseException as exc:
                error = exc
                raise
            finally:
                _end(span, context, error)

        if handler.unary_unary is not None:
            behavior = handler.unary_unary

            async def unary(request, context):
                with traced(context):
                    return await behavior(request, context)

            return grpc.unary_unary_rpc_method_handler(unary, **kwargs)
        if handler.unary_stream is not None:
            stream_behavior = handler.unary_stream

            async def unary_stream(request, context):
                with traced(context):
                    async for message in stream_behavior(request, context):
                        yield message

            return grpc.unary_stream_rpc_method_handler(unary_stream, **kwargs)
        return handler


def _set_peer(span: trace.Span, peer: str) -> None:
    # "ipv4:127.0.0.1:5000", "ipv6:[::1]:5000", "unix:/path"
    kind, _, rest = peer.partition(":")
    if kind in ("ipv4", "ipv6"):
        address, _, port = rest.rpartition(":")
        span.set_attribute("network.peer.address", address.strip("[]"))
        if port.isdigit():
            span.set_attribute("network.peer.port", int(port))


def _end(span: trace.Span, context, exc: BaseException | None) -> None:
    code = context.code()
    if isinstance(exc, (asyncio.CancelledError, GeneratorExit)):
        code = grpc.StatusCode.CANCELLED  # the caller went away (cancel or deadline)
    elif code is None:
        code = grpc.StatusCode.UNKNOWN if isinstance(exc, Exception) else grpc.StatusCode.OK
    elif isinstance(code, int):
        code = next((c for c in grpc.StatusCode if c.value[0] == code), grpc.StatusCode.UNKNOWN)
    # AbortError only carries the status set on the context; anything else is a bug.
    if isinstance(exc, Exception) and not isinstance(exc, grpc.aio.AbortError):
        span.record_exception(exc)
    span.set_attribute("rpc.grpc.status_code", code.value[0])
    if code in _SERVER_ERRORS:
        span.set_status(Status(StatusCode.ERROR, context.details() or code.name))
    span.end()

"""Server interceptors: exceptions -> status codes, undecodable requests ->
INVALID_ARGUMENT, and bearer-token authentication that names the caller's tenant."""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable, Mapping

import grpc

from pagedserve.errors import InvalidRequestError
from pagedserve.server.async_engine import (
    DuplicateRequestError,
    EngineDeadError,
    EngineNotReadyError,
    QueueFullError,
    RequestAbortedError,
    ShuttingDownError,
)
from pagedserve.server.tenancy import current_tenant

logger = logging.getLogger(__name__)

# Most specific first. Only InvalidRequestError is the client's error: any other
# exception (a ValueError of a bug included) is INTERNAL.
_STATUS = (
    (DuplicateRequestError, grpc.StatusCode.ALREADY_EXISTS),
    (InvalidRequestError, grpc.StatusCode.INVALID_ARGUMENT),
    (QueueFullError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (EngineNotReadyError, grpc.StatusCode.UNAVAILABLE),
    (ShuttingDownError, grpc.StatusCode.UNAVAILABLE),
    (RequestAbortedError, grpc.StatusCode.UNAVAILABLE),
    (EngineDeadError, grpc.StatusCode.INTERNAL),
)


def status_for(exc: Exception) -> tuple[grpc.StatusCode, str]:
    """The status code and client-facing message for an exception raised by a handler."""
    for kind, code in _STATUS:
        if isinstance(exc, kind):
            return code, exc.field_message() if isinstance(exc, InvalidRequestError) else str(exc)
    # A bug: the client gets a short message, the log gets the stack trace.
    logger.exception("unhandled error in RPC handler")
    return grpc.StatusCode.INTERNAL, "internal server error"


class _Unparseable:
    """What a tolerant deserializer returns for bytes that are not the message: the
    handler then answers INVALID_ARGUMENT instead of gRPC's UNKNOWN and traceback."""

    def __init__(self, message_name: str) -> None:
        self.message_name = message_name


def _tolerant(deserializer: Callable[[bytes], object] | None) -> Callable[[bytes], object] | None:
    if deserializer is None:
        return None
    message_class = getattr(deserializer, "__self__", None)  # e.g. GenerateRequest.FromString
    name = getattr(getattr(message_class, "DESCRIPTOR", None), "name", "request")

    def parse(data: bytes) -> object:
        try:
            return deserializer(data)
        except Exception:  # noqa: BLE001 - DecodeError, or whatever a parser raises on junk
            return _Unparseable(name)
    return parse


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Maps exceptions escaping a pagedserve handler to gRPC status codes (see _STATUS),
    and request bytes that do not parse to INVALID_ARGUMENT (counted by `on_unparseable`,
    never logged: any caller can send them at any rate).

    Health and reflection come from grpcio and keep their own error handling.
    """

    PREFIX = "/pagedserve."

    def __init__(self, on_unparseable: Callable[[], None] | None = None) -> None:
        self._on_unparseable = on_unparseable

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or not details.method.startswith(self.PREFIX):
            return handler
        kwargs = dict(request_deserializer=_tolerant(handler.request_deserializer),
                      response_serializer=handler.response_serializer)
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                _wrap_unary(handler.unary_unary, self._unparseable), **kwargs)
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                _wrap_stream(handler.unary_stream, self._unparseable), **kwargs)
        return handler

    async def _unparseable(self, request: _Unparseable, context) -> None:
        if self._on_unparseable is not None:
            self._on_unparseable()
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                            f"request is not a valid {request.message_name}")


def _wrap_unary(behavior: Callable[..., Awaitable], unparseable) -> Callable[..., Awaitable]:
    async def wrapped(request, context):
        if isinstance(request, _Unparseable):
            await unparseable(request, context)
        try:
            return await behavior(request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:  # noqa: BLE001 - every error becomes a status
            await context.abort(*status_for(exc))
    return wrapped


def _wrap_stream(behavior: Callable, unparseable):
    async def wrapped(request, context):
        if isinstance(request, _Unparseable):
            await unparseable(request, context)
        try:
            async for message in behavior(request, context):
                yield message
        except grpc.aio.AbortError:
            raise
        except Exception as exc:  # noqa: BLE001
            await context.abort(*status_for(exc))
    return wrapped


class BearerTokenAuthInterceptor(grpc.aio.ServerInterceptor):
    """Requires `authorization: Bearer <token>` on every call except health checks,
    which stay open so probes need no secret. The token names the caller's tenant,
    which the handler finds in `current_tenant` (it salts the prefix cache)."""

    OPEN_PREFIXES = ("/grpc.health.v1.Health/",)

    def __init__(self, tokens: Mapping[str, str] | str) -> None:
        if isinstance(tokens, str):
            from pagedserve.server.config import DEFAULT_TENANT

            tokens = {tokens: DEFAULT_TENANT}
        if not tokens or not all(tokens) or not all(tokens.values()):
            raise ValueError("auth tokens and their tenants must not be empty")
        self._expected = [(f"Bearer {token}".encode(), tenant) for token, tenant in tokens.items()]

    def tenant_of(self, details) -> str | None:
        """The tenant whose token the call presents; None when it presents none we know.
        Every token is compared, in constant time each, so timing tells nothing about
        which one (or how much of one) matched."""
        for key, value in details.invocation_metadata or ():
            if key == "authorization":
                got = value.encode() if isinstance(value, str) else value
                found = None
                for expected, tenant in self._expected:
                    if hmac.compare_digest(got, expected):
                        found = tenant
                return found
        return None

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or details.method.startswith(self.OPEN_PREFIXES):
            return handler
        tenant = self.tenant_of(details)
        if tenant is None:
            return _deny(handler)
        return _as_tenant(handler, tenant)


def _as_tenant(handler: grpc.RpcMethodHandler, tenant: str) -> grpc.RpcMethodHandler:
    """`handler` with current_tenant set to `tenant` inside the RPC. The behavior runs in
    the RPC's own task (its own context copy), so setting the variable there reaches the
    servicer and never another call; interceptors themselves run outside that task."""
    kwargs = dict(request_deserializer=handler.request_deserializer,
                  response_serializer=handler.response_serializer)
    if handler.unary_unary is not None:
        behavior = handler.unary_unary

        async def unary(request, context):
            current_tenant.set(tenant)
            return await behavior(request, context)
        return grpc.unary_unary_rpc_method_handler(unary, **kwargs)
    if handler.unary_stream is not None:
        stream_behavior = handler.unary_stream

        async def stream(request, context):
            current_tenant.set(tenant)
            async for message in stream_behavior(request, context):
                yield message
        return grpc.unary_stream_rpc_method_handler(stream, **kwargs)
    return handler  # client-streaming kinds (reflection) need no tenant


def _ignore_request(data: bytes) -> None:
    return None


def _deny(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """UNAUTHENTICATED without reading the request: a caller without a token gets that
    answer whatever bytes it sends, and its bytes are never parsed."""
    code, message = grpc.StatusCode.UNAUTHENTICATED, "missing or invalid bearer token"

    async def unary(request, context):
        await context.abort(code, message)

    async def stream(request, context):
        await context.abort(code, message)
        yield  # pragma: no cover - makes this an async generator

    kwargs = dict(request_deserializer=_ignore_request,
                  response_serializer=handler.response_serializer)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(stream, **kwargs)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(unary, **kwargs)
    if handler.stream_stream is not None:
        return grpc.stream_stream_rpc_method_handler(stream, **kwargs)
    return grpc.unary_unary_rpc_method_handler(unary, **kwargs)

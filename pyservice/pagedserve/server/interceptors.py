"""Server interceptors: exceptions -> status codes, and bearer-token authentication."""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable

import grpc

from pagedserve.server.async_engine import (
    DuplicateRequestError,
    EngineDeadError,
    EngineNotReadyError,
    QueueFullError,
    RequestAbortedError,
    ShuttingDownError,
)

logger = logging.getLogger(__name__)

# Most specific first: DuplicateRequestError is a ValueError.
_STATUS = (
    (DuplicateRequestError, grpc.StatusCode.ALREADY_EXISTS),
    (ValueError, grpc.StatusCode.INVALID_ARGUMENT),
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
            return code, str(exc)
    # A bug: the client gets a short message, the log gets the stack trace.
    logger.exception("unhandled error in RPC handler")
    return grpc.StatusCode.INTERNAL, "internal server error"


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Maps exceptions escaping a pagedserve handler to gRPC status codes (see _STATUS).

    Health and reflection come from grpcio and keep their own error handling.
    """

    PREFIX = "/pagedserve."

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or not details.method.startswith(self.PREFIX):
            return handler
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                _wrap_unary(handler.unary_unary),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                _wrap_stream(handler.unary_stream),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
        return handler


def _wrap_unary(behavior: Callable[..., Awaitable]) -> Callable[..., Awaitable]:
    async def wrapped(request, context):
        try:
            return await behavior(request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as exc:  # noqa: BLE001 - every error becomes a status
            await context.abort(*status_for(exc))
    return wrapped


def _wrap_stream(behavior: Callable):
    async def wrapped(request, context):
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
    which stay open so probes need no secret."""

    OPEN_PREFIXES = ("/grpc.health.v1.Health/",)

    def __init__(self, token: str) -> None:
        if not token:
            raise ValueError("auth token must not be empty")
        self._expected = f"Bearer {token}".encode()

    def _authorized(self, details) -> bool:
        for key, value in details.invocation_metadata or ():
            if key == "authorization":
                got = value.encode() if isinstance(value, str) else value
                return hmac.compare_digest(got, self._expected)
        return False

    async def intercept_service(self, continuation, details):
        handler = await continuation(details)
        if handler is None or details.method.startswith(self.OPEN_PREFIXES) \
                or self._authorized(details):
            return handler
        return _deny(handler)


def _deny(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    code, message = grpc.StatusCode.UNAUTHENTICATED, "missing or invalid bearer token"

    async def unary(request, context):
        await context.abort(code, message)

    async def stream(request, context):
        await context.abort(code, message)
        yield  # pragma: no cover - makes this an async generator

    kwargs = dict(request_deserializer=handler.request_deserializer,
                  response_serializer=handler.response_serializer)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(stream, **kwargs)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(unary, **kwargs)
    if handler.stream_stream is not None:
        return grpc.stream_stream_rpc_method_handler(stream, **kwargs)
    return grpc.unary_unary_rpc_method_handler(unary, **kwargs)

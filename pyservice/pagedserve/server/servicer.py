"""The TextGeneration servicer: validate, convert, hand to the AsyncEngine, convert back.

Errors are raised as exceptions; ErrorInterceptor turns them into status codes.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc

from pagedserve.outputs import RequestOutputKind
from pagedserve.server.async_engine import AsyncEngine, EngineNotReadyError
from pagedserve.server.tenancy import cache_salt, current_tenant
from pagedserve.server.convert import StreamDeltas, to_prompt, to_response, to_sampling_params
from pagedserve.server.validation import InvalidArgument, Limits, validate_request
from pagedserve.v1 import generate_pb2 as pb
from pagedserve.v1 import generate_pb2_grpc as pb_grpc

MAX_REQUEST_ID_LEN = 256


class TextGenerationServicer(pb_grpc.TextGenerationServicer):
    """Starts without an engine (the model loads after the port opens, for probes);
    `attach` makes it serve."""

    def __init__(self, observability: Any = None) -> None:
        self.observability = observability  # wraps each request's output stream
        self.engine: AsyncEngine | None = None
        self.limits: Limits | None = None
        self.model_info: pb.ModelInfo | None = None

    def attach(self, engine: AsyncEngine, limits: Limits, model_info: pb.ModelInfo) -> None:
        self.engine, self.limits, self.model_info = engine, limits, model_info

    def _admit(self, request: pb.GenerateRequest):
        if self.engine is None or self.limits is None:
            raise EngineNotReadyError("model is still loading")
        validate_request(request, self.limits)
        if len(request.request_id) > MAX_REQUEST_ID_LEN:
            raise InvalidArgument(f"request_id must be at most {MAX_REQUEST_ID_LEN} characters")
        request_id = request.request_id or uuid.uuid4().hex
        params = to_sampling_params(request.sampling)
        salt = cache_salt(current_tenant.get(), request.cache_salt)
        # Deltas: a step costs what is new, not the whole output so far, per request.
        stream = self.engine.generate(request_id, to_prompt(request), params, request.priority,
                                      cache_salt=salt, output_kind=RequestOutputKind.DELTA)
        if self.observability is not None:
            stream = self.observability.observe(stream, params, self.model_info.model)
        return params, stream

    async def Generate(self, request: pb.GenerateRequest,
                       context: grpc.aio.ServicerContext) -> pb.GenerateResponse:
        params, stream = self._admit(request)
        final = None
        async for output in stream:  # deltas, folded into the whole result
            if final is None:
                final = output
            else:
                final.add(output, delta=True)
        assert final is not None and final.finished, "stream ended without a final output"
        return to_response(final, params)

    async def StreamGenerate(self, request: pb.GenerateRequest,
                             context: grpc.aio.ServicerContext
                             ) -> AsyncIterator[pb.GenerateStreamResponse]:
        params, stream = self._admit(request)
        deltas = StreamDeltas(params)
        async for output in stream:
            for message in deltas.update(output):
                yield message

    async def GetModelInfo(self, request: pb.GetModelInfoRequest,
                           context: grpc.aio.ServicerContext) -> pb.ModelInfo:
        if self.model_info is None:
            raise EngineNotReadyError("model is still loading")
        return self.model_info

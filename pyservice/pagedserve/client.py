"""Python clients for the pagedserve gRPC service (blocking and asyncio).

    from pagedserve.client import Client
    with Client("localhost:50051") as client:
        reply = client.generate("Hello", max_tokens=32, temperature=0)
        print(reply.completions[0].text)
        for chunk in client.stream_generate("Hello", max_tokens=32):
            print(chunk.text, end="", flush=True)

Sampling settings are keyword arguments named as in SamplingParams; results are the
proto messages of pagedserve.v1 (GenerateResponse, GenerateStreamResponse, ModelInfo).
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

import grpc

from pagedserve.v1 import generate_pb2 as pb
from pagedserve.v1 import generate_pb2_grpc as pb_grpc

Prompt = str | Sequence[int] | Sequence[dict]


def build_request(prompt: Prompt, *, request_id: str = "", priority: int = 0,
                  cache_salt: str = "", **sampling: Any) -> pb.GenerateRequest:
    """A GenerateRequest from a text prompt, token ids or chat messages."""
    if isinstance(sampling.get("choice"), (list, tuple)):
        sampling["choice"] = pb.ChoiceList(choices=list(sampling["choice"]))
    if isinstance(sampling.get("json_schema"), dict):
        sampling["json_schema"] = json.dumps(sampling["json_schema"])
    request = pb.GenerateRequest(request_id=request_id, priority=priority,
                                 cache_salt=cache_salt, sampling=pb.SamplingParams(**sampling))
    if isinstance(prompt, str):
        request.prompt = prompt
    elif prompt and isinstance(prompt[0], dict):
        request.messages.CopyFrom(pb.ChatMessages(messages=[
            pb.ChatMessage(role=m["role"], content=m.get("content", "")) for m in prompt]))
    else:
        request.prompt_token_ids.CopyFrom(pb.TokenIds(ids=list(prompt)))
    return request


def _bytes(value: bytes | str | os.PathLike | None) -> bytes | None:
    """Certificate material given as PEM bytes or as a file path."""
    if value is None or isinstance(value, bytes):
        return value
    with open(value, "rb") as f:
        return f.read()


def channel_credentials(root_certificates=None, client_cert=None, client_key=None
                        ) -> grpc.ChannelCredentials:
    """TLS credentials; a client cert and key make it mutual TLS."""
    return grpc.ssl_channel_credentials(
        root_certificates=_bytes(root_certificates), private_key=_bytes(client_key),
        certificate_chain=_bytes(client_cert))


class _Base:
    _grpc: Any = grpc  # the channel module: grpc, or grpc.aio for AsyncClient

    def __init__(self, target: str = "localhost:50051", *, token: str | None = None,
                 tls: bool = False, root_certificates=None, client_cert=None, client_key=None,
                 timeout: float | None = None, options: Sequence[tuple[str, Any]] = ()) -> None:
        self.target = target
        self.timeout = timeout
        # Sent as plain metadata so a token also works on a plaintext loopback channel.
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        grpc_mod = self._grpc
        if tls or root_certificates is not None or client_cert is not None:
            creds = channel_credentials(root_certificates, client_cert, client_key)
            self.channel = grpc_mod.secure_channel(target, creds, options=list(options))
        else:
            self.channel = grpc_mod.insecure_channel(target, options=list(options))
        self.stub = pb_grpc.TextGenerationStub(self.channel)

    def _kwargs(self, timeout: float | None) -> dict:
        return {"metadata": self._metadata,
                "timeout": timeout if timeout is not None else self.timeout}


class Client(_Base):
    """Blocking client. gRPC errors surface as grpc.RpcError (code() and details())."""

    def generate(self, prompt: Prompt, *, request_id: str = "", priority: int = 0,
                 cache_salt: str = "", timeout: float | None = None, **sampling: Any) -> pb.GenerateResponse:
        request = build_request(prompt, request_id=request_id, priority=priority,
                                cache_salt=cache_salt, **sampling)
        return self.stub.Generate(request, **self._kwargs(timeout))

    def stream_generate(self, prompt: Prompt, *, request_id: str = "", priority: int = 0,
                        cache_salt: str = "", timeout: float | None = None, **sampling: Any
                        ) -> Iterator[pb.GenerateStreamResponse]:
        """Yields messages as they arrive; `.cancel()` on the returned call stops it."""
        request = build_request(prompt, request_id=request_id, priority=priority,
                                cache_salt=cache_salt, **sampling)
        return self.stub.StreamGenerate(request, **self._kwargs(timeout))

    def model_info(self, timeout: float | None = None) -> pb.ModelInfo:
        return self.stub.GetModelInfo(pb.GetModelInfoRequest(), **self._kwargs(timeout))

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClient(_Base):
    """asyncio client; use inside a running event loop."""

    _grpc = grpc.aio

    async def generate(self, prompt: Prompt, *, request_id: str = "", priority: int = 0,
                       cache_salt: str = "", timeout: float | None = None, **sampling: Any) -> pb.GenerateResponse:
        request = build_request(prompt, request_id=request_id, priority=priority,
                                cache_salt=cache_salt, **sampling)
        return await self.stub.Generate(request, **self._kwargs(timeout))

    async def stream_generate(self, prompt: Prompt, *, request_id: str = "", priority: int = 0,
                              cache_salt: str = "", timeout: float | None = None, **sampling: Any
                              ) -> AsyncIterator[pb.GenerateStreamResponse]:
        request = build_request(prompt, request_id=request_id, priority=priority,
                                cache_salt=cache_salt, **sampling)
        call = self.stub.StreamGenerate(request, **self._kwargs(timeout))
        try:
            async for message in call:
                yield message
        finally:
            call.cancel()  # no-op once finished; stops the server's work if we stop early

    async def model_info(self, timeout: float | None = None) -> pb.ModelInfo:
        return await self.stub.GetModelInfo(pb.GetModelInfoRequest(), **self._kwargs(timeout))

    async def close(self) -> None:
        await self.channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

"""Build and run the grpc.aio server: TextGeneration, health, reflection, TLS, drain.

The port opens before the model loads so probes can watch health go from NOT_SERVING
to SERVING once the engine is loaded and warmed up.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import uuid
from collections.abc import Callable
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from pagedserve.sampling_params import SamplingParams
from pagedserve.server.async_engine import AsyncEngine, RequestAbortedError
from pagedserve.server.config import ServerConfig
from pagedserve.server.interceptors import BearerTokenAuthInterceptor, ErrorInterceptor
from pagedserve.server.servicer import TextGenerationServicer
from pagedserve.server.validation import Limits
from pagedserve.v1 import generate_pb2 as pb
from pagedserve.v1 import generate_pb2_grpc as pb_grpc

logger = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["TextGeneration"].full_name
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def _read(path: str | None) -> bytes | None:
    if path is None:
        return None
    with open(path, "rb") as f:
        return f.read()


def model_info(engine: Any, stats: dict) -> pb.ModelInfo:
    """What GetModelInfo answers, read once from the loaded LLMEngine and its stats
    (the AsyncEngine's copy: the engine itself belongs to its thread)."""
    config = engine.config
    return pb.ModelInfo(
        model=str(engine.model_name), max_model_len=engine.max_model_len,
        vocab_size=engine.vocab_size, block_size=config.block_size,
        num_gpu_blocks=stats.get("num_total_gpu_blocks", 0),
        num_cpu_blocks=stats.get("num_total_cpu_blocks", 0),
        device=str(getattr(config, "device", "")), dtype=str(getattr(config, "dtype", "")))


class Server:
    """One gRPC server around an AsyncEngine. Several may share an engine (tests serve
    the same model over plaintext, TLS and mTLS at once)."""

    def __init__(self, config: ServerConfig, observability: Any = None) -> None:
        self.config = config
        # pagedserve.observability.Observability (tracing, metrics) or None.
        self.observability = observability
        self.health = health.aio.HealthServicer()
        self.servicer = TextGenerationServicer(observability)
        self.engine: AsyncEngine | None = None
        self.port: int | None = None
        self.grpc_server: grpc.aio.Server | None = None

    def _build(self) -> grpc.aio.Server:
        # grpc.aio binds to the running loop, so this happens in start().
        config = self.config
        # Tracing first: its span covers authentication and the error mapping.
        interceptors: list[grpc.aio.ServerInterceptor] = \
            list(self.observability.interceptors()) if self.observability is not None else []
        if config.auth_token:
            interceptors.append(BearerTokenAuthInterceptor(config.auth_token))
        interceptors.append(ErrorInterceptor())
        server = grpc.aio.server(interceptors=interceptors, options=[
            # Up to twice the limit is read and answered INVALID_ARGUMENT naming the field
            # (validation.py); beyond that gRPC refuses it before it is parsed.
            ("grpc.max_receive_message_length", 2 * config.max_message_bytes),
            ("grpc.so_reuseport", 0),  # a second server on the same port must fail to bind
        ])
        pb_grpc.add_TextGenerationServicer_to_server(self.servicer, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            [SERVICE_NAME, reflection.SERVICE_NAME, "grpc.health.v1.Health"], server)
        return server

    async def start(self) -> int:
        """Open the port with health NOT_SERVING; returns the bound port."""
        self.grpc_server = self._build()
        for service in ("", SERVICE_NAME):
            await self.health.set(service, NOT_SERVING)
        address = f"{self.config.host}:{self.config.port}"
        if self.config.tls:
            credentials = grpc.ssl_server_credentials(
                [(_read(self.config.tls_key_file), _read(self.config.tls_cert_file))],
                root_certificates=_read(self.config.tls_client_ca_file),
                require_client_auth=self.config.tls_client_ca_file is not None)
            self.port = self.grpc_server.add_secure_port(address, credentials)
        else:
            self.port = self.grpc_server.add_insecure_port(address)
        await self.grpc_server.start()
        logger.info("gRPC listening on %s:%d (%s)", self.config.host, self.port,
                    "mTLS" if self.config.tls_client_ca_file else
                    "TLS" if self.config.tls else "plaintext")
        return self.port

    async def attach(self, engine: AsyncEngine) -> None:
        """Serve `engine` (started and warmed up) and report SERVING."""
        llm = engine.engine
        limits = Limits(max_model_len=llm.max_model_len, vocab_size=llm.vocab_size,
                        max_n=self.config.max_n, max_stop_strings=self.config.max_stop_strings,
                        max_request_bytes=self.config.max_message_bytes)
        self.engine = engine
        self.servicer.attach(engine, limits, model_info(llm, engine.stats()))
        if self.observability is not None:
            self.observability.attach_engine(lambda: engine.engine_stats)
        loop = asyncio.get_running_loop()
        engine.on_failure(lambda exc: loop.create_task(self._set_health(NOT_SERVING)))
        if engine.is_healthy:
            await self._set_health(SERVING)

    async def _set_health(self, status: int) -> None:
        for service in ("", SERVICE_NAME):
            await self.health.set(service, status)

    async def drain(self, grace: float | None = None) -> None:
        """Graceful shutdown: NOT_SERVING, refuse new calls, let in-flight ones finish
        within `grace` seconds, abort the rest with UNAVAILABLE, stop."""
        grace = self.config.shutdown_grace_period if grace is None else grace
        await self.health.enter_graceful_shutdown()
        if self.engine is not None:
            self.engine.begin_drain()
            loop = asyncio.get_running_loop()
            deadline = loop.time() + grace
            while self.engine.num_in_flight and loop.time() < deadline:
                await asyncio.sleep(0.05)
            if self.engine.num_in_flight:
                logger.warning("aborting %d requests left after the %gs grace period",
                               self.engine.num_in_flight, grace)
                self.engine.abort_all(RequestAbortedError(
                    f"server shut down: request aborted after the {grace:g}s grace period"))
        # A short grace lets handlers send the final message or status they now hold.
        if self.grpc_server is not None:
            await self.grpc_server.stop(grace=2.0)

    async def stop(self) -> None:
        await self.health.enter_graceful_shutdown()
        if self.grpc_server is not None:
            await self.grpc_server.stop(grace=None)


async def start_engine(llm_engine: Any, max_queue_size: int) -> AsyncEngine:
    """Start the engine loop and run one short request through it, so the first real
    request does not pay for lazy initialisation."""
    engine = AsyncEngine(llm_engine, max_queue_size=max_queue_size)
    engine.start()
    params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    prompt = [min(1, llm_engine.vocab_size - 1)] * 4
    async for _ in engine.generate(f"warmup-{uuid.uuid4().hex}", prompt, params):
        pass
    return engine


async def serve(config: ServerConfig, make_engine: Callable[[], Any]) -> None:
    """Run until SIGTERM/SIGINT, then drain. `make_engine` loads the LLMEngine (slow; runs
    on a worker thread while the port already answers health checks)."""
    from pagedserve.observability.observer import Observability

    observability = Observability.from_settings(
        disable_tracing=config.disable_tracing, metrics_port=config.metrics_port or None,
        metrics_host=config.host)
    server = Server(config, observability)
    try:
        await _serve(server, config, make_engine)
    finally:
        observability.shutdown()


async def _serve(server: Server, config: ServerConfig, make_engine: Callable[[], Any]) -> None:
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    async def load() -> AsyncEngine:
        llm_engine = await asyncio.to_thread(make_engine)
        engine = await start_engine(llm_engine, config.max_queue_size)
        await server.attach(engine)
        logger.info("model %s loaded and warmed up; SERVING", llm_engine.model_name)
        return engine

    loading = asyncio.ensure_future(load())
    stopping = asyncio.ensure_future(stop.wait())
    await asyncio.wait([loading, stopping], return_when=asyncio.FIRST_COMPLETED)
    if loading.done() and loading.exception() is not None:
        stopping.cancel()
        await server.stop()
        raise loading.exception()
    await stopping
    logger.info("shutdown signal: draining (grace %gs)", config.shutdown_grace_period)
    if not loading.done():
        loading.cancel()  # the loader thread cannot be interrupted; the process exits anyway
    await server.drain()
    if server.engine is not None:
        await server.engine.stop()
    logger.info("server stopped")

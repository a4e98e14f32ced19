"""Build and run the grpc.aio server: TextGeneration, health, reflection, TLS, drain.

The port opens before the model loads so probes can watch health go from NOT_SERVING
to SERVING once the engine is loaded and warmed up. Health also reports NOT_SERVING
while an engine step is stuck (StepWatchdog) and once the engine has failed; `serve`
then exits non-zero after a short grace so the orchestrator restarts the process.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import time
import uuid
from collections.abc import Callable
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from pagedserve.engine.stats import EngineStats
from pagedserve.sampling_params import SamplingParams
from pagedserve.server.async_engine import AsyncEngine, RequestAbortedError
from pagedserve.server.config import ConfigError, ServerConfig
from pagedserve.server.interceptors import BearerTokenAuthInterceptor, ErrorInterceptor
from pagedserve.server.servicer import TextGenerationServicer
from pagedserve.server.validation import Limits
from pagedserve.server.watchdog import StepWatchdog
from pagedserve.v1 import generate_pb2 as pb
from pagedserve.v1 import generate_pb2_grpc as pb_grpc

logger = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["TextGeneration"].full_name
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
# `pagedserve serve`'s exit status once the engine has failed (configuration errors: 2).
EXIT_ENGINE_FAILED = 1


def _read(path: str | None) -> bytes | None:
    if path is None:
        return None
    with open(path, "rb") as f:
        return f.read()


def check_listen_address(host: str, port: int, what: str = "gRPC") -> None:
    """Raise ConfigError unless `host`:`port` can be bound now. gRPC's own bind failure
    is a bare RuntimeError after C-core log lines; this says what is wrong first. A port
    taken between this check and the bind still fails, as a ConfigError from start()."""
    if port == 0:
        return
    try:
        addresses = socket.getaddrinfo(host.strip("[]") or None, port, type=socket.SOCK_STREAM,
                                       flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise ConfigError(f"cannot listen on {host}:{port} for {what}: {e.strerror}") from None
    error: OSError | None = None
    for family, kind, proto, _, address in addresses:
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC does
            try:
                sock.bind(address)
                return  # gRPC serves if any address of the name binds
            except OSError as e:
                error = error or e
    reason = error.strerror if error is not None else "no address"
    raise ConfigError(f"cannot listen on {host}:{port} for {what}: {reason}")


def model_info(engine: Any, stats: EngineStats) -> pb.ModelInfo:
    """What GetModelInfo answers, read once from the loaded LLMEngine and its stats
    (the AsyncEngine's copy: the engine itself belongs to its thread)."""
    config = engine.config
    return pb.ModelInfo(
        model=str(engine.model_name), max_model_len=engine.max_model_len,
        vocab_size=engine.vocab_size, block_size=config.block_size,
        num_gpu_blocks=stats.num_total_gpu_blocks,
        num_cpu_blocks=stats.num_total_cpu_blocks,
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
        self.watchdog: StepWatchdog | None = None
        self.engine_failed = asyncio.Event()  # set when the attached engine fails

    def _build(self) -> grpc.aio.Server:
        # grpc.aio binds to the running loop, so this happens in start().
        config = self.config
        # Tracing first: its span covers authentication and the error mapping.
        interceptors: list[grpc.aio.ServerInterceptor] = \
            list(self.observability.interceptors()) if self.observability is not None else []
        tokens = config.tenants_by_token
        if tokens:
            interceptors.append(BearerTokenAuthInterceptor(tokens))
        interceptors.append(ErrorInterceptor(
            self.observability.count_unparseable if self.observability is not None else None))
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
        try:
            if self.config.tls:
                self.port = self.grpc_server.add_secure_port(address, credentials)
            else:
                self.port = self.grpc_server.add_insecure_port(address)
        except RuntimeError:  # grpc's "Failed to bind": taken, or not an address here
            raise ConfigError(f"cannot listen on {address}: address in use or not "
                              f"available") from None
        await self.grpc_server.start()
        logger.info("gRPC listening on %s:%d (%s)", self.config.host, self.port,
                    "mTLS" if self.config.tls_client_ca_file else
                    "TLS" if self.config.tls else "plaintext")
        return self.port

    async def attach(self, engine: AsyncEngine) -> None:
        """Serve `engine` (started and warmed up) and report SERVING."""
        llm = engine.engine
        limits = Limits(max_model_len=llm.max_model_len, max_n=self.config.max_n,
                        max_stop_strings=self.config.max_stop_strings,
                        max_request_bytes=self.config.max_message_bytes)
        self.engine = engine
        self.servicer.attach(engine, limits, model_info(llm, engine.stats()))
        if self.observability is not None:
            self.observability.attach_engine(lambda: engine.engine_stats)
        loop = asyncio.get_running_loop()
        engine.on_failure(lambda exc: loop.create_task(self._on_engine_failure()))
        self.watchdog = StepWatchdog(engine, self.config.step_timeout, self._set_healthy)
        self.watchdog.start()
        if engine.is_healthy:
            await self._set_health(SERVING)

    async def _on_engine_failure(self) -> None:
        self.engine_failed.set()
        await self._set_health(NOT_SERVING)

    async def _set_healthy(self, healthy: bool) -> None:
        await self._set_health(SERVING if healthy else NOT_SERVING)

    async def _set_health(self, status: int) -> None:
        for service in ("", SERVICE_NAME):
            await self.health.set(service, status)

    async def drain(self, grace: float | None = None,
                    cut_short: asyncio.Event | None = None) -> None:
        """Graceful shutdown: NOT_SERVING, refuse new calls, let in-flight ones finish
        within `grace` seconds (or until `cut_short` is set), abort the rest with
        UNAVAILABLE, stop."""
        grace = self.config.shutdown_grace_period if grace is None else grace
        cut_short = cut_short or asyncio.Event()
        await self.health.enter_graceful_shutdown()
        await self._stop_watchdog()
        if self.engine is not None:
            self.engine.begin_drain()
            loop = asyncio.get_running_loop()
            deadline = loop.time() + grace
            while self.engine.num_in_flight and loop.time() < deadline \
                    and not cut_short.is_set():
                await asyncio.sleep(0.05)
            if self.engine.num_in_flight:
                why = "a second shutdown signal" if cut_short.is_set() \
                    else f"the {grace:g}s grace period"
                logger.warning("aborting %d requests left after %s",
                               self.engine.num_in_flight, why)
                self.engine.abort_all(RequestAbortedError(
                    f"server shut down: request aborted after {why}"))
        # A short grace lets handlers send the final message or status they now hold.
        if self.grpc_server is not None:
            await self.grpc_server.stop(grace=0.5 if cut_short.is_set() else 2.0)

    async def stop(self) -> None:
        await self.health.enter_graceful_shutdown()
        await self._stop_watchdog()
        if self.grpc_server is not None:
            await self.grpc_server.stop(grace=None)

    async def _stop_watchdog(self) -> None:
        if self.watchdog is not None:
            await self.watchdog.stop()


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


async def serve(config: ServerConfig, make_engine: Callable[[], Any]) -> int:
    """Run until SIGTERM/SIGINT, then drain; a second signal ends the drain at once.
    `make_engine` loads the LLMEngine (slow; runs on a worker thread while the port
    already answers health checks).

    Returns the process exit status: 0 after a shutdown signal, EXIT_ENGINE_FAILED once
    the engine failed (after `engine_failure_exit_delay` seconds of NOT_SERVING). A
    configuration problem (address in use, bad certificate) raises ConfigError before
    any request is served.
    """
    from pagedserve.observability.observer import Observability

    check_listen_address(config.host, config.port)
    metrics_host = config.metrics_bind_host
    try:
        observability = Observability.from_settings(
            disable_tracing=config.disable_tracing, metrics_port=config.metrics_port or None,
            metrics_host=metrics_host, metrics_tenant_label=config.metrics_tenant_label)
    except OSError as e:
        raise ConfigError(f"cannot serve metrics on {metrics_host}:{config.metrics_port}: "
                          f"{e.strerror or e}") from None
    server = Server(config, observability)
    try:
        return await _serve(server, config, make_engine)
    finally:
        observability.shutdown()


async def _serve(server: Server, config: ServerConfig, make_engine: Callable[[], Any]) -> int:
    await server.start()
    stop, cut_short = asyncio.Event(), asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal() -> None:
        if stop.is_set():
            logger.warning("second shutdown signal: ending the drain now")
            cut_short.set()
        stop.set()

    signals = (signal.SIGTERM, signal.SIGINT)
    for sig in signals:
        loop.add_signal_handler(sig, on_signal)
    try:
        return await _run(server, config, make_engine, stop, cut_short)
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)


async def _run(server: Server, config: ServerConfig, make_engine: Callable[[], Any],
               stop: asyncio.Event, cut_short: asyncio.Event) -> int:
    async def load() -> AsyncEngine:
        llm_engine = await asyncio.to_thread(make_engine)
        engine = await start_engine(llm_engine, config.max_queue_size)
        await server.attach(engine)
        logger.info("model %s loaded and warmed up; SERVING", llm_engine.model_name)
        return engine

    loading = asyncio.ensure_future(load())
    stopping = asyncio.ensure_future(stop.wait())
    failing = asyncio.ensure_future(server.engine_failed.wait())
    try:
        await asyncio.wait([loading, stopping], return_when=asyncio.FIRST_COMPLETED)
        if loading.done() and loading.exception() is not None:
            await server.stop()
            raise loading.exception()
        await asyncio.wait([stopping, failing], return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (stopping, failing):
            task.cancel()
    if server.engine_failed.is_set() and not stop.is_set():
        return await _exit_after_engine_failure(server, config, stop)
    logger.info("shutdown signal: draining (grace %gs)", config.shutdown_grace_period)
    if not loading.done():
        loading.cancel()  # the loader thread cannot be interrupted; the process exits anyway
    await server.drain(cut_short=cut_short)
    if server.engine is not None:
        await server.engine.stop()
    logger.info("server stopped")
    return EXIT_ENGINE_FAILED if server.engine_failed.is_set() else 0


async def _exit_after_engine_failure(server: Server, config: ServerConfig,
                                     stop: asyncio.Event) -> int:
    """Stay up NOT_SERVING for the grace (in-flight callers get INTERNAL, probes and
    balancers see the failure), then stop: a shutdown signal cuts the wait short."""
    delay = config.engine_failure_exit_delay
    logger.error("engine failed; NOT_SERVING, exiting in %gs so the process is restarted",
                 delay)
    started = time.monotonic()
    try:
        await asyncio.wait_for(stop.wait(), delay)
    except asyncio.TimeoutError:
        pass
    await server.stop()
    if server.engine is not None:
        await server.engine.stop()
    logger.info("server stopped %.1fs after the engine failure", time.monotonic() - started)
    return EXIT_ENGINE_FAILED

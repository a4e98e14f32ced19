"""AsyncEngine: the single-threaded LLMEngine driven from asyncio.

The engine is not thread-safe, so one thread owns it: every call into it (add, abort,
step, stats) happens on that thread. The event loop talks to it through a command
queue and gets results back through `loop.call_soon_threadsafe`, once per step.

Each request gets a `RequestStream` that folds the outputs its reader has not read yet
into one (RequestOutput.add): for a cumulative request the newest replaces the rest, for
a DELTA request the deltas are appended. A slow reader gets one output holding all it
missed, and a stream holds no more than what its reader has not read.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from collections.abc import AsyncIterator, Callable
from typing import Any

from pagedserve.engine.stats import EngineStats, ServingStats
from pagedserve.errors import InvalidRequestError
from pagedserve.outputs import RequestFailedError, RequestOutput, RequestOutputKind
from pagedserve.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    """The engine loop failed; the request cannot complete."""


class EngineNotReadyError(RuntimeError):
    """The model is still loading or warming up."""


class QueueFullError(RuntimeError):
    """The admission queue is full."""


class ShuttingDownError(RuntimeError):
    """The server is draining and takes no new requests."""


class DuplicateRequestError(ValueError):
    """A request with the same id is still in flight."""


class RequestAbortedError(RuntimeError):
    """The request was aborted by the server (shutdown) before it finished."""


class RequestStream:
    """Async iterator over one request's outputs (of its RequestOutputKind); ends after
    the final one."""

    def __init__(self, request_id: str,
                 output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE) -> None:
        self.request_id = request_id
        self.output_kind = output_kind
        self.started = False  # an output has arrived, so the request left the queue
        self.aborting = False  # abort sent; the id stays taken until the engine confirms
        self.finished = False
        self._unread: RequestOutput | None = None
        self._error: BaseException | None = None
        self._event = asyncio.Event()

    def _put(self, output: RequestOutput) -> None:
        """`output` becomes this stream's: the caller keeps no reference to it."""
        if self._unread is None:
            self._unread = output
        else:
            self._unread.add(output, delta=self.output_kind is RequestOutputKind.DELTA)
        self._event.set()

    def _fail(self, error: BaseException) -> None:
        self._error = error
        self._event.set()

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        # An output and an error may both be waiting (put, then fail, before this
        # reader woke): the output is returned now and the error on the next call, so
        # the event is cleared only when there is nothing left to hand out.
        while self._unread is None and self._error is None:
            self._event.clear()
            await self._event.wait()
        if self._unread is not None:
            output, self._unread = self._unread, None
            self.finished = output.finished
            return output
        self.finished = True
        raise self._error


class AsyncEngine:
    """Runs `engine.step()` on a dedicated thread; request streams live on the event loop.

    max_queue_size bounds the requests accepted but not yet producing output; beyond it
    `add_request` raises QueueFullError (RESOURCE_EXHAUSTED to gRPC clients).
    """

    def __init__(self, engine: Any, max_queue_size: int = 1024) -> None:
        if max_queue_size < 1:
            raise ValueError(f"max_queue_size must be >= 1, got {max_queue_size}")
        self.engine = engine
        self.max_queue_size = max_queue_size
        self._streams: dict[str, RequestStream] = {}
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stats: EngineStats | None = None
        self._error: BaseException | None = None
        self._draining = False
        self._failure_callbacks: list[Callable[[BaseException], None]] = []
        # Prompts are tokenized (and chat templates applied) here, off the engine
        # thread, so a long prompt delays only its own request; one thread, because the
        # tokenizer copy it uses must not be shared.
        self._tokenizer_pool = ThreadPoolExecutor(1, thread_name_prefix="pagedserve-tokenize")
        self.step_started_at: float | None = None  # time.monotonic() of the running step

    # ---- lifecycle ---------------------------------------------------------------
    def start(self) -> None:
        """Start the engine thread; call from the event loop that will read the streams."""
        if self._thread is not None:
            raise RuntimeError("AsyncEngine already started")
        self._loop = asyncio.get_running_loop()
        self._stats = self.engine.stats()
        # Tensor-parallel workers can die while the engine idles: fail it then too.
        watch = getattr(getattr(self.engine, "runner", None), "on_failure", None)
        if watch is not None:
            watch(lambda exc: self._commands.put(("fail", exc)))
        self._thread = threading.Thread(target=self._run, name="pagedserve-engine", daemon=True)
        self._thread.start()

    async def stop(self, timeout: float = 30.0) -> None:
        """Abort whatever is left and join the engine thread, waiting at most `timeout`
        seconds: a thread wedged in a step (a hung device call) is left behind, as a
        daemon, so shutdown still ends."""
        self.abort_all(RequestAbortedError("server stopped"))
        if self._thread is not None and self._thread.is_alive():
            self._commands.put(("stop",))
            await asyncio.to_thread(self._thread.join, timeout)
            if self._thread.is_alive():
                logger.error("engine thread still in a step after %gs; leaving it behind",
                             timeout)
        self._tokenizer_pool.shutdown(wait=False, cancel_futures=True)
        shutdown = getattr(self.engine, "shutdown", None)  # e.g. join tensor-parallel workers
        if shutdown is not None:
            await asyncio.to_thread(shutdown)

    def on_failure(self, callback: Callable[[BaseException], None]) -> None:
        """Called on the event loop once, when the engine loop dies."""
        self._failure_callbacks.append(callback)

    @property
    def is_healthy(self) -> bool:
        return self._error is None and self._thread is not None and self._thread.is_alive()

    @property
    def num_in_flight(self) -> int:
        return len(self._streams)

    def running_request_ids(self) -> list[str]:
        """Requests in flight that left the queue (what a stuck step is working on)."""
        return [rid for rid, s in self._streams.items() if s.started and not s.aborting]

    @property
    def engine_stats(self) -> EngineStats | None:
        """LLMEngine.stats() as of the last step or command (None before start); safe
        from any thread (a frozen snapshot the engine thread replaces)."""
        return self._stats

    def stats(self) -> ServingStats:
        """The engine's stats as of its last step or command (exact when idle), plus the
        requests in flight and queued here."""
        return ServingStats.of_engine(self._stats or EngineStats(), len(self._streams),
                                      self._num_queued())

    # ---- requests ----------------------------------------------------------------
    def add_request(self, request_id: str, prompt: Any, params: SamplingParams,
                    priority: int = 0, cache_salt: int = 0,
                    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
                    ) -> RequestStream:
        """Queue a request; the returned stream raises the engine's rejection, if any.
        `output_kind`: DELTA costs each step only what is new (the gRPC path)."""
        if self._error is not None:
            raise EngineDeadError("engine is not running: it failed (details in the server log)")
        if self._draining:
            raise ShuttingDownError("server is shutting down")
        if request_id in self._streams:  # two streams for one id would mix their outputs
            raise DuplicateRequestError(f"request_id {request_id!r} is already in flight")
        if self._num_queued() >= self.max_queue_size:
            raise QueueFullError(
                f"admission queue is full ({self.max_queue_size} requests waiting)")
        stream = RequestStream(request_id, output_kind)
        self._streams[request_id] = stream
        tokenize = getattr(self.engine, "prompts", None)
        if tokenize is None:  # an engine without its own prompt tokenizer (tests)
            self._commands.put(("add", stream, prompt, params, priority, cache_salt))
            return stream
        future = self._tokenizer_pool.submit(tokenize, prompt)
        future.add_done_callback(
            lambda f: self._post(self._tokenized, f, stream, params, priority, cache_salt))
        return stream

    def _tokenized(self, future: Future, stream: RequestStream, params: SamplingParams,
                   priority: int, cache_salt: int) -> None:
        """On the event loop: hand the tokenized prompt to the engine thread, unless the
        request was aborted meanwhile or its prompt was rejected."""
        if self._streams.get(stream.request_id) is not stream or stream.aborting:
            return  # aborted while tokenizing: the abort command releases it
        if future.cancelled():
            self._reject(stream, RequestAbortedError("server stopped"))
            return
        error = future.exception()
        if error is not None:
            if not isinstance(error, InvalidRequestError):
                logger.error("tokenizing request %s failed", stream.request_id, exc_info=error)
                error = RequestFailedError("tokenizing the prompt failed (details in the server log)")
            self._reject(stream, error)
            return
        self._commands.put(("add", stream, future.result(), params, priority, cache_salt))

    def abort(self, request_id: str) -> None:
        """Stop a request (client cancel or deadline); the engine frees its blocks at its
        next command check, before the next step."""
        stream = self._streams.get(request_id)
        if stream is not None:
            self._abort(stream)

    def _abort(self, stream: RequestStream) -> None:
        if self._streams.get(stream.request_id) is not stream or stream.aborting:
            return
        stream.aborting = True
        if self._error is None:
            self._commands.put(("abort", stream))
        else:
            del self._streams[stream.request_id]

    async def generate(self, request_id: str, prompt: Any, params: SamplingParams,
                       priority: int = 0, cache_salt: int = 0,
                       output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
                       ) -> AsyncIterator[RequestOutput]:
        """add_request + iteration; aborts the request if the consumer stops early."""
        stream = self.add_request(request_id, prompt, params, priority, cache_salt, output_kind)
        try:
            async for output in stream:
                yield output
        finally:
            if not stream.finished:
                self._abort(stream)

    def begin_drain(self) -> None:
        """Refuse new requests from now on; in-flight ones continue."""
        self._draining = True

    def abort_all(self, error: BaseException) -> None:
        """Fail every in-flight request with `error` (end of the shutdown grace period)."""
        for stream in list(self._streams.values()):
            self._abort(stream)
            stream._fail(error)

    def _num_queued(self) -> int:
        return sum(1 for s in self._streams.values() if not (s.started or s.aborting))

    # ---- engine thread -----------------------------------------------------------
    def _run(self) -> None:
        try:
            while True:
                # Block only while idle: a running batch must keep stepping.
                block = not self.engine.has_unfinished_requests()
                if not self._apply_commands(block):
                    return
                if self.engine.has_unfinished_requests():
                    self.step_started_at = time.monotonic()
                    outputs = self.engine.step()
                    self.step_started_at = None
                    self._stats = self.engine.stats()
                    if outputs:
                        self._post(self._deliver, [_detach(o) for o in outputs])
        except BaseException as exc:  # noqa: BLE001 - any engine error kills the loop
            logger.exception("engine loop failed; failing all in-flight requests")
            self._post(self._fail_all, exc)

    def _apply_commands(self, block: bool) -> bool:
        """Run queued commands; False when asked to stop."""
        commands = [self._commands.get()] if block else []
        while True:
            try:
                commands.append(self._commands.get_nowait())
            except queue.Empty:
                break
        aborted: list[RequestStream] = []
        keep_running = True
        for command in commands:
            if command[0] == "stop":
                keep_running = False
                break
            if command[0] == "fail":
                raise command[1]
            if command[0] == "add":
                _, stream, prompt, params, priority, cache_salt = command
                try:
                    self.engine.add_request(stream.request_id, prompt, params,
                                            priority=priority, cache_salt=cache_salt,
                                            output_kind=stream.output_kind)
                except Exception as exc:  # noqa: BLE001 - a rejection belongs to its request
                    self._post(self._reject, stream, exc)
            elif command[0] == "abort":
                self.engine.abort_request(command[1].request_id)
                aborted.append(command[1])
        if commands:
            self._stats = self.engine.stats()
        for stream in aborted:  # after the stats: a freed id means freed blocks
            self._post(self._release, stream)
        return keep_running

    def _post(self, fn: Callable, *args: Any) -> None:
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:
            pass  # the event loop is closed: nobody is left to read the result

    # ---- event loop side ---------------------------------------------------------
    def _deliver(self, outputs: list[RequestOutput]) -> None:
        for output in outputs:
            stream = self._streams.get(output.request_id)
            if stream is None or stream.aborting:
                continue  # aborted meanwhile
            stream.started = True
            if output.error is not None:  # the request failed alone; the engine runs on
                del self._streams[output.request_id]
                error = output.error
                if not isinstance(error, InvalidRequestError):
                    error = RequestFailedError(
                        "the request failed in the engine (details in the server log)")
                stream._fail(error)
                continue
            stream._put(output)
            if output.finished:
                del self._streams[output.request_id]

    def _reject(self, stream: RequestStream, error: BaseException) -> None:
        self._release(stream)
        stream._fail(error)

    def _release(self, stream: RequestStream) -> None:
        if self._streams.get(stream.request_id) is stream:
            del self._streams[stream.request_id]

    def _fail_all(self, error: BaseException) -> None:
        self._error = error
        for stream in list(self._streams.values()):
            stream._fail(EngineDeadError("engine failure: request aborted (details in the server log)"))
        self._streams.clear()
        for callback in self._failure_callbacks:
            callback(error)


def _detach(output: RequestOutput) -> RequestOutput:
    """What the event loop may read while the engine steps on: the engine's token and
    logprob lists are new in every output, but its timings (and their phase timeline)
    are the request's own, updated in place, so they are copied here."""
    output.metrics = output.metrics.snapshot()
    return output

"""The engine's side of structured output: a request with a constraint waits here, out
of the scheduler's queues, until its grammar is compiled, so it holds up no other
request; then it joins the scheduler like any other. A compile that fails, or is still
running at the request's deadline (arrival + the engine's time limit), turns the request
down with InvalidRequestError naming the field (INVALID_ARGUMENT over gRPC); nothing else is
affected.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pagedserve.errors import InvalidRequestError, invalid_sampling
from pagedserve.structured.compiler import ConstraintCompiler
from pagedserve.structured.logits import RequestConstraint
from pagedserve.structured.spec import ConstraintSpec

log = logging.getLogger(__name__)


@dataclass
class _Waiting:
    spec: ConstraintSpec
    future: concurrent.futures.Future
    deadline: float
    args: tuple  # what the engine hands the scheduler once compiled
    arrival: float


class StructuredOutputs:
    """`backend_factory` makes the grammar engine (backend.py) on first use, on a
    compile worker; `timeout_s` is the longest a request waits for its compile."""

    def __init__(self, backend_factory: Callable[[], Any], threads: int = 2,
                 timeout_s: float = 10.0):
        self.timeout_s = timeout_s
        self._backend_factory = backend_factory
        self._backend: Any = None
        self._backend_lock = threading.Lock()  # made by the first compile worker
        self.compiler = ConstraintCompiler(self._compile, threads)
        self._waiting: dict[str, _Waiting] = {}
        self._rejected: list[tuple[str, tuple, float, InvalidRequestError]] = []

    @property
    def backend(self) -> Any:
        with self._backend_lock:
            if self._backend is None:
                self._backend = self._backend_factory()
            return self._backend

    def _compile(self, spec: ConstraintSpec) -> Any:
        return self.backend.compile(spec)

    # ---- requests ------------------------------------------------------------------
    def add(self, request_id: str, spec: ConstraintSpec, args: tuple) -> RequestConstraint | None:
        """The request's constraint when its grammar is ready now (a cache hit); else
        None and the request waits here. Raises InvalidRequestError for a constraint known bad."""
        future = self.compiler.submit(spec)
        if future.done():
            return self._constraint(future)  # raises the cached failure
        now = time.monotonic()
        self._waiting[request_id] = _Waiting(spec, future, now + self.timeout_s, args, now)
        return None

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._waiting

    def discard(self, request_id: str) -> bool:
        return self._waiting.pop(request_id, None) is not None

    def has_waiting(self) -> bool:
        return bool(self._waiting)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    def ready(self) -> list[tuple[str, tuple, RequestConstraint]]:
        """Requests whose grammar is now compiled, in arrival order; those whose compile
        failed or overran go to take_rejected()."""
        if not self._waiting:
            return []
        now = time.monotonic()
        out = []
        for request_id, w in list(self._waiting.items()):
            if not w.future.done():
                if now < w.deadline:
                    continue
                error = invalid_sampling(f"{w.spec.kind}: compiling the constraint took "
                                         f"longer than the server's limit of {self.timeout_s:g} s")
                self.compiler.fail(w.spec, error)
                self._reject(request_id, error)
                continue
            try:
                constraint = self._constraint(w.future)
            except InvalidRequestError as exc:
                self._reject(request_id, exc)
                continue
            del self._waiting[request_id]
            out.append((request_id, w.args, constraint))
        return out

    def wait(self, timeout: float) -> None:
        """Blocks until a compile ends, a deadline passes or `timeout` (an idle engine
        with only compiling requests, which must not spin)."""
        if not self._waiting:
            return
        deadline = min(w.deadline for w in self._waiting.values())
        timeout = max(0.0, min(timeout, deadline - time.monotonic()))
        concurrent.futures.wait([w.future for w in self._waiting.values()], timeout,
                                return_when=concurrent.futures.FIRST_COMPLETED)

    def take_rejected(self) -> list[tuple[str, tuple, float, InvalidRequestError]]:
        """(request id, its args, arrival time, the error) of each request turned down
        since the last call."""
        out, self._rejected = self._rejected, []
        return out

    def reject(self, request_id: str, args: tuple, error: InvalidRequestError) -> None:
        """Turns down a request that left the wait (reported by take_rejected)."""
        self._rejected.append((request_id, args, time.monotonic(), error))

    def _reject(self, request_id: str, error: InvalidRequestError) -> None:
        w = self._waiting.pop(request_id)
        self._rejected.append((request_id, w.args, w.arrival, error))

    def _constraint(self, future: concurrent.futures.Future) -> RequestConstraint:
        try:
            compiled = future.result()
        except InvalidRequestError:
            raise
        except Exception as exc:  # noqa: BLE001 - a compiler bug fails the request, not us
            log.exception("constraint compile failed unexpectedly")
            raise invalid_sampling(
                f"constraint does not compile: {type(exc).__name__}: {exc}"[:400]) from None
        return RequestConstraint(self.backend, compiled)

    def shutdown(self) -> None:
        self.compiler.shutdown()

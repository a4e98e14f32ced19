"""Compiles constraints on a small thread pool, one compile per distinct constraint.

The cache is keyed by (kind, text) and keeps failures too, so a schema that does not
compile, or compiled too slowly once, is refused at once the next time instead of
taking a worker again. A compile cannot be interrupted (it runs in the grammar
engine's native code): one that overruns its time limit fails its requests
(admission.py) and then runs to its end on its worker; `threads` bounds how many can
do so at once, and the size limits of spec.py bound how long each can take.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from pagedserve.structured.spec import ConstraintSpec


class ConstraintCompiler:
    def __init__(self, compile_fn: Callable[[ConstraintSpec], Any], threads: int = 2,
                 cache_size: int = 512):
        self.compile_fn = compile_fn  # replaceable (tests inject a slow one)
        self.cache_size = cache_size
        self._pool: ThreadPoolExecutor | None = None
        self._threads = threads
        self._cache: OrderedDict[ConstraintSpec, Future] = OrderedDict()
        self._lock = threading.Lock()  # submit() runs on the engine thread, evictions too
        self.num_compiles = 0
        self.num_cache_hits = 0

    def submit(self, spec: ConstraintSpec) -> Future:
        """The compile of `spec`: a cached one (done or still running) or a new one."""
        with self._lock:
            future = self._cache.get(spec)
            if future is not None:
                self._cache.move_to_end(spec)
                self.num_cache_hits += 1
                return future
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self._threads, thread_name_prefix="pagedserve-grammar")
            future = self._pool.submit(self.compile_fn, spec)
            self.num_compiles += 1
            self._cache[spec] = future
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
            return future

    def fail(self, spec: ConstraintSpec, error: ValueError) -> None:
        """Remembers `spec` as failed (a compile past its time limit): later requests for
        it are refused at once, whatever the running compile ends with."""
        failed: Future = Future()
        failed.set_exception(error)
        with self._lock:
            self._cache[spec] = failed

    def shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)

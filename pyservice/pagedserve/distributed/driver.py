"""The driver's side of tensor parallelism: start the workers, watch them, stop them.

`start_tensor_parallel` returns a runner the engine uses like a ModelRunner: rank 0's
own runner (its slice of the model) whose steps are broadcast to the workers first.

Faults: a watcher thread waits on every spawned worker's exit and report pipe. When
one raises or dies, it records why, kills the other workers (nobody waits on a
collective that cannot finish) and calls the failure callbacks; the driver's current
or next step then raises `WorkerFailedError` naming the rank, which fails the engine
(in-flight requests end with an error, health turns NOT_SERVING).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from multiprocessing.connection import wait
from typing import Callable

import torch

from pagedserve.config import EngineConfig
from pagedserve.distributed.group import Placement, join_group, leave_group, placement_from_env
from pagedserve.distributed.step import StepSender
from pagedserve.distributed.worker import (backend_for, build_rank_runner, split_cpu_threads,
                                          weight_bytes, worker_main)
from pagedserve.runner.model_runner import ModelRunner
from pagedserve.model.loader import ModelSource, load_model_config
from pagedserve.model.parallel import check_shardable

log = logging.getLogger(__name__)
_JOIN_S = 30.0  # how long a stopping worker gets before it is killed
_DIAGNOSE_S = 5.0  # how long a failed step waits for the watcher to name the cause


class WorkerFailedError(RuntimeError):
    """A tensor-parallel worker raised or died; the engine cannot continue."""


class WorkerSet:
    """The spawned worker processes of this node and a thread watching them. `target`
    is what each runs (worker_main; tests put faults there)."""

    def __init__(self, placement: Placement, config: EngineConfig, source: ModelSource,
                 target: Callable = worker_main):
        ctx = torch.multiprocessing.get_context("spawn")
        threads = config.cpu_threads or max(1, torch.get_num_threads() // placement.local_ranks)
        self.procs: dict[int, object] = {}
        self.conns: dict[int, object] = {}
        self.ready: dict[int, tuple[int, int]] = {}  # rank -> (pid, weight bytes)
        self.failure: WorkerFailedError | None = None
        self._exited: set[int] = set()  # reaped by the watcher, the only thread that reaps
        self._exiting: set[int] = set()  # reported an error and exit by themselves
        self.stopping = False
        self._callbacks: list[Callable[[BaseException], None]] = []
        self._changed = threading.Condition()
        for rank in placement.spawned_ranks:
            reader, writer = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=target, name=f"pagedserve-tp{rank}", daemon=True,
                               args=(rank, placement, config, source, threads, writer, os.getpid()))
            proc.start()
            writer.close()
            self.procs[rank], self.conns[rank] = proc, reader
        self._thread = threading.Thread(target=self._watch, name="pagedserve-tp-watch", daemon=True)
        self._thread.start()

    @property
    def pids(self) -> dict[int, int]:
        return {rank: proc.pid for rank, proc in self.procs.items()}

    def on_failure(self, callback: Callable[[BaseException], None]) -> None:
        self._callbacks.append(callback)

    def check(self) -> None:
        if self.failure is not None:
            raise self.failure

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while len(self.ready) < len(self.procs) and self.failure is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    missing = sorted(set(self.procs) - set(self.ready))
                    raise WorkerFailedError(f"tensor-parallel ranks {missing} did not finish "
                                            f"loading within {timeout_s:g}s")
                self._changed.wait(left)
        self.check()

    def wait_failure(self, timeout_s: float) -> WorkerFailedError | None:
        with self._changed:
            self._changed.wait_for(lambda: self.failure is not None, timeout_s)
        return self.failure

    def _watch(self) -> None:
        conns = {conn: rank for rank, conn in self.conns.items()}
        sentinels = {proc.sentinel: rank for rank, proc in self.procs.items()}
        while conns or sentinels:
            for handle in wait(list(conns) + list(sentinels)):
                if handle in conns:
                    self._read(handle, conns)
                elif handle in sentinels:
                    rank = sentinels.pop(handle)
                    conn = self.conns[rank]
                    while conn in conns and conn.poll():  # its last report explains the exit
                        self._read(conn, conns)
                    proc = self.procs[rank]
                    proc.join()
                    self._exited.add(rank)
                    if not self.stopping:
                        self._fail(f"tensor-parallel worker rank {rank} (pid {proc.pid}) "
                                   f"exited with status {proc.exitcode}")

    def _read(self, conn, conns: dict) -> None:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            del conns[conn]
            return
        if message[0] == "ready":
            _, rank, pid, nbytes = message
            with self._changed:
                self.ready[rank] = (pid, nbytes)
                self._changed.notify_all()
        elif message[0] == "error":
            _, rank, text = message
            self._fail(f"tensor-parallel worker rank {rank} failed:\n{text}", exiting=rank)

    def _fail(self, reason: str, exiting: int | None = None) -> None:
        """`exiting`: the rank that reported its own error and exits by itself (status
        1); the watcher reaps it like the others."""
        with self._changed:
            if exiting is not None:
                self._exiting.add(exiting)
            if self.failure is not None:
                return
            self.failure = WorkerFailedError(reason)
            self._changed.notify_all()
        log.error("%s; stopping the other workers", reason)
        self.kill()
        for callback in self._callbacks:
            try:
                callback(self.failure)
            except Exception:  # noqa: BLE001 - one broken callback must not hide the fault
                log.exception("tensor-parallel failure callback raised")

    def kill(self) -> None:
        for rank, proc in self.procs.items():
            if rank not in self._exited and rank not in self._exiting:
                try:
                    os.kill(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass  # exited meanwhile

    def join(self, timeout_s: float = _JOIN_S) -> None:
        """Waits until every worker has exited and been reaped (by the watcher, which
        ends then), killing those still there after the timeout."""
        self.stopping = True
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            log.warning("tensor-parallel workers %s did not stop within %gs; killing them",
                        sorted(set(self.procs) - self._exited), timeout_s)
            self._exiting.clear()  # one that said it would exit and did not goes too
            self.kill()
            self._thread.join()


class TensorParallelRunner:
    """Rank 0's ModelRunner (every attribute the engine reads comes from it) whose
    steps the workers run too. A step that fails because a worker went away raises
    WorkerFailedError naming it."""

    def __init__(self, runner: ModelRunner, workers: WorkerSet, placement: Placement, nbytes: int):
        self.runner = runner
        self.workers = workers
        self.placement = placement
        self._closed = False
        self.rank_weight_bytes = [nbytes] + [workers.ready[r][1] for r in sorted(workers.ready)]

    def __getattr__(self, name: str):
        return getattr(self.runner, name)

    @property
    def worker_pids(self) -> dict[int, int]:
        return self.workers.pids

    def on_failure(self, callback: Callable[[BaseException], None]) -> None:
        """`callback(error)` from the watcher thread when a worker fails, even while idle."""
        self.workers.on_failure(callback)

    def launch(self, batch, previous=None):
        self.workers.check()
        try:
            return self.runner.launch(batch, previous)
        except Exception as exc:
            failure = self.workers.wait_failure(_DIAGNOSE_S)
            self.close()
            if failure is not None and failure is not exc:
                raise failure from exc
            raise

    def execute(self, batch):
        return self.launch(batch).results()

    def shutdown(self) -> None:
        """Stops the workers (they leave the group and exit) and joins them."""
        if self._closed:
            return
        if self.workers.failure is None:
            self.workers.stopping = True
            try:
                self.runner.peers.send_stop()
            except Exception:  # noqa: BLE001 - a broken group: the workers get killed below
                log.exception("could not send the stop message to the workers")
                self.workers.kill()
        self.close()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.workers.join()
        if self.workers.failure is not None:
            _abort_group()
        else:
            leave_group()


def _abort_group() -> None:
    """Drops the process group without the collective teardown a dead peer cannot join."""
    import torch.distributed as dist

    if not dist.is_initialized():
        return
    try:
        from torch.distributed.distributed_c10d import _abort_process_group

        _abort_process_group()
    except Exception:  # noqa: BLE001 - gloo or an older torch: a plain destroy is enough
        dist.destroy_process_group()


def start_tensor_parallel(config: EngineConfig, source: ModelSource) -> TensorParallelRunner:
    """Spawns this node's workers, joins the group as rank 0 and loads rank 0's slice."""
    tp = config.tensor_parallel_size
    if source.gguf_file:
        raise ValueError(f"{source.origin}: GGUF models load with tensor_parallel_size 1 only; "
                         "use a Hugging Face safetensors directory for tensor parallelism")
    mc = load_model_config(source)
    check_shardable(mc, tp)
    placement = placement_from_env(tp)
    if not placement.is_driver:
        raise ValueError(f"this process is tensor-parallel rank {placement.first_rank} "
                         f"({placement.source} placement): it runs as a worker, not an engine")
    if config.on_gpu and torch.cuda.device_count() < placement.local_ranks:
        raise ValueError(f"tensor_parallel_size {tp} needs {placement.local_ranks} GPUs on this "
                         f"node; {torch.cuda.device_count()} visible")
    config = split_cpu_threads(config, placement.local_ranks)
    workers = WorkerSet(placement, config, source)
    try:
        control = join_group(placement, 0, backend_for(config), config.distributed_timeout_s)
        runner = build_rank_runner(config, source, placement, 0)
        workers.wait_ready(config.distributed_timeout_s)
    except BaseException as exc:
        failure = workers.failure or (workers.wait_failure(_DIAGNOSE_S)
                                      if not isinstance(exc, ValueError) else None)
        workers.kill()
        workers.join()
        _abort_group()
        if failure is not None and failure is not exc:
            raise failure from exc
        raise
    runner.peers = StepSender(control, runner.device, workers.check)
    log.info("tensor parallel: %d ranks (%s placement), rank 0 weights %.1f MiB, "
             "worker pids %s", tp, placement.source, weight_bytes(runner.model) / (1 << 20),
             " ".join(f"rank{r}={pid}" for r, pid in workers.pids.items()))
    return TensorParallelRunner(runner, workers, placement, weight_bytes(runner.model))


def serve_as_worker(config: EngineConfig) -> bool:
    """On a node whose first rank is not 0 (a LeaderWorkerSet worker pod, a torchrun
    rank > 0): run this node's ranks until the driver stops them, and return True.
    False on the driver's node, which builds the engine instead."""
    from pagedserve.distributed.worker import run_rank
    from pagedserve.model.loader import resolve_model

    placement = placement_from_env(config.tensor_parallel_size)
    if placement.is_driver:
        return False
    source = resolve_model(config.model)
    config = split_cpu_threads(config, placement.local_ranks)
    log.info("tensor-parallel worker node: ranks %d..%d of %d, group at %s:%d",
             placement.first_rank, placement.first_rank + placement.local_ranks - 1,
             placement.world_size, placement.address, placement.port)
    workers = WorkerSet(placement, config, source)
    try:
        run_rank(placement.first_rank, placement, config, source, config.cpu_threads or 1)
    finally:
        workers.stopping = True
        workers.join()
    return True

"""A tensor-parallel rank other than the driver: join the group, load this rank's
slice of the model, then run every step the driver sends until it says stop.

Spawned ranks report to the driver through a pipe: ("ready", rank, pid, weight bytes)
once loaded, ("error", rank, traceback) when anything raises (then the process exits
with status 1, which closes its sockets, so no peer waits on it). A spawned rank also
exits when its parent disappears, so a killed server leaves no worker behind.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
import traceback

import torch

from pagedserve.config import EngineConfig
from pagedserve.distributed.group import Placement, join_group, leave_group
from pagedserve.distributed.step import receive_fed_tokens, receive_step
from pagedserve.engine.batch import ScheduledBatch
from pagedserve.runner.inputs import feed_tokens
from pagedserve.runner.model_runner import ModelRunner
from pagedserve.model.loader import ModelSource
from pagedserve.model.parallel import TensorParallel

log = logging.getLogger(__name__)


def backend_for(config: EngineConfig) -> str:
    return "nccl" if config.on_gpu else "gloo"


def split_cpu_threads(config: EngineConfig, local_ranks: int) -> EngineConfig:
    """On CPU, the config every rank of this node runs with: the node's threads
    (cpu_threads, else what cpu_env plans for this process) shared out, at least one a
    rank, so N ranks do not each start a pool the size of the host."""
    if config.on_gpu:
        return config
    from pagedserve.cpu_env import plan_cpu_threads

    total = plan_cpu_threads(config.cpu_threads, current=torch.get_num_threads()).threads
    return dataclasses.replace(config, cpu_threads=max(1, total // max(1, local_ranks)))


def build_rank_runner(config: EngineConfig, source: ModelSource, placement: Placement,
                      rank: int) -> ModelRunner:
    """This rank's ModelRunner: its slice of the model on its own device. CUDA graphs
    stay off under tensor parallelism (the steps run eagerly on every rank)."""
    device = f"cuda:{placement.device_index(rank)}" if config.on_gpu else "cpu"
    if config.on_gpu:
        torch.cuda.set_device(device)
    cfg = dataclasses.replace(config, device=device)
    return ModelRunner(cfg, source=source, cuda_graphs=False,
                       tp=TensorParallel(rank, placement.world_size))


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the parameters this rank holds (tied ones once)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


@torch.inference_mode()
def serve_steps(runner: ModelRunner, control) -> None:
    """Runs the driver's steps on this rank until the stop message."""
    while True:
        message = receive_step(control)
        if message is None:
            return
        runner._cache_ops(ScheduledBatch([], message.swap_out, message.swap_in, message.copies))
        if message.host is None:
            continue
        inputs = runner.upload_inputs(message.host)
        if message.feed_rows:
            n = len(message.feed_rows)
            tokens = receive_fed_tokens(n, runner.device)
            feed_tokens(inputs.input_ids, message.feed_rows, tokens, list(range(n)))
        hidden = runner.model(inputs.input_ids, inputs.positions, inputs.metadata)
        if message.host.sample_works:  # the driver gathers the logits: take part
            runner.model.compute_logits(hidden[inputs.logit_rows])


def worker_main(rank: int, placement: Placement, config: EngineConfig, source: ModelSource,
                threads: int, conn, parent_pid: int | None) -> None:
    """Entry point of a spawned rank (torch.multiprocessing, spawn)."""
    logging.basicConfig(level=logging.INFO,
                        format=f"%(asctime)s %(levelname)s rank{rank} %(name)s: %(message)s")
    if parent_pid is not None:
        _exit_with_parent(parent_pid)
    try:
        run_rank(rank, placement, config, source, threads, conn)
    except BaseException:  # noqa: BLE001 - whatever it is, the driver must hear of it
        text = traceback.format_exc()
        log.error("tensor-parallel rank %d failed:\n%s", rank, text)
        _send(conn, ("error", rank, text))
        os._exit(1)  # no atexit handlers: a broken group's teardown could block
    os._exit(0)


def run_rank(rank: int, placement: Placement, config: EngineConfig, source: ModelSource,
             threads: int, conn=None) -> None:
    if not config.on_gpu:
        torch.set_num_threads(max(1, threads))
    control = join_group(placement, rank, backend_for(config), config.distributed_timeout_s)
    runner = build_rank_runner(config, source, placement, rank)
    _send(conn, ("ready", rank, os.getpid(), weight_bytes(runner.model)))
    log.info("tensor-parallel rank %d of %d ready", rank, placement.world_size)
    serve_steps(runner, control)
    leave_group()  # on errors the process exits instead: a broken group may not tear down


def _send(conn, message) -> None:
    if conn is None:
        return
    try:
        conn.send(message)
    except (OSError, EOFError):
        pass  # the driver is gone; the parent watch ends this process


def _exit_with_parent(parent_pid: int) -> None:
    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()

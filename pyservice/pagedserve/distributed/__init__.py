"""Tensor parallelism over torch.distributed (NCCL on GPU, gloo on CPU): placement and
process-group setup (group.py), the per-step message (step.py), the worker loop
(worker.py), and the driver that starts, watches and stops the workers (driver.py).
The sharded layers themselves live in model/parallel.py."""

from pagedserve.distributed.driver import (TensorParallelRunner, WorkerFailedError,
                                           serve_as_worker, start_tensor_parallel)
from pagedserve.distributed.group import GroupJoinError, Placement, placement_from_env

__all__ = ["GroupJoinError", "Placement", "TensorParallelRunner", "WorkerFailedError",
           "placement_from_env", "serve_as_worker", "start_tensor_parallel"]

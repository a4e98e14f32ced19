"""Where the tensor-parallel ranks run and how they find each other.

Three placements, read from the environment when the engine starts (never at import):
- one node (the default): this process is rank 0, the driver; it spawns ranks
  1..tp-1 and they meet on a free loopback port;
- LeaderWorkerSet (`LWS_LEADER_ADDRESS`, `LWS_WORKER_INDEX`, `LWS_GROUP_SIZE`): each of
  the group's pods runs tp / group_size consecutive ranks, pod 0 (the leader) from
  rank 0; they meet at the leader's address on `MASTER_PORT` (default 29500);
- torchrun (`MASTER_ADDR`, `MASTER_PORT`, `RANK`, `WORLD_SIZE`, `LOCAL_RANK`): this
  process is exactly one rank.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Mapping

DEFAULT_PORT = 29500
COLLECTIVE_TIMEOUT = timedelta(days=30)  # see join_group: collectives wait, peers' deaths end them


class GroupJoinError(RuntimeError):
    """A rank could not join the tensor-parallel process group in time."""


@dataclass(frozen=True)
class Placement:
    address: str  # rank 0's host: the process group's rendezvous
    port: int
    world_size: int  # = tensor_parallel_size
    first_rank: int  # the rank this process runs itself
    local_ranks: int  # ranks on this node, from first_rank on (this process + spawned ones)
    source: str  # "local", "lws" or "torchrun", for messages
    first_device: int = 0  # device index of first_rank on this node

    @property
    def is_driver(self) -> bool:
        return self.first_rank == 0

    @property
    def spawned_ranks(self) -> list[int]:
        return list(range(self.first_rank + 1, self.first_rank + self.local_ranks))

    def device_index(self, rank: int) -> int:
        """Which device of this node `rank` uses (cuda:<index>)."""
        return self.first_device + rank - self.first_rank

    @property
    def url(self) -> str:
        return f"tcp://{self.address}:{self.port}"


def placement_from_env(tp_size: int, env: Mapping[str, str] | None = None) -> Placement:
    """Where this process's ranks sit, from LWS's or torchrun's variables, else one node."""
    env = os.environ if env is None else env
    port = int(env.get("MASTER_PORT", DEFAULT_PORT))
    if "LWS_LEADER_ADDRESS" in env:
        nodes, index = int(env.get("LWS_GROUP_SIZE", "1")), int(env.get("LWS_WORKER_INDEX", "0"))
        if nodes < 1 or tp_size % nodes or not 0 <= index < nodes:
            raise ValueError(f"LeaderWorkerSet group of {nodes} pods (this one index {index}) "
                             f"cannot split tensor_parallel_size {tp_size} evenly")
        per_node = tp_size // nodes
        return Placement(env["LWS_LEADER_ADDRESS"], port, tp_size, index * per_node, per_node, "lws")
    if "RANK" in env and "WORLD_SIZE" in env and "MASTER_ADDR" in env:
        world, rank = int(env["WORLD_SIZE"]), int(env["RANK"])
        if world != tp_size:
            raise ValueError(f"torchrun WORLD_SIZE {world} differs from tensor_parallel_size {tp_size}")
        return Placement(env["MASTER_ADDR"], port, world, rank, 1, "torchrun",
                         first_device=int(env.get("LOCAL_RANK", "0")))
    return Placement("127.0.0.1", free_port(), tp_size, 0, tp_size, "local")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def join_group(placement: Placement, rank: int, backend: str, timeout_s: float):
    """Joins the default process group as `rank`; returns the group the per-step
    messages travel on (a CPU gloo group beside NCCL, so they never touch the GPU).

    `timeout_s` bounds the meeting only (the rendezvous store waits that long for every
    rank). Collectives get no such bound: a worker waits for the driver's next step
    as long as the server idles, and a peer that dies is noticed by its closed sockets
    (and, on the driver, by the worker watcher), not by a timer."""
    import torch.distributed as dist

    if dist.is_initialized():
        raise RuntimeError("a torch.distributed process group already exists in this process: "
                           "one tensor-parallel engine per process")
    try:
        store = dist.TCPStore(placement.address, placement.port, placement.world_size,
                              is_master=rank == 0, timeout=timedelta(seconds=timeout_s),
                              wait_for_workers=True)
        dist.init_process_group(backend, store=store, rank=rank, world_size=placement.world_size,
                                timeout=COLLECTIVE_TIMEOUT)
        control = dist.new_group(backend="gloo") if backend != "gloo" else dist.group.WORLD
        dist.barrier(group=control)  # every rank is really connected
    except Exception as exc:  # noqa: BLE001 - every failure to meet is the same story
        if dist.is_initialized():
            dist.destroy_process_group()
        else:
            _reset_group_names()
        raise GroupJoinError(
            f"tensor-parallel rank {rank} of {placement.world_size} could not join the process "
            f"group at {placement.address}:{placement.port} ({placement.source} placement) "
            f"within {timeout_s:g}s: {exc}") from exc
    return control


def _reset_group_names() -> None:
    """A failed init_process_group has still used up a group name (torch numbers
    them), and the next group this process forms would look for its peers under the
    wrong one: start counting again, as destroy_process_group does."""
    from torch.distributed import distributed_c10d

    distributed_c10d._world.group_count = 0


def leave_group() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()

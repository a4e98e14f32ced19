"""The one message per step from the driver to the workers.

The driver has already scheduled the step and built its flat inputs on the host
(ModelRunner.host_inputs); it sends those and the step's cache operations in one
broadcast of a pickled object on the control group (CPU, gloo), then every rank
uploads them to its own device and runs the forward. Tokens a decode takes from the
previous step's sampling still sit on the driver's device: they follow in a second,
device-side broadcast, only in steps that have them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from pagedserve.runner.inputs import HostInputs


@dataclass
class StepMessage:
    swap_out: list[tuple[int, int]]
    swap_in: list[tuple[int, int]]
    copies: list[tuple[int, int]]
    host: HostInputs | None  # None: only cache operations this step
    feed_rows: list[int] | None  # rows of input_ids whose token follows on the device


class StepSender:
    """Driver side, attached to the driver's ModelRunner as `peers`: `begin` takes the
    step's cache ops, `send_step` sends them with the step's inputs."""

    def __init__(self, control, device: torch.device, check_alive):
        self.control = control
        self.device = device
        self.check_alive = check_alive  # raises when a worker is known to be gone
        self._ops: tuple[list, list, list] = ([], [], [])

    def begin(self, batch) -> None:
        self._ops = (batch.swap_out, batch.swap_in, batch.copies)

    def send_step(self, host: HostInputs | None, feed_rows: list[int] | None = None,
                  feed=None) -> None:
        self.check_alive()
        message = StepMessage(*self._ops, host, feed_rows)
        self._ops = ([], [], [])
        dist.broadcast_object_list([message], src=0, group=self.control)
        if feed_rows:
            src = torch.tensor(feed[1], dtype=torch.int64).to(feed[2].device)
            dist.broadcast(feed[2].index_select(0, src).to(torch.int64).contiguous(), src=0)

    def send_stop(self) -> None:
        dist.broadcast_object_list([None], src=0, group=self.control)


def receive_step(control) -> StepMessage | None:
    """The next step's message on a worker; None when the driver stops."""
    box = [None]
    dist.broadcast_object_list(box, src=0, group=control)
    return box[0]


def receive_fed_tokens(n: int, device: torch.device) -> torch.Tensor:
    tokens = torch.empty(n, dtype=torch.int64, device=device)
    dist.broadcast(tokens, src=0)
    return tokens

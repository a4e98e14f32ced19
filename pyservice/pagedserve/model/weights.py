"""Filling a model's parameters from checkpoint tensors (Hugging Face names).

A model says where each checkpoint tensor goes (`checkpoint_target`): a parameter and
an index into it (rows of a fused projection, one expert of a stacked tensor), or
nowhere. Every element of every parameter must be written exactly once: a missing,
unknown, misshapen or doubled tensor is an error naming it, so a checkpoint of another
shape family cannot load half-way.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn

# (parameter name, index into it) or None: the tensor is not needed
Target = tuple[str, tuple] | None


@torch.no_grad()
def load_checkpoint(model: nn.Module, weights: Iterable[tuple[str, torch.Tensor]],
                    target: Callable[[str], Target], what: str) -> None:
    params = dict(model.named_parameters())
    filled = dict.fromkeys(params, 0)
    for name, tensor in weights:
        t = target(name)
        if t is None:
            continue
        pname, index = t
        if pname not in params:
            raise ValueError(f"checkpoint tensor {name} has no place in {what}")
        dst = params[pname].data[index] if index else params[pname].data
        if tuple(dst.shape) != tuple(tensor.shape):
            raise ValueError(f"checkpoint tensor {name} has shape {tuple(tensor.shape)}, "
                             f"expected {tuple(dst.shape)}")
        dst.copy_(tensor)
        filled[pname] += dst.numel()
    over = sorted(n for n, c in filled.items() if c > params[n].numel())
    if over:
        raise ValueError(f"checkpoint fills {len(over)} parameters more than once, "
                         f"e.g. {', '.join(over[:3])}")
    missing = sorted(n for n, c in filled.items() if c != params[n].numel())
    if missing:
        raise ValueError(f"checkpoint lacks weights for {len(missing)} parameters, "
                         f"e.g. {', '.join(missing[:3])}")

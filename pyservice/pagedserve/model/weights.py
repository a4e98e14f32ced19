"""Filling a model's parameters from checkpoint tensors (Hugging Face names).

A model says where each checkpoint tensor goes (`checkpoint_target`): a parameter and
an index into it (rows of a fused projection, one expert of a stacked tensor), or
nowhere. Every element of every parameter must be written exactly once: a missing,
unknown, misshapen or doubled tensor is an error naming it, so a checkpoint of another
shape family cannot load half-way.

Under tensor parallelism a target also names the part of the checkpoint tensor this
rank keeps (`Part`): the tensor may be a memory-mapped safetensors slice
(`safe_open(...).get_slice(name)`), and indexing it reads only those bytes. Its full
shape is still checked, so a checkpoint of another shape cannot pass by its slices.

A checkpoint tensor that fuses several of our shards (Phi-3's `qkv_proj` and
`gate_up_proj`, transformers 5's stacked `experts.gate_up_proj`) has a list of targets,
one per shard: each reads its own rows of the fused tensor (a rank's q rows, its k rows,
its v rows), never one contiguous slice of the whole.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, NamedTuple

import torch
from torch import nn


class Part(NamedTuple):
    """The part of a checkpoint tensor one tensor-parallel rank keeps."""

    full_shape: tuple[int, ...]  # the checkpoint tensor's shape
    index: tuple                 # this rank's rows / columns of it


# (parameter name, index into it[, part of the checkpoint tensor]) or None: not needed;
# a list of parts for a checkpoint tensor that fuses several shards
OneTarget = tuple[str, tuple] | tuple[str, tuple, Part]
Target = OneTarget | list[OneTarget] | None


def _shape(tensor: Any) -> tuple[int, ...]:
    """A torch tensor's or a safetensors slice's shape."""
    return tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else tuple(tensor.get_shape())


def _shape_error(name: str, got: tuple, expected: tuple) -> ValueError:
    return ValueError(f"checkpoint tensor {name} has shape {got}, expected {tuple(expected)}")


@torch.no_grad()
def load_checkpoint(model: nn.Module, weights: Iterable[tuple[str, Any]],
                    target: Callable[[str], Target], what: str,
                    padding: dict[str, int] | None = None) -> None:
    """`padding`: elements of a parameter no checkpoint tensor fills (a rank's vocabulary
    rows past the end, zeroed by the model); every other element is written once."""
    params = dict(model.named_parameters())
    filled = dict.fromkeys(params, 0)
    for pname, n in (padding or {}).items():
        filled[pname] += n
    for name, tensor in weights:
        t = target(name)
        if t is None:
            continue
        for one in t if isinstance(t, list) else [t]:
            pname = one[0]
            if pname not in params:
                raise ValueError(f"checkpoint tensor {name} has no place in {what}")
            filled[pname] += _copy_into(params[pname].data, name, tensor, *one[1:])
    over = sorted(n for n, c in filled.items() if c > params[n].numel())
    if over:
        raise ValueError(f"checkpoint fills {len(over)} parameters more than once, "
                         f"e.g. {', '.join(over[:3])}")
    missing = sorted(n for n, c in filled.items() if c != params[n].numel())
    if missing:
        raise ValueError(f"checkpoint lacks weights for {len(missing)} parameters, "
                         f"e.g. {', '.join(missing[:3])}")


def _copy_into(param: torch.Tensor, name: str, tensor: Any, index: tuple,
               part: Part | None = None) -> int:
    """Copies checkpoint tensor `name` (or its `part`) into param[index]; the number of
    elements written."""
    dst = param[index] if index else param
    if part is not None:
        if _shape(tensor) != tuple(part.full_shape):
            raise _shape_error(name, _shape(tensor), part.full_shape)
        tensor = tensor[part.index]
    elif _shape(tensor) != tuple(dst.shape):
        raise _shape_error(name, _shape(tensor), dst.shape)
    elif not isinstance(tensor, torch.Tensor):
        tensor = tensor[:]  # a safetensors slice: read it whole
    if tuple(dst.shape) != tuple(tensor.shape):
        raise _shape_error(name, tuple(tensor.shape), dst.shape)
    dst.copy_(tensor)
    return dst.numel()

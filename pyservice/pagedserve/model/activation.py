"""Gated activations over a fused [gate | up] projection, by the config's name."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pagedserve import ops


def act_and_mul(x: torch.Tensor, act: str) -> torch.Tensor:
    """act(gate) * up for x = [num_tokens, 2 * intermediate] holding [gate | up]."""
    if act == "silu":
        return ops.silu_and_mul(x)  # a fused kernel on CUDA
    if act == "gelu_pytorch_tanh":  # Gemma
        gate, up = x.chunk(2, dim=-1)
        return F.gelu(gate, approximate="tanh") * up
    raise ValueError(f"unsupported activation {act}")

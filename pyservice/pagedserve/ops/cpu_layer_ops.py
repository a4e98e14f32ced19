"""The decoder's element-wise layer ops on CPU: the arithmetic of ``reference.py``,
operation for operation and rounding for rounding (bitwise equal results), with fewer
passes over memory and fewer torch calls.

On CPU these ops are memory- and call-bound: a decode step runs each of them 30 times
(once per layer) over a few dozen rows, a prefill step over 2,048 rows. What changes
against the reference:

- Results are written into tensors the op just made (``mul_`` instead of a product in
  a new tensor), which saves an allocation and a cold write per op.
- RoPE's cos/sin rows depend only on the step's positions, which every layer shares:
  they are gathered and converted to the model's dtype once per step, not per layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .reference import _compute_dtype


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for x = [gate | up]; as reference.silu_and_mul (the product is
    rounded once, into silu's result)."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate).mul_(up)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """As reference.rms_norm: float32 math, rounded to x's dtype, then times weight."""
    h = x.to(_compute_dtype(x.dtype))
    inv = h.pow(2).mean(-1, keepdim=True).add_(eps).rsqrt_()
    y = (h * inv).to(x.dtype)
    if weight.dtype != y.dtype:  # the reference's type promotion decides the result's dtype
        return weight * y
    return y.mul_(weight)  # x * w == w * x exactly


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       eps: float) -> torch.Tensor:
    """residual += x (in place), then RMSNorm of the sum."""
    residual.add_(x)
    return rms_norm(residual, weight, eps)


# Per cos table (a model has one or two, e.g. Gemma 3's local and global RoPE): the
# last step's positions (a copy), the tables, the dtype, and the cos/sin rows there.
_rope_rows: dict[int, tuple] = {}
_ROPE_TABLES_KEPT = 4


def _rows_at(positions: torch.Tensor, cos_table: torch.Tensor, sin_table: torch.Tensor,
             dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin rows [n, 1, head] at `positions` in `dtype`, reused while every layer of a
    step asks for the same positions of the same tables (compared by value: a position
    buffer rewritten in place must not reuse stale rows)."""
    hit = _rope_rows.get(id(cos_table))
    if (hit is not None and hit[1] is cos_table and hit[2] is sin_table and hit[3] == dtype
            and hit[0].shape == positions.shape and torch.equal(hit[0], positions)):
        return hit[4], hit[5]
    pos = positions.to(device=cos_table.device, dtype=torch.long)
    cos = cos_table[pos].unsqueeze(1).to(device=positions.device, dtype=dtype)
    sin = sin_table[pos].unsqueeze(1).to(device=positions.device, dtype=dtype)
    _rope_rows.pop(id(cos_table), None)
    while len(_rope_rows) >= _ROPE_TABLES_KEPT:  # tables of models gone: drop the oldest
        _rope_rows.pop(next(iter(_rope_rows)))
    # the tables are held, so their ids cannot be reused by other tensors meanwhile
    _rope_rows[id(cos_table)] = (positions.clone(), cos_table, sin_table, dtype, cos, sin)
    return cos, sin


def rotary_embedding(x: torch.Tensor, positions: torch.Tensor, cos_table: torch.Tensor,
                     sin_table: torch.Tensor) -> None:
    """As reference.rotary_embedding: x <- x * cos + swap_halves(x) * sin, in place,
    each product and the sum rounded to x's dtype."""
    cos, sin = _rows_at(positions, cos_table, sin_table, x.dtype)
    half = x.shape[-1] // 2
    swapped = torch.cat((x[..., half:], x[..., :half]), dim=-1)
    x.copy_((x * cos).add_(swapped.mul_(sin)))

"""CUDA path of the fused layer ops (cuda/layer_ops.cuh): checks torch tensors, picks
the launch shape and calls the active loader with raw pointers and torch's current
stream. Shapes the kernels do not take (a row that is not a whole number of 16-byte
vectors) fall back to the torch form in ``reference``."""

from __future__ import annotations

import torch

from . import reference
from ._cuda_ops import DTYPE_CODES, _stream
from .device_state import cuda_device
from .loaders import get_loader

_VEC_BYTES = 16
# Rows of x up to which `linear` streams the weight through the GEMV kernel: at 1 and 2
# it beat torch's (cuBLAS) on every Llama-3-8B projection in benchmarks/gemv.py on the
# H100, at 4 it tied, at 8 cuBLAS won by ~15%.
GEMV_MAX_ROWS = 2
# Weight rows per warp: 4 when that still gives this many CTAs per SM, else 1.
_GEMV_CTAS_PER_SM = 8


def _vec(x: torch.Tensor) -> int:
    """Elements per 16-byte vector."""
    return _VEC_BYTES // x.element_size()


def _aligned(x: torch.Tensor, row: int) -> bool:
    """Rows of `row` elements are whole vectors, start aligned and are a vector apart."""
    es = x.element_size()
    return (x.dtype in DTYPE_CODES and row % _vec(x) == 0 and x.data_ptr() % _VEC_BYTES == 0
            and (x.stride(0) * es) % _VEC_BYTES == 0)


def _threads(vectors: int, most: int) -> int:
    """Threads per CTA: one per vector of a row, whole warps, at most `most`."""
    return max(32, min(most, -(-vectors // 32) * 32))


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    n, width = x.shape
    inter = width // 2
    x = x if x.is_contiguous() else x.contiguous()
    if not _aligned(x, inter):
        return reference.silu_and_mul(x)
    out = torch.empty(n, inter, dtype=x.dtype, device=x.device)
    vectors = inter // _vec(x)
    threads = _threads(vectors, 256)
    with torch.cuda.device(x.device):
        get_loader().silu_and_mul(dtype=DTYPE_CODES[x.dtype], out=out.data_ptr(), x=x.data_ptr(),
                                  num_tokens=n, inter=inter, threads=threads,
                                  chunks=-(-vectors // threads), stream=_stream(x))
    return out


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       eps: float) -> torch.Tensor:
    n, hidden = x.shape
    ok = (x.is_contiguous() and residual.is_contiguous() and weight.is_contiguous()
          and x.dtype == residual.dtype == weight.dtype and residual.shape == x.shape
          and all(_aligned(t, hidden) for t in (x, residual, weight.view(1, -1))))
    if not ok:
        return reference.fused_add_rms_norm(x, residual, weight, eps)
    out = torch.empty_like(x)
    with torch.cuda.device(x.device):
        get_loader().fused_add_rms_norm(
            dtype=DTYPE_CODES[x.dtype], out=out.data_ptr(), residual=residual.data_ptr(),
            x=x.data_ptr(), weight=weight.data_ptr(), num_tokens=n, hidden=hidden, eps=eps,
            threads=_threads(hidden // _vec(x), 1024), stream=_stream(x))
    return out


def rotary_embedding(x: torch.Tensor, positions: torch.Tensor, cos_table: torch.Tensor,
                     sin_table: torch.Tensor) -> None:
    n, heads, head_size = x.shape
    ok = (x.stride(2) == 1 and x.stride(1) == head_size and head_size % 2 == 0
          and _aligned(x, head_size // 2) and positions.dtype == torch.int64
          and positions.is_contiguous() and positions.device == x.device
          and cos_table.dtype == sin_table.dtype == torch.float32
          and cos_table.is_contiguous() and sin_table.is_contiguous()
          and cos_table.shape[-1] == head_size and cos_table.device == x.device)
    if not ok:
        return reference.rotary_embedding(x, positions, cos_table, sin_table)
    vectors = heads * (head_size // 2) // _vec(x)
    with torch.cuda.device(x.device):
        get_loader().rotary(dtype=DTYPE_CODES[x.dtype], x=x.data_ptr(), row_stride=x.stride(0),
                            positions=positions.data_ptr(), cos_table=cos_table.data_ptr(),
                            sin_table=sin_table.data_ptr(), num_tokens=n, num_heads=heads,
                            head_size=head_size, threads=_threads(vectors, 128), stream=_stream(x))


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ weight.T (+ bias). Up to GEMV_MAX_ROWS rows of 16-bit x go through the GEMV
    kernel (the weight streamed once at the memory bandwidth); anything else is torch's."""
    m, k = x.shape if x.dim() == 2 else (0, 0)
    ok = (1 <= m <= GEMV_MAX_ROWS and x.dtype in (torch.float16, torch.bfloat16)
          and weight.dtype == x.dtype and weight.dim() == 2 and weight.shape[1] == k
          and x.is_contiguous() and weight.is_contiguous() and weight.device == x.device
          and _aligned(x, k) and _aligned(weight, k))
    if not ok:
        return torch.nn.functional.linear(x, weight, bias)
    out = gemv(x, weight)
    return out if bias is None else out.add_(bias)


def gemv(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight.T through the GEMV kernel, for 1 to 8 rows of x (contiguous, 16-bit,
    rows of whole 16-byte vectors: `linear` checks)."""
    m, k = x.shape
    n = weight.shape[0]
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out
    with torch.cuda.device(x.device):
        wide = -(-n // 16) >= _GEMV_CTAS_PER_SM * cuda_device(x.device).num_sms
        rows_per_warp = 4 if wide else 1
        loader = get_loader()
        grid = loader.launch_table().gemv_grid(m, n, rows_per_warp)
        loader.gemv(dtype=DTYPE_CODES[x.dtype], out=out.data_ptr(), x=x.data_ptr(),
                    w=weight.data_ptr(), m=m, n=n, k=k, rows_per_warp=rows_per_warp,
                    grid_x=grid[0], stream=_stream(x))
    return out

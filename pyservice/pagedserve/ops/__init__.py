"""Paged-attention and KV-cache ops, dispatched by device.

CPU tensors run the compiled decode kernel (``cpu_kernels.py``: float32 and bfloat16,
reading the pool in place; ``cpu_attention.py`` runs prefill through it, each new token
one query, and writes the KV cache), ``cpu_layer_ops.py`` (the element-wise layer ops, bitwise as the reference)
and the torch reference (``reference.py``, also the float64 oracle of every test) for
the cache ops; CUDA tensors run the
kernels of cuda/ through the compiled ``pagedserve._cuda`` module or, when the
package was built without nvcc, through CuPy/NVRTC (``loaders.py``).

KV caches are [num_blocks, num_kv_heads, block_size, head_size] on every
device; callers create them with ``allocate_kv_cache`` and never index them.
"""

from __future__ import annotations

import torch

from . import cpu_attention, cpu_kernels, cpu_layer_ops, reference, sliding_window
from .loaders import available_loaders, get_loader, set_loader

__all__ = [
    "allocate_kv_cache", "write_kv", "decode_attention", "prefill_attention", "copy_blocks",
    "swap_blocks", "silu_and_mul", "fused_add_rms_norm", "rotary_embedding", "linear",
    "set_loader", "get_loader", "available_loaders", "cuda_device",
]


def cuda_device(device=None):
    """The ops' state of one CUDA device (device_state.CudaDevice): its launch options
    (``with ops.cuda_device(0).override(decode_tc_stages=3): ...``), plans and buffers."""
    from .device_state import cuda_device as lookup  # lazily: CPU-only installs never touch it

    return lookup(device)


def _cuda():
    from . import _cuda_ops  # imported lazily: CPU-only installs never touch it

    return _cuda_ops


def _cuda_layer():
    from . import _cuda_layer_ops

    return _cuda_layer_ops


def allocate_kv_cache(num_blocks: int, block_size: int, num_kv_heads: int, head_size: int,
                      dtype: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    for name, v in (("num_blocks", num_blocks), ("block_size", block_size),
                    ("num_kv_heads", num_kv_heads), ("head_size", head_size)):
        if not isinstance(v, int) or v <= 0:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    return reference.allocate_kv_cache(num_blocks, block_size, num_kv_heads, head_size, dtype, device)


def write_kv(key, value, key_cache, value_cache, slot_mapping) -> None:
    if key_cache.is_cuda:
        return _cuda().write_kv(key, value, key_cache, value_cache, slot_mapping)
    if key_cache.device.type == "cpu" and key.device.type == "cpu":
        return cpu_attention.write_kv(key, value, key_cache, value_cache, slot_mapping)
    return reference.write_kv(key, value, key_cache, value_cache, slot_mapping)


def decode_attention(query, key_cache, value_cache, block_tables, context_lens, scale: float,
                     out=None, window: int | None = None):
    """out: optional contiguous tensor shaped like query to write into (returned).
    window: a sliding window (keys less than `window` positions back), any device."""
    if query.device.type == "cpu" and cpu_kernels.supports(query, key_cache):
        return cpu_kernels.decode_attention(query, key_cache, value_cache, block_tables,
                                            context_lens, scale, out=out, window=window)
    if window is not None:
        return sliding_window.decode_attention(query, key_cache, value_cache, block_tables,
                                               context_lens, scale, window, out=out)
    if query.is_cuda:
        return _cuda().decode_attention(query, key_cache, value_cache, block_tables, context_lens,
                                        scale, out)
    # CPU dtypes the kernel does not take (float16, float64): the reference.
    got = reference.decode_attention(query, key_cache, value_cache, block_tables, context_lens,
                                     scale)
    return got if out is None else out.copy_(got)


def prefill_attention(query, key_cache, value_cache, block_tables, query_start_loc, context_lens,
                      scale: float, out=None, window: int | None = None):
    """out: optional contiguous tensor shaped like query to write into (returned).
    window: a sliding window (keys less than `window` positions back), any device."""
    if query.device.type == "cpu":
        return cpu_attention.prefill_attention(query, key_cache, value_cache, block_tables,
                                               query_start_loc, context_lens, scale, out=out,
                                               window=window)
    if window is not None:
        return sliding_window.prefill_attention(query, key_cache, value_cache, block_tables,
                                                query_start_loc, context_lens, scale, window,
                                                out=out)
    return _cuda().prefill_attention(query, key_cache, value_cache, block_tables,
                                     query_start_loc, context_lens, scale, out)


def copy_blocks(key_caches: list, value_caches: list, block_mapping) -> None:
    caches = list(key_caches) + list(value_caches)
    if caches and caches[0].is_cuda:
        return _cuda().copy_blocks(key_caches, value_caches, block_mapping)
    return reference.copy_blocks(key_caches, value_caches, block_mapping)


def swap_blocks(src_cache, dst_cache, block_mapping) -> None:
    """dst[d] <- src[s] for every (s, d) pair. src_cache / dst_cache: one cache each, or
    equal-length sequences of caches paired by index (every layer's K and V caches):
    the CUDA path then moves all of them in one launch or one batch of copies."""
    srcs = [src_cache] if isinstance(src_cache, torch.Tensor) else list(src_cache)
    dsts = [dst_cache] if isinstance(dst_cache, torch.Tensor) else list(dst_cache)
    if srcs and dsts and (srcs[0].is_cuda or dsts[0].is_cuda):
        return _cuda().swap_blocks(srcs, dsts, block_mapping)
    if len(srcs) != len(dsts):
        raise ValueError(f"src_cache has {len(srcs)} caches but dst_cache has {len(dsts)}")
    for s, d in zip(srcs, dsts):
        reference.swap_blocks(s, d, block_mapping)


# ---- fused layer ops (decoder element-wise work) ----

def silu_and_mul(x):
    """silu(gate) * up for x = [num_tokens, 2 * intermediate] holding [gate | up]."""
    if x.is_cuda:
        return _cuda_layer().silu_and_mul(x)
    return cpu_layer_ops.silu_and_mul(x)


def fused_add_rms_norm(x, residual, weight, eps: float):
    """residual += x in place; returns RMSNorm(residual) * weight. [num_tokens, hidden]."""
    if x.is_cuda:
        return _cuda_layer().fused_add_rms_norm(x, residual, weight, eps)
    return cpu_layer_ops.fused_add_rms_norm(x, residual, weight, eps)


def rotary_embedding(x, positions, cos_table, sin_table) -> None:
    """Rotate-half RoPE in place on x [num_tokens, heads, head_size] at int64 `positions`;
    cos/sin are float32 [max_positions, head_size] tables (sign folded into sin)."""
    if x.is_cuda:
        return _cuda_layer().rotary_embedding(x, positions, cos_table, sin_table)
    return cpu_layer_ops.rotary_embedding(x, positions, cos_table, sin_table)


def linear(x, weight, bias=None):
    """x @ weight.T (+ bias), torch's Linear. On CUDA a batch of a few rows in 16-bit
    (a small decode step) runs a GEMV kernel that streams the weight once."""
    if x.is_cuda:
        return _cuda_layer().linear(x, weight, bias)
    return torch.nn.functional.linear(x, weight, bias)

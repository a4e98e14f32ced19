"""The compiled CPU kernels (native/cpu_kernels -> pagedserve._cpu_kernels), with the
checks they need from the caller: the kernels take data pointers, so every dtype,
device and layout is checked here, and the kernels check every index they follow.

Decode attention reads K and V where they lie in the pool, through the block tables:
the bytes of each context are read once, with no gathered copy and no padding
(docs/kernels.md). It runs on torch's intra-op threads: the module links OpenMP by
soname and is imported after torch, so both share torch's runtime and its pool.
"""

from __future__ import annotations

import torch

from pagedserve import _cpu_kernels

_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1}


def supports(query: torch.Tensor, key_cache: torch.Tensor) -> bool:
    """Whether decode_attention takes these dtypes (float32 and bfloat16, any mix)."""
    return query.dtype in _DTYPE_CODES and key_cache.dtype in _DTYPE_CODES


def _rows(x: torch.Tensor, name: str) -> int:
    """Row stride of a [rows, heads, head_size] tensor whose rows are each contiguous."""
    if x.dim() != 3 or x.device.type != "cpu":
        raise ValueError(f"{name} must be a 3-d CPU tensor, got {tuple(x.shape)} on {x.device}")
    if x.stride(2) != 1 or x.stride(1) != x.shape[2]:
        raise ValueError(f"{name} must have contiguous rows (strides {x.stride()})")
    return x.stride(0)


def _int32(x: torch.Tensor) -> torch.Tensor:
    return x.to(device="cpu", dtype=torch.int32).contiguous()


def decode_attention(query, key_cache, value_cache, block_tables, context_lens, scale: float,
                     out=None, window: int | None = None) -> torch.Tensor:
    """As reference.decode_attention (sliding window: keys fewer than `window` positions
    back). query [S, H, D]; caches [N, Hkv, bs, D]; block_tables [S, max_blocks];
    context_lens [S]; out: a tensor shaped and typed like query to write into."""
    num_seqs, num_heads, head_size = query.shape
    num_blocks, num_kv_heads, block_size, cache_head_size = key_cache.shape
    if not supports(query, key_cache) or value_cache.dtype != key_cache.dtype:
        raise ValueError(f"unsupported dtypes: query {query.dtype}, caches {key_cache.dtype} "
                         f"and {value_cache.dtype}")
    if value_cache.shape != key_cache.shape or cache_head_size != head_size:
        raise ValueError(f"caches {tuple(key_cache.shape)} / {tuple(value_cache.shape)} do not "
                         f"match query {tuple(query.shape)}")
    if not (key_cache.is_contiguous() and value_cache.is_contiguous()):
        raise ValueError("the KV caches must be contiguous")
    if out is None:
        out = torch.empty(num_seqs, num_heads, head_size, dtype=query.dtype)
    elif out.shape != query.shape or out.dtype != query.dtype:
        raise ValueError(f"out {tuple(out.shape)} {out.dtype} must match query "
                         f"{tuple(query.shape)} {query.dtype}")
    if num_seqs == 0:
        return out
    tables, lens = _int32(block_tables), _int32(context_lens)
    if tables.dim() != 2 or tables.shape[0] != num_seqs or lens.shape != (num_seqs,):
        raise ValueError(f"block_tables {tuple(tables.shape)} and context_lens "
                         f"{tuple(lens.shape)} must have one row per query")
    with torch.profiler.record_function("pagedserve::paged_decode_attention"):  # named in profiles
        _cpu_kernels.paged_decode_attention(
            out=out.data_ptr(), out_stride=_rows(out, "out"),
            query=query.data_ptr(), query_stride=_rows(query, "query"),
            io_dtype=_DTYPE_CODES[query.dtype],
            key_cache=key_cache.data_ptr(), value_cache=value_cache.data_ptr(),
            cache_dtype=_DTYPE_CODES[key_cache.dtype],
            block_tables=tables.data_ptr(), block_table_stride=tables.stride(0),
            context_lens=lens.data_ptr(), num_seqs=num_seqs, num_heads=num_heads,
            num_kv_heads=num_kv_heads, head_size=head_size, block_size=block_size,
            num_blocks=num_blocks, scale=float(scale), window=int(window or 0),
            num_threads=torch.get_num_threads())
    return out

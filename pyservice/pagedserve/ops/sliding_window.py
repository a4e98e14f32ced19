"""Paged attention for sliding-window layers, on every device.

A windowed query at position p sees keys p - window < k <= p (transformers' mask).
Decode reads only the blocks the window can touch (at most (window + bs - 2) // bs + 1
per sequence, whatever the context length), found on the device from the context
lengths: no host synchronisation, so CUDA graphs capture it like the decode kernel.
Prefill masks the reference's varlen causal attention by the window; it reads each
sequence's whole context, which is correct at any length and costs what full attention
costs (the CUDA prefill kernels have no window: windowed layers come here instead).

Out-of-window slots are zeroed in the gathered copy (never in the pool) before the
scores, so stale or non-finite bytes of a reused block cannot reach the result.
"""

from __future__ import annotations

import torch

from . import reference


def window_blocks(window: int, block_size: int) -> int:
    """Most blocks `window` consecutive positions can span."""
    return (window + block_size - 2) // block_size + 1


def decode_attention(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                     block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float,
                     window: int, out: torch.Tensor | None = None) -> torch.Tensor:
    num_seqs, num_heads, d = query.shape
    num_blocks, hkv, bs, _ = key_cache.shape
    group = num_heads // hkv
    if out is None:
        out = torch.empty_like(query)
    if num_seqs == 0:
        return out
    dev = query.device
    nwb = window_blocks(window, bs)
    ctx = context_lens.to(device=dev, dtype=torch.long)
    last = (ctx - 1).clamp(min=0) // bs                                       # [S]
    blk = last[:, None] - (nwb - 1) + torch.arange(nwb, device=dev)[None, :]  # [S, nwb] logical
    tables = block_tables.to(device=dev, dtype=torch.long)
    ids = tables.gather(1, blk.clamp(0, tables.shape[1] - 1)).clamp(0, num_blocks - 1)
    pos = (blk[:, :, None] * bs + torch.arange(bs, device=dev)).reshape(num_seqs, nwb * bs)
    valid = (pos >= 0) & (pos < ctx[:, None]) & (pos >= (ctx - window)[:, None])
    cd = torch.float64 if query.dtype == torch.float64 else torch.float32

    def gather(cache):
        x = cache[ids].permute(0, 2, 1, 3, 4).reshape(num_seqs, hkv, nwb * bs, d).to(cd)
        return x.masked_fill(~valid[:, None, :, None], 0)

    k, v = gather(key_cache), gather(value_cache)
    q = query.to(cd).view(num_seqs, hkv, group, d)
    scores = torch.einsum("shgd,shld->shgl", q, k) * scale
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # an empty context gives zeros
    o = torch.einsum("shgl,shld->shgd", probs, v).reshape(num_seqs, num_heads, d)
    out.copy_(o)
    return out


def prefill_attention(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                      block_tables: torch.Tensor, query_start_loc: torch.Tensor,
                      context_lens: torch.Tensor, scale: float, window: int,
                      out: torch.Tensor | None = None) -> torch.Tensor:
    o = reference.prefill_attention(query, key_cache, value_cache, block_tables,
                                    query_start_loc, context_lens, scale, window=window)
    if out is None:
        return o
    out.copy_(o)
    return out

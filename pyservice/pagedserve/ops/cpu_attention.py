"""Paged prefill attention and KV writes for CPU tensors (the engine's CPU path).

Prefill runs through the compiled decode kernel (``cpu_kernels.py``): each new token is
one query over its own prefix, its sequence's block table and a context of its
position + 1 keys. The kernel reads K and V where they lie in the pool, never past a
context (stale or non-finite bytes of a reused block cannot reach a result), and the
rows of consecutive tokens of a sequence come from cache. Against the length-grouped
gathers and batched matmuls this replaced, one thread, SmolLM2's heads: 1.4-1.6x faster
in float32 and bfloat16 (docs/kernels.md), and the bfloat16 scores are never rounded to
bfloat16. Sliding windows and cached prefixes need nothing more: a window is the
kernel's, a cached prefix is just a longer context. CPU dtypes the kernel does not take
(float16, float64) run the reference.

``reference.py`` stays the float64 oracle.
"""

from __future__ import annotations

import torch

from . import cpu_kernels, reference, sliding_window

_cache: dict[str, tuple] = {}


def _cached_plan(kind: str, key: tuple, tensors: tuple, build):
    """Reuse the last plan of this kind while its inputs are equal (every layer of a
    step passes the same block tables and lengths)."""
    hit = _cache.get(kind)
    if hit is not None and hit[0] == key and all(
            a.shape == b.shape and torch.equal(a, b) for a, b in zip(hit[1], tensors)):
        return hit[2]
    plan = build()
    _cache[kind] = (key, tuple(t.clone() for t in tensors), plan)
    return plan


# ---------------------------------------------------------------- cache writes

def _slot_plan(slot_mapping: torch.Tensor, block_size: int):
    slots = slot_mapping.to(device="cpu", dtype=torch.long)
    keep = slots >= 0
    if bool(keep.all()):
        return None, slots // block_size, slots % block_size
    slots = slots[keep]
    return keep, slots // block_size, slots % block_size


def write_kv(key, value, key_cache, value_cache, slot_mapping) -> None:
    """As reference.write_kv (token t's K/V to slot slot_mapping[t], negative slots
    skipped), with the slots' (block, offset) computed once per step: every layer
    writes the same slots."""
    block_size = key_cache.shape[2]
    keep, blk, off = _cached_plan("slots", (block_size,), (slot_mapping,),
                                  lambda: _slot_plan(slot_mapping, block_size))
    if keep is not None:
        key, value = key[keep], value[keep]
    # Advanced indices around a slice put the token dimension first: [n, Hkv, D].
    key_cache[blk, :, off] = key.to(key_cache.dtype)
    value_cache[blk, :, off] = value.to(value_cache.dtype)


# ---------------------------------------------------------------- prefill

def _token_queries(block_tables, query_start_loc, context_lens):
    """Per new token: its sequence's block table and its context (position + 1)."""
    qsl = query_start_loc.to(device="cpu", dtype=torch.long)
    ctx = context_lens.to(device="cpu", dtype=torch.long)
    n_new = qsl[1:] - qsl[:-1]
    if bool((n_new < 0).any()) or bool((ctx < n_new).any()):
        raise ValueError("context_lens must be >= the new tokens of each sequence "
                         "(query_start_loc steps) and query_start_loc non-decreasing")
    seq = torch.repeat_interleave(torch.arange(n_new.numel()), n_new)
    index = torch.arange(seq.numel()) - qsl[:-1][seq]   # the token's index in its chunk
    lens = (ctx - n_new)[seq] + index + 1
    tables = block_tables.to("cpu").index_select(0, seq).to(torch.int32)
    return tables, lens.to(torch.int32)


def prefill_attention(query, key_cache, value_cache, block_tables, query_start_loc, context_lens,
                      scale: float, out=None, window: int | None = None):
    """As reference.prefill_attention (with `window`: keys fewer than `window`
    positions back). query [T, H, D]: the new tokens of every sequence, packed."""
    if not cpu_kernels.supports(query, key_cache):
        if window is not None:
            return sliding_window.prefill_attention(query, key_cache, value_cache, block_tables,
                                                    query_start_loc, context_lens, scale,
                                                    window, out=out)
        got = reference.prefill_attention(query, key_cache, value_cache, block_tables,
                                          query_start_loc, context_lens, scale)
        return got if out is None else out.copy_(got)
    tables, lens = _cached_plan("prefill", (), (block_tables, query_start_loc, context_lens),
                                lambda: _token_queries(block_tables, query_start_loc, context_lens))
    if lens.numel() != query.shape[0]:
        raise ValueError(f"query has {query.shape[0]} rows; query_start_loc counts {lens.numel()} "
                         "new tokens")
    return cpu_kernels.decode_attention(query, key_cache, value_cache, tables, lens, scale,
                                        out=out, window=window)

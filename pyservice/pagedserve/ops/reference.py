"""Torch reference of every paged op.

This is the CPU attention path of the engine and, run in float64, the oracle
of the GPU tests, so it is vectorised over sequences: a batch gathers its
blocks through the block tables in one indexing operation and masks what lies
past each context, with no Python loop over sequences.

KV cache layout (shared with the CUDA kernels, see docs/kernels.md):
    key_cache, value_cache: [num_blocks, num_kv_heads, block_size, head_size]
Slot s of the pool is (block s // block_size, offset s % block_size).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def allocate_kv_cache(num_blocks: int, block_size: int, num_kv_heads: int, head_size: int,
                      dtype: torch.dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-filled K and V pools (zeros keep never-written slots finite)."""
    shape = (num_blocks, num_kv_heads, block_size, head_size)
    return (torch.zeros(shape, dtype=dtype, device=device),
            torch.zeros(shape, dtype=dtype, device=device))


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _gather(cache: torch.Tensor, block_tables: torch.Tensor, num_blocks: int,
            valid: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[S, Hkv, num_blocks * bs, D] of each sequence's tokens in order; slots
    past the context are zeroed so stale bytes can never reach the result."""
    ids = block_tables[:, :num_blocks].long().clamp(0, cache.shape[0] - 1)  # padding ids are masked
    x = cache[ids]                                   # [S, nb, Hkv, bs, D]
    s, nb, hkv, bs, d = x.shape
    x = x.permute(0, 2, 1, 3, 4).reshape(s, hkv, nb * bs, d).to(dtype)
    return x.masked_fill(~valid[:, None, :, None], 0)


def decode_attention(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                     block_tables: torch.Tensor, context_lens: torch.Tensor,
                     scale: float, window: int | None = None) -> torch.Tensor:
    """One query token per sequence over its whole cached context, or over its last
    `window` positions (itself included) when a sliding window is given."""
    num_seqs, num_heads, head_size = query.shape
    num_kv_heads, block_size = key_cache.shape[1], key_cache.shape[2]
    group = num_heads // num_kv_heads
    if num_seqs == 0:
        return torch.empty_like(query)
    ctx = context_lens.to(device=query.device, dtype=torch.long)
    nb = max(1, -(-int(ctx.max()) // block_size))
    pos = torch.arange(nb * block_size, device=query.device)[None, :]
    valid = pos < ctx[:, None]  # [S, L]
    if window is not None:
        valid &= pos >= (ctx - window)[:, None]
    cd = _compute_dtype(query.dtype)
    k = _gather(key_cache, block_tables, nb, valid, cd)
    v = _gather(value_cache, block_tables, nb, valid, cd)
    q = query.to(cd).view(num_seqs, num_kv_heads, group, head_size)
    scores = torch.einsum("shgd,shld->shgl", q, k) * scale
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # an empty context gives zeros
    out = torch.einsum("shgl,shld->shgd", probs, v)
    return out.reshape(num_seqs, num_heads, head_size).to(query.dtype)


def prefill_attention(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                      block_tables: torch.Tensor, query_start_loc: torch.Tensor,
                      context_lens: torch.Tensor, scale: float,
                      window: int | None = None) -> torch.Tensor:
    """Varlen causal attention of packed new tokens over cached prefix + themselves;
    with a sliding window, each token sees only keys less than `window` positions back."""
    num_tokens, num_heads, head_size = query.shape
    num_kv_heads, block_size = key_cache.shape[1], key_cache.shape[2]
    group = num_heads // num_kv_heads
    if num_tokens == 0:
        return torch.empty_like(query)
    dev = query.device
    qsl = query_start_loc.to(device=dev, dtype=torch.long)
    ctx = context_lens.to(device=dev, dtype=torch.long)
    n_new = qsl[1:] - qsl[:-1]
    num_seqs = n_new.numel()
    max_q, nb = int(n_new.max()), max(1, -(-int(ctx.max()) // block_size))
    L = nb * block_size

    # Pad the packed queries to [S, max_q]: token t is row t - qsl[seq] of its sequence.
    seq_of = torch.repeat_interleave(torch.arange(num_seqs, device=dev), n_new)
    row_of = torch.arange(num_tokens, device=dev) - qsl[seq_of]
    cd = _compute_dtype(query.dtype)
    q = torch.zeros(num_seqs, max_q, num_heads, head_size, dtype=cd, device=dev)
    q[seq_of, row_of] = query.to(cd)

    valid = torch.arange(L, device=dev)[None, :] < ctx[:, None]
    k = _gather(key_cache, block_tables, nb, valid, cd)
    v = _gather(value_cache, block_tables, nb, valid, cd)
    # Row i of sequence s sits at position ctx - n_new + i and sees keys 0..that position.
    pos = (ctx - n_new)[:, None] + torch.arange(max_q, device=dev)[None, :]          # [S, max_q]
    keys = torch.arange(L, device=dev)[None, None, :]
    mask = keys <= pos[:, :, None]                                                # [S, max_q, L]
    if window is not None:
        mask &= keys > pos[:, :, None] - window
    # padded rows must not be fully masked (NaN); they are dropped below
    padded = torch.arange(max_q, device=dev)[None, :] >= n_new[:, None]
    mask[:, :, 0] |= padded
    # GQA without copying K/V: fold the group into the query rows of each KV head.
    q = q.view(num_seqs, max_q, num_kv_heads, group, head_size).permute(0, 2, 3, 1, 4)
    q = q.reshape(num_seqs, num_kv_heads, group * max_q, head_size)
    m = mask[:, None].expand(num_seqs, group, max_q, L).reshape(num_seqs, 1, group * max_q, L)
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=m, scale=scale)
    o = o.view(num_seqs, num_kv_heads, group, max_q, head_size).permute(0, 3, 1, 2, 4)
    o = o.reshape(num_seqs, max_q, num_heads, head_size)
    return o[seq_of, row_of].to(query.dtype)


def write_kv(key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor,
             value_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Store token t's K/V at slot slot_mapping[t]; negative slots are skipped."""
    block_size = key_cache.shape[2]
    slots = slot_mapping.to(device=key.device, dtype=torch.long)
    keep = slots >= 0
    slots = slots[keep]
    blk, off = slots // block_size, slots % block_size
    # Advanced indices around a slice put the token dimension first: [n, Hkv, D].
    key_cache[blk, :, off] = key[keep].to(key_cache.dtype)
    value_cache[blk, :, off] = value[keep].to(value_cache.dtype)


def _pairs(block_mapping: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
    m = block_mapping.to(dtype=torch.long).reshape(-1, 2)
    return m[:, 0].to(device), m[:, 1].to(device)


def copy_blocks(key_caches: list, value_caches: list, block_mapping: torch.Tensor) -> None:
    """dst block <- src block, for every (src, dst) pair in every layer."""
    for cache in list(key_caches) + list(value_caches):
        src, dst = _pairs(block_mapping, cache.device)
        cache[dst] = cache[src]


def swap_blocks(src_cache: torch.Tensor, dst_cache: torch.Tensor,
                block_mapping: torch.Tensor) -> None:
    """dst_cache[dst] <- src_cache[src] across devices (GPU <-> pinned CPU)."""
    src, dst = _pairs(block_mapping, "cpu")
    dst_cache[dst.to(dst_cache.device)] = src_cache[src.to(src_cache.device)].to(dst_cache.device)


# ---- fused layer ops: the CPU path of the model and the oracle of the CUDA kernels ----
# In the model's dtype, rounding after each op exactly as the unfused model code did;
# given float64 tensors they compute in float64.

def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for x = [gate | up] along the last dimension."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """In float32 (float64 for float64 input) whatever the storage dtype."""
    h = x.to(_compute_dtype(x.dtype))
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       eps: float) -> torch.Tensor:
    """residual += x (in place), then RMSNorm of the sum."""
    residual.add_(x)
    return rms_norm(residual, weight, eps)


def rotary_embedding(x: torch.Tensor, positions: torch.Tensor, cos_table: torch.Tensor,
                     sin_table: torch.Tensor) -> None:
    """Rotate-half RoPE in place on x [num_tokens, heads, head_size] (a view may be
    strided between tokens). cos/sin: [max_positions, head_size] tables with the sign
    of rotate-half folded into sin, so x * cos + swap_halves(x) * sin is the rotation."""
    pos = positions.to(device=cos_table.device, dtype=torch.long)
    cos = cos_table[pos].unsqueeze(1).to(device=x.device, dtype=x.dtype)
    sin = sin_table[pos].unsqueeze(1).to(device=x.device, dtype=x.dtype)
    half = x.shape[-1] // 2
    swapped = torch.cat((x[..., half:], x[..., :half]), dim=-1)
    x.copy_(x * cos + swapped * sin)

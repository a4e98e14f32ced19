"""Paged prefill attention and KV writes for CPU tensors (the engine's CPU path;
decode attention is the compiled kernel of ``cpu_kernels.py``).

``reference.py`` stays the float64 oracle; this module computes the same thing with
less memory traffic:

- Prefill sequences are grouped by length (a small dynamic program over the sorted
  block counts trades padding against per-group overhead) and every group is gathered
  with one ``index_select`` of whole (block, KV head) rows in the dtype of the cache,
  straight into the layout attention wants ([seq, kv head, token, dim]). Groups are
  capped in bytes so that the gathered copy is still in cache when it is read back.
- A group runs ``scaled_dot_product_attention`` (fused, fp32 accumulation in bf16)
  with ``is_causal`` when no sequence of the group has a cached prefix, else with a
  boolean mask aligned to each sequence's end; small 16-bit groups run two batched
  matmuls instead (``_prefill_matmul``). GQA folds the query heads of a KV head into
  the rows of one matmul, so K/V are never repeated.

Slots past a context are zeroed in the gathered copy (never in the pool), so stale or
non-finite bytes of a reused block can never reach a result.

The grouping plan depends only on the block tables and context lengths, which every
layer of a step shares, so the last plan is kept and reused while they are equal.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

# A group's gathered K+V stays under this, so the matmuls mostly read it from cache.
_GROUP_MAX_BYTES = 16e6
# Prefill: a group's fixed overhead, in FLOPs of attention it costs as much as.
_PREFILL_OVERHEAD_FLOPS = 8e6
# 16-bit prefill groups up to this many scores take the matmul path (the scores are
# materialised); larger ones take SDPA, which tiles them.
_MATMUL_MAX_SCORES = 1 << 22


@dataclass
class _Group:
    seqs: torch.Tensor          # long [S]: sequence indices of the batch
    rows: torch.Tensor          # long [S * Hkv * nb]: rows of cache.view(N * Hkv, bs * D)
    num_blocks: int             # nb: the group's padded context is nb * block_size
    pad_rows: torch.Tensor      # long: token rows of the gathered [S*Hkv*L, D] past a context
    mask: torch.Tensor          # bool [S, 1, max_q, L]: True = masked
    max_q: int = 0
    q_rows: torch.Tensor | None = None     # long [S * max_q]: query row of each padded row
    out_rows: torch.Tensor | None = None   # long: padded rows that hold real tokens
    out_tokens: torch.Tensor | None = None  # long: their token index in the packed batch
    causal: bool = False        # no cached prefix in the group: SDPA is_causal
    attend: torch.Tensor | None = None  # ~mask, for SDPA when not causal (built once)


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


def _partition(sizes: list[int], counts: list[int], cost) -> list[tuple[int, int]]:
    """Split the sorted distinct sizes into consecutive runs [a, b) minimising
    sum(cost(count of the run, largest size of the run)): O(k^2) over k distinct sizes."""
    k = len(sizes)
    best = [0.0] + [float("inf")] * k
    cut = [0] * (k + 1)
    prefix = [0]
    for c in counts:
        prefix.append(prefix[-1] + c)
    for b in range(1, k + 1):
        for a in range(b):
            c = best[a] + cost(prefix[b] - prefix[a], sizes[b - 1])
            if c < best[b]:
                best[b], cut[b] = c, a
    runs, b = [], k
    while b > 0:
        runs.append((cut[b], b))
        b = cut[b]
    return runs[::-1]


def _group_order(lengths: torch.Tensor, block_size: int, cost) -> list[torch.Tensor]:
    """Sequence indices of each group: sequences sorted by block count, cut by the DP."""
    nbs = (lengths + block_size - 1) // block_size
    order = torch.argsort(nbs, stable=True)
    sizes, counts = torch.unique_consecutive(nbs[order], return_counts=True)
    sizes, counts = sizes.tolist(), counts.tolist()
    bounds = [0]
    for c in counts:
        bounds.append(bounds[-1] + c)
    return [order[bounds[a]:bounds[b]] for a, b in _partition(sizes, counts, cost)]


def _gather_rows(tables: torch.Tensor, seqs: torch.Tensor, nb: int, hkv: int,
                 num_blocks_pool: int) -> torch.Tensor:
    """Cache rows (block * Hkv + head) in [seq, head, block] order."""
    ids = tables[seqs, :nb].long().clamp_(0, num_blocks_pool - 1)  # padding ids are zeroed later
    heads = torch.arange(hkv)
    return (ids[:, None, :] * hkv + heads[None, :, None]).reshape(-1)


def _pad_rows(lens: torch.Tensor, hkv: int, length: int) -> torch.Tensor:
    """Rows of the gathered [S * Hkv * L, D] view at token >= that sequence's length."""
    s = lens.numel()
    bad = torch.arange(length)[None, :] >= lens[:, None]             # [S, L]
    bad = bad[:, None, :].expand(s, hkv, length).reshape(-1)
    return torch.nonzero(bad).reshape(-1)


def _split(group: torch.Tensor, per_seq_bytes: int) -> list[torch.Tensor]:
    """Cap a group's gathered bytes so the copy is read back from cache."""
    n = max(1, int(_GROUP_MAX_BYTES // max(per_seq_bytes, 1)))
    if group.numel() <= n:
        return [group]
    parts = -(-group.numel() // n)
    return list(torch.tensor_split(group, parts))


def _gather(cache: torch.Tensor, g: _Group) -> torch.Tensor:
    """[S * Hkv * L, D] copy of the group's K or V, zero past every context."""
    n, hkv, bs, d = cache.shape
    x = cache.view(n * hkv, bs * d).index_select(0, g.rows)
    x = x.view(-1, d)
    if g.pad_rows.numel():
        x.index_fill_(0, g.pad_rows, 0)
    return x


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

def _prefill_plan(block_tables, query_start_loc, context_lens, num_blocks_pool, hkv, block_size,
                  elt_bytes, heads, d):
    qsl = query_start_loc.to(device="cpu", dtype=torch.long)
    ctx = context_lens.to(device="cpu", dtype=torch.long)
    tables = block_tables.to("cpu")
    n_new = qsl[1:] - qsl[:-1]
    if bool((n_new < 0).any()) or bool((ctx < n_new).any()):
        raise ValueError("context_lens must be >= the new tokens of each sequence "
                         "(query_start_loc steps) and query_start_loc non-decreasing")
    live = torch.nonzero(n_new > 0).reshape(-1)
    if live.numel() == 0:
        return []
    block_bytes = 2 * hkv * block_size * d * elt_bytes
    # Time of a group in FLOPs: its overhead plus its padded causal FLOPs (2 * heads *
    # head * L^2 per sequence for Q K^T and P V). Sequences are ordered by context
    # length, which for prompts without a cached prefix is their length.
    groups = []
    for sub in _group_order(ctx[live], block_size,
                            lambda count, nb: _PREFILL_OVERHEAD_FLOPS
                            + count * 2 * heads * d * (nb * block_size) ** 2):
        seqs = live[sub]
        nb = int((ctx[seqs].max() + block_size - 1) // block_size)
        for part in _split(seqs, nb * block_bytes):
            lens, new, start = ctx[part], n_new[part], qsl[:-1][part]
            length, max_q = nb * block_size, int(new.max())
            i = torch.arange(max_q)
            real = i[None, :] < new[:, None]                                  # [S, max_q]
            # a padded row reads its sequence's first token: finite, and dropped after
            q_rows = start[:, None] + torch.where(real, i[None, :], 0)
            causal = bool((lens == new).all())
            pos = (lens - new)[:, None] + i[None, :]                          # position of row i
            blocked = (torch.arange(length)[None, None, :] > pos[:, :, None])[:, None]
            groups.append(_Group(
                seqs=part, rows=_gather_rows(tables, part, nb, hkv, num_blocks_pool),
                num_blocks=nb, pad_rows=_pad_rows(lens, hkv, length), mask=blocked,
                max_q=max_q, q_rows=q_rows.reshape(-1),
                out_rows=torch.nonzero(real.reshape(-1)).reshape(-1),
                out_tokens=(start[:, None] + i[None, :])[real], causal=causal))
    return groups


def prefill_attention(query, key_cache, value_cache, block_tables, query_start_loc, context_lens,
                      scale: float, out=None):
    num_tokens, num_heads, d = query.shape
    num_blocks_pool, hkv, block_size, _ = key_cache.shape
    key = (num_blocks_pool, hkv, block_size, d, key_cache.element_size(), num_heads)
    plan = _cached_plan(
        "prefill", key, (block_tables, query_start_loc, context_lens),
        lambda: _prefill_plan(block_tables, query_start_loc, context_lens, num_blocks_pool, hkv,
                              block_size, key_cache.element_size(), num_heads, d))
    if out is None:
        out = torch.empty(num_tokens, num_heads, d, dtype=query.dtype)
    if sum(g.out_tokens.numel() for g in plan) < num_tokens:
        out.zero_()
    for g in plan:
        s, length = g.seqs.numel(), g.num_blocks * block_size
        q = query.index_select(0, g.q_rows).to(key_cache.dtype)
        k = _gather(key_cache, g).view(s, hkv, length, d)
        v = _gather(value_cache, g).view(s, hkv, length, d)
        if key_cache.element_size() == 2 and s * num_heads * g.max_q * length <= _MATMUL_MAX_SCORES:
            o = _prefill_matmul(q, k, v, g, scale, num_heads)
        else:
            if not g.causal and g.attend is None:
                g.attend = ~g.mask
            q = q.view(s, g.max_q, num_heads, d).transpose(1, 2)                # [S, H, q, D]
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=None if g.causal else g.attend,
                                               is_causal=g.causal, scale=scale,
                                               enable_gqa=hkv != num_heads)
            o = o.transpose(1, 2).reshape(s * g.max_q, num_heads, d)
        if g.out_rows.numel() != o.shape[0]:
            o = o.index_select(0, g.out_rows)
        out.index_copy_(0, g.out_tokens, o.to(out.dtype))
    return out


def _prefill_matmul(q, k, v, g: _Group, scale: float, num_heads: int) -> torch.Tensor:
    """16-bit prefill as two batched matmuls: CPU SDPA computes 16-bit inputs at fp32 speed,
    while bf16 matmuls run several times faster; the softmax is computed in fp32. The
    query heads of a KV head are stacked as rows, so K/V are never repeated."""
    s, hkv, length, d = k.shape
    group, max_q = num_heads // hkv, g.max_q
    q = q.view(s, max_q, hkv, group, d).permute(0, 2, 3, 1, 4).reshape(s, hkv, group * max_q, d)
    q.mul_(scale)
    scores = torch.matmul(q, k.transpose(-1, -2))
    scores.view(s, hkv, group, max_q, length).masked_fill_(g.mask[:, :, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    o = torch.matmul(probs, v).view(s, hkv, group, max_q, d)
    return o.permute(0, 3, 1, 2, 4).reshape(s * max_q, num_heads, d)

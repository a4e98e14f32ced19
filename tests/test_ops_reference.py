"""The torch reference of pagedserve.ops against plain per-sequence float64
attention written independently here (loops, explicit softmax)."""

import math

import pytest
import torch

from pagedserve import ops
from pagedserve.ops import reference


def dense_attention(q, k, v, scale, causal_offset=None):
    """q [n, H, D], k/v [L, Hkv, D] (float64). Row i sees keys 0..causal_offset+i (all if None)."""
    n, H, D = q.shape
    G = H // k.shape[1]
    out = torch.zeros(n, H, D, dtype=torch.float64)
    for i in range(n):
        limit = k.shape[0] if causal_offset is None else causal_offset + i + 1
        for h in range(H):
            kh, vh = k[:limit, h // G], v[:limit, h // G]
            s = (kh @ q[i, h]) * scale
            p = torch.exp(s - s.max())
            out[i, h] = (p / p.sum()) @ vh
    return out


def make_paged(lens, block_size, hkv, d, num_blocks=None, gen=None, share=True):
    """Random K/V per sequence written into a pool through scattered (and shared) blocks."""
    need = [math.ceil(n / block_size) for n in lens]
    num_blocks = num_blocks or sum(need) + 7
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    kc, vc = ops.allocate_kv_cache(num_blocks, block_size, hkv, d, torch.float64, "cpu")
    tables, dense = [], []
    for s, (n, nb) in enumerate(zip(lens, need)):
        if share and s > 0 and need[0] >= 1 and nb >= 1 and lens[0] >= block_size and n >= block_size:
            # the first full block is shared with sequence 0 (a cached prefix)
            table = [tables[0][0]] + [perm.pop() for _ in range(nb - 1)]
        else:
            table = [perm.pop() for _ in range(nb)]
        k = torch.randn(n, hkv, d, dtype=torch.float64, generator=gen)
        v = torch.randn(n, hkv, d, dtype=torch.float64, generator=gen)
        if table and s > 0 and tables and table[0] == tables[0][0]:
            k[:block_size], v[:block_size] = dense[0][0][:block_size], dense[0][1][:block_size]
        slots = torch.tensor([table[p // block_size] * block_size + p % block_size for p in range(n)])
        ops.write_kv(k, v, kc, vc, slots)
        tables.append(table)
        dense.append((k, v))
    width = max(need) + 2
    bt = torch.full((len(lens), width), 0, dtype=torch.int32)
    for s, t in enumerate(tables):
        bt[s, :len(t)] = torch.tensor(t, dtype=torch.int32)
        bt[s, len(t):] = 10_000  # padding beyond the table must never be read
    return kc, vc, bt, dense


@pytest.mark.parametrize("block_size", [8, 16])
@pytest.mark.parametrize("heads", [(4, 4), (8, 2), (6, 1)])
def test_decode_matches_dense(block_size, heads):
    gen = torch.Generator().manual_seed(1)
    H, hkv = heads
    d = 16
    lens = [3 * block_size + 5, 1, block_size - 1, block_size, block_size + 1]
    kc, vc, bt, dense = make_paged(lens, block_size, hkv, d, gen=gen)
    q = torch.randn(len(lens), H, d, dtype=torch.float64, generator=gen)
    scale = d ** -0.5
    out = ops.decode_attention(q, kc, vc, bt, torch.tensor(lens, dtype=torch.int32), scale)
    for s, (k, v) in enumerate(dense):
        want = dense_attention(q[s:s + 1], k, v, scale)
        torch.testing.assert_close(out[s:s + 1], want, rtol=1e-12, atol=1e-12)


def test_decode_low_precision_close():
    gen = torch.Generator().manual_seed(2)
    kc, vc, bt, dense = make_paged([37, 5], 16, 2, 64, gen=gen)
    q = torch.randn(2, 4, 64, dtype=torch.float64, generator=gen)
    ctx = torch.tensor([37, 5], dtype=torch.int32)
    want = ops.decode_attention(q, kc, vc, bt, ctx, 0.125)
    got = ops.decode_attention(q.bfloat16(), kc.bfloat16(), vc.bfloat16(), bt, ctx, 0.125)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.double(), want, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("heads", [(4, 4), (8, 2)])
def test_prefill_matches_dense_with_cached_prefixes(heads):
    gen = torch.Generator().manual_seed(3)
    H, hkv = heads
    d, bs = 16, 8
    lens = [20, 9, 1, 17]        # total tokens in cache after the step
    new = [20, 4, 1, 1]          # new tokens: full prompt, rest after a prefix hit, decode-like
    kc, vc, bt, dense = make_paged(lens, bs, hkv, d, gen=gen)
    q = torch.randn(sum(new), H, d, dtype=torch.float64, generator=gen)
    qsl = torch.tensor([0] + list(torch.tensor(new).cumsum(0)), dtype=torch.int32)
    out = ops.prefill_attention(q, kc, vc, bt, qsl, torch.tensor(lens, dtype=torch.int32), 0.3)
    for s, (k, v) in enumerate(dense):
        a, b = int(qsl[s]), int(qsl[s + 1])
        want = dense_attention(q[a:b], k, v, 0.3, causal_offset=lens[s] - new[s])
        torch.testing.assert_close(out[a:b], want, rtol=1e-12, atol=1e-12)


def test_decode_equals_last_row_of_prefill():
    gen = torch.Generator().manual_seed(4)
    kc, vc, bt, _ = make_paged([13, 30], 16, 2, 32, gen=gen)
    ctx = torch.tensor([13, 30], dtype=torch.int32)
    q = torch.randn(2, 4, 32, dtype=torch.float64, generator=gen)
    dec = ops.decode_attention(q, kc, vc, bt, ctx, 0.2)
    pre = ops.prefill_attention(q, kc, vc, bt, torch.tensor([0, 1, 2], dtype=torch.int32), ctx, 0.2)
    torch.testing.assert_close(dec, pre, rtol=1e-12, atol=1e-12)


def test_write_kv_skips_negative_slots():
    kc, vc = ops.allocate_kv_cache(4, 4, 2, 8, torch.float32, "cpu")
    key = torch.arange(3 * 2 * 8, dtype=torch.float32).view(3, 2, 8) + 1
    value = -key
    ops.write_kv(key, value, kc, vc, torch.tensor([5, -1, 14]))
    want_k = torch.zeros_like(kc)
    want_k[1, :, 1] = key[0]   # slot 5 = block 1, offset 1
    want_k[3, :, 2] = key[2]   # slot 14 = block 3, offset 2
    assert torch.equal(kc, want_k)
    assert torch.equal(vc, -want_k)


def test_copy_blocks_all_layers_exact():
    layers = [ops.allocate_kv_cache(6, 4, 2, 8, torch.float32, "cpu") for _ in range(3)]
    for i, (k, v) in enumerate(layers):
        k.copy_(torch.randn_like(k))
        v.copy_(torch.randn_like(v))
    before = [(k.clone(), v.clone()) for k, v in layers]
    ops.copy_blocks([k for k, _ in layers], [v for _, v in layers], torch.tensor([[0, 3], [2, 5]]))
    for (k, v), (k0, v0) in zip(layers, before):
        for c, c0 in ((k, k0), (v, v0)):
            want = c0.clone()
            want[3], want[5] = c0[0], c0[2]
            assert torch.equal(c, want)


def test_swap_blocks_mapping_exact():
    src = torch.randn(8, 2, 4, 8)
    dst = torch.zeros(5, 2, 4, 8)
    ops.swap_blocks(src, dst, torch.tensor([[7, 0], [1, 4], [2, 3]]))
    assert torch.equal(dst[0], src[7]) and torch.equal(dst[4], src[1]) and torch.equal(dst[3], src[2])
    assert torch.equal(dst[1], torch.zeros(2, 4, 8)) and torch.equal(dst[2], torch.zeros(2, 4, 8))


def test_empty_context_gives_zeros():
    kc, vc = ops.allocate_kv_cache(2, 8, 1, 16, torch.float64, "cpu")
    q = torch.randn(2, 2, 16, dtype=torch.float64)
    out = reference.decode_attention(q, kc, vc, torch.zeros(2, 1, dtype=torch.int32),
                                     torch.tensor([0, 0], dtype=torch.int32), 1.0)
    assert torch.equal(out, torch.zeros_like(q))

"""Sliding-window paged attention (ops/sliding_window.py and the reference's window)
against a brute-force float64 oracle, on contexts far longer than the window, over
shuffled block tables. Slots outside the window hold huge keys/values: attending to
any of them would swamp the result."""

import pytest
import torch

from pagedserve import ops
from pagedserve.ops import reference, sliding_window

BS, HKV, GROUP, D = 4, 2, 3, 8
POISON = 1e4


def _pool(lens, num_blocks=160, seed=0):
    """K/V pools in float64 and shuffled block tables for sequences of `lens` tokens;
    every written slot is random, every other slot of the pool is POISON."""
    g = torch.Generator().manual_seed(seed)
    kc = torch.full((num_blocks, HKV, BS, D), POISON, dtype=torch.float64)
    vc = torch.full_like(kc, POISON)
    perm = torch.randperm(num_blocks, generator=g).tolist()
    width = max(-(-n // BS) for n in lens)
    tables = torch.zeros(len(lens), width, dtype=torch.int32)
    keys, values = [], []
    for s, n in enumerate(lens):
        blocks = [perm.pop() for _ in range(-(-n // BS))]
        tables[s, :len(blocks)] = torch.tensor(blocks)
        k = torch.randn(n, HKV, D, generator=g, dtype=torch.float64)
        v = torch.randn(n, HKV, D, generator=g, dtype=torch.float64)
        slots = torch.tensor([blocks[p // BS] * BS + p % BS for p in range(n)])
        reference.write_kv(k, v, kc, vc, slots)
        keys.append(k)
        values.append(v)
    return kc, vc, tables, keys, values


def _oracle(q, k, v, pos, window, scale):
    """Token at `pos` over keys pos-window < j <= pos of its sequence (k, v: [n, HKV, D])."""
    lo = max(0, pos - window + 1) if window else 0
    kk = k[lo:pos + 1].repeat_interleave(GROUP, dim=1)      # [L, H, D]
    vv = v[lo:pos + 1].repeat_interleave(GROUP, dim=1)
    p = torch.softmax(torch.einsum("hd,lhd->hl", q, kk) * scale, dim=-1)
    return torch.einsum("hl,lhd->hd", p, vv)


LENS = [1, 5, 6, 7, 8, 9, 23, 64, 131]


@pytest.mark.parametrize("window", [1, 4, 6, 8, 200])
def test_decode_sees_only_its_window(window):
    kc, vc, tables, keys, values = _pool(LENS)
    q = torch.randn(len(LENS), HKV * GROUP, D, dtype=torch.float64,
                    generator=torch.Generator().manual_seed(1))
    ctx = torch.tensor(LENS, dtype=torch.int32)
    want = torch.stack([_oracle(q[s], keys[s], values[s], n - 1, window, 0.3)
                        for s, n in enumerate(LENS)])
    for got in (sliding_window.decode_attention(q, kc, vc, tables, ctx, 0.3, window),
                reference.decode_attention(q, kc, vc, tables, ctx, 0.3, window=window),
                ops.decode_attention(q, kc, vc, tables, ctx, 0.3, window=window)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_decode_window_reads_only_the_blocks_it_can_touch():
    for bs in (1, 4, 16):
        for w in range(1, 40):  # the most blocks any w consecutive positions span
            most = max(len({p // bs for p in range(lo, lo + w)}) for lo in range(bs))
            assert sliding_window.window_blocks(w, bs) == most, (w, bs)
    # a table wider than needed and padded with garbage ids changes nothing
    kc, vc, tables, keys, values = _pool([50])
    wide = torch.cat([tables, torch.full((1, 9), 10**6, dtype=torch.int32)], dim=1)
    q = torch.randn(1, HKV * GROUP, D, dtype=torch.float64)
    ctx = torch.tensor([50], dtype=torch.int32)
    torch.testing.assert_close(sliding_window.decode_attention(q, kc, vc, wide, ctx, 0.5, 6),
                               _oracle(q[0], keys[0], values[0], 49, 6, 0.5)[None])


def test_empty_context_gives_zeros():
    kc, vc, tables, _, _ = _pool([5])
    q = torch.randn(2, HKV * GROUP, D, dtype=torch.float64)
    out = sliding_window.decode_attention(q, kc, vc, torch.cat([tables, tables]),
                                          torch.tensor([0, 5], dtype=torch.int32), 0.5, 4)
    assert torch.equal(out[0], torch.zeros_like(out[0])) and torch.isfinite(out).all()


@pytest.mark.parametrize("window", [1, 5, 8, 300])
def test_prefill_chunks_over_cached_prefixes_see_only_their_window(window):
    # (context length, new tokens): whole prompts, chunks after a cached prefix, one token
    shape = [(131, 131), (64, 20), (23, 1), (9, 9), (40, 33)]
    lens = [c for c, _ in shape]
    kc, vc, tables, keys, values = _pool(lens, seed=2)
    n_new = [n for _, n in shape]
    qsl = torch.tensor([0] + list(torch.tensor(n_new).cumsum(0)), dtype=torch.int32)
    q = torch.randn(sum(n_new), HKV * GROUP, D, dtype=torch.float64,
                    generator=torch.Generator().manual_seed(3))
    ctx = torch.tensor(lens, dtype=torch.int32)
    want = []
    for s, (c, n) in enumerate(shape):
        for i in range(n):
            want.append(_oracle(q[int(qsl[s]) + i], keys[s], values[s], c - n + i, window, 0.4))
    want = torch.stack(want)
    for got in (reference.prefill_attention(q, kc, vc, tables, qsl, ctx, 0.4, window=window),
                ops.prefill_attention(q, kc, vc, tables, qsl, ctx, 0.4, window=window)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_full_attention_paths_unchanged_by_the_window_argument():
    kc, vc, tables, keys, values = _pool(LENS)
    q = torch.randn(len(LENS), HKV * GROUP, D, dtype=torch.float64)
    ctx = torch.tensor(LENS, dtype=torch.int32)
    want = torch.stack([_oracle(q[s], keys[s], values[s], n - 1, None, 0.3)
                        for s, n in enumerate(LENS)])
    torch.testing.assert_close(reference.decode_attention(q, kc, vc, tables, ctx, 0.3), want)

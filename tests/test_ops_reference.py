"""The torch reference of pagedserve.ops and the fast CPU paths (what `ops` runs for CPU
tensors: the compiled decode kernel, ops.cpu_attention's prefill) against plain
per-sequence float64 attention written independently here (loops, explicit softmax),
and the fast paths in fp32/bf16 against the float64 reference."""

import math

import pytest
import torch

from pagedserve import ops
from pagedserve.ops import cpu_attention, cpu_kernels, reference

IMPLS = pytest.mark.parametrize("impl", [reference, cpu_attention], ids=["reference", "cpu"])


class Float32Kernel:
    """The compiled decode kernel (float32 only) behind the float64 signature the tests use."""

    @staticmethod
    def decode_attention(q, kc, vc, bt, ctx, scale):
        return cpu_kernels.decode_attention(q.float(), kc.float(), vc.float(), bt, ctx, scale).double()


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


@pytest.mark.parametrize("impl,tol", [(reference, 1e-12), (Float32Kernel, 1e-5)],
                         ids=["reference", "kernel"])
@pytest.mark.parametrize("block_size", [8, 16])
@pytest.mark.parametrize("heads", [(4, 4), (8, 2), (6, 1)])
def test_decode_matches_dense(block_size, heads, impl, tol):
    gen = torch.Generator().manual_seed(1)
    H, hkv = heads
    d = 16
    lens = [3 * block_size + 5, 1, block_size - 1, block_size, block_size + 1]
    kc, vc, bt, dense = make_paged(lens, block_size, hkv, d, gen=gen)
    q = torch.randn(len(lens), H, d, dtype=torch.float64, generator=gen)
    scale = d ** -0.5
    out = impl.decode_attention(q, kc, vc, bt, torch.tensor(lens, dtype=torch.int32), scale)
    for s, (k, v) in enumerate(dense):
        want = dense_attention(q[s:s + 1], k, v, scale)
        torch.testing.assert_close(out[s:s + 1], want, rtol=tol, atol=tol)


def test_decode_low_precision_close():
    gen = torch.Generator().manual_seed(2)
    kc, vc, bt, dense = make_paged([37, 5], 16, 2, 64, gen=gen)
    q = torch.randn(2, 4, 64, dtype=torch.float64, generator=gen)
    ctx = torch.tensor([37, 5], dtype=torch.int32)
    want = ops.decode_attention(q, kc, vc, bt, ctx, 0.125)
    got = ops.decode_attention(q.bfloat16(), kc.bfloat16(), vc.bfloat16(), bt, ctx, 0.125)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.double(), want, rtol=2e-2, atol=2e-2)


@IMPLS
@pytest.mark.parametrize("heads", [(4, 4), (8, 2)])
def test_prefill_matches_dense_with_cached_prefixes(heads, impl):
    gen = torch.Generator().manual_seed(3)
    H, hkv = heads
    d, bs = 16, 8
    lens = [20, 9, 1, 17]        # total tokens in cache after the step
    new = [20, 4, 1, 1]          # new tokens: full prompt, rest after a prefix hit, decode-like
    kc, vc, bt, dense = make_paged(lens, bs, hkv, d, gen=gen)
    q = torch.randn(sum(new), H, d, dtype=torch.float64, generator=gen)
    qsl = torch.tensor([0] + list(torch.tensor(new).cumsum(0)), dtype=torch.int32)
    out = impl.prefill_attention(q, kc, vc, bt, qsl, torch.tensor(lens, dtype=torch.int32), 0.3)
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


# ---- the fast CPU path in the engine's dtypes against the float64 reference ----

def rel_err(got, want):
    return float((got.double() - want).norm() / want.norm())


# Many lengths (several length groups, partial and full blocks, 1 token) and a shared
# prefix block, over scattered ids, in the SmolLM2 head shape (9 query / 3 KV heads).
DECODE_LENS = [1, 15, 16, 17, 40, 63, 64, 65, 100, 131, 180, 181, 200, 257, 300, 33, 2, 90]


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("window", [None, 37])
def test_fast_decode_close_to_float64(dtype, tol, window):
    gen = torch.Generator().manual_seed(5)
    kc, vc, bt, _ = make_paged(DECODE_LENS, 16, 3, 64, gen=gen)
    ctx = torch.tensor(DECODE_LENS, dtype=torch.int32)
    q = torch.randn(len(DECODE_LENS), 9, 64, dtype=torch.float64, generator=gen).to(dtype)
    kc, vc = kc.to(dtype), vc.to(dtype)
    want = reference.decode_attention(q.double(), kc.double(), vc.double(), bt, ctx, 0.125,
                                      window=window)
    got = ops.decode_attention(q, kc, vc, bt, ctx, 0.125, window=window)
    assert got.dtype == dtype and got.shape == q.shape
    assert rel_err(got, want) < tol
    for s in range(len(DECODE_LENS)):  # no sequence is off, however small its share of the norm
        assert rel_err(got[s], want[s]) < 2 * tol, s


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("window", [None, 7, 37])
def test_fast_prefill_close_to_float64(dtype, tol, window):
    gen = torch.Generator().manual_seed(6)
    lens = [90, 17, 40, 33, 70, 16, 5, 64]   # tokens in cache after the step
    new = [90, 17, 9, 1, 70, 16, 5, 30]      # full prompts, chunks after a cached prefix, decode-like
    kc, vc, bt, _ = make_paged(lens, 16, 3, 64, gen=gen)
    qsl = torch.tensor([0] + torch.tensor(new).cumsum(0).tolist(), dtype=torch.int32)
    ctx = torch.tensor(lens, dtype=torch.int32)
    q = torch.randn(sum(new), 9, 64, dtype=torch.float64, generator=gen).to(dtype)
    kc, vc = kc.to(dtype), vc.to(dtype)
    want = reference.prefill_attention(q.double(), kc.double(), vc.double(), bt, qsl, ctx, 0.125,
                                       window=window)
    got = ops.prefill_attention(q, kc, vc, bt, qsl, ctx, 0.125, window=window)
    assert got.dtype == dtype and got.shape == q.shape
    assert rel_err(got, want) < tol
    for s in range(len(lens)):
        a, b = int(qsl[s]), int(qsl[s + 1])
        assert rel_err(got[a:b], want[a:b]) < 2 * tol, s


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fast_path_ignores_poisoned_slots(dtype):
    """NaN in every slot past a context and in the padding of the block tables (a reused
    block's stale bytes) must not reach any output."""
    gen = torch.Generator().manual_seed(7)
    lens = [5, 20, 33]
    kc, vc, bt, _ = make_paged(lens, 16, 2, 32, gen=gen, share=False)
    kc, vc = kc.to(dtype), vc.to(dtype)
    ctx = torch.tensor(lens, dtype=torch.int32)
    q = torch.randn(3, 4, 32, dtype=torch.float64, generator=gen).to(dtype)
    clean_dec = ops.decode_attention(q, kc, vc, bt, ctx, 0.2)
    qp = torch.randn(sum(lens), 4, 32, dtype=torch.float64, generator=gen).to(dtype)
    qsl = torch.tensor([0, 5, 25, 58], dtype=torch.int32)
    clean_pre = ops.prefill_attention(qp, kc, vc, bt, qsl, ctx, 0.2)
    used = {(int(bt[s, p // 16]), p % 16) for s, n in enumerate(lens) for p in range(n)}
    for b in range(kc.shape[0]):
        for o in range(16):
            if (b, o) not in used:
                kc[b, :, o] = float("nan")
                vc[b, :, o] = float("nan")
    bt[:, 3:] = int(bt[0, 0])     # padding points at a real block instead of out of range
    assert torch.equal(ops.decode_attention(q, kc, vc, bt, ctx, 0.2), clean_dec)
    assert torch.equal(ops.prefill_attention(qp, kc, vc, bt, qsl, ctx, 0.2), clean_pre)


def test_fast_path_follows_changed_inputs():
    """Layers of a step share tables and lengths: a table or length changed in place
    between calls must be seen."""
    gen = torch.Generator().manual_seed(8)
    kc, vc, bt, _ = make_paged([40, 40], 16, 1, 16, gen=gen, share=False)
    kc, vc = kc.float(), vc.float()
    q = torch.randn(2, 2, 16, generator=gen)
    ctx = torch.tensor([40, 40], dtype=torch.int32)
    first = ops.decode_attention(q, kc, vc, bt, ctx, 0.5)
    ctx[1] = 17
    got = ops.decode_attention(q, kc, vc, bt, ctx, 0.5)
    torch.testing.assert_close(got, reference.decode_attention(q, kc, vc, bt, ctx, 0.5),
                               rtol=1e-5, atol=1e-6)
    assert torch.equal(got[0], first[0]) and not torch.equal(got[1], first[1])
    bt[0, :3] = bt[1, :3].clone()
    torch.testing.assert_close(ops.decode_attention(q, kc, vc, bt, ctx, 0.5),
                               reference.decode_attention(q, kc, vc, bt, ctx, 0.5),
                               rtol=1e-5, atol=1e-6)


def test_fast_prefill_follows_changed_inputs():
    """The per-token tables and lengths of a prefill are built once per step and reused
    by its layers: a table, a length or a query boundary changed in place must be seen."""
    gen = torch.Generator().manual_seed(10)
    kc, vc, bt, _ = make_paged([40, 40], 16, 1, 16, gen=gen, share=False)
    kc, vc = kc.float(), vc.float()
    q = torch.randn(12, 2, 16, generator=gen)
    qsl = torch.tensor([0, 5, 12], dtype=torch.int32)
    ctx = torch.tensor([40, 40], dtype=torch.int32)

    def check():
        torch.testing.assert_close(ops.prefill_attention(q, kc, vc, bt, qsl, ctx, 0.5),
                                   reference.prefill_attention(q, kc, vc, bt, qsl, ctx, 0.5),
                                   rtol=1e-5, atol=1e-6)

    check()
    ctx[1] = 17
    check()
    qsl[1] = 8
    check()
    bt[0, :2] = bt[1, :2].clone()
    check()


def test_fast_path_out_strided_query_and_empty_contexts():
    gen = torch.Generator().manual_seed(9)
    kc, vc, bt, _ = make_paged([9, 30, 4], 8, 2, 16, gen=gen)
    kc, vc = kc.float(), vc.float()
    ctx = torch.tensor([9, 0, 4], dtype=torch.int32)   # an empty context attends to nothing
    fused = torch.randn(3, 6, 16, generator=gen)
    q = fused[:, :4]                                    # row-strided, as the model passes it
    out = torch.full((3, 4, 16), float("nan"))
    got = ops.decode_attention(q, kc, vc, bt, ctx, 0.3, out=out)
    assert got is out
    want = reference.decode_attention(q, kc, vc, bt, ctx, 0.3)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
    assert torch.equal(out[1], torch.zeros(4, 16))


def test_fast_prefill_rejects_context_shorter_than_new_tokens():
    kc, vc = ops.allocate_kv_cache(4, 8, 1, 16, torch.float32, "cpu")
    q = torch.randn(5, 2, 16)
    with pytest.raises(ValueError, match="context_lens"):
        ops.prefill_attention(q, kc, vc, torch.zeros(1, 2, dtype=torch.int32),
                              torch.tensor([0, 5], dtype=torch.int32),
                              torch.tensor([3], dtype=torch.int32), 1.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fast_write_kv_equals_reference_across_steps(dtype):
    """The CPU write reuses a step's (block, offset) across layers: every call must still
    write exactly what the reference writes, skipped (negative) slots included, and see a
    mapping changed in place."""
    gen = torch.Generator().manual_seed(12)
    shape = (6, 2, 4, 8)
    k = torch.randn(5, 3, 8, generator=gen, dtype=torch.float64)[:, :2].to(dtype)  # strided
    v = torch.randn(5, 2, 8, generator=gen, dtype=torch.float64).to(dtype)
    slots = torch.tensor([3, 9, 0, 23, 17], dtype=torch.int64)
    for mapping in (slots, slots, torch.tensor([3, -1, 0, -1, 17]), slots):
        kc, vc = torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype)
        kr, vr = kc.clone(), vc.clone()
        reference.write_kv(k, v, kr, vr, mapping)
        ops.write_kv(k, v, kc, vc, mapping)
        assert torch.equal(kc, kr) and torch.equal(vc, vr)
    slots[0] = 4                                  # the same tensor, rewritten in place
    kc, vc = torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype)
    kr, vr = kc.clone(), vc.clone()
    reference.write_kv(k, v, kr, vr, slots)
    ops.write_kv(k, v, kc, vc, slots)
    assert torch.equal(kc, kr) and torch.equal(vc, vr)

"""The compiled CPU decode kernel (native/cpu_kernels, through ops.cpu_kernels) against the
float64 reference: every head-size path (registers for 64 and 128, any multiple of 16,
plain loops otherwise), GQA groups, block sizes, sliding windows and dtype mixes; the
bfloat16 rounding against torch's; results independent of the thread count; and the
checks that keep it from reading outside the pool."""

import pytest
import torch

from pagedserve.ops import cpu_kernels, reference


def paged(lens, block_size, hkv, d, dtype, seed=0, pad_id=None):
    """Random K/V for contexts of `lens` in scattered blocks; table padding set to
    `pad_id` (a valid block by default) and every unused slot NaN."""
    gen = torch.Generator().manual_seed(seed)
    need = [-(-n // block_size) for n in lens]
    num_blocks = sum(need) + 3
    kc = torch.full((num_blocks, hkv, block_size, d), float("nan"))
    vc = torch.full_like(kc, float("nan"))
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    width = max(need + [1]) + 1
    tables = torch.full((len(lens), width), perm[-1] if pad_id is None else pad_id,
                        dtype=torch.int32)
    for s, (n, nb) in enumerate(zip(lens, need)):
        ids = [perm.pop(0) for _ in range(nb)]
        tables[s, :nb] = torch.tensor(ids, dtype=torch.int32)
        for p in range(n):
            b, o = ids[p // block_size], p % block_size
            kc[b, :, o] = torch.randn(hkv, d, generator=gen)
            vc[b, :, o] = torch.randn(hkv, d, generator=gen)
    return kc.to(dtype), vc.to(dtype), tables, torch.tensor(lens, dtype=torch.int32)


def expected(q, kc, vc, tables, ctx, scale, window=None):
    # NaN marks unused slots, which the reference's padding masks but 0 * NaN would not.
    kc64, vc64 = kc.double().nan_to_num(), vc.double().nan_to_num()
    return reference.decode_attention(q.double(), kc64, vc64, tables, ctx, scale, window=window)


def rel_err(got, want):
    return float((got.double() - want).norm() / want.norm().clamp(min=1e-30))


LENS = [1, 7, 16, 17, 33, 64, 100, 5, 250]


@pytest.mark.parametrize("head_size", [64, 128, 80, 72, 16])
@pytest.mark.parametrize("heads", [(9, 3), (4, 4), (8, 1)])
@pytest.mark.parametrize("block_size", [8, 16, 32])
def test_decode_matches_float64_reference(head_size, heads, block_size):
    h, hkv = heads
    kc, vc, tables, ctx = paged(LENS, block_size, hkv, head_size, torch.float32, seed=head_size)
    q = torch.randn(len(LENS), h, head_size, generator=torch.Generator().manual_seed(1))
    got = cpu_kernels.decode_attention(q, kc, vc, tables, ctx, head_size ** -0.5)
    want = expected(q, kc, vc, tables, ctx, head_size ** -0.5)
    assert rel_err(got, want) < 1e-6
    for s in range(len(LENS)):
        assert rel_err(got[s], want[s]) < 2e-6, s


@pytest.mark.parametrize("io_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window", [None, 1, 5, 16, 40, 1000])
def test_dtypes_and_windows(io_dtype, cache_dtype, window):
    kc, vc, tables, ctx = paged(LENS, 16, 3, 64, cache_dtype, seed=3)
    q = torch.randn(len(LENS), 9, 64, generator=torch.Generator().manual_seed(4)).to(io_dtype)
    got = cpu_kernels.decode_attention(q, kc, vc, tables, ctx, 0.125, window=window)
    assert got.dtype == io_dtype and got.shape == q.shape
    want = expected(q, kc, vc, tables, ctx, 0.125, window)
    tol = 1e-6 if io_dtype == torch.float32 else 8e-3  # bf16 output: one rounding, 2^-9
    assert rel_err(got, want) < tol


def test_bfloat16_output_rounds_as_torch():
    """The same arithmetic written out in bf16 or in fp32 then converted by torch gives
    the same bits: the kernel's float -> bf16 rounding is torch's (nearest even)."""
    kc, vc, tables, ctx = paged(LENS, 16, 3, 64, torch.bfloat16, seed=5)
    q = torch.randn(len(LENS), 9, 64, generator=torch.Generator().manual_seed(6)).bfloat16()
    narrow = cpu_kernels.decode_attention(q, kc, vc, tables, ctx, 0.125)
    wide = cpu_kernels.decode_attention(q.float(), kc, vc, tables, ctx, 0.125)
    assert torch.equal(narrow, wide.bfloat16())


def test_result_does_not_depend_on_threads():
    kc, vc, tables, ctx = paged(LENS * 4, 16, 3, 64, torch.bfloat16, seed=7)
    q = torch.randn(len(LENS) * 4, 9, 64, generator=torch.Generator().manual_seed(8)).bfloat16()
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cpu_kernels.decode_attention(q, kc, vc, tables, ctx, 0.125)
        torch.set_num_threads(max(2, before))
        many = cpu_kernels.decode_attention(q, kc, vc, tables, ctx, 0.125)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, many)


def test_strided_query_out_slice_and_empty_contexts():
    lens = [9, 0, 4, 0]
    kc, vc, tables, ctx = paged(lens, 8, 2, 32, torch.float32, seed=9)
    fused = torch.randn(4, 6, 32)
    q = fused[:, :4]                       # rows strided as the fused projection's view
    buffer = torch.full((6, 4, 32), float("nan"))
    out = buffer[2:]                       # a slice of a bigger batch
    assert cpu_kernels.decode_attention(q, kc, vc, tables, ctx, 0.3, out=out) is out
    assert torch.equal(out[1], torch.zeros(4, 32)) and torch.equal(out[3], torch.zeros(4, 32))
    assert rel_err(out, expected(q, kc, vc, tables, ctx, 0.3)) < 1e-6
    assert torch.isnan(buffer[:2]).all()   # nothing written outside `out`


def test_extreme_values_stay_finite():
    """Scores of +-1e4 (the softmax's max subtraction keeps exp in range), tiny values."""
    kc, vc, tables, ctx = paged([40, 3], 16, 1, 64, torch.float32, seed=10)
    q = torch.randn(2, 2, 64) * 1e3
    got = cpu_kernels.decode_attention(q, kc, vc, tables, ctx, 1.0)
    assert torch.isfinite(got).all()
    assert rel_err(got, expected(q, kc, vc, tables, ctx, 1.0)) < 1e-5
    tiny = cpu_kernels.decode_attention(q * 1e-30, kc, vc, tables, ctx, 1.0)
    assert torch.isfinite(tiny).all()


@pytest.mark.parametrize("bad", ["block_id", "negative_id", "short_table"])
def test_indices_outside_the_pool_are_refused(bad):
    kc, vc, tables, ctx = paged([20, 5], 8, 1, 16, torch.float32, seed=11)
    q = torch.randn(2, 2, 16)
    if bad == "block_id":
        tables[1, 0] = kc.shape[0]
    elif bad == "negative_id":
        tables[0, 2] = -1
    else:
        ctx[0] = tables.shape[1] * 8 + 1
    with pytest.raises(IndexError):
        cpu_kernels.decode_attention(q, kc, vc, tables, ctx, 1.0)


def test_padding_past_a_context_is_never_read():
    """Table entries past a context may hold anything (they are not followed)."""
    kc, vc, tables, ctx = paged([20, 5], 8, 1, 16, torch.float32, seed=12, pad_id=10**6)
    q = torch.randn(2, 2, 16)
    got = cpu_kernels.decode_attention(q, kc, vc, tables, ctx, 1.0)
    assert rel_err(got, expected(q, kc, vc, tables.where(tables < kc.shape[0], 0), ctx, 1.0)) < 1e-6


def test_bad_layouts_are_refused():
    kc, vc, tables, ctx = paged([20, 5], 8, 1, 16, torch.float32, seed=13)
    q = torch.randn(2, 2, 16)
    with pytest.raises(ValueError, match="dtypes"):
        cpu_kernels.decode_attention(q.half(), kc.half(), vc.half(), tables, ctx, 1.0)
    with pytest.raises(ValueError, match="contiguous rows"):
        cpu_kernels.decode_attention(q.transpose(1, 2).contiguous().transpose(1, 2), kc, vc,
                                     tables, ctx, 1.0)
    with pytest.raises(ValueError, match="contiguous"):
        strided = torch.empty(kc.shape[0], 1, 8, 32)[..., :16]
        cpu_kernels.decode_attention(q, strided, vc, tables, ctx, 1.0)
    with pytest.raises(ValueError, match="one row per query"):
        cpu_kernels.decode_attention(q, kc, vc, tables[:1], ctx, 1.0)
    with pytest.raises(ValueError, match="must match query"):
        cpu_kernels.decode_attention(q, kc, vc, tables, ctx, 1.0, out=torch.empty(2, 2, 8))

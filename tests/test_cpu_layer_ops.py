"""ops.cpu_layer_ops (the CPU path of the decoder's element-wise ops) computes what
ops.reference computes, bitwise, in every dtype the model runs in."""

import pytest
import torch

from pagedserve import ops
from pagedserve.ops import cpu_layer_ops, reference

DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16,
                                           torch.float64])


def _randn(*shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=torch.float64) * 3).to(dtype)


@DTYPES
def test_silu_and_mul_bitwise(dtype):
    x = _randn(37, 2 * 96, dtype=dtype, seed=1)
    assert torch.equal(cpu_layer_ops.silu_and_mul(x), reference.silu_and_mul(x))
    assert torch.equal(ops.silu_and_mul(x), reference.silu_and_mul(x))


@DTYPES
@pytest.mark.parametrize("weight_dtype", ["same", "float32"])
def test_rms_norm_bitwise(dtype, weight_dtype):
    x = _randn(41, 160, dtype=dtype, seed=2)
    w = _randn(160, dtype=dtype if weight_dtype == "same" else torch.float32, seed=3)
    want = reference.rms_norm(x, w, 1e-6)
    got = cpu_layer_ops.rms_norm(x, w, 1e-6)
    assert got.dtype == want.dtype and torch.equal(got, want)
    x_before = x.clone()
    cpu_layer_ops.rms_norm(x, w, 1e-6)
    assert torch.equal(x, x_before)  # the input is never written


@DTYPES
def test_fused_add_rms_norm_bitwise(dtype):
    x, res, w = _randn(9, 64, dtype=dtype, seed=4), _randn(9, 64, dtype=dtype, seed=5), \
        _randn(64, dtype=dtype, seed=6)
    res_ref = res.clone()
    want = reference.fused_add_rms_norm(x, res_ref, w, 1e-5)
    got = ops.fused_add_rms_norm(x, res, w, 1e-5)
    assert torch.equal(got, want) and torch.equal(res, res_ref)


def _tables(positions, head, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(positions, head, generator=g), torch.randn(positions, head, generator=g)


@DTYPES
def test_rotary_bitwise_on_strided_views_and_across_layers(dtype):
    cos, sin = _tables(300, 64, 7)
    pos = torch.tensor([5, 0, 299, 17, 17, 120], dtype=torch.int64)
    for layer in range(3):  # the second and third layers reuse the first one's rows
        fused = _randn(6, 15, 64, dtype=dtype, seed=10 + layer)
        want = fused.clone()
        reference.rotary_embedding(want[:, :12], pos, cos, sin)
        ops.rotary_embedding(fused[:, :12], pos, cos, sin)   # q|k of a fused qkv: strided rows
        assert torch.equal(fused, want)


def test_rotary_sees_positions_rewritten_in_place_and_other_tables():
    cos, sin = _tables(64, 16, 8)
    cos2, sin2 = _tables(64, 16, 9)
    pos = torch.arange(4, dtype=torch.int64)
    x = _randn(4, 2, 16, dtype=torch.float32, seed=11)
    for tables in ((cos, sin), (cos2, sin2), (cos, sin)):
        for p in (pos, pos + 3):
            want, got = x.clone(), x.clone()
            reference.rotary_embedding(want, p, *tables)
            ops.rotary_embedding(got, p, *tables)
            assert torch.equal(got, want)
    pos[1] = 40                        # the same tensor, new contents: rows recomputed
    want, got = x.clone(), x.clone()
    reference.rotary_embedding(want, pos, cos, sin)
    ops.rotary_embedding(got, pos, cos, sin)
    assert torch.equal(got, want)
    shorter = pos[:2]
    reference.rotary_embedding(want[:2], shorter, cos, sin)
    ops.rotary_embedding(got[:2], shorter, cos, sin)
    assert torch.equal(got, want)

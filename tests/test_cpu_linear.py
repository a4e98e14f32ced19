"""oneDNN-packed bfloat16 and float32 projections on CPU (ops/cpu_linear.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pagedserve.model.layers import Linear
from pagedserve.ops import cpu_linear

pytestmark = pytest.mark.skipif(not cpu_linear.packing_supported(torch.bfloat16),
                                reason="this CPU/torch has no oneDNN bfloat16 matmul")


@pytest.mark.parametrize("rows", [1, 3, 48, 300])
@pytest.mark.parametrize("bias", [False, True])
def test_packed_linear_is_as_accurate_as_f_linear(rows, bias):
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(96, 80, generator=g).bfloat16()
    b = torch.randn(96, generator=g).bfloat16() if bias else None
    x = torch.randn(rows, 80, generator=g).bfloat16()
    ref = F.linear(x.double(), w.double(), None if b is None else b.double())
    got = cpu_linear.packed_linear(x, cpu_linear.pack_weight(w), b)
    plain = F.linear(x, w, b)
    assert got.dtype == torch.bfloat16 and got.shape == (rows, 96)
    # Same fp32 accumulation, one rounding to bf16: within an ulp of the exact result,
    # as F.linear is.
    tol = ref.abs().clamp_min(1.0) * 2 ** -7
    assert bool(((got.double() - ref).abs() <= tol).all())
    assert bool(((plain.double() - ref).abs() <= tol).all())


def test_packed_linear_takes_strided_rows():
    w = torch.randn(64, 32).bfloat16()
    x = torch.randn(10, 64).bfloat16()[:, :32]   # a row-strided view, as attention's output
    out = cpu_linear.packed_linear(x, cpu_linear.pack_weight(w), None)
    assert torch.allclose(out.float(), F.linear(x.contiguous(), w).float(), atol=0.1, rtol=0.02)


@pytest.mark.parametrize("dtype, atol", [(torch.bfloat16, 0.05), (torch.float32, 1e-5)])
def test_pack_model_packs_our_cpu_linears_only(dtype, atol):
    model = torch.nn.Sequential(Linear(16, 8), Linear(8, 4), torch.nn.Linear(4, 2)).to(dtype)
    assert cpu_linear.pack_model(model) == 2          # torch's own nn.Linear has no slot
    x = torch.randn(5, 16).to(dtype)
    with torch.no_grad():
        packed = model[1](model[0](x))
        model[0].packed_weight = model[1].packed_weight = None
        plain = model[1](model[0](x))
    assert torch.allclose(packed.float(), plain.float(), atol=atol, rtol=atol)


def test_pack_model_leaves_other_dtypes_alone():
    model = torch.nn.Sequential(Linear(16, 8)).half()
    assert cpu_linear.pack_model(model) == 0
    assert model[0].packed_weight is None

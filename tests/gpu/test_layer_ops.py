"""Fused layer kernels (cuda/layer_ops.cuh) against the float64 torch reference,
through both loaders. Outputs start as NaN so an element the kernel forgets fails;
RoPE runs on a strided view of a fused QKV row, as the model calls it, and must leave
the V part untouched."""

import pytest
import torch

from pagedserve import ops
from pagedserve.ops import reference

pytestmark = pytest.mark.gpu

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}


@pytest.fixture(params=["compiled", "cupy"])
def loader(request):
    ops.set_loader(request.param)
    yield request.param
    ops.set_loader(None)


def rel_err(got, want):
    return float((got.double().cpu() - want).abs().max() / want.abs().max().clamp_min(1e-30))


def rand(*shape, dtype, gen, scale=1.0):
    return (torch.randn(*shape, dtype=torch.float64, generator=gen) * scale).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,inter", [(1, 14336), (7, 1536), (300, 64), (2, 40)])
def test_silu_and_mul(loader, dtype, tokens, inter):
    gen = torch.Generator().manual_seed(tokens * inter)
    x = rand(tokens, 2 * inter, dtype=dtype, gen=gen, scale=3.0)
    got = ops.silu_and_mul(x.cuda())
    want = reference.silu_and_mul(x.double())
    assert got.shape == (tokens, inter) and got.dtype == dtype
    assert not got.isnan().any()
    assert rel_err(got, want) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,hidden", [(1, 4096), (5, 576), (129, 2048), (3, 8200)])
def test_fused_add_rms_norm(loader, dtype, tokens, hidden):
    gen = torch.Generator().manual_seed(tokens + hidden)
    x = rand(tokens, hidden, dtype=dtype, gen=gen)
    res = rand(tokens, hidden, dtype=dtype, gen=gen, scale=4.0)
    w = rand(hidden, dtype=dtype, gen=gen)
    res_gpu = res.cuda()
    got = ops.fused_add_rms_norm(x.cuda(), res_gpu, w.cuda(), 1e-5)
    res_want = res.double()
    want = reference.fused_add_rms_norm(x.double(), res_want, w.double(), 1e-5)
    assert rel_err(res_gpu, res_want) < TOL[dtype]  # the residual stream was updated in place
    assert not got.isnan().any()
    assert rel_err(got, want) < TOL[dtype]


def test_fused_add_rms_norm_rounds_the_sum_like_the_unfused_form(loader):
    """The residual stream holds what `x + residual` would store in bf16, bit for bit."""
    gen = torch.Generator().manual_seed(3)
    x = rand(33, 4096, dtype=torch.bfloat16, gen=gen).cuda()
    res = rand(33, 4096, dtype=torch.bfloat16, gen=gen).cuda()
    expect = x + res
    ops.fused_add_rms_norm(x, res, torch.ones(4096, dtype=torch.bfloat16, device="cuda"), 1e-6)
    assert torch.equal(res, expect)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_size", [64, 80, 96, 128, 256])
@pytest.mark.parametrize("tokens", [1, 17, 513])
def test_rotary_in_place_on_fused_qkv(loader, dtype, head_size, tokens):
    gen = torch.Generator().manual_seed(head_size * tokens)
    heads_q, heads_kv, max_pos = 8, 2, 4096
    qk_heads = heads_q + heads_kv
    width = (qk_heads + heads_kv) * head_size
    qkv = rand(tokens, width, dtype=dtype, gen=gen)
    angles = torch.rand(max_pos, head_size // 2, dtype=torch.float64, generator=gen) * 6.3
    cos = torch.cat((angles.cos(), angles.cos()), -1).float()
    sin = torch.cat((-angles.sin(), angles.sin()), -1).float()
    positions = torch.randint(0, max_pos, (tokens,), generator=gen)
    dev = qkv.cuda()
    view = dev[:, :qk_heads * head_size].view(tokens, qk_heads, head_size)
    ops.rotary_embedding(view, positions.cuda(), cos.cuda(), sin.cuda())
    want = qkv.double()
    reference.rotary_embedding(want[:, :qk_heads * head_size].view(tokens, qk_heads, head_size),
                               positions, cos, sin)
    assert rel_err(dev[:, :qk_heads * head_size], want[:, :qk_heads * head_size]) < TOL[dtype]
    assert torch.equal(dev[:, qk_heads * head_size:].cpu(), qkv[:, qk_heads * head_size:])


def test_rotary_matches_a_rotation_in_float64(loader):
    """The table convention: element i turns by angle (pos * inv_freq[i mod half])."""
    d, pos = 128, 1000
    inv = 1.0 / (10000 ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    ang = pos * inv
    cos = torch.zeros(pos + 1, d, dtype=torch.float32)
    sin = torch.zeros(pos + 1, d, dtype=torch.float32)
    cos[pos] = torch.cat((ang.cos(), ang.cos())).float()
    sin[pos] = torch.cat((-ang.sin(), ang.sin())).float()
    x = torch.randn(1, 1, d, dtype=torch.float64)
    got = x.float().cuda()
    ops.rotary_embedding(got, torch.tensor([pos]).cuda(), cos.cuda(), sin.cuda())
    a, b = x[0, 0, : d // 2], x[0, 0, d // 2:]
    want = torch.cat((a * ang.cos() - b * ang.sin(), b * ang.cos() + a * ang.sin()))
    assert rel_err(got[0, 0], want) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("n,k", [(4096, 4096), (1000, 14336), (37, 72), (6, 8)])
@pytest.mark.parametrize("rows_per_warp", [1, 4])
def test_gemv_against_float64(loader, dtype, rows, n, k, rows_per_warp):
    """Every (row, output) written (the output starts as NaN), odd N past the last warp's
    rows, K of one vector to thousands, float32 accumulation (error of one rounding)."""
    from pagedserve.ops._cuda_ops import DTYPE_CODES

    gen = torch.Generator().manual_seed(rows * n + k)
    x = rand(rows, k, dtype=dtype, gen=gen)
    w = rand(n, k, dtype=dtype, gen=gen, scale=0.05)
    xg, wg = x.cuda(), w.cuda()
    out = torch.full((rows, n), float("nan"), dtype=dtype, device="cuda")
    loader = ops.get_loader()
    grid_x = loader.launch_table().gemv_grid(rows, n, rows_per_warp)[0]
    loader.gemv(dtype=DTYPE_CODES[dtype], out=out.data_ptr(), x=xg.data_ptr(), w=wg.data_ptr(),
                m=rows, n=n, k=k, rows_per_warp=rows_per_warp, grid_x=grid_x,
                stream=torch.cuda.current_stream().cuda_stream)
    want = x.double() @ w.double().T
    assert not out.isnan().any()
    assert rel_err(out, want) < TOL[dtype]


def test_linear_dispatch():
    """ops.linear takes the GEMV kernel for one or two contiguous 16-bit rows and torch's
    matmul for anything else (more rows, fp32, a strided x); all equal F.linear, bias too."""
    gen = torch.Generator().manual_seed(3)
    w = rand(384, 256, dtype=torch.bfloat16, gen=gen, scale=0.05).cuda()
    b = rand(384, dtype=torch.bfloat16, gen=gen).cuda()
    for x in (rand(1, 256, dtype=torch.bfloat16, gen=gen).cuda(),
              rand(2, 256, dtype=torch.bfloat16, gen=gen).cuda(),
              rand(64, 256, dtype=torch.bfloat16, gen=gen).cuda(),
              rand(4, 512, dtype=torch.bfloat16, gen=gen).cuda()[:, ::2]):
        for bias in (None, b):
            want = torch.nn.functional.linear(x.double(), w.double(),
                                              None if bias is None else bias.double())
            assert rel_err(ops.linear(x, w, bias), want.cpu()) < 1e-2
    w32, x32 = w.float(), rand(2, 256, dtype=torch.float32, gen=gen).cuda()
    assert rel_err(ops.linear(x32, w32), (x32.double() @ w32.double().T).cpu()) < 1e-5

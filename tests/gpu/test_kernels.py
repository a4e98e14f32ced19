"""CUDA kernels of pagedserve.ops against the float64 torch reference, through
both loaders (nvcc-built pagedserve._cuda and CuPy/NVRTC).

Every output is pre-filled with NaN so an element the kernel forgets to write
fails; every cache slot outside all contexts holds NaN so a kernel reading past
a context, or through block-table padding, fails too."""

import math

import pytest
import torch

from pagedserve import ops
from pagedserve.ops import _cuda_ops, launch_plan, reference

pytestmark = pytest.mark.gpu

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}
HEAD_SIZES = [64, 80, 96, 128, 256]
BLOCK_SIZES = [8, 16, 32]
PAD_ID = 1 << 30  # block-table padding: reading it would fault or pick NaN


@pytest.fixture(params=["compiled", "cupy"])
def loader(request):
    try:
        ops.get_loader(request.param)
    except ImportError as e:
        pytest.fail(f"loader {request.param} unavailable on a GPU machine: {e}")
    ops.set_loader(request.param)
    yield request.param
    ops.set_loader(None)


def test_both_loaders_read_one_launch_table():
    """The compiled module returns the launch table of cuda/launch_table.cuh and the NVRTC
    loader reads it back from the device: the same rows, with the kernels the planner
    picks from (launch_plan.QPB_CHOICES, the 16 query heads of a tensor-core CTA)."""
    compiled = ops.get_loader("compiled").launch_table()
    assert ops.get_loader("cupy").launch_table() == compiled
    for d in HEAD_SIZES:
        assert compiled.variants("decode", d) == list(launch_plan.QPB_CHOICES)
        assert compiled.variants("decode_tc", d) == ([2] if d == 256 else [2, 3])
        for st in compiled.variants("decode_tc", d):
            assert compiled.shape("decode_tc", d, st).rows == launch_plan.QPB_TC
    assert compiled.head_sizes() == HEAD_SIZES == list(_cuda_ops.HEAD_SIZES)


def rel_err(got, want):
    return float((got.double().cpu() - want).abs().max() / want.abs().max().clamp_min(1e-30))


def paged_kv(lens, bs, hkv, d, dtype, gen):
    """Caches full of NaN except the slots of each context, scattered random
    block ids, and every later sequence sharing sequence 0's first full block."""
    need = [math.ceil(n / bs) for n in lens]
    nblocks = sum(need) + 3
    perm = torch.randperm(nblocks, generator=gen).tolist()
    share = lens[0] >= bs
    tables = []
    for s, nb in enumerate(need):
        shared = [tables[0][0]] if s and share and lens[s] >= bs else []
        tables.append(shared + [perm.pop() for _ in range(nb - len(shared))])
    kc = torch.full((nblocks, hkv, bs, d), float("nan"), dtype=torch.float64)
    vc = kc.clone()
    for s, (n, t) in enumerate(zip(lens, tables)):
        for p in range(n):
            blk, off = t[p // bs], p % bs
            if torch.isnan(kc[blk, 0, off, 0]):
                kc[blk, :, off] = torch.randn(hkv, d, dtype=torch.float64, generator=gen)
                vc[blk, :, off] = torch.randn(hkv, d, dtype=torch.float64, generator=gen)
    bt = torch.full((len(lens), max(need) + 1), PAD_ID, dtype=torch.int32)
    for s, t in enumerate(tables):
        bt[s, :len(t)] = torch.tensor(t, dtype=torch.int32)
    kc, vc = kc.to(dtype), vc.to(dtype)  # rounded once: the oracle sees the same values
    return kc, vc, bt


def run_decode(q, kc, vc, bt, ctx, scale, split, stages=None):
    """One decode, split-KV forced on or off; `stages` forces the tensor-core kernel's
    pipeline depth (clamped to what the head size fits)."""
    dev = "cuda"
    out = torch.full(q.shape, float("nan"), dtype=q.dtype, device=dev)
    # force the split / the single pass
    with ops.cuda_device(out.device).override(target_ctas_per_sm=1 << 20 if split else 0,
                                              decode_tc_stages=stages):
        ops.decode_attention(q.to(dev), kc.to(dev), vc.to(dev), bt.to(dev), ctx.to(dev), scale, out=out)
    torch.cuda.synchronize()
    return out


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("head_size", HEAD_SIZES)
def test_decode(loader, dtype, block_size, head_size):
    gen = torch.Generator().manual_seed(head_size * 100 + block_size)
    lens = [4097, 1, block_size - 1, block_size, block_size + 1]
    heads, hkv = 8, 2
    kc, vc, bt, = paged_kv(lens, block_size, hkv, head_size, dtype, gen)
    q = torch.randn(len(lens), heads, head_size, generator=gen).to(dtype)
    ctx = torch.tensor(lens, dtype=torch.int32)
    scale = head_size ** -0.5
    want = reference.decode_attention(q.double(), kc.double(), vc.double(), bt, ctx, scale)
    for split in (False, True):
        for stages in (2, 3):  # both pipeline depths (one kernel for fp32 and at head 256)
            got = run_decode(q, kc, vc, bt, ctx, scale, split, stages)
            assert not torch.isnan(got).any(), f"unwritten or NaN output (split={split}, stages={stages})"
            assert rel_err(got, want) < TOL[dtype], f"split={split} stages={stages}: rel err {rel_err(got, want)}"


@pytest.mark.parametrize("heads", [(4, 4), (6, 2), (16, 1), (32, 8)], ids=str)
def test_decode_gqa_mqa(loader, heads):
    gen = torch.Generator().manual_seed(7)
    H, hkv = heads
    lens = [300, 17, 1000]
    kc, vc, bt = paged_kv(lens, 16, hkv, 128, torch.bfloat16, gen)
    q = torch.randn(3, H, 128, generator=gen).bfloat16()
    ctx = torch.tensor(lens, dtype=torch.int32)
    want = reference.decode_attention(q.double(), kc.double(), vc.double(), bt, ctx, 0.09)
    for split in (False, True):
        for stages in (2, 3):
            got = run_decode(q, kc, vc, bt, ctx, 0.09, split, stages)
            assert not torch.isnan(got).any()
            assert rel_err(got, want) < 1e-2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_decode_32k(loader, dtype):
    gen = torch.Generator().manual_seed(32)
    lens = [32768, 32767]
    kc, vc, bt = paged_kv(lens, 16, 2, 128, dtype, gen)
    q = torch.randn(2, 8, 128, generator=gen).to(dtype)
    ctx = torch.tensor(lens, dtype=torch.int32)
    want = reference.decode_attention(q.double(), kc.double(), vc.double(), bt, ctx, 128 ** -0.5)
    got = run_decode(q, kc, vc, bt, ctx, 128 ** -0.5, split=True)
    assert not torch.isnan(got).any()
    assert rel_err(got, want) < TOL[dtype]


def test_decode_split_counters_reset_and_graph(loader):
    """The split-KV merge counts arriving CTAs on a persistent buffer that the last
    CTA puts back to zero: back-to-back launches of different shapes, and a CUDA
    graph replayed twice with new queries, must all be right."""
    gen = torch.Generator().manual_seed(11)
    cases = []
    for lens, heads in (([700, 5, 2000], (8, 2)), ([3000], (32, 8)), ([1, 999, 64, 300, 2500], (16, 1))):
        H, hkv = heads
        kc, vc, bt = paged_kv(lens, 16, hkv, 128, torch.bfloat16, gen)
        ctx = torch.tensor(lens, dtype=torch.int32)
        cases.append((H, kc, vc, bt, ctx))
    for _ in range(2):
        for H, kc, vc, bt, ctx in cases:
            q = torch.randn(len(ctx), H, 128, generator=gen).bfloat16()
            want = reference.decode_attention(q.double(), kc.double(), vc.double(), bt, ctx, 0.1)
            got = run_decode(q, kc, vc, bt, ctx, 0.1, split=True)
            assert rel_err(got, want) < 1e-2

    H, kc, vc, bt, ctx = cases[0]
    kc, vc, bt, ctx = kc.cuda(), vc.cuda(), bt.cuda(), ctx.cuda()
    q = torch.zeros(len(ctx), H, 128, dtype=torch.bfloat16, device="cuda")
    out = torch.empty_like(q)
    with ops.cuda_device(q.device).override(target_ctas_per_sm=1 << 20):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            ops.decode_attention(q, kc, vc, bt, ctx, 0.1, out=out)
    for _ in range(2):
        qh = torch.randn(q.shape, generator=gen).bfloat16()
        q.copy_(qh)
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        want = reference.decode_attention(qh.double(), kc.double().cpu(), vc.double().cpu(), bt.cpu(),
                                          ctx.cpu(), 0.1)
        assert rel_err(out, want) < 1e-2


@pytest.fixture(params=["tensor_cores", "cuda_cores"])
def prefill_kernel(request):
    """fp16/bf16 prefill runs on the tensor-core kernel; the CUDA-core one (fp32's)
    must stay right for them too (GPUs before sm_80 take it)."""
    with ops.cuda_device("cuda").override(prefill_tensor_cores=request.param == "tensor_cores"):
        yield request.param


def check_prefill_case(dtype, head_size, block_size, gen, lens, new, heads=(8, 2)):
    H, hkv = heads
    kc, vc, bt = paged_kv(lens, block_size, hkv, head_size, dtype, gen)
    q = torch.randn(sum(new), H, head_size, generator=gen).to(dtype)
    qsl = torch.tensor([0] + torch.tensor(new).cumsum(0).tolist(), dtype=torch.int32)
    ctx = torch.tensor(lens, dtype=torch.int32)
    scale = head_size ** -0.5
    want = reference.prefill_attention(q.double(), kc.double(), vc.double(), bt, qsl, ctx, scale)
    out = torch.full(q.shape, float("nan"), dtype=dtype, device="cuda")
    ops.prefill_attention(q.cuda(), kc.cuda(), vc.cuda(), bt.cuda(), qsl.cuda(), ctx.cuda(), scale, out=out)
    torch.cuda.synchronize()
    assert not torch.isnan(out).any(), "unwritten or NaN output"
    assert rel_err(out, want) < TOL[dtype], rel_err(out, want)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("head_size", HEAD_SIZES)
def test_prefill_varlen_cached_prefix(loader, prefill_kernel, dtype, head_size):
    gen = torch.Generator().manual_seed(head_size)
    # a fresh prompt, the tail after a prefix-cache hit, a decode-like single token,
    # a chunk at the end of a long context, a one-token prompt
    lens = [37, 100, 17, 4097, 1]
    new = [37, 20, 1, 70, 1]
    check_prefill_case(dtype, head_size, 16, gen, lens, new)


@pytest.mark.parametrize("block_size", [8, 32])
@pytest.mark.parametrize("heads", [(4, 4), (16, 1), (6, 2)], ids=str)
def test_prefill_block_sizes_and_groups(loader, prefill_kernel, block_size, heads):
    gen = torch.Generator().manual_seed(block_size)
    check_prefill_case(torch.bfloat16, 128, block_size, gen, [block_size + 1, 50, 9], [block_size + 1, 33, 2], heads)


@pytest.mark.parametrize("head_size", [96, 128])
def test_prefill_long_prompts_after_a_prefix_hit(loader, prefill_kernel, head_size):
    """Llama-3-8B heads: many query tiles per sequence (heaviest first), many KV
    stages, tiles that end mid-sequence and diagonal tiles of every shape."""
    gen = torch.Generator().manual_seed(7)
    check_prefill_case(torch.bfloat16, head_size, 16, gen, [1500, 700, 333, 64], [700, 700, 1, 63], (32, 8))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("head_size", [64, 80, 256])
def test_write_kv_exact(loader, dtype, block_size, head_size):
    gen = torch.Generator().manual_seed(5)
    hkv, nblocks, T = 3, 9, 40
    kc = torch.randn(nblocks, hkv, block_size, head_size, generator=gen).to(dtype)
    vc = torch.randn(nblocks, hkv, block_size, head_size, generator=gen).to(dtype)
    # key/value as strided views of a fused qkv buffer, like a model produces them
    qkv = torch.randn(T, (2 + 2 * hkv) * head_size, generator=gen).to(dtype)
    key = qkv[:, 2 * head_size:(2 + hkv) * head_size].view(T, hkv, head_size)
    value = qkv[:, (2 + hkv) * head_size:].view(T, hkv, head_size)
    slots = torch.randperm(nblocks * block_size, generator=gen)[:T]
    slots[::7] = -1
    want_k, want_v = kc.clone(), vc.clone()
    reference.write_kv(key, value, want_k, want_v, slots)
    gk, gv = kc.cuda(), vc.cuda()
    gqkv = qkv.cuda()
    ops.write_kv(gqkv[:, 2 * head_size:(2 + hkv) * head_size].view(T, hkv, head_size),
                 gqkv[:, (2 + hkv) * head_size:].view(T, hkv, head_size), gk, gv, slots.cuda())
    assert torch.equal(gk.cpu(), want_k) and torch.equal(gv.cpu(), want_v)


def test_copy_blocks_all_layers_exact(loader):
    gen = torch.Generator().manual_seed(6)
    layers = [(torch.randn(12, 2, 16, 128, generator=gen).bfloat16(),
               torch.randn(12, 2, 16, 128, generator=gen).bfloat16()) for _ in range(5)]
    mapping = torch.tensor([[0, 7], [3, 11], [4, 1]])
    want = [(k.clone(), v.clone()) for k, v in layers]
    reference.copy_blocks([k for k, _ in want], [v for _, v in want], mapping)
    gpu = [(k.cuda(), v.cuda()) for k, v in layers]
    ops.copy_blocks([k for k, _ in gpu], [v for _, v in gpu], mapping)
    for (gk, gv), (wk, wv) in zip(gpu, want):
        assert torch.equal(gk.cpu(), wk) and torch.equal(gv.cpu(), wv)


def test_copy_tables_staged_across_calls_streams_and_graphs(loader):
    """The tables of copy launches go up through buffers the loader reuses: many calls
    in a row, alternating streams, and a captured graph (which gets buffers of its own,
    so a replay after later eager calls still copies its own pairs) all copy exactly."""
    gen = torch.Generator().manual_seed(9)
    cache = torch.randn(64, 2, 16, 64, generator=gen).half()
    gpu = cache.cuda()
    want = cache.clone()
    side = torch.cuda.Stream()
    for i in range(40):  # each call's pairs overwrite the staging of the one before
        pairs = torch.tensor([[i % 32, 32 + 2 * i % 32], [(i + 5) % 32, 33 + 2 * i % 32]])
        want[pairs[:, 1]] = want[pairs[:, 0]].clone()
        if i % 3 == 2:
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                ops.copy_blocks([gpu], [], pairs)
            torch.cuda.current_stream().wait_stream(side)
        else:
            ops.copy_blocks([gpu], [], pairs)
    assert torch.equal(gpu.cpu(), want)
    graph_pairs = torch.tensor([[1, 2], [3, 4]])
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ops.copy_blocks([gpu], [], graph_pairs)
    ops.copy_blocks([gpu], [], torch.tensor([[5, 6]]))  # reuses the staging after capture
    gpu[2].zero_()
    gpu[4].zero_()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(gpu[2], gpu[1]) and torch.equal(gpu[4], gpu[3])


@pytest.mark.parametrize("method", ["memcpy", "kernel"])
def test_swap_blocks_exact(loader, method):
    gen = torch.Generator().manual_seed(8)
    gpu_cache = torch.randn(20, 2, 16, 64, generator=gen).half().cuda()
    cpu_cache = torch.randn(15, 2, 16, 64, generator=gen).half().pin_memory()
    out_map = torch.tensor([[3, 0], [4, 1], [5, 2], [17, 9], [0, 14]])  # one run of 3 + scattered
    want_cpu = cpu_cache.clone()
    want_cpu[out_map[:, 1]] = gpu_cache.cpu()[out_map[:, 0]]
    _cuda_ops.swap_blocks(gpu_cache, cpu_cache, out_map, method=method)
    torch.cuda.synchronize()
    assert torch.equal(cpu_cache, want_cpu)
    in_map = torch.tensor([[9, 6], [14, 19], [1, 10]])
    want_gpu = gpu_cache.cpu().clone()
    want_gpu[in_map[:, 1]] = cpu_cache[in_map[:, 0]]
    _cuda_ops.swap_blocks(cpu_cache, gpu_cache, in_map, method=method)
    torch.cuda.synchronize()
    assert torch.equal(gpu_cache.cpu(), want_gpu)
    ops.swap_blocks(gpu_cache, cpu_cache, torch.tensor([[2, 3]]))  # the default choice
    torch.cuda.synchronize()
    assert torch.equal(cpu_cache[3], gpu_cache[2].cpu())


@pytest.mark.parametrize("method", [None, "memcpy", "kernel"])
def test_swap_blocks_all_layers_one_call(loader, method):
    """Every layer's K and V caches in one call, out and back in, with runs of
    consecutive ids (one memcpy each) and scattered ids mixed, listed out of order."""
    gen = torch.Generator().manual_seed(9)
    layers, shape = 3, (2, 16, 64)
    gpu = [torch.randn(24, *shape, generator=gen).bfloat16().cuda() for _ in range(2 * layers)]
    cpu = [torch.randn(10, *shape, generator=gen).bfloat16().pin_memory() for _ in range(2 * layers)]
    out_map = torch.tensor([[20, 9], [5, 0], [6, 1], [7, 2], [8, 3], [13, 6], [2, 7]])
    want_cpu = [c.clone() for c in cpu]
    for w, g in zip(want_cpu, gpu):
        w[out_map[:, 1]] = g.cpu()[out_map[:, 0]]
    _cuda_ops.swap_blocks(gpu, cpu, out_map, method=method)
    torch.cuda.synchronize()
    for c, w in zip(cpu, want_cpu):
        assert torch.equal(c, w)
    in_map = torch.tensor([[0, 23], [1, 0], [2, 1], [9, 12]])
    want_gpu = [g.cpu() for g in gpu]
    for w, c in zip(want_gpu, cpu):
        w[in_map[:, 1]] = c[in_map[:, 0]]
    _cuda_ops.swap_blocks(cpu, gpu, in_map.numpy(), method=method)  # numpy mappings work too
    torch.cuda.synchronize()
    for g, w in zip(gpu, want_gpu):
        assert torch.equal(g.cpu(), w)
    # the public op with the engine's per-cache signature and with lists
    ops.swap_blocks(gpu[0], cpu[0], torch.tensor([[4, 5]]))
    ops.swap_blocks(gpu[1:], cpu[1:], [[4, 5]])
    torch.cuda.synchronize()
    for g, c in zip(gpu, cpu):
        assert torch.equal(c[5], g[4].cpu())


def test_swap_blocks_pageable_and_bad_mapping(loader):
    gen = torch.Generator().manual_seed(10)
    gpu = torch.randn(8, 2, 16, 64, generator=gen).half().cuda()
    cpu = torch.zeros(6, 2, 16, 64).half()  # pageable: the GPU cannot address it
    m = torch.tensor([[1, 4], [6, 0]])
    ops.swap_blocks(gpu, cpu, m)  # the default falls back to memcpy
    torch.cuda.synchronize()
    assert torch.equal(cpu[4], gpu[1].cpu()) and torch.equal(cpu[0], gpu[6].cpu())
    with pytest.raises(ValueError, match=r"pinned memory; dst\[0\] is pageable"):
        _cuda_ops.swap_blocks(gpu, cpu, m, method="kernel")
    with pytest.raises(ValueError, match="block_mapping ids out of range"):
        ops.swap_blocks(gpu, cpu.pin_memory(), torch.tensor([[1, 6]]))
    with pytest.raises(ValueError, match="block_mapping must be"):
        ops.swap_blocks(gpu, cpu, torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match=r"dst\[1\]"):
        ops.swap_blocks([gpu, gpu], [cpu, cpu.float()], m)


def test_bad_input_names_the_field(loader):
    kc, vc = ops.allocate_kv_cache(4, 16, 2, 128, torch.bfloat16, "cuda")
    q = torch.randn(1, 4, 128, device="cuda").bfloat16()
    bt = torch.zeros(1, 1, dtype=torch.int32, device="cuda")
    with pytest.raises(ValueError, match="context_lens"):
        ops.decode_attention(q, kc, vc, bt, torch.ones(1, dtype=torch.int64, device="cuda"), 1.0)
    with pytest.raises(ValueError, match="head_size"):
        ops.decode_attention(torch.randn(1, 4, 48, device="cuda").bfloat16(), kc, vc, bt,
                             torch.ones(1, dtype=torch.int32, device="cuda"), 1.0)
    with pytest.raises(ValueError, match="key_cache dtype"):
        ops.decode_attention(q.float(), kc, vc, bt, torch.ones(1, dtype=torch.int32, device="cuda"), 1.0)

"""Every family on CUDA: logits against transformers (fp32 and bf16), greedy parity
through `LLM.generate` with decode CUDA graphs, the windowed decode inside a captured
graph, and the grouped-GEMM expert path against the per-expert loop."""

import sys
from pathlib import Path

import pytest
import torch

from pagedserve import LLM, SamplingParams
from pagedserve.config import EngineConfig
from pagedserve.runner.model_runner import ModelRunner
from pagedserve.ops import reference, sliding_window

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from model_families import FAMILIES, PHI3_ORIGINAL_CONTEXT, WINDOW, save_tiny  # noqa: E402
from test_model import hf_greedy  # noqa: E402
from test_model_families import _chunked_logits  # noqa: E402

pytestmark = pytest.mark.gpu

TOL = {torch.float32: 2e-3, torch.bfloat16: 0.25}
GPU_HEAD_DIM = 64  # a head size the CUDA kernels are built for


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", FAMILIES)
def test_logits_match_transformers_on_cuda(kind, dtype, tmp_path):
    hf = save_tiny(kind, tmp_path, head_dim=GPU_HEAD_DIM)
    runner = ModelRunner(EngineConfig(model=str(tmp_path), device="cuda", block_size=4,
                                      dtype=str(dtype).removeprefix("torch."),
                                      num_kv_blocks=200, swap_space_gb=0))
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(3, 320, (n,), generator=g).tolist() for n in (150, 37, 20, 64)]
    got = _chunked_logits(runner, seqs)
    worst = 0.0
    with torch.no_grad():
        for i, s in enumerate(seqs):
            ref = hf(torch.tensor([s])).logits[0]
            worst = max(worst, (got[i].cpu() - ref).abs().max().item())
    print(f"{kind} {dtype}: max |logits - transformers fp32| = {worst:.2e}")
    assert worst < TOL[dtype]


@pytest.mark.parametrize("kind", FAMILIES)
def test_greedy_generate_on_cuda_with_graphs(kind, tmp_path):
    hf = save_tiny(kind, tmp_path, head_dim=GPU_HEAD_DIM)
    g = torch.Generator().manual_seed(7)
    lens = [17, 23, 17, 31, 40, 19, 23, 28]
    assert min(lens) > max(PHI3_ORIGINAL_CONTEXT, WINDOW)
    prompts = [torch.randint(3, 320, (n,), generator=g).tolist() for n in lens]
    llm = LLM(str(tmp_path), device="cuda", dtype="float32", block_size=4, num_kv_blocks=400,
              swap_space_gb=0, max_num_seqs=16)
    assert llm.engine.runner.graphs is not None  # decode steps replay captured graphs
    outs = llm.generate(prompts, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))
    refs = hf_greedy(hf, prompts, 24)
    for i, (o, ref) in enumerate(zip(outs, refs)):
        assert list(o.outputs[0].token_ids) == ref, f"{kind} prompt {i}"


def test_windowed_decode_replays_in_a_cuda_graph():
    torch.manual_seed(0)
    bs, hkv, group, d, window = 16, 2, 4, 64, 40
    kc = torch.randn(300, hkv, bs, d, device="cuda")
    vc = torch.randn_like(kc)
    tables = torch.randperm(300, device="cuda")[:8 * 30].view(8, 30).int()
    q = torch.randn(8, hkv * group, d, device="cuda")
    ctx = torch.tensor([1, 17, 40, 41, 100, 256, 399, 480], dtype=torch.int32, device="cuda")
    out = torch.empty_like(q)
    sliding_window.decode_attention(q, kc, vc, tables, ctx, 0.125, window, out=out)  # warm-up
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        sliding_window.decode_attention(q, kc, vc, tables, ctx, 0.125, window, out=out)
    for lens in ([1, 17, 40, 41, 100, 256, 399, 480], [3, 50, 64, 65, 200, 300, 420, 470]):
        ctx.copy_(torch.tensor(lens, dtype=torch.int32))
        graph.replay()
        want = reference.decode_attention(q.double(), kc.double(), vc.double(), tables, ctx,
                                          0.125, window=window)
        torch.testing.assert_close(out.double(), want, rtol=1e-4, atol=1e-4)


def test_grouped_experts_match_the_loop():
    from pagedserve.model.moe import Experts, route

    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("torch without _grouped_mm")
    torch.manual_seed(0)
    ex = Experts(8, 256, 128, "silu").cuda().to(torch.bfloat16)
    with torch.no_grad():
        ex.gate_up_proj.normal_(0, 0.05)
        ex.down_proj.normal_(0, 0.05)
        for n in (1, 7, 64, 333):
            x = torch.randn(n, 256, device="cuda", dtype=torch.bfloat16)
            w, ids = route(torch.randn(n, 8, device="cuda"), 2, True, torch.bfloat16)
            grouped = ex._grouped(x, w, ids)
            loop = ex._sorted_loop(x, w, ids)
            torch.testing.assert_close(grouped.float(), loop.float(), rtol=2e-2, atol=2e-2)

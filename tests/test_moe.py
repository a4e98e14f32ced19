"""Sparse MoE routing and expert compute against transformers' own blocks, on batches
where tokens pick different experts, experts tie, and some experts get no token."""

import pytest
import torch

from pagedserve.model.config import ModelConfig
from pagedserve.model.moe import SparseMoe, route

from model_families import tiny_config

ARCH = {"qwen3_moe": "Qwen3MoeForCausalLM", "mixtral": "MixtralForCausalLM"}


def _hf_config(kind: str):
    cfg = tiny_config(kind)
    cfg.architectures = [ARCH[kind]]
    return cfg


def _blocks(kind: str):
    """(transformers' sparse MoE block, ours) with the same random weights."""
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    hf_cfg = _hf_config(kind)
    torch.manual_seed(3)
    hf = (Qwen3MoeSparseMoeBlock if kind == "qwen3_moe" else MixtralSparseMoeBlock)(hf_cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.3)
        w = hf.gate.weight  # [E, H]
        w[1] = w[0]          # experts 0 and 1 always tie
        w[3] = 0.0
        w[3, 0] = -50.0      # expert 3 never wins: every test token has x[0] >= 1
        w[:3, 0] = w[:3, 0].abs()
    ours = SparseMoe(ModelConfig.from_hf(hf_cfg))
    ours.load_state_dict(hf.state_dict())  # same names: gate.weight, experts.{gate_up,down}_proj
    return hf, ours


def _tokens(n: int) -> torch.Tensor:
    x = torch.randn(n, 64, generator=torch.Generator().manual_seed(5))
    x[:, 0] = x[:, 0].abs() + 1.0
    return x


@pytest.mark.parametrize("kind", ["qwen3_moe", "mixtral"])
def test_routing_matches_transformers_with_ties_and_idle_experts(kind):
    hf, ours = _blocks(kind)
    x = _tokens(40)
    with torch.no_grad():
        _, hf_weights, hf_ids = hf.gate(x)
        logits = ours.gate(x)
        weights, ids = route(logits, ours.top_k, ours.renormalize, torch.float32)
    assert torch.equal(ids, hf_ids)
    assert torch.equal(weights, hf_weights.float())
    experts = ids.reshape(-1).tolist()
    # the tie: 0 and 1 have equal probability for every token, so they are picked together
    probs = torch.softmax(logits, -1)
    assert torch.equal(probs[:, 0], probs[:, 1])
    assert 3 not in experts                                   # an expert with no token
    assert len(set(experts)) >= 3                              # tokens pick different experts
    rows = [set(r) for r in ids.tolist()]
    assert any(r == {0, 1} for r in rows) and any(r != {0, 1} for r in rows)


@pytest.mark.parametrize("kind", ["qwen3_moe", "mixtral"])
@pytest.mark.parametrize("n", [1, 3, 40])
def test_block_output_matches_transformers(kind, n):
    hf, ours = _blocks(kind)
    x = _tokens(n)
    with torch.no_grad():
        ref = hf(x[None])
        ref = (ref[0] if isinstance(ref, tuple) else ref)[0]
        got = ours(x)
    assert got.shape == x.shape
    assert (got - ref).abs().max().item() < 1e-5


def test_every_path_of_the_experts_agrees():
    """The dense (every expert over every token) form, used on CUDA without grouped
    GEMM, against the sorted per-expert loop of the CPU."""
    _, ours = _blocks("qwen3_moe")
    x = _tokens(25)
    with torch.no_grad():
        w, ids = route(ours.gate(x), 2, True, torch.float32)
        loop = ours.experts._sorted_loop(x, w, ids)
        dense = ours.experts._dense(x, w, ids)
    torch.testing.assert_close(dense, loop, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("kind", ["qwen3_moe", "mixtral"])
def test_experts_split_by_intermediate_size_sum_to_the_whole(kind):
    """Tensor parallelism: each of two ranks holds half of every expert's intermediate
    dimension (read through `Experts.rank_parts`, as loading does) and the same router;
    the two partial expert sums add up (the all-reduce) to the whole block's output, on
    the batch with tied and idle experts, through the CPU loop and the dense form."""
    from pagedserve.model.parallel import TensorParallel

    _, whole = _blocks(kind)
    experts = whole.experts
    x = _tokens(40)
    ranks = []
    for r in range(2):
        part = SparseMoe(ModelConfig.from_hf(_hf_config(kind)), TensorParallel(r, 2))
        part.gate.load_state_dict(whole.gate.state_dict())
        for param in ("gate_up_proj", "down_proj"):
            src, dst = getattr(whole.experts, param).data, getattr(part.experts, param).data
            for index, p in part.experts.rank_parts(param):
                assert tuple(p.full_shape) == tuple(src.shape)
                dst[index] = src[p.index]
        assert part.experts.down_proj.shape == (experts.num_experts, 64, experts.intermediate // 2)
        ranks.append(part)
    with torch.no_grad():
        w, ids = route(whole.gate(x), whole.top_k, whole.renormalize, torch.float32)
        want = whole.experts._sorted_loop(x, w, ids)
        for path in ("_sorted_loop", "_dense"):
            got = sum(getattr(p.experts, path)(x, w, ids) for p in ranks)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)

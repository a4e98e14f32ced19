"""Tensor-parallel loading without a process group: each rank's slice of the checkpoint
(read from memory-mapped safetensors), the exact-once check per rank, packing the
slice, the CPU threads shared between ranks, and every family's slices (Phi-3's fused
checkpoint tensors and the MoE experts included) checked against the whole model."""

from __future__ import annotations

import pytest
import torch

from pagedserve import LLM
from pagedserve.config import EngineConfig
from pagedserve.cpu_env import plan_cpu_threads
from pagedserve.distributed.worker import split_cpu_threads
from pagedserve.model import loader
from pagedserve.model.config import ModelConfig
from pagedserve.model.loader import ModelSource, load_model, load_model_config
from pagedserve.model.parallel import TensorParallel, check_shardable
from pagedserve.ops import cpu_linear

from model_families import FAMILIES, save_tiny, tiny_config

VOCAB, HIDDEN, INTER, HEADS, KV_HEADS = 321, 64, 96, 4, 2  # odd vocab: the last rank pads


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(5)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER,
                      num_hidden_layers=2, num_attention_heads=HEADS,
                      num_key_value_heads=KV_HEADS, max_position_embeddings=64,
                      tie_word_embeddings=False, attention_bias=True)
    path = tmp_path_factory.mktemp("tiny-llama")
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    return str(path)


def _load(path, tp, dtype=torch.float32, weights=None, monkeypatch=None):
    source = ModelSource(directory=path, origin=path)
    if weights is not None:
        monkeypatch.setattr(loader, "_iter_hf_dir", lambda _source: iter(weights))
    return load_model(source, load_model_config(source), device="cpu", dtype=dtype,
                      max_model_len=64, tp=tp)


class CountingSlice:
    """A safetensors slice that counts the elements read through it."""

    def __init__(self, inner, counter):
        self.inner, self.counter = inner, counter

    def get_shape(self):
        return self.inner.get_shape()

    def __getitem__(self, index):
        t = self.inner[index]
        self.counter.append(t.numel())
        return t


def test_each_rank_reads_only_its_slice_of_the_safetensors(llama_dir, monkeypatch):
    whole = _load(llama_dir, TensorParallel())
    read_by_rank, ranks = [], []
    real_iter = loader._iter_hf_dir
    for r in range(2):
        read: list[int] = []
        monkeypatch.setattr(loader, "_iter_hf_dir", lambda source, read=read: (
            (name, CountingSlice(t, read)) for name, t in real_iter(source)))
        ranks.append(_load(llama_dir, TensorParallel(r, 2)))
        read_by_rank.append(sum(read))
    padding = (-(-VOCAB // 2) * 2 - VOCAB) * HIDDEN * 2  # rank 1's zero rows, embed + head
    for r, m in enumerate(ranks):  # a rank reads what it holds, nothing more
        held = sum(p.numel() for p in m.parameters())
        assert read_by_rank[r] == held - (padding if r == 1 else 0)
    # the slices put back together are the single-process tensors
    q, kv = HEADS * 16, KV_HEADS * 16
    for name in ("model.layers.1.self_attn.qkv_proj.weight", "model.layers.1.self_attn.qkv_proj.bias"):
        full = dict(whole.named_parameters())[name]
        halves = [dict(m.named_parameters())[name] for m in ranks]
        assert torch.equal(torch.cat([h[:q // 2] for h in halves]), full[:q])
        assert torch.equal(torch.cat([h[q // 2:q // 2 + kv // 2] for h in halves]), full[q:q + kv])
        assert torch.equal(torch.cat([h[q // 2 + kv // 2:] for h in halves]), full[q + kv:])
    for name, dim in (("model.layers.0.self_attn.o_proj.weight", 1),
                      ("model.layers.0.mlp.down_proj.weight", 1)):
        full = dict(whole.named_parameters())[name]
        assert torch.equal(torch.cat([dict(m.named_parameters())[name] for m in ranks], dim), full)
    rows = -(-VOCAB // 2)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        full = dict(whole.named_parameters())[name]
        assert torch.equal(dict(ranks[0].named_parameters())[name], full[:rows])
        last = dict(ranks[1].named_parameters())[name]
        assert torch.equal(last[:VOCAB - rows], full[rows:])
        assert not last[VOCAB - rows:].any()  # the padding row is zero
    assert torch.equal(ranks[1].model.norm.weight, whole.model.norm.weight)  # replicated


def _tensors(path) -> list[tuple[str, torch.Tensor]]:
    from safetensors.torch import load_file

    return sorted(load_file(f"{path}/model.safetensors").items())


def test_every_element_of_a_rank_is_written_exactly_once(llama_dir, monkeypatch):
    tp = TensorParallel(1, 2)
    tensors = _tensors(llama_dir)
    k = "model.layers.0.self_attn.k_proj.weight"
    doubled = tensors + [t for t in tensors if t[0] == k]
    with pytest.raises(ValueError, match="fills 1 parameters more than once, e.g. "
                                         "model.layers.0.self_attn.qkv_proj.weight"):
        _load(llama_dir, tp, weights=doubled, monkeypatch=monkeypatch)
    with pytest.raises(ValueError, match="lacks weights for 1 parameters, e.g. "
                                         "model.layers.0.self_attn.qkv_proj.weight"):
        _load(llama_dir, tp, weights=[t for t in tensors if t[0] != k], monkeypatch=monkeypatch)
    # a checkpoint tensor of another shape fails on its full shape, not on the slice
    grown = [(n, torch.zeros(t.shape[0], t.shape[1] + 2) if n == k else t) for n, t in tensors]
    with pytest.raises(ValueError, match=rf"{k} has shape \(32, 66\), expected \(32, 64\)"):
        _load(llama_dir, tp, weights=grown, monkeypatch=monkeypatch)


def test_packing_packs_the_rank_slice(llama_dir):
    if not cpu_linear.packing_supported(torch.bfloat16):
        pytest.skip("no oneDNN bfloat16 on this CPU")
    m = _load(llama_dir, TensorParallel(1, 2), dtype=torch.bfloat16)
    linears = [mod for mod in m.modules() if hasattr(mod, "packed_weight")]
    assert cpu_linear.pack_model(m) == len(linears) == 2 * 4 + 1  # qkv, o, gate_up, down; head
    down = m.model.layers[0].mlp.down_proj
    assert tuple(down.weight.shape) == (HIDDEN, INTER // 2)
    x = torch.randn(3, INTER // 2, dtype=torch.bfloat16)
    torch.testing.assert_close(down.matmul(x, None), torch.nn.functional.linear(x, down.weight),
                               rtol=1e-2, atol=1e-2)


def test_cpu_threads_are_shared_between_a_node_s_ranks(monkeypatch):
    def share(threads, ranks):
        return split_cpu_threads(EngineConfig(device="cpu", cpu_threads=threads), ranks).cpu_threads

    assert [share(8, 2), share(8, 3), share(1, 2), share(4, 1)] == [4, 2, 1, 4]
    planned = plan_cpu_threads(None, current=torch.get_num_threads()).threads
    assert split_cpu_threads(EngineConfig(device="cpu"), 2).cpu_threads == max(1, planned // 2)
    monkeypatch.setattr("pagedserve.config._cuda_available", lambda: True)
    gpu = EngineConfig(device="cuda", cpu_threads=8)
    assert split_cpu_threads(gpu, 2) is gpu  # GPU ranks keep their setting


def expected_slice(name: str, full: torch.Tensor, cfg: ModelConfig, r: int) -> torch.Tensor:
    """Rank r's part of the single-process parameter `full` over 2 ranks, written out
    independently of model/parallel.py: q heads, KV heads (replicated when only one),
    gate rows and up rows each halved; row-parallel and expert down columns halved; the
    vocabulary halved; the rest (norms, routers) whole."""
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    if name.endswith("qkv_proj.weight"):
        k, v = full[q:q + kv], full[q + kv:]
        if cfg.num_kv_heads > 1:
            k, v = k.chunk(2)[r], v.chunk(2)[r]
        return torch.cat([full[:q].chunk(2)[r], k, v])
    if name.endswith("mlp.gate_up_proj.weight"):
        gate, up = full.chunk(2)
        return torch.cat([gate.chunk(2)[r], up.chunk(2)[r]])
    if name.endswith("experts.gate_up_proj"):  # [experts, gate rows | up rows, hidden]
        gate, up = full.chunk(2, dim=1)
        return torch.cat([gate.chunk(2, dim=1)[r], up.chunk(2, dim=1)[r]], dim=1)
    if name.endswith(("o_proj.weight", "down_proj.weight", "experts.down_proj")):
        return full.chunk(2, dim=-1)[r]
    if name.endswith(("embed_tokens.weight", "lm_head.weight")):
        return full.chunk(2)[r]  # vocabulary 320: no padding row
    return full


@pytest.mark.parametrize("load_format", ["safetensors", "dummy"])
@pytest.mark.parametrize("kind", FAMILIES)
def test_every_family_s_ranks_hold_their_slices(kind, load_format, tmp_path, monkeypatch):
    """Safetensors: each rank reads exactly the elements it holds (Phi-3's fused qkv_proj
    and gate_up_proj part by part, with one KV head replicated on both ranks). Dummy
    weights: the same random model at either size (stacked expert tensors, Gemma's
    folded norm offset)."""
    save_tiny(kind, tmp_path, overrides={"num_key_value_heads": 1} if kind == "phi3" else None)
    source = ModelSource(directory=str(tmp_path), origin=str(tmp_path))
    cfg = load_model_config(source)
    fmt = "dummy" if load_format == "dummy" else "auto"

    def load(tp):
        return load_model(source, cfg, device="cpu", dtype=torch.float32, max_model_len=64,
                          load_format=fmt, tp=tp)

    whole = dict(load(TensorParallel()).named_parameters())
    real_iter = loader._iter_hf_dir
    for r in range(2):
        read: list[int] = []
        monkeypatch.setattr(loader, "_iter_hf_dir", lambda source, read=read: (
            (name, CountingSlice(t, read)) for name, t in real_iter(source)))
        rank = load(TensorParallel(r, 2))
        params = dict(rank.named_parameters())
        assert params.keys() == whole.keys()
        for name, p in params.items():
            assert torch.equal(p, expected_slice(name, whole[name], cfg, r)), (kind, r, name)
        if load_format == "safetensors":
            assert sum(read) == sum(p.numel() for p in rank.parameters())


def test_shapes_that_do_not_divide_are_refused_by_name():
    moe = ModelConfig.from_hf(tiny_config("qwen3_moe", moe_intermediate_size=30))
    check_shardable(moe, 1)
    with pytest.raises(ValueError, match="tensor_parallel_size 4 must divide the model's expert "
                                         "intermediate size 30"):
        check_shardable(moe, 4)
    check_shardable(moe, 2)
    for kind in FAMILIES:
        check_shardable(ModelConfig.from_hf(tiny_config(kind)), 2)


def test_an_unshardable_shape_fails_start_up_before_any_process(tmp_path):
    save_tiny("qwen3_moe", tmp_path, overrides={"moe_intermediate_size": 30})
    with pytest.raises(ValueError, match="must divide the model's expert intermediate size 30"):
        LLM(str(tmp_path), tensor_parallel_size=4, device="cpu", dtype="float32")
    assert not torch.distributed.is_initialized()

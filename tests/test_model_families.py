"""Every supported family against transformers on tiny random-weight checkpoints:
logits of chunked prefills and decodes through the paged runner, greedy generations
through `LLM.generate`, and the loading paths (sharded index, bf16, tied embeddings).
Sequences are far longer than the windowed families' window (8), so a windowed layer
that saw outside its window would show in the logits."""

import json

import pytest
import torch

from pagedserve import LLM, SamplingParams
from pagedserve.config import EngineConfig
from pagedserve.engine.batch import SeqWork
from pagedserve.runner.model_runner import ModelRunner
from pagedserve.model.registry import SUPPORTED_ARCHITECTURES, model_class

from model_driver import GREEDY
from model_families import FAMILIES, WINDOW, greedy_prompts, save_tiny
from test_model import all_logits, hf_greedy

EXPECTED = {"qwen3": "Qwen3ForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM",
            "mixtral": "MixtralForCausalLM", "gemma3": "Gemma3ForCausalLM",
            "phi3": "Phi3ForCausalLM", "mistral_window": "MistralForCausalLM"}


def _runner(path, **kw) -> ModelRunner:
    kw.setdefault("num_kv_blocks", 200)
    return ModelRunner(EngineConfig(model=str(path), device="cpu", dtype="float32",
                                    block_size=4, swap_space_gb=0, **kw))


def _chunked_logits(runner, seqs):
    """Logits of every token of `seqs`, fed as: step 1 three prompts (the first cut
    at 100 tokens), step 2 the rest of it, one decode and a new prompt, step 3 decodes."""
    def sw(i, start, n):
        return SeqWork(i, seqs[i][start:start + n], start, tables[i], False, GREEDY, [], [], 0,
                       frozenset())

    # interleaved block tables: block b of sequence i is 4 * b + i
    tables = {i: [4 * b + i for b in range(45)] for i in range(4)}
    n1 = len(seqs[1])
    steps = [[sw(0, 0, 100), sw(1, 0, n1 - 2), sw(2, 0, len(seqs[2]))],
             [sw(0, 100, len(seqs[0]) - 100), sw(1, n1 - 2, 1), sw(3, 0, len(seqs[3]) - 1)],
             [sw(1, n1 - 1, 1), sw(3, len(seqs[3]) - 1, 1)]]
    got: dict[int, list] = {}
    for step in steps:
        for w, lg in zip(step, all_logits(runner, step)):
            got.setdefault(w.seq_id, []).append(lg)
    return {i: torch.cat(v) for i, v in got.items()}


@pytest.mark.parametrize("kind", FAMILIES)
def test_logits_match_transformers(kind, tmp_path):
    hf = save_tiny(kind, tmp_path)
    runner = _runner(tmp_path)
    mc = runner.model_config
    assert mc.architecture == EXPECTED[kind]
    assert type(runner.model) is model_class(mc.architecture)
    if kind in ("gemma3", "mistral_window"):
        assert mc.sliding_window_layers and all(mc.layer_windows[i] == WINDOW
                                                for i in mc.sliding_window_layers)
    g = torch.Generator().manual_seed(0)
    # all longer than the window, and than Phi-3's original context (LongRoPE's long factors)
    seqs = [torch.randint(3, 320, (n,), generator=g).tolist() for n in (150, 37, 20, 64)]
    got = _chunked_logits(runner, seqs)
    worst = 0.0
    with torch.no_grad():
        for i, s in enumerate(seqs):
            ref = hf(torch.tensor([s])).logits[0]
            assert got[i].shape == ref.shape
            worst = max(worst, (got[i] - ref).abs().max().item())
    print(f"{kind}: max |logits - transformers| = {worst:.2e}")
    assert worst < 2e-4, f"{kind}: {worst}"


@pytest.mark.parametrize("kind", FAMILIES)
def test_greedy_generate_matches_transformers(kind, tmp_path):
    hf = save_tiny(kind, tmp_path)
    prompts = greedy_prompts()
    llm = LLM(str(tmp_path), device="cpu", dtype="float32", block_size=4, num_kv_blocks=200,
              swap_space_gb=0)
    outs = llm.generate(prompts, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))
    ours = [list(o.outputs[0].token_ids) for o in outs]
    refs = hf_greedy(hf, prompts, 24)
    for i, (mine, ref) in enumerate(zip(ours, refs)):
        assert len(mine) == 24 and mine == ref, f"{kind} prompt {i}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sharded_index_tied_and_bf16_checkpoints(dtype, tmp_path):
    from transformers import AutoModelForCausalLM

    save_tiny("qwen3", tmp_path, dtype=dtype, max_shard_size="40KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 3 and "lm_head.weight" not in index["weight_map"]
    (tmp_path / "stray.safetensors").write_bytes(b"not listed in the index: never read")
    runner = _runner(tmp_path)
    assert runner.model.lm_head.weight is runner.model.model.embed_tokens.weight
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    s = [3 + (7 * i) % 300 for i in range(150)]
    got = _chunked_logits(runner, [s, s[:9], s[:20], s[:30]])[0]
    with torch.no_grad():
        ref = hf(torch.tensor([s])).logits[0]
    assert (got - ref).abs().max().item() < 2e-4


def test_missing_shard_is_named(tmp_path):
    save_tiny("qwen3", tmp_path, max_shard_size="40KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    (tmp_path / sorted(set(index["weight_map"].values()))[1]).unlink()
    with pytest.raises(ValueError, match="missing shard files"):
        _runner(tmp_path)


def test_wrong_family_checkpoint_is_refused(tmp_path):
    # a Qwen3 config over Mixtral's tensors: nothing loads half-way
    save_tiny("mixtral", tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg.update(architectures=["Qwen3ForCausalLM"], model_type="qwen3", head_dim=16)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="has no place in Qwen3ForCausalLM|lacks weights"):
        _runner(tmp_path)


def test_unsupported_architecture_lists_the_supported(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({
        "architectures": ["Gemma2ForCausalLM"], "model_type": "gemma2"}))
    with pytest.raises(ValueError) as e:
        _runner(tmp_path)
    msg = str(e.value)
    assert msg.startswith("unsupported architecture Gemma2ForCausalLM (supported: ")
    assert all(a in msg for a in SUPPORTED_ARCHITECTURES)

"""RoPE tables of every supported variant against transformers' rotary embedding
modules (the same modeling_rope_utils functions behind them), at long positions."""

import pytest
import torch

from pagedserve.model import rope
from pagedserve.model.config import ModelConfig
from pagedserve.model.layers import RotaryEmbedding

N = 32768  # positions compared: far past every original context below


def _llama(rope_parameters, max_pos=N):
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=512, num_attention_heads=8, num_hidden_layers=1,
                       intermediate_size=64, vocab_size=32, max_position_embeddings=max_pos,
                       rope_parameters=rope_parameters, architectures=["LlamaForCausalLM"])


def _phi3():
    from transformers import Phi3Config

    return Phi3Config(hidden_size=512, num_attention_heads=8, num_hidden_layers=1,
                      intermediate_size=64, vocab_size=32, max_position_embeddings=N,
                      pad_token_id=0, architectures=["Phi3ForCausalLM"], rope_parameters={
                          "rope_type": "longrope", "rope_theta": 10000.0,
                          "partial_rotary_factor": 0.75,
                          "short_factor": [1.0 + 0.05 * i for i in range(24)],
                          "long_factor": [1.0 + 0.7 * i for i in range(24)],
                          "original_max_position_embeddings": 4096})


CASES = {
    "default": lambda: _llama({"rope_type": "default", "rope_theta": 500000.0}),
    "linear": lambda: _llama({"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}),
    "llama3": lambda: _llama({"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                              "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                              "original_max_position_embeddings": 2048}),
    "yarn": lambda: _llama({"rope_type": "yarn", "rope_theta": 10000.0, "factor": 8.0,
                            "original_max_position_embeddings": 4096}),
    "longrope": _phi3,
}


def _hf_cos_sin(hf_cfg, positions, layer_type=None):
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RotaryEmbedding
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
    from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding

    x = torch.zeros(1, dtype=torch.float32)
    pos = positions[None]
    if layer_type is not None:
        return Gemma3RotaryEmbedding(hf_cfg)(x, pos, layer_type)
    cls = Phi3RotaryEmbedding if hf_cfg.model_type == "phi3" else LlamaRotaryEmbedding
    return cls(hf_cfg)(x, pos)


def _compare(cfg, hf_cfg, layer_type=None):
    cos, sin = rope.cos_sin_tables(cfg, N, layer_type)
    hf_cos, hf_sin = (t[0] for t in _hf_cos_sin(hf_cfg, torch.arange(N), layer_type))
    assert cos.shape == hf_cos.shape == (N, cfg.rotary_dim)
    half = cfg.rotary_dim // 2
    hf_signed = torch.cat((-hf_sin[:, :half], hf_sin[:, half:]), dim=-1)
    err = max((cos - hf_cos).abs().max().item(), (sin - hf_signed).abs().max().item())
    print(f"{cfg.rope_type} {layer_type or ''}: max |table - transformers| = {err:.1e}")
    assert err < 1e-5


@pytest.mark.parametrize("kind", list(CASES))
def test_tables_match_transformers_at_long_positions(kind):
    hf_cfg = CASES[kind]()
    cfg = ModelConfig.from_hf(hf_cfg)
    assert cfg.rope_type == kind
    _compare(cfg, hf_cfg)


def test_gemma3_layer_types_have_their_own_rope():
    from transformers import Gemma3TextConfig

    hf_cfg = Gemma3TextConfig(
        hidden_size=256, num_attention_heads=4, head_dim=64, num_hidden_layers=2,
        intermediate_size=64, vocab_size=32, max_position_embeddings=N,
        architectures=["Gemma3ForCausalLM"],
        layer_types=["sliding_attention", "full_attention"], sliding_window=512,
        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                         "full_attention": {"rope_type": "linear", "factor": 8.0,
                                            "rope_theta": 1000000.0}})
    cfg = ModelConfig.from_hf(hf_cfg)
    assert cfg.layer_rope == ("sliding_attention", "full_attention")
    for lt in ("sliding_attention", "full_attention"):
        _compare(cfg, hf_cfg, lt)


def test_longrope_picks_factors_by_the_engine_max_length():
    hf_cfg = _phi3()
    cfg = ModelConfig.from_hf(hf_cfg)
    short, _ = rope.inv_freq(cfg, max_positions=4096)
    long, scale = rope.inv_freq(cfg, max_positions=4097)
    assert not torch.equal(short, long) and scale > 1.0
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    assert torch.equal(long, ROPE_INIT_FUNCTIONS["longrope"](hf_cfg, "cpu", seq_len=4097)[0])
    assert torch.equal(short, ROPE_INIT_FUNCTIONS["longrope"](hf_cfg, "cpu", seq_len=None)[0])


def test_partial_rotary_application_matches_transformers():
    from transformers.models.phi3.modeling_phi3 import apply_rotary_pos_emb

    hf_cfg = _phi3()
    cfg = ModelConfig.from_hf(hf_cfg)
    assert cfg.rotary_dim == 48 and cfg.head_dim == 64
    emb = RotaryEmbedding(cfg, N)
    positions = torch.tensor([0, 1, 4095, 4096, 20000, N - 1])
    q = torch.randn(len(positions), 8, 64)
    ours = q.clone()
    emb.apply_(ours, positions)
    cos, sin = _hf_cos_sin(hf_cfg, positions)
    ref, _ = apply_rotary_pos_emb(q.transpose(0, 1)[None], q.transpose(0, 1)[None], cos, sin)
    torch.testing.assert_close(ours, ref[0].transpose(0, 1), rtol=1e-5, atol=1e-5)
    assert torch.equal(ours[..., 48:], q[..., 48:])  # the unrotated tail passes through


def test_unsupported_rope_type_is_named():
    with pytest.raises(ValueError, match="unsupported rope scaling type dynamic"):
        ModelConfig.from_hf(_llama({"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}))

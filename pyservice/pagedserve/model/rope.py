"""RoPE frequencies of every variant the supported families use: default, linear,
llama3, yarn and longrope (Phi-3's "su"), per layer type where a model keeps several
(Gemma 3: local layers at one base, global layers at another, maybe scaled).

The scaled variants come from transformers' own functions (modeling_rope_utils), so
the frequencies are exactly those of the checkpoint's reference implementation.

LongRoPE has two sets of factors: transformers picks the long ones for a forward whose
longest position passes the original context, so one sequence's earlier keys may have
been rotated with the other set. A paged cache must rotate a position one way for its
whole life, so the choice is made once, from the engine's longest sequence
(max_model_len): long factors when it passes the original context, else short ones.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from pagedserve.model.config import rope_parameters

if TYPE_CHECKING:
    from pagedserve.model.config import ModelConfig


def inv_freq(cfg: "ModelConfig", layer_type: str | None = None,
             max_positions: int | None = None) -> tuple[torch.Tensor, float]:
    """(inverse frequencies [rotary_dim / 2] in float32, cos/sin scale) on the CPU."""
    hf = cfg.hf_config
    params = (rope_parameters(hf, layer_type) if hf is not None
              else {"rope_type": cfg.rope_type, "rope_theta": cfg.rope_theta})
    rope_type = params["rope_type"]
    if rope_type == "default":
        dim = cfg.rotary_dim
        exponent = torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim
        return 1.0 / (float(params["rope_theta"]) ** exponent), 1.0
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    if hf is None:
        raise ValueError(f"rope scaling type {rope_type} needs the model's HF config")
    if not getattr(hf, "rope_parameters", None) and getattr(hf, "rope_scaling", None):
        # transformers 4.x reads rope_scaling["rope_type"]
        hf.rope_scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    kwargs: dict = {}
    if layer_type is not None:
        kwargs["layer_type"] = layer_type
    if rope_type == "longrope":
        kwargs["seq_len"] = max_positions or cfg.max_position_embeddings
    freqs, scaling = ROPE_INIT_FUNCTIONS[rope_type](hf, torch.device("cpu"), **kwargs)
    return freqs.float(), float(scaling)


def cos_sin_tables(cfg: "ModelConfig", num_positions: int, layer_type: str | None = None,
                   max_positions: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 [num_positions, rotary_dim] cos and sin tables for rotate-half RoPE,
    with the sign of rotate-half folded into sin (-sin on the first half)."""
    freqs_inv, scaling = inv_freq(cfg, layer_type, max_positions or num_positions)
    t = torch.arange(num_positions, dtype=torch.float32, device="cpu")
    freqs = torch.outer(t, freqs_inv)
    cos, sin = freqs.cos() * scaling, freqs.sin() * scaling
    return torch.cat((cos, cos), dim=-1), torch.cat((-sin, sin), dim=-1)

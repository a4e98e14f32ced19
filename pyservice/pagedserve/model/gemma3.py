"""Gemma 3 text decoder: the Llama attention and MLP blocks with Gemma's differences.

- "sandwich" norms: each block's output is normalised before it joins the residual
  stream (post_attention / post_feedforward), besides the usual pre-norms;
- RMSNorm scales by (1 + w): the 1 is folded into the weights at load time, so the
  shared (fused) norm ops serve unchanged;
- embeddings times sqrt(hidden), rounded to the model dtype as transformers does;
- queries scaled by query_pre_attn_scalar ** -0.5 instead of head_dim ** -0.5;
- local layers attend within a sliding window with their own RoPE base, global layers
  attend to everything with theirs (config.layer_types says which is which);
- logits soft-capped (tanh) where the config sets final_logit_softcapping.

Under tensor parallelism it shards as Llama does (same Attention, MLP, vocabulary-split
embedding and head): the extra norms act on the all-reduced hidden states and are
replicated, the embedding is scaled after its all-reduce, the soft-cap applies to the
gathered logits, and windowed layers attend over each rank's own heads.
"""

from __future__ import annotations

import torch
from torch import nn

from pagedserve.model.config import ModelConfig
from pagedserve.model.layers import AttentionMetadata, RMSNorm, RotaryEmbedding
from pagedserve.model.llama import MLP, Attention, LlamaForCausalLM
from pagedserve.model.parallel import SINGLE, TensorParallel, VocabParallelEmbedding


class Gemma3DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, tp: TensorParallel = SINGLE):
        super().__init__()
        h, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.input_layernorm = RMSNorm(h, eps)
        self.self_attn = Attention(cfg, layer_idx, tp)
        self.post_attention_layernorm = RMSNorm(h, eps)
        self.pre_feedforward_layernorm = RMSNorm(h, eps)
        self.mlp = MLP(cfg, tp)
        self.post_feedforward_layernorm = RMSNorm(h, eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, positions: torch.Tensor,
                rope: RotaryEmbedding, md: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        """As Llama's layer: x is the previous block's (normalised) output, added into
        `residual` by the fused norm that follows."""
        if residual is None:
            residual = x
            h = self.input_layernorm(x)
        else:
            h = self.input_layernorm(x, residual)
        h = self.post_attention_layernorm(self.self_attn(h, positions, rope, md))
        h = self.mlp(self.pre_feedforward_layernorm(h, residual))
        return self.post_feedforward_layernorm(h), residual


class Gemma3Model(nn.Module):
    def __init__(self, cfg: ModelConfig, max_positions: int, tp: TensorParallel = SINGLE):
        super().__init__()
        self.embed_scale = cfg.embed_scale or 1.0
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, tp)
        self.layers = nn.ModuleList(Gemma3DecoderLayer(cfg, i, tp) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        # one RoPE table per layer type ("full_attention", "sliding_attention")
        self.layer_rope = list(cfg.layer_rope)
        self.rotary = nn.ModuleDict({t: RotaryEmbedding(cfg, max_positions, t)
                                     for t in sorted(set(self.layer_rope), key=str)
                                     if t is not None})
        if None in self.layer_rope:
            self.rotary_emb = RotaryEmbedding(cfg, max_positions)

    def _rope(self, i: int) -> RotaryEmbedding:
        t = self.layer_rope[i]
        return self.rotary_emb if t is None else self.rotary[t]

    def forward(self, input_ids, positions, md):
        x = self.embed_tokens(input_ids)
        # transformers multiplies by the scale rounded to the model dtype
        x = x * float(torch.tensor(self.embed_scale, dtype=x.dtype))
        residual = None
        for i, layer in enumerate(self.layers):
            x, residual = layer(x, residual, positions, self._rope(i), md)
        return self.norm(x, residual)


class Gemma3ForCausalLM(LlamaForCausalLM):
    model_cls = Gemma3Model

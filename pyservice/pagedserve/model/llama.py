"""Llama-family decoder over a flat batch: Llama 2/3, Mistral, Qwen2, SmolLM2, and
through their config fields Qwen3 (per-head q/k norms), Phi-3/4 (fused checkpoint
projections, partial rotary, LongRoPE), Qwen3-MoE and Mixtral (sparse MoE MLPs).

Every projection is one matmul over all tokens of the step (no padding, no per-sequence
loop); only attention looks at sequence boundaries, through the paged ops. Q/K/V and
gate/up are fused into one weight each, filled from the checkpoint's separate tensors
by `load_weights`.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from pagedserve.model.activation import act_and_mul
from pagedserve.model.config import ModelConfig
from pagedserve.model.layers import (AttentionMetadata, Linear, PagedAttention, RMSNorm,
                                     RotaryEmbedding)
from pagedserve.model.moe import SparseMoe
from pagedserve.model.weights import Target, load_checkpoint


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int = 0):
        super().__init__()
        self.q_size = cfg.num_heads * cfg.head_dim
        self.kv_size = cfg.num_kv_heads * cfg.head_dim
        self.head_dim = cfg.head_dim
        self.qkv_proj = Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.qkv_bias)
        self.o_proj = Linear(self.q_size, cfg.hidden_size, bias=cfg.o_bias)
        if cfg.qk_norm:  # one RMSNorm over every q (k) head, before RoPE
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        self.attn = PagedAttention(cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                                   scale=cfg.attn_scale,
                                   sliding_window=cfg.layer_windows[layer_idx])

    def forward(self, x: torch.Tensor, positions: torch.Tensor, rope: RotaryEmbedding,
                md: AttentionMetadata) -> torch.Tensor:
        n = x.shape[0]
        qkv = self.qkv_proj(x)
        qk_size = self.q_size + self.kv_size
        if hasattr(self, "q_norm"):
            q, k = qkv[:, : self.q_size], qkv[:, self.q_size:qk_size]
            q.copy_(self.q_norm(q.view(n, -1, self.head_dim)).view(n, -1))
            k.copy_(self.k_norm(k.view(n, -1, self.head_dim)).view(n, -1))
        # Queries and keys sit side by side: rotate them in one pass, in place. q, k and
        # v stay row-strided views of the projection; the attention ops take that.
        rope.apply_(qkv[:, :qk_size].view(n, -1, self.head_dim), positions)
        q = qkv[:, : self.q_size].view(n, -1, self.head_dim)
        k = qkv[:, self.q_size:qk_size].view(n, -1, self.head_dim)
        v = qkv[:, qk_size:].view(n, -1, self.head_dim)
        out = self.attn(q, k, v, md)
        return self.o_proj(out.reshape(n, self.q_size))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.intermediate_size = cfg.intermediate_size
        self.act = cfg.hidden_act
        self.gate_up_proj = Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(act_and_mul(self.gate_up_proj(x), self.act))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int = 0):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = SparseMoe(cfg) if cfg.moe_layers[layer_idx] else MLP(cfg)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, positions: torch.Tensor,
                rope: RotaryEmbedding, md: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        """x: the previous layer's MLP output; residual: the stream it adds to (None
        for the first layer, whose x is the embedding). Each add is fused into the
        norm that follows it; returns (MLP output, residual stream)."""
        if residual is None:
            residual = x
            h = self.input_layernorm(x)
        else:
            h = self.input_layernorm(x, residual)
        h = self.self_attn(h, positions, rope, md)
        h = self.post_attention_layernorm(h, residual)
        return self.mlp(h), residual


class LlamaModel(nn.Module):
    def __init__(self, cfg: ModelConfig, max_positions: int):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(cfg, max_positions)

    def forward(self, input_ids, positions, md):
        x, residual = self.embed_tokens(input_ids), None
        for layer in self.layers:
            x, residual = layer(x, residual, positions, self.rotary_emb, md)
        return self.norm(x, residual)


# checkpoint projection name -> (our fused parameter, shard index)
_FUSED = {
    "q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
}


# Mixtral's checkpoint names for its experts' projections
_EXPERT_PROJ = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}


class LlamaForCausalLM(nn.Module):
    model_cls = LlamaModel  # the decoder stack (Gemma 3 brings its own)

    def __init__(self, cfg: ModelConfig, max_positions: int | None = None):
        super().__init__()
        self.config = cfg
        self.model = self.model_cls(cfg, max_positions or cfg.max_position_embeddings)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        """Share the embedding with the output head (again after `to_empty`, which
        gives every module its own storage)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                md: AttentionMetadata) -> torch.Tensor:
        """Final hidden states [num_tokens, hidden]; logits only where asked."""
        return self.model(input_ids, positions, md)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden).float()
        cap = self.config.final_logit_softcapping
        if cap:  # Gemma: squash the logits into (-cap, cap)
            logits = torch.tanh(logits / cap) * cap
        return logits

    def attention_layers(self) -> list[PagedAttention]:
        return [layer.self_attn.attn for layer in self.model.layers]

    def _shard_slice(self, fused: str, shard: int) -> tuple[int, int]:
        cfg = self.config
        if fused == "qkv_proj":
            q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
            return [(0, q), (q, q + kv), (q + kv, q + 2 * kv)][shard]
        i = cfg.intermediate_size
        return (shard * i, (shard + 1) * i)

    def checkpoint_target(self, name: str) -> Target:
        """Where checkpoint tensor `name` goes: (parameter, index) or None (skipped).
        Separate q/k/v and gate/up tensors fill rows of our fused ones (Phi-3's are
        fused already); per-expert tensors fill one expert of the stacked ones."""
        if "rotary_emb" in name:
            return None
        if name == "lm_head.weight" and self.config.tie_word_embeddings:
            return None  # some tied checkpoints still store the copy
        parts = name.replace(".block_sparse_moe.", ".mlp.").split(".")
        if len(parts) >= 4 and parts[-4] == "experts" and parts[-3].isdigit():
            e, proj = int(parts[-3]), _EXPERT_PROJ.get(parts[-2], parts[-2])
            base, i = ".".join(parts[:-3]), self.config.moe_intermediate_size
            if proj == "down_proj":
                return base + ".down_proj", (e,)
            rows = {"gate_proj": slice(0, i), "up_proj": slice(i, 2 * i)}.get(proj)
            return (base + ".gate_up_proj", (e, rows)) if rows else (name, ())
        if len(parts) >= 3 and parts[-2] in _FUSED:
            fused, shard = _FUSED[parts[-2]]
            lo, hi = self._shard_slice(fused, shard)
            return ".".join(parts[:-2] + [fused, parts[-1]]), (slice(lo, hi),)
        return ".".join(parts), ()

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy checkpoint tensors (Hugging Face names) into our parameters; every
        parameter must be covered exactly once (model/weights.py)."""
        load_checkpoint(self, weights, self.checkpoint_target, self.config.architecture)
        if self.config.norm_offset:  # Gemma's norms scale by (1 + w): fold the 1 in once
            for name, p in self.named_parameters():
                if name.endswith("norm.weight"):
                    p.add_(self.config.norm_offset)

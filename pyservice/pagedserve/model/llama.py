"""Llama-family decoder (Llama 2/3, Mistral, Qwen2, SmolLM2) over a flat batch.

Every projection is one matmul over all tokens of the step (no padding, no per-sequence
loop); only attention looks at sequence boundaries, through the paged ops. Q/K/V and
gate/up are fused into one weight each, filled from the checkpoint's separate tensors
by `load_weights`.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from pagedserve import ops
from pagedserve.model.config import ModelConfig
from pagedserve.model.layers import (AttentionMetadata, Linear, PagedAttention, RMSNorm,
                                     RotaryEmbedding)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.q_size = cfg.num_heads * cfg.head_dim
        self.kv_size = cfg.num_kv_heads * cfg.head_dim
        self.head_dim = cfg.head_dim
        self.qkv_proj = Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.qkv_bias)
        self.o_proj = Linear(self.q_size, cfg.hidden_size, bias=cfg.o_bias)
        self.attn = PagedAttention(cfg.num_heads, cfg.num_kv_heads, cfg.head_dim)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, rope: RotaryEmbedding,
                md: AttentionMetadata) -> torch.Tensor:
        n = x.shape[0]
        qkv = self.qkv_proj(x)
        qk_size = self.q_size + self.kv_size
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
        self.gate_up_proj = Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(ops.silu_and_mul(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

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
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
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


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig, max_positions: int | None = None):
        super().__init__()
        self.config = cfg
        self.model = LlamaModel(cfg, max_positions or cfg.max_position_embeddings)
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
        return self.lm_head(hidden).float()

    def attention_layers(self) -> list[PagedAttention]:
        return [layer.self_attn.attn for layer in self.model.layers]

    def _shard_slice(self, fused: str, shard: int) -> tuple[int, int]:
        cfg = self.config
        if fused == "qkv_proj":
            q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
            return [(0, q), (q, q + kv), (q + kv, q + 2 * kv)][shard]
        i = cfg.intermediate_size
        return (shard * i, (shard + 1) * i)

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy checkpoint tensors (Hugging Face names) into our parameters.

        Every parameter must be covered exactly once: a missing or unknown tensor is an
        error, so a checkpoint of the wrong shape family cannot load half-way.
        """
        params = dict(self.named_parameters())
        filled: dict[str, int] = {}
        for name, tensor in weights:
            if "rotary_emb" in name:
                continue
            if name == "lm_head.weight" and self.config.tie_word_embeddings:
                continue  # some tied checkpoints still store the copy
            parts = name.split(".")
            target, rows = name, None
            if len(parts) >= 3 and parts[-2] in _FUSED:
                fused, shard = _FUSED[parts[-2]]
                target = ".".join(parts[:-2] + [fused, parts[-1]])
                rows = self._shard_slice(fused, shard)
            if target not in params:
                raise ValueError(f"checkpoint tensor {name} has no place in {self.config.architecture}")
            dst = params[target].data if rows is None else params[target].data[rows[0]:rows[1]]
            if tuple(dst.shape) != tuple(tensor.shape):
                raise ValueError(f"checkpoint tensor {name} has shape {tuple(tensor.shape)}, "
                                 f"expected {tuple(dst.shape)}")
            dst.copy_(tensor)
            filled[target] = filled.get(target, 0) + 1
        expected = {n: (3 if n.endswith(("qkv_proj.weight", "qkv_proj.bias")) else
                        2 if "gate_up_proj" in n else 1) for n in params}
        missing = sorted(n for n, count in expected.items() if filled.get(n, 0) != count)
        if missing:
            raise ValueError(f"checkpoint lacks weights for {len(missing)} parameters, "
                             f"e.g. {', '.join(missing[:3])}")

"""Llama-family decoder (Llama 2/3, Mistral, Qwen2, SmolLM2) over a flat batch.

Every projection is one matmul over all tokens of the step (no padding, no per-sequence
loop); only attention looks at sequence boundaries, through the paged ops. Q/K/V and
gate/up are fused into one weight each, filled from the checkpoint's separate tensors
by `load_weights`.

With tensor parallelism (`tp`, model/parallel.py) each rank builds the same decoder
over its slice: its query/KV heads and MLP rows, a slice of the vocabulary; O and
down projections end in one all-reduce each. `tp` of size 1 is the plain model.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn

from pagedserve import ops
from pagedserve.model.config import ModelConfig
from pagedserve.model.layers import AttentionMetadata, PagedAttention, RMSNorm, RotaryEmbedding
from pagedserve.model.parallel import (SINGLE, ColumnParallelLinear, ParallelLMHead,
                                       QKVParallelLinear, RowParallelLinear, TensorParallel,
                                       VocabParallelEmbedding, check_shardable,
                                       kv_heads_per_rank)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TensorParallel):
        super().__init__()
        num_heads = cfg.num_heads // tp.size  # this rank's heads
        num_kv_heads = kv_heads_per_rank(cfg.num_kv_heads, tp.size)
        self.q_size = num_heads * cfg.head_dim
        self.kv_size = num_kv_heads * cfg.head_dim
        self.head_dim = cfg.head_dim
        self.qkv_proj = QKVParallelLinear(cfg.hidden_size, cfg.head_dim, cfg.num_heads,
                                          cfg.num_kv_heads, cfg.qkv_bias, tp)
        self.o_proj = RowParallelLinear(cfg.num_heads * cfg.head_dim, cfg.hidden_size,
                                        cfg.o_bias, tp)
        self.attn = PagedAttention(num_heads, num_kv_heads, cfg.head_dim)

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
    def __init__(self, cfg: ModelConfig, tp: TensorParallel):
        super().__init__()
        self.gate_up_proj = ColumnParallelLinear(
            cfg.hidden_size, [cfg.intermediate_size] * 2, cfg.mlp_bias, tp)
        self.down_proj = RowParallelLinear(cfg.intermediate_size, cfg.hidden_size, cfg.mlp_bias, tp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(ops.silu_and_mul(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TensorParallel):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, tp)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg, tp)

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
    def __init__(self, cfg: ModelConfig, max_positions: int, tp: TensorParallel):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, tp)
        self.layers = nn.ModuleList(DecoderLayer(cfg, tp) for _ in range(cfg.num_layers))
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
    def __init__(self, cfg: ModelConfig, max_positions: int | None = None,
                 tp: TensorParallel = SINGLE):
        super().__init__()
        check_shardable(cfg.num_heads, cfg.num_kv_heads, cfg.intermediate_size, tp.size)
        self.config = cfg
        self.tp = tp
        self.model = LlamaModel(cfg, max_positions or cfg.max_position_embeddings, tp)
        self.lm_head = ParallelLMHead(cfg.hidden_size, cfg.vocab_size, tp)
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

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """float32 logits; under tensor parallelism on rank 0 only (None elsewhere),
        every rank taking part in gathering them."""
        logits = self.lm_head.logits(hidden)
        return None if logits is None else logits.float()

    def attention_layers(self) -> list[PagedAttention]:
        return [layer.self_attn.attn for layer in self.model.layers]

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, Any]]) -> None:
        """Fill our parameters from checkpoint tensors (Hugging Face names): torch
        tensors or memory-mapped safetensors slices, of which each layer reads only
        this rank's part.

        Every parameter must be covered exactly once: a missing or unknown tensor is an
        error, so a checkpoint of the wrong shape family cannot load half-way.
        """
        params = dict(self.named_parameters())
        modules = dict(self.named_modules())
        filled: dict[str, int] = {}
        for name, tensor in weights:
            if "rotary_emb" in name:
                continue
            if name == "lm_head.weight" and self.config.tie_word_embeddings:
                continue  # some tied checkpoints still store the copy
            parts = name.split(".")
            target, shard = name, 0
            if len(parts) >= 3 and parts[-2] in _FUSED:
                fused, shard = _FUSED[parts[-2]]
                target = ".".join(parts[:-2] + [fused, parts[-1]])
            if target not in params:
                raise ValueError(f"checkpoint tensor {name} has no place in {self.config.architecture}")
            owner, _, param = target.rpartition(".")
            module = modules[owner]
            if hasattr(module, "load_shard"):
                module.load_shard(param, name, tensor, shard)
            else:  # replicated on every rank (norms)
                dst = params[target].data
                if tuple(dst.shape) != _shape(tensor):
                    raise ValueError(f"checkpoint tensor {name} has shape {_shape(tensor)}, "
                                     f"expected {tuple(dst.shape)}")
                dst.copy_(tensor[:])
            filled[target] = filled.get(target, 0) + 1
        expected = {n: (3 if n.endswith(("qkv_proj.weight", "qkv_proj.bias")) else
                        2 if "gate_up_proj" in n else 1) for n in params}
        missing = sorted(n for n, count in expected.items() if filled.get(n, 0) != count)
        if missing:
            raise ValueError(f"checkpoint lacks weights for {len(missing)} parameters, "
                             f"e.g. {', '.join(missing[:3])}")


def _shape(tensor: Any) -> tuple[int, ...]:
    return tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else tuple(tensor.get_shape())


def fused_checkpoint_names(param: str) -> list[str]:
    """The checkpoint tensors fused into parameter `param`, in their stacking order."""
    parts = param.split(".")
    if len(parts) >= 3 and parts[-2] in ("qkv_proj", "gate_up_proj"):
        names = [k for k, (fused, _) in _FUSED.items() if fused == parts[-2]]
        return [".".join(parts[:-2] + [n, parts[-1]]) for n in names]
    return [param]

"""Llama-family decoder over a flat batch: Llama 2/3, Mistral, Qwen2, SmolLM2, and
through their config fields Qwen3 (per-head q/k norms), Phi-3/4 (fused checkpoint
projections, partial rotary, LongRoPE), Qwen3-MoE and Mixtral (sparse MoE MLPs).

Every projection is one matmul over all tokens of the step (no padding, no per-sequence
loop); only attention looks at sequence boundaries, through the paged ops. Q/K/V and
gate/up are fused into one weight each, filled from the checkpoint's separate tensors
by `load_weights`.

Under tensor parallelism (model/parallel.py) each rank builds the layers with its slice
of the heads, the MLP (or of every expert's intermediate dimension, model/moe.py) and the
vocabulary, and `checkpoint_target` names the part of every checkpoint tensor the rank
keeps. What a rank computes per head needs nothing more: per-head q/k norms (their
weight is per head_dim, replicated), partial rotary and sliding windows apply to the
rank's own heads exactly as to all of them.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from pagedserve.model.activation import act_and_mul
from pagedserve.model.config import ModelConfig
from pagedserve.model.layers import AttentionMetadata, PagedAttention, RMSNorm, RotaryEmbedding
from pagedserve.model.moe import SparseMoe
from pagedserve.model.parallel import (SINGLE, ColumnParallelLinear, ParallelLMHead,
                                       QKVParallelLinear, RowParallelLinear, TensorParallel,
                                       VocabParallelEmbedding, check_shardable,
                                       kv_heads_per_rank)
from pagedserve.model.weights import Target, load_checkpoint


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int = 0, tp: TensorParallel = SINGLE):
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
        if cfg.qk_norm:  # one RMSNorm over every q (k) head, before RoPE
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
        self.attn = PagedAttention(num_heads, num_kv_heads, cfg.head_dim,
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
    def __init__(self, cfg: ModelConfig, tp: TensorParallel = SINGLE):
        super().__init__()
        self.intermediate_size = cfg.intermediate_size // tp.size
        self.act = cfg.hidden_act
        self.gate_up_proj = ColumnParallelLinear(
            cfg.hidden_size, [cfg.intermediate_size] * 2, cfg.mlp_bias, tp)
        self.down_proj = RowParallelLinear(cfg.intermediate_size, cfg.hidden_size, cfg.mlp_bias, tp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(act_and_mul(self.gate_up_proj(x), self.act))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int = 0, tp: TensorParallel = SINGLE):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_idx, tp)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = SparseMoe(cfg, tp) if cfg.moe_layers[layer_idx] else MLP(cfg, tp)

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
    def __init__(self, cfg: ModelConfig, max_positions: int, tp: TensorParallel = SINGLE):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, tp)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, tp) for i in range(cfg.num_layers))
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

    def __init__(self, cfg: ModelConfig, max_positions: int | None = None,
                 tp: TensorParallel = SINGLE):
        super().__init__()
        check_shardable(cfg, tp.size)
        self.config = cfg
        self.tp = tp
        self.model = self.model_cls(cfg, max_positions or cfg.max_position_embeddings, tp)
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
        if logits is None:
            return None
        logits = logits.float()
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
        fused already); per-expert tensors fill one expert of the stacked ones. Under
        tensor parallelism also the part of the tensor this rank keeps (weights.Part)."""
        if "rotary_emb" in name:
            return None
        if name == "lm_head.weight" and self.config.tie_word_embeddings:
            return None  # some tied checkpoints still store the copy
        parts = name.replace(".block_sparse_moe.", ".mlp.").split(".")
        if len(parts) >= 4 and parts[-4] == "experts" and parts[-3].isdigit():
            e, proj = int(parts[-3]), _EXPERT_PROJ.get(parts[-2], parts[-2])
            base = ".".join(parts[:-3])
            if proj == "down_proj":
                return self._expert_targets(base, proj, e)
            shard = {"gate_proj": 0, "up_proj": 1}.get(proj)
            return (name, ()) if shard is None else self._expert_targets(base, "gate_up_proj", e, shard)
        if len(parts) >= 3 and parts[-2] == "experts" and parts[-1] in ("gate_up_proj", "down_proj"):
            return self._expert_targets(".".join(parts[:-1]), parts[-1])  # stacked (transformers 5)
        if len(parts) >= 3 and parts[-2] in _FUSED:
            fused, shard = _FUSED[parts[-2]]
            target = ".".join(parts[:-2] + [fused, parts[-1]])
            if self.tp.size > 1:
                return self._rank_target(target, shard)
            lo, hi = self._shard_slice(fused, shard)
            return target, (slice(lo, hi),)
        target = ".".join(parts)
        owner = self._modules_by_name().get(".".join(parts[:-1]))
        if hasattr(owner, "fused_rank_parts"):  # Phi-3: qkv_proj / gate_up_proj fused already
            return [(target, index, part) for index, part in owner.fused_rank_parts(parts[-1])]
        return self._rank_target(target, 0) if self.tp.size > 1 else (target, ())

    def _expert_targets(self, base: str, param: str, expert: int | None = None,
                        shard: int | None = None) -> Target:
        """Where an expert tensor goes (model/moe.Experts.rank_parts): one expert's slice
        of the stacked parameters, or every expert's from a stacked checkpoint tensor."""
        experts = self._modules_by_name().get(base)
        if not hasattr(experts, "rank_parts"):
            return f"{base}.{param}", ()  # no experts here: named as having no place
        return [(f"{base}.{param}", index, part)
                for index, part in experts.rank_parts(param, expert, shard)]

    def _rank_target(self, target: str, shard: int) -> Target:
        """This rank's part of a checkpoint tensor: the sharded layers say which rows or
        columns they keep (`rank_part`); the rest (norms) is replicated whole."""
        owner, _, param = target.rpartition(".")
        module = self._modules_by_name().get(owner)
        if module is None or not hasattr(module, "rank_part"):
            return target, ()
        index, part = module.rank_part(param, shard)
        return target, index, part

    def _modules_by_name(self) -> dict[str, nn.Module]:
        """named_modules() once (asked for every checkpoint tensor); not a submodule."""
        if "_by_name" not in self.__dict__:
            self.__dict__["_by_name"] = dict(self.named_modules())
        return self.__dict__["_by_name"]

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy checkpoint tensors (Hugging Face names) into our parameters; every
        parameter must be covered exactly once (model/weights.py). The tensors may be
        memory-mapped safetensors slices: a tensor-parallel rank reads only its part."""
        padding = {}  # vocabulary rows past the end on the last rank: zero, never loaded
        modules = self._modules_by_name()
        for pname, p in self.named_parameters():  # a tied weight once
            rows = getattr(modules[pname.rpartition(".")[0]], "padding_rows", 0)
            if rows:
                p.data[p.shape[0] - rows:].zero_()
                padding[pname] = rows * p.shape[1]
        load_checkpoint(self, weights, self.checkpoint_target, self.config.architecture,
                        padding=padding)
        if self.config.norm_offset:  # Gemma's norms scale by (1 + w): fold the 1 in once
            for name, p in self.named_parameters():
                if name.endswith("norm.weight"):
                    p.add_(self.config.norm_offset)


def fused_checkpoint_names(param: str) -> list[str]:
    """The checkpoint tensors fused into parameter `param`, in their stacking order."""
    parts = param.split(".")
    if len(parts) >= 3 and parts[-2] in ("qkv_proj", "gate_up_proj"):
        names = [k for k, (fused, _) in _FUSED.items() if fused == parts[-2]]
        return [".".join(parts[:-2] + [n, parts[-1]]) for n in names]
    return [param]

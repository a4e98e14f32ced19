"""Building blocks of the decoder over a flat batch of tokens: Linear, RMSNorm,
rotary embedding, and the paged attention layer with its per-step metadata."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pagedserve import ops
from pagedserve.model import rope
from pagedserve.model.config import ModelConfig
from pagedserve.ops import cpu_linear

log = logging.getLogger(__name__)


@dataclass
class AttentionMetadata:
    """Per-step inputs every attention layer shares.

    Tokens are packed: first those of the multi-token sequences (prefill chunks), then
    one token per decoding sequence, so each kind is one attention call.
    """

    slot_mapping: torch.Tensor  # int64 [num_tokens]: cache slot each new K/V goes to
    num_prefill_tokens: int
    prefill_block_tables: torch.Tensor  # int32 [num_prefills, max_blocks]
    prefill_query_start_loc: torch.Tensor  # int32 [num_prefills + 1]
    prefill_context_lens: torch.Tensor  # int32 [num_prefills]: cached + new tokens
    decode_block_tables: torch.Tensor  # int32 [num_decodes, max_blocks]
    decode_context_lens: torch.Tensor  # int32 [num_decodes], including the new token
    # Set (CUDA, 16-bit) when some prefill chunks are a whole context (nothing cached
    # before them): those come last among the prefills, from token flash_token_start
    # on, and run through FlashAttention on tensor cores; the ones before go through
    # the paged kernel. Their cumulative lengths, from 0, and the longest.
    flash_cu_seqlens: torch.Tensor | None = None  # int32 [num_flash + 1]
    num_paged_prefills: int = 0
    flash_token_start: int = 0
    flash_max_len: int = 0

    @property
    def num_prefills(self) -> int:
        return self.prefill_context_lens.shape[0]

    @property
    def num_decodes(self) -> int:
        return self.decode_context_lens.shape[0]


class Linear(nn.Linear):
    """nn.Linear through `ops.linear`: a small decode step's projections stream their
    weights with the GEMV kernel on CUDA instead of a GEMM tiled for reuse. On CPU
    (bfloat16, float32), `ops.cpu_linear.pack_model` sets a oneDNN-packed copy of the
    weight."""

    packed_weight: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.matmul(x, self.bias)

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """x W^T (+ bias), through the packed weight when there is one (a row-parallel
        layer adds its bias only after the all-reduce)."""
        if self.packed_weight is not None:
            return cpu_linear.packed_linear(x, self.packed_weight, bias)
        return ops.linear(x, self.weight, bias)


class RMSNorm(nn.Module):
    """RMSNorm; given the residual stream too, adds x into it first (in place) and
    normalises the sum: one fused kernel on CUDA instead of an add and a norm."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        if residual is not None:
            return ops.fused_add_rms_norm(x, residual, self.weight, self.eps)
        if x.is_cuda:
            # One fused kernel (float32 inside) instead of seven; it rounds once where
            # the reference form rounds twice (<= 1 bf16 ulp).
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        return ops.cpu_layer_ops.rms_norm(x, self.weight, self.eps)


class RotaryEmbedding(nn.Module):
    """Rotate-half RoPE with cos/sin precomputed in float32 for every position.

    The sin table carries the sign of rotate-half (-sin on the first half), so applying
    it needs no negation; x2 * -s equals -x2 * s exactly, keeping bitwise parity with
    the reference formula q * cos + rotate_half(q) * sin on CPU. On CUDA one kernel
    rotates in place, in float32 from the tables, rounding once.
    """

    def __init__(self, cfg: ModelConfig, max_positions: int, layer_type: str | None = None):
        super().__init__()
        self.cfg = cfg
        self.layer_type = layer_type  # which of the model's RoPE settings (Gemma 3 has two)
        self.rotary_dim = cfg.rotary_dim  # < head_dim: partial rotary, the rest passes through
        self.register_buffer("cos", torch.empty(max_positions, cfg.rotary_dim), persistent=False)
        self.register_buffer("sin", torch.empty(max_positions, cfg.rotary_dim), persistent=False)
        if not self.cos.is_meta:
            self.reset()

    def reset(self) -> None:
        """(Re)compute the tables on the buffers' device, e.g. after `to_empty`."""
        cos, sin = rope.cos_sin_tables(self.cfg, self.cos.shape[0], self.layer_type)
        device = self.cos.device
        self.cos, self.sin = cos.to(device), sin.to(device)

    def apply_(self, x: torch.Tensor, positions: torch.Tensor) -> None:
        """Rotates x [num_tokens, heads, head_dim] (queries and keys together) in place."""
        if self.rotary_dim != x.shape[-1]:
            x = x[..., : self.rotary_dim]
        ops.rotary_embedding(x, positions, self.cos, self.sin)


class PagedAttention(nn.Module):
    """Writes this step's keys/values into the paged cache, then attends over it."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int,
                 scale: float | None = None, sliding_window: int | None = None):
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = head_dim ** -0.5 if scale is None else scale
        # Keys less than this many positions back, or None (full causal). Windowed layers
        # run ops' sliding-window path on every device (the CUDA kernels have no window).
        self.sliding_window = sliding_window
        self.key_cache: torch.Tensor | None = None  # bound by the model runner
        self.value_cache: torch.Tensor | None = None

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                md: AttentionMetadata) -> torch.Tensor:
        kc, vc = self.key_cache, self.value_cache
        assert kc is not None, "KV cache not bound: ModelRunner binds it before any forward"
        # q/k/v are row-strided views of the fused projection: the ops accept that.
        ops.write_kv(k, v, kc, vc, md.slot_mapping)
        if self.sliding_window is not None:
            return self._windowed(q, md)
        p = md.num_prefill_tokens
        flash = md.flash_cu_seqlens is not None and flash_usable()
        if md.num_decodes == 0 and not flash:
            return ops.prefill_attention(q, kc, vc, md.prefill_block_tables,
                                         md.prefill_query_start_loc, md.prefill_context_lens,
                                         self.scale)
        if md.num_prefills == 0:
            return ops.decode_attention(q, kc, vc, md.decode_block_tables,
                                        md.decode_context_lens, self.scale)
        out = torch.empty_like(q)
        t = md.flash_token_start if flash else p  # paged prefills: tokens [0, t)
        if t:
            n = md.num_paged_prefills if flash else md.num_prefills
            ops.prefill_attention(q[:t], kc, vc, md.prefill_block_tables[:n],
                                  md.prefill_query_start_loc[:n + 1], md.prefill_context_lens[:n],
                                  self.scale, out=out[:t])
        if flash and not _flash_prefill(q[t:p], k[t:p], v[t:p], md, self.scale, out[t:p]):
            # FlashAttention refused: the paged kernel takes every prefill from now on.
            ops.prefill_attention(q[:p], kc, vc, md.prefill_block_tables, md.prefill_query_start_loc,
                                  md.prefill_context_lens, self.scale, out=out[:p])
        if md.num_decodes:
            ops.decode_attention(q[p:], kc, vc, md.decode_block_tables, md.decode_context_lens,
                                 self.scale, out=out[p:])
        return out

    def _windowed(self, q: torch.Tensor, md: AttentionMetadata) -> torch.Tensor:
        kc, vc, p, w = self.key_cache, self.value_cache, md.num_prefill_tokens, self.sliding_window
        out = torch.empty_like(q)
        if md.num_prefills:  # every prefill chunk, the fresh ones included, from the pool
            ops.prefill_attention(q[:p], kc, vc, md.prefill_block_tables,
                                  md.prefill_query_start_loc, md.prefill_context_lens,
                                  self.scale, out=out[:p], window=w)
        if md.num_decodes:
            ops.decode_attention(q[p:], kc, vc, md.decode_block_tables, md.decode_context_lens,
                                 self.scale, out=out[p:], window=w)
        return out


_FLASH = {"ok": None}  # None: not tried yet; False after the op refused once


def flash_usable() -> bool:
    return _FLASH["ok"] is not False


def _flash_prefill(q, k, v, md: AttentionMetadata, scale: float, out: torch.Tensor) -> bool:
    """Causal attention of fresh prompt chunks (queries = keys = the chunk) through
    torch's varlen FlashAttention-2 op, which takes GQA key/value heads as they are.
    False (once, logged) when the op is missing or refuses the inputs."""
    try:
        o = torch.ops.aten._flash_attention_forward(
            q, k, v, md.flash_cu_seqlens, md.flash_cu_seqlens, md.flash_max_len, md.flash_max_len,
            0.0, True, False, scale=scale)[0]
    except (AttributeError, RuntimeError, TypeError) as e:
        if _FLASH["ok"] is None:
            log.warning("FlashAttention prefill unavailable (%s); using the paged prefill kernel", e)
        _FLASH["ok"] = False
        return False
    _FLASH["ok"] = True
    out.copy_(o)
    return True

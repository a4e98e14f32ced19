"""Sparse mixture-of-experts MLP (Qwen3-MoE, Mixtral): a router picks the top-k
experts of each token, and each expert runs once over all the tokens routed to it.

Routing follows transformers exactly (softmax in float32, top-k, renormalised where
the model does it), so ties resolve as torch.topk resolves them there. The experts'
weights are two stacked tensors, [E, 2I, H] for gate|up and [E, H, I] for down, named
as transformers 5 keeps them in memory; per-expert checkpoint tensors load into slices.

Expert compute, on a flat batch whose (token, slot) pairs are sorted by expert:
- CPU: one matmul per expert that received tokens, over its contiguous rows.
- CUDA, 16-bit, torch with grouped GEMM (`torch._grouped_mm`): every expert in one
  launch per projection, with the group offsets computed on the device.
- CUDA otherwise: every expert over every token, weighted by the (mostly zero) routing
  weights: E times the FLOPs, but no host synchronisation, so decode still captures
  into CUDA graphs. Correct everywhere; fast where grouped GEMM exists.
"""

from __future__ import annotations

import torch
from torch import nn

from pagedserve.model.activation import act_and_mul
from pagedserve.model.config import ModelConfig
from pagedserve.model.layers import Linear
from pagedserve.model.parallel import SINGLE, TensorParallel
from pagedserve.model.weights import Part


def route(router_logits: torch.Tensor, top_k: int, renormalize: bool,
          weights_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(routing weights [T, k] in weights_dtype, expert ids [T, k] int64)."""
    probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights.to(weights_dtype), ids


class Experts(nn.Module):
    """Every expert's [gate | up] and down, stacked; under tensor parallelism this rank's
    slice of each expert's intermediate dimension (`intermediate` is the full size)."""

    def __init__(self, num_experts: int, hidden: int, intermediate: int, act: str,
                 tp: TensorParallel = SINGLE):
        super().__init__()
        self.tp, self.full_intermediate, self.hidden = tp, intermediate, hidden
        self.num_experts, self.intermediate, self.act = num_experts, intermediate // tp.size, act
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * self.intermediate, hidden))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden, self.intermediate))

    def rank_parts(self, param: str, expert: int | None = None,
                   shard: int | None = None) -> list[tuple[tuple, Part]]:
        """Where our slice of a checkpoint tensor goes and which part of it we read.
        `expert` None: the stacked tensor of every expert (transformers 5's in-memory
        `gate_up_proj` [E, 2I, H] / `down_proj` [E, H, I]); else one expert's tensor,
        `shard` 0 (gate) or 1 (up) for gate_up_proj."""
        i, full_i, r = self.intermediate, self.full_intermediate, self.tp.rank
        cols = slice(r * i, (r + 1) * i)  # our rows of the intermediate dimension
        if param == "down_proj":
            if expert is None:
                return [((), Part((self.num_experts, self.hidden, full_i),
                                  (slice(None), slice(None), cols)))]
            return [((expert,), Part((self.hidden, full_i), (slice(None), cols)))]
        if expert is None:  # gate rows then up rows of every expert, each sliced
            full = (self.num_experts, 2 * full_i, self.hidden)
            return [((slice(None), slice(s * i, (s + 1) * i)),
                     Part(full, (slice(None), slice(s * full_i + r * i, s * full_i + (r + 1) * i))))
                    for s in (0, 1)]
        return [((expert, slice(shard * i, (shard + 1) * i)),
                 Part((full_i, self.hidden), (cols,)))]

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """sum over k of weights[t, k] * expert_{ids[t, k]}(x[t]), as x's dtype."""
        if x.is_cuda:
            if _grouped_ok(x, self.gate_up_proj):
                return self._grouped(x, weights, ids)
            return self._dense(x, weights, ids)
        return self._sorted_loop(x, weights, ids)

    def _sort(self, x, weights, ids):
        top_k = ids.shape[1]
        flat = ids.reshape(-1)
        order = torch.argsort(flat, stable=True)
        tokens = order // top_k
        return x.index_select(0, tokens), weights.reshape(-1)[order], tokens, flat[order]

    def _combine(self, x, y, w, tokens):
        y = (y * w[:, None].to(y.dtype) if w.dtype == y.dtype else y.float() * w[:, None].float())
        out = torch.zeros(x.shape, dtype=y.dtype, device=x.device)
        return out.index_add_(0, tokens, y).to(x.dtype)

    def _sorted_loop(self, x, weights, ids):
        xs, w, tokens, experts = self._sort(x, weights, ids)
        counts = torch.bincount(experts, minlength=self.num_experts).tolist()
        y = torch.empty_like(xs)
        start = 0
        for e, c in enumerate(counts):
            if c:  # an expert that received no token costs nothing
                h = torch.nn.functional.linear(xs[start:start + c], self.gate_up_proj[e])
                y[start:start + c] = torch.nn.functional.linear(act_and_mul(h, self.act),
                                                                self.down_proj[e])
                start += c
        return self._combine(x, y, w, tokens)

    def _grouped(self, x, weights, ids):
        xs, w, tokens, experts = self._sort(x, weights, ids)
        counts = torch.zeros(self.num_experts, dtype=torch.int32, device=x.device)
        counts.index_add_(0, experts, torch.ones_like(experts, dtype=torch.int32))
        offs = torch.cumsum(counts, 0, dtype=torch.int32)
        h = torch._grouped_mm(xs, self.gate_up_proj.transpose(-2, -1), offs=offs)
        y = torch._grouped_mm(act_and_mul(h, self.act), self.down_proj.transpose(-2, -1), offs=offs)
        return self._combine(x, y, w, tokens)

    def _dense(self, x, weights, ids):
        combine = torch.zeros(x.shape[0], self.num_experts, dtype=weights.dtype, device=x.device)
        combine.scatter_(1, ids, weights)
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        for e in range(self.num_experts):
            h = act_and_mul(torch.nn.functional.linear(x, self.gate_up_proj[e]), self.act)
            y = torch.nn.functional.linear(h, self.down_proj[e])
            out += y.float() * combine[:, e:e + 1].to(y.dtype).float()
        return out.to(x.dtype)


def _grouped_ok(x: torch.Tensor, w: torch.Tensor) -> bool:
    if not hasattr(torch, "_grouped_mm") or x.dtype != torch.bfloat16:
        return False
    major, _ = torch.cuda.get_device_capability(x.device)
    # 16-byte aligned rows for both operands (TMA), on Hopper or newer
    return major >= 9 and w.shape[-1] % 8 == 0 and w.shape[-2] % 8 == 0


class SparseMoe(nn.Module):
    """Router (replicated under tensor parallelism) and experts; Qwen3-MoE and Mixtral
    have no shared expert."""

    def __init__(self, cfg: ModelConfig, tp: TensorParallel = SINGLE):
        super().__init__()
        self.tp = tp
        self.top_k, self.renormalize = cfg.num_experts_per_tok, cfg.norm_topk_prob
        self.weights_in_model_dtype = cfg.moe_weights_in_model_dtype
        self.gate = Linear(cfg.hidden_size, cfg.num_experts, bias=False)
        self.experts = Experts(cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size,
                               cfg.hidden_act, tp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype if self.weights_in_model_dtype else torch.float32
        weights, ids = route(self.gate(x), self.top_k, self.renormalize, dtype)
        # each rank's sum covers its slice of every expert's intermediate dimension
        return self.tp.all_reduce(self.experts(x, weights, ids))

"""Megatron-style tensor-parallel layers over torch.distributed.

A rank holds a slice of each projection: column-parallel layers (QKV, gate/up) a
slice of the output rows, row-parallel layers (O, down) the matching slice of the
input columns followed by one all-reduce, the embedding and LM head a slice of the
vocabulary. With `TensorParallel.size == 1` every layer is the plain single-device
module (same parameter shapes, same forward, no collective), so one process serves
exactly as it did before tensor parallelism existed.

Each layer names the part of a full checkpoint tensor it keeps (`rank_part`: where in
its parameter, which rows or columns of the tensor); model/weights.py reads that part
with plain indexing, which both a torch tensor and a memory-mapped safetensors slice
(`safe_open(...).get_slice(name)`) accept, so a rank reads only its bytes.

Every family of the registry shards this way (per-family details: the decoders' and
model/moe.py's docstrings); `check_shardable` refuses only shapes that do not divide.
"""

from __future__ import annotations

from dataclasses import dataclass
import torch
import torch.nn.functional as F
from torch import nn

from pagedserve.model.layers import Linear
from pagedserve.model.weights import Part


@dataclass(frozen=True)
class TensorParallel:
    """This process's place in the tensor-parallel group (the default process group)."""

    rank: int = 0
    size: int = 1

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sums x over the ranks, in place."""
        if self.size > 1:
            import torch.distributed as dist

            dist.all_reduce(x)
        return x

    def gather_last_dim(self, x: torch.Tensor) -> torch.Tensor | None:
        """Every rank's x concatenated along the last dimension, on rank 0; None elsewhere."""
        if self.size == 1:
            return x
        import torch.distributed as dist

        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.size)] if self.rank == 0 else None
        dist.gather(x, parts, dst=0)
        return torch.cat(parts, dim=-1) if parts is not None else None

    def min_over_ranks(self, value: int) -> int:
        """The smallest of every rank's value (each rank's KV pool must hold the same
        block ids, so the pool is as large as the smallest rank allows)."""
        if self.size == 1:
            return value
        import torch.distributed as dist

        t = torch.tensor([value], dtype=torch.int64,
                         device="cuda" if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return int(t.item())


SINGLE = TensorParallel()


def check_shardable(cfg, tp_size: int) -> None:
    """ValueError unless model config `cfg` (model/config.ModelConfig) splits evenly over
    `tp_size` ranks: heads, KV heads (split or replicated), the dense and the expert
    intermediate sizes, the vocabulary."""
    if tp_size == 1:
        return
    if cfg.num_heads % tp_size:
        raise ValueError(f"tensor_parallel_size {tp_size} must divide the model's "
                         f"{cfg.num_heads} query heads")
    if cfg.num_kv_heads % tp_size and tp_size % cfg.num_kv_heads:
        raise ValueError(f"tensor_parallel_size {tp_size} and the model's {cfg.num_kv_heads} KV "
                         f"heads must divide one another (heads are split, or replicated)")
    if not all(cfg.moe_layers) and cfg.intermediate_size % tp_size:
        raise ValueError(f"tensor_parallel_size {tp_size} must divide the model's "
                         f"intermediate size {cfg.intermediate_size}")
    if any(cfg.moe_layers) and cfg.moe_intermediate_size % tp_size:
        raise ValueError(f"tensor_parallel_size {tp_size} must divide the model's expert "
                         f"intermediate size {cfg.moe_intermediate_size}")
    if -(-cfg.vocab_size // tp_size) * (tp_size - 1) >= cfg.vocab_size:
        raise ValueError(f"tensor_parallel_size {tp_size} leaves a rank without vocabulary "
                         f"rows of the model's {cfg.vocab_size}")


def kv_heads_per_rank(num_kv_heads: int, tp_size: int) -> int:
    """KV heads each rank holds: a share of them, or one replicated head when there are
    fewer KV heads than ranks."""
    return max(1, num_kv_heads // tp_size)


def _split(n: int, tp: TensorParallel) -> tuple[int, int]:
    part = n // tp.size
    return tp.rank * part, (tp.rank + 1) * part


class ColumnParallelLinear(Linear):
    """y = x A^T where this rank holds some rows of A: for each checkpoint tensor fused
    here (q/k/v, gate/up), the rows `shard_rows[i]` of it, stacked in that order. The
    output stays split (the next row-parallel layer takes it as is)."""

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool,
                 tp: TensorParallel = SINGLE, shard_rows: list[tuple[int, int]] | None = None):
        self.output_sizes = list(output_sizes)
        self.shard_rows = shard_rows or [_split(n, tp) for n in output_sizes]
        self.offsets = [0]
        for start, end in self.shard_rows:
            self.offsets.append(self.offsets[-1] + end - start)
        super().__init__(input_size, self.offsets[-1], bias=bias)

    def rank_part(self, param: str, shard: int = 0) -> tuple[tuple, Part]:
        """Our rows for checkpoint tensor number `shard` of those fused here."""
        full = (self.output_sizes[shard],) + ((self.in_features,) if param == "weight" else ())
        start, end = self.shard_rows[shard]
        lo = self.offsets[shard]
        return (slice(lo, lo + end - start),), Part(full, (slice(start, end),))

    def fused_rank_parts(self, param: str) -> list[tuple[tuple, Part]]:
        """Our rows of a checkpoint tensor that already fuses every shard (Phi-3's
        qkv_proj, gate_up_proj): for each shard, its rows of the fused tensor at that
        shard's offset (q rows, k rows, v rows), never one contiguous run of it."""
        fused_full = sum(self.output_sizes)
        full = (fused_full,) + ((self.in_features,) if param == "weight" else ())
        parts, base = [], 0
        for shard, (start, end) in enumerate(self.shard_rows):
            lo = self.offsets[shard]
            parts.append(((slice(lo, lo + end - start),),
                          Part(full, (slice(base + start, base + end),))))
            base += self.output_sizes[shard]
        return parts


class QKVParallelLinear(ColumnParallelLinear):
    """The fused Q/K/V projection split by heads. Rank r holds query heads
    [r*H/tp, (r+1)*H/tp) and the KV heads they attend to: a share of the KV heads,
    or (fewer KV heads than ranks) the one KV head of its query group, replicated."""

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int,
                 bias: bool, tp: TensorParallel = SINGLE):
        q_local = num_heads // tp.size
        kv_local = kv_heads_per_rank(num_kv_heads, tp.size)
        kv_first = (tp.rank * q_local) // (num_heads // num_kv_heads)  # the first query's group
        q = (tp.rank * q_local * head_dim, (tp.rank + 1) * q_local * head_dim)
        kv = (kv_first * head_dim, (kv_first + kv_local) * head_dim)
        super().__init__(hidden_size, [num_heads * head_dim, num_kv_heads * head_dim,
                                       num_kv_heads * head_dim], bias, tp, [q, kv, kv])


class RowParallelLinear(Linear):
    """y = x A^T where this rank holds the columns of A matching its slice of x; the
    partial products are summed by one all-reduce, and the bias added once after it."""

    def __init__(self, input_size: int, output_size: int, bias: bool, tp: TensorParallel = SINGLE):
        self.tp = tp
        self.full_input_size = input_size
        super().__init__(input_size // tp.size, output_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return super().forward(x)
        y = self.tp.all_reduce(self.matmul(x, None))
        return y if self.bias is None else y.add_(self.bias)

    def rank_part(self, param: str, shard: int = 0) -> tuple[tuple, Part]:
        """Our input columns of the weight; the bias whole (added once, after the sum)."""
        if param == "bias":
            return (), Part((self.out_features,), (slice(None),))
        start, end = _split(self.full_input_size, self.tp)
        return (), Part((self.out_features, self.full_input_size),
                        (slice(None), slice(start, end)))


def _vocab_rows(vocab_size: int, tp: TensorParallel) -> tuple[int, int]:
    """This rank's vocabulary rows [start, start + per_rank): the vocabulary padded to
    a multiple of the ranks (padding rows are zero and cut from the logits)."""
    per_rank = -(-vocab_size // tp.size)
    return tp.rank * per_rank, per_rank


def _vocab_part(vocab_size: int, hidden_size: int, tp: TensorParallel) -> tuple[tuple, Part]:
    """This rank's real vocabulary rows: the first rows of its weight, the padding after
    them staying zero."""
    start, per_rank = _vocab_rows(vocab_size, tp)
    n = min(start + per_rank, vocab_size) - start
    return (slice(0, n),), Part((vocab_size, hidden_size), (slice(start, start + n),))


def _padding_rows(vocab_size: int, tp: TensorParallel) -> int:
    start, per_rank = _vocab_rows(vocab_size, tp)
    return start + per_rank - min(start + per_rank, vocab_size)


class VocabParallelEmbedding(nn.Embedding):
    """Token embeddings split by vocabulary rows; a token's row lives on one rank, the
    others contribute zeros to the all-reduce that assembles the batch."""

    def __init__(self, vocab_size: int, hidden_size: int, tp: TensorParallel = SINGLE):
        self.tp = tp
        self.vocab_size = vocab_size
        self.vocab_start, per_rank = _vocab_rows(vocab_size, tp)
        self.padding_rows = _padding_rows(vocab_size, tp)
        super().__init__(per_rank, hidden_size)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return super().forward(ids)
        local = ids - self.vocab_start
        outside = (local < 0) | (local >= self.num_embeddings)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out.masked_fill_(outside.unsqueeze(-1), 0)
        return self.tp.all_reduce(out)

    def rank_part(self, param: str, shard: int = 0) -> tuple[tuple, Part]:
        return _vocab_part(self.vocab_size, self.embedding_dim, self.tp)


class ParallelLMHead(Linear):
    """The output projection split by vocabulary rows like the embedding (and tied to
    it when the model ties them); the logits are gathered once, on rank 0, where
    sampling happens."""

    def __init__(self, hidden_size: int, vocab_size: int, tp: TensorParallel = SINGLE):
        self.tp = tp
        self.vocab_size = vocab_size
        self.padding_rows = _padding_rows(vocab_size, tp)
        super().__init__(hidden_size, _vocab_rows(vocab_size, tp)[1], bias=False)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """[tokens, vocab] on rank 0; None on the other ranks."""
        local = self.forward(hidden)
        if self.tp.size == 1:
            return local
        full = self.tp.gather_last_dim(local)
        return None if full is None else full[:, : self.vocab_size]

    def rank_part(self, param: str, shard: int = 0) -> tuple[tuple, Part]:
        return _vocab_part(self.vocab_size, self.in_features, self.tp)

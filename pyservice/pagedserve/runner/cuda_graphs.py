"""CUDA graphs for decode-only steps: one forward replayed instead of ~900 launches.

A decode step of an 8B model issues about 28 kernels per layer; issued one by one
from Python the host, not the GPU, sets the pace. So every batch-size bucket is
captured once, at start-up, over static device buffers, and a decode-only step
only stages its inputs and replays the bucket's graph.

- Buckets: 1, 2, 4, then every multiple of 8 up to the largest batch. A batch is
  padded to its bucket; padding rows write no KV (slot -1, which write_kv skips)
  and attend over one token of block 0 (reads only); their outputs are dropped.
- Block tables live in one [max_batch, ceil(max_model_len / block_size)] buffer.
  The paged decode kernel sizes its split-KV plan from the table width (a host
  bound, so no sync). Where that plan splits (small batches), one graph is
  captured per width class (256 tokens, doubling, up to the full width) so a
  short-context batch keeps the partition count an eager call would choose;
  large batches do not split and need only the full width.
- Inputs go up in two non-blocking copies from pinned staging buffers; the
  staging is rewritten only after the previous upload has left it (an event).
- The split-KV counters of the decode kernel are graph-safe (the last CTA puts
  each back to 0), see docs/kernels.md; graphs share one memory pool, captured
  largest first, and replays never overlap.

Graph outputs are the final hidden states; the runner computes logits of the rows
that sample, eagerly (one matmul), so padded rows cost no vocabulary projection.
"""

from __future__ import annotations

import bisect
import logging
import time

import torch

from pagedserve.engine.batch import SeqWork
from pagedserve.model.layers import AttentionMetadata

log = logging.getLogger(__name__)

MIN_WIDTH_TOKENS = 256  # the smallest width class: the decode kernel's shortest partition


def batch_buckets(max_batch: int) -> list[int]:
    """1, 2, 4, 8, 16, 24, ... up to max_batch (itself always a bucket)."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    buckets = [b for b in (1, 2, 4) if b < max_batch] + list(range(8, max_batch, 8))
    return buckets + [max_batch]


class DecodeGraphs:
    """Captured decode forwards of `model` for every bucket up to `max_batch`.

    `stage(work)` uploads a decode-only batch's inputs and names the graph to run, or
    returns None when the batch is not one (a prompt chunk, too many sequences, a bad
    table): the caller then runs it eagerly, which also raises the usual errors for
    bad input. `replay(key, n)` runs it and returns the hidden states [n, hidden]; in
    between, the caller may overwrite input ids on the device (`input_ids(key)`).
    """

    def __init__(self, model, *, max_batch: int, max_model_len: int, block_size: int,
                 num_heads: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device):
        self.model = model
        self.device = device
        self.bs = block_size
        self.max_model_len = max_model_len
        self.width = -(-max_model_len // block_size)
        self.buckets = batch_buckets(max_batch)
        self.max_batch = self.buckets[-1]
        self._heads = (num_heads, num_kv_heads, head_dim, dtype)
        self.enabled = True
        self.num_replays = 0
        self.capture_seconds = 0.0
        self._graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._widths: dict[int, list[int]] = {}
        B, W = self.max_batch, self.width
        # Staging (pinned) and static device buffers share one layout:
        # int64 [3, B] = token ids, positions, slots; int32 [B + B * W] = context
        # lengths, then the block-table rows (so the first b rows are one prefix).
        self._h64 = torch.zeros(3, B, dtype=torch.int64, pin_memory=True)
        self._h32 = torch.zeros(B + B * W, dtype=torch.int32, pin_memory=True)
        h64, h32 = self._h64.numpy(), self._h32.numpy()
        self._ids, self._pos, self._slots = h64[0], h64[1], h64[2]
        self._ctx, self._tables = h32[:B], h32[B:].reshape(B, W)
        self._slots[:] = -1  # padding rows: no KV write, one token of block 0 to read
        self._ctx[:] = 1
        self._d64 = self._h64.to(device)
        self._d32 = self._h32.to(device)
        self._no_tables = torch.zeros(0, W, dtype=torch.int32, device=device)
        self._no_lens = torch.zeros(0, dtype=torch.int32, device=device)
        self._qsl = torch.zeros(1, dtype=torch.int32, device=device)
        self._uploaded = torch.cuda.Event()

    # ---- capture ----

    def _splits(self, batch: int, width: int) -> bool:
        """Whether the decode kernel splits the KV of this batch at this table width."""
        from pagedserve.ops import cuda_device

        num_heads, num_kv_heads, head_dim, dtype = self._heads
        plan = cuda_device(self.device).decode_plan(batch, num_heads, num_kv_heads, width * self.bs,
                                                    head_dim, dtype)
        return plan[2] > 1

    def width_classes(self, batch: int) -> list[int]:
        """Table widths (blocks) captured for a bucket, ascending; the last is full."""
        if not self._splits(batch, self.width):
            return [self.width]
        widths, tokens = [], MIN_WIDTH_TOKENS
        while tokens < self.width * self.bs:
            widths.append(-(-tokens // self.bs))
            tokens *= 2
        return sorted(set(widths + [self.width]))

    def _forward(self, batch: int, width: int) -> torch.Tensor:
        d32 = self._d32
        md = AttentionMetadata(
            slot_mapping=self._d64[2, :batch], num_prefill_tokens=0,
            prefill_block_tables=self._no_tables, prefill_query_start_loc=self._qsl,
            prefill_context_lens=self._no_lens,
            decode_block_tables=d32[self.max_batch:].view(self.max_batch, self.width)[:batch, :width],
            decode_context_lens=d32[:batch])
        return self.model(self._d64[0, :batch], self._d64[1, :batch], md)

    @torch.inference_mode()
    def capture(self) -> None:
        """Captures every (bucket, width) graph, largest first so that later, smaller
        captures reuse the pool memory of earlier ones. The static buffers hold padding
        (no KV writes) throughout."""
        start = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()
        with torch.cuda.device(self.device):
            for b in reversed(self.buckets):
                self._widths[b] = self.width_classes(b)
                for w in reversed(self._widths[b]):
                    self._forward(b, w)  # warm-up: lazy initialisation stays out of the graph
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, pool=pool):
                        hidden = self._forward(b, w)
                    self._graphs[(b, w)] = (graph, hidden)
            torch.cuda.synchronize(self.device)
        self.capture_seconds = time.perf_counter() - start
        log.info("captured %d decode CUDA graphs (batch buckets up to %d) in %.1f s",
                 len(self._graphs), self.max_batch, self.capture_seconds)

    @property
    def num_graphs(self) -> int:
        return len(self._graphs)

    # ---- one step ----

    def stage(self, work: list[SeqWork]) -> tuple[int, int] | None:
        """Fills the pinned staging buffers for a decode-only batch and uploads them;
        returns the (bucket, width) graph to replay, or None if this batch cannot use
        a graph."""
        n = len(work)
        if not self.enabled or not self._graphs or n == 0 or n > self.max_batch:
            return None
        if any(len(w.token_ids) != 1 for w in work):
            return None
        bs, W = self.bs, self.width
        self._uploaded.synchronize()  # the last upload has left the staging buffers
        ids, pos, slots, ctx, tables = self._ids, self._pos, self._slots, self._ctx, self._tables
        top = 0
        for r, w in enumerate(work):
            p, t = w.start_pos, w.block_table
            if p >= self.max_model_len or len(t) * bs <= p or p < 0:
                return None  # the eager path reports it
            ids[r] = w.token_ids[0]
            pos[r] = p
            ctx[r] = p + 1
            slots[r] = t[p // bs] * bs + p % bs
            if len(t) <= W:
                tables[r, :len(t)] = t
            else:
                tables[r] = t[:W]
            top = max(top, p)
        b = self.buckets[bisect.bisect_left(self.buckets, n)]
        ids[n:b] = 0
        pos[n:b] = 0
        slots[n:b] = -1
        ctx[n:b] = 1
        tables[n:b, 0] = 0
        need = top // bs + 1
        width = next(x for x in self._widths[b] if x >= need)
        self._d64.copy_(self._h64, non_blocking=True)
        k = self.max_batch + b * W
        self._d32[:k].copy_(self._h32[:k], non_blocking=True)
        self._uploaded.record()
        return b, width

    def input_ids(self, key: tuple[int, int]) -> torch.Tensor:
        """The device input-id buffer the graph of `key` reads (after stage())."""
        return self._d64[0, :key[0]]

    def replay(self, key: tuple[int, int], n: int) -> torch.Tensor:
        graph, hidden = self._graphs[key]
        graph.replay()
        self.num_replays += 1
        return hidden[:n]

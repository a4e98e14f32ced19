"""Runs one scheduled step: cache ops, flat inputs, the forward pass, sampling.

It owns the model, the KV cache tensors (device pool + swap pool) and the sampler; it
makes no scheduling decisions. Block counts are decided here (memory profiling on GPU,
`kv_cache_gb` on CPU) and reported to whoever builds the block manager.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from pagedserve import ops
from pagedserve.config import EngineConfig
from pagedserve.engine.batch import SampleResult, ScheduledBatch, SeqWork
from pagedserve.engine.sampler import Sampler
from pagedserve.model.config import ModelConfig
from pagedserve.model.layers import AttentionMetadata
from pagedserve.model.loader import (ModelSource, load_model, load_model_config,
                                     resolve_max_model_len, resolve_model)
from pagedserve.sampling_params import SamplingParams

log = logging.getLogger(__name__)
_GIB = 1 << 30


@dataclass
class StepInputs:
    input_ids: torch.Tensor  # int64 [num_tokens]
    positions: torch.Tensor  # int64 [num_tokens]
    metadata: AttentionMetadata
    order: list[int]  # packed sequence i is batch.work[order[i]]
    logit_rows: torch.Tensor  # rows of the hidden states that sample
    sample_works: list[int]  # indices into batch.work, aligned with logit_rows


class ModelRunner:
    """`num_gpu_blocks` / `num_cpu_blocks` left None are sized by `profile_num_blocks`
    (the resulting counts are on the instance, for the block manager)."""

    def __init__(self, config: EngineConfig, model_config: ModelConfig | None = None,
                 num_gpu_blocks: int | None = None, num_cpu_blocks: int | None = None,
                 source: ModelSource | None = None):
        self.config = config
        self.device = torch.device(config.device)
        self.dtype = config.torch_dtype
        self.block_size = config.block_size
        self.source = source or resolve_model(config.model)
        self.model_config = model_config or load_model_config(self.source)
        self.max_model_len = resolve_max_model_len(config.max_model_len, self.model_config)
        self.model = load_model(self.source, self.model_config, device=str(self.device),
                                dtype=self.dtype, max_model_len=self.max_model_len,
                                load_format=config.load_format, seed=config.seed)
        self.sampler = Sampler(self.device, seed=config.seed)
        self.gpu_cache: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.cpu_cache: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._block_counts: tuple[int, int] | None = None
        if num_gpu_blocks is None or num_cpu_blocks is None:
            gpu, cpu = self.profile_num_blocks()
            num_gpu_blocks = gpu if num_gpu_blocks is None else num_gpu_blocks
            num_cpu_blocks = cpu if num_cpu_blocks is None else num_cpu_blocks
        self.num_gpu_blocks = num_gpu_blocks
        self.num_cpu_blocks = num_cpu_blocks
        self._allocate_caches()
        log.info("KV cache: %d device blocks, %d swap blocks of %d tokens (%.1f MiB each)",
                 num_gpu_blocks, num_cpu_blocks, self.block_size, self.block_bytes / (1 << 20))

    @property
    def block_bytes(self) -> int:
        return self.model_config.kv_block_bytes(self.block_size, self.dtype.itemsize)

    @property
    def vocab_size(self) -> int:
        return self.model_config.vocab_size

    # ---- cache sizing and allocation ----

    def profile_num_blocks(self) -> tuple[int, int]:
        """(device blocks, swap blocks) from the config: `num_kv_blocks` if set, else on
        GPU what `gpu_memory_utilization` leaves after a profiled forward at the largest
        batch, on CPU `kv_cache_gb`. Swap blocks come from `swap_space_gb`. Computed once
        (before the pools exist, so they do not count against themselves) and remembered."""
        if self._block_counts is not None:
            return self._block_counts
        cfg = self.config
        num_cpu = int(cfg.swap_space_gb * _GIB // self.block_bytes)
        if cfg.num_kv_blocks is not None:
            num_gpu = cfg.num_kv_blocks
        elif self.device.type != "cuda":
            num_gpu = int(cfg.kv_cache_gb * _GIB // self.block_bytes)
        else:
            num_gpu = self._profile_gpu()
        if num_gpu < 1:
            what = "kv_cache_gb" if self.device.type != "cuda" else "gpu_memory_utilization"
            raise ValueError(f"{what} leaves no room for a single KV block "
                             f"({self.block_bytes} bytes); raise it")
        self._block_counts = (num_gpu, num_cpu)
        return self._block_counts

    def _profile_gpu(self) -> int:
        cfg = self.config
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        # The largest step: max_num_batched_tokens prompt tokens, split into sequences no
        # longer than max_model_len, every sequence sampling with top-k/top-p (sorts).
        tokens = cfg.max_num_batched_tokens
        lens = [self.max_model_len] * (tokens // self.max_model_len)
        if tokens % self.max_model_len:
            lens.append(tokens % self.max_model_len)
        lens = lens[: cfg.max_num_seqs]
        params = SamplingParams(temperature=1.0, top_k=50, top_p=0.9)
        work, first = [], 0
        for i, n in enumerate(lens):
            nb = -(-n // self.block_size)
            work.append(SeqWork(i, [0] * n, 0, list(range(first, first + nb)), True, params,
                                [0] * n, [], 0, frozenset()))
            first += nb
        # A throwaway pool just big enough for the profiled step.
        self.gpu_cache = self._new_pools(first, self.device)
        self._bind_caches()
        try:
            self.execute(ScheduledBatch(work))
            torch.cuda.synchronize(self.device)
        finally:
            self.gpu_cache = []
            self._bind_caches()
        peak = torch.cuda.max_memory_allocated(self.device)
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(self.device)
        # Whatever is in use but not ours (CUDA context, other processes) counts too.
        others = total - free - torch.cuda.memory_reserved(self.device)
        budget = total * cfg.gpu_memory_utilization - others - peak
        log.info("profile: peak %.2f GiB, other %.2f GiB, KV budget %.2f GiB of %.2f GiB",
                 peak / _GIB, others / _GIB, budget / _GIB, total / _GIB)
        return max(int(budget // self.block_bytes), 0)

    def _new_pools(self, num_blocks: int, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """One (key, value) pool pair per layer, in the layout the ops chose."""
        mc = self.model_config
        return [ops.allocate_kv_cache(num_blocks, self.block_size, mc.num_kv_heads, mc.head_dim,
                                      self.dtype, device) for _ in range(mc.num_layers)]

    def _allocate_caches(self) -> None:
        self.gpu_cache = self._new_pools(self.num_gpu_blocks, self.device)
        self.cpu_cache = []
        if self.num_cpu_blocks:
            cpu = self._new_pools(self.num_cpu_blocks, torch.device("cpu"))
            if self.device.type == "cuda":  # pinned, so swaps are asynchronous DMA copies
                cpu = [(k.pin_memory(), v.pin_memory()) for k, v in cpu]
            self.cpu_cache = cpu
        self._bind_caches()

    def _bind_caches(self) -> None:
        for i, attn in enumerate(self.model.attention_layers()):
            attn.key_cache, attn.value_cache = self.gpu_cache[i] if self.gpu_cache else (None, None)

    # ---- one step ----

    @torch.inference_mode()
    def execute(self, batch: ScheduledBatch) -> list[SampleResult | None]:
        self._cache_ops(batch)
        if not batch.work:
            return []
        inputs = self.prepare_inputs(batch.work)
        hidden = self.model(inputs.input_ids, inputs.positions, inputs.metadata)
        results: list[SampleResult | None] = [None] * len(batch.work)
        if inputs.sample_works:
            logits = self.model.compute_logits(hidden[inputs.logit_rows])
            sampled = self.sampler(logits, [batch.work[i] for i in inputs.sample_works])
            for i, r in zip(inputs.sample_works, sampled):
                results[i] = r
        return results

    def _cache_ops(self, batch: ScheduledBatch) -> None:
        # Swap-out first: the blocks it frees may be this step's swap-in or copy targets.
        if batch.swap_out:
            self._swap(batch.swap_out, self.gpu_cache, self.cpu_cache)
        if batch.swap_in:
            self._swap(batch.swap_in, self.cpu_cache, self.gpu_cache)
        if batch.copies:
            mapping = torch.tensor(batch.copies, dtype=torch.int64)  # ops upload it themselves
            ops.copy_blocks([k for k, _ in self.gpu_cache], [v for _, v in self.gpu_cache], mapping)

    def _swap(self, pairs, src_cache, dst_cache) -> None:
        mapping = torch.tensor(pairs, dtype=torch.int64)
        for (src_k, src_v), (dst_k, dst_v) in zip(src_cache, dst_cache):
            ops.swap_blocks(src_k, dst_k, mapping)
            ops.swap_blocks(src_v, dst_v, mapping)

    def prepare_inputs(self, work: list[SeqWork]) -> StepInputs:
        """Flat, unpadded inputs: multi-token sequences first, then decodes."""
        order = ([i for i, w in enumerate(work) if len(w.token_ids) > 1]
                 + [i for i, w in enumerate(work) if len(w.token_ids) == 1])
        if len(order) != len(work):
            raise ValueError("every SeqWork needs at least one token to feed")
        seqs = [work[i] for i in order]
        num_prefills = sum(1 for w in seqs if len(w.token_ids) > 1)
        lens = np.array([len(w.token_ids) for w in seqs], dtype=np.int64)
        starts = np.array([w.start_pos for w in seqs], dtype=np.int64)
        context = starts + lens
        if int(context.max()) > self.max_model_len:
            raise ValueError(f"sequence length {int(context.max())} exceeds max_model_len "
                             f"{self.max_model_len}")
        ends = np.cumsum(lens)
        seq_of_token = np.repeat(np.arange(len(seqs)), lens)
        positions = np.arange(int(ends[-1])) - np.repeat(ends - lens, lens) + starts[seq_of_token]
        table_lens = np.array([len(w.block_table) for w in seqs], dtype=np.int64)
        short = np.nonzero(table_lens * self.block_size < context)[0]
        if short.size:
            w = seqs[int(short[0])]
            raise ValueError(f"block_table of seq {w.seq_id} has {len(w.block_table)} blocks, "
                             f"too few for {int(context[short[0]])} tokens")
        width = int(table_lens.max())
        tables = np.zeros((len(seqs), width), dtype=np.int64)
        for r, w in enumerate(seqs):
            tables[r, : len(w.block_table)] = w.block_table
        bs = self.block_size
        slots = tables[seq_of_token, positions // bs] * bs + positions % bs
        token_ids = np.fromiter((t for w in seqs for t in w.token_ids), dtype=np.int64,
                                count=int(ends[-1]))
        npf = int(ends[num_prefills - 1]) if num_prefills else 0
        dev = self.device

        def i32(a):
            return torch.from_numpy(np.ascontiguousarray(a, dtype=np.int32)).to(dev)

        md = AttentionMetadata(
            slot_mapping=torch.from_numpy(slots).to(dev),
            num_prefill_tokens=npf,
            prefill_block_tables=i32(tables[:num_prefills]),
            prefill_query_start_loc=i32(np.concatenate(([0], ends[:num_prefills]))),
            prefill_context_lens=i32(context[:num_prefills]),
            decode_block_tables=i32(tables[num_prefills:]),
            decode_context_lens=i32(context[num_prefills:]),
        )
        sampling = [r for r, w in enumerate(seqs) if w.sample]
        return StepInputs(
            input_ids=torch.from_numpy(token_ids).to(dev),
            positions=torch.from_numpy(positions).to(dev),
            metadata=md,
            order=order,
            logit_rows=torch.from_numpy(ends[sampling] - 1).to(dev),
            sample_works=[order[r] for r in sampling],
        )

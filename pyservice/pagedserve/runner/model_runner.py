"""Runs one scheduled step: cache ops, flat inputs, the forward pass, sampling.

It owns the model, the KV cache tensors (device pool + swap pool) and the sampler; it
makes no scheduling decisions. Block counts are decided here (memory profiling on GPU,
`kv_cache_gb` on CPU) and reported to whoever builds the block manager.

On CUDA, decode-only steps replay captured CUDA graphs (runner/cuda_graphs.py) and
every other step's inputs go up from pinned memory without synchronising; on CPU a
step runs exactly as it always has.

Tensor parallelism (pagedserve/distributed) touches this module in three places: the
runner is built for one rank (`tp`: its slice of the model, its KV heads), the
block counts are the minimum over ranks, and on the driver `peers` sends each step's
cache ops and host-side inputs to the workers before the forward.
"""

from __future__ import annotations

import logging

import torch

from pagedserve import ops
from pagedserve.config import EngineConfig
from pagedserve.cpu_env import configure_torch_threads
from pagedserve.cpu_governor import ThreadGovernor
from pagedserve.engine.batch import SampleResult, ScheduledBatch, SeqWork
from pagedserve.model.config import ModelConfig
from pagedserve.model.loader import (ModelSource, load_model, load_model_config,
                                     resolve_max_model_len, resolve_model)
from pagedserve.model.parallel import SINGLE, TensorParallel, kv_heads_per_rank
from pagedserve.ops import cpu_linear
from pagedserve.runner.cuda_graphs import DecodeGraphs
from pagedserve.runner.inputs import (HostInputs, StepInputs, feed_tokens, host_inputs,
                                      upload_inputs)
from pagedserve.runner.sampler import PendingSamples, Sampler
from pagedserve.sampling_params import SamplingParams

log = logging.getLogger(__name__)
_GIB = 1 << 30


class PendingStep:
    """A launched step: its sampled tokens, read back by results() (which waits for the
    device once). `samples` is None when no row samples or when the results were
    computed on the host already (beam search)."""

    def __init__(self, work: list[SeqWork], sample_works: list[int], samples: PendingSamples | None,
                 ready: list[SampleResult] | None = None):
        self.num_work = len(work)
        self.sample_works = sample_works
        self.samples = samples
        self.row_of = {w: r for r, w in enumerate(sample_works)}  # work index -> sampled row
        self._ready = ready

    def results(self) -> list[SampleResult | None]:
        """One entry per work item: its SampleResult, or None if it did not sample."""
        sampled = self._ready if self.samples is None else self.samples.results()
        out: list[SampleResult | None] = [None] * self.num_work
        for i, r in zip(self.sample_works, sampled or []):
            out[i] = r
        return out


class ModelRunner:
    """`num_gpu_blocks` / `num_cpu_blocks` left None are sized by `profile_num_blocks`
    (the resulting counts are on the instance, for the block manager). `cuda_graphs`:
    capture decode graphs on CUDA (False: every step eager, for comparisons). `tp`: this
    rank's place in a tensor-parallel group (its slice of the model and KV heads)."""

    def __init__(self, config: EngineConfig, model_config: ModelConfig | None = None,
                 num_gpu_blocks: int | None = None, num_cpu_blocks: int | None = None,
                 source: ModelSource | None = None, cuda_graphs: bool = True,
                 tp: TensorParallel = SINGLE):
        self.config = config
        self.tp = tp
        # Set on the tensor-parallel driver once the workers are up (distributed.StepSender).
        self.peers = None
        # Before anything computes: torch's pool sized to the CPUs this process may use.
        self.cpu_plan = configure_torch_threads(config.cpu_threads)
        self.device = torch.device(config.device)
        # Auto threads on CPU follow the host's load, read between steps.
        self.cpu_governor = (ThreadGovernor(self.cpu_plan.threads)
                             if self.device.type == "cpu" and config.cpu_threads is None
                             and self.cpu_plan.threads > 1 else None)
        self.dtype = config.torch_dtype
        self.block_size = config.block_size
        self.source = source or resolve_model(config.model)
        self.model_config = model_config or load_model_config(self.source)
        self.max_model_len = resolve_max_model_len(config.max_model_len, self.model_config)
        self.model = load_model(self.source, self.model_config, device=str(self.device),
                                dtype=self.dtype, max_model_len=self.max_model_len,
                                load_format=config.load_format, seed=config.seed, tp=tp)
        self.num_kv_heads = kv_heads_per_rank(self.model_config.num_kv_heads, tp.size)
        if self.device.type == "cpu":  # bf16 projections through oneDNN: this rank's
            cpu_linear.pack_model(self.model)  # slice, packed once after it is loaded
        self.sampler = Sampler(self.device, seed=config.seed)
        self.gpu_cache: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.cpu_cache: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._block_counts: tuple[int, int] | None = None
        self.graphs: DecodeGraphs | None = None  # the memory profile runs eagerly
        # Prompt chunks with nothing cached before them go through FlashAttention-2
        # (tensor cores) on CUDA in 16-bit; the paged prefill kernel runs on CUDA cores.
        self.flash_prefill = self.device.type == "cuda" and self.dtype != torch.float32
        if num_gpu_blocks is None or num_cpu_blocks is None:
            gpu, cpu = self.profile_num_blocks()
            num_gpu_blocks = gpu if num_gpu_blocks is None else num_gpu_blocks
            num_cpu_blocks = cpu if num_cpu_blocks is None else num_cpu_blocks
        self.num_gpu_blocks = num_gpu_blocks
        self.num_cpu_blocks = num_cpu_blocks
        self._allocate_caches()
        log.info("KV cache: %d device blocks, %d swap blocks of %d tokens (%.1f MiB each)",
                 num_gpu_blocks, num_cpu_blocks, self.block_size, self.block_bytes / (1 << 20))
        if cuda_graphs and self.device.type == "cuda" and tp.size == 1:
            mc = self.model_config
            self.graphs = DecodeGraphs(
                self.model, max_batch=config.max_num_seqs, max_model_len=self.max_model_len,
                block_size=self.block_size, num_heads=mc.num_heads, num_kv_heads=self.num_kv_heads,
                head_dim=mc.head_dim, dtype=self.dtype, device=self.device)
            self.graphs.capture()

    @property
    def block_bytes(self) -> int:
        """Bytes of one block on this rank (its own KV heads)."""
        mc = self.model_config
        return mc.kv_block_bytes(self.block_size, self.dtype.itemsize) * self.num_kv_heads // mc.num_kv_heads

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
        num_gpu = self.tp.min_over_ranks(num_gpu)
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
        return [ops.allocate_kv_cache(num_blocks, self.block_size, self.num_kv_heads, mc.head_dim,
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
        return self.launch(batch).results()

    @torch.inference_mode()
    def launch(self, batch: ScheduledBatch, previous: PendingStep | None = None) -> PendingStep:
        """Queues the step on the device and returns without waiting for its tokens
        (PendingStep.results() waits), so the host can schedule the next step meanwhile.
        `previous`: the step before, still in flight, whose sampled tokens this batch's
        `feed_from_previous` decodes take as input, on the device."""
        if self.cpu_governor is not None:
            self.cpu_governor.poll()
        self._cache_ops(batch)
        if self.peers is not None:  # tensor parallel: the workers run this step too
            self.peers.begin(batch)
            if not batch.work:
                self.peers.send_step(None)
        if not batch.work:
            return PendingStep([], [], None)
        feed = None
        if batch.feed_from_previous:
            if previous is None or previous.samples is None:
                raise ValueError("feed_from_previous needs the previous step's PendingStep")
            feed = ([i for i, _ in batch.feed_from_previous],
                    [previous.row_of[j] for _, j in batch.feed_from_previous],
                    previous.samples.tokens)
        logits, sample_works = self.forward_logits(batch.work, feed)
        if logits is None:  # nothing samples, or a tensor-parallel worker (no logits)
            return PendingStep(batch.work, [], None)
        works = [batch.work[i] for i in sample_works]
        if any(w.params.beam_width > 1 for w in works):  # beam search ranks on the host
            return PendingStep(batch.work, sample_works, None, self.sampler(logits, works))
        return PendingStep(batch.work, sample_works, self.sampler.sample(logits, works))

    @torch.inference_mode()
    def forward_logits(self, work: list[SeqWork], feed=None) -> tuple[torch.Tensor | None, list[int]]:
        """The forward of one step: float32 logits of the sequences that sample, and
        their indices into `work` (logits None when none samples). A decode-only step
        replays a CUDA graph when one fits; anything else runs eagerly. `feed`: (rows of
        work, rows of `tokens`, tokens) whose input token is read from `tokens` on the
        device instead of from token_ids."""
        key = self.graphs.stage(work) if self.graphs is not None else None
        if key is not None:  # rows in work order
            if feed is not None:
                feed_tokens(self.graphs.input_ids(key), feed[0], feed[2], feed[1])
            hidden = self.graphs.replay(key, len(work))
            sample_works = [i for i, w in enumerate(work) if w.sample]
            if not sample_works:
                return None, []
            if len(sample_works) < len(work):
                rows = torch.tensor(sample_works, dtype=torch.int64).pin_memory()
                hidden = hidden[rows.to(self.device, non_blocking=True)]
            return self.model.compute_logits(hidden), sample_works
        host = self.host_inputs(work)
        feed_rows = None
        if feed is not None:  # rows of the packed tokens: prompt chunks come first
            row = {i: host.first_rows[r] for r, i in enumerate(host.order)}
            feed_rows = [row[i] for i in feed[0]]
        if self.peers is not None:
            self.peers.send_step(host, feed_rows, feed)
        inputs = self.upload_inputs(host)
        if feed is not None:
            feed_tokens(inputs.input_ids, feed_rows, feed[2], feed[1])
        hidden = self.model(inputs.input_ids, inputs.positions, inputs.metadata)
        if not inputs.sample_works:
            return None, []
        return self.model.compute_logits(hidden[inputs.logit_rows]), inputs.sample_works

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
        # Every layer's K and V caches in one call: on CUDA one launch (or one C++ copy
        # loop) instead of 2 * num_layers calls, each with its own host overhead.
        mapping = torch.tensor(pairs, dtype=torch.int64)
        ops.swap_blocks([k for k, _ in src_cache] + [v for _, v in src_cache],
                        [k for k, _ in dst_cache] + [v for _, v in dst_cache], mapping)

    def prepare_inputs(self, work: list[SeqWork]) -> StepInputs:
        """Flat, unpadded inputs: multi-token sequences first, then decodes. With
        FlashAttention prefill, chunks over a cached context precede whole-context ones."""
        return self.upload_inputs(self.host_inputs(work))

    def host_inputs(self, work: list[SeqWork]) -> HostInputs:
        """prepare_inputs' arrays, still on the host."""
        return host_inputs(work, block_size=self.block_size, max_model_len=self.max_model_len,
                           flash_prefill=self.flash_prefill)

    def upload_inputs(self, host: HostInputs) -> StepInputs:
        """The step's tensors on the runner's device and its attention metadata."""
        return upload_inputs(host, self.device)

"""LLMEngine: requests in, one scheduler iteration per step(), outputs out (cumulative,
deltas or final only: each request's RequestOutputKind).

Single-threaded: the async wrapper of the gRPC layer calls every method from one
thread. One step = schedule (with the native block manager) -> the model runner's
forward and sampling -> token bookkeeping (scheduler) -> stop checks, detokenization
and outputs (OutputProcessor).
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

from pagedserve.config import EngineConfig
from pagedserve.engine.output_processor import OutputProcessor
from pagedserve.engine.prompt import PromptTokenizer, TokenizedPrompt
from pagedserve.engine.scheduler import Scheduler
from pagedserve.engine.sequence import Sequence, SequenceGroup
from pagedserve.engine.stats import EngineStats
from pagedserve.errors import InvalidRequestError, invalid_sampling
from pagedserve.outputs import RequestMetrics, RequestOutput, RequestOutputKind
from pagedserve.sampling_params import SamplingParams
from pagedserve.structured.admission import StructuredOutputs
from pagedserve.structured.backend import XGrammarBackend

log = logging.getLogger(__name__)


class LLMEngine:
    """`runner` (and `tokenizer`): already loaded ones to share between engines (tests,
    experiments). The runner's KV pools must be at least what `config` asks for; this
    engine then uses `config.num_kv_blocks` of its device blocks (all when unset).

    `step_observer` (benchmarks, profiling; also settable later as an attribute): called
    after every batch handed to the runner as `step_observer(batch, seconds)`, seconds
    being the wall time of that runner call (launch and read-back when synchronous, the
    launch alone with async_scheduling). Unset, nothing is timed."""

    def __init__(self, config: EngineConfig, runner: Any = None, tokenizer: Any = None,
                 step_observer: Callable[[Any, float], None] | None = None):
        from pagedserve._native import BlockManager
        from pagedserve.runner.model_runner import ModelRunner
        from pagedserve.model.loader import load_tokenizer, resolve_model

        self.config = config
        self.step_observer = step_observer
        if runner is None and config.tensor_parallel_size > 1:
            from pagedserve.distributed import start_tensor_parallel

            runner = start_tensor_parallel(config, resolve_model(config.model))
        elif runner is None:
            runner = ModelRunner(config, source=resolve_model(config.model))
        source = runner.source
        self.runner = runner
        num_gpu_blocks = config.num_kv_blocks or runner.num_gpu_blocks
        if num_gpu_blocks > runner.num_gpu_blocks or config.block_size != runner.block_size:
            raise ValueError(f"num_kv_blocks/block_size ({num_gpu_blocks}/{config.block_size}) "
                             f"do not fit the shared runner's ({runner.num_gpu_blocks}/"
                             f"{runner.block_size})")
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(source)
        self.model_name = source.name
        self.max_model_len = self.runner.max_model_len
        self.vocab_size = self.runner.vocab_size
        self.block_manager = BlockManager(
            num_gpu_blocks, self.runner.num_cpu_blocks, config.block_size,
            enable_prefix_caching=config.enable_prefix_caching, vocab_size=self.vocab_size)
        eos = set(self.runner.model_config.eos_token_ids)
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            eos.add(self.tokenizer.eos_token_id)
        self.eos_token_ids = frozenset(eos)
        self.prompts = PromptTokenizer(self.tokenizer, self.vocab_size, self.max_model_len)
        self.scheduler = Scheduler(
            self.block_manager, max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens,
            max_model_len=self.max_model_len, preemption_mode=config.scheduler_preemption_mode,
            eos_token_ids=self.eos_token_ids)
        self.outputs = OutputProcessor(self.tokenizer, self.eos_token_ids, self.max_model_len)
        # Requests with a constraint wait here until it compiled (off the step loop).
        self.structured = StructuredOutputs(
            lambda: XGrammarBackend(self.tokenizer, self.vocab_size, self.eos_token_ids),
            threads=config.structured_compile_threads,
            timeout_s=config.structured_compile_timeout_s)
        # A step scheduled ahead and queued on the device, not yet read back.
        self._inflight: tuple[Any, Any] | None = None
        log.info("engine ready: %s, %d KV blocks (+%d swap), max_model_len %d",
                 self.model_name, num_gpu_blocks, self.runner.num_cpu_blocks,
                 self.max_model_len)

    # ---- requests ----------------------------------------------------------------
    def add_request(self, request_id: str, prompt: str | list[int] | list[dict] | TokenizedPrompt,
                    params: SamplingParams, priority: int = 0, cache_salt: int = 0,
                    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE) -> None:
        """Queues a request; bad input raises InvalidRequestError naming the field.
        `cache_salt`: prompts hash under it in the prefix cache, so only requests with the same salt
        share cached blocks (one per tenant: see pagedserve.server.tenancy).
        `output_kind`: what step() hands back for it (see RequestOutputKind)."""
        if not isinstance(request_id, str) or not request_id:
            raise InvalidRequestError(
                f"request_id must be a non-empty string, got {request_id!r}")
        if not isinstance(params, SamplingParams):
            raise InvalidRequestError(
                f"params must be a SamplingParams, got {type(params).__name__}")
        if not isinstance(priority, int) or isinstance(priority, bool):
            raise InvalidRequestError(f"priority must be an integer, got {priority!r}")
        if params.stop and self.tokenizer is None:
            raise invalid_sampling("stop: stop strings need a tokenizer and this model has "
                                   "none; use stop_token_ids")
        for i, token in enumerate(params.stop_token_ids):
            if token >= self.vocab_size:
                raise invalid_sampling(f"stop_token_ids[{i}] = {token} is outside the "
                                       f"vocabulary (valid ids are 0..{self.vocab_size - 1})")
        if not isinstance(output_kind, RequestOutputKind):
            raise InvalidRequestError(
                f"output_kind must be a RequestOutputKind, got {output_kind!r}")
        prompt = self.prompts(prompt)
        spec = params.constraint
        if spec is None:
            self.scheduler.add_request(request_id, prompt.text, prompt.token_ids, params,
                                       priority, cache_salt=cache_salt)
            self.outputs.add(request_id, output_kind)
            return
        if self.tokenizer is None:
            raise invalid_sampling(f"{spec.kind}: structured output needs a tokenizer and "
                                   "this model has none")
        if request_id in self.structured or self.scheduler.get_group(request_id):
            raise InvalidRequestError(f"request_id {request_id!r} is already in flight")
        args = (prompt.text, prompt.token_ids, params, priority)
        constraint = self.structured.add(request_id, spec, (args, cache_salt))
        self.outputs.add(request_id, output_kind)
        if constraint is not None:  # compiled before (the cache)
            self._add_constrained(request_id, (args, cache_salt), constraint)

    def _add_constrained(self, request_id: str, args: tuple, constraint: Any) -> None:
        (text, token_ids, params, priority), cache_salt = args
        group = self.scheduler.add_request(request_id, text, token_ids, params, priority,
                                           cache_salt=cache_salt)
        group.constraint = constraint

    def _admit_compiled(self) -> list[RequestOutput]:
        """Requests whose constraint finished compiling join the scheduler's queue; those
        whose compile failed or overran end here, as outputs carrying the error."""
        for request_id, args, constraint in self.structured.ready():
            try:
                self._add_constrained(request_id, args, constraint)
            except InvalidRequestError as exc:  # e.g. it cannot fit the KV cache
                self.structured.reject(request_id, args, exc)
        rejected = self.structured.take_rejected()
        for request_id, *_ in rejected:
            self.outputs.drop(request_id)
        return [RequestOutput(request_id, text, token_ids, [], True,
                              RequestMetrics(arrival, num_prompt_tokens=len(token_ids)), error)
                for request_id, ((text, token_ids, _, _), _), arrival, error
                in rejected]

    def apply_chat_template(self, messages: list[dict]) -> list[int]:
        return self.prompts.apply_chat_template(messages)

    def abort_request(self, request_id: str) -> None:
        """Ends the request now and frees its blocks; unknown ids are ignored (it may
        have just finished)."""
        if self.structured.discard(request_id):
            self.outputs.drop(request_id)
            return
        group = self.scheduler.abort_request(request_id)
        if group is not None:
            self.outputs.forget(group)

    def shutdown(self) -> None:
        """Releases what outlives the engine object: the tensor-parallel workers
        (stopped and joined). Nothing to do on a single device."""
        close = getattr(self.runner, "shutdown", None)
        if close is not None:
            close()

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests() or self.structured.has_waiting()

    # ---- one step ----------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Runs one step and returns the outputs of the requests it advanced.

        With async_scheduling, the step after this one is scheduled and queued on the
        device before this one's tokens are read back (when the scheduler can tell
        what it holds without them: Scheduler.schedule_ahead), so the host's
        bookkeeping below runs while the GPU computes, and the next call finds its
        step already running."""
        if self.structured.has_waiting():  # structured output: compiles that ended
            turned_down = self._admit_compiled()
            if turned_down:
                return turned_down
            if not self.scheduler.has_unfinished_requests() and self._inflight is None:
                self.structured.wait(timeout=0.02)  # only compiles to wait for: no spinning
                return []
        if self.config.async_scheduling:
            batch, results = self._run_async()
        else:
            batch = self.scheduler.schedule()
            results = self._run(self.runner.execute, batch) if _has_work(batch) else None
        if results is None:
            return []
        progressed: dict[str, SequenceGroup] = {}
        for seq, group in self.scheduler.update(batch, results):
            if group.beam is None and not group.is_finished:  # beam search stops itself
                try:
                    self._check_stop(seq, group)
                except Exception as exc:  # noqa: BLE001 - it belongs to this request alone
                    self.scheduler.fail_request(group, exc)
            progressed[group.request_id] = group
        outputs = []
        for group in progressed.values():
            if group.error is None:
                try:
                    output = self.outputs.output(group)
                    if output is not None:
                        outputs.append(output)
                    continue
                except Exception as exc:  # noqa: BLE001
                    self.scheduler.fail_request(group, exc)
        for group in self.scheduler.take_failed():
            self.outputs.forget(group)
            outputs.append(RequestOutput(group.request_id, group.prompt, group.prompt_token_ids,
                                         [], True, group.metrics, group.error))
        return outputs

    def _run_async(self) -> tuple[Any, list | None]:
        """This step's batch and results, the next step queued before they are read."""
        inflight, self._inflight = self._inflight, None
        if inflight is None:
            batch = self.scheduler.schedule()
            if not _has_work(batch):
                return batch, None
            inflight = (batch, self._run(self.runner.launch, batch))
        batch, pending = inflight
        ahead = self.scheduler.schedule_ahead(batch)
        if ahead is not None:
            self._inflight = (ahead, self._run(self.runner.launch, ahead, pending))
        return batch, pending.results()

    def _run(self, call: Callable, batch: Any, *previous: Any) -> Any:
        """runner.execute or runner.launch on `batch`, told to the step observer if any."""
        if self.step_observer is None:
            return call(batch, *previous)
        start = time.perf_counter()
        out = call(batch, *previous)
        self.step_observer(batch, time.perf_counter() - start)
        return out

    def _check_stop(self, seq: Sequence, group: SequenceGroup) -> None:
        stop = self.outputs.check_stop(seq)
        if stop is not None:
            self.scheduler.finish_seq(seq, *stop)

    # ---- introspection -----------------------------------------------------------
    def stats(self) -> EngineStats:
        return EngineStats.of(self.scheduler, self.block_manager, self.structured.num_waiting)


def _has_work(batch: Any) -> bool:
    return bool(batch.work or batch.swap_out or batch.swap_in or batch.copies)

"""Iteration-level scheduler: which sequences run in the next forward, and with which
KV blocks.

Each step, in this order, under `max_num_seqs` sequences and `max_num_batched_tokens`
tokens:
 1. decodes of running requests (queue order), preempting from the back of the
    running queue when the block manager has no slot for them;
 2. prompt chunks of running requests whose prefill is not done (chunked prefill:
    a long prompt takes what the budget leaves, so the decodes keep flowing);
 3. swapped requests back from the CPU pool, oldest first;
 4. new admissions, only when nothing is left swapped.
Steps 3 and 4 are skipped in a step that preempted: the pool is too full for them.

Queues (engine/request_book.py) are ordered by (priority, arrival). Priority orders
admissions; it never preempts a running request for a waiting one. The victim of a
preemption is the last running request: the lowest priority, latest arrival.

The scheduler sees blocks only through the block manager's answers (DESIGN.md item 2)
and never touches tensors; its decisions go to the runner as one ScheduledBatch.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

from pagedserve.engine.batch import ScheduledBatch, SeqWork, fill_block_tables
from pagedserve.engine.request_book import RequestBook
from pagedserve.engine.schedule_ahead import decodes_ahead
from pagedserve.engine.sequence import Sequence, SequenceGroup, Status
from pagedserve.errors import invalid_sampling
from pagedserve.observability.timeline import PhaseEvent


@dataclass
class _Budget:
    tokens: int
    seqs: int

    def take(self, tokens: int, seqs: int) -> None:
        self.tokens -= tokens
        self.seqs -= seqs


_NO_EOS: frozenset[int] = frozenset()
_NO_TABLE: list[int] = []  # until fill_block_tables reads the step's tables


class Scheduler(RequestBook):
    def __init__(self, block_manager: Any, *, max_num_seqs: int, max_num_batched_tokens: int,
                 max_model_len: int, preemption_mode: str = "auto",
                 eos_token_ids: frozenset[int] = frozenset()):
        super().__init__(block_manager, max_model_len=max_model_len,
                         eos_token_ids=eos_token_ids)
        self.block_size = block_manager.block_size
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.preemption_mode = preemption_mode
        # The most one request may use: the pool less the admission watermark.
        self.num_gpu_blocks = block_manager.num_gpu_blocks
        self.usable_gpu_blocks = self.num_gpu_blocks - block_manager.watermark_blocks
        self.num_steps = 0
        self.num_steps_ahead = 0  # of num_steps, those scheduled by schedule_ahead

    @property
    def prefix_cache_queries(self) -> int:
        """Prompt tokens looked up in the prefix cache (the block manager counts them)."""
        return self.bm.prefix_cache_queries

    @property
    def prefix_cache_hits(self) -> int:
        """... and found there."""
        return self.bm.prefix_cache_hits

    # ---- admission -------------------------------------------------------------------
    def add_request(self, request_id: str, prompt: str | None, prompt_token_ids: list[int],
                    params: Any, priority: int = 0,
                    arrival_time: float | None = None, cache_salt: int = 0) -> SequenceGroup:
        self._check_fits(len(prompt_token_ids), params)
        return super().add_request(request_id, prompt, prompt_token_ids, params, priority,
                                   arrival_time, cache_salt)

    def _check_fits(self, prompt_len: int, params: Any) -> None:
        """Rejects at admission a request that could not run even alone in the pool;
        accepted, it would preempt itself forever."""
        # The last token of a sequence is sampled, never fed: it takes no slot.
        tokens = min(prompt_len + params.max_tokens, self.max_model_len) - 1
        width = max(params.n, params.beam_width)
        need = self._footprint(prompt_len, [tokens] * width)
        if need > self.usable_gpu_blocks:
            raise invalid_sampling(
                f"max_tokens: the request needs up to {need} KV-cache blocks "
                f"({width} x {tokens} cached tokens, {self.block_size} a block) but the "
                f"whole cache has {self.usable_gpu_blocks}; shorten the prompt or lower "
                f"max_tokens, n or beam_width")

    def _footprint(self, prompt_len: int, seq_lens: list[int]) -> int:
        """Blocks that sequences of these lengths with a common prompt hold: they share
        the full prompt blocks (after a fork, or through prefix-cache hits on each other
        when re-admitted after a recompute); without prefix caching a recompute
        re-admits them unshared."""
        if len(seq_lens) > 1 and not self.bm.enable_prefix_caching:
            return sum(math.ceil(n / self.block_size) for n in seq_lens)
        shared = prompt_len // self.block_size
        return shared + sum(math.ceil((n - shared * self.block_size) / self.block_size)
                            for n in seq_lens)

    # ---- one step --------------------------------------------------------------------
    def schedule(self) -> ScheduledBatch:
        self.step_start = time.monotonic()
        batch = ScheduledBatch(work=[], scheduled_at=self.step_start)
        budget = _Budget(self.max_num_batched_tokens, self.max_num_seqs)
        preempted, prompts_left = self._schedule_decodes(batch, budget)
        for group in prompts_left:
            if budget.tokens <= 0 or budget.seqs <= 0:
                break  # the budget only shrinks: no later prompt chunk could run
            self._schedule_prefills(group, batch, budget)
        if not preempted:
            self._schedule_swapped(batch, budget)
            if not self.swapped:
                self._schedule_waiting(batch, budget)
        self.num_steps += 1
        fill_block_tables(self.bm, batch)
        return batch

    def schedule_ahead(self, prev: ScheduledBatch) -> ScheduledBatch | None:
        """The next step's decodes, scheduled while `prev` (already launched) still runs
        on the GPU, so this host work overlaps it (engine/schedule_ahead.py says which).
        None when the next step needs `prev`'s results first: requests waiting with room
        to admit them (admitted here, their prompt step would be launched eagerly, op by
        op, before `prev`'s tokens are read, which delays every request's tokens by that
        launch), swapped requests, or too few free blocks for the new slots (a
        preemption)."""
        if self.swapped or (self.waiting and self._num_running_seqs() < self.max_num_seqs):
            return None
        entries = decodes_ahead(self.running, prev,
                                max_num_batched_tokens=self.max_num_batched_tokens,
                                max_model_len=self.max_model_len)
        if entries is None:
            return None
        ids = [seq.seq_id for seq, _, _ in entries]
        done, copies = self.bm.reserve_slots(ids, [0] * len(ids), [len(ids)])  # placeholders
        if not done:
            return None
        self.step_start = time.monotonic()
        batch = ScheduledBatch(work=[], scheduled_at=self.step_start,
                               copies=[tuple(c) for c in copies])
        for seq, group, index in entries:
            seq.num_slots += 1
            seq.placeholder_slot = True
            batch.feed_from_previous.append((len(batch.work), index))
            batch.work.append(self._work(seq, group, seq.num_slots - 1, seq.num_slots,
                                         ahead=True))
        self.num_steps += 1
        self.num_steps_ahead += 1
        fill_block_tables(self.bm, batch)
        return batch

    def _schedule_decodes(self, batch: ScheduledBatch,
                          budget: _Budget) -> tuple[bool, list[SequenceGroup]]:
        """Decodes in queue order, preempting from the back when there is no slot.
        Returns whether it preempted, and the running requests that may have prompt
        left to feed, in queue order (so the prefill pass need not walk them all).

        The slots of every decode are reserved in one native call that stops at the
        first request whose slots do not fit; the last running request is then
        preempted until that one fits (or is the one preempted), and the call goes on
        from there. So the block manager sees the appends and preemptions in queue
        order, exactly as with one append call per request."""
        units: list[tuple[SequenceGroup, list[Sequence]]] = []  # decodes, queue order
        prompts_left: list[SequenceGroup] = []
        end = len(self.running)  # past the last request the budget reached
        for i, group in enumerate(self.running):
            if len(group.seqs) == 1:
                seq = group.seqs[0]
                uncomputed = seq.num_uncomputed
                if uncomputed != 1 or seq.is_finished:
                    if uncomputed > 1:
                        prompts_left.append(group)
                    continue
                seqs = group.seqs
            else:
                seqs = [s for s in group.live_seqs() if s.num_uncomputed == 1]
                if not seqs:
                    prompts_left.append(group)
                    continue
            if len(seqs) > min(budget.tokens, budget.seqs):
                end = i
                break
            budget.take(len(seqs), len(seqs))
            units.append((group, seqs))
            if len(group.seqs) != 1:
                prompts_left.append(group)  # its other sequences may still prefill
        tail = self.running[end:]
        preempted = self._reserve_decodes(units, batch, budget)
        if preempted:  # victims come from the back: drop them from what is left
            prompts_left = [g for g in prompts_left if g.status is Status.RUNNING]
            tail = [g for g in tail if g.status is Status.RUNNING]
        for group, seqs in units:
            for seq in seqs:
                num_tokens = len(seq.token_ids)
                batch.work.append(self._work(seq, group, num_tokens - 1, num_tokens))
        return preempted, prompts_left + tail

    def _reserve_decodes(self, units: list[tuple[SequenceGroup, list[Sequence]]],
                         batch: ScheduledBatch, budget: _Budget) -> bool:
        """Reserves the units' slots, preempting from the back of `running` until each
        fits; drops preempted units from `units` (refunding their budget). Returns
        whether it preempted."""
        preempted = False
        start = 0
        while start < len(units):
            done, copies = self._append_units(units[start:])
            batch.copies.extend(copies)
            start += done
            while start < len(units):  # units[start] does not fit: free blocks for it
                victim = self.running[-1]
                self._stop_running(victim)
                self._preempt(victim, batch)
                preempted = True
                if units[-1][0] is victim:
                    n = len(units.pop()[1])
                    budget.take(-n, -n)
                    if len(units) == start:
                        break  # it was the one that did not fit
                done, copies = self._append_units(units[start:start + 1])
                if done:
                    batch.copies.extend(copies)
                    start += 1
                    break
        return preempted

    def _append_units(self, units: list[tuple[SequenceGroup, list[Sequence]]]
                      ) -> tuple[int, list[tuple[int, int]]]:
        """One native call: the slots of each unit's sequences whose last token has none,
        all or nothing per unit, in order until one does not fit."""
        ids: list[int] = []
        tokens: list[int] = []
        sizes: list[int] = []
        for _, seqs in units:
            n = 0
            for seq in seqs:
                if seq.num_slots < len(seq.token_ids):
                    ids.append(seq.seq_id)
                    tokens.append(seq.token_ids[seq.num_slots])
                    n += 1
            sizes.append(n)
        if not ids:
            return len(units), []
        done, copies = self.bm.reserve_slots(ids, tokens, sizes)
        for _, seqs in units[:done]:
            for seq in seqs:
                seq.num_slots = len(seq.token_ids)
        return done, [tuple(c) for c in copies]

    def _schedule_prefills(self, group: SequenceGroup, batch: ScheduledBatch,
                           budget: _Budget, admitted: bool = False) -> None:
        """Prompt chunks; their slots were all allocated at admission. A request admitted
        this step runs even a single remaining token here (a one-token prompt, or a
        prefix hit that left only the last token)."""
        for seq in group.live_seqs():
            if seq.num_uncomputed > (0 if admitted else 1) and budget.tokens > 0 \
                    and budget.seqs > 0:
                chunk = min(seq.num_uncomputed, budget.tokens)
                self._schedule_seq(seq, group, chunk, batch)
                budget.take(chunk, 1)

    def _schedule_swapped(self, batch: ScheduledBatch, budget: _Budget) -> None:
        while self.swapped:
            group = self.swapped[0]
            seqs = group.live_seqs()
            ids = [s.seq_id for s in seqs]
            if (self._num_running_seqs() + len(seqs) > self.max_num_seqs
                    or not self.bm.can_swap_in(ids)):
                return
            self.swapped.pop(0)
            mapping = [tuple(m) for m in self.bm.swap_in(ids)]
            batch.swap_in.extend(mapping)
            self.num_blocks_swapped_in += len(mapping)
            self._step_swaps.append((group, "swapped_in", len(mapping)))
            for seq in seqs:
                seq.status = Status.RUNNING
            self._start_running(group)
            decodes = [s for s in seqs if s.num_uncomputed == 1]
            if decodes and len(decodes) <= min(budget.tokens, budget.seqs):
                done, copies = self._append_units([(group, decodes)])
                if done:
                    batch.copies.extend(copies)
                    for seq in decodes:
                        self._schedule_seq(seq, group, 1, batch)
                    budget.take(len(decodes), len(decodes))
            self._schedule_prefills(group, batch, budget)

    def _schedule_waiting(self, batch: ScheduledBatch, budget: _Budget) -> None:
        while self.waiting and budget.tokens > 0:
            group = self.waiting[0]
            seqs = group.live_seqs()
            if (self._num_running_seqs() + group.max_num_seqs > self.max_num_seqs
                    or len(seqs) > budget.seqs or not self._can_allocate(seqs, group)):
                return
            self.waiting.pop(0)
            for seq in seqs:
                self._allocate(seq, group)
            self._start_running(group)
            self._schedule_prefills(group, batch, budget, admitted=True)

    # ---- block manager calls ---------------------------------------------------------
    def _can_allocate(self, seqs: list[Sequence], group: SequenceGroup) -> bool:
        if len(seqs) == 1:
            return self.bm.can_allocate(seqs[0].token_ids, group.cache_salt)
        # Several sequences (a recomputed parallel-sampling request): admitted only
        # together, so a partial admission never happens.
        need = self._footprint(len(group.prompt_token_ids), [s.num_tokens for s in seqs])
        return self.bm.num_free_gpu_blocks - need >= self.bm.watermark_blocks

    def _allocate(self, seq: Sequence, group: SequenceGroup) -> None:
        cached = self.bm.allocate(seq.seq_id, seq.token_ids, group.cache_salt)
        seq.num_slots = seq.num_tokens
        seq.status = Status.RUNNING
        # The manager serves only computed blocks and always leaves the last token to
        # feed: its logits give the next token.
        seq.num_computed_tokens = cached
        group.metrics.events.append(PhaseEvent(
            "admitted", self.step_start, self.step_start,
            {"seq": seq.index, "uncached": seq.num_tokens - seq.num_computed_tokens}))
        if group.metrics.first_scheduled_time is None:
            group.metrics.num_cached_tokens = seq.num_computed_tokens

    def _schedule_seq(self, seq: Sequence, group: SequenceGroup, num_tokens: int,
                      batch: ScheduledBatch) -> None:
        """Feeds the next `num_tokens` of `seq`, whose slots are reserved (at admission,
        or by _append_units for a decode)."""
        start = seq.num_computed_tokens
        end = start + num_tokens
        assert seq.num_slots >= end, f"sequence {seq.seq_id} feeds tokens without slots"
        batch.work.append(self._work(seq, group, start, end))

    def _work(self, seq: Sequence, group: SequenceGroup, start: int, end: int,
              ahead: bool = False) -> SeqWork:
        """Feeds token_ids[start:end], whose slots are reserved; `ahead`: feeds instead
        the one token the previous step is still sampling (a placeholder the runner
        replaces), and samples the one after it. Its block table is filled in when the
        step is complete (fill_block_tables)."""
        if group.metrics.first_scheduled_time is None:
            group.metrics.first_scheduled_time = time.monotonic()
        num_out = len(seq.output_token_ids)
        if ahead:
            tokens, sample, num_out = [0], True, num_out + 1
        else:
            tokens, sample = seq.token_ids[start:end], end == len(seq.token_ids)
        # Positional: built for every sequence every step, and keyword arguments
        # double the cost of a dataclass's __init__. Fields in SeqWork's order.
        return SeqWork(
            seq.seq_id, tokens, start, _NO_TABLE, sample, seq.params, seq.prompt_token_ids,
            seq.output_token_ids, num_out,
            _NO_EOS if seq.params.ignore_eos else self.eos_token_ids, group.constraint)

    # ---- preemption ------------------------------------------------------------------
    def _preempt(self, group: SequenceGroup, batch: ScheduledBatch) -> None:
        """Takes a request (already out of `running`) off the GPU. `auto` swaps groups
        of several sequences (recomputing them would redo the shared prompt once per
        sample) and recomputes single ones; the engine gives a GPU scheduler `swap`
        instead (EngineConfig.scheduler_preemption_mode)."""
        mode = self.preemption_mode
        if mode == "auto":
            mode = "swap" if len(group.live_seqs()) > 1 else "recompute"
        if mode == "swap" and self.bm.can_swap_out([s.seq_id for s in group.live_seqs()]):
            self._preempt_by_swap(group, batch)
        else:
            # Swap falls back to recompute only when the CPU pool cannot take the
            # group: recompute costs compute again but never loses the request.
            self._preempt_by_recompute(group)
        group.metrics.num_preemptions += 1

"""Every request in flight: its sequences, its queue, and what happens to them between
steps (a step's results recorded, a sequence finished, a request aborted or failed, a
beam or a sample forked). Scheduler builds each step's batch on top of it.

Queues are ordered by (priority, arrival): lower priority values first, FCFS within a
priority. A sequence holds KV blocks while it is RUNNING or SWAPPED, and is known here
(`_seqs`) until it finishes; a request is known (`_groups`) until its last one does.
"""

from __future__ import annotations

import bisect
import itertools
import logging
import time
from typing import Any

from pagedserve.engine import beam_search
from pagedserve.engine.batch import SampleResult, ScheduledBatch
from pagedserve.engine.sequence import Sequence, SequenceGroup, Status, derived_seed
from pagedserve.errors import InvalidRequestError
from pagedserve.observability.timeline import PhaseEvent

log = logging.getLogger(__name__)


class RequestBook:
    def __init__(self, block_manager: Any, *, max_model_len: int,
                 eos_token_ids: frozenset[int] = frozenset()):
        self.bm = block_manager
        self.max_model_len = max_model_len
        self.eos_token_ids = frozenset(eos_token_ids)
        self.waiting: list[SequenceGroup] = []
        self.running: list[SequenceGroup] = []
        # The running requests with n > 1 or beam search, kept by _start_running and
        # _stop_running, for _num_running_seqs.
        self._running_multi: set[SequenceGroup] = set()
        self.swapped: list[SequenceGroup] = []
        self._groups: dict[str, SequenceGroup] = {}
        self._seqs: dict[int, tuple[Sequence, SequenceGroup]] = {}
        self._seq_ids = itertools.count()
        self._arrivals = itertools.count()
        self.num_preemptions = {"swap": 0, "recompute": 0}
        self.num_blocks_swapped_out = 0
        self.num_blocks_swapped_in = 0
        self.num_prompt_tokens = 0  # tokens fed in prefills (recomputes included)
        self.num_generation_tokens = 0  # tokens sampled
        self.step_start = 0.0  # when the step being built began: its timeline events start here
        # The swaps of the step being run, for the requests' timelines: recorded once
        # update() knows when the step's copies were done.
        self._step_swaps: list[tuple[SequenceGroup, str, int]] = []
        self._failed: list[SequenceGroup] = []

    # ---- requests ------------------------------------------------------------------
    def add_request(self, request_id: str, prompt: str | None, prompt_token_ids: list[int],
                    params: Any, priority: int = 0,
                    arrival_time: float | None = None, cache_salt: int = 0) -> SequenceGroup:
        if request_id in self._groups:
            raise InvalidRequestError(f"request_id {request_id!r} is already in flight")
        group = SequenceGroup(request_id, prompt, list(prompt_token_ids), params,
                              first_seq_id=next(self._seq_ids),
                              arrival_index=next(self._arrivals), priority=priority,
                              arrival_time=arrival_time, cache_salt=cache_salt)
        if params.beam_width > 1:
            group.beam = beam_search.BeamState(params, self.eos_token_ids)
        self._groups[request_id] = group
        self._seqs[group.seqs[0].seq_id] = (group.seqs[0], group)
        bisect.insort(self.waiting, group, key=lambda g: g.sort_key)
        return group

    def abort_request(self, request_id: str) -> SequenceGroup | None:
        """Drops the request wherever it is and frees its blocks now."""
        group = self._groups.get(request_id)
        if group is None:
            return None
        for seq in group.live_seqs():
            self.finish_seq(seq, "abort")
        for queue in (self.waiting, self.swapped):
            if group in queue:
                queue.remove(group)
        self._retire(group)
        return group

    def fail_request(self, group: SequenceGroup, error: Exception) -> None:
        """Ends a request whose own processing raised (its beam scoring, stop check or
        detokenization): its blocks are freed and the error is kept for its caller
        (`take_failed`); the other requests and the engine go on."""
        log.error("request %s failed: %s: %s", group.request_id, type(error).__name__, error,
                  exc_info=error)
        group.error = error
        # Sequences it forked this step may not be in group.seqs yet: free them too.
        for seq, owner in list(self._seqs.values()):
            if owner is group and not seq.is_finished:
                self.release_seq(seq)
        self.abort_request(group.request_id)
        self._failed.append(group)

    def take_failed(self) -> list[SequenceGroup]:
        """The requests failed since the last call."""
        failed, self._failed = self._failed, []
        return failed

    def finish_seq(self, seq: Sequence, reason: str, stop_reason: str | int | None = None) -> None:
        """Ends one sequence and frees its blocks at once; the request ends with its
        last sequence."""
        assert not seq.is_finished, f"sequence {seq.seq_id} finished twice"
        group = self._seqs[seq.seq_id][1]
        blocks = self.release_seq(seq)
        seq.finish_reason, seq.stop_reason = reason, stop_reason
        now = time.monotonic()
        group.metrics.events.append(PhaseEvent(
            "finished", now, now, {"reason": reason, "seq": seq.index, "blocks": blocks}))
        if not group.live_seqs() and not group.needs_fork:
            self._retire(group)

    def release_seq(self, seq: Sequence) -> int:
        """Frees a sequence's blocks and forgets it (a beam that lost, or one that
        finished); returns how many blocks it held."""
        self._seqs.pop(seq.seq_id)
        blocks = 0
        if seq.status in (Status.RUNNING, Status.SWAPPED):
            blocks = len(self.bm.block_table(seq.seq_id))
            self.bm.free(seq.seq_id)
        seq.status = Status.FINISHED
        return blocks

    def fork_seq(self, group: SequenceGroup, parent: Sequence, index: int) -> Sequence:
        """A new beam sharing every block of `parent` (ref counts +1, no copy)."""
        child = parent.fork(next(self._seq_ids), index)
        self.bm.fork(parent.seq_id, child.seq_id)
        self._seqs[child.seq_id] = (child, group)
        return child

    def _retire(self, group: SequenceGroup) -> None:
        if group.status is Status.RUNNING:
            self._stop_running(group)
        group.status = Status.FINISHED
        group.metrics.finished_time = time.monotonic()
        self._groups.pop(group.request_id, None)

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting or self.running or self.swapped)

    def get_group(self, request_id: str) -> SequenceGroup | None:
        return self._groups.get(request_id)

    # ---- the running queue ---------------------------------------------------------
    def _num_running_seqs(self) -> int:
        # A running request of one sample and no beams runs exactly one sequence (it
        # retires when that one finishes): only the others need counting.
        return len(self.running) + sum(g.max_num_seqs - 1 for g in self._running_multi)

    def _start_running(self, group: SequenceGroup) -> None:
        group.status = Status.RUNNING
        bisect.insort(self.running, group, key=lambda g: g.sort_key)
        if group.params.n > 1 or group.beam is not None:
            self._running_multi.add(group)

    def _stop_running(self, group: SequenceGroup) -> None:
        """Takes `group` out of `running`; the caller sets its new status."""
        if self.running and self.running[-1] is group:  # a preemption victim: O(1)
            self.running.pop()
        else:
            self.running.remove(group)
        self._running_multi.discard(group)

    # ---- preemption (Scheduler._preempt picks the mode) --------------------------------
    def _preempt_by_recompute(self, group: SequenceGroup) -> None:
        """Precondition: `group` is RUNNING, holds GPU blocks, is out of `running`.
        Frees its blocks and requeues it ahead of every request that has not started
        (its arrival is older); its tokens so far become the next prefill."""
        for seq in group.live_seqs():
            self.bm.free(seq.seq_id)
            seq.reset_for_recompute()
        group.status = Status.WAITING
        bisect.insort(self.waiting, group, key=lambda g: g.sort_key)
        self.num_preemptions["recompute"] += 1
        group.metrics.events.append(PhaseEvent(
            "preempted", self.step_start, self.step_start, {"mode": "recompute"}))

    def _preempt_by_swap(self, group: SequenceGroup, batch: ScheduledBatch) -> None:
        """Precondition: `group` is RUNNING, out of `running`, and
        `bm.can_swap_out(its seq ids)` is True. Its blocks go to the CPU pool; the
        runner copies them out before this step's forward reuses the GPU blocks."""
        seqs = group.live_seqs()
        mapping = [tuple(m) for m in self.bm.swap_out([s.seq_id for s in seqs])]
        batch.swap_out.extend(mapping)
        self.num_blocks_swapped_out += len(mapping)
        for seq in seqs:
            seq.status = Status.SWAPPED
        group.status = Status.SWAPPED
        bisect.insort(self.swapped, group, key=lambda g: g.sort_key)
        self.num_preemptions["swap"] += 1
        group.metrics.events.append(PhaseEvent(
            "preempted", self.step_start, self.step_start, {"mode": "swap"}))
        self._step_swaps.append((group, "swapped_out", len(mapping)))

    # ---- after the forward -----------------------------------------------------------
    def update(self, batch: ScheduledBatch,
               results: list[SampleResult | None]) -> list[tuple[Sequence, SequenceGroup]]:
        """Records what the forward computed and sampled; returns the sequences that got
        a new token. The caller checks stops and calls finish_seq, except for beam
        search requests (one entry per request that stepped), which stop themselves."""
        assert len(results) == len(batch.work), "one result per scheduled sequence"
        sampled = []
        beam_groups: dict[str, SequenceGroup] = {}
        computed_ids, computed_counts = [], []
        named_ids, named_tokens = [], []  # placeholders of steps scheduled ahead
        num_sampled = 0
        now = time.monotonic()
        for group, kind, blocks in self._step_swaps:  # the runner copied them in this step
            group.metrics.events.append(PhaseEvent(kind, batch.scheduled_at, now, {"blocks": blocks}))
        self._step_swaps.clear()
        for work, result in zip(batch.work, results):
            entry = self._seqs.get(work.seq_id)
            if entry is None:
                continue  # aborted since it was scheduled
            seq, group = entry
            seq.num_computed_tokens += len(work.token_ids)
            computed_ids.append(seq.seq_id)
            computed_counts.append(seq.num_computed_tokens)
            if len(work.token_ids) > 1 or not work.sample:
                self.num_prompt_tokens += len(work.token_ids)
                group.metrics.events.append(PhaseEvent(
                    "prefill_chunk", batch.scheduled_at, now,
                    {"tokens": len(work.token_ids), "start": work.start_pos, "seq": seq.index,
                     "sampled": work.sample}))
            if not work.sample:
                continue
            assert result is not None, f"no sample for sequence {seq.seq_id}"
            num_sampled += 1
            if group.beam is not None:  # the search picks the tokens once every beam is in
                seq.beam_candidates = result.beam_candidates
                beam_groups[group.request_id] = group
                continue
            seq.append_token(result.token_id, result.logprob, result.top_logprobs)
            if seq.placeholder_slot:
                seq.placeholder_slot = False
                named_ids.append(seq.seq_id)
                named_tokens.append(result.token_id)
            if group.metrics.first_token_time is None:
                group.metrics.first_token_time = now
            sampled.append((seq, group))
            if len(group.seqs) < group.params.n:  # group.needs_fork, beams being out
                self._fork(group, seq)
        self.num_generation_tokens += num_sampled
        if named_ids:
            self.bm.set_last_tokens(named_ids, named_tokens)
        # Full blocks whose KV this forward wrote become servable from the prefix cache.
        self.bm.mark_computed(computed_ids, computed_counts)
        for group in beam_groups.values():
            # After a recompute the beams' prompts may end in different steps.
            if all(s.beam_candidates is not None for s in group.live_seqs()):
                try:
                    self._advance_beams(group)
                except Exception as exc:  # noqa: BLE001 - it belongs to this request alone
                    self.fail_request(group, exc)
                    continue
                if group.metrics.first_token_time is None:
                    group.metrics.first_token_time = now
                sampled.append((group.seqs[0], group))
        return sampled

    def _advance_beams(self, group: SequenceGroup) -> None:
        """Applies one step of the request's beam search: forks first (while every
        parent still holds exactly the tokens its children share), then frees the
        beams no candidate chose, then gives the next beams their tokens."""
        step = beam_search.step(group, self.max_model_len)
        owners = [self.fork_seq(group, step.beams[c.parent], index) if fork
                  else step.beams[c.parent]
                  for index, (c, fork) in enumerate(zip(step.chosen, step.forks))]
        for beam in step.dropped:
            if step.done:
                self.finish_seq(beam, "stop")  # the last one retires the request
            else:
                self.release_seq(beam)  # it lost every candidate
        beam_search.commit(group, step, owners)

    def _fork(self, group: SequenceGroup, parent: Sequence) -> None:
        """The other samples of a parallel-sampling request share the parent's prompt
        blocks; each feeds the last prompt token again (rewriting the same K/V in the
        shared slot) to sample its own first token with its own seed."""
        prompt_len = len(group.prompt_token_ids)
        for index in range(len(group.seqs), group.params.n):
            params = group.params
            if params.seed is not None:
                params = params.clone(seed=derived_seed(params.seed, index))
            child = Sequence(next(self._seq_ids), index, group.prompt_token_ids, params)
            self.bm.fork(parent.seq_id, child.seq_id)
            child.num_slots = prompt_len
            child.num_computed_tokens = prompt_len - 1
            child.status = Status.RUNNING
            group.seqs.append(child)
            self._seqs[child.seq_id] = (child, group)

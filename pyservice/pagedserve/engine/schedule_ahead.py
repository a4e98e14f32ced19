"""Async scheduling's half in the scheduler: step N+1's batch, scheduled while step N
still runs on the GPU (LLMEngine.step queues it before reading step N's tokens)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from pagedserve.engine.batch import ScheduledBatch, SeqWork, fill_block_tables

if TYPE_CHECKING:
    from pagedserve.engine.scheduler import Scheduler

_NO_EOS: frozenset[int] = frozenset()


def _reads_outputs(params: Any) -> bool:
    """Whether sampling reads the tokens generated so far (penalties count them), so
    it cannot run before the previous token is known."""
    return (params.repetition_penalty != 1.0 or params.presence_penalty != 0.0
            or params.frequency_penalty != 0.0)


def schedule_ahead(sched: Scheduler, prev: ScheduledBatch) -> ScheduledBatch | None:
    """The next step, scheduled while `prev` (already launched) still runs on the GPU,
    so this host work overlaps it: one decode of every running request, feeding the
    token `prev` is sampling for it. That token is not known yet: the runner takes it
    from the GPU, and its slot is reserved with a placeholder that update() names
    once `prev`'s results are in. A request that `prev` ends by length gets no
    decode; one that `prev` ends otherwise (EOS, a stop string) wastes its decode,
    whose result update() drops.

    None when the next step may need more than that, and the caller then waits for
    `prev` and calls schedule(): requests waiting with room to admit them (admitted
    here, their prompt step would be launched eagerly, op by op, before `prev`'s
    tokens are read, which delays every request's tokens by that launch), swapped
    requests, a running request that `prev` does not sample for (prompt left), one
    of several sequences or with penalties (they read the outputs so far), or too
    few free blocks for the new slots (a preemption)."""
    if sched.swapped or (sched.waiting and sched._num_running_seqs() < sched.max_num_seqs):
        return None
    if len(sched.running) > sched.max_num_batched_tokens:
        return None
    sampled_at = {w.seq_id: i for i, w in enumerate(prev.work) if w.sample}
    entries = []
    for group in sched.running:
        # n > 1: one sequence until its first token, then forked (sharing its blocks).
        if group.params.n != 1 or group.beam is not None or _reads_outputs(group.params):
            return None
        seq = group.seqs[0]
        index = sampled_at.get(seq.seq_id)
        if index is None or seq.is_finished or seq.num_slots != len(seq.token_ids):
            return None
        num_out = len(seq.output_token_ids) + 1  # with the token being sampled
        if num_out >= seq.params.max_tokens or len(seq.token_ids) + 1 >= sched.max_model_len:
            continue  # prev ends it by length
        entries.append((seq, group, index))
    if not entries:
        return None
    # All the slots or none: short of blocks, schedule() preempts after `prev`.
    ids = [seq.seq_id for seq, _, _ in entries]
    done, copies = sched.bm.reserve_slots(ids, [0] * len(ids), [len(ids)])
    if not done:
        return None
    sched.step_start = time.monotonic()
    batch = ScheduledBatch(work=[], scheduled_at=sched.step_start)
    batch.copies.extend(tuple(c) for c in copies)
    for seq, group, index in entries:
        pos = seq.num_slots
        seq.num_slots += 1
        seq.placeholder_slot = True
        batch.feed_from_previous.append((len(batch.work), index))
        batch.work.append(SeqWork(
            seq.seq_id, [0], pos, [], True, seq.params, seq.prompt_token_ids,
            seq.output_token_ids, len(seq.output_token_ids) + 1,
            _NO_EOS if seq.params.ignore_eos else sched.eos_token_ids))
    fill_block_tables(sched.bm, batch)
    sched.num_steps += 1
    sched.num_steps_ahead += 1
    sched.decode_batch_sizes[len(entries)] += 1
    return batch

"""Async scheduling's policy: which decodes step N+1 can run while step N still runs on
the GPU (LLMEngine.step queues N+1 before reading N's tokens). Scheduler.schedule_ahead
asks it, then reserves the slots and builds the step as schedule() does.

One decode of every running request, feeding the token `prev` is sampling for it. That
token is not known yet: the runner takes it from the GPU, and its slot is reserved with
a placeholder that Scheduler.update() names once `prev`'s results are in. A request that
`prev` ends by length gets no decode; one that `prev` ends otherwise (EOS, a stop string)
wastes its decode, whose result update() drops.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pagedserve.engine.batch import ScheduledBatch
    from pagedserve.engine.sequence import Sequence, SequenceGroup


def _reads_outputs(params: Any) -> bool:
    """Whether sampling reads the tokens generated so far (penalties count them, a
    constraint's matcher follows them), so it cannot run before the previous token is
    known."""
    return (params.repetition_penalty != 1.0 or params.presence_penalty != 0.0
            or params.frequency_penalty != 0.0 or params.constrained)


def decodes_ahead(running: list[SequenceGroup], prev: ScheduledBatch, *,
                  max_num_batched_tokens: int, max_model_len: int
                  ) -> list[tuple[Sequence, SequenceGroup, int]] | None:
    """The decodes of the step after `prev`: (sequence, request, index of the work in
    `prev` that samples the token it feeds), in queue order. None when that step may
    need more than them, and the caller then waits for `prev` and calls schedule(): a
    running request that `prev` does not sample for (prompt left), one of several
    sequences or with penalties (they read the outputs so far), or more decodes than
    the token budget."""
    if len(running) > max_num_batched_tokens:
        return None
    sampled_at = {w.seq_id: i for i, w in enumerate(prev.work) if w.sample}
    entries = []
    for group in running:
        # n > 1: one sequence until its first token, then forked (sharing its blocks).
        if group.params.n != 1 or group.beam is not None or _reads_outputs(group.params):
            return None
        seq = group.seqs[0]
        index = sampled_at.get(seq.seq_id)
        if index is None or seq.is_finished or seq.num_slots != len(seq.token_ids):
            return None
        num_out = len(seq.output_token_ids) + 1  # with the token being sampled
        if num_out >= seq.params.max_tokens or len(seq.token_ids) + 1 >= max_model_len:
            continue  # prev ends it by length
        entries.append((seq, group, index))
    return entries or None

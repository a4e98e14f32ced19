"""One step's decodes of single-sequence requests, reserved in one native call."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pagedserve.engine.batch import ScheduledBatch

if TYPE_CHECKING:
    from pagedserve.engine.scheduler import Scheduler
    from pagedserve.engine.sequence import Sequence, SequenceGroup


class DecodeRun:
    """Decodes of one-sequence requests whose slots are reserved in one native
    append_slots call (one call per step instead of one per sequence).

    The blocks they take are counted here, so the run stops taking sequences exactly
    where the block manager's can_append would say no: a lone sequence needs a new
    block only when its last one is full, because its partly filled last block is
    never shared (only forks share one, and forks stay in their own request; the
    prefix cache serves full blocks only). So its block table changes only then, and
    is read again only then. append_slots is all or nothing, so a wrong count would
    raise instead of reserving part of the run; a copy-on-write, which would mean a
    shared last block, makes every table of the run be read again."""

    def __init__(self, sched: Scheduler, batch: ScheduledBatch):
        self.sched = sched
        self.batch = batch
        self.block_size = sched.block_size
        self.entries: list[tuple[Sequence, SequenceGroup]] = []
        self.append_ids: list[int] = []
        self.append_tokens: list[int] = []
        self.free_blocks: int | None = None  # read lazily, less what the run takes

    def add(self, seq: Sequence, group: SequenceGroup) -> bool:
        """Joins a decode (one token to feed); False when its slot needs a block and
        none is left."""
        if seq.num_slots < len(seq.token_ids):  # the last sampled token needs its slot
            if seq.num_slots % self.block_size == 0:
                if self.free_blocks is None:
                    self.free_blocks = self.sched.bm.num_free_gpu_blocks
                if self.free_blocks == 0:
                    return False
                self.free_blocks -= 1
                seq.cached_block_table = None  # it gains a block
            self.append_ids.append(seq.seq_id)
            self.append_tokens.append(seq.token_ids[-1])
        self.entries.append((seq, group))
        return True

    def flush(self) -> None:
        """Reserves the slots and adds the run's work to the batch, in order."""
        sched, batch = self.sched, self.batch
        if self.append_ids:
            copies = sched.bm.append_slots(self.append_ids, self.append_tokens)
            if copies:  # never for lone sequences; if ever, read every table again
                for seq, _ in self.entries:
                    seq.cached_block_table = None
            batch.copies.extend(tuple(c) for c in copies)
            self.append_ids, self.append_tokens = [], []
        for seq, group in self.entries:
            num_tokens = len(seq.token_ids)
            seq.num_slots = num_tokens
            batch.work.append(sched._work(seq, group, num_tokens - 1, num_tokens))
        self.entries.clear()
        self.free_blocks = None  # the caller may free or take blocks next

"""What the scheduler hands the model runner each step, and what comes back.

Plain data only: the scheduler never touches tensors, the runner makes no scheduling
decisions. Physical block ids index the KV cache tensors directly.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from pagedserve.sampling_params import SamplingParams


@dataclass
class SeqWork:
    """One sequence's work in one step."""

    seq_id: int
    token_ids: list[int]  # tokens to feed this step: a prompt chunk, or [last sampled token]
    start_pos: int  # position of token_ids[0] in the sequence
    # The whole table (GPU block ids); covers start_pos + len(token_ids). Read from the
    # block manager once the step is complete (fill_block_tables): it owns the tables.
    # A list, or the scheduler's read-only int32 array view.
    block_table: Sequence[int]
    sample: bool  # False for a prefill chunk that does not reach the prompt's end
    params: SamplingParams
    prompt_token_ids: list[int]  # for the repetition penalty
    output_token_ids: list[int]  # generated so far (penalties, min_tokens)
    # Index among the outputs of the token about to be sampled (= len(output_token_ids)).
    # With params.seed the randomness is a pure function of (seed, sample_index), so a
    # preempted/recomputed or differently batched sequence samples the same token.
    sample_index: int
    # Masked out (with params.stop_token_ids) while len(output_token_ids) < min_tokens.
    eos_token_ids: frozenset[int] = frozenset()
    # Structured output: the request's constraint (structured.logits.RequestConstraint),
    # which masks this row's logits; None for an unconstrained request.
    constraint: Any = None


@dataclass
class ScheduledBatch:
    work: list[SeqWork]  # any mix of prefill chunks and decodes
    swap_out: list[tuple[int, int]] = field(default_factory=list)  # (gpu, cpu), before the forward
    swap_in: list[tuple[int, int]] = field(default_factory=list)  # (cpu, gpu), before the forward
    copies: list[tuple[int, int]] = field(default_factory=list)  # copy-on-write (src, dst) GPU blocks
    # Scheduled ahead (Scheduler.schedule_ahead): (index in work, index in the previous
    # step's work) of each decode whose token that step is still sampling on the GPU;
    # the runner feeds it from there (token_ids holds a placeholder).
    feed_from_previous: list[tuple[int, int]] = field(default_factory=list)
    # When the scheduler began this step (time.monotonic()): its timeline events start
    # here, even if the next step was scheduled before this one's results came back.
    scheduled_at: float = 0.0


@dataclass
class SampleResult:
    token_id: int
    logprob: float  # log-softmax of the raw model logits at the sampled token (as vLLM)
    top_logprobs: dict[int, float] | None = None  # when params.logprobs is set
    # Beam search (params.beam_width > 1): the best next tokens and their log-probs
    # after the penalties, best first; token_id/logprob are the first of them.
    beam_candidates: list[tuple[int, float]] | None = None


def fill_block_tables(block_manager, batch: ScheduledBatch) -> None:
    """Reads every table of the step from the block manager in one call, after every
    slot of the step is reserved (a decode's new block, a copy-on-write, a swap-in).
    Each table is a read-only int32 view of one array: no Python int per block."""
    if batch.work:
        flat, offsets = block_manager.block_tables_array([w.seq_id for w in batch.work])
        flat.flags.writeable = False
        bounds = offsets.tolist()
        for i, work in enumerate(batch.work):
            work.block_table = flat[bounds[i]:bounds[i + 1]]

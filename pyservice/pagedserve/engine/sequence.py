"""Request state as the scheduler sees it: plain data, no tensors.

A SequenceGroup is one request; its Sequences are the parallel samples (n > 1), which
share the prompt's KV blocks after a fork, or the live beams of a beam search, which
share every block they have in common. Token counts tell where each sequence is:
`num_computed_tokens` have KV in the cache, the rest of `token_ids` still has to be fed
(a prompt chunk, the whole history after a recompute preemption, or the last sampled
token in a plain decode step).
"""

from __future__ import annotations

import enum
import time
from typing import Any

from pagedserve.outputs import RequestMetrics
from pagedserve.sampling_params import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"  # holds no KV blocks
    RUNNING = "running"  # KV on the GPU pool
    SWAPPED = "swapped"  # KV on the CPU pool
    FINISHED = "finished"  # blocks freed


def derived_seed(seed: int, index: int) -> int:
    """Seed of parallel sample `index`: sample 0 keeps the request's seed, so a request
    with n=1 and one with n=4 agree on their first sample; the others differ."""
    if index == 0:
        return seed
    return (seed * 1_000_003 + index * 0x9E3779B97F4A7C15) % (1 << 63)


class Sequence:
    def __init__(self, seq_id: int, index: int, prompt_token_ids: list[int],
                 params: SamplingParams):
        self.seq_id = seq_id
        self.index = index  # position among the request's outputs
        self.prompt_token_ids = prompt_token_ids
        self.output_token_ids: list[int] = []
        self.token_ids = list(prompt_token_ids)  # prompt + outputs
        self.params = params  # per sample: its seed is derived from the request's
        self.status = Status.WAITING
        self.num_computed_tokens = 0
        # Tokens the block manager holds slots for (mirrors BlockManager.num_tokens).
        self.num_slots = 0
        # The last slot was reserved, with a placeholder token, for a token the GPU is
        # still sampling (a step scheduled ahead feeds it); update() names it.
        self.placeholder_slot = False
        self.finish_reason: str | None = None
        self.stop_reason: str | int | None = None
        self.cumulative_logprob = 0.0
        self.logprobs: list[dict[int, float]] | None = [] if params.logprobs is not None else None
        # Beam search: this step's best next tokens, (token, log-prob) best first.
        self.beam_candidates: list[tuple[int, float]] | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_uncomputed(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is Status.FINISHED

    def append_token(self, token_id: int, logprob: float,
                     top_logprobs: dict[int, float] | None) -> None:
        self.output_token_ids.append(token_id)
        self.token_ids.append(token_id)
        self.cumulative_logprob += logprob
        if self.logprobs is not None:
            entry = dict(top_logprobs or {})
            entry[token_id] = logprob
            self.logprobs.append(entry)

    def fork(self, seq_id: int, index: int) -> "Sequence":
        """A copy holding the same tokens (a new beam; the block manager forks its KV)."""
        child = Sequence(seq_id, index, self.prompt_token_ids, self.params)
        child.output_token_ids = list(self.output_token_ids)
        child.token_ids = list(self.token_ids)
        child.status = self.status
        child.num_computed_tokens = self.num_computed_tokens
        child.num_slots = self.num_slots
        child.cumulative_logprob = self.cumulative_logprob
        child.logprobs = None if self.logprobs is None else list(self.logprobs)
        return child

    def reset_for_recompute(self) -> None:
        """Forget the KV cache: the whole history (prompt + outputs) becomes the prompt
        of the next prefill; the tokens themselves never change."""
        self.num_computed_tokens = 0
        self.num_slots = 0
        self.placeholder_slot = False
        self.status = Status.WAITING
        self.beam_candidates = None  # its prefill will offer them again

    def __repr__(self) -> str:
        return (f"Sequence(id={self.seq_id}, {self.status.value}, tokens={self.num_tokens}, "
                f"computed={self.num_computed_tokens}, slots={self.num_slots})")


class SequenceGroup:
    """One request: its samples, its place in the queues and its timings."""

    def __init__(self, request_id: str, prompt: str | None, prompt_token_ids: list[int],
                 params: SamplingParams, first_seq_id: int, arrival_index: int,
                 priority: int = 0, arrival_time: float | None = None, cache_salt: int = 0):
        self.request_id = request_id
        self.cache_salt = cache_salt  # prompts hash under it: only equal salts share blocks
        self.error: Exception | None = None  # set when the request failed on its own
        self.prompt = prompt
        self.prompt_token_ids = prompt_token_ids
        self.params = params
        self.priority = priority
        self.arrival_index = arrival_index  # ties between equal arrival times broken by order
        self.status = Status.WAITING
        # Sample 0 exists from the start; the other n-1 are forked from it once the
        # prompt is in the cache, so the prompt is prefilled once and its blocks shared.
        self.seqs = [Sequence(first_seq_id, 0, prompt_token_ids, params)]
        # beam_search.BeamState, set by the scheduler for beam_width > 1 (not imported:
        # beam_search reads sequences, and engine modules import in one direction).
        self.beam: Any = None
        # Structured output: set by the engine once the grammar compiled (its matchers
        # mask the sampler's rows: structured.logits.RequestConstraint).
        self.constraint = None
        self.metrics = RequestMetrics(
            arrival_time=time.monotonic() if arrival_time is None else arrival_time,
            num_prompt_tokens=len(prompt_token_ids))

    @property
    def sort_key(self) -> tuple[int, int]:
        """Queue order: lower priority value first, then earlier arrival."""
        return (self.priority, self.arrival_index)

    @property
    def needs_fork(self) -> bool:
        """Parallel sampling only: beams fork as the search goes."""
        return self.beam is None and len(self.seqs) < self.params.n

    @property
    def max_num_seqs(self) -> int:
        """Sequences this request will run at once (its share of max_num_seqs)."""
        if self.needs_fork:
            return self.params.n
        if self.beam is not None and not self.is_finished:
            return self.params.beam_width
        return sum(1 for s in self.seqs if not s.is_finished)

    def live_seqs(self) -> list[Sequence]:
        return [s for s in self.seqs if not s.is_finished]

    @property
    def is_finished(self) -> bool:
        return self.status is Status.FINISHED

    def __repr__(self) -> str:
        return f"SequenceGroup({self.request_id!r}, {self.status.value}, seqs={self.seqs})"

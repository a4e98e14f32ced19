"""What the engine hands back for each request that progressed in a step.

Plain slotted dataclasses: the engine builds one RequestOutput (and a CompletionOutput
per sequence) for every request that progressed, every step, so construction is kept
cheap; `dataclasses.replace` and `fields` work on them as on any dataclass.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from pagedserve.observability.timeline import PhaseEvent

FinishReason = Literal["stop", "length", "abort"]


class RequestFailedError(RuntimeError):
    """One request failed in the engine (a bug in its own processing); the engine and
    every other request went on."""


@dataclass(slots=True)
class CompletionOutput:
    """One generated sequence; text and token ids are cumulative (everything so far)."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: FinishReason | None = None
    cumulative_logprob: float = 0.0
    logprobs: list[dict[int, float]] | None = None
    # The stop string or stop token id that ended the sequence, when one did.
    stop_reason: str | int | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(slots=True)
class RequestMetrics:
    """Times are time.monotonic() seconds; None until the event happened."""

    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    num_preemptions: int = 0
    # Phase changes (prompt chunks, preemptions, swaps, finishes), one record each, for
    # the request's trace: see pagedserve.observability.timeline.
    events: list[PhaseEvent] = field(default_factory=list)


@dataclass(slots=True)
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics = field(default_factory=lambda: RequestMetrics(arrival_time=0.0))
    # Set when the request failed on its own (finished, no completions): the engine kept
    # running; the caller gets this error instead of a result.
    error: Exception | None = None

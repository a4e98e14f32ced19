"""What the engine hands back for each request that progressed in a step.

Plain slotted dataclasses: the engine builds one RequestOutput (and a CompletionOutput
per sequence) for every request that progressed, every step, so construction is kept
cheap; `dataclasses.replace` and `fields` work on them as on any dataclass.

What a completion's token ids, text and logprobs hold is the request's
RequestOutputKind, chosen by whoever adds it: everything so far (CUMULATIVE), only what
is new since the request's previous output (DELTA: per-step cost independent of the
output's length), or one cumulative output once it finishes (FINAL_ONLY).
`num_tokens` is always the cumulative count, so usage and metrics need no token lists.
"""

from __future__ import annotations

import enum
import operator
from dataclasses import dataclass, field, fields
from typing import Literal

from pagedserve.observability.timeline import PhaseEvent

FinishReason = Literal["stop", "length", "abort"]


class RequestOutputKind(enum.Enum):
    CUMULATIVE = "cumulative"  # every output holds everything so far
    DELTA = "delta"  # every output holds what is new since the previous one
    FINAL_ONLY = "final_only"  # one cumulative output, when the request finishes


class RequestFailedError(RuntimeError):
    """One request failed in the engine (a bug in its own processing); the engine and
    every other request went on."""


@dataclass(slots=True)
class CompletionOutput:
    """One generated sequence: text, token ids and logprobs are everything so far, or
    for a DELTA request only what is new (beam search: no completions until the end,
    then whole hypotheses, as its beams reorder and get replaced while it runs)."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: FinishReason | None = None
    cumulative_logprob: float = 0.0
    logprobs: list[dict[int, float]] | None = None
    # The stop string or stop token id that ended the sequence, when one did.
    stop_reason: str | int | None = None
    # Tokens generated so far (cumulative whatever the kind); len(token_ids) when unset.
    num_tokens: int = -1

    def __post_init__(self) -> None:
        if self.num_tokens < 0:
            self.num_tokens = len(self.token_ids)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def extend(self, newer: CompletionOutput) -> None:
        """Appends a later delta of the same sequence (in place)."""
        self.token_ids.extend(newer.token_ids)
        self.text += newer.text
        if newer.logprobs is not None:
            if self.logprobs is None:
                self.logprobs = []
            self.logprobs.extend(newer.logprobs)
        self.finish_reason = newer.finish_reason
        self.cumulative_logprob = newer.cumulative_logprob
        self.stop_reason = newer.stop_reason
        self.num_tokens = newer.num_tokens


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

    def snapshot(self) -> RequestMetrics:
        """A copy another thread can read while the engine goes on updating this one."""
        snapshot = RequestMetrics(*_metrics_values(self))
        for name in _METRICS_LISTS:  # e.g. the timeline the scheduler keeps appending to
            setattr(snapshot, name, list(getattr(self, name)))
        return snapshot


_metrics_values = operator.attrgetter(*(f.name for f in fields(RequestMetrics)))
_METRICS_LISTS = tuple(f.name for f in fields(RequestMetrics) if f.default_factory is list)


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

    def add(self, newer: RequestOutput, delta: bool) -> None:
        """Folds a later output of the same request into this one (in place): a DELTA
        output's completions are appended (`delta` True), a cumulative one replaces them.
        The timings, `finished` and `error` are the newer output's."""
        if delta:
            mine = {c.index: c for c in self.outputs}
            for c in newer.outputs:
                old = mine.get(c.index)
                if old is None:
                    self.outputs.append(c)
                else:
                    old.extend(c)
            self.outputs.sort(key=_index)
        else:
            self.outputs = newer.outputs
        self.finished = newer.finished
        self.metrics = newer.metrics
        self.error = newer.error


def _index(c: CompletionOutput) -> int:
    return c.index

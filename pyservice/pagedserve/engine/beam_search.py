"""Beam search over the paged KV cache, with transformers' selection rules.

Each step, every live beam of a request feeds its last token and the sampler returns
its best next tokens with their log-probabilities (log-softmax, then the penalties:
transformers' processed scores). Then, over all (beam, token) candidates ranked by
cumulative log-probability:
 1. a candidate among the first `width` that ends (a stop token, or the length limit)
    becomes a hypothesis scored `cumulative / generated_len ** length_penalty`; the
    best `width` hypotheses are kept;
 2. the best `width` candidates that do not end are the next beams;
 3. the search is done when no beam runs on; or, once `width` hypotheses exist, at
    once with `early_stopping`, otherwise when the best running beam's score at its
    current length no longer beats the worst hypothesis.
Running beams left at the end are dropped, as transformers drops them.

KV blocks follow the beams: a beam chosen by k candidates keeps its sequence for the
first and is forked for the others (the children share every block, a partly filled
last one included, which the block manager copies on the next write); a beam chosen
by none is freed at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pagedserve.sampling_params import SamplingParams

if TYPE_CHECKING:
    from pagedserve.engine.sequence import Sequence, SequenceGroup


@dataclass
class Candidate:
    parent: int  # index of the beam it extends
    token_id: int
    logprob: float
    cumulative_logprob: float


@dataclass
class Hypothesis:
    """A finished beam: its generated tokens (the stop token included) and its score."""

    token_ids: list[int]
    cumulative_logprob: float
    score: float
    finish_reason: str
    stop_reason: int | None = None
    logprobs: list[dict[int, float]] | None = None


@dataclass
class BeamState:
    """The search of one request: its settings and the best finished hypotheses."""

    params: SamplingParams
    eos_token_ids: frozenset[int]  # the model's; they end no beam with ignore_eos
    hypotheses: list[Hypothesis] = field(default_factory=list)  # best first, at most width
    done: bool = False

    def __post_init__(self) -> None:
        # Built once: select() tests every ranked candidate against it.
        eos = frozenset() if self.params.ignore_eos else self.eos_token_ids
        self._eos: frozenset[int] = eos
        self.stop_ids: frozenset[int] = eos | self.params.stop_token_set

    @property
    def width(self) -> int:
        return self.params.beam_width

    @property
    def candidates_per_beam(self) -> int:
        """Tokens each beam must offer so that `select` sees every candidate it can
        pick: one among the best `width` that do not end has at most width - 1 better
        such tokens, and the stop tokens, ahead of it in its own beam."""
        return self.width + len(self.stop_ids)

    def score(self, cumulative_logprob: float, generated_len: int) -> float:
        # length_penalty is bounded (SamplingParams), so the power is finite and > 0.
        return cumulative_logprob / float(generated_len) ** self.params.length_penalty

    def add(self, hypothesis: Hypothesis) -> None:
        self.hypotheses.append(hypothesis)
        # Stable: of two equal scores the earlier hypothesis stays ahead.
        self.hypotheses.sort(key=lambda h: -h.score)
        del self.hypotheses[self.width:]

    def select(self, beams: list[Sequence], at_limit: bool) -> list[Candidate]:
        """One step over the live beams (each with its `beam_candidates`, best first);
        `at_limit`: the next token reaches max_tokens or max_model_len. Records the new
        hypotheses, sets `done`, and returns the next beams, best first."""
        ranked = sorted(
            (Candidate(b, tok, lp, seq.cumulative_logprob + lp)
             for b, seq in enumerate(beams) for tok, lp in seq.beam_candidates),
            key=lambda c: -c.cumulative_logprob)  # stable: ties keep beam, then token order
        generated_len = len(beams[0].output_token_ids) + 1
        running: list[Candidate] = []
        for rank, c in enumerate(ranked):
            if rank >= self.width and len(running) == self.width:
                break
            stop = c.token_id in self.stop_ids
            if stop or at_limit:
                if rank < self.width:  # only the best `width` may finish (transformers)
                    self.add(self._hypothesis(beams[c.parent], c, generated_len, stop))
            elif len(running) < self.width:
                running.append(c)
        self.done = not running or self._cannot_improve(running[0], generated_len)
        return [] if self.done else running

    def _hypothesis(self, beam: Sequence, c: Candidate, generated_len: int,
                    stop: bool) -> Hypothesis:
        logprobs = None
        if beam.logprobs is not None:
            logprobs = beam.logprobs + [top_logprobs(beam, self.params, c)]
        return Hypothesis(beam.output_token_ids + [c.token_id], c.cumulative_logprob,
                          self.score(c.cumulative_logprob, generated_len),
                          "stop" if stop else "length",
                          # As for sampling: EOS has no stop reason, a stop token is its own.
                          c.token_id if stop and c.token_id not in self._eos else None,
                          logprobs)

    def _cannot_improve(self, best: Candidate, generated_len: int) -> bool:
        """transformers' stopping rule once `width` hypotheses exist (early_stopping
        False: the best running beam judged at its current length)."""
        if len(self.hypotheses) < self.width:
            return False
        if self.params.early_stopping:
            return True
        return self.score(best.cumulative_logprob, generated_len) <= self.hypotheses[-1].score


def top_logprobs(beam: Sequence, params: SamplingParams, c: Candidate) -> dict[int, float]:
    """The logprobs entry of a beam's new token: the best `params.logprobs` of its
    candidates and the chosen one."""
    entry = dict(beam.beam_candidates[:params.logprobs or 0])
    entry[c.token_id] = c.logprob
    return entry


@dataclass
class BeamStep:
    """One step of a request's search, as data for the scheduler to apply: it forks
    and frees the sequences (and their KV blocks), then `commit` gives the next beams
    their tokens."""

    beams: list[Sequence]  # the live beams the step started from
    chosen: list[Candidate]  # the next beams, best first
    tops: list[dict[int, float] | None]  # the logprobs entry of each chosen token
    forks: list[bool]  # per chosen: a new sequence forked from its parent (else the parent)
    dropped: list[Sequence]  # beams chosen by no candidate
    done: bool  # the search is over: the dropped beams finish, the request with them


def step(group: SequenceGroup, max_model_len: int) -> BeamStep:
    """Decides one step of the search over the request's live beams (each with its
    `beam_candidates`); records the new hypotheses in `group.beam`, changes no sequence."""
    state: BeamState = group.beam
    beams = group.live_seqs()
    out_len = len(beams[0].output_token_ids) + 1
    at_limit = (out_len >= group.params.max_tokens
                or len(group.prompt_token_ids) + out_len >= max_model_len)
    chosen = state.select(beams, at_limit)
    tops = [top_logprobs(beams[c.parent], group.params, c) if beams[c.parent].logprobs
            is not None else None for c in chosen]
    forks: list[bool] = []
    kept: set[int] = set()  # parents kept by an earlier (better) candidate
    for c in chosen:
        forks.append(c.parent in kept)
        kept.add(c.parent)
    dropped = [beam for b, beam in enumerate(beams) if b not in kept]
    return BeamStep(beams, chosen, tops, forks, dropped, state.done)


def commit(group: SequenceGroup, step: BeamStep, owners: list[Sequence]) -> None:
    """Gives each next beam (`owners`, aligned with `step.chosen`: the parent or its
    fork) its token, once the forks were made while every parent still held exactly
    the tokens its children share."""
    for beam in step.beams:
        beam.beam_candidates = None
    for index, (seq, c, top) in enumerate(zip(owners, step.chosen, step.tops)):
        seq.index = index
        seq.append_token(c.token_id, c.logprob, top)
    if owners:
        group.seqs = owners

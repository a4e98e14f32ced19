"""Per-request sampling settings (field names follow vLLM's, as the gRPC proto does)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from pagedserve.errors import invalid_sampling
from pagedserve.structured.spec import ConstraintSpec, check_constraint, constraint_of

# A hard cap keeps one request from asking the sampler for the whole vocabulary.
MAX_LOGPROBS = 20
# Beam scores divide by generated_len ** length_penalty: this bound keeps that power
# finite and non-zero for any length a model allows (1e6 ** 10 = 1e60).
MAX_ABS_LENGTH_PENALTY = 10.0
# Dividing logits (at most ~1e4) by a smaller penalty could overflow float32 to inf.
REPETITION_PENALTY_RANGE = (1e-2, 1e2)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass
class SamplingParams:
    """How to pick tokens and when to stop. Validated on construction.

    Every error (pagedserve.errors.InvalidRequestError) starts with the offending field's
    name, so the gRPC layer can hand it to the client unchanged.
    """

    n: int = 1  # parallel samples of the prompt (they share its KV blocks)
    # Beam search when > 1: deterministic, as transformers' with do_sample=False, so
    # temperature, top_p, top_k, min_p and seed do not apply; the penalties do.
    beam_width: int = 1
    length_penalty: float = 1.0  # beam search: score = cumulative logprob / length ** this
    # Beam search: True stops once beam_width hypotheses are finished; False once the
    # best running beam can no longer beat the worst of them (transformers' heuristic).
    early_stopping: bool = False
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0  # keep the smallest set of tokens whose probability reaches top_p
    top_k: int = -1  # keep the k most likely tokens; -1 (or 0) = off
    min_p: float = 0.0  # drop tokens below min_p x the top token's probability
    repetition_penalty: float = 1.0  # > 1 discourages tokens of the prompt and output
    presence_penalty: float = 0.0  # subtracted from the logits of tokens already generated
    frequency_penalty: float = 0.0  # subtracted per occurrence in the output
    seed: int | None = None  # same seed, same tokens, whatever else is batched
    stop: list[str] = field(default_factory=list)  # strings that end the text (cut from it)
    stop_token_ids: list[int] = field(default_factory=list)  # token ids that end generation
    max_tokens: int = 16  # tokens to generate at most
    min_tokens: int = 0  # tokens to generate before EOS or a stop may end it
    ignore_eos: bool = False  # keep generating past EOS
    logprobs: int | None = None  # top log-probabilities to return per token
    # Structured output, at most one (pagedserve.structured): the output is kept a
    # prefix of what the constraint accepts, and ends (EOS, finish reason "stop") only
    # where it is complete.
    json_schema: str | None = None  # a JSON Schema (JSON text or a dict) the output conforms to
    json_object: bool = False  # the output is a JSON object
    regex: str | None = None  # the output matches this regular expression
    grammar: str | None = None  # the output is a sentence of this EBNF (GBNF) grammar, rule root
    choice: list[str] | None = None  # the output is exactly one of these strings

    def __post_init__(self) -> None:
        self._check_int("n", minimum=1)
        self._check_int("beam_width", minimum=1)
        self._check_float("length_penalty")
        if abs(self.length_penalty) > MAX_ABS_LENGTH_PENALTY:
            raise invalid_sampling(f"length_penalty must be in [-{MAX_ABS_LENGTH_PENALTY:g}, "
                                   f"{MAX_ABS_LENGTH_PENALTY:g}], got {self.length_penalty:g}")
        self._check_float("temperature", minimum=0.0)
        self._check_float("top_p")
        if not 0.0 < self.top_p <= 1.0:
            raise invalid_sampling(f"top_p must be in (0, 1], got {self.top_p}")
        self._check_int("top_k")
        if self.top_k == 0:
            self.top_k = -1  # proto3 leaves unset ints at 0: treat it as "off" too
        if self.top_k < -1:
            raise invalid_sampling(f"top_k must be -1 (off) or >= 1, got {self.top_k}")
        self._check_float("min_p")
        if not 0.0 <= self.min_p <= 1.0:
            raise invalid_sampling(f"min_p must be in [0, 1], got {self.min_p}")
        self._check_float("repetition_penalty")
        low, high = REPETITION_PENALTY_RANGE
        if not low <= self.repetition_penalty <= high:
            raise invalid_sampling(f"repetition_penalty must be in [{low:g}, {high:g}], "
                                   f"got {self.repetition_penalty:g}")
        for name in ("presence_penalty", "frequency_penalty"):
            self._check_float(name)
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise invalid_sampling(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if self.seed is not None and not _is_int(self.seed):
            raise invalid_sampling(f"seed must be an integer or None, got {self.seed!r}")
        self._check_stop()
        self._check_int("max_tokens", minimum=1)
        self._check_int("min_tokens", minimum=0)
        if self.min_tokens > self.max_tokens:
            raise invalid_sampling(
                f"min_tokens must be <= max_tokens ({self.max_tokens}), got {self.min_tokens}")
        for name in ("early_stopping", "ignore_eos"):
            if not isinstance(getattr(self, name), bool):
                raise invalid_sampling(f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.logprobs is not None:
            self._check_int("logprobs", minimum=0)
            if self.logprobs > MAX_LOGPROBS:
                raise invalid_sampling(f"logprobs must be <= {MAX_LOGPROBS}, got {self.logprobs}")
        if self.beam_width > 1 and self.n > self.beam_width:
            raise invalid_sampling(f"n must be <= beam_width ({self.beam_width}) for beam search, "
                                   f"got {self.n}")
        if self.beam_width > 1 and self.stop:
            raise invalid_sampling("stop strings are not supported with beam search "
                                   "(beam_width > 1); use stop_token_ids")
        check_constraint(self)

    def _check_int(self, name: str, minimum: int | None = None) -> None:
        value = getattr(self, name)
        if not _is_int(value):
            raise invalid_sampling(f"{name} must be an integer, got {value!r}")
        if minimum is not None and value < minimum:
            raise invalid_sampling(f"{name} must be >= {minimum}, got {value}")

    def _check_float(self, name: str, minimum: float | None = None) -> None:
        value = getattr(self, name)
        if not _is_number(value) or not math.isfinite(value):
            raise invalid_sampling(f"{name} must be a finite number, got {value!r}")
        if minimum is not None and value < minimum:
            raise invalid_sampling(f"{name} must be >= {minimum:g}, got {value}")
        setattr(self, name, float(value))

    def _check_stop(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if not isinstance(self.stop, (list, tuple)):
            raise invalid_sampling(f"stop must be a string or a list of strings, got {self.stop!r}")
        self.stop = list(self.stop)
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise invalid_sampling(f"stop must contain only non-empty strings, got {s!r}")
        if not isinstance(self.stop_token_ids, (list, tuple)):
            raise invalid_sampling(
                f"stop_token_ids must be a list of integers, got {self.stop_token_ids!r}")
        self.stop_token_ids = list(self.stop_token_ids)
        for t in self.stop_token_ids:
            if not _is_int(t) or t < 0:
                raise invalid_sampling(
                    f"stop_token_ids must contain non-negative integers, got {t!r}")
        # Checked against every generated token: a set makes that O(1) however long the list.
        self._stop_token_set = frozenset(self.stop_token_ids)

    @property
    def stop_token_set(self) -> frozenset[int]:
        return self._stop_token_set

    @property
    def constraint(self) -> ConstraintSpec | None:
        """The structured-output constraint (kind and text), or None."""
        return constraint_of(self)

    @property
    def constrained(self) -> bool:
        return (self.json_schema is not None or self.json_object or self.regex is not None
                or self.grammar is not None or self.choice is not None)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def clone(self, **changes: object) -> "SamplingParams":
        """A validated copy with some fields changed (e.g. a derived seed per sample)."""
        return replace(self, **changes)

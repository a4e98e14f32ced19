"""What a request's constraint is, checked without the grammar engine.

SamplingParams calls `check_constraint` on construction; its messages start with the
field's name, as every SamplingParams error does. Whether a schema, regex or grammar
really compiles is the compiler's answer (compiler.py), given off the step loop.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from pagedserve.errors import invalid_sampling

KINDS = ("json_schema", "json_object", "regex", "grammar", "choice")
# Bounds on what one request may hand the compiler: its time and memory grow with the
# text, and a compile runs on a small shared pool.
MAX_CONSTRAINT_CHARS = 32 * 1024
MAX_CHOICES = 256


@dataclass(frozen=True)
class ConstraintSpec:
    """One constraint; (kind, text) is also its compile-cache key. `text` is the schema,
    regex or grammar as given, "" for json_object, and a JSON list for choice."""

    kind: str
    text: str

    @property
    def choices(self) -> list[str]:
        return json.loads(self.text) if self.kind == "choice" else []


def constraint_of(params: Any) -> ConstraintSpec | None:
    """The request's constraint (after check_constraint), or None."""
    if params.json_schema is not None:
        return ConstraintSpec("json_schema", params.json_schema)
    if params.json_object:
        return ConstraintSpec("json_object", "")
    if params.regex is not None:
        return ConstraintSpec("regex", params.regex)
    if params.grammar is not None:
        return ConstraintSpec("grammar", params.grammar)
    if params.choice is not None:
        return ConstraintSpec("choice", json.dumps(params.choice, ensure_ascii=False))
    return None


def check_constraint(params: Any) -> None:
    """Validates (and normalises: a schema dict becomes JSON text) the constraint fields
    of a SamplingParams; raises InvalidRequestError naming the field."""
    if isinstance(params.json_schema, (dict, bool)):
        params.json_schema = json.dumps(params.json_schema)
    for name in ("json_schema", "regex", "grammar"):
        value = getattr(params, name)
        if value is None:
            continue
        if not isinstance(value, str) or not value:
            raise invalid_sampling(f"{name} must be a non-empty string, got {value!r:.80}")
        _check_size(name, len(value))
    if not isinstance(params.json_object, bool):
        raise invalid_sampling(f"json_object must be a bool, got {params.json_object!r}")
    if params.json_schema is not None:
        _check_schema_json(params.json_schema)
    if params.choice is not None:
        _check_choice(params)
    given = [k for k in KINDS if getattr(params, k) not in (None, False)]
    if len(given) > 1:
        raise invalid_sampling(f"{given[1]}: at most one constraint per request, "
                               f"got {' and '.join(given)}")
    if not given:
        return
    if params.beam_width > 1:
        raise invalid_sampling(f"{given[0]}: constraints are not supported with beam search "
                               "(beam_width > 1)")
    if params.ignore_eos:
        raise invalid_sampling(f"{given[0]}: ignore_eos cannot be combined with a constraint "
                               "(the output ends where the constraint is complete)")
    if params.min_tokens:
        raise invalid_sampling(f"{given[0]}: min_tokens cannot be combined with a constraint "
                               "(the constraint decides where the output may end)")


def _check_size(name: str, chars: int) -> None:
    if chars > MAX_CONSTRAINT_CHARS:
        raise invalid_sampling(f"{name} is {chars} characters, more than the limit of "
                               f"{MAX_CONSTRAINT_CHARS}")


def _check_schema_json(text: str) -> None:
    try:
        schema = json.loads(text)
    except json.JSONDecodeError as exc:
        raise invalid_sampling(f"json_schema is not valid JSON: {exc}") from None
    if not isinstance(schema, dict):
        raise invalid_sampling(f"json_schema must be a JSON object (a schema), got "
                               f"{type(schema).__name__}")


def _check_choice(params: Any) -> None:
    choice = params.choice
    if isinstance(choice, tuple):
        choice = params.choice = list(choice)
    if not isinstance(choice, list) or not choice:
        raise invalid_sampling(f"choice must be a non-empty list of strings, got {choice!r:.80}")
    if len(choice) > MAX_CHOICES:
        raise invalid_sampling(f"choice has {len(choice)} strings, more than the limit of "
                               f"{MAX_CHOICES}")
    for i, c in enumerate(choice):
        if not isinstance(c, str) or not c:
            raise invalid_sampling(f"choice[{i}] must be a non-empty string, got {c!r:.80}")
    _check_size("choice", sum(len(c) for c in choice))

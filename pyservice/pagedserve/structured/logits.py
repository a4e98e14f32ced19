"""The sampler's side of structured output: each constrained sequence's matcher, and
the token bitmask put on its row of the logits.

A matcher follows its sequence's output tokens: before each mask it accepts the tokens
the sequence gained since the last one. Its state is therefore a function of the
tokens alone: a preempted sequence (swapped or recomputed) finds it as it left it, a
parallel sample (n > 1) gets its own from the first token on, and nothing needs
saving or replaying.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)


class RequestConstraint:
    """One request's compiled grammar and its sequences' matchers (by seq id)."""

    __slots__ = ("backend", "compiled", "_matchers")

    def __init__(self, backend: Any, compiled: Any):
        self.backend = backend
        self.compiled = compiled
        self._matchers: dict[int, list] = {}  # seq id -> [matcher, tokens accepted, broken]

    def fill(self, seq_id: int, output_token_ids: list[int], bitmask: Any, row: int) -> bool:
        """Writes into bitmask[row] the tokens that may follow `output_token_ids`; False
        when that is every token (the row needs no mask)."""
        entry = self._matchers.get(seq_id)
        if entry is None:
            entry = self._matchers[seq_id] = [self.backend.matcher(self.compiled), 0, False]
        matcher = entry[0]
        while entry[1] < len(output_token_ids) and not entry[2]:
            token = output_token_ids[entry[1]]
            if not matcher.accept_token(token):
                # Cannot happen while every token is sampled under the mask; should it,
                # the sequence is ended (EOS only) rather than left unconstrained.
                log.error("constraint matcher refused token %d of sequence %d", token, seq_id)
                entry[2] = True
            entry[1] += 1
        if entry[2]:
            bitmask[row].zero_()
            for t in matcher.stop_token_ids:
                bit = 1 << (t % 32)
                bitmask[row, t // 32] |= bit - (1 << 32) if bit >= 1 << 31 else bit  # int32
            return True
        return matcher.fill_next_token_bitmask(bitmask, row)


def constrain_logits(logits: Any, raw: Any, works: list) -> Any:
    """`logits` with each constrained row masked to what its grammar allows next; the
    rows without a constraint are left as they are, and so is a constrained row whose
    grammar allows every token now. When `logits` is `raw` (the model's logits) it is
    masked in place unless a row it masks asks for top logprobs, which are read from
    `raw` after sampling: the sampled token's own logprob is unchanged by the mask (it
    is allowed), and a copy of [rows, vocab] is not free.

    The per-step work is a few microseconds a constrained row for the fill (XGrammar
    reads the mask from its compile-time cache, into one bitmask reused step after
    step) and the bitmask on those rows alone (backend.apply_bitmask); no Python loop
    runs over the vocabulary (docs/structured_output.md has the figures)."""
    rows = [i for i, w in enumerate(works) if w.constraint is not None]
    if not rows:
        return logits
    backend = works[rows[0]].constraint.backend
    bitmask = backend.bitmask(len(works), pinned=logits.is_cuda)
    masked = [i for i in rows
              if works[i].constraint.fill(works[i].seq_id, works[i].output_token_ids, bitmask, i)]
    if not masked:
        return logits
    if logits is raw and any(works[i].params.logprobs for i in masked):
        logits = logits.clone()
    backend.apply_bitmask(logits, bitmask, masked)
    return logits

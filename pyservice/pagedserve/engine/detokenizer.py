"""Incremental detokenization with stop strings.

Decoding each new token on its own is wrong twice over: byte-level BPE splits one
multi-byte character over several tokens (each alone decodes to U+FFFD), and
SentencePiece-style tokenizers drop a token's leading space when it is decoded
without its left neighbour. So each step decodes a short window that starts a few
tokens back (`prefix_offset`) and emits only the text past what that window's
older part (`prefix_offset:read_offset`) already produced; while the window ends in
an incomplete character, nothing is emitted and the tokens wait for the next one.
"""

from __future__ import annotations

from typing import Any

# Prompt tokens decoded as left context for the first generated tokens.
_CONTEXT_TOKENS = 5
_REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    """Text of one generated sequence, grown token by token, cut at the first stop string."""

    def __init__(self, tokenizer: Any, prompt_token_ids: list[int], stop: list[str]):
        self._tokenizer = tokenizer
        context = list(prompt_token_ids[-_CONTEXT_TOKENS:])
        self._tokens: list[int] = context
        self._prefix_offset = 0
        self._read_offset = len(context)
        self._prefix_text = self._decode(context)
        self._stop = list(stop)
        self._max_stop_len = max((len(s) for s in stop), default=0)
        self.text = ""

    def _decode(self, ids: list[int]) -> str:
        # No space clean-up: it looks across token boundaries, so it is not incremental.
        return self._tokenizer.decode(
            ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def append(self, token_id: int, check_stop: bool = True) -> str | None:
        """Adds one token; returns the stop string that ended the text, if one did.
        `check_stop` False (before min_tokens) lets stop strings pass."""
        self._tokens.append(token_id)
        return self._emit(final=False, check_stop=check_stop)

    def flush(self) -> str | None:
        """At the end of generation: emit what an incomplete character held back."""
        return self._emit(final=True)

    def _emit(self, final: bool, check_stop: bool = True) -> str | None:
        window_text = self._decode(self._tokens[self._prefix_offset:])
        if not final and (window_text.endswith(_REPLACEMENT_CHAR)
                          or len(window_text) <= len(self._prefix_text)):
            return None  # an incomplete character, or a token with no text yet
        delta = window_text[len(self._prefix_text):]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._tokens)
        self._prefix_text = self._decode(self._tokens[self._prefix_offset:self._read_offset])
        if not delta:
            return None
        old_len = len(self.text)
        self.text += delta
        return self._cut_at_stop(old_len) if check_stop else None

    def _cut_at_stop(self, old_len: int) -> str | None:
        if not self._stop:
            return None
        # A stop string may begin in text emitted earlier and end in the new delta.
        start = max(0, old_len - self._max_stop_len + 1)
        best_at, best = -1, None
        for s in self._stop:
            at = self.text.find(s, start)
            if at != -1 and (best is None or at < best_at):
                best_at, best = at, s
        if best is not None:
            self.text = self.text[:best_at]
        return best

    def visible_text(self, finished: bool) -> str:
        """Text safe to show now: while running, the tail that could still turn out to be
        the start of a stop string is held back so streamed text is never taken back."""
        if finished or self._max_stop_len <= 1:
            return self.text
        return self.text[:max(0, len(self.text) - (self._max_stop_len - 1))]

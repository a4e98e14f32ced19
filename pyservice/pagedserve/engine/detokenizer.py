"""Incremental detokenization with stop strings.

Decoding each new token on its own is wrong twice over: byte-level BPE splits one
multi-byte character over several tokens (each alone decodes to U+FFFD), and
SentencePiece-style tokenizers drop a token's leading space when it is decoded
without its left neighbour. So each step decodes a short window that starts a few
tokens back (`prefix_offset`) and emits only the text past what that window's
older part (`prefix_offset:read_offset`) already produced; while the window ends in
an incomplete character, nothing is emitted and the tokens wait for the next one.

Every step costs O(new text), whatever the length so far: the text is kept as settled
pieces plus a short tail, the last `max stop length - 1` characters, which is all a
stop string found later can reach back into (a cut never takes settled text back).
`take` hands out the text settled since its previous call.
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
        self._held_back = max(0, self._max_stop_len - 1)
        self._pieces: list[str] = []  # settled text: no stop string can cut it
        self._num_taken = 0  # pieces handed out by take()
        self._tail = ""  # the unsettled end of the text, at most _held_back characters

    @property
    def text(self) -> str:
        """Everything so far (O(length): for tests and whole results, not per step)."""
        return "".join(self._pieces) + self._tail

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
        text = self._tail + delta
        hit = None
        if check_stop and self._stop:
            # A stop string may begin in the tail and end in the new delta; the tail is
            # at most max_stop_len - 1 characters, so it cannot lie wholly in the tail.
            hit, text = self._cut_at_stop(text)
        self._settle(text)
        return hit

    def _cut_at_stop(self, text: str) -> tuple[str | None, str]:
        best_at, best = -1, None
        for s in self._stop:
            at = text.find(s)
            if at != -1 and (best is None or at < best_at):
                best_at, best = at, s
        if best is not None:
            text = text[:best_at]
        return best, text

    def _settle(self, text: str) -> None:
        """Everything but the last `_held_back` characters of `text` becomes settled."""
        keep = self._held_back
        if len(text) > keep:
            cut = len(text) - keep
            self._pieces.append(text[:cut])
            text = text[cut:]
        self._tail = text

    def take(self, finished: bool) -> str:
        """The text safe to show that no earlier call returned: while running, the tail
        that could still turn out to be the start of a stop string is held back, so
        streamed text is never taken back. O(returned text)."""
        if finished and self._tail:
            self._pieces.append(self._tail)
            self._tail = ""
        new = self._pieces[self._num_taken:]
        self._num_taken = len(self._pieces)
        return new[0] if len(new) == 1 else "".join(new)

    def visible_text(self, finished: bool) -> str:
        """Text safe to show now: while running, the tail that could still turn out to be
        the start of a stop string is held back so streamed text is never taken back."""
        if finished or self._max_stop_len <= 1:
            return self.text
        return self.text[:max(0, len(self.text) - (self._max_stop_len - 1))]

"""Prompts in, token ids out: the engine's one check of what a prompt may be.

A `PromptTokenizer` owns its own copy of the tokenizer, so the server can tokenize
(and apply chat templates) on a worker thread while the engine thread detokenizes with
the original: a fast tokenizer may refuse to be used from two threads at once.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from pagedserve.errors import InvalidRequestError


@dataclass(frozen=True, slots=True)
class TokenizedPrompt:
    """A prompt already checked and tokenized; `text` is None for token-id prompts."""

    text: str | None
    token_ids: list[int]


class PromptTokenizer:
    def __init__(self, tokenizer: Any, vocab_size: int, max_model_len: int) -> None:
        self.tokenizer = copy.deepcopy(tokenizer) if tokenizer is not None else None
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len

    def __call__(self, prompt: Any) -> TokenizedPrompt:
        """A string, a list of token ids or a list of chat messages; bad input raises
        InvalidRequestError naming the field."""
        field = "prompt"  # how the error names the input, as the gRPC request does
        if isinstance(prompt, TokenizedPrompt):
            result = prompt
        elif isinstance(prompt, str):
            if not prompt:
                raise InvalidRequestError("prompt must not be empty")
            if self.tokenizer is None:
                raise InvalidRequestError("prompt: this model has no tokenizer; give token ids")
            result = TokenizedPrompt(prompt, list(self.tokenizer(prompt)["input_ids"]))
        elif isinstance(prompt, (list, tuple)) and prompt and all(isinstance(m, dict) for m in prompt):
            result = TokenizedPrompt(None, self.apply_chat_template(list(prompt)))
            field = "messages"
        elif not isinstance(prompt, (list, tuple)) or not prompt:
            raise InvalidRequestError("prompt must be a non-empty string, list of token ids "
                                      "or list of chat messages")
        else:
            for i, t in enumerate(prompt):
                if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < self.vocab_size:
                    raise InvalidRequestError(f"prompt_token_ids[{i}] must be a token id in "
                                              f"[0, {self.vocab_size}), got {t!r}")
            result = TokenizedPrompt(None, list(prompt))
            field = "prompt_token_ids"
        if len(result.token_ids) >= self.max_model_len:
            said = "prompt" if field == "prompt" else f"{field}: the prompt"
            raise InvalidRequestError(f"{said} is {len(result.token_ids)} tokens; max_model_len "
                                      f"{self.max_model_len} leaves no room to generate")
        return result

    def apply_chat_template(self, messages: list[dict]) -> list[int]:
        if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
            raise InvalidRequestError("messages: this model has no chat template")
        for i, m in enumerate(messages):
            if not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise InvalidRequestError(f"messages[{i}] must have string 'role' and 'content'")
        text = self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                  add_generation_prompt=True)
        # The template already holds the special tokens; adding BOS again would double it.
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

"""The server's own caps on a request, checked before any work; each error names the
offending field.

The values themselves (ranges, vocabulary, prompt length) are checked once, at the
engine's input (SamplingParams, LLMEngine.add_request: pagedserve.errors). This module
adds only what is the server's policy (caps on message size, prompt bytes, n / beam
width, max_tokens, stop strings and ids, chat messages) and what only the proto can tell
(which oneof is set, a bool set to false).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pagedserve.errors import InvalidRequestError
from pagedserve.v1 import generate_pb2 as pb


class InvalidArgument(InvalidRequestError):
    """A request over one of the server's caps; the message starts with the field's name
    (INVALID_ARGUMENT)."""


# A prompt of max_model_len tokens rarely needs more than a few bytes per token; this
# many bytes per token of max_model_len bounds what is tokenized before its length is
# known (tokenizing a few MB takes seconds).
PROMPT_BYTES_PER_TOKEN = 32


@dataclass(frozen=True)
class Limits:
    """Caps on what one request may ask for, checked before any work is done."""

    max_model_len: int
    max_n: int = 16                          # cap for both n and beam_width
    max_stop_strings: int = 16
    max_stop_string_chars: int = 256         # each stop string is matched every token
    max_stop_token_ids: int = 1024           # beam search ranks width + this many per beam
    max_messages: int = 1024
    max_request_bytes: int = 4 * 1024 * 1024  # the server's max_receive_message_length

    @property
    def max_prompt_bytes(self) -> int:
        """Bytes of prompt text (or of all chat messages' content) accepted."""
        return PROMPT_BYTES_PER_TOKEN * self.max_model_len


def shortest_float32(value: float) -> str:
    """How a client wrote a float32 proto field: 1.0000001, not 1 or 1.00000011920929."""
    return str(np.float32(value))


def validate_request(request: pb.GenerateRequest, limits: Limits) -> None:
    """Raise InvalidArgument for the first problem found."""
    _check_size(request, limits)
    kind = request.WhichOneof("input")
    if kind is None:
        raise InvalidArgument("prompt: one of prompt, prompt_token_ids or messages is required")
    if kind == "prompt":
        _check_prompt_bytes("prompt", len(request.prompt.encode()), limits)
    if kind == "prompt_token_ids" and not request.prompt_token_ids.ids:
        raise InvalidArgument("prompt_token_ids must not be empty")
    if kind == "messages":
        _check_messages(request.messages, limits)
    _check_sampling(request.sampling, limits)


def _check_size(request: pb.GenerateRequest, limits: Limits) -> None:
    # gRPC itself rejects far larger messages (RESOURCE_EXHAUSTED, see app.py); between
    # the two limits the client learns which field made the request too big.
    size = request.ByteSize()
    if size <= limits.max_request_bytes:
        return
    fields = {
        "prompt": len(request.prompt.encode()),
        "prompt_token_ids": request.prompt_token_ids.ByteSize(),
        "messages": request.messages.ByteSize(),
        "sampling.stop": sum(len(s.encode()) for s in request.sampling.stop),
        "sampling.stop_token_ids": 5 * len(request.sampling.stop_token_ids),
        "sampling.constraint": _constraint_bytes(request.sampling),
    }
    field = max(fields, key=fields.__getitem__)
    raise InvalidArgument(
        f"{field} makes the request {size} bytes, above the server's "
        f"max_receive_message_length of {limits.max_request_bytes} bytes")


def _constraint_bytes(sampling: pb.SamplingParams) -> int:
    kind = sampling.WhichOneof("constraint")
    if kind is None or kind == "json_object":
        return 0
    if kind == "choice":
        return sampling.choice.ByteSize()
    return len(getattr(sampling, kind).encode())


def _check_prompt_bytes(field: str, size: int, limits: Limits) -> None:
    if size > limits.max_prompt_bytes:
        raise InvalidArgument(
            f"{field} is {size} bytes; the server accepts at most {limits.max_prompt_bytes} "
            f"({PROMPT_BYTES_PER_TOKEN} bytes per token of max_model_len "
            f"{limits.max_model_len})")


def _check_messages(messages: pb.ChatMessages, limits: Limits) -> None:
    if not messages.messages:
        raise InvalidArgument("messages must not be empty")
    _check_count("messages", "entries", len(messages.messages), limits.max_messages)
    for i, message in enumerate(messages.messages):
        if not message.role:
            raise InvalidArgument(f"messages[{i}].role must not be empty")
    _check_prompt_bytes("messages", sum(len(m.content.encode()) + len(m.role.encode())
                                        for m in messages.messages), limits)


def _check_sampling(sampling: pb.SamplingParams, limits: Limits) -> None:
    for name in ("n", "beam_width"):
        if sampling.HasField(name) and not 1 <= getattr(sampling, name) <= limits.max_n:
            raise InvalidArgument(
                f"sampling.{name} must be in [1, {limits.max_n}], got {getattr(sampling, name)}")
    if sampling.HasField("max_tokens") and not 1 <= sampling.max_tokens <= limits.max_model_len:
        raise InvalidArgument(
            f"sampling.max_tokens must be in [1, {limits.max_model_len}] (max_model_len), "
            f"got {sampling.max_tokens}")
    _check_count("sampling.stop", "strings", len(sampling.stop), limits.max_stop_strings)
    for i, stop in enumerate(sampling.stop):
        _check_count(f"sampling.stop[{i}]", "characters", len(stop), limits.max_stop_string_chars)
    _check_count("sampling.stop_token_ids", "ids", len(sampling.stop_token_ids),
                 limits.max_stop_token_ids)
    if sampling.WhichOneof("constraint") == "json_object" and not sampling.json_object:
        raise InvalidArgument("sampling.json_object must be true when set (false asks for "
                              "no constraint: leave it unset)")


def _check_count(field: str, what: str, count: int, cap: int) -> None:
    if count > cap:
        raise InvalidArgument(f"{field} has {count} {what}, more than the server's cap of {cap}")

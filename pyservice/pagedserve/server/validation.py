"""Request checks that need the server's limits; each error names the offending field.

SamplingParams validates value ranges itself; this module adds what only the server
knows (model length, vocabulary, caps on n / beam width / stop strings / message size)
and what only the proto can tell (a field explicitly set to 0).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pagedserve.v1 import generate_pb2 as pb


class InvalidArgument(ValueError):
    """A bad request; the message starts with the field's name (INVALID_ARGUMENT)."""


@dataclass(frozen=True)
class Limits:
    max_model_len: int
    vocab_size: int
    max_n: int = 16                          # cap for both n and beam_width
    max_stop_strings: int = 16
    max_request_bytes: int = 4 * 1024 * 1024  # the server's max_receive_message_length


def validate_request(request: pb.GenerateRequest, limits: Limits) -> None:
    """Raise InvalidArgument for the first problem found."""
    _check_size(request, limits)
    kind = request.WhichOneof("input")
    if kind is None:
        raise InvalidArgument("prompt: one of prompt, prompt_token_ids or messages is required")
    if kind == "prompt" and not request.prompt:
        raise InvalidArgument("prompt must not be empty")
    if kind == "prompt_token_ids":
        _check_token_ids(list(request.prompt_token_ids.ids), limits)
    if kind == "messages":
        _check_messages(request.messages)
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
    }
    field = max(fields, key=fields.__getitem__)
    raise InvalidArgument(
        f"{field} makes the request {size} bytes, above the server's "
        f"max_receive_message_length of {limits.max_request_bytes} bytes")


def _check_token_ids(ids: list[int], limits: Limits) -> None:
    if not ids:
        raise InvalidArgument("prompt_token_ids must not be empty")
    if len(ids) >= limits.max_model_len:
        raise InvalidArgument(
            f"prompt_token_ids has {len(ids)} tokens; the model allows at most "
            f"{limits.max_model_len - 1} (max_model_len {limits.max_model_len}, "
            "one position left to generate)")
    for i, token in enumerate(ids):
        if token >= limits.vocab_size:
            raise InvalidArgument(
                f"prompt_token_ids[{i}] = {token} is outside the vocabulary "
                f"(valid ids are 0..{limits.vocab_size - 1})")


def _check_messages(messages: pb.ChatMessages) -> None:
    if not messages.messages:
        raise InvalidArgument("messages must not be empty")
    for i, message in enumerate(messages.messages):
        if not message.role:
            raise InvalidArgument(f"messages[{i}].role must not be empty")


def _check_sampling(sampling: pb.SamplingParams, limits: Limits) -> None:
    for name in ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty",
                 "frequency_penalty", "length_penalty"):
        if sampling.HasField(name) and not math.isfinite(getattr(sampling, name)):
            raise InvalidArgument(f"sampling.{name} must be a finite number")
    if sampling.HasField("temperature") and sampling.temperature < 0:
        raise InvalidArgument(f"sampling.temperature must be >= 0, got {sampling.temperature:g}")
    if sampling.HasField("top_p") and not 0 < sampling.top_p <= 1:
        raise InvalidArgument(f"sampling.top_p must be in (0, 1], got {sampling.top_p:g}")
    if sampling.HasField("top_k") and sampling.top_k < -1:
        raise InvalidArgument(f"sampling.top_k must be -1 (off) or >= 1, got {sampling.top_k}")
    for name in ("n", "beam_width"):
        if sampling.HasField(name) and not 1 <= getattr(sampling, name) <= limits.max_n:
            raise InvalidArgument(
                f"sampling.{name} must be in [1, {limits.max_n}], got {getattr(sampling, name)}")
    if sampling.HasField("max_tokens") and not 1 <= sampling.max_tokens <= limits.max_model_len:
        raise InvalidArgument(
            f"sampling.max_tokens must be in [1, {limits.max_model_len}] (max_model_len), "
            f"got {sampling.max_tokens}")
    if len(sampling.stop) > limits.max_stop_strings:
        raise InvalidArgument(
            f"sampling.stop has {len(sampling.stop)} strings, more than the server's cap of "
            f"{limits.max_stop_strings}")
    for i, token in enumerate(sampling.stop_token_ids):
        if token >= limits.vocab_size:
            raise InvalidArgument(
                f"sampling.stop_token_ids[{i}] = {token} is outside the vocabulary "
                f"(valid ids are 0..{limits.vocab_size - 1})")

"""The two kinds of request failure, kept apart end to end.

InvalidRequestError is the caller's mistake: a value out of range, a prompt too long, a
constraint that does not compile. It is raised at the engine's input (SamplingParams,
LLMEngine.add_request, the prompt tokenizer, the constraint compiler) and reaches a gRPC
client as INVALID_ARGUMENT with its message. Any other exception in a request's
processing is the engine's own fault: the request fails with RequestFailedError
(pagedserve.outputs), INTERNAL over gRPC, and the details go to the server log only.
"""

from __future__ import annotations


class InvalidRequestError(ValueError):
    """A request the engine cannot take as given. The message starts with the offending
    field's name; `section` names the part of a request that holds the field
    ("sampling" for SamplingParams' fields), so the gRPC layer can name it as the proto
    does (sampling.top_p) while offline callers see the Python keyword (top_p)."""

    def __init__(self, message: str, section: str | None = None) -> None:
        super().__init__(message)
        self.section = section

    def field_message(self) -> str:
        """The message with the field named by its place in a GenerateRequest."""
        return f"{self.section}.{self}" if self.section else str(self)


def invalid_sampling(message: str) -> InvalidRequestError:
    """A problem with one of SamplingParams' fields."""
    return InvalidRequestError(message, section="sampling")

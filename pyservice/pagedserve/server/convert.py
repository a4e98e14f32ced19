"""Proto <-> domain conversion for the TextGeneration service (no I/O, no engine)."""

from __future__ import annotations

from pagedserve.outputs import CompletionOutput, RequestOutput
from pagedserve.sampling_params import SamplingParams
from pagedserve.server.validation import shortest_float32
from pagedserve.v1 import generate_pb2 as pb

FINISH_REASONS = {
    None: pb.FINISH_REASON_UNSPECIFIED,
    "length": pb.FINISH_REASON_LENGTH,
    "stop": pb.FINISH_REASON_STOP,
    "abort": pb.FINISH_REASON_ABORTED,
}

# Proto fields copied to SamplingParams when set; unset ones keep the documented default.
_SCALARS = ("max_tokens", "min_tokens", "temperature", "top_p", "top_k", "min_p",
            "repetition_penalty", "presence_penalty", "frequency_penalty", "seed", "n",
            "beam_width", "length_penalty", "logprobs", "ignore_eos", "early_stopping")


def to_prompt(request: pb.GenerateRequest) -> str | list[int] | list[dict]:
    kind = request.WhichOneof("input")
    if kind == "prompt_token_ids":
        return list(request.prompt_token_ids.ids)
    if kind == "messages":
        return [{"role": m.role, "content": m.content} for m in request.messages.messages]
    return request.prompt


# float32 on the wire: read back as the decimal the client wrote (1.0000001, not
# 1.0000001192092896), so values and error messages are the client's own.
_FLOATS = frozenset(("temperature", "top_p", "min_p", "repetition_penalty",
                     "presence_penalty", "frequency_penalty", "length_penalty"))


def to_sampling_params(sampling: pb.SamplingParams) -> SamplingParams:
    kwargs: dict = {name: getattr(sampling, name) for name in _SCALARS if sampling.HasField(name)}
    for name in _FLOATS & kwargs.keys():
        kwargs[name] = float(shortest_float32(kwargs[name]))
    kwargs["stop"] = list(sampling.stop)
    kwargs["stop_token_ids"] = list(sampling.stop_token_ids)
    constraint = sampling.WhichOneof("constraint")
    if constraint == "choice":
        kwargs["choice"] = list(sampling.choice.choices)
    elif constraint is not None:
        kwargs[constraint] = getattr(sampling, constraint)
    return SamplingParams(**kwargs)  # the one check of the values (InvalidRequestError)


def to_usage(output: RequestOutput) -> pb.Usage:
    m = output.metrics

    def span_ns(start: float | None, end: float | None) -> int:
        return int(max(0.0, end - start) * 1e9) if start is not None and end is not None else 0

    return pb.Usage(
        prompt_tokens=m.num_prompt_tokens or len(output.prompt_token_ids),
        completion_tokens=sum(c.num_tokens for c in output.outputs),
        cached_prompt_tokens=m.num_cached_tokens,
        preemptions=m.num_preemptions,
        queue_time_ns=span_ns(m.arrival_time, m.first_scheduled_time),
        prefill_time_ns=span_ns(m.first_scheduled_time, m.first_token_time),
        decode_time_ns=span_ns(m.first_token_time, m.finished_time),
    )


def to_logprobs(token_ids: list[int], logprobs: list[dict[int, float]] | None,
                top_k: int | None) -> list[pb.TokenLogprobs]:
    if logprobs is None or top_k is None:
        return []
    result = []
    for token, entries in zip(token_ids, logprobs):
        best = sorted(entries.items(), key=lambda kv: -kv[1])[:top_k]
        result.append(pb.TokenLogprobs(
            token_id=token, logprob=entries.get(token, float("nan")),
            top=[pb.TokenLogprob(token_id=t, logprob=lp) for t, lp in best]))
    return result


def to_completion(c: CompletionOutput, top_k: int | None) -> pb.Completion:
    return pb.Completion(
        index=c.index, text=c.text, token_ids=c.token_ids,
        finish_reason=FINISH_REASONS[c.finish_reason],
        logprobs=to_logprobs(c.token_ids, c.logprobs, top_k),
        cumulative_logprob=c.cumulative_logprob)


def to_response(output: RequestOutput, params: SamplingParams) -> pb.GenerateResponse:
    return pb.GenerateResponse(
        request_id=output.request_id,
        completions=[to_completion(c, params.logprobs) for c in output.outputs],
        usage=to_usage(output))


class StreamDeltas:
    """Turns a DELTA request's outputs (RequestOutputKind.DELTA: each holds only what is
    new) into per-completion stream messages, each as long as its delta.

    Beam search reorders and replaces its hypotheses until the end, so its completions
    are sent whole once the request finishes.
    """

    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        self.done: set[int] = set()

    def update(self, output: RequestOutput) -> list[pb.GenerateStreamResponse]:
        if self.params.beam_width > 1 and not output.finished:
            return []
        messages = []
        for c in output.outputs:
            if c.index in self.done:
                continue
            if not c.token_ids and not c.text and c.finish_reason is None:
                continue
            messages.append(pb.GenerateStreamResponse(
                request_id=output.request_id, index=c.index, text=c.text,
                token_ids=c.token_ids,
                logprobs=to_logprobs(c.token_ids, c.logprobs, self.params.logprobs),
                finish_reason=FINISH_REASONS[c.finish_reason]))
            if c.finish_reason is not None:
                self.done.add(c.index)
        if output.finished:
            if not messages:
                messages.append(pb.GenerateStreamResponse(request_id=output.request_id))
            messages[-1].usage.CopyFrom(to_usage(output))
        return messages

"""Engine spans of one request, built after the fact from its timeline.

Under the RPC's server span:

    text_completion <model>          arrival -> finished; gen_ai.* and pagedserve.* attributes
      queued                         arrival -> admitted (given KV blocks)
      prefill_chunk (one per chunk)  the step that computed the chunk
      decode                         first token -> preemption or end (one per stretch)
      preemption                     preempting step -> swapped back in, or re-admitted
        swap_out / swap_in           the steps that moved the blocks
      finish (one per sequence)      when it ended, with its reason

Attribute names follow the OpenTelemetry GenAI conventions where one exists. Span times
come from the engine's monotonic clock, shifted onto the wall clock once per request.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from opentelemetry import trace
from opentelemetry.trace import SpanKind

from pagedserve.observability.timeline import PhaseEvent

OPERATION = "text_completion"
PROVIDER = "pagedserve"
# Order of records made in the same step: a swap-in precedes the chunk it makes possible.
_RANK = {"preempted": 0, "swapped_out": 1, "admitted": 2, "swapped_in": 3, "prefill_chunk": 4,
         "finished": 5}


def request_attributes(output, params, model: str, reasons: list[str]) -> dict:
    """gen_ai.* (semantic conventions) and pagedserve.* attributes of the request span."""
    m = output.metrics
    attrs = {
        "gen_ai.operation.name": OPERATION,
        "gen_ai.provider.name": PROVIDER,
        "gen_ai.request.model": model,
        "gen_ai.response.model": model,
        "gen_ai.response.id": output.request_id,
        "gen_ai.request.max_tokens": params.max_tokens,
        "gen_ai.request.temperature": float(params.temperature),
        "gen_ai.request.top_p": float(params.top_p),
        "gen_ai.usage.input_tokens": len(output.prompt_token_ids),
        "gen_ai.usage.output_tokens": sum(c.num_tokens for c in output.outputs),
        "gen_ai.usage.cache_read.input_tokens": m.num_cached_tokens,
        "gen_ai.response.finish_reasons": reasons,
        "pagedserve.prefix_cache.hit_tokens": m.num_cached_tokens,
        "pagedserve.preemptions": m.num_preemptions,
    }
    # Optional settings only when set, to keep spans small.
    if params.top_k > 0:
        attrs["gen_ai.request.top_k"] = float(params.top_k)
    if params.frequency_penalty:
        attrs["gen_ai.request.frequency_penalty"] = float(params.frequency_penalty)
    if params.presence_penalty:
        attrs["gen_ai.request.presence_penalty"] = float(params.presence_penalty)
    if params.seed is not None:
        attrs["gen_ai.request.seed"] = params.seed
    if params.stop:
        attrs["gen_ai.request.stop_sequences"] = list(params.stop)
    if params.n != 1:
        attrs["gen_ai.request.choice.count"] = params.n
    return attrs


class _Clock:
    """Engine monotonic seconds -> epoch nanoseconds (offset taken once, so the spans
    of a request keep their exact relative times)."""

    def __init__(self) -> None:
        self.offset_ns = time.time_ns() - time.monotonic_ns()

    def ns(self, t: float) -> int:
        return int(t * 1e9) + self.offset_ns


def emit_request_spans(tracer: trace.Tracer, output, params, model: str,
                       parent: trace.Span | None, end_time: float | None = None) -> None:
    """Record the engine spans of a finished (or abandoned) request.

    `output` is its last RequestOutput; `end_time` (monotonic) closes a request that
    never finished (the RPC was cancelled); its open phases end there, reason "abort".
    """
    m = output.metrics
    clock = _Clock()
    end = m.finished_time if m.finished_time is not None else (
        end_time if end_time is not None else time.monotonic())
    events: Sequence[PhaseEvent] = sorted(getattr(m, "events", ()) or (),
                                          key=lambda e: (e.start, _RANK.get(e.kind, 6)))
    reasons = [c.finish_reason or "abort" for c in output.outputs]
    blocks = sum((e.attrs or {}).get("blocks", 0) for e in events if e.kind == "finished")
    attrs = request_attributes(output, params, model, reasons)
    attrs["pagedserve.kv.blocks_held"] = blocks
    context = trace.set_span_in_context(parent) if parent is not None else None
    root = tracer.start_span(f"{OPERATION} {model}", context=context, kind=SpanKind.INTERNAL,
                             attributes=attrs, start_time=clock.ns(m.arrival_time))
    if m.first_token_time is not None:
        root.add_event("first_token", timestamp=clock.ns(m.first_token_time))
        root.set_attribute("pagedserve.time_to_first_token_s",
                           m.first_token_time - m.arrival_time)
    _Builder(tracer, root, clock, end).build(m, events)
    root.end(end_time=clock.ns(end))


class _Builder:
    """Walks the timeline once, opening and closing decode and preemption spans."""

    def __init__(self, tracer: trace.Tracer, root: trace.Span, clock: _Clock, end: float):
        self.tracer, self.clock, self.end = tracer, clock, end
        self.context = trace.set_span_in_context(root)
        self.decode_start: float | None = None
        self.preemption: trace.Span | None = None
        self.recomputing = False
        self.sampled = False  # a token exists: after a swap-in the request decodes

    def span(self, name: str, start: float, end: float, attrs: dict | None = None,
             parent: trace.Span | None = None) -> trace.Span:
        context = self.context if parent is None else trace.set_span_in_context(parent)
        span = self.tracer.start_span(name, context=context, attributes=attrs,
                                      start_time=self.clock.ns(start))
        span.end(end_time=self.clock.ns(max(start, end)))
        return span

    def build(self, m, events: Sequence[PhaseEvent]) -> None:
        admitted = next((e.start for e in events if e.kind == "admitted"), None)
        if admitted is None:  # never admitted (aborted while queued)
            admitted = m.first_scheduled_time if m.first_scheduled_time is not None else self.end
        self.span("queued", m.arrival_time, admitted)
        for event in events:
            getattr(self, "on_" + event.kind, self.on_unknown)(event)
        # Decoding ends when the last sequence does (the request retires just after).
        finishes = [e.start for e in events if e.kind == "finished"]
        self.stop_decode(max(finishes) if finishes else self.end)
        if self.preemption is not None:
            self.preemption.end(end_time=self.clock.ns(self.end))

    def start_decode(self, t: float) -> None:
        self.sampled = True
        if self.decode_start is None:
            self.decode_start = t

    def stop_decode(self, t: float) -> None:
        if self.decode_start is not None:
            self.span("decode", self.decode_start, t)
            self.decode_start = None

    def resume(self, t: float) -> None:
        if self.preemption is not None:
            self.preemption.end(end_time=self.clock.ns(t))
            self.preemption = None

    def on_admitted(self, e: PhaseEvent) -> None:
        self.resume(e.start)  # back from a recompute preemption
        if (e.attrs or {}).get("uncached", 2) <= 1:
            # All but the last token was in the prefix cache: no prefill, straight to decoding.
            self.start_decode(e.start)

    def on_prefill_chunk(self, e: PhaseEvent) -> None:
        a = e.attrs or {}
        self.span("prefill_chunk", e.start, e.end, {
            "pagedserve.prefill.tokens": a.get("tokens", 0),
            "pagedserve.prefill.start_position": a.get("start", 0),
            "pagedserve.sequence.index": a.get("seq", 0),
            "pagedserve.prefill.recompute": self.recomputing})
        if a.get("sampled"):
            self.recomputing = False
            self.start_decode(e.end)

    def on_preempted(self, e: PhaseEvent) -> None:
        mode = (e.attrs or {}).get("mode", "recompute")
        self.stop_decode(e.start)
        self.resume(e.start)
        self.preemption = self.tracer.start_span(
            "preemption", context=self.context, start_time=self.clock.ns(e.start),
            attributes={"pagedserve.preemption.mode": mode})
        self.recomputing = mode == "recompute"

    def on_swapped_out(self, e: PhaseEvent) -> None:
        self.span("swap_out", e.start, e.end,
                  {"pagedserve.swap.blocks": (e.attrs or {}).get("blocks", 0)}, self.preemption)

    def on_swapped_in(self, e: PhaseEvent) -> None:
        self.span("swap_in", e.start, e.end,
                  {"pagedserve.swap.blocks": (e.attrs or {}).get("blocks", 0)}, self.preemption)
        self.resume(e.end)
        if self.sampled:
            self.start_decode(e.end)

    def on_finished(self, e: PhaseEvent) -> None:
        a = e.attrs or {}
        reason = a.get("reason") or "abort"
        self.span("finish", e.start, e.end, {
            "gen_ai.response.finish_reasons": [reason],
            "pagedserve.finish.reason": reason,
            "pagedserve.sequence.index": a.get("seq", 0),
            "pagedserve.kv.blocks_held": a.get("blocks", 0)})

    def on_unknown(self, e: PhaseEvent) -> None:
        pass  # a kind added to the engine before this module learnt it

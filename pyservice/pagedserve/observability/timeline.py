"""The per-request timeline the engine keeps: one record per phase change.

A request's `RequestMetrics.events` is a list of `PhaseEvent`s appended by the
scheduler in time order. A record is made when the request is admitted (given KV
blocks), when a prompt chunk is computed, when it is preempted, when its blocks move to
or from the swap pool and when one of its sequences finishes; never per decoded token,
so a decode step costs nothing.
Arrival, first scheduling, first token and the end come from RequestMetrics' own
timestamps. `spans.py` turns the whole record into spans once the request is over.

Times are `time.monotonic()` seconds, like RequestMetrics. `step_start` below is the
time `Scheduler.schedule()` began the step (kept on the batch as `scheduled_at`, since
with async scheduling the next step is scheduled before this one's update); `now` is
the time `Scheduler.update()` took after the forward, so [step_start, now] is the step
that did the work.

The scheduler's lines (pagedserve/engine/scheduler.py and request_book.py):

  __init__            self.step_start = 0.0
                      self._step_swaps: list = []        # (group, kind, blocks), this step
  schedule()          first line: self.step_start = time.monotonic(), also the
                      batch's scheduled_at (schedule_ahead() does the same)
  _preempt_by_recompute   group.metrics.events.append(PhaseEvent(
                          "preempted", self.step_start, self.step_start, {"mode": "recompute"}))
  _preempt_by_swap    group.metrics.events.append(PhaseEvent(
                          "preempted", self.step_start, self.step_start, {"mode": "swap"}))
                      self._step_swaps.append((group, "swapped_out", len(mapping)))
  _schedule_swapped   self._step_swaps.append((group, "swapped_in", len(mapping)))
  _allocate, after num_computed_tokens is set (admission, first or after a recompute):
                      group.metrics.events.append(PhaseEvent("admitted", self.step_start,
                          self.step_start, {"seq": seq.index,
                          "uncached": seq.num_tokens - seq.num_computed_tokens}))
  update(), right after `now = time.monotonic()`:
                      for group, kind, blocks in self._step_swaps:
                          group.metrics.events.append(
                              PhaseEvent(kind, batch.scheduled_at, now, {"blocks": blocks}))
                      self._step_swaps.clear()
  update(), in the branch counting prompt tokens (a chunk of a prefill or recompute):
                      group.metrics.events.append(PhaseEvent("prefill_chunk", batch.scheduled_at,
                          now, {"tokens": len(work.token_ids), "start": work.start_pos,
                                "seq": seq.index, "sampled": work.sample}))
  finish_seq()        before bm.free: blocks = len(self.bm.block_table(seq.seq_id))
                      (0 when the sequence held none), then
                      group.metrics.events.append(PhaseEvent("finished", t, t,
                          {"reason": reason, "seq": seq.index, "blocks": blocks}))

and RequestMetrics (outputs.py) gets `events: list[PhaseEvent] = field(default_factory=list)`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

# What each kind's attrs hold:
#   admitted       seq, uncached (tokens left to feed: 1 means no prefill, the rest was
#                  in the prefix cache); start == end == the admitting step's start
#   prefill_chunk  tokens (fed this step), start (position of the first), seq (sample
#                  index), sampled (the chunk reached the end and sampled a token)
#   preempted      mode ("swap" | "recompute"); start == end == the preempting step's start
#   swapped_out    blocks (moved to the swap pool in this step)
#   swapped_in     blocks (moved back to the GPU pool in this step)
#   finished       reason ("stop" | "length" | "abort"), seq, blocks (held when it ended)
KINDS = ("admitted", "prefill_chunk", "preempted", "swapped_out", "swapped_in", "finished")


class PhaseEvent(NamedTuple):
    """One phase change; a tuple so that recording it is one cheap allocation."""

    kind: str
    start: float
    end: float
    attrs: dict[str, Any] | None = None

"""Stop checks, detokenization and RequestOutputs: what the engine makes of new tokens.

One owner for each request's output state: how much of each sequence was already
handed out (tokens, logprobs, text), so a DELTA output costs O(new tokens) whatever
the output's length, and the request's RequestOutputKind.
"""

from __future__ import annotations

from typing import Any

from pagedserve.engine.detokenizer import IncrementalDetokenizer
from pagedserve.engine.sequence import Sequence, SequenceGroup
from pagedserve.outputs import CompletionOutput, RequestOutput, RequestOutputKind

CUMULATIVE, DELTA, FINAL_ONLY = (RequestOutputKind.CUMULATIVE, RequestOutputKind.DELTA,
                                 RequestOutputKind.FINAL_ONLY)


class _SeqState:
    """What one sequence's outputs handed out so far."""

    __slots__ = ("detok", "num_sent", "text")

    def __init__(self, detok: IncrementalDetokenizer | None) -> None:
        self.detok = detok
        self.num_sent = 0  # tokens (and logprobs) in earlier DELTA outputs
        self.text = ""  # CUMULATIVE: the text shown so far


class OutputProcessor:
    def __init__(self, tokenizer: Any, eos_token_ids: frozenset[int], max_model_len: int):
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids
        self.max_model_len = max_model_len
        self._kinds: dict[str, RequestOutputKind] = {}
        self._seqs: dict[int, _SeqState] = {}

    def add(self, request_id: str, kind: RequestOutputKind) -> None:
        if kind is not CUMULATIVE:  # the default takes no entry
            self._kinds[request_id] = kind

    def drop(self, request_id: str) -> None:
        """A request that ended before it reached the scheduler (structured output)."""
        self._kinds.pop(request_id, None)

    def forget(self, group: SequenceGroup) -> None:
        self._kinds.pop(group.request_id, None)
        for seq in group.seqs:
            self._seqs.pop(seq.seq_id, None)

    def _state(self, seq: Sequence) -> _SeqState:
        state = self._seqs.get(seq.seq_id)
        if state is None:
            detok = None
            if self.tokenizer is not None:  # without one, outputs carry ids and no text
                detok = IncrementalDetokenizer(self.tokenizer, seq.prompt_token_ids,
                                               seq.params.stop)
            state = self._seqs[seq.seq_id] = _SeqState(detok)
        return state

    # ---- stop checks -------------------------------------------------------------
    def check_stop(self, seq: Sequence) -> tuple[str, str | int | None] | None:
        """(finish reason, stop reason) when the token just appended ends `seq`."""
        params = seq.params
        token = seq.output_token_ids[-1]
        num_out = len(seq.output_token_ids)
        can_stop = num_out >= params.min_tokens
        reason, stop_reason = None, None
        if can_stop and not params.ignore_eos and token in self.eos_token_ids:
            reason = "stop"  # EOS: in token_ids, not in the text
        elif can_stop and token in params.stop_token_set:
            reason, stop_reason = "stop", token
        elif self.tokenizer is not None:
            hit = self._state(seq).detok.append(token, check_stop=can_stop)
            if hit is not None:
                reason, stop_reason = "stop", hit
        if reason is None and (num_out >= params.max_tokens
                               or len(seq.token_ids) >= self.max_model_len):
            reason = "length"
        if reason is None:
            return None
        if self.tokenizer is not None and (stop_reason is None or isinstance(stop_reason, int)):
            hit = self._state(seq).detok.flush()  # a character cut short shows as U+FFFD
            if hit is not None:
                reason, stop_reason = "stop", hit
        return reason, stop_reason

    # ---- outputs -----------------------------------------------------------------
    def output(self, group: SequenceGroup) -> RequestOutput | None:
        """The request's output of this step in its kind (None: nothing to hand out).
        Lists are new: what a caller keeps from one step does not change under it in
        the next. Arguments are positional (in the fields' order), as keyword ones
        double the cost of a dataclass's __init__."""
        kind = self._kinds.get(group.request_id, CUMULATIVE)
        finished = group.is_finished
        if kind is FINAL_ONLY:
            if not finished:
                return None
            kind = CUMULATIVE
        if group.beam is not None:
            out = self._beam_output(group, kind)
        elif kind is DELTA:
            out = self._output(group, self._delta)
        else:
            out = self._output(group, self._cumulative)
        if finished:
            self.forget(group)
        return out

    def _output(self, group: SequenceGroup, completion: Any) -> RequestOutput:
        return RequestOutput(group.request_id, group.prompt, group.prompt_token_ids,
                             [completion(seq) for seq in group.seqs], group.is_finished,
                             group.metrics)

    def _cumulative(self, seq: Sequence) -> CompletionOutput:
        state = self._state(seq)
        if state.detok is not None:
            state.text += state.detok.take(seq.is_finished)
        tokens = seq.output_token_ids
        return CompletionOutput(
            seq.index, state.text, list(tokens), seq.finish_reason, seq.cumulative_logprob,
            None if seq.logprobs is None else list(seq.logprobs), seq.stop_reason, len(tokens))

    def _delta(self, seq: Sequence) -> CompletionOutput:
        state = self._state(seq)
        text = state.detok.take(seq.is_finished) if state.detok is not None else ""
        tokens, sent = seq.output_token_ids, state.num_sent
        state.num_sent = len(tokens)
        return CompletionOutput(
            seq.index, text, tokens[sent:], seq.finish_reason, seq.cumulative_logprob,
            None if seq.logprobs is None else seq.logprobs[sent:], seq.stop_reason,
            len(tokens))

    def _beam_output(self, group: SequenceGroup, kind: RequestOutputKind) -> RequestOutput:
        """The best `n` hypotheses by score once the search is over; while it runs, the
        live beams best first (CUMULATIVE), or for DELTA no completions: beams reorder
        and get replaced, so their tokens go out whole at the end."""
        completions = []
        if group.is_finished:
            done = group.beam.hypotheses[:group.params.n]
            items = [(h.token_ids, h.cumulative_logprob, h.logprobs, h.finish_reason,
                      h.stop_reason) for h in done]
        elif kind is CUMULATIVE:
            beams = sorted(group.live_seqs(), key=lambda s: -s.cumulative_logprob)
            items = [(s.output_token_ids, s.cumulative_logprob, s.logprobs, None, None)
                     for s in beams[:group.params.n]]
        else:
            items = []
        for index, (tokens, cum, logprobs, reason, stop_reason) in enumerate(items):
            completions.append(CompletionOutput(
                index, self._text(group, tokens, reason), list(tokens), reason, cum,
                list(logprobs) if logprobs is not None else None, stop_reason, len(tokens)))
        return RequestOutput(group.request_id, group.prompt, group.prompt_token_ids,
                             completions, group.is_finished, group.metrics)

    def _text(self, group: SequenceGroup, tokens: list[int], reason: str | None) -> str:
        if self.tokenizer is None:
            return ""
        # The stop token that ended a hypothesis is in its token ids, not in its text.
        if reason == "stop":
            tokens = tokens[:-1]
        detok = IncrementalDetokenizer(self.tokenizer, group.prompt_token_ids, [])
        for token in tokens:
            detok.append(token)
        detok.flush()
        return detok.text

"""Turn the logits of the sequences that sample this step into tokens.

Batched tensor ops over all rows; each feature costs only when some row uses it.
Order per row: penalties on the raw logits (repetition, then frequency/presence),
min_tokens masking of EOS/stop ids, then greedy argmax or: temperature, top-k (ties
with the k-th value kept), top-p on the top-k distribution (the smallest
highest-probability set whose mass reaches p), min-p (probability >= min_p * top
probability), and an exponential race, argmax(p / E) with E ~ Exp(1), which draws from p.

The noise of a row with a seed comes from a generator seeded by (seed, sample_index)
alone, so its tokens do not depend on what else is batched, or on preemption.
Logprobs are those of the raw model distribution, as vLLM reports them. A row with a
structured-output constraint has every token its grammar forbids masked to -inf
(pagedserve.structured.logits; done before the penalties, with which it commutes);
other rows are untouched.

Beam search rows sample nothing: they get their best next tokens by log-softmax, then
the penalties and min_tokens masking (transformers' processed scores, which is what
its beam search ranks); temperature, top-k/p, min-p and seeds do not apply to them.
"""

from __future__ import annotations

import numpy as np
import torch

from pagedserve.engine.batch import SampleResult, SeqWork
from pagedserve.structured.logits import constrain_logits

_GREEDY_BELOW = 1e-5  # temperatures this small are argmax (dividing by them overflows)
_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def noise_seed(seed: int, sample_index: int) -> int:
    """A well-mixed 63-bit generator seed from (request seed, token index)."""
    return _splitmix64(_splitmix64(seed & _MASK64) ^ sample_index) >> 1


class Sampler:
    def __init__(self, device: torch.device | str = "cpu", seed: int = 0):
        self.device = torch.device(device)
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self._seeded = torch.Generator(device=self.device)  # re-seeded per seeded row

    @torch.no_grad()
    def __call__(self, logits: torch.Tensor, works: list[SeqWork]) -> list[SampleResult]:
        """logits: float32 [len(works), vocab] on the sampler's device."""
        assert logits.shape[0] == len(works), "one row of logits per sampling sequence"
        beams = [i for i, w in enumerate(works) if w.params.beam_width > 1]
        if not beams:
            return self.sample(logits, works).results()
        out: list[SampleResult] = [None] * len(works)  # type: ignore[list-item]
        rest = [i for i, w in enumerate(works) if w.params.beam_width == 1]
        if rest:
            for i, r in zip(rest, self.sample(logits[rest], [works[i] for i in rest]).results()):
                out[i] = r
        for i, r in zip(beams, self.beam_candidates(logits[beams], [works[i] for i in beams])):
            out[i] = r
        return out

    def beam_candidates(self, logits: torch.Tensor, works: list[SeqWork]) -> list[SampleResult]:
        """Each row's best next tokens: enough for the beam search to see every
        candidate it may pick (see BeamState.candidates_per_beam), or `logprobs` of
        them when more are asked for."""
        logprobs = torch.log_softmax(logits, dim=-1)
        logprobs = self.mask_min_tokens(self.apply_penalties(logprobs, works), works)
        ks = [max(w.params.beam_width + len(w.eos_token_ids | w.params.stop_token_set),
                  w.params.logprobs or 0) for w in works]
        vals, ids = logprobs.topk(min(max(ks), logprobs.shape[1]), dim=-1)
        vals, ids = vals.tolist(), ids.tolist()
        out = []
        for i, k in enumerate(ks):
            cands = list(zip(ids[i][:k], vals[i][:k]))
            out.append(SampleResult(cands[0][0], cands[0][1], beam_candidates=cands))
        return out

    @torch.no_grad()
    def sample(self, logits: torch.Tensor, works: list[SeqWork]) -> "PendingSamples":
        """Samples the rows (no beam search) on the device without waiting for them:
        the tokens go to the host behind the work already queued, and results()
        waits for them. Meanwhile `tokens` can feed a step queued after this one."""
        raw = logits
        lse = torch.logsumexp(raw, dim=-1)
        # Structured output's rows first: their masks are filled on the host while the
        # device still runs the forward, before anything below waits for it (the
        # penalties' and min_tokens' uploads do). Masking commutes with both (each
        # keeps -inf at -inf), so the order changes no logit.
        if any(w.constraint is not None for w in works):
            logits = constrain_logits(logits, raw, works)
        logits = self.apply_penalties(logits, works)
        logits = self.mask_min_tokens(logits, works)
        temps = [w.params.temperature for w in works]
        if all(t < _GREEDY_BELOW for t in temps):
            tokens = logits.argmax(dim=-1)
        else:
            tokens = self._draw(logits, works, temps)
        chosen = raw.gather(1, tokens[:, None]).squeeze(1) - lse
        ks = [w.params.logprobs for w in works]
        kmax = max((k for k in ks if k is not None), default=0)
        top = None
        if kmax > 0:
            vals, ids = raw.topk(kmax, dim=-1)
            top = (vals - lse[:, None], ids)
        return PendingSamples(ks, tokens, chosen, top)

    def apply_penalties(self, logits: torch.Tensor, works: list[SeqWork]) -> torch.Tensor:
        rows = [i for i, w in enumerate(works)
                if w.params.repetition_penalty != 1.0 or w.params.presence_penalty != 0.0
                or w.params.frequency_penalty != 0.0]
        if not rows:
            return logits
        vocab = logits.shape[1]
        sub = [works[i] for i in rows]
        counts = self._bincount([w.output_token_ids for w in sub], vocab)
        in_prompt = self._bincount([w.prompt_token_ids for w in sub], vocab) > 0
        seen = in_prompt | (counts > 0)
        rep = self._column([w.params.repetition_penalty for w in sub])
        freq = self._column([w.params.frequency_penalty for w in sub])
        pres = self._column([w.params.presence_penalty for w in sub])
        x = logits[rows]
        # Repetition divides positive logits and multiplies negative ones, so a seen
        # token always becomes less likely.
        x = torch.where(seen, torch.where(x > 0, x / rep, x * rep), x)
        x = x - freq * counts - pres * (counts > 0).to(x.dtype)
        logits = logits.clone()
        logits[rows] = x
        return logits

    def _bincount(self, seqs: list[list[int]], vocab: int) -> torch.Tensor:
        """[len(seqs), vocab] float counts of each token id (ids outside vocab ignored)."""
        width = max((len(s) for s in seqs), default=0)
        ids = np.full((len(seqs), max(width, 1)), vocab, dtype=np.int64)  # pad -> extra column
        for r, s in enumerate(seqs):
            ids[r, : len(s)] = s
        ids_t = torch.from_numpy(ids).clamp_(0, vocab).to(self.device)
        counts = torch.zeros(len(seqs), vocab + 1, device=self.device)
        counts.scatter_add_(1, ids_t, torch.ones_like(ids_t, dtype=counts.dtype))
        return counts[:, :vocab]

    def _column(self, values: list[float]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.float32, device=self.device)[:, None]

    def mask_min_tokens(self, logits: torch.Tensor, works: list[SeqWork]) -> torch.Tensor:
        vocab = logits.shape[1]
        rows, cols = [], []
        for i, w in enumerate(works):
            if w.sample_index >= w.params.min_tokens:  # outputs before this token
                continue
            banned = set(w.params.stop_token_set)
            if not w.params.ignore_eos:
                banned |= w.eos_token_ids
            for t in banned:
                if 0 <= t < vocab:
                    rows.append(i)
                    cols.append(t)
        if not rows:
            return logits
        logits = logits.clone()  # the raw logits stay intact for logprobs
        logits[torch.tensor(rows, device=self.device), torch.tensor(cols, device=self.device)] = float("-inf")
        return logits

    def _draw(self, logits: torch.Tensor, works: list[SeqWork], temps: list[float]) -> torch.Tensor:
        greedy = torch.tensor([t < _GREEDY_BELOW for t in temps], device=self.device)
        probs = self.probabilities(logits, works)
        sampled = (probs / self._noise(works, probs.shape[1])).argmax(dim=-1)
        return torch.where(greedy, logits.argmax(dim=-1), sampled)

    def probabilities(self, logits: torch.Tensor, works: list[SeqWork]) -> torch.Tensor:
        """The distribution each non-greedy row draws from: temperature, top-k, top-p,
        min-p (masked tokens get probability 0, the rest are not renormalised: the
        exponential race does not need it)."""
        temps = [w.params.temperature for w in works]
        x = logits / self._column([t if t >= _GREEDY_BELOW else 1.0 for t in temps])
        probs = self._top_k_top_p(x, works).softmax(dim=-1)
        min_p = [w.params.min_p for w in works]
        if any(m > 0.0 for m in min_p):
            threshold = self._column(min_p) * probs.max(dim=-1, keepdim=True).values
            probs = probs.masked_fill(probs < threshold, 0.0)
        return probs

    def _top_k_top_p(self, x: torch.Tensor, works: list[SeqWork]) -> torch.Tensor:
        """Masks x (a temperature-scaled copy, modified in place) to -inf outside each
        row's top-k / top-p set."""
        vocab = x.shape[1]
        top_k = [w.params.top_k if 0 < w.params.top_k < vocab else vocab for w in works]
        top_p = [w.params.top_p for w in works]
        rows = [i for i in range(len(works)) if top_k[i] < vocab or top_p[i] < 1.0]
        if not rows:
            return x
        # Sorting the vocabulary is the costly part: only for the rows that filter.
        sorted_x, order = x[rows].sort(dim=-1, descending=True)
        k = torch.tensor([top_k[i] for i in rows], device=self.device)[:, None]
        kth = sorted_x.gather(1, k - 1)
        sorted_x = sorted_x.masked_fill(sorted_x < kth, float("-inf"))
        p = [top_p[i] for i in rows]
        if any(v < 1.0 for v in p):
            probs = sorted_x.softmax(dim=-1)
            mass_before = probs.cumsum(dim=-1) - probs
            # Keep a token while the mass above it is short of p; the first always stays.
            drop = mass_before >= self._column(p)
            drop[:, 0] = False
            sorted_x = sorted_x.masked_fill(drop, float("-inf"))
        x[rows] = torch.empty_like(sorted_x).scatter_(1, order, sorted_x)
        return x

    def _noise(self, works: list[SeqWork], vocab: int) -> torch.Tensor:
        noise = torch.empty(len(works), vocab, device=self.device)
        noise.exponential_(generator=self.generator)
        for i, w in enumerate(works):
            if w.params.seed is not None:
                self._seeded.manual_seed(noise_seed(w.params.seed, w.sample_index))
                noise[i].exponential_(generator=self._seeded)
        # Exp(1) draws are positive in theory; guard the division against a rounded zero.
        return noise.clamp_min_(1e-20)


class PendingSamples:
    """One step's sampled tokens (and logprobs) on their way to the host. On CUDA the
    copies into pinned memory are queued behind the step and an event marks their end,
    so the host can queue the next step before it waits here."""

    def __init__(self, logprobs_k: list[int | None], tokens: torch.Tensor, chosen: torch.Tensor,
                 top: tuple[torch.Tensor, torch.Tensor] | None):
        self.tokens = tokens  # int64 [rows] on the device
        self._k = logprobs_k
        parts = [tokens, chosen] + (list(top) if top is not None else [])
        self._event = None
        if tokens.is_cuda:
            parts = [self._to_host(t) for t in parts]
            self._event = torch.cuda.Event()
            self._event.record()
        self._parts = parts
        self._results: list[SampleResult] | None = None

    @staticmethod
    def _to_host(t: torch.Tensor) -> torch.Tensor:
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        host.copy_(t, non_blocking=True)
        return host

    def results(self) -> list[SampleResult]:
        """Waits for the tokens (once) and returns one SampleResult per row."""
        if self._results is None:
            if self._event is not None:
                self._event.synchronize()
            tokens, chosen = self._parts[0].tolist(), self._parts[1].tolist()
            top_vals = self._parts[2].tolist() if len(self._parts) > 2 else None
            top_ids = self._parts[3].tolist() if len(self._parts) > 2 else None
            out = []
            for i, k in enumerate(self._k):
                top_i = None
                if k is not None:
                    top_i = dict(zip(top_ids[i][:k], top_vals[i][:k])) if k > 0 else {}
                    top_i[tokens[i]] = chosen[i]
                out.append(SampleResult(tokens[i], chosen[i], top_i))
            self._results = out
            self._parts = []
        return self._results

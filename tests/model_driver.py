"""Drives a ModelRunner without the scheduler, for model tests on CPU and GPU."""

from pagedserve.engine.batch import ScheduledBatch, SeqWork
from pagedserve.runner.model_runner import ModelRunner
from pagedserve.sampling_params import SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=64)


class Driver:
    """A minimal stand-in for the scheduler: FCFS, fixed prompt chunk sizes, a
    free-running block counter (so each sequence's blocks interleave with others')."""

    def __init__(self, runner: ModelRunner):
        self.runner = runner
        self.bs = runner.block_size
        self.next_block = 0
        self.tables: dict[int, list[int]] = {}

    def _table(self, seq_id: int, num_tokens: int) -> list[int]:
        table = self.tables.setdefault(seq_id, [])
        while len(table) * self.bs < num_tokens:
            table.append(self.next_block)
            self.next_block += 1
        return list(table)

    def generate(self, prompts: list[list[int]], max_new: int, chunk: dict[int, int] | None = None,
                 delay: dict[int, int] | None = None, params=GREEDY,
                 force: list[list[int]] | None = None) -> list[list[int]]:
        """Greedy (or `params`) continuations of `max_new` tokens; `chunk[i]` prefills
        prompt i that many tokens per step, `delay[i]` starts it at that step. With
        `force`, sequence i is fed force[i] (teacher forcing) while the sampled tokens
        are still what is returned."""
        chunk, delay = chunk or {}, delay or {}
        outs: list[list[int]] = [[] for _ in prompts]
        fed_back = outs if force is None else force
        fed = [0] * len(prompts)
        step = 0
        while any(len(o) < max_new for o in outs):
            work = []
            for i, p in enumerate(prompts):
                if step < delay.get(i, 0) or len(outs[i]) >= max_new:
                    continue
                if fed[i] < len(p):  # (rest of the) prompt, maybe one chunk of it
                    n = min(chunk.get(i, len(p)), len(p) - fed[i])
                    toks, start = p[fed[i]:fed[i] + n], fed[i]
                else:
                    toks, start = [fed_back[i][len(outs[i]) - 1]], len(p) + len(outs[i]) - 1
                fed[i] = max(fed[i], start + len(toks))
                work.append(SeqWork(i, toks, start, self._table(i, start + len(toks)),
                                    start + len(toks) >= len(p), params, p,
                                    list(fed_back[i][:len(outs[i])]),
                                    len(outs[i]), frozenset()))
            for w, r in zip(work, self.runner.execute(ScheduledBatch(work))):
                assert (r is None) == (not w.sample)
                if r is not None:
                    outs[w.seq_id].append(r.token_id)
            step += 1
        return outs

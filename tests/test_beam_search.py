"""Beam search: the scheduler's beams against a plain reference search on a toy model,
with every KV block checked (oracle runner), then the engine against transformers'
beam search on the embedded SmolLM2 (CPU, fp32).
"""

from __future__ import annotations

import math
import random

import pytest
import torch

from pagedserve._native import BlockManager
from pagedserve.engine.batch import SampleResult, ScheduledBatch
from pagedserve.engine.scheduler import Scheduler
from pagedserve.sampling_params import SamplingParams
from kv_shadow import OracleRunner

BS = 4
VOCAB = 12
EOS = 0


def toy_logprobs(context: list[int]) -> list[float]:
    """A made-up language model: log-probabilities over VOCAB tokens, a pure function of
    the context. EOS is unlikely, so searches run a while and also end by it."""
    rng = random.Random(hash(tuple(context)))
    logits = [rng.gauss(0.0, 2.0) for _ in range(VOCAB)]
    logits[EOS] -= 2.5
    top = max(logits)
    lse = top + math.log(sum(math.exp(x - top) for x in logits))
    return [x - lse for x in logits]


class BeamOracle(OracleRunner):
    """The oracle runner (checks every sequence reads back exactly its own tokens through
    its block table) answering beam rows with their best next tokens."""

    def execute(self, batch: ScheduledBatch) -> list[SampleResult | None]:
        results = super().execute(batch)
        for i, w in enumerate(batch.work):
            if w.sample and w.params.beam_width > 1:
                lp = toy_logprobs(w.prompt_token_ids + w.output_token_ids)
                order = sorted(range(VOCAB), key=lambda t: -lp[t])
                k = w.params.beam_width + len(w.eos_token_ids | set(w.params.stop_token_ids))
                cands = [(t, lp[t]) for t in order[:k]]
                results[i] = SampleResult(cands[0][0], cands[0][1], beam_candidates=cands)
        return results


def reference_beam_search(prompt, width, max_tokens, length_penalty, early_stopping):
    """transformers' rules over the whole vocabulary, without any KV cache: returns
    (tokens, cumulative logprob, score) best first."""
    running: list[tuple[float, list[int]]] = [(0.0, [])]
    finished: list[tuple[float, list[int], float]] = []
    for gen in range(1, max_tokens + 1):
        cands = sorted(((cum + lp, b, t) for b, (cum, toks) in enumerate(running)
                        for t, lp in enumerate(toy_logprobs(prompt + toks))),
                       key=lambda c: -c[0])
        new = []
        for rank, (cum, b, t) in enumerate(cands):
            if t == EOS or gen == max_tokens:
                if rank < width:
                    finished.append((cum / gen ** length_penalty, running[b][1] + [t], cum))
                    finished.sort(key=lambda f: -f[0])
                    finished = finished[:width]
            elif len(new) < width:
                new.append((cum, running[b][1] + [t]))
        if not new or (len(finished) == width and (
                early_stopping or new[0][0] / gen ** length_penalty <= finished[-1][0])):
            break
        running = new
    return [(toks, cum, score) for score, toks, cum in finished]


def make(num_gpu=64, num_cpu=64, mode="auto", seqs=32):
    bm = BlockManager(num_gpu, num_cpu, BS, enable_prefix_caching=False, watermark=0.0)
    sched = Scheduler(bm, max_num_seqs=seqs, max_num_batched_tokens=64, max_model_len=256,
                      preemption_mode=mode, eos_token_ids=frozenset({EOS}))
    return sched, BeamOracle(bm)


def beams_params(**kw):
    return SamplingParams(**{"temperature": 0.0, "max_tokens": 10, **kw})


def step(sched, runner):
    batch = sched.schedule()
    sched.update(batch, runner.execute(batch))
    sched.bm.check_invariants()
    return batch


def check_sharing(sched):
    """Every block's reference count is the number of live beams whose table holds it,
    so blocks in use are exactly the distinct blocks of the beams."""
    holders: dict[int, int] = {}
    for seq_id in sched.bm.seq_ids():
        if sched.bm.device_of(seq_id) == "gpu":
            for b in sched.bm.block_table(seq_id):
                holders[b] = holders.get(b, 0) + 1
    for b in range(sched.bm.num_gpu_blocks):
        assert sched.bm.ref_count(b) == holders.get(b, 0), f"block {b}"
    return len(holders)


def run(sched, runner, max_steps=500):
    for _ in range(max_steps):
        if not sched.has_unfinished_requests():
            return
        step(sched, runner)
        check_sharing(sched)
    raise AssertionError("requests left after max_steps")


CASES = [  # prompt, width, max_tokens, length_penalty, early_stopping, n
    ([1, 2, 3], 2, 10, 1.0, False, 2),
    ([4, 5, 6, 7, 8], 3, 12, 1.0, True, 1),
    ([9, 3], 4, 9, 0.0, False, 4),
    ([2, 2, 2, 2, 2, 2, 2], 4, 14, 2.0, False, 3),
    ([7], 5, 11, -0.5, True, 2),
]


def test_beams_match_the_reference_search_and_share_every_common_block():
    sched, runner = make()
    groups = [sched.add_request(str(i), None, p, beams_params(
                  beam_width=w, max_tokens=m, length_penalty=lp, early_stopping=es, n=n))
              for i, (p, w, m, lp, es, n) in enumerate(CASES)]
    step(sched, runner)  # one prefill per request, then its first beams forked from it
    assert len(sched.bm.seq_ids()) == sum(w for _, w, _, _, _, _ in CASES)
    forked = False
    while sched.has_unfinished_requests():
        step(sched, runner)
        in_use = sched.bm.num_gpu_blocks - sched.bm.num_free_gpu_blocks
        assert in_use == check_sharing(sched)
        private = sum(-(-sched.bm.num_tokens(s) // BS) for s in sched.bm.seq_ids())
        forked |= in_use < private
    assert forked, "beams never shared a block"
    # Beams stay `width` strong, so a fork after the first step means a beam was freed.
    first_forks = sum(w - 1 for _, w, _, _, _, _ in CASES)
    assert next(sched._seq_ids) > len(CASES) + first_forks
    for g, (p, w, m, lp, es, n) in zip(groups, CASES):
        ref = reference_beam_search(p, w, m, lp, es)
        got = [(h.token_ids, h.cumulative_logprob, h.score) for h in g.beam.hypotheses]
        assert [t for t, _, _ in got] == [t for t, _, _ in ref], g.request_id
        for (_, cum, score), (_, rcum, rscore) in zip(got, ref):
            assert cum == pytest.approx(rcum, abs=1e-9) and score == pytest.approx(rscore)
        assert g.is_finished
    assert sched.bm.seq_ids() == [] and sched.bm.num_free_gpu_blocks == 64
    assert all(sched.bm.ref_count(b) == 0 for b in range(64))


def test_a_chosen_beam_is_forked_and_a_losing_one_freed():
    sched, runner = make()
    g = sched.add_request("a", None, [1, 2, 3, 4, 5, 6], beams_params(beam_width=3))
    step(sched, runner)  # prefill of 6 tokens: blocks [0, 1], the second one half full
    assert sched.bm.block_table(0) == [0, 1]
    # The search forked sequence 0 twice: three beams on the same two blocks.
    assert [s.seq_id for s in g.seqs] == [0, 1, 2]
    assert [sched.bm.ref_count(b) for b in (0, 1)] == [3, 3]
    batch = step(sched, runner)
    # Each beam writes its token into the shared half-full block: two copies, and the
    # last holder writes in place.
    assert len(batch.copies) == 2 and all(src == 1 for src, _ in batch.copies)
    # The block manager holds exactly the live beams: losers were freed at once, the
    # first block stays shared by all three.
    assert sorted(sched.bm.seq_ids()) == sorted(s.seq_id for s in g.seqs)
    assert len(g.seqs) == 3 and sched.bm.ref_count(0) == 3
    run(sched, runner)
    assert sched.bm.num_free_gpu_blocks == 64


@pytest.mark.parametrize("mode", ["swap", "recompute"])
def test_preemption_leaves_beam_results_unchanged(mode):
    ref, ref_runner = make()
    small, small_runner = make(num_gpu=20, mode=mode)
    for sched in (ref, small):
        for i, (p, w, m, lp, es, n) in enumerate(CASES[:4]):
            sched.add_request(str(i), None, p, beams_params(
                beam_width=w, max_tokens=m, length_penalty=lp, early_stopping=es, n=n))
    groups = [list(s._groups.values()) for s in (ref, small)]
    run(ref, ref_runner)
    run(small, small_runner)
    assert sum(small.num_preemptions.values()) > 0
    for a, b in zip(*groups):
        assert [h.token_ids for h in a.beam.hypotheses] == [h.token_ids for h in b.beam.hypotheses]
    assert small.bm.num_free_gpu_blocks == 20 and small.bm.num_free_cpu_blocks == 64


def test_beam_search_settings_are_checked():
    with pytest.raises(ValueError, match="^n must be <= beam_width"):
        SamplingParams(beam_width=2, n=3)
    with pytest.raises(ValueError, match="^stop strings are not supported with beam search"):
        SamplingParams(beam_width=2, stop=["."])
    with pytest.raises(ValueError, match="^beam_width must be >= 1"):
        SamplingParams(beam_width=0)


# ---- against transformers on SmolLM2 --------------------------------------------------

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time,",
    "1, 2, 3, 4, 5,",
    "The quick brown fox",
    "Water boils at",
    "Translate to French: Good morning",
    "List three colors:",
    "In 1969, humans first",
    "A haiku about autumn:",
    "The derivative of x^2 is",
    "Q: What is the largest planet?\nA:",
]
# (beam_width, length_penalty, early_stopping, n) per prompt, cycling.
SETTINGS = [(2, 1.0, False, 2), (3, 1.0, True, 1), (4, 0.5, False, 3), (3, 2.0, False, 3),
            (2, -1.0, True, 2), (4, 1.0, False, 4)]
NEW_TOKENS = 16


@pytest.fixture(scope="module")
def smol():
    from pagedserve import LLM

    return LLM(device="cpu", dtype="float32", block_size=8, num_kv_blocks=512,
               swap_space_gb=0.01, max_num_batched_tokens=512)


def test_beam_search_matches_transformers(smol):
    from transformers import AutoModelForCausalLM

    engine = smol.engine
    params = [SamplingParams(beam_width=w, length_penalty=lp, early_stopping=es, n=n,
                             max_tokens=NEW_TOKENS)
              for (w, lp, es, n) in (SETTINGS * 2)[:len(PROMPTS)]]
    outs = smol.generate(PROMPTS, params, use_tqdm=False)
    bm = engine.block_manager
    assert bm.seq_ids() == [] and bm.num_free_gpu_blocks == bm.num_gpu_blocks
    assert all(bm.ref_count(b) == 0 for b in range(bm.num_gpu_blocks))

    source = engine.runner.source
    hf = AutoModelForCausalLM.from_pretrained(source.directory, **source.hf_kwargs(),
                                              dtype=torch.float32).eval()
    eos = sorted(engine.eos_token_ids)
    for out, p in zip(outs, params):
        ids = torch.tensor([out.prompt_token_ids])
        with torch.no_grad():
            ref = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                              num_beams=p.beam_width, num_return_sequences=p.n,
                              length_penalty=p.length_penalty, early_stopping=p.early_stopping,
                              max_new_tokens=NEW_TOKENS, eos_token_id=eos, pad_token_id=eos[0],
                              return_dict_in_generate=True, output_scores=True)
        expected = []
        for row in ref.sequences[:, ids.shape[1]:].tolist():
            cut = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
            expected.append(row[:cut])  # transformers pads the shorter ones after EOS
        got = [c.token_ids for c in out.outputs]
        assert got == expected, (out.prompt, p)
        scores = [c.cumulative_logprob / len(c.token_ids) ** p.length_penalty
                  for c in out.outputs]
        assert scores == sorted(scores, reverse=True)
        assert scores == pytest.approx(ref.sequences_scores.tolist(), abs=2e-3)
        tok = smol.tokenizer
        for c in out.outputs:
            assert c.finish_reason == ("stop" if c.token_ids[-1] in eos else "length")
            text_ids = [t for t in c.token_ids if t not in eos]
            assert c.text == tok.decode(text_ids, skip_special_tokens=True)


def test_a_stream_gets_beam_results_whole_at_the_end():
    from pagedserve.outputs import CompletionOutput, RequestOutput
    from pagedserve.server.convert import StreamDeltas

    deltas = StreamDeltas(SamplingParams(beam_width=2, n=2))
    # While the search runs, the best beams change and may be replaced: nothing is sent.
    running = RequestOutput("r", None, [1], [CompletionOutput(0, "a", [5])], finished=False)
    assert deltas.update(running) == []
    final = RequestOutput("r", None, [1], [
        CompletionOutput(0, "xy", [7, 8], "stop", -1.5),
        CompletionOutput(1, "z", [9], "length", -2.0)], finished=True)
    messages = deltas.update(final)
    assert [(m.index, list(m.token_ids), m.text) for m in messages] == \
        [(0, [7, 8], "xy"), (1, [9], "z")]
    assert messages[-1].usage.completion_tokens == 3


def test_a_beam_step_is_data_the_scheduler_applies():
    """beam_search.step decides (which beams continue, which fork, which are dropped)
    and touches no sequence and no block; the scheduler applies it."""
    from pagedserve.engine import beam_search
    from pagedserve.engine.sequence import SequenceGroup

    params = SamplingParams(beam_width=2, max_tokens=8)
    group = SequenceGroup("r", None, [1, 2, 3], params, first_seq_id=0, arrival_index=0)
    group.beam = beam_search.BeamState(params, frozenset({EOS}))
    first = group.seqs[0]
    second = first.fork(1, 1)
    group.seqs.append(second)
    # Both continuations of beam 0 beat anything beam 1 offers: beam 0 forks, 1 drops.
    first.beam_candidates = [(5, -0.1), (6, -0.2), (EOS, -9.0)]
    second.beam_candidates = [(7, -3.0), (8, -4.0), (EOS, -9.0)]
    step = beam_search.step(group, max_model_len=64)
    assert [(c.parent, c.token_id) for c in step.chosen] == [(0, 5), (0, 6)]
    assert step.forks == [False, True]
    assert step.dropped == [second] and not step.done
    assert first.output_token_ids == [] and group.seqs == [first, second]  # nothing applied
    child = first.fork(2, 1)
    beam_search.commit(group, step, [first, child])
    assert group.seqs == [first, child]
    assert (first.output_token_ids, child.output_token_ids) == ([5], [6])
    assert first.beam_candidates is None and second.beam_candidates is None

"""Sampler: exact masks, penalty arithmetic, min_tokens, logprobs, seeded draws."""

import math

import pytest
import torch

from pagedserve.engine.batch import SeqWork
from pagedserve.runner.sampler import Sampler, noise_seed
from pagedserve.sampling_params import SamplingParams

NEG = float("-inf")


def work(seq_id=0, prompt=(), output=(), eos=(), **params) -> SeqWork:
    return SeqWork(seq_id=seq_id, token_ids=[0], start_pos=0, block_table=[0], sample=True,
                   params=SamplingParams(**params), prompt_token_ids=list(prompt),
                   output_token_ids=list(output), sample_index=len(output),
                   eos_token_ids=frozenset(eos))


def logits_of(*rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


def kept(probs_row: torch.Tensor) -> list[int]:
    return torch.nonzero(probs_row > 0).flatten().tolist()


def test_greedy_is_argmax_first_index_on_ties():
    s = Sampler()
    out = s(logits_of([0.0, 3.0, 3.0, 1.0], [5.0, -1.0, 0.0, 0.0]),
            [work(temperature=0.0), work(temperature=0.0)])
    assert [r.token_id for r in out] == [1, 0]


def test_top_k_keeps_ties_with_the_kth_value():
    s = Sampler()
    probs = s.probabilities(logits_of([3.0, 2.0, 2.0, 1.0, 0.0]), [work(top_k=2)])
    assert kept(probs[0]) == [0, 1, 2]
    # The kept tokens keep their softmax ratios.
    assert probs[0, 1] / probs[0, 0] == pytest.approx(math.exp(-1.0), rel=1e-6)


def test_top_p_keeps_smallest_set_reaching_p():
    s = Sampler()
    row = torch.log(torch.tensor([[0.1, 0.4, 0.2, 0.3]]))
    assert kept(s.probabilities(row, [work(top_p=0.65)])[0]) == [1, 3]
    assert kept(s.probabilities(row, [work(top_p=0.75)])[0]) == [1, 2, 3]
    # The top token always stays, even when it alone exceeds p.
    assert kept(s.probabilities(row, [work(top_p=0.01)])[0]) == [1]


def test_top_p_applies_to_the_top_k_distribution():
    s = Sampler()
    # After top-k=2 the pair (0.5, 0.3) renormalises to (0.625, 0.375): p=0.6 keeps only
    # the first token, though 0.5 alone is short of 0.6 in the full distribution.
    row = torch.log(torch.tensor([[0.5, 0.3, 0.2]]))
    assert kept(s.probabilities(row, [work(top_p=0.6)])[0]) == [0, 1]
    assert kept(s.probabilities(row, [work(top_k=2, top_p=0.6)])[0]) == [0]


def test_min_p_is_relative_to_the_top_probability():
    s = Sampler()
    row = torch.log(torch.tensor([[0.05, 0.5, 0.3, 0.15]]))
    assert kept(s.probabilities(row, [work(min_p=0.2)])[0]) == [1, 2, 3]  # >= 0.1
    assert kept(s.probabilities(row, [work(min_p=0.65)])[0]) == [1]  # >= 0.325


def test_temperature_scales_logits():
    s = Sampler()
    probs = s.probabilities(logits_of([2.0, 0.0]), [work(temperature=2.0)])
    assert probs[0].tolist() == pytest.approx([1 / (1 + math.exp(-1)), 1 / (1 + math.exp(1))])


def test_rows_are_filtered_independently():
    s = Sampler()
    row = [3.0, 2.0, 1.0, 0.0]
    probs = s.probabilities(logits_of(row, row, row), [work(top_k=1), work(), work(top_k=3)])
    assert [kept(p) for p in probs] == [[0], [0, 1, 2, 3], [0, 1, 2]]


def test_penalty_arithmetic():
    s = Sampler()
    raw = logits_of([2.0, -2.0, 1.0, 0.5, 4.0], [2.0, -2.0, 1.0, 0.5, 4.0])
    works = [work(prompt=[0], output=[1, 1, 3], repetition_penalty=2.0,
                  frequency_penalty=0.5, presence_penalty=0.25),
             work(prompt=[0], output=[1])]  # no penalties: row untouched
    out = s.apply_penalties(raw, works)
    # token 0 in prompt: 2/2; token 1 twice in output: -2*2 - 2*0.5 - 0.25;
    # token 3 once in output: 0.5/2 - 0.5 - 0.25; tokens 2, 4 unseen.
    assert out[0].tolist() == pytest.approx([1.0, -5.25, 1.0, -0.5, 4.0])
    assert out[1].tolist() == raw[1].tolist()
    assert raw[0].tolist() == [2.0, -2.0, 1.0, 0.5, 4.0]  # raw logits untouched


def test_presence_and_frequency_ignore_the_prompt():
    s = Sampler()
    out = s.apply_penalties(logits_of([1.0, 1.0, 1.0]),
                            [work(prompt=[0, 0], output=[2], presence_penalty=1.0,
                                  frequency_penalty=1.0)])
    assert out[0].tolist() == [1.0, 1.0, -1.0]


def test_min_tokens_masks_eos_and_stop_ids_until_reached():
    s = Sampler()
    row = [0.0, 1.0, 5.0, 4.0, 3.0]  # greedy would pick eos (2), then stop id 3
    early = work(output=[1], eos=[2], temperature=0.0, min_tokens=2, stop_token_ids=[3])
    done = work(output=[1, 1], eos=[2], temperature=0.0, min_tokens=2, stop_token_ids=[3])
    no_eos = work(output=[1], eos=[2], temperature=0.0, min_tokens=2, ignore_eos=True)
    out = s(logits_of(row, row, row), [early, done, no_eos])
    assert [r.token_id for r in out] == [4, 2, 2]


def test_logprobs_are_raw_model_logprobs():
    s = Sampler()
    raw = logits_of([1.0, 3.0, 2.0, 0.0])
    lsm = torch.log_softmax(raw[0], -1).tolist()
    # The penalty makes token 2 win, but the reported logprobs are the model's.
    (r,) = s(raw, [work(output=[1], temperature=0.0, repetition_penalty=10.0, logprobs=2)])
    assert r.token_id == 2
    assert r.logprob == pytest.approx(lsm[2])
    assert r.top_logprobs == pytest.approx({1: lsm[1], 2: lsm[2]})
    (r,) = s(raw, [work(temperature=0.0, logprobs=0)])
    assert r.top_logprobs == pytest.approx({1: lsm[1]})  # the sampled token only
    (r,) = s(raw, [work(temperature=0.0)])
    assert r.top_logprobs is None


def test_seeded_sampling_ignores_batch_composition():
    vocab = 1000
    torch.manual_seed(0)
    base = torch.randn(vocab)
    mine = [work(seq_id=7, output=[1] * i, seed=1234, temperature=1.0) for i in range(4)]

    def draw(batch_size, position, sampler_seed):
        s = Sampler(seed=sampler_seed)
        tokens = []
        for w in mine:
            rows = [torch.randn(vocab) for _ in range(batch_size)]
            works = [work(temperature=1.0, top_p=0.9) for _ in range(batch_size)]
            rows.insert(position, base)
            works.insert(position, w)
            tokens.append(s(torch.stack(rows), works)[position].token_id)
        return tokens

    alone = draw(0, 0, 0)
    assert draw(5, 3, 1) == alone
    assert draw(2, 0, 2) == alone
    assert len(set(alone)) > 1  # sample_index moves the noise on


def test_seeded_draws_follow_the_distribution():
    s = Sampler()
    probs = [0.5, 0.3, 0.15, 0.05]
    row = torch.log(torch.tensor(probs))
    n = 4000
    counts = [0] * 4
    logits = row.expand(n, 4).contiguous()
    works = [SeqWork(0, [0], 0, [0], True, SamplingParams(seed=99), [], [], i, frozenset())
             for i in range(n)]
    for r in s(logits, works):
        counts[r.token_id] += 1
    for c, p in zip(counts, probs):
        assert abs(c / n - p) < 4 * math.sqrt(p * (1 - p) / n)


def test_unseeded_sampling_is_reproducible_from_the_engine_seed():
    row = torch.randn(3, 50)
    works = [work(temperature=1.0) for _ in range(3)]
    a = [r.token_id for r in Sampler(seed=5)(row, works)]
    assert a == [r.token_id for r in Sampler(seed=5)(row, works)]


def test_noise_seed_mixes_both_inputs():
    seeds = {noise_seed(s, i) for s in range(50) for i in range(50)}
    assert len(seeds) == 2500
    assert all(0 <= x < 2 ** 63 for x in seeds)


def test_masked_tokens_are_never_sampled():
    s = Sampler(seed=3)
    row = torch.zeros(64, 10)
    row[:, 0] = 5.0
    row[:, 1] = 4.0
    out = s(row, [work(temperature=1.5, top_k=2) for _ in range(64)])
    assert {r.token_id for r in out} == {0, 1}
    out = s(row, [work(temperature=1.0, min_p=0.5) for _ in range(64)])
    assert {r.token_id for r in out} == {0}

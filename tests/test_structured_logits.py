"""The sampler's constraint hook (structured.logits.constrain_logits) on a small vocabulary,
no model: each constrained row keeps exactly the tokens its grammar accepts next (the
oracle asks a matcher about every token, one by one), the other rows keep their logits
bit for bit, a row whose grammar allows everything is not masked, and the bitmask reused
from step to step never leaks an earlier step's rows."""

from __future__ import annotations

import itertools
import json

import pytest
import torch

from pagedserve.engine.batch import SeqWork
from pagedserve.runner.sampler import Sampler
from pagedserve.sampling_params import SamplingParams
from pagedserve.structured.backend import XGrammarBackend
from pagedserve.structured.logits import RequestConstraint, constrain_logits
from pagedserve.structured.spec import ConstraintSpec

xgr = pytest.importorskip("xgrammar")

CHARS = list('abc{}":, 0123456789')
# Token 0 is the stop token; then every character and every pair of them.
VOCAB = ["</s>"] + CHARS + ["".join(p) for p in itertools.product(CHARS, repeat=2)]
EOS = 0
SCHEMA = json.dumps({"type": "object", "properties": {"a": {"type": "integer"}},
                     "required": ["a"], "additionalProperties": False})
SPECS = {"abc": ConstraintSpec("regex", "[a-c]+"),
         "schema": ConstraintSpec("json_schema", SCHEMA),
         "anything": ConstraintSpec("regex", r"[\s\S]*")}


@pytest.fixture(scope="module")
def backend():
    info = xgr.TokenizerInfo(VOCAB, vocab_size=len(VOCAB), stop_token_ids=[EOS])
    return XGrammarBackend(None, len(VOCAB), frozenset({EOS}), tokenizer_info=info)


@pytest.fixture(scope="module")
def compiled(backend):
    return {name: backend.compile(spec) for name, spec in SPECS.items()}


def tokens(text: str) -> list[int]:
    """`text` as tokens of VOCAB, two characters at a time."""
    return [VOCAB.index(text[i:i + 2]) for i in range(0, len(text), 2)]


def work(seq_id: int, output: list[int], constraint=None, logprobs=None, prompt=(1,),
         **params) -> SeqWork:
    params = SamplingParams(**{"temperature": 0.8, "logprobs": logprobs, **params})
    return SeqWork(seq_id, [0], 0, [], True, params, list(prompt), output, len(output),
                   frozenset({EOS}), constraint)


def allowed_after(compiled, output: list[int]) -> set[int]:
    """The oracle: every token a matcher that has read `output` accepts, tried alone."""
    allowed = set()
    for t in range(len(VOCAB)):
        m = xgr.GrammarMatcher(compiled)
        assert all(m.accept_token(x) for x in output)
        if m.accept_token(t):
            allowed.add(t)
    return allowed


def expected(raw: torch.Tensor, allowed: set[int]) -> torch.Tensor:
    keep = torch.zeros(raw.shape[0], dtype=torch.bool)
    keep[sorted(allowed)] = True
    return raw.masked_fill(~keep, float("-inf"))


def test_each_constrained_row_keeps_what_its_grammar_accepts(backend, compiled):
    rows = [("abc", []), (None, []), ("schema", tokens('{"a": 1')), ("abc", tokens("ab")),
            ("schema", tokens('{"a": 12}')), (None, []), ("schema", [])]
    works = [work(i, out, RequestConstraint(backend, compiled[name]) if name else None)
             for i, (name, out) in enumerate(rows)]
    raw = torch.randn(len(rows), len(VOCAB), generator=torch.Generator().manual_seed(0))
    logits = raw.clone()
    out = constrain_logits(logits, None, works)
    assert out is logits  # in place: no row asks for logprobs
    for i, (name, output) in enumerate(rows):
        if name is None:
            assert torch.equal(out[i], raw[i])
        else:
            assert torch.equal(out[i], expected(raw[i], allowed_after(compiled[name], output)))
    assert torch.isinf(out[4]).sum() == len(VOCAB) - 1  # the object is complete: EOS only


def test_a_row_whose_grammar_allows_everything_is_not_masked_nor_copied(backend, compiled):
    works = [work(0, tokens("ab"), RequestConstraint(backend, compiled["anything"]), logprobs=2),
             work(1, [])]
    raw = torch.randn(2, len(VOCAB))
    before = raw.clone()
    assert constrain_logits(raw, raw, works) is raw
    assert torch.equal(raw, before)


def test_top_logprobs_of_a_masked_row_keep_the_raw_logits(backend, compiled):
    works = [work(0, [], RequestConstraint(backend, compiled["abc"]), logprobs=2), work(1, [])]
    raw = torch.randn(2, len(VOCAB))
    before = raw.clone()
    out = constrain_logits(raw, raw, works)
    assert out is not raw and torch.equal(raw, before)
    assert torch.equal(out[0], expected(before[0], allowed_after(compiled["abc"], [])))


def test_the_reused_bitmask_never_masks_a_row_with_an_earlier_steps_mask(backend, compiled):
    first = [work(10 + i, [], RequestConstraint(backend, compiled["abc"])) for i in range(4)]
    constrain_logits(torch.randn(4, len(VOCAB)), None, first)
    memory = backend.bitmask(4).data_ptr()
    # Rows 0 and 1 of the bitmask still hold the first step's masks; only row 2 is
    # constrained now, so rows 0 and 1 must come back untouched.
    second = [work(20, []), work(21, []), work(22, tokens('{"'),
                                              RequestConstraint(backend, compiled["schema"]))]
    raw = torch.randn(3, len(VOCAB))
    out = constrain_logits(raw.clone(), None, second)
    assert backend.bitmask(3).data_ptr() == memory  # the same memory, step after step
    assert torch.equal(out[:2], raw[:2])
    assert torch.equal(out[2], expected(raw[2], allowed_after(compiled["schema"], tokens('{"'))))


def test_a_token_the_matcher_refuses_leaves_only_the_stop_token(backend, compiled):
    constraint = RequestConstraint(backend, compiled["abc"])
    out = constrain_logits(torch.zeros(1, len(VOCAB)), None, [work(0, tokens("a1"), constraint)])
    assert torch.isfinite(out[0]).nonzero().flatten().tolist() == [EOS]


def test_sampler_with_penalties_takes_the_best_token_the_grammar_allows(backend, compiled):
    """Greedy rows mixing penalties, a constraint and top logprobs: each token is the
    argmax of the float64 oracle (penalties, then the grammar's mask), its logprob that
    of the raw logits."""
    pen = dict(temperature=0.0, repetition_penalty=1.3, frequency_penalty=0.5,
               presence_penalty=0.2)
    rows = [("abc", tokens("abca"), pen), (None, tokens("ab12"), pen),
            ("schema", tokens('{"a": 1'), dict(temperature=0.0)), ("abc", [], pen)]
    works = [work(i, out, RequestConstraint(backend, compiled[name]) if name else None,
                  logprobs=3 if i == 2 else None, prompt=tokens("bc") + [1], **p)
             for i, (name, out, p) in enumerate(rows)]
    raw = torch.randn(len(rows), len(VOCAB), generator=torch.Generator().manual_seed(1)) * 4
    results = Sampler("cpu").sample(raw.clone(), works).results()
    for i, (name, output, p) in enumerate(rows):
        x = raw[i].double()
        if "repetition_penalty" in p:
            counts = torch.bincount(torch.tensor(output, dtype=torch.int64),
                                    minlength=len(VOCAB)).double()
            seen = counts > 0
            seen[tokens("bc") + [1]] = True
            rep = p["repetition_penalty"]
            x = torch.where(seen, torch.where(x > 0, x / rep, x * rep), x)
            x = x - p["frequency_penalty"] * counts - p["presence_penalty"] * (counts > 0).double()
        if name is not None:
            x = expected(x, allowed_after(compiled[name], output))
        token = int(x.argmax())
        assert results[i].token_id == token, (i, name)
        assert results[i].logprob == pytest.approx(float(raw[i].double().log_softmax(-1)[token]),
                                                   abs=1e-5)
    top = results[2].top_logprobs  # from the raw logits: the mask does not touch them
    assert set(top) >= set(raw[2].topk(3).indices.tolist())


def test_cpu_bitmask_on_dense_and_sparse_masks_matches_xgrammars_kernel():
    """Rows that disallow most tokens are unpacked, the others go to XGrammar's kernel:
    either way the logits are those of XGrammar's kernel on every row (the oracle)."""
    vocab = 49152 + 7  # a vocabulary that ends inside a bitmask word
    backend = XGrammarBackend(None, vocab, frozenset())
    gen = torch.Generator().manual_seed(3)
    bitmask = backend.allocate_bitmask(5)
    words = bitmask.shape[1]
    bitmask[0] = -1
    bitmask[0, torch.randint(0, words, (40,), generator=gen)] = 0x7FF0FFFF  # allows most
    bitmask[1] = 0
    bitmask[1, torch.randint(0, words, (40,), generator=gen)] = 0x00F00001  # allows few
    bitmask[2] = torch.randint(-2**31, 2**31 - 1, (words,), generator=gen, dtype=torch.int32)
    bitmask[3] = 0  # allows nothing at all
    rows = [0, 1, 2, 3]  # row 4 is unconstrained
    assert backend._unpack_dense_rows(torch.zeros(5, vocab), bitmask, rows) == [0, 2]
    logits = torch.randn(5, vocab, generator=gen)
    ours, kernel = logits.clone(), logits.clone()
    backend.apply_bitmask(ours, bitmask, rows)
    xgr.apply_token_bitmask_inplace(kernel, bitmask, vocab_size=vocab, indices=rows)
    assert torch.equal(ours, kernel)
    assert torch.equal(ours[4], logits[4])

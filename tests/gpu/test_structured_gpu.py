"""The constraint bitmask on CUDA logits masks exactly what it masks on CPU, on the
constrained rows only: the kernel with random masks, and the sampler's hook with real
matchers on the small vocabulary of test_structured_logits (no tokenizer needed), over
two steps that share the reused bitmask."""

import sys
from pathlib import Path

import pytest
import torch

from pagedserve.structured.backend import XGrammarBackend
from pagedserve.structured.logits import RequestConstraint, constrain_logits

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from test_structured_logits import VOCAB, tokens, work  # noqa: E402

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("batch", [1, 32, 256])
def test_bitmask_on_cuda_matches_cpu(batch):
    vocab = 128256
    backend = XGrammarBackend(None, vocab, frozenset())
    gen = torch.Generator().manual_seed(batch)
    logits = torch.randn(batch, vocab, generator=gen)
    bitmask = backend.allocate_bitmask(batch)
    bitmask.copy_(torch.randint(-2**31, 2**31 - 1, bitmask.shape, generator=gen, dtype=torch.int32))
    rows = list(range(0, batch, 2))
    on_cpu = logits.clone()
    backend.apply_bitmask(on_cpu, bitmask, rows)
    on_gpu = logits.cuda()
    backend.apply_bitmask(on_gpu, bitmask, rows)
    assert torch.equal(on_gpu.cpu(), on_cpu)
    untouched = [r for r in range(batch) if r not in rows]
    assert torch.equal(on_cpu[untouched], logits[untouched])
    bits = (bitmask[rows].unsqueeze(-1) >> torch.arange(32, dtype=torch.int32)) & 1
    allowed = bits.view(len(rows), -1)[:, :vocab].bool()
    assert torch.equal(torch.isinf(on_cpu[rows]), ~allowed)


def test_constraint_hook_on_cuda_matches_cpu_across_steps():
    import xgrammar

    from test_structured_logits import EOS, SPECS

    info = xgrammar.TokenizerInfo(VOCAB, vocab_size=len(VOCAB), stop_token_ids=[EOS])
    backends = {dev: XGrammarBackend(None, len(VOCAB), frozenset({EOS}), tokenizer_info=info)
                for dev in ("cpu", "cuda")}
    compiled = {dev: {name: b.compile(spec) for name, spec in SPECS.items()}
                for dev, b in backends.items()}
    steps = [  # (constraint, output so far) per row; None: unconstrained
        [("abc", []), ("schema", tokens('{"a": 1')), ("anything", []), ("schema", [])],
        [(None, []), (None, []), ("schema", tokens('{"')), (None, [])],  # rows 0-1: stale
    ]
    gen = torch.Generator().manual_seed(0)
    for rows in steps:
        raw = torch.randn(len(rows), len(VOCAB), generator=gen)
        out = {}
        for dev, backend in backends.items():
            works = [work(i, output, RequestConstraint(backend, compiled[dev][name])
                          if name else None) for i, (name, output) in enumerate(rows)]
            out[dev] = constrain_logits(raw.to(dev), None, works).cpu()
        assert torch.equal(out["cuda"], out["cpu"])
        # CUDA logits: the reused bitmask is page-locked, copied by DMA behind the forward.
        assert backends["cuda"].bitmask(len(rows), pinned=True).is_pinned()
        for i, (name, _) in enumerate(rows):
            if name in (None, "anything"):
                assert torch.equal(out["cuda"][i], raw[i])
            else:
                assert torch.isinf(out["cuda"][i]).any()

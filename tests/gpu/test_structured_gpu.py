"""The constraint bitmask on CUDA logits masks exactly what it masks on CPU, on the
constrained rows only (the GPU machine has no tokenizer: the masks are random)."""

import pytest
import torch

from pagedserve.structured.backend import XGrammarBackend

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

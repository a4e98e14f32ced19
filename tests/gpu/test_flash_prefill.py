"""FlashAttention prefill of whole-context prompt chunks against the paged prefill kernel,
in one step that also holds chunks over a cached context and decodes."""

import pytest
import torch
from transformers import LlamaConfig

from pagedserve.config import EngineConfig
from pagedserve.engine.batch import ScheduledBatch, SeqWork
from pagedserve.runner.model_runner import ModelRunner
from pagedserve.model import layers
from pagedserve.sampling_params import SamplingParams

pytestmark = pytest.mark.gpu

GREEDY = SamplingParams(temperature=0.0)
VOCAB = 1000


@pytest.fixture(scope="module", params=["bfloat16", "float16"])
def runner(request, tmp_path_factory):
    path = tmp_path_factory.mktemp("llama-flash")
    LlamaConfig(hidden_size=512, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8,
                num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=2048).save_pretrained(path)
    return ModelRunner(EngineConfig(model=str(path), load_format="dummy", device="cuda",
                                    dtype=request.param, num_kv_blocks=1024, swap_space_gb=0, seed=0,
                                    max_num_seqs=16))


def _work(seq_id, tokens, start, first_block, sample=True):
    n = -(-(start + len(tokens)) // 16)
    return SeqWork(seq_id, tokens, start, list(range(first_block, first_block + n)), sample,
                   GREEDY, tokens, [], 0)


def test_flash_prefill_matches_paged_kernel(runner):
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, VOCAB, (n,), generator=gen).tolist() for n in (700, 300, 90, 33, 513)]
    # Step 1 (fresh chunks only): prompt 0's first 400 tokens, prompts 1-3 whole.
    first = [_work(0, prompts[0][:400], 0, 0, sample=False)] + [
        _work(i, prompts[i], 0, 100 * i) for i in (1, 2, 3)]
    runner.execute(ScheduledBatch(first))
    # Step 2: prompt 0 continues over its cached 400 tokens (paged kernel), prompt 4 is
    # fresh (flash), prompts 1-3 decode.
    step = [_work(4, prompts[4], 0, 500), _work(0, prompts[0][400:], 400, 0)] + [
        _work(i, [5 + i], len(prompts[i]), 100 * i) for i in (1, 2, 3)]
    inputs = runner.prepare_inputs(step)
    md = inputs.metadata
    assert inputs.order == [1, 0, 2, 3, 4]  # the cached-context chunk first
    assert md.num_paged_prefills == 1 and md.flash_token_start == 300 and md.flash_max_len == 513
    assert md.flash_cu_seqlens.tolist() == [0, 513]
    with torch.inference_mode():
        flash_logits, rows = runner.forward_logits(step)
        assert layers._FLASH["ok"] is True, "FlashAttention did not run"
        flash_logits = flash_logits.clone()
        runner.flash_prefill = False
        try:
            paged_logits, paged_rows = runner.forward_logits(step)
        finally:
            runner.flash_prefill = True
    assert sorted(rows) == sorted(paged_rows) == [0, 1, 2, 3, 4]
    paged = paged_logits[[paged_rows.index(i) for i in rows]]  # rows in the flash order
    err = (flash_logits - paged).abs().max().item()
    assert err < 0.05 * max(paged.abs().max().item(), 1.0), f"max abs diff {err}"

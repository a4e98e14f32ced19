"""The whole engine on a GPU: scheduler, paged kernels and swap over PCIe together.

A random-weight Llama-shaped model (no weights exist on the GPU machine), greedy
decoding in float32 so the outputs are a deterministic function of the inputs. A KV
pool too small for the batch forces preemptions; each mode must give exactly the
tokens of an unconstrained run.
"""

import pytest
import torch
from transformers import LlamaConfig

from pagedserve import LLM, SamplingParams

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama-gpu")
    LlamaConfig(hidden_size=512, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8,
                num_key_value_heads=2, vocab_size=1000, max_position_embeddings=1024).save_pretrained(path)
    return str(path)


PROMPTS = [[(7 * i + 3 * j) % 1000 for j in range(20 + 13 * i)] for i in range(12)]
PARAMS = SamplingParams(max_tokens=48, temperature=0, ignore_eos=True)


def run(model_dir, **kwargs):
    llm = LLM(model=model_dir, load_format="dummy", device="cuda", dtype="float32", seed=0, **kwargs)
    outs = llm.generate(PROMPTS, PARAMS, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs], llm.engine.stats()


@pytest.fixture(scope="module")
def unconstrained(model_dir):
    tokens, stats = run(model_dir, num_kv_blocks=1024)
    assert stats.num_preemptions == 0
    return tokens


@pytest.mark.parametrize("mode", ["swap", "recompute", "auto"])
def test_preemption_on_gpu_changes_no_token(model_dir, unconstrained, mode):
    """`auto` on a GPU swaps, single sequences included (every request here is one)."""
    tokens, stats = run(model_dir, num_kv_blocks=40, preemption_mode=mode, swap_space_gb=0.05)
    applied = "swap" if mode == "auto" else mode
    assert stats.preemptions_by_mode[applied] > 0
    if mode == "auto":  # exactly what `swap` does
        _, swap_stats = run(model_dir, num_kv_blocks=40, preemption_mode="swap", swap_space_gb=0.05)
        assert stats.preemptions_by_mode == swap_stats.preemptions_by_mode
    if applied == "swap":
        assert stats.blocks_swapped_out > 0 and stats.blocks_swapped_in > 0
    assert tokens == unconstrained
    assert stats.num_free_gpu_blocks == stats.num_total_gpu_blocks
    assert torch.cuda.is_available()


def test_async_scheduling_changes_no_token(model_dir, unconstrained):
    """Steps scheduled ahead take their input tokens from the previous step on the
    device (through the CUDA graphs' input buffer): the tokens equal a synchronous run's,
    also when requests end early on a stop token (their step ahead is wasted)."""
    tokens, stats = run(model_dir, num_kv_blocks=1024, async_scheduling=False)
    assert stats.num_steps_scheduled_ahead == 0
    assert tokens == unconstrained
    stops = [SamplingParams(max_tokens=48, temperature=0, stop_token_ids=[t[5 + i % 7]])
             for i, t in enumerate(unconstrained)]
    outs = {}
    for ahead in (False, True):
        llm = LLM(model=model_dir, load_format="dummy", device="cuda", dtype="float32", seed=0,
                  num_kv_blocks=1024, async_scheduling=ahead)
        outs[ahead] = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, stops, use_tqdm=False)]
        if ahead:
            assert llm.engine.stats().num_steps_scheduled_ahead > 0
    assert outs[True] == outs[False]
    assert any(len(t) < 48 for t in outs[True])

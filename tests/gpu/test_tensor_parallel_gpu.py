"""Tensor parallelism over NCCL: two GPUs, a random-weight Llama (dummy weights are
the same model at any tensor-parallel size), greedy float32; and every other family
(Qwen3, Qwen3-MoE, Mixtral, Gemma 3, Phi-3 with one KV head, windowed Mistral) from its
tiny saved checkpoint.

Skipped unless two GPUs are visible. TP=2 must give exactly the tokens of TP=1, with
and without forced preemption; `pagedserve bench --tensor-parallel-size 2` must run.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig

from pagedserve import LLM, SamplingParams

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from model_families import FAMILIES, greedy_prompts, save_tiny  # noqa: E402
from test_model import hf_greedy  # noqa: E402
from test_tensor_parallel_families import (OVERRIDES, generate_recording,  # noqa: E402
                                           max_diff, transformers_logits)

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")]

PROMPTS = [[(11 * i + 5 * j) % 1000 for j in range(17 + 29 * i)] for i in range(10)]
PARAMS = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama-tp")
    # 8 query heads over 2 KV heads (GQA), as Llama-3's 32/8 at a smaller scale.
    LlamaConfig(hidden_size=512, intermediate_size=1408, num_hidden_layers=4, num_attention_heads=8,
                num_key_value_heads=2, vocab_size=1001, max_position_embeddings=1024).save_pretrained(path)
    return str(path)


def run(model_dir, tp, **kwargs):
    with LLM(model=model_dir, load_format="dummy", device="cuda", dtype="float32", seed=0,
             tensor_parallel_size=tp, **kwargs) as llm:
        outs = llm.generate(PROMPTS, PARAMS, use_tqdm=False)
        return [o.outputs[0].token_ids for o in outs], llm.engine.stats()


@pytest.fixture(scope="module")
def single(model_dir):
    return run(model_dir, 1, num_kv_blocks=512)[0]


def test_tp2_equals_tp1_on_nccl(model_dir, single):
    tokens, stats = run(model_dir, 2, num_kv_blocks=512)
    assert stats.num_preemptions == 0
    assert tokens == single
    assert not torch.distributed.is_initialized()  # shutdown left the group


@pytest.mark.parametrize("mode", ["swap", "recompute"])
def test_tp2_preemption_changes_no_token(model_dir, single, mode):
    tokens, stats = run(model_dir, 2, num_kv_blocks=48, preemption_mode=mode, swap_space_gb=0.05)
    assert stats.preemptions_by_mode[mode] > 0
    assert tokens == single


def test_throughput_benchmark_with_tensor_parallelism(model_dir):
    cmd = [sys.executable, "-c", "import sys; from pagedserve.cli import main; sys.exit(main())",
           "bench", "--model", model_dir, "--load-format", "dummy", "--device", "cuda",
           "--tensor-parallel-size", "2", "--num-prompts", "64", "--input-len", "128",
           "--output-len", "64", "--json"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["tensor_parallel_size"] == 2 and result["output_tokens_per_s"] > 0
    print(result)


@pytest.mark.parametrize("kind", FAMILIES)
def test_every_family_tp2_equals_tp1_and_transformers_on_nccl(kind, tmp_path):
    """TP=1 replays decode CUDA graphs, TP=2 runs eagerly: the same tokens either way."""
    hf = save_tiny(kind, tmp_path, overrides=OVERRIDES.get(kind), head_dim=64)
    prompts = greedy_prompts()
    settings = dict(device="cuda", dtype="float32", block_size=4, num_kv_blocks=400,
                    swap_space_gb=0)
    with LLM(str(tmp_path), **settings) as llm:
        single, single_logits = generate_recording(llm, prompts)
    with LLM(str(tmp_path), tensor_parallel_size=2, **settings) as llm:
        sharded, sharded_logits = generate_recording(llm, prompts)
    assert not torch.distributed.is_initialized()
    refs = hf_greedy(hf, prompts, 24)
    for i, (two, one, ref) in enumerate(zip(sharded, single, refs)):
        assert two == one == ref, f"{kind} prompt {i}"
    vs_single = max_diff(sharded_logits, single_logits)
    vs_hf = max_diff(sharded_logits, transformers_logits(hf, prompts, sharded))
    print(f"{kind}: NCCL TP=2 max |logits - TP=1| = {vs_single:.2e}, "
          f"max |logits - transformers (CPU)| = {vs_hf:.2e}")
    assert vs_single < 2e-3 and vs_hf < 2e-3

"""Every model family sharded over two real processes (torch.distributed, gloo): greedy
token ids of TP=2 equal to TP=1 and to transformers, logits close, for 8 prompts of 24
tokens each batched through one `LLM.generate` per engine.

One TP=2 engine (one spawned worker) per family. Phi-3 runs with one KV head, fewer than
the ranks, so both ranks hold it (and its fused qkv_proj is cut into a q part and a
replicated k and v part per rank); the other families split 4 query and 2 KV heads.
"""

from __future__ import annotations

import os

import pytest
import torch

from pagedserve import LLM, SamplingParams
from pagedserve.distributed.driver import TensorParallelRunner

from model_families import FAMILIES, greedy_prompts, save_tiny
from test_model import hf_greedy

OVERRIDES = {"phi3": {"num_key_value_heads": 1}}  # fewer KV heads than ranks
SETTINGS = dict(device="cpu", dtype="float32", block_size=4, num_kv_blocks=200, swap_space_gb=0)
PARAMS = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
LOGITS_TOL = 2e-4  # float32; both sizes sum the same products in another order


def generate_recording(llm: LLM, prompts) -> tuple[list[list[int]], dict]:
    """Greedy token ids of every prompt, and the float32 logits the driver sampled from,
    keyed by (prompt index, position of the token they follow)."""
    runner = llm.engine.runner
    runner = runner.runner if isinstance(runner, TensorParallelRunner) else runner
    index = {tuple(p): i for i, p in enumerate(prompts)}
    seen: dict[tuple[int, int], torch.Tensor] = {}
    forward = runner.forward_logits

    def recording(work, feed=None):
        logits, sample_works = forward(work, feed)
        for row, i in enumerate(sample_works):
            w = work[i]
            key = (index[tuple(w.prompt_token_ids)], w.start_pos + len(w.token_ids) - 1)
            seen[key] = logits[row].float().cpu()
        return logits, sample_works

    runner.forward_logits = recording
    try:
        outs = llm.generate(prompts, PARAMS, use_tqdm=False)
    finally:
        del runner.forward_logits
    return [list(o.outputs[0].token_ids) for o in outs], seen


def transformers_logits(hf, prompts, tokens) -> dict[tuple[int, int], torch.Tensor]:
    """transformers' logits over each whole generated sequence, keyed as above."""
    out = {}
    with torch.no_grad():
        for i, (p, t) in enumerate(zip(prompts, tokens)):
            logits = hf(torch.tensor([p + t[:-1]])).logits[0]
            for pos in range(len(p) - 1, len(p) + len(t) - 1):
                out[(i, pos)] = logits[pos]
    return out


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.parametrize("kind", FAMILIES)
def test_tp2_greedy_ids_and_logits_equal_tp1_and_transformers(kind, tmp_path):
    hf = save_tiny(kind, tmp_path, overrides=OVERRIDES.get(kind))
    prompts = greedy_prompts()
    single, single_logits = generate_recording(LLM(str(tmp_path), **SETTINGS), prompts)
    with LLM(str(tmp_path), tensor_parallel_size=2, cpu_threads=2, **SETTINGS) as llm:
        runner = llm.engine.runner
        assert isinstance(runner, TensorParallelRunner)
        cfg = runner.runner.model_config
        assert runner.runner.num_kv_heads == max(1, cfg.num_kv_heads // 2)
        pids = list(runner.worker_pids.values())
        sharded, sharded_logits = generate_recording(llm, prompts)
    assert all(not os.path.exists(f"/proc/{pid}") for pid in pids)
    assert not torch.distributed.is_initialized()
    refs = hf_greedy(hf, prompts, 24)
    for i, (two, one, ref) in enumerate(zip(sharded, single, refs)):
        assert len(two) == 24 and two == one == ref, f"{kind} prompt {i}"
    assert len(sharded_logits) == 8 * 24
    vs_single = max_diff(sharded_logits, single_logits)
    vs_hf = max_diff(sharded_logits, transformers_logits(hf, prompts, sharded))
    print(f"{kind}: TP=2 max |logits - TP=1| = {vs_single:.2e}, "
          f"max |logits - transformers| = {vs_hf:.2e}")
    assert vs_single < LOGITS_TOL and vs_hf < LOGITS_TOL

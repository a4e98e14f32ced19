"""KV sharing in the engine on the embedded SmolLM2 (CPU, fp32): parallel samples fork
the prompt's blocks, and prompts with a common prefix reuse each other's blocks."""

from __future__ import annotations

import math

import pytest

from pagedserve import LLM, EngineConfig, SamplingParams
from pagedserve.engine.llm_engine import LLMEngine

BS = 8
ENGINE = dict(device="cpu", dtype="float32", block_size=BS, num_kv_blocks=128,
              swap_space_gb=0.01, max_num_batched_tokens=512)
PROMPT = "Write a short poem about the sea and the old lighthouse keeper:"
SHARED = ("You are a translator. Translate each English sentence into French, keeping "
          "its tone. English: ")


@pytest.fixture(scope="module")
def llm():
    return LLM(**ENGINE)


def engine(llm, **overrides) -> LLMEngine:
    """A fresh engine (empty prefix cache) over the loaded model and its KV tensors."""
    return LLMEngine(EngineConfig(**{**ENGINE, **overrides}), runner=llm.engine.runner,
                     tokenizer=llm.engine.tokenizer)


def assert_all_released(eng: LLMEngine) -> None:
    bm = eng.block_manager
    assert bm.seq_ids() == []
    assert bm.num_free_gpu_blocks == bm.num_gpu_blocks
    assert [bm.ref_count(b) for b in range(bm.num_gpu_blocks)] == [0] * bm.num_gpu_blocks


def samples(out):
    return [c.token_ids for c in out.outputs]


def test_parallel_samples_are_reproducible_with_seeds(llm):
    eng = engine(llm)
    run = LLM.from_engine(eng)
    p = SamplingParams(n=4, temperature=0.9, top_p=0.95, seed=7, max_tokens=10)
    first = run.generate(PROMPT, p, use_tqdm=False)[0]
    assert len({tuple(s) for s in samples(first)}) == 4  # each sample has its own seed
    # Again, now batched with unseeded requests and another seeded one.
    noise = SamplingParams(n=2, temperature=1.0, max_tokens=6)
    mixed = run.generate([SHARED + "Hello.", PROMPT, "1, 2, 3,"],
                         [noise, p, p.clone(seed=8)], use_tqdm=False)
    assert samples(mixed[1]) == samples(first)
    assert samples(mixed[2]) != samples(first)
    # Sample 0 of a request keeps the request's seed: it is what n=1 gives.
    one = run.generate(PROMPT, p.clone(n=1), use_tqdm=False)[0]
    assert samples(one)[0] == samples(first)[0]
    assert_all_released(eng)


def test_a_shared_prompt_holds_its_blocks_once(llm):
    eng = engine(llm, enable_prefix_caching=False)
    n = 4
    eng.add_request("r", PROMPT, SamplingParams(n=n, temperature=1.0, seed=1, max_tokens=6))
    prompt_len = len(eng.scheduler.get_group("r").prompt_token_ids)
    prompt_blocks = math.ceil(prompt_len / BS)
    assert prompt_len % BS != 0, "the test wants a partly filled last prompt block"
    bm = eng.block_manager
    eng.step()  # prefill once, then fork n - 1 samples onto the same blocks
    assert bm.num_gpu_blocks - bm.num_free_gpu_blocks == prompt_blocks
    table = bm.block_table(bm.seq_ids()[0])
    assert all(bm.block_table(s) == table for s in bm.seq_ids()) and len(bm.seq_ids()) == n
    assert [bm.ref_count(b) for b in table] == [n] * prompt_blocks
    # Sample 0 writes its first token into the shared, partly filled last block: one
    # copy. Without sharing the n copies of the prompt would take n * prompt_blocks.
    eng.step()
    assert bm.num_gpu_blocks - bm.num_free_gpu_blocks == prompt_blocks + 1
    assert [bm.ref_count(b) for b in table[:-1]] == [n] * (prompt_blocks - 1)
    while eng.has_unfinished_requests():
        eng.step()
    assert_all_released(eng)


def test_prefix_sharing_reports_cached_prompt_tokens_per_request(llm):
    eng = engine(llm)
    run = LLM.from_engine(eng)
    greedy = SamplingParams(temperature=0.0, max_tokens=6)
    questions = ["The cat sleeps.", "We are going to the market tomorrow."]
    first = run.generate(SHARED + questions[0], greedy, use_tqdm=False)[0]
    second = run.generate(SHARED + questions[1], greedy, use_tqdm=False)[0]
    a, b = first.prompt_token_ids, second.prompt_token_ids
    common = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
    assert first.metrics.num_cached_tokens == 0
    assert second.metrics.num_cached_tokens == (common // BS) * BS > 0
    again = run.generate(SHARED + questions[0], greedy, use_tqdm=False)[0]
    # All but the last token (its logits give the first output token), block-aligned.
    assert again.metrics.num_cached_tokens == ((len(a) - 1) // BS) * BS
    # Cached KV gives the same tokens as computing everything.
    cold = LLM.from_engine(engine(llm, enable_prefix_caching=False))
    ref = cold.generate([SHARED + q for q in questions], greedy, use_tqdm=False)
    assert [first.outputs[0].token_ids, second.outputs[0].token_ids] == \
        [r.outputs[0].token_ids for r in ref]
    assert again.outputs[0].token_ids == first.outputs[0].token_ids
    assert eng.stats().prefix_cache_hits == second.metrics.num_cached_tokens + \
        again.metrics.num_cached_tokens

"""The engine end to end on the embedded SmolLM2 (CPU, fp32).

One model is loaded per module and shared: each test builds its engines over that
runner (block managers over the same KV tensors). Engines sharing a runner share KV
memory, so each is used within one test only and never after a newer one ran: its
prefix cache would name blocks another engine has overwritten.
"""

from __future__ import annotations

import pytest
import torch

from pagedserve import LLM, EngineConfig, SamplingParams
from pagedserve.engine.llm_engine import LLMEngine

MAX_TOKENS = 8
SHARED = "You are a concise assistant. Answer in one short sentence, please. Question: "
PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a land far away,",
    "1, 2, 3, 4, 5,",
    "The quick brown fox",
    "Water boils at",
    "Translate to French: Good morning, how are you?",
    "日本の首都は",
    "List three colors:",
    "import numpy as np\nx = np.",
    "In 1969, humans first",
    "A haiku about autumn:",
    "SELECT name FROM users WHERE",
    "The derivative of x^2 is",
    "Paris, London, Berlin,",
    "Q: What is the largest planet in our solar system?\nA:",
    SHARED + "why is the sky blue?",
    SHARED + "what do bees make?",
    [{"role": "user", "content": "What is 2+2?"}],
    [{"role": "user", "content": "Name a fruit."}],
    [504, 2988, 288, 451, 8170, 4119, 1732],  # token ids
]
GREEDY = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)


# Small blocks: more block boundaries, so a small pool preempts often.
ENGINE = dict(device="cpu", dtype="float32", block_size=8, num_kv_blocks=256,
              swap_space_gb=0.05, max_num_batched_tokens=512)


@pytest.fixture(scope="module")
def llm():
    return LLM(**ENGINE)


@pytest.fixture(scope="module")
def greedy(llm):
    before = llm.engine.stats().num_steps
    outs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    # One continuous batch: every prompt prefilled in the first step, then decodes.
    assert llm.engine.stats().num_steps - before == MAX_TOKENS
    return outs


def engine(llm, **overrides) -> LLMEngine:
    """A fresh engine over the loaded model and its KV tensors."""
    cfg = {**ENGINE, **overrides}
    return LLMEngine(EngineConfig(**cfg), runner=llm.engine.runner,
                     tokenizer=llm.engine.tokenizer)


def fresh(llm, **overrides) -> LLM:
    return LLM.from_engine(engine(llm, **overrides))


def run(eng: LLMEngine, requests) -> dict:
    """requests: (request_id, prompt, params); returns request_id -> final output."""
    for rid, prompt, params in requests:
        eng.add_request(rid, prompt, params)
    done = {}
    while eng.has_unfinished_requests():
        for out in eng.step():
            if out.finished:
                done[out.request_id] = out
    return done


def test_greedy_matches_transformers_for_a_batch_of_varied_prompts(llm, greedy):
    from transformers import AutoModelForCausalLM

    source = llm.engine.runner.source
    hf = AutoModelForCausalLM.from_pretrained(source.directory, **source.hf_kwargs(),
                                              dtype=torch.float32).eval()
    eos = sorted(llm.engine.eos_token_ids)
    assert len(greedy) == len(PROMPTS) >= 20
    # One left-padded batch through transformers' generate.
    prompts = [out.prompt_token_ids for out in greedy]
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[eos[0]] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.no_grad():
        ref = hf.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=MAX_TOKENS,
                          eos_token_id=eos, pad_token_id=eos[0])
    for out, row in zip(greedy, ref[:, width:].tolist()):
        expected = row
        for i, t in enumerate(row):  # after EOS transformers pads with the pad id
            if t in eos:
                expected = row[:i + 1]
                break
        assert out.outputs[0].token_ids == expected, out.prompt


def test_outputs_keep_prompt_order_and_carry_text(llm, greedy):
    tok = llm.tokenizer
    assert greedy[0].prompt == PROMPTS[0] and greedy[0].outputs[0].text.startswith(" Paris")
    for out in greedy:
        c = out.outputs[0]
        assert out.finished and c.finish_reason in ("stop", "length")
        text_ids = [t for t in c.token_ids if t not in llm.engine.eos_token_ids]
        assert c.text == tok.decode(text_ids, skip_special_tokens=True)
    chat = greedy[18]
    assert chat.prompt_token_ids == llm.engine.apply_chat_template(PROMPTS[18])


PREEMPTED = [0, 2, 7, 11, 16, 17, 18, 20]  # short, long, shared-prefix, chat, token ids


@pytest.mark.parametrize("mode", ["auto", "swap", "recompute"])
def test_preemption_under_a_tiny_pool_changes_no_output(llm, greedy, mode):
    # 10 blocks of 8 tokens: two or three requests at a time, preempted as they grow.
    eng = engine(llm, num_kv_blocks=10, preemption_mode=mode, max_num_batched_tokens=64)
    requests = [(str(i), PROMPTS[i], GREEDY) for i in PREEMPTED]
    n2 = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, n=2)
    requests += [("n2-a", PROMPTS[2], n2), ("n2-b", PROMPTS[19], n2)]
    done = run(eng, requests)
    for i in PREEMPTED:
        assert done[str(i)].outputs[0].token_ids == greedy[i].outputs[0].token_ids, PROMPTS[i]
    for rid, i in (("n2-a", 2), ("n2-b", 19)):
        assert [c.token_ids for c in done[rid].outputs] == [greedy[i].outputs[0].token_ids] * 2
    stats = eng.stats()
    by_mode = stats.preemptions_by_mode
    assert stats.num_preemptions >= 5, stats
    assert sum(o.metrics.num_preemptions for o in done.values()) == stats.num_preemptions
    if mode == "recompute":
        assert by_mode["swap"] == 0
    else:  # the parallel-sampling groups are swapped; auto recomputes the single ones
        assert by_mode["swap"] > 0 and stats.blocks_swapped_out > 0
        assert (by_mode["recompute"] > 0) == (mode == "auto")
    # Swap-in copies at most what went out: blocks still cached on the GPU are reused.
    assert 0 < stats.blocks_swapped_in <= stats.blocks_swapped_out or mode == "recompute"
    assert stats.num_free_gpu_blocks == 10 and stats.num_running == 0


SEEDED = [SamplingParams(temperature=0.9, top_p=0.95, top_k=50, seed=s, max_tokens=8)
          for s in (1, 2, 3)]


def test_seeded_sampling_is_reproducible_across_runs_and_batches(llm):
    llm = fresh(llm)
    prompts = [PROMPTS[2], PROMPTS[4], PROMPTS[0]]
    alone = [llm.generate(p, sp, use_tqdm=False)[0].outputs[0].token_ids
             for p, sp in zip(prompts, SEEDED)]
    again = llm.generate(prompts[0], SEEDED[0], use_tqdm=False)[0].outputs[0].token_ids
    assert again == alone[0]
    # Batched with unseeded sampling requests, in another order.
    noise = SamplingParams(temperature=1.0, max_tokens=8)
    mixed = llm.generate([PROMPTS[0], prompts[2], PROMPTS[9], prompts[1], prompts[0]],
                         [noise, SEEDED[2], noise, SEEDED[1], SEEDED[0]], use_tqdm=False)
    assert [mixed[i].outputs[0].token_ids for i in (4, 3, 1)] == alone
    # And through preemptions.
    eng = engine(llm, num_kv_blocks=5, preemption_mode="recompute", max_num_batched_tokens=32)
    done = run(eng, [(str(i), p, sp) for i, (p, sp) in enumerate(zip(prompts * 2, SEEDED * 2))])
    assert [done[str(i)].outputs[0].token_ids for i in range(6)] == alone * 2
    assert eng.stats().num_preemptions > 0
    assert len({tuple(a) for a in alone}) == 3


def test_stop_string_spanning_tokens_is_cut(llm):
    llm = fresh(llm)
    prompt = PROMPTS[2]
    ref = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True),
                       use_tqdm=False)[0].outputs[0]
    tok = llm.tokenizer
    texts = [tok.decode(ref.token_ids[:i + 1]) for i in range(len(ref.token_ids))]
    i = next(i for i in range(1, 12) if len(texts[i]) - len(texts[i - 1]) >= 2
             and len(texts[i + 1]) - len(texts[i]) >= 2)
    start = len(texts[i - 1]) + 1
    stop = ref.text[start:len(texts[i]) + 2]  # from inside token i into token i+1
    assert ref.text.index(stop) == start
    out = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=16, stop=[stop]),
                       use_tqdm=False)[0].outputs[0]
    assert (out.text, out.finish_reason, out.stop_reason) == (ref.text[:start], "stop", stop)
    assert out.token_ids == ref.token_ids[:i + 2]


def test_stop_token_ids_and_max_tokens(llm):
    llm = fresh(llm)
    prompt = PROMPTS[0]
    ref = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
                       use_tqdm=False)[0].outputs[0]
    stop_id = ref.token_ids[4]
    k = ref.token_ids.index(stop_id)
    outs = llm.generate([prompt, prompt], [
        SamplingParams(temperature=0, max_tokens=12, stop_token_ids=[stop_id]),
        SamplingParams(temperature=0, max_tokens=5)], use_tqdm=False)
    stopped, short = outs[0].outputs[0], outs[1].outputs[0]
    assert stopped.token_ids == ref.token_ids[:k + 1]
    assert (stopped.finish_reason, stopped.stop_reason) == ("stop", stop_id)
    assert stopped.text == llm.tokenizer.decode(ref.token_ids[:k])
    assert short.token_ids == ref.token_ids[:5] and short.finish_reason == "length"


def test_min_tokens_and_ignore_eos(llm):
    llm = fresh(llm)
    eos = llm.engine.eos_token_ids
    ref = llm.generate(PROMPTS[18], SamplingParams(temperature=0, max_tokens=16),
                       use_tqdm=False)[0].outputs[0]  # "What is 2+2?": a short answer, EOS
    assert ref.finish_reason == "stop" and ref.token_ids[-1] in eos
    k = len(ref.token_ids) - 1
    outs = llm.generate([PROMPTS[18]] * 2, [
        SamplingParams(temperature=0, min_tokens=k + 3, max_tokens=k + 6),
        SamplingParams(temperature=0, max_tokens=k + 4, ignore_eos=True)], use_tqdm=False)
    held, ignored = outs[0].outputs[0], outs[1].outputs[0]
    assert held.token_ids[:k] == ref.token_ids[:k]
    assert not any(t in eos for t in held.token_ids[:k + 3])
    assert len(held.token_ids) >= k + 3
    assert ignored.token_ids[:k + 1] == ref.token_ids  # generates EOS and goes on
    assert len(ignored.token_ids) == k + 4 and ignored.finish_reason == "length"


def test_logprobs_and_chat(llm, greedy):
    llm = fresh(llm)
    out = llm.chat(PROMPTS[19], SamplingParams(temperature=0, max_tokens=MAX_TOKENS,
                                               logprobs=3), use_tqdm=False)[0].outputs[0]
    assert out.token_ids == greedy[19].outputs[0].token_ids
    assert len(out.logprobs) == len(out.token_ids)
    for token, entry in zip(out.token_ids, out.logprobs):
        assert len(entry) == 3 and max(entry, key=entry.get) == token
    assert out.cumulative_logprob == pytest.approx(
        sum(e[t] for t, e in zip(out.token_ids, out.logprobs)))


def test_bad_requests_raise_naming_the_field(llm):
    eng = llm.engine
    cases = [
        ("", "prompt must not be empty"),
        ([eng.vocab_size], r"prompt_token_ids\[0\] must be a token id"),
        ([1] * eng.max_model_len, "prompt is .* tokens; max_model_len"),
        ([{"role": "user"}], r"messages\[0\] must have"),
    ]
    for prompt, message in cases:
        with pytest.raises(ValueError, match=message):
            eng.add_request("bad", prompt, SamplingParams())
    small = engine(llm, num_kv_blocks=4)
    with pytest.raises(ValueError, match="^max_tokens: the request needs up to 16 KV-cache"):
        small.add_request("big", "hi", SamplingParams(max_tokens=128))
    # Every beam may need its own blocks by the end.
    with pytest.raises(ValueError, match=r"^max_tokens: .* \(4 x \d+ cached tokens"):
        small.add_request("beams", "hi", SamplingParams(beam_width=4, max_tokens=24))
    assert not eng.has_unfinished_requests() and not small.has_unfinished_requests()


def test_abort_frees_blocks_at_once_and_metrics_are_ordered(llm):
    eng = engine(llm, num_kv_blocks=32)
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    eng.add_request("keep", PROMPTS[5], params)
    eng.add_request("drop", PROMPTS[16], params)
    eng.step()
    eng.step()
    used = 32 - eng.stats().num_free_gpu_blocks
    eng.abort_request("drop")
    eng.abort_request("unknown")
    stats = eng.stats()
    assert stats.num_running == 1 and 32 - stats.num_free_gpu_blocks < used
    done = run(eng, [])
    assert list(done) == ["keep"] and len(done["keep"].outputs[0].token_ids) == 6
    m = done["keep"].metrics
    assert m.arrival_time <= m.first_scheduled_time <= m.first_token_time <= m.finished_time
    assert m.num_prompt_tokens == len(done["keep"].prompt_token_ids)
    assert eng.stats().num_free_gpu_blocks == 32

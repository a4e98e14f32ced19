"""Model + runner parity with transformers, loading, KV cache ops and sizing (CPU).

The runner is driven directly (model_driver.Driver): prompts are staggered and some are
prefilled in chunks, so one run mixes chunked prefills and decodes in the same steps
over interleaved, non-contiguous block tables.
"""

import json
import time

import pytest
import torch

from pagedserve.config import EngineConfig
from pagedserve.engine.batch import ScheduledBatch, SeqWork
from pagedserve.runner.model_runner import ModelRunner
from pagedserve.model.loader import load_model_config, load_tokenizer, resolve_model

from model_driver import GREEDY, Driver

PROMPTS = [
    "The capital of France is", "def fibonacci(n):", "Once upon a time,", "1, 2, 3, 4,",
    "Translate to French: cheese", "The quick brown fox", "In 1492, Columbus",
    "import numpy as np\n", "Q: What is 2+2?\nA:", "Water boils at", "My favourite colour is",
    "The meaning of life is", "Photosynthesis is the process", "SELECT * FROM users WHERE",
    "<html><body>", "Roses are red,", "The best way to learn Python is", "Dear Sir or Madam,",
    "Machine learning models", "Le chat est", "東京は日本の", "2^10 =",
]


def hf_greedy(hf, prompts: list[list[int]], max_new: int) -> list[list[int]]:
    """transformers' generate, batched by prompt length: no padding enters the reference.
    EOS does not stop it (the runner, with no scheduler here, runs on past EOS too)."""
    hf.generation_config.eos_token_id = None
    by_len: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        by_len.setdefault(len(p), []).append(i)
    out: list[list[int]] = [[] for _ in prompts]
    for n, idx in by_len.items():
        ids = torch.tensor([prompts[i] for i in idx])
        gen = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new,
                          do_sample=False, pad_token_id=0)
        for row, i in enumerate(idx):
            out[i] = gen[row, n:].tolist()
    return out


@pytest.fixture(scope="module")
def smollm(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    mp = pytest.MonkeyPatch()
    cache = tmp_path_factory.mktemp("converted")
    mp.setenv("PAGEDSERVE_CACHE_DIR", str(cache))
    runner = ModelRunner(EngineConfig(device="cpu", dtype="float32", block_size=8,
                                      num_kv_blocks=512, swap_space_gb=0))
    # The GGUF was converted once by the runner; transformers reads the same weights back
    # from the converted cache, which also proves the cache is a faithful HF directory.
    cached = resolve_model(None)
    assert cached.gguf_file is None and cached.directory.startswith(str(cache))
    hf = AutoModelForCausalLM.from_pretrained(cached.directory, **cached.hf_kwargs()).eval()
    tok = load_tokenizer(cached)
    yield runner, hf, tok, cached
    mp.undo()


def test_smollm2_greedy_matches_transformers_generate(smollm):
    runner, hf, tok, _ = smollm
    prompts = [tok(p)["input_ids"] for p in PROMPTS]
    assert len(prompts) >= 20 and len({len(p) for p in prompts}) >= 5
    new = 16
    chunk = {i: 3 for i in range(0, len(prompts), 3)}  # every third prompt in 3-token chunks
    delay = {i: i % 4 for i in range(len(prompts))}  # later arrivals join running decodes
    t0 = time.perf_counter()
    ours = Driver(runner).generate(prompts, new, chunk, delay)
    t1 = time.perf_counter()
    refs = hf_greedy(hf, prompts, new)
    print(f"pagedserve {t1 - t0:.1f}s, transformers {time.perf_counter() - t1:.1f}s")
    for i, (mine, ref) in enumerate(zip(ours, refs)):
        assert mine == ref, f"prompt {i} {PROMPTS[i]!r}"
    assert tok.decode(ours[0]).startswith(" Paris")


def test_converted_cache_tokenizer_matches_gguf(smollm):
    _, _, tok, cached = smollm
    from transformers import AutoTokenizer

    gguf = resolve_model(None, use_cache=False)
    assert gguf.gguf_file is not None
    ref = AutoTokenizer.from_pretrained(gguf.directory, **gguf.hf_kwargs())
    for text in PROMPTS[-4:] + ["  spaces\tand\nnewlines ", "émoji 🙂"]:
        assert tok(text)["input_ids"] == ref(text)["input_ids"]
    msgs = [{"role": "user", "content": "hi"}]
    assert tok.apply_chat_template(msgs, tokenize=False) == ref.apply_chat_template(msgs, tokenize=False)


# ---- tiny random-weight models of each supported family ----

def _tiny(kind: str):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    common = dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  eos_token_id=2, bos_token_id=1)
    if kind == "qwen2":  # q/k/v biases, untied head
        return Qwen2Config(**common, rope_theta=10000.0, tie_word_embeddings=False)
    if kind == "llama3":  # llama3 rope scaling: original context 32 stretched 8x
        return LlamaConfig(**common, rope_theta=500000.0, rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 32})
    if kind == "mistral":
        return MistralConfig(**common, sliding_window=None, head_dim=32)
    raise AssertionError(kind)


def _save_tiny(kind: str, path) -> "torch.nn.Module":
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    hf = AutoModelForCausalLM.from_config(_tiny(kind)).eval()
    with torch.no_grad():  # random biases, so a dropped bias cannot go unnoticed
        for name, p in hf.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0, 0.5)
    hf.save_pretrained(path)
    return hf


def all_logits(runner: ModelRunner, work: list[SeqWork]) -> list[torch.Tensor]:
    """Logits of every fed token of each SeqWork (aligned with `work`)."""
    inputs = runner.prepare_inputs(work)
    with torch.inference_mode():
        logits = runner.model.compute_logits(
            runner.model(inputs.input_ids, inputs.positions, inputs.metadata))
    out, row = [None] * len(work), 0
    for i in inputs.order:
        n = len(work[i].token_ids)
        out[i], row = logits[row:row + n], row + n
    return out


@pytest.mark.parametrize("kind", ["qwen2", "llama3", "mistral"])
def test_logits_match_transformers(kind, tmp_path):
    hf = _save_tiny(kind, tmp_path)
    runner = ModelRunner(EngineConfig(model=str(tmp_path), device="cpu", block_size=4,
                                      num_kv_blocks=160, swap_space_gb=0))
    if kind == "qwen2":
        assert runner.model_config.qkv_bias and not runner.model_config.tie_word_embeddings
    if kind == "llama3":
        assert runner.model_config.rope_type == "llama3"
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(3, 320, (n,), generator=g).tolist() for n in (150, 37, 9, 64)]

    def sw(i, start, n, table):
        return SeqWork(i, seqs[i][start:start + n], start, table, False, GREEDY, [], [], 0,
                       frozenset())

    # Step 1: three prompts, the first only up to 100 tokens (a chunk; it also reaches
    # past the 32-position original context of the llama3 config).
    t = {i: list(range(40 * i, 40 * i + 40)) for i in range(4)}
    step1 = [sw(0, 0, 100, t[0]), sw(1, 0, 36, t[1]), sw(2, 0, 9, t[2])]
    # Step 2: the rest of the chunked prompt, decodes of 1 token, a new prompt.
    step2 = [sw(0, 100, 50, t[0]), sw(1, 36, 1, t[1]), sw(3, 0, 64, t[3])]
    got = {}
    for step in (step1, step2):
        for w, lg in zip(step, all_logits(runner, step)):
            got.setdefault(w.seq_id, []).append(lg)
    with torch.no_grad():
        for i, s in enumerate(seqs):
            if i == 2:
                s = s[:9]
            ref = hf(torch.tensor([s])).logits[0]
            ours = torch.cat(got[i])
            assert ours.shape == ref.shape
            assert (ours - ref).abs().max().item() < 2e-4, f"{kind} sequence {i}"


def _runner(tmp_path, kind="llama3", **cfg) -> ModelRunner:
    _save_tiny(kind, tmp_path)
    cfg.setdefault("num_kv_blocks", 64)
    return ModelRunner(EngineConfig(model=str(tmp_path), device="cpu", block_size=4, **cfg))


def test_swap_and_copy_on_write_preserve_the_sequence(tmp_path):
    runner = _runner(tmp_path, swap_space_gb=0.001)
    assert runner.num_cpu_blocks >= 8
    prompt = list(range(10, 23))  # 13 tokens: 4 blocks, the last one partly filled
    ref = Driver(runner).generate([prompt], 8)[0]

    def step(work, **ops):
        return runner.execute(ScheduledBatch(work, **ops))

    def w(toks, start, table, out):
        return SeqWork(0, toks, start, table, True, GREEDY, prompt, out, len(out), frozenset())

    # Prefill into blocks 20..23, swap them out to CPU 4..7, overwrite the GPU blocks with
    # another sequence, swap back into 30..33 and decode on from there.
    out = [step([w(prompt, 0, [20, 21, 22, 23], [])])[0].token_id]
    step([], swap_out=[(20, 4), (21, 5), (22, 6), (23, 7)])
    runner.execute(ScheduledBatch([SeqWork(9, list(range(200, 216)), 0, [20, 21, 22, 23],
                                           False, GREEDY, [], [], 0, frozenset())]))
    table = [30, 31, 32, 33]
    out.append(step([w([out[-1]], 13, table, out[:])], swap_in=[(4, 30), (5, 31), (6, 32),
                                                                 (7, 33)])[0].token_id)
    # Copy-on-write of the partly filled last block: continue from a copy in block 40.
    table = [30, 31, 32, 40]
    out.append(step([w([out[-1]], 14, table, out[:])], copies=[(33, 40)])[0].token_id)
    for pos in range(15, 13 + 7):
        if pos % 4 == 0:
            table.append(41 + pos // 4)
        out.append(step([w([out[-1]], pos, table, out[:])])[0].token_id)
    assert out == ref


def test_cpu_kv_sizing(tmp_path):
    runner = _runner(tmp_path, num_kv_blocks=None, kv_cache_gb=0.01, swap_space_gb=0.005)
    mc = runner.model_config
    block_bytes = 2 * mc.num_layers * 4 * mc.num_kv_heads * mc.head_dim * 4  # fp32
    assert runner.block_bytes == block_bytes
    assert runner.num_gpu_blocks == int(0.01 * 2**30) // block_bytes
    assert runner.num_cpu_blocks == int(0.005 * 2**30) // block_bytes
    assert runner.profile_num_blocks() == (runner.num_gpu_blocks, runner.num_cpu_blocks)
    k, _ = runner.gpu_cache[0]
    assert k.shape[0] == runner.num_gpu_blocks and len(runner.gpu_cache) == mc.num_layers
    assert len(runner.cpu_cache) == mc.num_layers


def test_dummy_weights_from_config_only(tmp_path):
    cfg = _tiny("llama3").to_dict()
    cfg["architectures"] = ["LlamaForCausalLM"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    mk = lambda seed: ModelRunner(EngineConfig(model=str(tmp_path), device="cpu",
                                               load_format="dummy", seed=seed,
                                               num_kv_blocks=32, swap_space_gb=0))
    a, b, c = mk(0), mk(0), mk(1)
    assert load_tokenizer(a.source) is None
    w = lambda r: r.model.model.layers[0].self_attn.qkv_proj.weight
    assert torch.equal(w(a), w(b)) and not torch.equal(w(a), w(c))
    outs = Driver(a).generate([[5, 6, 7, 8, 9]], 4)[0]
    assert outs == Driver(b).generate([[5, 6, 7, 8, 9]], 4)[0]
    assert all(0 <= t < 320 for t in outs)


def test_unsupported_architecture_is_named(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_layer": 2}))
    with pytest.raises(ValueError, match="unsupported architecture GPT2LMHeadModel"):
        load_model_config(resolve_model(str(tmp_path)))


def test_bad_model_paths(tmp_path):
    with pytest.raises(ValueError, match="without config.json"):
        resolve_model(str(tmp_path))
    with pytest.raises(ValueError, match="neither a Hugging Face model directory nor a .gguf"):
        resolve_model(str(tmp_path / "missing.bin"))


def test_positions_past_max_model_len_are_rejected(tmp_path):
    runner = _runner(tmp_path, max_model_len=16)
    with pytest.raises(ValueError, match="exceeds max_model_len 16"):
        runner.execute(ScheduledBatch([SeqWork(0, list(range(17)), 0, list(range(5)), True,
                                               GREEDY, [], [], 0, frozenset())]))
    with pytest.raises(ValueError, match="max_model_len 1000 exceeds the model's limit 256"):
        _runner(tmp_path, max_model_len=1000)


def test_bfloat16_on_cpu_tracks_float32(tmp_path):
    _save_tiny("qwen2", tmp_path)
    runs = {}
    for dtype in ("float32", "bfloat16"):
        runner = ModelRunner(EngineConfig(model=str(tmp_path), device="cpu", dtype=dtype,
                                          block_size=4, num_kv_blocks=64, swap_space_gb=0))
        assert runner.model.lm_head.weight.dtype == getattr(torch, dtype)
        assert runner.gpu_cache[0][0].dtype == getattr(torch, dtype)
        work = [SeqWork(0, list(range(5, 45)), 0, list(range(10)), True, GREEDY, [], [], 0,
                        frozenset())]
        runs[dtype] = all_logits(runner, work)[0]
    assert runs["bfloat16"].dtype == torch.float32  # logits are always float32
    assert (runs["bfloat16"] - runs["float32"]).abs().max().item() < 0.1


def test_short_block_table_is_rejected(tmp_path):
    runner = _runner(tmp_path)
    with pytest.raises(ValueError, match="block_table of seq 7 has 2 blocks, too few for 9 tokens"):
        runner.execute(ScheduledBatch([SeqWork(7, list(range(9)), 0, [0, 1], True, GREEDY,
                                               [], [], 0, frozenset())]))

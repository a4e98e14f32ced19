"""Decode CUDA graphs against the eager path on the same runner and the same KV cache:
same logits (to rounding), padding rows write no KV, non-decode steps stay eager, and a
whole engine run gives the same tokens with and without graphs."""

import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig

from pagedserve import LLM, SamplingParams
from pagedserve.config import EngineConfig
from pagedserve.engine.batch import ScheduledBatch, SeqWork
from pagedserve.runner.cuda_graphs import batch_buckets
from pagedserve.engine.llm_engine import LLMEngine
from pagedserve.runner.model_runner import ModelRunner

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from model_driver import GREEDY, Driver  # noqa: E402

pytestmark = pytest.mark.gpu

VOCAB = 1000
MAX_LEN = 1024
# Logit tolerance: graph and eager differ only in GEMM row counts (padding) and the
# split-KV plan, i.e. in summation order.
TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama-graphs")
    LlamaConfig(hidden_size=512, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8,
                num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=MAX_LEN).save_pretrained(path)
    return str(path)


def _config(model_dir, dtype, **kw):
    kw.setdefault("num_kv_blocks", 4096)  # the largest case below takes 2072 blocks
    return EngineConfig(model=model_dir, load_format="dummy", device="cuda", dtype=dtype,
                        max_num_seqs=64, swap_space_gb=0, seed=0, **kw)


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def runner(request, model_dir):
    return ModelRunner(_config(model_dir, request.param))


def test_buckets():
    assert batch_buckets(1) == [1]
    assert batch_buckets(3) == [1, 2, 3]
    assert batch_buckets(8) == [1, 2, 4, 8]
    assert batch_buckets(30) == [1, 2, 4, 8, 16, 24, 30]
    assert batch_buckets(64) == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64]
    with pytest.raises(ValueError, match="max_batch"):
        batch_buckets(0)


def test_every_bucket_is_captured(runner):
    g = runner.graphs
    assert g is not None and g.buckets == batch_buckets(64)
    assert g.width == MAX_LEN // 16
    for b in g.buckets:
        widths = g.width_classes(b)
        assert widths[-1] == g.width and widths == sorted(set(widths))
        assert all((b, w) in g._graphs for w in widths)
        if len(widths) > 1:  # a split plan: classes from 256 tokens, doubling
            assert widths == [16, 32, 64]
    assert g.num_graphs == sum(len(g.width_classes(b)) for b in g.buckets)


def _prefill(runner, lengths, first_block=0):
    """Prompts of the given lengths prefilled eagerly; returns their decode work."""
    bs = runner.block_size
    gen = torch.Generator().manual_seed(len(lengths))
    work, block = [], first_block
    for i, n in enumerate(lengths):
        prompt = torch.randint(3, VOCAB, (n,), generator=gen).tolist()
        table = list(range(block, block + n // bs + 1))[::-1]  # room for one more token
        block += len(table)
        work.append(SeqWork(i, prompt, 0, table, True, GREEDY, prompt, [], 0, frozenset()))
    runner.execute(ScheduledBatch(work))
    return [SeqWork(w.seq_id, [7 + w.seq_id], len(w.token_ids), w.block_table, True, GREEDY,
                    w.token_ids, [], 0, frozenset()) for w in work]


@pytest.mark.parametrize("lengths", [[37], [5, 300, 17], [40 + 11 * i for i in range(13)],
                                     [600] * 2 + [20] * 38, [100 + 13 * i for i in range(64)]])
def test_graph_logits_match_eager(runner, lengths):
    decode = _prefill(runner, lengths)
    g = runner.graphs
    before = g.num_replays
    with torch.inference_mode():
        graph_logits, rows = runner.forward_logits(decode)
        assert g.num_replays == before + 1
        graph_logits = graph_logits.clone()
        g.enabled = False
        try:
            eager_logits, eager_rows = runner.forward_logits(decode)
        finally:
            g.enabled = True
    assert rows == eager_rows == list(range(len(lengths)))
    err = (graph_logits - eager_logits).abs().max().item()
    scale = eager_logits.abs().max().item()
    assert err <= TOL[runner.dtype] * max(scale, 1.0), f"max abs diff {err} (scale {scale})"


def test_padding_rows_write_no_kv(runner):
    decode = _prefill(runner, [30, 50, 70], first_block=1000)  # bucket 4: one padding row
    k0 = [k.clone() for k, _ in runner.gpu_cache]
    runner.execute(ScheduledBatch(decode))
    bs = runner.block_size
    written = {(w.block_table[w.start_pos // bs], w.start_pos % bs) for w in decode}
    for before, (after, _) in zip(k0, runner.gpu_cache):
        changed = (before != after).any(dim=-1).any(dim=1)  # [blocks, block_size]
        assert {tuple(x) for x in changed.nonzero().tolist()} == written


def test_mixed_and_oversized_steps_run_eagerly(runner):
    g = runner.graphs
    decode = _prefill(runner, [20] * 3)
    before = g.num_replays
    prompt = list(range(10, 40))
    mixed = decode[:2] + [SeqWork(99, prompt, 0, [1900, 1901], True, GREEDY, prompt, [], 0)]
    runner.execute(ScheduledBatch(mixed))
    assert g.num_replays == before
    # A sequence past max_model_len is refused by the eager path, not silently graphed.
    bad = SeqWork(5, [3], MAX_LEN, list(range(MAX_LEN // 16 + 1)), True, GREEDY, [], [], 0)
    with pytest.raises(ValueError, match="max_model_len"):
        runner.execute(ScheduledBatch([bad]))
    assert g.num_replays == before


def test_driver_tokens_same_with_and_without_graphs(model_dir):
    prompts = [[(5 * i + 3 * j) % VOCAB for j in range(10 + 23 * i)] for i in range(20)]
    chunk, delay = {i: 48 for i in range(0, 20, 3)}, {i: i % 4 for i in range(20)}
    with_graphs = ModelRunner(_config(model_dir, "float32", num_kv_blocks=512))
    eager = ModelRunner(_config(model_dir, "float32", num_kv_blocks=512), cuda_graphs=False)
    assert eager.graphs is None
    ours = Driver(with_graphs).generate(prompts, 20, chunk, delay)
    assert with_graphs.graphs.num_replays > 0
    assert ours == Driver(eager).generate(prompts, 20, chunk, delay)


def test_engine_uses_graphs_for_decode_steps(model_dir):
    cfg = _config(model_dir, "bfloat16", num_kv_blocks=512)
    engine = LLMEngine(cfg, runner=ModelRunner(cfg))
    llm = LLM.from_engine(engine)
    outs = llm.generate([[1 + i] * (5 + 7 * i) for i in range(10)],
                        SamplingParams(max_tokens=12, temperature=0, ignore_eos=True), use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outs] == [12] * 10
    # Every step after the single prefill step is decode-only.
    assert engine.runner.graphs.num_replays == engine.stats().num_steps - 1 == 11

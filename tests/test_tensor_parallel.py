"""Tensor parallelism on CPU: two real processes over torch.distributed (gloo).

One TP=2 runner (rank 0 here, rank 1 a spawned worker) serves several engines in turn
(an engine can share a loaded runner and use fewer of its blocks), so the parity,
preemption and sharding checks pay for one worker start-up. The references are the
same engines over a single-process runner, and transformers on the same weights.
"""

from __future__ import annotations

import os
import socket
import threading

import pytest
import torch

from pagedserve import LLM, SamplingParams
from pagedserve.config import EngineConfig
from pagedserve.distributed import GroupJoinError, Placement, WorkerFailedError, placement_from_env
from pagedserve.distributed.driver import WorkerSet
from pagedserve.engine.llm_engine import LLMEngine
from pagedserve.runner.model_runner import ModelRunner

VOCAB, HIDDEN, INTER, LAYERS, HEADS, KV_HEADS = 321, 64, 96, 2, 4, 2  # odd vocab: padded
BASE = dict(device="cpu", dtype="float32", block_size=4, swap_space_gb=0.002,
            max_num_batched_tokens=16, max_num_seqs=8)  # 16 tokens a step: prompts in chunks


def tiny_llama(path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(3)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER,
                      num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                      num_key_value_heads=KV_HEADS, max_position_embeddings=256,
                      eos_token_id=2, bos_token_id=1, tie_word_embeddings=False)
    hf = AutoModelForCausalLM.from_config(cfg).eval()
    hf.save_pretrained(path)
    return hf


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    return str(path), tiny_llama(path)


@pytest.fixture(scope="module")
def runners(model):
    """(single-process runner, TP=2 runner) over 64 blocks each; the TP one is stopped
    at the end and must leave no worker behind."""
    path, _ = model
    single = ModelRunner(EngineConfig(model=path, num_kv_blocks=64, **BASE))
    engine = LLMEngine(EngineConfig(model=path, num_kv_blocks=64, tensor_parallel_size=2,
                                    cpu_threads=2, **BASE))  # one thread a rank
    tp = engine.runner
    yield single, tp
    pids = list(tp.worker_pids.values())
    engine.shutdown()
    assert all(not os.path.exists(f"/proc/{pid}") for pid in pids)
    assert not torch.distributed.is_initialized()


def run(runner, prompts, params, **settings) -> tuple[list[list[list[int]]], dict]:
    """Token ids of every completion of every prompt, and the engine's stats."""
    cfg = EngineConfig(model=runner.source.directory, **{**BASE, "num_kv_blocks": 64, **settings})
    engine = LLMEngine(cfg, runner=runner)
    outs = LLM.from_engine(engine).generate(prompts, params, use_tqdm=False)
    return [[c.token_ids for c in o.outputs] for o in outs], engine.stats()


GREEDY = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
PREFIX = list(range(10, 34))  # 24 tokens = 6 full blocks, shared by two prompts
PROMPTS = [PREFIX + [50, 51, 52], list(range(100, 141)), [7, 8, 9, 10, 11],
           PREFIX + [60, 61], [200, 201, 202, 203, 204, 205, 206]]


def hf_greedy(hf, prompt: list[int], max_new: int) -> list[int]:
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new,
                          do_sample=False, pad_token_id=0, eos_token_id=None)
    return out[0, len(prompt):].tolist()


# ---- before the shared TP=2 runner exists: one process group per process ----

def test_kv_heads_are_replicated_when_fewer_than_ranks():
    from pagedserve.model.parallel import QKVParallelLinear, TensorParallel

    # 8 query heads, 2 KV heads over 4 ranks: ranks 0-1 share KV head 0, ranks 2-3 head 1.
    rows = [QKVParallelLinear(32, 4, 8, 2, False, TensorParallel(r, 4)).shard_rows
            for r in range(4)]
    assert [r[0] for r in rows] == [(0, 8), (8, 16), (16, 24), (24, 32)]
    assert [r[1] for r in rows] == [(0, 4), (0, 4), (4, 8), (4, 8)]
    assert all(r[1] == r[2] for r in rows)


def test_settings_that_cannot_shard_fail_before_any_process_starts(model, monkeypatch):
    path, _ = model
    with pytest.raises(ValueError, match="tensor_parallel_size 3 must divide the model's 4 query heads"):
        LLM(path, tensor_parallel_size=3, **BASE)
    with pytest.raises(ValueError, match="tensor_parallel_size must be >= 1"):
        EngineConfig(tensor_parallel_size=0)
    monkeypatch.setenv("PAGEDSERVE_CACHE_DIR", "")  # the GGUF itself, not a converted copy
    with pytest.raises(ValueError, match="GGUF models load with tensor_parallel_size 1 only"):
        LLM(tensor_parallel_size=2, device="cpu")
    assert not torch.distributed.is_initialized()


def test_a_rank_that_never_joins_fails_start_up_naming_rank_and_address(model, monkeypatch):
    path, _ = model
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # The leader of a two-pod LeaderWorkerSet whose worker pod never comes.
    monkeypatch.setenv("LWS_LEADER_ADDRESS", "127.0.0.1")
    monkeypatch.setenv("LWS_GROUP_SIZE", "2")
    monkeypatch.setenv("LWS_WORKER_INDEX", "0")
    monkeypatch.setenv("MASTER_PORT", str(port))
    with pytest.raises(GroupJoinError, match=rf"rank 0 of 2 could not join the process group "
                                             rf"at 127\.0\.0\.1:{port} \(lws placement\) within 3s"):
        LLM(path, tensor_parallel_size=2, distributed_timeout_s=3, **BASE)
    assert not torch.distributed.is_initialized()


def test_placement_from_the_environment():
    lws = placement_from_env(8, {"LWS_LEADER_ADDRESS": "leader.svc", "LWS_GROUP_SIZE": "2",
                                 "LWS_WORKER_INDEX": "1"})
    assert (lws.address, lws.port, lws.first_rank, lws.local_ranks, lws.is_driver) == \
        ("leader.svc", 29500, 4, 4, False)
    assert lws.spawned_ranks == [5, 6, 7] and lws.device_index(6) == 2
    run = placement_from_env(2, {"MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "1234", "RANK": "1",
                                 "WORLD_SIZE": "2", "LOCAL_RANK": "1"})
    assert (run.url, run.first_rank, run.spawned_ranks, run.device_index(1)) == \
        ("tcp://10.0.0.1:1234", 1, [], 1)
    local = placement_from_env(4, {})
    assert local.is_driver and local.spawned_ranks == [1, 2, 3] and local.address == "127.0.0.1"
    with pytest.raises(ValueError, match="cannot split tensor_parallel_size 4 evenly"):
        placement_from_env(4, {"LWS_LEADER_ADDRESS": "x", "LWS_GROUP_SIZE": "3"})
    with pytest.raises(ValueError, match="WORLD_SIZE 4 differs from tensor_parallel_size 2"):
        placement_from_env(2, {"MASTER_ADDR": "x", "RANK": "0", "WORLD_SIZE": "4"})


def test_the_setting_is_a_flag_and_a_variable(monkeypatch):
    from pagedserve import cli

    args = cli.build_parser().parse_args(["serve", "--tensor-parallel-size", "4"])
    assert cli.engine_config_from_args(args).tensor_parallel_size == 4
    monkeypatch.setenv("PAGEDSERVE_TENSOR_PARALLEL_SIZE", "8")
    args = cli.build_parser().parse_args(["bench"])
    assert cli.engine_config_from_args(args).tensor_parallel_size == 8


def test_a_worker_that_raises_is_reported_and_the_others_are_stopped():
    import tp_faults

    workers = WorkerSet(Placement("127.0.0.1", 0, 3, 0, 3, "local"), EngineConfig(device="cpu"),
                        None, target=tp_faults.rank_one_raises)
    failure = workers.wait_failure(120)
    workers.join(60)
    assert isinstance(failure, WorkerFailedError)
    assert "tensor-parallel worker rank 1 failed" in str(failure)
    assert "RuntimeError: injected fault on rank 1" in str(failure)  # its traceback
    assert workers.procs[1].exitcode == 1
    assert workers.procs[2].exitcode == -9  # healthy, but killed: nobody would step it
    assert not any(p.is_alive() for p in workers.procs.values())


# ---- over the shared TP=2 runner ----

def test_greedy_ids_equal_single_process_and_transformers(model, runners):
    _, hf = model
    single, tp = runners
    params = [GREEDY, GREEDY, SamplingParams(temperature=0.0, max_tokens=10, n=2, ignore_eos=True),
              GREEDY, SamplingParams(beam_width=3, n=2, max_tokens=8, ignore_eos=True)]
    ours, stats = run(tp, PROMPTS, params)
    ref, _ = run(single, PROMPTS, params)
    assert ours == ref
    assert stats.prefix_cache_hits > 0  # the shared prefix came from the cache
    for i in (0, 1, 3):
        assert ours[i][0] == hf_greedy(hf, PROMPTS[i], 10), f"prompt {i}"
    assert ours[2][0] == ours[2][1] == hf_greedy(hf, PROMPTS[2], 10)  # n=2 forks, same greedy path


@pytest.mark.parametrize("mode", ["swap", "recompute"])
def test_forced_preemption_keeps_the_tokens(runners, mode):
    single, tp = runners
    prompts = [list(range(20 + 7 * i, 38 + 7 * i)) for i in range(4)]  # 18 tokens each
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    # 4 sequences growing to 42 tokens (11 blocks each) in 24 blocks: someone must go.
    ours, stats = run(tp, prompts, params, num_kv_blocks=24, preemption_mode=mode)
    ref, ref_stats = run(single, prompts, params, num_kv_blocks=24, preemption_mode=mode)
    free, _ = run(single, prompts, params)
    assert ours == ref == free
    assert stats.preemptions_by_mode.get(mode, 0) > 0
    assert stats.preemptions_by_mode == ref_stats.preemptions_by_mode
    if mode == "swap":
        assert stats.blocks_swapped_out > 0 and stats.blocks_swapped_in > 0


def test_each_rank_holds_half_the_weights(runners):
    single, tp = runners
    whole = sum(p.numel() * p.element_size() for p in single.model.parameters())
    q, kv, rows = HEADS * 16, KV_HEADS * 16, -(-VOCAB // 2)
    per_layer = HIDDEN * (q + 2 * kv) // 2 + q // 2 * HIDDEN + 3 * HIDDEN * INTER // 2 + 2 * HIDDEN
    expected = 4 * (2 * rows * HIDDEN + LAYERS * per_layer + HIDDEN)  # float32 bytes
    assert tp.rank_weight_bytes == [expected, expected]  # measured on each rank
    assert 0.5 <= expected / whole < 0.51  # half, plus replicated norms and one padding row


def test_the_node_s_cpu_threads_are_shared_between_its_ranks(runners):
    _, tp = runners
    assert tp.runner.config.cpu_threads == 1 and tp.runner.cpu_plan.threads == 1


def test_rank_zero_holds_its_slice_of_every_tensor(runners):
    single, tp = runners
    one, mine = single.model, tp.runner.model
    q, kv = HEADS * 16, KV_HEADS * 16
    full_qkv = one.model.layers[1].self_attn.qkv_proj.weight
    want = torch.cat([full_qkv[:q // 2], full_qkv[q:q + kv // 2], full_qkv[q + kv:q + kv + kv // 2]])
    assert torch.equal(mine.model.layers[1].self_attn.qkv_proj.weight, want)
    assert torch.equal(mine.model.layers[0].self_attn.o_proj.weight,
                       one.model.layers[0].self_attn.o_proj.weight[:, :q // 2])
    gate_up = one.model.layers[0].mlp.gate_up_proj.weight
    assert torch.equal(mine.model.layers[0].mlp.gate_up_proj.weight,
                       torch.cat([gate_up[:INTER // 2], gate_up[INTER:INTER + INTER // 2]]))
    assert torch.equal(mine.model.layers[0].mlp.down_proj.weight,
                       one.model.layers[0].mlp.down_proj.weight[:, :INTER // 2])
    assert torch.equal(mine.model.embed_tokens.weight, one.model.embed_tokens.weight[:161])
    assert torch.equal(mine.lm_head.weight, one.lm_head.weight[:161])
    assert tp.runner.num_kv_heads == 1 and tp.runner.gpu_cache[0][0].numel() * 2 == \
        single.gpu_cache[0][0].numel()


def test_a_worker_dying_while_idle_fails_the_next_step(runners):
    """Last: it breaks the shared runner (whose teardown must still leave no process)."""
    from pagedserve.engine.batch import ScheduledBatch, SeqWork

    _, tp = runners
    told, heard = [], threading.Event()
    tp.on_failure(lambda exc: (told.append(exc), heard.set()))
    (pid,) = tp.worker_pids.values()
    os.kill(pid, 9)
    assert heard.wait(60)  # while nothing runs: the server turns NOT_SERVING from this
    assert told == [tp.workers.failure]
    assert f"rank 1 (pid {pid}) exited with status -9" in str(told[0])
    work = [SeqWork(0, [5, 6, 7], 0, [0], True, GREEDY, [5, 6, 7], [], 0, frozenset())]
    with pytest.raises(WorkerFailedError, match="rank 1"):
        tp.execute(ScheduledBatch(work))

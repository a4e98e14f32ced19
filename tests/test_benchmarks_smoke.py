"""CPU smoke runs of the GPU benchmarks benchmarks/latency.py,
benchmarks/preemption_block_size.py and benchmarks/prefill_engine.py: each script's main() in-process with tiny
settings on the embedded model, then the JSON it wrote is checked for structure and
for the relations its numbers must satisfy."""

import importlib
import importlib.util
import json
import math

import pytest
import torch

# benchmarks/ is on the path (pyproject's pytest pythonpath), as for the scripts themselves.
import harness
import latency
import preemption_block_size as preemption
import prefill_engine

HAVE_MPL = importlib.util.find_spec("matplotlib") is not None
TINY_WORKLOAD = ["--model", "default", "--device", "cpu", "--num-requests", "6", "--min-prompt", "8",
                 "--max-prompt", "24", "--min-output", "2", "--max-output", "6", "--kv-cache-gb", "0.05"]


@pytest.fixture(autouse=True)
def one_thread():
    """Toy-sized ops gain nothing from a second thread, and on a shared 2-core machine
    an OpenMP barrier waiting for a descheduled thread turns 1 ms copies into 500 ms."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _check_summary(s, n):
    assert s["n"] == n
    assert 0 < s["p50"] <= s["p90"] <= s["p99"]
    assert s["mean"] > 0


def test_poisson_arrivals_share_one_pattern_scaled_by_the_rate():
    slow, fast = latency.poisson_arrivals(50, 2.0, seed=7), latency.poisson_arrivals(50, 8.0, seed=7)
    assert slow[0] == fast[0] == 0.0
    assert all(math.isclose(s, 4 * f) for s, f in zip(slow, fast))
    assert all(b > a for a, b in zip(slow, slow[1:]))
    many = latency.poisson_arrivals(20000, 5.0, seed=1)
    assert abs(many[-1] / (len(many) - 1) - 0.2) < 0.01  # mean gap 1/rate


def test_rate_report_kept_up_is_about_queue_growth():
    def records(ttfts):
        return [{"arrival": float(i), "first": i + t, "finish": i + t + 1.0, "tokens": 11}
                for i, t in enumerate(ttfts)]

    steady = latency.rate_report(1.0, records([0.1] * 8), 8, [float(i) for i in range(8)])
    assert steady["kept_up"] and steady["completed"] == 8
    assert math.isclose(steady["tpot_ms"]["p50"], 100.0)  # 1 s over 10 tokens after the first
    assert math.isclose(steady["offered_rate"], 1.0)
    growing = latency.rate_report(1.0, records([0.1, 0.1, 0.5, 1.0, 2.0, 3.0, 4.0, 5.0]), 8,
                                  [float(i) for i in range(8)])
    assert not growing["kept_up"]
    assert math.isclose(growing["ttft_last_quarter_ms"], 4500.0)
    unfinished = records([0.1] * 8)
    unfinished[-1]["finish"] = None
    partial = latency.rate_report(1.0, unfinished, 8, [float(i) for i in range(8)])
    assert not partial["kept_up"] and partial["completed"] == 7 and partial["first_tokens"] == 8


def test_latency_cpu_smoke(tmp_path):
    out, png = tmp_path / "latency.json", tmp_path / "latency.png"
    latency.main(TINY_WORKLOAD + ["--rates", "20,80", "--hf-requests", "3", "--hf-time-limit", "60",
                                  "--out", str(out), "--plot", str(png)])
    report = json.loads(out.read_text())
    assert report["environment"]["torch"] == torch.__version__
    assert report["args"]["rates"] == [20.0, 80.0] and report["device"] == "cpu"
    wl = report["workload"]
    assert wl["num_requests"] == 6 and 6 * 8 <= wl["prompt_tokens"] <= 6 * 24
    assert 6 * 2 <= wl["output_tokens"] <= 6 * 6
    ps = report["results"]["pagedserve"]
    assert [r["rate"] for r in ps["rates"]] == [20.0, 80.0]
    for r in ps["rates"]:
        assert r["num_requests"] == r["completed"] == r["first_tokens"] == 6
        for key in ("ttft_ms", "tpot_ms", "e2e_ms", "queue_ms"):
            _check_summary(r[key], 6)
        assert r["e2e_ms"]["p99"] >= r["ttft_ms"]["p50"] and r["preemptions"] == 0
        assert r["achieved_rate"] > 0 and r["duration_s"] > 0 and isinstance(r["kept_up"], bool)
        assert r["output_tokens_per_s"] * r["duration_s"] == pytest.approx(wl["output_tokens"])
        assert "first_token_time" in r["timing_source"]
    hf = report["results"]["transformers_cb"]
    assert "error" not in hf and hf["manager_starts"] == 1
    for r in hf["rates"]:
        assert "error" not in r, r.get("traceback")
        assert r["num_requests"] == r["completed"] == r["submitted"] == 3 and r["failed"] == 0
        _check_summary(r["ttft_ms"], 3)
        assert "sdpa" in r["attn_implementation"] and "wrong_lengths" not in r
        assert r["timing_source"].startswith("GenerationOutput.timestamps")
    if HAVE_MPL:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_latency_records_a_transformers_failure_and_returns(tmp_path):
    out = tmp_path / "latency.json"
    latency.main(TINY_WORKLOAD + ["--rates", "20", "--skip-pagedserve", "--hf-attn", "no_such_attention",
                                  "--out", str(out)])
    hf = json.loads(out.read_text())["results"]["transformers_cb"]
    assert "no_such_attention" in hf["error"] and hf["rates"] == []


def test_latency_rejects_bad_rates():
    with pytest.raises(SystemExit):
        latency.parse_args(["--rates", "2,-1"])
    with pytest.raises(SystemExit):
        latency.parse_args(["--rates", "fast"])


def test_preemption_block_size_cpu_smoke(tmp_path):
    out, png = tmp_path / "pbs.json", tmp_path / "pbs.png"
    preemption.main(["--model", "default", "--device", "cpu", "--block-sizes", "8,16", "--seq-lens", "16,40",
                     "--reps", "2", "--warmup", "1", "--pool-tokens", "512", "--out", str(out), "--plot", str(png)])
    report = json.loads(out.read_text())
    res = report["results"]
    assert report["args"]["block_sizes"] == [8, 16] and report["environment"]["torch"] == torch.__version__
    assert res["device"] == "cpu" and res["pool_tokens"] == 512
    rows = res["rows"]
    assert [(r["block_size"], r["seq_len"]) for r in rows] == [(8, 16), (8, 40), (16, 16), (16, 40)]
    for r in rows:
        assert r["blocks"] == -(-r["seq_len"] // r["block_size"])
        assert r["block_bytes"] == r["block_size"] * res["kv_bytes_per_token"]
        assert r["bytes_each_way"] == r["blocks"] * r["block_bytes"]
        assert r["roundtrip_exact"] is True  # swapped-in blocks equal the swapped-out ones
        assert r["swap_out_ms"] > 0 and r["swap_in_ms"] > 0 and r["recompute_ms"] > 0
        assert r["swap_total_ms"] == pytest.approx(r["swap_out_ms"] + r["swap_in_ms"])
        assert r["swap_gb_per_s"] == pytest.approx(2 * r["bytes_each_way"] / r["swap_total_ms"] / 1e6)
        assert r["recompute_device_ms"] is None  # no CUDA events on CPU
        assert list(r["swap"]) == ["auto"]
    if HAVE_MPL:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_prefill_engine_cpu_smoke(tmp_path):
    """Both workloads, both kernel settings: every prompt token is computed or cached,
    and only the shared prefix's whole blocks come from the cache."""
    out = tmp_path / "prefill_engine.json"
    prefill_engine.main(["--model", "default", "--device", "cpu", "--long-requests", "2", "--long-tokens", "40",
                         "--prefix-requests", "3", "--prefix-tokens", "40", "--suffix-tokens", "5",
                         "--max-num-batched-tokens", "16", "--kv-cache-gb", "0.05", "--out", str(out)])
    rows = json.loads(out.read_text())["results"]
    assert [(r["workload"], r["kernel"]) for r in rows] == [
        ("long prompts", "tensor_cores"), ("long prompts", "cuda_cores"),
        ("shared prefix", "tensor_cores"), ("shared prefix", "cuda_cores")]
    for r in rows:
        assert r["seconds"] > 0 and r["computed_tokens_per_s"] > 0
        if r["workload"] == "long prompts":
            assert (r["prompt_tokens"], r["cached_tokens"]) == (80, 0)
        else:
            assert (r["prompt_tokens"], r["cached_tokens"]) == (3 * 45, 3 * 32)  # 2 whole blocks of 16


def test_preemption_block_size_rejects_bad_settings():
    with pytest.raises(SystemExit):
        preemption.parse_args(["--block-sizes", "8,12"])
    with pytest.raises(SystemExit):
        preemption.parse_args(["--swap-methods", "teleport"])
    with pytest.raises(SystemExit, match="too small"):
        preemption.main(["--model", "default", "--device", "cpu", "--seq-lens", "64", "--pool-tokens", "64"])


def test_benchmarks_import_harness_helpers_not_copies():
    assert latency.make_workload is harness.make_workload
    assert latency.LLAMA_8B is harness.LLAMA_8B
    assert preemption.model_spec is harness.model_spec


def test_llama8b_route_on_a_shrunken_config(tmp_path, monkeypatch):
    """The default --model llama8b path (config.json from LLAMA_8B, dummy weights) end to
    end on CPU, with the shared config dict shrunk to a toy of the same architecture."""
    for key, value in dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, head_dim=16, vocab_size=2000).items():
        monkeypatch.setitem(latency.LLAMA_8B, key, value)
    out = tmp_path / "latency.json"
    latency.main(["--device", "cpu", "--rates", "50", "--num-requests", "5", "--min-prompt", "4",
                  "--max-prompt", "12", "--min-output", "2", "--max-output", "4", "--hf-requests", "2",
                  "--kv-cache-gb", "0.01", "--out", str(out)])
    report = json.loads(out.read_text())
    assert report["args"]["model"] == "llama8b" and report["workload"]["vocab_size"] == 2000
    assert report["results"]["pagedserve"]["rates"][0]["completed"] == 5
    assert report["results"]["transformers_cb"]["rates"][0]["completed"] == 2
    out = tmp_path / "pbs.json"
    preemption.main(["--device", "cpu", "--block-sizes", "16", "--seq-lens", "32", "--reps", "1",
                     "--warmup", "0", "--pool-tokens", "256", "--out", str(out)])
    row = json.loads(out.read_text())["results"]["rows"][0]
    assert row["block_bytes"] == 2 * 2 * 16 * 2 * 16 * 4  # K+V, layers, tokens, kv heads, head dim, fp32
    assert row["roundtrip_exact"] is True


def test_host_overhead_runs_every_request_to_its_length():
    host = importlib.import_module("host_overhead")
    import argparse

    args = argparse.Namespace(num_requests=20, min_prompt=8, max_prompt=64, min_output=2, max_output=16,
                              seed=3, max_num_seqs=8, max_num_batched_tokens=128, max_model_len=256,
                              block_size=16, num_gpu_blocks=64, num_cpu_blocks=16, vocab_size=32000)
    run = host.run_once(args, None)
    workload = host.make_workload(args, args.vocab_size)
    assert run["generation_tokens"] == sum(n for _, n in workload)
    assert run["prompt_tokens"] >= sum(len(p) for p, _ in workload)  # recomputes count again
    assert run["steps"] > 0 and run["ms_per_step"] > 0


def test_cpu_vs_vllm_summary_and_parity():
    """The comparison's arithmetic on made-up runs (the runs themselves need vLLM's venv)."""
    bench = importlib.import_module("cpu_vs_vllm")
    workload = bench.make_workload(48, 49152, 0)
    assert len(workload) == 48 and workload == bench.make_workload(48, 49152, 0)
    assert all(16 <= len(p) <= 256 and 8 <= n <= 128 and min(p) >= 1000 for p, n in workload)
    runs = [
        {"engine": "pagedserve", "dtype": "float32", "condition": "idle", "tokens_per_s": 200.0,
         "token_ids": [[1, 2], [3]]},
        {"engine": "vllm", "dtype": "float32", "condition": "idle", "tokens_per_s": 150.0,
         "token_ids": [[1, 2], [4]]},
        {"engine": "pagedserve", "dtype": "float32", "condition": "busy", "tokens_per_s": 100.0,
         "token_ids": [[1, 2], [3]]},
        {"engine": "vllm", "dtype": "float32", "condition": "busy", "error": "timeout"},
        {"engine": "pagedserve", "dtype": "float32", "condition": "idle", "tokens_per_s": 220.0,
         "token_ids": [[1, 2], [3]]},
    ]
    s = bench.summarise(runs)
    assert s["float32/idle"] == {"pagedserve": [200.0, 220.0], "vllm": [150.0],
                                 "ratio_min_max": [1.33, 1.47]}
    assert s["float32/busy"] == {"pagedserve": [100.0], "pagedserve_busy_over_idle": 0.48}
    assert bench.parity(runs) == {"float32": "1/2"}


@pytest.mark.parametrize("mix, num, vocab, totals", [
    (harness.GPU_MIX, 1000, 128256, (574455, 272124)),  # docs/throughput_gpu.json
    (harness.GPU_MIX, 80, 128256, (45362, 25114)),  # docs/latency_gpu.json
    (harness.CPU_MIX, 64, 49152, (8993, 4581)),  # docs/throughput_cpu_fp32.json
    (harness.CPU_MIX, 48, 49152, (6298, 3388)),  # docs/throughput_cpu_vs_vllm.json
])
def test_the_shared_workload_is_the_one_the_published_figures_ran(mix, num, vocab, totals):
    import argparse

    ap = argparse.ArgumentParser()
    harness.add_workload_args(ap, num_requests=num, mix=mix)
    workload = harness.make_workload(ap.parse_args([]), vocab)
    assert (sum(len(p) for p, _ in workload), sum(n for _, n in workload)) == totals
    assert workload == harness.random_requests(num, vocab, 0, *mix)
    assert min(min(p) for p, _ in workload) >= 1000 and max(max(p) for p, _ in workload) < vocab


def test_the_timer_on_cpu_times_every_call_and_reports_no_device_time():
    calls = []
    wall, device = harness.timed(lambda: calls.append(1), cuda=False, reps=3)
    assert calls == [1, 1, 1] and wall >= 0 and device is None


def test_the_environment_record_names_machine_and_versions(tmp_path):
    env = harness.environment(extra_key=7)
    assert env["torch"] == torch.__version__ and env["extra_key"] == 7
    assert env["python"] and env["cpu"] and env["cpus"] >= env["usable_cpus"] >= 1
    harness.write_json(str(tmp_path / "r.json"), {"environment": env})
    assert json.loads((tmp_path / "r.json").read_text())["environment"] == env

"""The `pagedserve` command line: flags generated from the config dataclasses, the
PAGEDSERVE_* environment defaults, and one real `generate` run."""

from __future__ import annotations

import json

import pytest

from pagedserve import cli
from pagedserve.config import EngineConfig


def parse(argv, monkeypatch=None, **env):
    if monkeypatch is not None:
        for name, value in env.items():
            monkeypatch.setenv(name, value)
    return cli.build_parser().parse_args(argv)


def test_engine_and_sampling_flags_come_from_the_dataclasses():
    args = parse(["generate", "hi", "--block-size", "32", "--no-enable-prefix-caching",
                  "--preemption-mode", "swap", "--max-tokens", "5", "--stop", "a", "--stop", "b",
                  "--stop-token-ids", "7", "8", "--sampling-seed", "3", "--seed", "9",
                  "--ignore-eos"])
    config = cli.engine_config_from_args(args)
    assert (config.block_size, config.enable_prefix_caching, config.preemption_mode,
            config.seed) == (32, False, "swap", 9)
    assert config.max_num_seqs == EngineConfig().max_num_seqs  # not given: the default
    params = cli.sampling_params_from_args(args)
    assert (params.max_tokens, params.stop, params.stop_token_ids, params.seed,
            params.ignore_eos) == (5, ["a", "b"], [7, 8], 3, True)


def test_environment_sets_defaults_and_flags_win(monkeypatch):
    args = parse(["generate", "hi", "--max-num-seqs", "4"], monkeypatch,
                 PAGEDSERVE_MAX_NUM_SEQS="8", PAGEDSERVE_KV_CACHE_GB="0.5",
                 PAGEDSERVE_ENABLE_PREFIX_CACHING="off", PAGEDSERVE_STOP='["x", "y"]',
                 PAGEDSERVE_TEMPERATURE="0", PAGEDSERVE_JSON="true")
    config = cli.engine_config_from_args(args)
    assert (config.max_num_seqs, config.kv_cache_gb, config.enable_prefix_caching) == (4, 0.5, False)
    params = cli.sampling_params_from_args(args)
    assert (params.stop, params.temperature) == (["x", "y"], 0.0)
    assert args.json is True


@pytest.mark.parametrize("name,value,message", [
    ("PAGEDSERVE_BLOCK_SIZE", "x", "PAGEDSERVE_BLOCK_SIZE: invalid literal"),
    ("PAGEDSERVE_PREEMPTION_MODE", "sometimes", "PAGEDSERVE_PREEMPTION_MODE: 'sometimes' is not one of"),
    ("PAGEDSERVE_IGNORE_EOS", "maybe", "PAGEDSERVE_IGNORE_EOS: expected one of"),
])
def test_bad_environment_values_name_the_variable(monkeypatch, capsys, name, value, message):
    monkeypatch.setenv(name, value)
    assert cli.main(["generate", "hi"]) == 2
    assert message in capsys.readouterr().err


def test_bad_values_are_reported_without_a_traceback(capsys):
    assert cli.main(["generate", "hi", "--temperature", "-1"]) == 2
    assert "error: temperature must be >= 0, got -1.0" in capsys.readouterr().err
    assert cli.main(["generate", "hi", "--block-size", "3"]) == 2
    assert "block_size must be a power of two" in capsys.readouterr().err


def test_server_subcommands_plug_in():
    parser = cli.build_parser()
    choices = parser._subparsers._group_actions[0].choices
    assert "generate" in choices
    try:
        import pagedserve.server.cli  # noqa: F401
    except ModuleNotFoundError:
        return
    assert {"serve", "client"} <= set(choices)


def test_generate_runs_the_model(capsys):
    code = cli.main(["generate", "The capital of France is", "--temperature", "0",
                     "--max-tokens", "3", "--num-kv-blocks", "16", "--swap-space-gb", "0.01",
                     "--device", "cpu", "--json"])
    assert code == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["completions"][0]["text"] == " Paris.\n"
    assert line["usage"]["completion_tokens"] == 3
    assert line["completions"][0]["finish_reason"] == "length"


def test_bench_runs_the_workload_through_the_engine(capsys):
    # 6 prompts of 40 tokens + 12 new ones need 18 blocks of 16 tokens at once; a pool
    # of 12 makes the engine preempt, and every request must still get all its tokens.
    code = cli.main(["bench", "--num-prompts", "6", "--input-len", "40", "--output-len", "12",
                     "--num-kv-blocks", "12", "--swap-space-gb", "0.01", "--device", "cpu",
                     "--json"])
    assert code == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (result["num_prompts"], result["input_len"], result["output_len"]) == (6, 40, 12)
    assert result["kv_pool_blocks"] == 12 and result["preemptions"] > 0
    assert result["output_tokens_per_s"] > 0 and result["steps"] >= 12


@pytest.mark.parametrize("flag", ["--num-prompts", "--input-len", "--output-len"])
def test_bench_rejects_an_empty_workload(capsys, flag):
    assert cli.main(["bench", flag, "0", "--device", "cpu"]) == 2
    assert f"error: {flag} must be >= 1, got 0" in capsys.readouterr().err


def test_serve_flags_build_the_server_config(monkeypatch, tmp_path):
    pytest.importorskip("pagedserve.server.cli")
    from pagedserve.server.cli import server_config_from_args

    tokens = tmp_path / "tokens"
    tokens.write_text("alice:tok-a\nbare\n")
    monkeypatch.setenv("PAGEDSERVE_AUTH_TOKEN", "from-env")
    config = server_config_from_args(parse(["serve", "--host", "10.0.0.5"]))
    # Metrics follow --host unless told otherwise; one bare token from the environment.
    assert (config.metrics_bind_host, config.tenants_by_token) == \
        ("10.0.0.5", {"from-env": "default"})
    assert (config.step_timeout, config.engine_failure_exit_delay,
            config.metrics_tenant_label) == (120.0, 5.0, False)
    args = parse(["serve", "--auth-token-file", str(tokens), "--step-timeout", "30",
                  "--engine-failure-exit-delay", "1.5", "--metrics-tenant-label"],
                 monkeypatch, PAGEDSERVE_METRICS_HOST="127.0.0.1")
    config = server_config_from_args(args)
    assert config.metrics_bind_host == "127.0.0.1"
    assert config.tenants_by_token == {"tok-a": "alice", "bare": "default"}  # the file wins
    assert (config.step_timeout, config.engine_failure_exit_delay,
            config.metrics_tenant_label) == (30.0, 1.5, True)

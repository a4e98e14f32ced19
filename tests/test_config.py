"""EngineConfig: defaults, "auto" resolution, and field-naming validation errors."""

import pytest

from pagedserve.config import EngineConfig


def test_defaults_resolve_auto_on_cpu():
    c = EngineConfig()
    assert (c.device, c.dtype, c.block_size, c.gpu_memory_utilization) == ("cpu", "float32", 16, 0.9)
    assert c.model is None and c.num_kv_blocks is None and c.max_model_len is None
    assert c.preemption_mode == "auto" and c.load_format == "auto" and c.enable_prefix_caching
    assert not c.on_gpu


def test_auto_preemption_swaps_on_gpu_only(monkeypatch):
    assert EngineConfig().scheduler_preemption_mode == "auto"
    assert EngineConfig(preemption_mode="recompute").scheduler_preemption_mode == "recompute"
    monkeypatch.setattr("pagedserve.config._cuda_available", lambda: True)
    assert EngineConfig(device="cuda").scheduler_preemption_mode == "swap"
    assert EngineConfig(device="cuda", preemption_mode="recompute").scheduler_preemption_mode == "recompute"


def test_dtype_spellings_are_canonical():
    assert EngineConfig(dtype="bf16").dtype == "bfloat16"
    assert EngineConfig(dtype="HALF").dtype == "float16"
    assert str(EngineConfig(dtype="fp32").torch_dtype) == "torch.float32"


@pytest.mark.parametrize("field, value, message", [
    ("block_size", 0, "block_size must be >= 1, got 0"),
    ("block_size", 12, "block_size must be a power of two, got 12"),
    ("block_size", 16.0, "block_size must be an integer"),
    ("gpu_memory_utilization", 1.5, "gpu_memory_utilization must be in (0, 1], got 1.5"),
    ("kv_cache_gb", 0, "kv_cache_gb must be > 0"),
    ("kv_cache_gb", float("nan"), "kv_cache_gb must be a finite number"),
    ("num_kv_blocks", 0, "num_kv_blocks must be >= 1"),
    ("swap_space_gb", -1, "swap_space_gb must be >= 0"),
    ("preemption_mode", "drop", "preemption_mode must be one of auto, swap, recompute"),
    ("max_num_seqs", 0, "max_num_seqs must be >= 1"),
    ("max_num_batched_tokens", True, "max_num_batched_tokens must be an integer"),
    ("max_model_len", -5, "max_model_len must be >= 1"),
    ("enable_prefix_caching", "yes", "enable_prefix_caching must be a bool"),
    ("seed", "1", "seed must be an integer"),
    ("load_format", "pt", "load_format must be one of auto, dummy"),
    ("device", "tpu", "device must be auto, cpu or cuda[:N]"),
    ("device", "cpu:1", "device must be auto, cpu or cuda[:N]"),
    ("dtype", "int8", "dtype must be auto or one of"),
    ("model", "", "model must be a non-empty path or None"),
])
def test_bad_values_name_the_field(field, value, message):
    with pytest.raises(ValueError) as e:
        EngineConfig(**{field: value})
    assert str(e.value).startswith(message)


def test_cuda_without_a_device_is_a_clear_error():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(ValueError, match="no CUDA device is available"):
        EngineConfig(device="cuda")

"""Engine settings: one dataclass, the same names as `LLM` keyword arguments, CLI flags
(kebab case) and PAGEDSERVE_* variables. Validated on construction; "auto" values are
resolved here so every later reader sees a concrete device and dtype."""

from __future__ import annotations

import math
from dataclasses import dataclass

PREEMPTION_MODES = ("auto", "swap", "recompute")
LOAD_FORMATS = ("auto", "dummy")
# Accepted spellings -> canonical torch dtype names.
DTYPES = {
    "float32": "float32", "fp32": "float32", "float": "float32",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "float16": "float16", "fp16": "float16", "half": "float16",
}


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


@dataclass
class EngineConfig:
    model: str | None = None  # HF directory, GGUF file, or None = the embedded SmolLM2
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto (bfloat16 on GPU, float32 on CPU) | float32 | bfloat16 | float16
    block_size: int = 16  # tokens per KV block
    gpu_memory_utilization: float = 0.9  # share of GPU memory for weights, activations and KV
    kv_cache_gb: float = 2.0  # KV pool size on CPU (GiB)
    num_kv_blocks: int | None = None  # explicit KV block count; overrides both sizings above
    swap_space_gb: float = 2.0  # CPU swap pool (GiB), pinned host memory when on GPU
    preemption_mode: str = "auto"  # auto | swap | recompute
    max_num_seqs: int = 256  # sequences per step
    max_num_batched_tokens: int = 2048  # tokens per step (prompt chunks + decodes)
    max_model_len: int | None = None  # None = the model's own limit
    enable_prefix_caching: bool = True
    seed: int = 0  # seeds dummy weights and unseeded sampling
    load_format: str = "auto"  # auto | dummy (random weights of the config's shape)
    cpu_threads: int | None = None  # torch CPU threads (auto: from the cgroup quota and affinity)
    # Schedule step N+1 while step N runs on the device (None = on with CUDA, where it
    # hides the host's work behind the GPU's; a CPU forward leaves nothing to hide).
    async_scheduling: bool | None = None
    tensor_parallel_size: int = 1  # GPUs (CPU: processes) each holding a slice of the model
    # Seconds every tensor-parallel rank gets to join the process group at start-up.
    distributed_timeout_s: float = 300.0
    structured_compile_threads: int = 2  # threads compiling structured-output constraints
    # A request whose constraint takes longer to compile is turned down (INVALID_ARGUMENT).
    structured_compile_timeout_s: float = 10.0  # compile time limit of a constraint (s)

    def __post_init__(self) -> None:
        if self.model is not None and (not isinstance(self.model, str) or not self.model):
            raise ValueError(f"model must be a non-empty path or None, got {self.model!r}")
        self._check_device()
        self._check_dtype()
        self._check_int("block_size", 1)
        if self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        self._check_float("gpu_memory_utilization")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(
                f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        self._check_float("kv_cache_gb")
        if self.kv_cache_gb <= 0:
            raise ValueError(f"kv_cache_gb must be > 0, got {self.kv_cache_gb}")
        if self.num_kv_blocks is not None:
            self._check_int("num_kv_blocks", 1)
        self._check_float("swap_space_gb")
        if self.swap_space_gb < 0:
            raise ValueError(f"swap_space_gb must be >= 0, got {self.swap_space_gb}")
        if self.preemption_mode not in PREEMPTION_MODES:
            raise ValueError(f"preemption_mode must be one of {', '.join(PREEMPTION_MODES)}, "
                             f"got {self.preemption_mode!r}")
        self._check_int("max_num_seqs", 1)
        self._check_int("max_num_batched_tokens", 1)
        if self.max_model_len is not None:
            self._check_int("max_model_len", 1)
        if not isinstance(self.enable_prefix_caching, bool):
            raise ValueError(
                f"enable_prefix_caching must be a bool, got {self.enable_prefix_caching!r}")
        self._check_int("seed", None)
        if self.cpu_threads is not None:
            self._check_int("cpu_threads", 1)
        if self.async_scheduling is None:
            self.async_scheduling = self.on_gpu
        elif not isinstance(self.async_scheduling, bool):
            raise ValueError(f"async_scheduling must be a bool, got {self.async_scheduling!r}")
        self._check_int("tensor_parallel_size", 1)
        self._check_float("distributed_timeout_s")
        if self.distributed_timeout_s <= 0:
            raise ValueError(f"distributed_timeout_s must be > 0, got {self.distributed_timeout_s}")
        self._check_int("structured_compile_threads", 1)
        self._check_float("structured_compile_timeout_s")
        if self.structured_compile_timeout_s <= 0:
            raise ValueError(f"structured_compile_timeout_s must be > 0, "
                             f"got {self.structured_compile_timeout_s}")
        if self.load_format not in LOAD_FORMATS:
            raise ValueError(f"load_format must be one of {', '.join(LOAD_FORMATS)}, "
                             f"got {self.load_format!r}")

    @property
    def on_gpu(self) -> bool:
        return self.device.startswith("cuda")

    @property
    def scheduler_preemption_mode(self) -> str:
        """The mode the scheduler applies. `auto` on a GPU is `swap` (recompute only when
        the CPU pool is full): there a swap round trip measured 4-9x cheaper than
        recomputing, single sequences included (docs/throughput_gpu.md). On CPU `auto`
        swaps groups of several sequences and recomputes single ones."""
        return "swap" if self.preemption_mode == "auto" and self.on_gpu else self.preemption_mode

    def _check_device(self) -> None:
        device = self.device
        if not isinstance(device, str):
            raise ValueError(f"device must be auto, cpu or cuda[:N], got {device!r}")
        device = device.strip().lower()
        if device == "auto":
            device = "cuda" if _cuda_available() else "cpu"
        elif device == "gpu":
            device = "cuda"
        head, _, index = device.partition(":")
        if head not in ("cpu", "cuda") or (index and (head == "cpu" or not index.isdigit())):
            raise ValueError(f"device must be auto, cpu or cuda[:N], got {self.device!r}")
        if head == "cuda" and not _cuda_available():
            raise ValueError(f"device {self.device!r} asked for CUDA but no CUDA device is available")
        self.device = device

    def _check_dtype(self) -> None:
        dtype = self.dtype.strip().lower() if isinstance(self.dtype, str) else None
        if dtype == "auto":
            self.dtype = "bfloat16" if self.on_gpu else "float32"
        elif dtype in DTYPES:
            self.dtype = DTYPES[dtype]
        else:
            raise ValueError(f"dtype must be auto or one of {', '.join(sorted(set(DTYPES.values())))}, "
                             f"got {self.dtype!r}")

    @property
    def torch_dtype(self):
        import torch

        return getattr(torch, self.dtype)

    def _check_int(self, name: str, minimum: int | None) -> None:
        value = getattr(self, name)
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError(f"{name} must be an integer, got {value!r}")
        if minimum is not None and value < minimum:
            raise ValueError(f"{name} must be >= {minimum}, got {value}")

    def _check_float(self, name: str) -> None:
        value = getattr(self, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value!r}")
        setattr(self, name, float(value))

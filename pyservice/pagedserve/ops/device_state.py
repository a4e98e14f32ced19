"""What the CUDA ops keep per device: its facts (SMs, what the tensor-core kernels fit),
its launch options (which tests and benchmarks change through ``options``), and the
buffers and caches that live from launch to launch (split-KV counters, validated swap
sets, tables kept alive by captured graphs).

One ``CudaDevice`` per device index, looked up with ``cuda_device``; nothing here is
a module global that a caller flips."""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import weakref
from collections import OrderedDict
from typing import Callable

import torch

from . import launch_plan
from .launch_plan import NO_TC, TcFit
from .loaders import get_loader


@dataclasses.dataclass
class LaunchOptions:
    """Choices of one device's launches; the defaults are the engine's."""
    # fp16/bf16 prefill on the tensor-core kernel where the GPU runs it; False forces the
    # CUDA-core kernel (benchmarks and tests compare the two)
    prefill_tensor_cores: bool = True
    # split-KV target (launch_plan.decode_plan): None the planner's; huge forces the
    # split, 0 forbids it
    target_ctas_per_sm: int | None = None
    # tensor-core decode pipeline depth: None the planner's; 2 or 3 forces one
    decode_tc_stages: int | None = None


def _resident_ctas(props, smem: int) -> int:
    """CTAs of `smem` dynamic shared-memory bytes that fit one SM; 0 where the
    tensor-core kernels cannot run (before sm_80, or over the per-block opt-in limit)."""
    if props.major < 8:
        return 0
    per_block = getattr(props, "shared_memory_per_block_optin", 0) or (227 << 10 if props.major >= 9 else 99 << 10)
    per_sm = getattr(props, "shared_memory_per_multiprocessor", 0) or per_block + (1 << 10)
    if smem > per_block:
        return 0
    return max(1, min(4, per_sm // (smem + 1024)))  # 1 KiB per CTA is reserved by the driver


class CudaDevice:
    # Validated swap sets kept per device (see swap_set).
    SWAP_SETS_MAX = 8

    def __init__(self, index: int, props=None):
        self.index = index
        self.device = torch.device("cuda", index)
        self.props = props if props is not None else torch.cuda.get_device_properties(index)
        self.num_sms = self.props.multi_processor_count
        self.options = LaunchOptions()
        self._tc_fit: dict[int, TcFit] = {}
        self._prefill_tc_ok: dict[int, bool] = {}
        self._counters: torch.Tensor | None = None
        self._retired_counters: list[torch.Tensor] = []
        self._graph_tables: list[torch.Tensor] = []
        self._swap_sets: OrderedDict = OrderedDict()

    @contextlib.contextmanager
    def override(self, **options):
        """Launch options changed for the duration of a with-block (tests, benchmarks)."""
        old = self.options
        self.options = dataclasses.replace(old, **options)
        try:
            yield self.options
        finally:
            self.options = old

    # ---- what the kernels fit on this device ----

    def tc_fit(self, head_size: int) -> TcFit:
        """The tensor-core decode kernel's depths and occupancy here (NO_TC: it cannot run)."""
        fit = self._tc_fit.get(head_size)
        if fit is None:
            fit = self._tc_fit[head_size] = self._compute_tc_fit(head_size)
        return fit

    def _compute_tc_fit(self, head_size: int) -> TcFit:
        table = get_loader().launch_table()
        deep = table.decode_tc_max_stages(head_size)
        if deep < 2:
            return NO_TC
        shallow = min(launch_plan.TC_REG_CTAS_PER_SM,
                      _resident_ctas(self.props, table.decode_tc_smem_bytes(head_size, 2)))
        if shallow == 0:
            return NO_TC
        fits_deep = deep > 2 and _resident_ctas(self.props, table.decode_tc_smem_bytes(head_size, deep)) > 0
        return TcFit(deep if fits_deep else 2, shallow)

    def prefill_tensor_cores(self, head_size: int, dtype: torch.dtype) -> bool:
        """Whether this prefill runs on the tensor-core kernel."""
        if not self.options.prefill_tensor_cores or dtype == torch.float32:
            return False
        ok = self._prefill_tc_ok.get(head_size)
        if ok is None:
            smem = get_loader().launch_table().prefill_smem_bytes(head_size, tensor_cores=True)
            ok = self._prefill_tc_ok[head_size] = _resident_ctas(self.props, smem) > 0
        return ok

    def decode_plan(self, num_seqs: int, num_heads: int, num_kv_heads: int, max_context: int,
                    head_size: int, dtype: torch.dtype) -> tuple[int, int, int, int]:
        """launch_plan.decode_plan with this device's SMs, fit and options."""
        tc = self.tc_fit(head_size) if dtype != torch.float32 else NO_TC
        return launch_plan.decode_plan(num_seqs, num_heads, num_kv_heads, max_context, self.num_sms, tc,
                                       head_size, target_ctas_per_sm=self.options.target_ctas_per_sm,
                                       tc_stages=self.options.decode_tc_stages)

    # ---- buffers that live from launch to launch ----

    def split_counters(self, n: int) -> torch.Tensor:
        """Split-KV arrival counters: the last CTA of each (sequence, head group) merges
        the partitions and puts its counter back to 0, so one zeroed buffer per device
        serves every launch without clearing it again (no memset per step, also under
        CUDA graphs). Split launches on one device must therefore not overlap (two
        streams running split decodes at once); the engine runs one stream. Replaced
        buffers stay referenced: a captured CUDA graph may still point at them."""
        buf = self._counters
        if buf is not None and buf.numel() >= n:
            return buf
        fresh = torch.zeros(max(n, 4096), dtype=torch.int32, device=self.device)
        if torch.cuda.is_current_stream_capturing():
            return fresh  # graph-pool memory, zeroed by a node of the graph: not for eager reuse
        if buf is not None:
            self._retired_counters.append(buf)
        self._counters = fresh
        return fresh

    def keep_graph_table(self, host: torch.Tensor) -> None:
        """A pinned table uploaded inside a captured CUDA graph (tests, experiments: the
        engine captures no copies): every replay reads it again, so it is never reused
        or freed."""
        self._graph_tables.append(host)

    def swap_set(self, srcs: list, dsts: list, validate: Callable):
        """validate(srcs, dsts), remembered for recent cache lists keyed by the tensors'
        ids and confirmed through weak references: an engine swapping the same 64 layer
        caches every step pays the per-tensor checks (about 5 us each) once. Caches are
        never resized or re-pointed in place."""
        key = (tuple(map(id, srcs)), tuple(map(id, dsts)))
        hit = self._swap_sets.get(key)
        if hit is not None and all(r() is t for r, t in zip(hit[0], itertools.chain(srcs, dsts))):
            return hit[1]
        info = validate(srcs, dsts)
        self._swap_sets[key] = ([weakref.ref(t) for t in itertools.chain(srcs, dsts)], info)
        while len(self._swap_sets) > self.SWAP_SETS_MAX:
            self._swap_sets.popitem(last=False)
        return info


_devices: dict[int, CudaDevice] = {}
# The same states keyed by what callers pass (an index, a torch.device with one): every
# launch looks its device up, and one dict hit is the cheapest way (about 0.1 us).
_by_key: dict = {}


def cuda_device(device) -> CudaDevice:
    """The state of a CUDA device (an index, a torch.device or its name; None or an
    index-less device: the current one), created on first use."""
    state = _by_key.get(device)
    return state if state is not None else _lookup(device)


def _lookup(device) -> CudaDevice:
    key = device
    if isinstance(device, str):
        device = torch.device(device)
    if isinstance(device, torch.device):
        if device.type != "cuda":
            raise ValueError(f"{device} is not a CUDA device")
        device = device.index
    index = torch.cuda.current_device() if device is None else int(device)
    state = _devices.get(index)
    if state is None:
        state = _devices[index] = CudaDevice(index)
    if device is not None and not isinstance(key, str):  # "the current device" is no key
        _by_key[key] = state
    return state

"""The two loaders of the CUDA kernels in cuda/*.cuh.

* ``compiled``: the pybind11 module ``pagedserve._cuda`` built by CMake/nvcc.
* ``cupy``: the same .cuh sources compiled at run time by NVRTC through CuPy,
  for installs built without nvcc.

Both expose the same functions with the same keyword arguments (device
pointers as ints, shapes, dtype codes, grids, the raw stream handle), so the launch
plans (``launch_plan``), the grids (``launch_table``) and the launches
(``_cuda_ops``, ``_cuda_layer_ops``) are written once, and both return the launch
table of cuda/launch_table.cuh that those grids come from. The default is
``compiled`` when it imports, else ``cupy``; ``set_loader`` forces one (tests run
both).
"""

from __future__ import annotations

import ctypes
import pathlib
import re

import numpy as np

from .launch_table import KERNEL_CODES, QPB_TC, LaunchTable

LOADERS = ("compiled", "cupy")
_forced: str | None = None
_instances: dict[str, object] = {}


def set_loader(name: str | None) -> None:
    """Force a loader by name, or None for the default choice."""
    if name is not None and name not in LOADERS:
        raise ValueError(f"loader must be one of {LOADERS}, got {name!r}")
    global _forced
    _forced = name


def get_loader(name: str | None = None):
    name = name or _forced
    if name is None:
        try:
            return get_loader("compiled")
        except ImportError:
            return get_loader("cupy")
    if name not in _instances:
        _instances[name] = CompiledLoader() if name == "compiled" else CupyLoader()
    return _instances[name]


def available_loaders() -> list[str]:
    found = []
    for name in LOADERS:
        try:
            get_loader(name)
            found.append(name)
        except ImportError:
            pass
    return found


class CompiledLoader:
    name = "compiled"

    def __init__(self):
        from pagedserve import _cuda  # ImportError when built without nvcc

        self.decode = _cuda.decode
        self.prefill = _cuda.prefill
        self.write_kv = _cuda.write_kv
        self.copy_blocks = _cuda.copy_blocks
        self.copy_blocks_from_host = _cuda.copy_blocks_from_host
        self.memcpy_block_runs = _cuda.memcpy_block_runs
        self.first_unpinned = _cuda.first_unpinned
        self.silu_and_mul = _cuda.silu_and_mul
        self.fused_add_rms_norm = _cuda.fused_add_rms_norm
        self.rotary = _cuda.rotary
        self.gemv = _cuda.gemv
        self._table = LaunchTable(_cuda.launch_table())

    def launch_table(self) -> LaunchTable:
        return self._table


# The headers of cuda/ in include order (each after those it includes).
KERNEL_HEADERS = ("common.cuh", "cache_ops.cuh", "decode.cuh", "mma_tile.cuh", "decode_tc.cuh",
                  "prefill.cuh", "prefill_tc.cuh", "layer_ops.cuh", "gemv.cuh", "launch_table.cuh")
# Rows the NVRTC loader reads back (LAUNCH_TABLE_MAX, LAUNCH_ROW_INTS in launch_table.cuh).
LAUNCH_TABLE_MAX, LAUNCH_ROW_INTS = 128, 6


def kernel_source_dir() -> pathlib.Path:
    """The .cuh files: shipped inside the package, or cuda/ of a source tree."""
    here = pathlib.Path(__file__).resolve()
    for cand in (here.parent.parent / "cuda_src", here.parents[3] / "cuda"):
        if (cand / "all_kernels.cuh").is_file():
            return cand
    raise ImportError("CUDA kernel sources (all_kernels.cuh) not found")


def kernel_source() -> str:
    """One self-contained translation unit: the headers inlined in order, so
    CuPy's on-disk kernel cache keys on the real source text."""
    d = kernel_source_dir()
    parts = []
    for name in KERNEL_HEADERS:
        text = (d / name).read_text()
        parts.append(re.sub(r'^#include ".*"$', "", text, flags=re.M))
    return "\n".join(parts)


def _log2(v: int, name: str) -> int:
    if v <= 0 or v & (v - 1):
        raise ValueError(f"{name} must be a power of 2, got {v}")
    return v.bit_length() - 1


class CupyLoader:
    name = "cupy"

    def __init__(self, extra_options: tuple[str, ...] = ()):
        import cupy  # ImportError when CuPy is missing

        self._cp = cupy
        self._source = kernel_source()
        self._options = ("-std=c++17",) + tuple(extra_options)
        self._modules: dict[tuple, object] = {}
        self._streams: dict[int, object] = {}
        self._staging: dict[int, _TableStaging] = {}
        self._table: LaunchTable | None = None

    def _module(self, key: tuple, names: list[str]):
        mod = self._modules.get(key)
        if mod is None:
            mod = self._cp.RawModule(code=self._source, options=self._options,
                                     name_expressions=names)
            self._modules[key] = mod
        return mod

    def launch_table(self) -> LaunchTable:
        """The rows of cuda/launch_table.cuh, computed on the current device once (the
        loaders' grids need it before the first launch of anything, so it is read back
        before any CUDA graph capture on a warmed-up engine)."""
        if self._table is None:
            cp = self._cp
            import torch

            if torch.cuda.is_current_stream_capturing():
                raise RuntimeError("the NVRTC loader reads its launch table back from the device: "
                                   "run one launch before capturing a CUDA graph")
            fn = self._module(("table",), ["ps::launch_table_kernel"]).get_function("ps::launch_table_kernel")
            with cp.cuda.Device(torch.cuda.current_device()):
                rows = cp.zeros((LAUNCH_TABLE_MAX, LAUNCH_ROW_INTS), dtype=cp.int32)
                count = cp.zeros(1, dtype=cp.int32)
                fn((1, 1, 1), (1, 1, 1), (rows, count))
                n = int(count.get()[0])
                self._table = LaunchTable(rows[:n].get().tolist())
        return self._table

    def _attention_fn(self, dtype: int, head_size: int, name: str):
        table = self.launch_table()
        names = [f"ps::paged_decode_kernel<{dtype},{head_size},{q}>"
                 for q in table.variants("decode", head_size)]
        if dtype != 0:  # no fp32 tensor-core path
            names += [f"ps::paged_decode_tc_kernel<{dtype},{head_size},{st}>"
                      for st in table.variants("decode_tc", head_size)]
            names.append(f"ps::paged_prefill_tc_kernel<{dtype},{head_size}>")
        names.append(f"ps::paged_prefill_kernel<{dtype},{head_size}>")
        return self._module((dtype, head_size), names).get_function(name)

    def _launch(self, fn, grid, block, args, stream, smem=0):
        cp = self._cp
        import torch

        with cp.cuda.Device(torch.cuda.current_device()):
            st = self._streams.get(stream)
            if st is None:
                st = self._streams[stream] = cp.cuda.ExternalStream(stream)
            with st:
                fn(grid, block, args, shared_mem=smem)

    def decode(self, *, dtype, head_size, qpb, stages, out, part_out, part_ml, q, q_stride, key_cache,
               value_cache, block_tables, bt_stride, context_lens, split_counters, num_heads,
               num_kv_heads, block_size, scale, part_tokens, grid_x, grid_y, grid_z, stream):
        if qpb == QPB_TC and dtype == 0:
            raise ValueError(f"qpb {qpb} is not supported for dtype code {dtype}")
        if grid_z > 1 and not split_counters:
            raise ValueError(f"split_counters is required with {grid_z} partitions")
        shape = self.launch_table().decode_shape(head_size, qpb, stages)  # ValueError: no such kernel
        bs_log2 = _log2(block_size, "block_size")
        name = (f"ps::paged_decode_tc_kernel<{dtype},{head_size},{stages}>" if qpb == QPB_TC
                else f"ps::paged_decode_kernel<{dtype},{head_size},{qpb}>")
        fn = self._attention_fn(dtype, head_size, name)
        if shape.smem_bytes > 48 * 1024:
            fn.max_dynamic_shared_size_bytes = shape.smem_bytes
        u, i32, i64 = np.uint64, np.int32, np.int64
        args = (u(out), u(part_out), u(part_ml), u(q), i64(q_stride), u(key_cache), u(value_cache),
                u(block_tables), i32(bt_stride), u(context_lens), u(split_counters), i32(num_heads),
                i32(num_kv_heads), i32(bs_log2), np.float32(scale), i32(part_tokens))
        self._launch(fn, (grid_x, grid_y, grid_z), (shape.threads, 1, 1), args, stream,
                     smem=shape.smem_bytes)

    def prefill(self, *, dtype, head_size, out, q, q_stride, key_cache, value_cache,
                block_tables, bt_stride, query_start_loc, context_lens, num_seqs, num_heads,
                num_kv_heads, block_size, scale, tensor_cores, grid_x, grid_y, stream):
        if grid_x == 0:
            return
        if tensor_cores and dtype == 0:
            raise ValueError(f"tensor_cores with dtype code {dtype} is not supported")
        kernel = "prefill_tc" if tensor_cores else "prefill"
        shape = self.launch_table().shape(kernel, head_size)  # ValueError: no such head size
        bs_log2 = _log2(block_size, "block_size")
        fn = self._attention_fn(dtype, head_size, f"ps::paged_{kernel}_kernel<{dtype},{head_size}>")
        if shape.smem_bytes > 48 * 1024:
            fn.max_dynamic_shared_size_bytes = shape.smem_bytes
        u, i32 = np.uint64, np.int32
        args = (u(out), u(q), np.int64(q_stride), u(key_cache), u(value_cache), u(block_tables),
                i32(bt_stride), u(query_start_loc), u(context_lens), i32(num_seqs),
                i32(num_heads), i32(num_kv_heads), i32(bs_log2), np.float32(scale))
        self._launch(fn, (grid_x, grid_y, 1), (shape.threads, 1, 1), args, stream, smem=shape.smem_bytes)

    def _cache_fn(self, name: str):
        return self._module(("cache",), ["ps::write_kv_kernel", "ps::copy_blocks_kernel"]).get_function(name)

    def write_kv(self, key, value, key_cache, value_cache, slot_mapping, key_stride, value_stride,
                 num_tokens, num_kv_heads, row_bytes, block_size, stream):
        if num_tokens == 0:
            return
        if row_bytes % 16:
            raise ValueError(f"row_bytes {row_bytes} must be a multiple of 16")
        u = np.uint64
        args = (u(key), u(value), u(key_cache), u(value_cache), u(slot_mapping),
                np.int64(key_stride), np.int64(value_stride), np.int32(num_kv_heads),
                np.int32(row_bytes // 16), np.int32(_log2(block_size, "block_size")))
        self._launch(self._cache_fn("ps::write_kv_kernel"), (num_tokens, 1, 1), (128, 1, 1), args, stream)

    def copy_blocks(self, src_ptrs, dst_ptrs, mapping, num_pairs, num_tensors, block_bytes, stream):
        if num_pairs == 0 or num_tensors == 0:
            return
        u = np.uint64
        args = (u(src_ptrs), u(dst_ptrs), u(mapping), np.int64(block_bytes))
        self._launch(self._cache_fn("ps::copy_blocks_kernel"), (num_pairs, num_tensors, 1),
                     (256, 1, 1), args, stream)

    def copy_blocks_from_host(self, device, src_ptrs, dst_ptrs, pairs, num_pairs, num_tensors,
                              block_bytes, stream):
        """As the compiled one: the host tables go up through reused buffers of the
        device (torch tensors; `stream` is torch's current one); False while a graph is
        captured."""
        import torch

        dev = torch.device("cuda", device)
        with torch.cuda.device(dev):
            if torch.cuda.is_current_stream_capturing():
                return False
            staging = self._staging.get(device)
            if staging is None:
                staging = self._staging[device] = _TableStaging(dev)
            table = staging.upload([_host_i64(src_ptrs, num_tensors), _host_i64(dst_ptrs, num_tensors),
                                    _host_i64(pairs, 2 * num_pairs)], stream)
            self.copy_blocks(table, table + 8 * num_tensors, table + 16 * num_tensors, num_pairs,
                             num_tensors, block_bytes, stream)
            staging.used.record()
        return True

    def memcpy_block_runs(self, ptrs, runs, num_runs, num_tensors, block_bytes, stream):
        p = _host_i64(ptrs, 2 * num_tensors).tolist()
        r = _host_i64(runs, 3 * num_runs).tolist()
        memcpy, kind = self._cp.cuda.runtime.memcpyAsync, 4  # cudaMemcpyDefault
        for t in range(num_tensors):
            src, dst = p[t], p[num_tensors + t]
            for i in range(num_runs):
                s, d, n = r[3 * i:3 * i + 3]
                memcpy(dst + d * block_bytes, src + s * block_bytes, n * block_bytes, kind, stream)

    def _layer_fn(self, name: str, dtype: int):
        names = [f"ps::{k}<{dtype}>" for k in
                 ("silu_and_mul_kernel", "fused_add_rms_norm_kernel", "rotary_kernel")]
        return self._module(("layer", dtype), names).get_function(f"ps::{name}<{dtype}>")

    def silu_and_mul(self, dtype, out, x, num_tokens, inter, threads, chunks, stream):
        if num_tokens == 0:
            return
        u = np.uint64
        self._launch(self._layer_fn("silu_and_mul_kernel", dtype), (num_tokens, chunks, 1),
                     (threads, 1, 1), (u(out), u(x), np.int32(inter)), stream)

    def fused_add_rms_norm(self, dtype, out, residual, x, weight, num_tokens, hidden, eps, threads,
                           stream):
        if num_tokens == 0:
            return
        u = np.uint64
        args = (u(out), u(residual), u(x), u(weight), np.int32(hidden), np.float32(eps))
        self._launch(self._layer_fn("fused_add_rms_norm_kernel", dtype), (num_tokens, 1, 1),
                     (threads, 1, 1), args, stream)

    def rotary(self, dtype, x, row_stride, positions, cos_table, sin_table, num_tokens, num_heads,
               head_size, threads, stream):
        if num_tokens == 0:
            return
        u, i32 = np.uint64, np.int32
        args = (u(x), np.int64(row_stride), u(positions), u(cos_table), u(sin_table),
                i32(num_heads), i32(head_size))
        self._launch(self._layer_fn("rotary_kernel", dtype), (num_tokens, 1, 1), (threads, 1, 1),
                     args, stream)

    def gemv(self, dtype, out, x, w, m, n, k, rows_per_warp, grid_x, stream):
        if m == 0 or n == 0:
            return
        table = self.launch_table()
        shape = table.shape("gemv", m, rows_per_warp)  # ValueError: more rows than it takes
        names = [f"ps::gemv_kernel<{dtype},{size},{r}>" for code, size, r, *_ in table.rows
                 if code == KERNEL_CODES["gemv"]]
        fn = self._module(("gemv", dtype), names).get_function(f"ps::gemv_kernel<{dtype},{m},{rows_per_warp}>")
        u, i32 = np.uint64, np.int32
        self._launch(fn, (grid_x, 1, 1), (shape.threads, 1, 1), (u(out), u(x), u(w), i32(n), i32(k)), stream)

    def first_unpinned(self, ptrs, count):
        rt = self._cp.cuda.runtime
        for i, p in enumerate(_host_i64(ptrs, count).tolist()):
            try:
                if rt.pointerGetAttributes(p).type == 0:  # cudaMemoryTypeUnregistered
                    return i
            except rt.CUDARuntimeError:
                return i
        return -1


class _TableStaging:
    """Grow-only pinned and device buffers of one device (torch tensors) for the tables
    a copy launch reads, reused call after call on torch's current stream. On the same
    stream as the last call, the pinned side must only have left (the `uploaded`
    event): the new upload queues after the last launch. On another stream, the last
    launch must be done (`used`, recorded by the caller after it)."""

    def __init__(self, device):
        import torch

        self.device = device
        self.host = torch.empty(0, dtype=torch.int64)
        self.dev = torch.empty(0, dtype=torch.int64, device=device)
        self.uploaded = torch.cuda.Event()
        self.used = torch.cuda.Event()
        self.last_stream: int | None = None

    def upload(self, parts: list, stream: int) -> int:
        """Writes the int64 arrays in order and returns the device address."""
        import torch

        size = sum(len(p) for p in parts)
        (self.uploaded if stream == self.last_stream else self.used).synchronize()
        self.last_stream = stream
        if size > self.host.numel():
            cap = max(size, 2 * self.host.numel(), 4096)
            self.host = torch.empty(cap, dtype=torch.int64, pin_memory=True)
            self.dev = torch.empty(cap, dtype=torch.int64, device=self.device)
        h, at = self.host.numpy(), 0
        for part in parts:
            h[at:at + len(part)] = part
            at += len(part)
        self.dev[:size].copy_(self.host[:size], non_blocking=True)
        self.uploaded.record()
        return self.dev.data_ptr()


def _host_i64(address: int, n: int) -> np.ndarray:
    """A view of n int64 values at a host address (the loaders' host-array arguments)."""
    return np.ctypeslib.as_array((ctypes.c_int64 * n).from_address(address)) if n else np.empty(0, np.int64)

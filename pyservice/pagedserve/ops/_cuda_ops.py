"""CUDA path of pagedserve.ops: checks torch tensors, chooses the launch plan (with
the device's state, device_state.py) and the grid (launch_table.py), and calls the
active loader (compiled or CuPy) with raw pointers and torch's current stream."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from .device_state import cuda_device
from .loaders import get_loader

DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
HEAD_SIZES = (64, 80, 96, 128, 256)


def _stream(t: torch.Tensor) -> int:
    return torch.cuda.current_stream(t.device).cuda_stream


def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def _check_cache(name: str, cache: torch.Tensor, dtype: torch.dtype, device) -> None:
    _require(cache.dim() == 4, f"{name} must be [num_blocks, num_kv_heads, block_size, head_size], "
             f"got shape {tuple(cache.shape)}")
    _require(cache.dtype == dtype, f"{name} dtype {cache.dtype} does not match {dtype}")
    _require(cache.device == device, f"{name} is on {cache.device}, expected {device}")
    _require(cache.is_contiguous(), f"{name} must be contiguous")


def _rows_ok(x: torch.Tensor) -> bool:
    """Last two dims contiguous and rows 16-byte aligned, as the 16-byte loads need."""
    es = x.element_size()
    return (x.stride(-1) == 1 and x.stride(-2) == x.shape[-1]
            and (x.stride(0) * es) % 16 == 0 and x.data_ptr() % 16 == 0)


def _out(out, query):
    if out is None:
        return torch.empty(query.shape, dtype=query.dtype, device=query.device)
    _require(out.shape == query.shape and out.dtype == query.dtype and out.device == query.device
             and out.is_contiguous(), "out must be a contiguous tensor shaped like query")
    return out


def _attention_checks(name, query, key_cache, value_cache, block_tables, context_lens):
    _require(query.dim() == 3, f"query must be 3-D [{name}, num_heads, head_size], got {tuple(query.shape)}")
    _require(query.dtype in DTYPE_CODES, f"query dtype {query.dtype} is not supported on CUDA")
    _check_cache("key_cache", key_cache, query.dtype, query.device)
    _check_cache("value_cache", value_cache, query.dtype, query.device)
    _require(value_cache.shape == key_cache.shape, "value_cache shape must equal key_cache shape")
    head_size = query.shape[2]
    _require(head_size in HEAD_SIZES, f"head_size must be one of {HEAD_SIZES}, got {head_size}")
    _require(key_cache.shape[3] == head_size, f"key_cache head_size {key_cache.shape[3]} != query's {head_size}")
    _require(query.shape[1] % key_cache.shape[1] == 0,
             f"num_heads {query.shape[1]} must be a multiple of num_kv_heads {key_cache.shape[1]}")
    _require(block_tables.dtype == torch.int32 and block_tables.dim() == 2,
             "block_tables must be int32 [num_seqs, max_blocks]")
    _require(context_lens.dtype == torch.int32, "context_lens must be int32")
    _require(block_tables.device == query.device and context_lens.device == query.device,
             "block_tables and context_lens must be on the query's device")


def decode_attention(query, key_cache, value_cache, block_tables, context_lens, scale, out=None):
    _attention_checks("num_seqs", query, key_cache, value_cache, block_tables, context_lens)
    if not _rows_ok(query):
        query = query.contiguous()
    num_seqs, num_heads, head_size = query.shape
    num_kv_heads, block_size = key_cache.shape[1], key_cache.shape[2]
    _require(block_tables.shape[0] == num_seqs and context_lens.shape[0] == num_seqs,
             "block_tables and context_lens must have num_seqs rows")
    _require(num_seqs <= 65535, f"num_seqs must be <= 65535, got {num_seqs}")
    out = _out(out, query)
    if num_seqs == 0:
        return out
    block_tables = block_tables if block_tables.stride(1) == 1 else block_tables.contiguous()
    context_lens = context_lens.contiguous()
    state = cuda_device(query.device)
    qpb, part_tokens, nparts, stages = state.decode_plan(
        num_seqs, num_heads, num_kv_heads, block_tables.shape[1] * block_size, head_size, query.dtype)
    part_out = part_ml = counters = None
    stream = _stream(query)
    with torch.cuda.device(query.device):
        loader = get_loader()
        grid = loader.launch_table().decode_grid(head_size, qpb, stages, num_seqs, num_heads, num_kv_heads,
                                                 nparts)
        if nparts > 1:
            part_out = torch.empty(num_seqs, num_heads, nparts, head_size, dtype=torch.float32, device=query.device)
            part_ml = torch.empty(num_seqs, num_heads, nparts, 2, dtype=torch.float32, device=query.device)
            counters = state.split_counters(num_seqs * grid[0])  # one per CTA of a partition
        loader.decode(
            dtype=DTYPE_CODES[query.dtype], head_size=head_size, qpb=qpb, stages=stages,
            out=out.data_ptr(),
            part_out=0 if part_out is None else part_out.data_ptr(),
            part_ml=0 if part_ml is None else part_ml.data_ptr(), q=query.data_ptr(),
            q_stride=query.stride(0), key_cache=key_cache.data_ptr(),
            value_cache=value_cache.data_ptr(), block_tables=block_tables.data_ptr(),
            bt_stride=block_tables.stride(0), context_lens=context_lens.data_ptr(),
            split_counters=0 if counters is None else counters.data_ptr(),
            num_heads=num_heads, num_kv_heads=num_kv_heads, block_size=block_size,
            scale=float(scale), part_tokens=part_tokens, grid_x=grid[0], grid_y=grid[1],
            grid_z=grid[2], stream=stream)
    return out


def prefill_attention(query, key_cache, value_cache, block_tables, query_start_loc, context_lens, scale,
                      out=None):
    _attention_checks("num_tokens", query, key_cache, value_cache, block_tables, context_lens)
    if not _rows_ok(query):
        query = query.contiguous()
    num_tokens, num_heads, head_size = query.shape
    num_seqs = context_lens.shape[0]
    _require(query_start_loc.dtype == torch.int32 and query_start_loc.shape == (num_seqs + 1,),
             "query_start_loc must be int32 [num_seqs + 1]")
    _require(query_start_loc.device == query.device, "query_start_loc must be on the query's device")
    _require(block_tables.shape[0] == num_seqs, "block_tables must have num_seqs rows")
    out = _out(out, query)
    if num_tokens == 0 or num_seqs == 0:
        return out
    block_tables = block_tables if block_tables.stride(1) == 1 else block_tables.contiguous()
    num_kv_heads = key_cache.shape[1]
    tc = cuda_device(query.device).prefill_tensor_cores(head_size, query.dtype)
    with torch.cuda.device(query.device):
        loader = get_loader()
        grid = loader.launch_table().prefill_grid(head_size, tc, num_tokens, num_seqs, num_heads, num_kv_heads)
        loader.prefill(
            dtype=DTYPE_CODES[query.dtype], head_size=head_size, out=out.data_ptr(),
            q=query.data_ptr(), q_stride=query.stride(0), key_cache=key_cache.data_ptr(),
            value_cache=value_cache.data_ptr(), block_tables=block_tables.data_ptr(),
            bt_stride=block_tables.stride(0), query_start_loc=query_start_loc.contiguous().data_ptr(),
            context_lens=context_lens.contiguous().data_ptr(), num_seqs=num_seqs,
            num_heads=num_heads, num_kv_heads=num_kv_heads, block_size=key_cache.shape[2],
            scale=float(scale), tensor_cores=tc, grid_x=grid[0], grid_y=grid[1],
            stream=_stream(query))
    return out


def write_kv(key, value, key_cache, value_cache, slot_mapping):
    _check_cache("key_cache", key_cache, key_cache.dtype, key_cache.device)
    _check_cache("value_cache", value_cache, key_cache.dtype, key_cache.device)
    num_tokens, num_kv_heads, head_size = key.shape
    _require(key_cache.shape[1:2] + key_cache.shape[3:] == (num_kv_heads, head_size),
             f"key [num_tokens, {key_cache.shape[1]}, {key_cache.shape[3]}] expected, got {tuple(key.shape)}")
    _require(value.shape == key.shape, "value shape must equal key shape")
    for name, x in (("key", key), ("value", value)):
        _require(x.dtype == key_cache.dtype, f"{name} dtype {x.dtype} does not match the cache's {key_cache.dtype}")
        _require(x.device == key_cache.device, f"{name} must be on the cache's device")
    _require(slot_mapping.shape == (num_tokens,), "slot_mapping must be [num_tokens]")
    key = key if _rows_ok(key) else key.contiguous()
    value = value if _rows_ok(value) else value.contiguous()
    slots = slot_mapping.to(device=key.device, dtype=torch.int64).contiguous()
    es = key.element_size()
    with torch.cuda.device(key.device):
        get_loader().write_kv(
            key=key.data_ptr(), value=value.data_ptr(), key_cache=key_cache.data_ptr(),
            value_cache=value_cache.data_ptr(), slot_mapping=slots.data_ptr(),
            key_stride=key.stride(0) * es, value_stride=value.stride(0) * es,
            num_tokens=num_tokens, num_kv_heads=num_kv_heads, row_bytes=head_size * es,
            block_size=key_cache.shape[2], stream=_stream(key))


# ---- cache ops: copy-on-write and swap ----
#
# Host overhead matters here: a swap of one sequence is a few MiB per layer,
# which PCIe moves in tens of microseconds. So the block mapping stays in numpy,
# the device table (pointers + pairs) goes up as one pinned buffer in one async
# copy, runs of consecutive blocks are found in numpy and the per-run
# cudaMemcpyAsync loop runs in C++; nothing synchronises.


def _block_bytes(cache: torch.Tensor) -> int:
    return cache.stride(0) * cache.element_size()  # contiguous: one whole block


def _host_pairs(block_mapping) -> np.ndarray:
    """[n, 2] int64 (src, dst) block ids on the host (a CUDA tensor is copied back)."""
    if isinstance(block_mapping, torch.Tensor):
        block_mapping = block_mapping.detach().cpu().numpy()  # .numpy(): no __array__ detour
    m = np.asarray(block_mapping, dtype=np.int64)
    _require(m.size % 2 == 0 and (m.ndim == 1 or m.ndim == 2 and m.shape[1] == 2),
             f"block_mapping must be [n, 2] (src, dst) block ids, got shape {m.shape}")
    return m.reshape(-1, 2)


def _check_ids(m: np.ndarray, num_src: int, num_dst: int) -> None:
    # Whole-array and per-column reductions: numpy's axis=0 reduction over [n, 2] costs
    # ~8x more, and this runs on every swap.
    lo, hi_src, hi_dst = m.min(), m[:, 0].max(), m[:, 1].max()
    if lo >= 0 and hi_src < num_src and hi_dst < num_dst:
        return
    lo, hi = m.min(0), m.max(0)
    raise ValueError(f"block_mapping ids out of range: src must be in [0, {num_src}), dst in "
                     f"[0, {num_dst}), got src [{lo[0]}, {hi[0]}], dst [{lo[1]}, {hi[1]}]")


def _launch_copy(device, src_ptrs: list[int], dst_ptrs: list[int], m: np.ndarray, block_bytes: int):
    """One copy_blocks_kernel launch over every tensor pair, on torch's current stream.
    The pointer tables and the pairs go up in one non-blocking copy through staging
    buffers the loader reuses call after call (a fresh pinned buffer and device tensor
    per call cost ~100 us of host time, as much as 4 MiB take on PCIe); while a CUDA
    graph is being captured, through fresh ones the graph keeps instead."""
    nt, n = len(src_ptrs), m.shape[0]
    stream = torch.cuda.current_stream(device).cuda_stream
    ptrs = np.array(src_ptrs + dst_ptrs, dtype=np.int64)
    m = np.ascontiguousarray(m, dtype=np.int64)
    if get_loader().copy_blocks_from_host(
            device=device.index, src_ptrs=ptrs.ctypes.data, dst_ptrs=ptrs.ctypes.data + 8 * nt,
            pairs=m.ctypes.data, num_pairs=n, num_tensors=nt, block_bytes=block_bytes,
            stream=stream):
        return
    with torch.cuda.device(device):
        host = torch.empty(2 * nt + 2 * n, dtype=torch.int64, pin_memory=True)
        h = host.numpy()
        h[:2 * nt], h[2 * nt:] = ptrs, m.reshape(-1)
        table = torch.empty(host.shape, dtype=torch.int64, device=device)
        table.copy_(host, non_blocking=True)
        if torch.cuda.is_current_stream_capturing():
            cuda_device(device).keep_graph_table(host)
        get_loader().copy_blocks(
            src_ptrs=table.data_ptr(), dst_ptrs=table.data_ptr() + 8 * nt,
            mapping=table.data_ptr() + 16 * nt, num_pairs=n, num_tensors=nt,
            block_bytes=block_bytes, stream=stream)


def copy_blocks(key_caches, value_caches, block_mapping):
    caches = list(key_caches) + list(value_caches)
    if not caches:
        return
    m = _host_pairs(block_mapping)
    if m.shape[0] == 0:
        return
    dev, bb = caches[0].device, _block_bytes(caches[0])
    for i, c in enumerate(caches):
        _check_cache(f"caches[{i}]", c, c.dtype, dev)
        _require(_block_bytes(c) == bb, "every cache in copy_blocks must have the same block size in bytes")
    smallest = min(c.shape[0] for c in caches)
    _check_ids(m, smallest, smallest)
    ptrs = [c.data_ptr() for c in caches]
    _launch_copy(dev, ptrs, ptrs, m, bb)


# Swaps whose contiguous runs average at least this many bytes (per tensor) use
# cudaMemcpyAsync per run (the copy engines, no SM time); scattered ones use one
# gather kernel over mapped pinned memory instead of one small memcpy per block.
SWAP_MEMCPY_MIN_RUN_BYTES = 1 << 20


def _runs(m: np.ndarray) -> np.ndarray:
    """[r, 3] int64 (src, dst, count) runs of consecutive block ids, after sorting by src."""
    if m.shape[0] > 1 and (m[1:, 0] < m[:-1, 0]).any():
        m = m[np.argsort(m[:, 0], kind="stable")]
    brk = np.ones(m.shape[0], dtype=bool)
    brk[1:] = (m[1:, 0] != m[:-1, 0] + 1) | (m[1:, 1] != m[:-1, 1] + 1)
    starts = np.flatnonzero(brk)
    counts = np.diff(np.append(starts, m.shape[0]))
    return np.ascontiguousarray(np.column_stack([m[starts], counts]), dtype=np.int64)


def _cache_list(x, name: str) -> list:
    xs = [x] if isinstance(x, torch.Tensor) else list(x)
    _require(len(xs) > 0, f"{name} must be a cache tensor or a non-empty sequence of them")
    return xs


class _SwapSet(NamedTuple):
    src_ptrs: list
    dst_ptrs: list
    num_src: int  # the smallest pool of each side bounds its block ids
    num_dst: int
    block_bytes: int
    gpu_dev: torch.device
    unpinned: str | None  # "dst[i]" / "src[i]": a host cache the GPU cannot address


def _validate_swap(srcs: list, dsts: list) -> _SwapSet:
    _require(len(srcs) == len(dsts), f"src has {len(srcs)} caches but dst has {len(dsts)}")
    block_shape, dtype = srcs[0].shape[1:], srcs[0].dtype
    src_dev, dst_dev = srcs[0].device, dsts[0].device
    _require(src_dev.type == "cuda" or dst_dev.type == "cuda", "swap_blocks needs CUDA caches on one side")
    for name, group, dev in (("src", srcs, src_dev), ("dst", dsts, dst_dev)):
        for i, c in enumerate(group):
            _require(c.shape[1:] == block_shape and c.dtype == dtype and c.device == dev,
                     f"{name}[{i}]: every swap cache must have the block shape and dtype of src[0] "
                     f"and its side's device")
            _require(c.is_contiguous(), f"{name}[{i}]: swap caches must be contiguous")
    gpu_dev = src_dev if src_dev.type == "cuda" else dst_dev
    src_ptrs, dst_ptrs = [c.data_ptr() for c in srcs], [c.data_ptr() for c in dsts]
    unpinned = None
    if src_dev.type != "cuda" or dst_dev.type != "cuda":
        host_name, host_ptrs = ("dst", dst_ptrs) if src_dev.type == "cuda" else ("src", src_ptrs)
        ptrs = np.array(host_ptrs, dtype=np.int64)
        with torch.cuda.device(gpu_dev):
            bad = get_loader().first_unpinned(ptrs.ctypes.data, len(ptrs))
        unpinned = f"{host_name}[{bad}]" if bad >= 0 else None
    return _SwapSet(src_ptrs, dst_ptrs, min(c.shape[0] for c in srcs), min(c.shape[0] for c in dsts),
                    _block_bytes(srcs[0]), gpu_dev, unpinned)


def _swap_set(srcs: list, dsts: list) -> _SwapSet:
    """The validated swap set, remembered by the GPU side's device (CudaDevice.swap_set)."""
    gpu = srcs[0].device if srcs[0].is_cuda else dsts[0].device
    _require(gpu.type == "cuda", "swap_blocks needs CUDA caches on one side")
    return cuda_device(gpu).swap_set(srcs, dsts, _validate_swap)


def swap_blocks(src, dst, block_mapping, method: str | None = None):
    """dst[d] <- src[s] for every (s, d) of block_mapping, between the GPU pool and
    a pinned CPU pool (either way). src and dst are one cache each, or equal-length
    sequences of caches paired by index (every layer's K and V caches: the whole
    swap in one call, one launch or one C++ memcpy loop).
    method: None (choose), "memcpy" or "kernel"."""
    _require(method in (None, "memcpy", "kernel"), f"method must be None, 'memcpy' or 'kernel', got {method!r}")
    srcs, dsts = _cache_list(src, "src"), _cache_list(dst, "dst")
    info = _swap_set(srcs, dsts)
    m = _host_pairs(block_mapping)
    if m.shape[0] == 0:
        return
    _check_ids(m, info.num_src, info.num_dst)
    bb = info.block_bytes
    runs = None
    if method is None:
        runs = _runs(m)
        long_runs = m.shape[0] * bb >= runs.shape[0] * SWAP_MEMCPY_MIN_RUN_BYTES
        method = "memcpy" if long_runs or info.unpinned else "kernel"
    elif method == "kernel":
        _require(info.unpinned is None,
                 f"swap kernel needs the CPU caches in pinned memory; {info.unpinned} is pageable")
    if method == "kernel":
        _launch_copy(info.gpu_dev, info.src_ptrs, info.dst_ptrs, m, bb)
        return
    with torch.cuda.device(info.gpu_dev):
        stream = torch.cuda.current_stream(info.gpu_dev).cuda_stream
        runs = _runs(m) if runs is None else runs
        ptrs = np.array(info.src_ptrs + info.dst_ptrs, dtype=np.int64)
        get_loader().memcpy_block_runs(ptrs=ptrs.ctypes.data, runs=runs.ctypes.data,
                                       num_runs=runs.shape[0], num_tensors=len(srcs),
                                       block_bytes=bb, stream=stream)

"""Grids and shared-memory sizes of the kernel launches, computed once for both loaders
from the launch table of cuda/launch_table.cuh.

The table (threads per CTA, work rows per CTA and dynamic shared memory of every
kernel instance) is read off the kernels' own shape structs: the compiled module
returns it and the NVRTC loader reads it back from the device, so no size is written
twice. The launches in ``_cuda_ops`` and ``_cuda_layer_ops`` get their grid from here
and hand it to the loader, which launches what it is given (the NVRTC loader takes
threads and shared memory from the same table; the compiled one has them built in).
Grids are plain tuples: every launch computes one, and a named tuple costs more
host time than the arithmetic.
"""

from __future__ import annotations

from typing import NamedTuple

# Kernel codes of a table row (LaunchKernel in cuda/launch_table.cuh).
KERNEL_CODES = {"decode": 0, "decode_tc": 1, "prefill": 2, "prefill_tc": 3, "gemv": 4}
# The qpb that selects the tensor-core decode kernel (its query heads per CTA: the
# table's decode_tc rows say 16, checked on a GPU).
QPB_TC = 16


class KernelShape(NamedTuple):
    threads: int     # per CTA
    rows: int        # work rows per CTA (query heads, (token, head) rows, weight rows)
    smem_bytes: int  # dynamic shared memory


class LaunchTable:
    """The rows of cuda/launch_table.cuh: (kernel code, size, variant, threads, rows, smem)."""

    def __init__(self, rows):
        self.rows = [tuple(int(v) for v in r) for r in rows]
        names = {code: name for name, code in KERNEL_CODES.items()}
        self._shapes = {(names[k], size, variant): KernelShape(threads, per_cta, smem)
                        for k, size, variant, threads, per_cta, smem in self.rows}

    def __eq__(self, other) -> bool:
        return isinstance(other, LaunchTable) and self.rows == other.rows

    def shape(self, kernel: str, size: int, variant: int = 0) -> KernelShape:
        s = self._shapes.get((kernel, size, variant))
        if s is None:
            raise ValueError(f"no {kernel} kernel for size {size}, variant {variant}")
        return s

    def variants(self, kernel: str, size: int) -> list[int]:
        return sorted(v for k, s, v in self._shapes if k == kernel and s == size)

    def head_sizes(self) -> list[int]:
        return sorted({s for k, s, _ in self._shapes if k == "decode"})

    def decode_tc_max_stages(self, head_size: int) -> int:
        """Deepest tensor-core decode pipeline at this head size (0: none)."""
        return max(self.variants("decode_tc", head_size), default=0)

    def decode_tc_smem_bytes(self, head_size: int, stages: int) -> int:
        return self.shape("decode_tc", head_size, stages).smem_bytes

    def prefill_smem_bytes(self, head_size: int, tensor_cores: bool) -> int:
        return self.shape("prefill_tc" if tensor_cores else "prefill", head_size).smem_bytes

    def decode_shape(self, head_size: int, qpb: int, stages: int) -> KernelShape:
        key = ("decode_tc", head_size, stages) if qpb == QPB_TC else ("decode", head_size, qpb)
        s = self._shapes.get(key)  # every decode launch asks: one lookup
        return s if s is not None else self.shape(*key)

    def decode_grid(self, head_size: int, qpb: int, stages: int, num_seqs: int, num_heads: int,
                    num_kv_heads: int, nparts: int) -> tuple[int, int, int]:
        """One CTA per (KV head, group of query heads, sequence, partition)."""
        rows = self.decode_shape(head_size, qpb, stages).rows
        return num_kv_heads * -(-(num_heads // num_kv_heads) // rows), num_seqs, nparts

    def prefill_grid(self, head_size: int, tensor_cores: bool, num_tokens: int, num_seqs: int,
                     num_heads: int, num_kv_heads: int) -> tuple[int, int, int]:
        """An upper bound on the tiles of all sequences (surplus CTAs exit at once), per KV head."""
        rows = self.shape("prefill_tc" if tensor_cores else "prefill", head_size).rows
        return -(-num_tokens * (num_heads // num_kv_heads) // rows) + num_seqs, num_kv_heads, 1

    def gemv_grid(self, m: int, n: int, rows_per_warp: int) -> tuple[int, int, int]:
        return -(-n // self.shape("gemv", m, rows_per_warp).rows), 1, 1

"""Grids and shared-memory sizes of the kernel launches, computed once for both loaders
from the launch table of cuda/launch_table.cuh.

The table (threads per CTA, work rows per CTA and dynamic shared memory of every
kernel instance) is read off the kernels' own shape structs: the compiled module
returns it and the NVRTC loader reads it back from the device, so no size is written
twice. The launches in ``_cuda_ops`` and ``_cuda_layer_ops`` get a ``Launch`` from
here and hand its grid to the loader, which launches what it is given.
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


class Launch(NamedTuple):
    grid: tuple[int, int, int]
    threads: int
    smem_bytes: int


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
        if qpb == QPB_TC:
            return self.shape("decode_tc", head_size, stages)
        return self.shape("decode", head_size, qpb)

    def decode(self, head_size: int, qpb: int, stages: int, num_seqs: int, num_heads: int,
               num_kv_heads: int, nparts: int) -> Launch:
        """One CTA per (KV head, group of query heads, sequence, partition)."""
        s = self.decode_shape(head_size, qpb, stages)
        group = num_heads // num_kv_heads
        return Launch((num_kv_heads * -(-group // s.rows), num_seqs, nparts), s.threads, s.smem_bytes)

    def prefill(self, head_size: int, tensor_cores: bool, num_tokens: int, num_seqs: int,
                num_heads: int, num_kv_heads: int) -> Launch:
        """An upper bound on the tiles of all sequences (surplus CTAs exit at once), per KV head."""
        s = self.shape("prefill_tc" if tensor_cores else "prefill", head_size)
        group = num_heads // num_kv_heads
        return Launch((-(-num_tokens * group // s.rows) + num_seqs, num_kv_heads, 1), s.threads, s.smem_bytes)

    def gemv(self, m: int, n: int, rows_per_warp: int) -> Launch:
        s = self.shape("gemv", m, rows_per_warp)
        return Launch((-(-n // s.rows), 1, 1), s.threads, s.smem_bytes)

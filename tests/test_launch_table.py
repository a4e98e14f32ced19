"""Grids from the launch table (ops/launch_table.py), on CPU with rows as
cuda/launch_table.cuh writes them, and, where nvcc is installed, the header's own table
evaluated on the host; tests/gpu/test_kernels.py checks that both loaders return the
same table."""

import shutil
import subprocess

import pytest

from pagedserve.ops import launch_plan, loaders
from pagedserve.ops.launch_table import KERNEL_CODES, QPB_TC, KernelShape, LaunchTable

DECODE, DECODE_TC, PREFILL, PREFILL_TC, GEMV = (KERNEL_CODES[k] for k in
                                                 ("decode", "decode_tc", "prefill", "prefill_tc", "gemv"))
# (kernel, size, variant, threads, rows per CTA, dynamic smem bytes)
ROWS = [(DECODE, 128, 4, 128, 4, 0), (DECODE_TC, 128, 2, 128, 16, 70016),
        (DECODE_TC, 128, 3, 128, 16, 102784), (PREFILL, 128, 0, 128, 16, 41088),
        (PREFILL_TC, 128, 0, 128, 128, 100480), (GEMV, 2, 4, 128, 16, 0)]


def test_decode_grid_is_kv_heads_by_query_head_groups_by_sequences_by_partitions():
    t = LaunchTable(ROWS)
    # 6 query heads per KV head in groups of 4: 2 CTAs per KV head
    assert t.decode_grid(128, 4, 0, num_seqs=5, num_heads=12, num_kv_heads=2, nparts=3) == (4, 5, 3)
    assert t.decode_grid(128, QPB_TC, 3, 5, 32, 8, 1) == (8, 5, 1)
    assert t.decode_shape(128, QPB_TC, 3) == KernelShape(128, 16, 102784)
    assert t.decode_tc_max_stages(128) == 3 and t.decode_tc_max_stages(64) == 0


def test_prefill_grid_bounds_every_sequence_tile():
    t = LaunchTable(ROWS)
    # 100 tokens x 4 query heads per KV head = 400 rows: 25 tiles of 16, + 1 per sequence
    assert t.prefill_grid(128, False, num_tokens=100, num_seqs=3, num_heads=8, num_kv_heads=2) == (28, 2, 1)
    assert t.prefill_grid(128, True, 100, 3, 8, 2) == (4 + 3, 2, 1)
    assert t.prefill_smem_bytes(128, tensor_cores=False) == 41088
    assert t.prefill_smem_bytes(128, tensor_cores=True) == 100480


def test_gemv_grid_covers_every_weight_row():
    assert LaunchTable(ROWS).gemv_grid(2, 33, 4) == (3, 1, 1)


def test_a_kernel_the_table_lacks_is_a_value_error():
    t = LaunchTable(ROWS)
    for call in (lambda: t.decode_grid(80, 4, 0, 1, 8, 2, 1), lambda: t.decode_grid(128, 8, 0, 1, 8, 1, 1),
                 lambda: t.decode_grid(128, QPB_TC, 4, 1, 8, 2, 1), lambda: t.gemv_grid(9, 10, 1)):
        with pytest.raises(ValueError, match="no .* kernel"):
            call()


PRINT_TABLE = r"""
#include <cstdio>
#include "launch_table.cuh"
int main() {
  ps::LaunchRow rows[ps::LAUNCH_TABLE_MAX];
  const int n = ps::fill_launch_table(rows);
  for (int i = 0; i < n; ++i)
    std::printf("%d %d %d %d %d %d\n", rows[i].kernel, rows[i].size, rows[i].variant,
                rows[i].threads, rows[i].rows, rows[i].smem_bytes);
}
"""


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc (the table is host code of the header)")
def test_the_header_table_has_every_kernel_the_planner_picks(tmp_path):
    (tmp_path / "table.cu").write_text(PRINT_TABLE)
    subprocess.run(["nvcc", "-std=c++17", "-arch=sm_90", f"-I{loaders.kernel_source_dir()}",
                    str(tmp_path / "table.cu"), "-o", str(tmp_path / "table")], check=True, timeout=300)
    out = subprocess.run([str(tmp_path / "table")], check=True, capture_output=True, text=True).stdout
    rows = [list(map(int, line.split())) for line in out.splitlines()]
    assert 0 < len(rows) <= loaders.LAUNCH_TABLE_MAX
    assert all(len(r) == loaders.LAUNCH_ROW_INTS for r in rows)
    t = LaunchTable(rows)
    assert t.head_sizes() == [64, 80, 96, 128, 256]
    for d in t.head_sizes():
        assert t.variants("decode", d) == list(launch_plan.QPB_CHOICES)
        assert t.decode_tc_max_stages(d) == (2 if d == 256 else 3)
        assert {t.shape("decode_tc", d, st).rows for st in t.variants("decode_tc", d)} == {QPB_TC}
    # the sizes docs/kernels.md gives at head 128 (100.4 and 68.4 KiB)
    assert t.decode_tc_smem_bytes(128, 3) == 102784 and t.decode_tc_smem_bytes(128, 2) == 70016
    assert t.variants("gemv", 8) == [1, 4] and t.variants("gemv", 9) == []

"""Grids from the launch table (ops/launch_table.py), on CPU with rows as
cuda/launch_table.cuh writes them; tests/gpu/test_kernels.py checks that both loaders
return the same table and that the planner's choices are in it."""

import pytest

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

"""The decode launch plan (ops/_cuda_ops.decode_plan): pure host arithmetic, so it is
checked here without a GPU, on an H100's 132 SMs with Llama-3-8B heads (32 query,
8 KV; the tensor-core kernel fits 2 CTAs per SM)."""

import pytest

from pagedserve.ops import _cuda_ops

SMS, TC_OCCUPANCY = 132, 2


def plan(batch, context, heads=(32, 8), tc=TC_OCCUPANCY):
    return _cuda_ops.decode_plan(batch, heads[0], heads[1], context, SMS, tc)


@pytest.mark.parametrize("batch, context, expected", [
    (32, 1024, (16, 1024, 1)),     # 256 CTAs: no split
    (128, 4096, (16, 4096, 1)),
    (16, 16384, (16, 16384, 1)),   # 128 CTAs already occupy one per SM
    (1, 32768, (16, 2048, 16)),    # 8 rows -> 128 CTAs, one per SM
    (8, 8192, (16, 4096, 2)),
    (12, 4096, (16, 4096, 1)),     # 96 CTAs: close enough to every SM busy
    (9, 4096, (16, 2048, 2)),      # 72 CTAs would idle too many SMs: 144
    (1, 1024, (16, 256, 4)),       # partitions never under 256 tokens
    (1, 300, (16, 256, 2)),
    (1, 200, (16, 200, 1)),
])
def test_tensor_core_plan_keeps_one_cta_per_sm(batch, context, expected):
    assert plan(batch, context) == expected


def test_forced_and_forbidden_splits(monkeypatch):
    monkeypatch.setattr(_cuda_ops, "TARGET_CTAS_PER_SM", 1 << 20)
    assert plan(2, 4097, heads=(8, 2)) == (16, 256, 17)  # as many 256-token partitions as fit
    monkeypatch.setattr(_cuda_ops, "TARGET_CTAS_PER_SM", 0)
    assert plan(1, 32768) == (16, 32768, 1)


def test_cuda_core_plan_groups_query_heads():
    # fp32 (no tensor-core kernel): 4 query heads per CTA for a group of 4; 8 rows split
    # toward 4 CTAs per SM (66 partitions wanted), lengths rounded up to 64 tokens
    assert plan(1, 32768, tc=0) == (4, 512, 64)
    assert plan(64, 2048, tc=0) == (4, 1024, 2)  # 512 CTAs, short of 4 per SM
    assert plan(128, 2048, tc=0) == (4, 2048, 1)  # 1024: no split

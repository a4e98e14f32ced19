"""The decode launch plan (ops/launch_plan.decode_plan): pure host arithmetic, so it is
checked here without a GPU, on an H100's 132 SMs with Llama-3-8B heads (32 query,
8 KV, head 128; the tensor-core kernel fits a 3-stage pipeline, and 3 CTAs per SM
with the 2-stage one)."""

import pytest

from pagedserve.ops import launch_plan

SMS, H100_TC = 132, launch_plan.TcFit(max_stages=3, shallow_ctas_per_sm=3)


def plan(batch, context, heads=(32, 8), tc=H100_TC, head_size=128, **options):
    return launch_plan.decode_plan(batch, heads[0], heads[1], context, SMS, tc, head_size, **options)


@pytest.mark.parametrize("batch, context, expected", [
    (32, 1024, (16, 1024, 1, 2)),     # 256 CTAs: no split; resident at once with 2 stages
    (128, 4096, (16, 4096, 1, 3)),    # 1024 CTAs: several waves
    (16, 16384, (16, 16384, 1, 3)),   # 128 CTAs already occupy one per SM
    (1, 32768, (16, 2048, 16, 3)),    # 8 rows -> 128 CTAs, one per SM
    (8, 8192, (16, 4096, 2, 3)),
    (12, 4096, (16, 4096, 1, 3)),     # 96 CTAs: close enough to every SM busy
    (9, 4096, (16, 2048, 2, 3)),      # 72 CTAs would idle too many SMs: 144
    (1, 1024, (16, 256, 4, 3)),       # partitions never under 256 tokens
    (1, 300, (16, 256, 2, 3)),
    (1, 200, (16, 200, 1, 3)),
])
def test_tensor_core_plan_keeps_one_cta_per_sm(batch, context, expected):
    assert plan(batch, context) == expected


@pytest.mark.parametrize("batch, stages", [
    (16, 3),   # 128 CTAs, 4 MiB in flight with 2 stages: too little for HBM
    (23, 3),   # 184 CTAs, 5.75 MiB
    (24, 2),   # 192 CTAs, 6 MiB
    (49, 2),   # 392 CTAs: all resident at 3 per SM
    (50, 3),   # 400: more than one wave
    (64, 3),
])
def test_shallow_pipeline_only_for_one_full_resident_wave(batch, stages):
    assert plan(batch, 1024)[3] == stages


def test_pipeline_depth_where_the_deep_one_cannot_run():
    # head 256 (and GPUs with less shared memory) only fit 2 stages; half the bytes per
    # token at head 64 need twice the CTAs in flight
    assert plan(32, 1024, tc=launch_plan.TcFit(2, 1), head_size=256)[3] == 2
    assert plan(32, 1024, head_size=64)[3] == 3
    assert plan(48, 1024, head_size=64)[3] == 2
    assert plan(32, 1024, tc_stages=3)[3] == 3
    assert plan(32, 1024, tc=launch_plan.TcFit(2, 1), head_size=256, tc_stages=3)[3] == 2


def test_forced_and_forbidden_splits():
    # as many 256-token partitions as fit
    assert plan(2, 4097, heads=(8, 2), target_ctas_per_sm=1 << 20)[:3] == (16, 256, 17)
    assert plan(1, 32768, target_ctas_per_sm=0)[:3] == (16, 32768, 1)


def test_cuda_core_plan_groups_query_heads():
    # fp32 (no tensor-core kernel): 4 query heads per CTA for a group of 4; 8 rows split
    # toward 4 CTAs per SM (66 partitions wanted), lengths rounded up to 64 tokens
    no_tc = launch_plan.NO_TC
    assert plan(1, 32768, tc=no_tc) == (4, 512, 64, 0)
    assert plan(64, 2048, tc=no_tc) == (4, 1024, 2, 0)  # 512 CTAs, short of 4 per SM
    assert plan(128, 2048, tc=no_tc) == (4, 2048, 1, 0)  # 1024: no split

"""Launch plans of the decode kernels: query heads per CTA, split-KV partitions and
the tensor-core pipeline depth. Pure host arithmetic on shapes known without a
device sync (the table width bounds the context), shared by both loaders and by
the CUDA-graph capture, and tested on CPU (tests/test_decode_plan.py)."""

from __future__ import annotations

import functools
from typing import NamedTuple

from .launch_table import QPB_TC

# Query heads per CTA of the CUDA-core decode kernel (its instances in the launch table).
QPB_CHOICES = (1, 2, 4, 8)
# Split-KV fills the GPU when a batch has fewer CTAs than this many per SM: 1 for the
# tensor-core kernel (one of its CTAs streams an SM's share of HBM; see tc_split), 4
# for the CUDA-core kernel. decode_plan's target_ctas_per_sm replaces both (tests force
# the split with a huge one, forbid it with 0).
TC_CTAS_PER_SM = 1
CUDA_CORE_CTAS_PER_SM = 4
MIN_PART_TOKENS = 256
# Partition lengths of the tensor-core kernel are multiples of one 16-token tile.
PART_ALIGN = 16
# Pipeline depth of the tensor-core decode kernel (TcShape in cuda/decode_tc.cuh). The
# deep one (3 tiles per warp, 2 in flight) is what a grid of about one CTA per SM needs
# to keep HBM busy. The shallow one (2 tiles, 1 in flight, a third less shared memory:
# 3 CTAs per SM at head 128 instead of 2) wins where the whole grid is resident at once
# and its copies in flight still total SHALLOW_MIN_INFLIGHT bytes: a deeper queue then
# only lets some SMs draw more of HBM than others, and the launch waits for the slowest
# (H100, docs/kernels.md: 192-384 CTAs of 1024-2048 tokens 1-5% faster; 128 CTAs, 4 MiB
# in flight, 4% slower; 512 CTAs, past one resident wave, 1-2% slower). decode_plan's
# tc_stages forces 2 or 3 instead (tests, benchmarks).
SHALLOW_MIN_INFLIGHT = 6 << 20
# Registers (163-168 per thread, 128 threads) hold the kernel to 3 CTAs per SM below head 256.
TC_REG_CTAS_PER_SM = 3


class TcFit(NamedTuple):
    """What the tensor-core decode kernel can do on one device at one head size."""
    max_stages: int           # deepest pipeline that fits shared memory; 0: it cannot run
    shallow_ctas_per_sm: int  # resident CTAs per SM with the 2-stage pipeline


NO_TC = TcFit(0, 0)


@functools.lru_cache(maxsize=4096)
def tc_split(ctas: int, max_context: int, target: int) -> tuple[int, int]:
    """(partition tokens, partitions) for the tensor-core kernel. One of its CTAs
    streams an SM's share of HBM, so extra partitions only add partial-output traffic
    and per-CTA start and finish: split a batch of fewer than `target` CTAs (one per
    SM) into the most partitions that stay within it; where that leaves more than a
    third of the SMs idle, into the fewest that occupy them all (H100,
    benchmarks/kernel_bench.py: 1 x 32768 in 128 CTAs 52.0 us, 96 52.6, 136 53.3, 256
    54.0, 512 60.6; 16 x 16384 unsplit in 128 CTAs 354 us, in 256 361)."""
    if ctas >= target or max_context <= MIN_PART_TOKENS:
        return max(max_context, 1), 1
    most = -(-max_context // MIN_PART_TOKENS)  # partitions of at least MIN_PART_TOKENS
    want = min(target // ctas, most)
    if ctas * want * 3 < target * 2:
        want = min(-(-target // ctas), most)
    part = max(MIN_PART_TOKENS, -(-max_context // max(want, 1)))
    part = -(-part // PART_ALIGN) * PART_ALIGN
    n = -(-max_context // part)
    return (part, n) if n > 1 else (max(max_context, 1), 1)


def pipeline_stages(ctas: int, head_size: int, num_sms: int, tc: TcFit, forced: int | None = None) -> int:
    """Pipeline depth of a tensor-core decode launch of `ctas` CTAs (see
    SHALLOW_MIN_INFLIGHT); `forced` is taken as far as the device fits it."""
    if forced is not None:
        return max(2, min(forced, tc.max_stages))
    if tc.max_stages < 3:
        return 2
    resident = ctas <= tc.shallow_ctas_per_sm * num_sms
    in_flight = ctas * 4 * 16 * 2 * head_size * 2  # per warp: one 16-token K and V tile, 16-bit
    return 2 if resident and in_flight >= SHALLOW_MIN_INFLIGHT else 3


def decode_plan(num_seqs: int, num_heads: int, num_kv_heads: int, max_context: int,
                num_sms: int, tc: TcFit = NO_TC, head_size: int = 128, *,
                target_ctas_per_sm: int | None = None,
                tc_stages: int | None = None) -> tuple[int, int, int, int]:
    """(query heads per CTA, partition tokens, partitions, pipeline stages). max_context
    is an upper bound known on the host (block table width * block size), so no sync.
    A `tc` that can run (CudaDevice.tc_fit) selects the tensor-core kernel (qpb QPB_TC,
    stages 2 or 3); the CUDA-core kernel has no stages (0). target_ctas_per_sm and
    tc_stages replace the planner's choices (LaunchOptions of device_state.py)."""
    group = num_heads // num_kv_heads
    if tc.max_stages > 0:
        ctas = num_seqs * num_kv_heads * -(-group // QPB_TC)
        per_sm = TC_CTAS_PER_SM if target_ctas_per_sm is None else target_ctas_per_sm
        part, nparts = tc_split(ctas, max_context, per_sm * num_sms)
        return QPB_TC, part, nparts, pipeline_stages(ctas * nparts, head_size, num_sms, tc, tc_stages)
    qpb = next(q for q in QPB_CHOICES if q >= min(group, QPB_CHOICES[-1]))
    ctas = num_seqs * num_kv_heads * -(-group // qpb)
    per_sm = CUDA_CORE_CTAS_PER_SM if target_ctas_per_sm is None else target_ctas_per_sm
    want = -(-per_sm * num_sms // max(ctas, 1))
    if want <= 1 or max_context <= MIN_PART_TOKENS:
        return qpb, max(max_context, 1), 1, 0
    part = max(MIN_PART_TOKENS, -(-max_context // want))
    part = -(-part // 64) * 64
    nparts = -(-max_context // part)
    return (qpb, part, nparts, 0) if nparts > 1 else (qpb, max(max_context, 1), 1, 0)

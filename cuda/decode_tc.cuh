// Decode paged attention on tensor cores, for fp16 and bf16 (sm_80 and up).
//
// Why: with 4 query heads per KV head the CUDA-core kernel (decode.cuh) spends
// about 5 instructions per KV element (4 FMAs, a conversion, shuffles) and runs
// out of issue slots before HBM runs out of bandwidth. Here one warp-wide
// mma.sync m16n8k16 does 2048 multiply-adds, so the math costs a few
// instructions per 16-token tile and the kernel streams KV at memory speed.
//
// One CTA of 4 warps serves one (sequence, KV head, group of up to 16 query
// heads, partition). The query heads of the group fill the 16 query rows of
// the tile math (mma_tile.cuh; rows past the group are zero). Each warp owns
// every 4th 16-token tile of the CTA's token range and runs its own cp.async
// pipeline of ST tiles in shared memory (16-byte copies, one row of K and
// V per token, gathered through the block table, laid out as mma_tile.cuh
// says), so ST-1 tiles per warp are in flight while it computes one; warps
// never wait on each other until the final merge.
//
// Tokens past the context are zero-filled (cp.async with source size 0), never
// read: block-table padding is not dereferenced and 0 * NaN cannot occur.
// Split-KV partials are merged by the last CTA of each head group (split_kv_finish).
#pragma once
#include "mma_tile.cuh"

namespace ps {

// Pipeline depth in 16-token tiles per warp, chosen per launch by the planner
// (decode_plan in ops/launch_plan.py): 3 keeps two tiles per warp in flight, which a
// grid of about one CTA per SM needs to keep HBM busy; 2 halves that and the
// shared memory, so one more CTA fits per SM, and wins where the whole grid is
// resident at once with bytes enough in flight (docs/kernels.md). Head 256 fits
// only 2 in 227 KiB of shared memory. The host learns the depths and sizes from
// the launch table (launch_table.cuh).
template <int D>
struct TcMaxStages {
  enum { VALUE = D >= 256 ? 2 : 3 };
};

template <int D, int ST>
struct TcShape : TileRows<D> {
  typedef TileRows<D> R;
  enum {
    NWARPS = 4,
    HEADS = 16,                     // query heads per CTA: the 16 query rows of the tile math
    TILE = 16,                      // tokens per warp tile (one mma K of P V)
    STAGES = ST,
    STAGE_ELEMS = 2 * TILE * R::RP,  // K rows then V rows
    PIPE_BYTES = NWARPS * STAGES * STAGE_ELEMS * 2,
    SMEM_BYTES = HEADS * R::DP * 2 + PIPE_BYTES + 128,  // the host reads it from launch_table.cuh
  };
  static_assert(ST >= 2 && ST <= TcMaxStages<D>::VALUE, "pipeline depth out of range");
  static_assert((TILE * R::CPR) % 32 == 0, "a tile must split evenly over the lanes");
  // the final merge's rows of D floats padded by 8, so the 8 rows of one float2 store
  // of a warp's accumulators fall in different banks
  enum { OP = D + 8 };
  static_assert((NWARPS * 16 * OP + NWARPS * 32) * 4 <= PIPE_BYTES, "merge area must fit the pipeline");
};

// store_head_result (common.cuh) for elements d .. d+3 of a 16-bit output (d a
// multiple of 4): one 8-byte store of the result, or one 16-byte store of the partial.
template <int DT>
__device__ __forceinline__ void store_head_result4(u16 *out, float *part_out, float *part_ml,
                                                   i64 row, int d, int D, int nparts, int part,
                                                   float M, float L, const float (&A)[4]) {
  if (nparts == 1) {
    float r[4];
#pragma unroll
    for (int k = 0; k < 4; ++k) r[k] = L > 0.f ? A[k] / L : 0.f;
    *reinterpret_cast<uint2 *>(out + row * D + d) = make_uint2(pack2<DT>(r[0], r[1]), pack2<DT>(r[2], r[3]));
    return;
  }
  const i64 slot = row * nparts + part;
  *reinterpret_cast<float4 *>(part_out + slot * D + d) = make_float4(A[0] / L, A[1] / L, A[2] / L, A[3] / L);
  if (d == 0) {
    part_ml[slot * 2] = M;
    part_ml[slot * 2 + 1] = L;
  }
}

template <int DT, int D, int ST>
__global__ void __launch_bounds__(128) paged_decode_tc_kernel(
    typename Elem<DT>::T *__restrict__ out,      // [S, H, D]      (nparts == 1)
    float *__restrict__ part_out,                // [S, H, P, D]   (nparts > 1)
    float *__restrict__ part_ml,                 // [S, H, P, 2]   (max, sum)
    const typename Elem<DT>::T *__restrict__ q,  // [S, H, D], sequence stride q_stride
    i64 q_stride,
    const typename Elem<DT>::T *__restrict__ kc,  // [blocks, Hkv, bs, D]
    const typename Elem<DT>::T *__restrict__ vc,  // [blocks, Hkv, bs, D]
    const int *__restrict__ block_tables, int bt_stride,
    const int *__restrict__ context_lens,
    unsigned *__restrict__ split_counters,        // [S, gridDim.x], zero   (nparts > 1)
    int num_heads, int num_kv_heads, int bs_log2, float scale, int part_tokens) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  typedef Elem<DT> E;
  typedef typename E::T T;
  typedef TcShape<D, ST> S;
  enum { NWARPS = S::NWARPS, TILE = S::TILE, STAGES = S::STAGES, DP = S::DP, CPR = S::CPR,
         NTD = S::NTD, STAGE_ELEMS = S::STAGE_ELEMS };
  extern __shared__ uint4 tc_smem[];
  // The pipeline starts on a 128-byte boundary (SMEM_BYTES has room for it);
  // the query tile follows it.
  u16 *pipe = reinterpret_cast<u16 *>(align128(tc_smem));
  u16 *qs = pipe + NWARPS * STAGES * STAGE_ELEMS;  // [16][DP]

  const int G = num_heads / num_kv_heads;
  const int groups = (G + 15) / 16;
  const int kvh = blockIdx.x / groups;
  const int qg = blockIdx.x % groups;
  const int seq = blockIdx.y;
  const int part = blockIdx.z;
  const int nparts = gridDim.z;
  const int head0 = kvh * G + qg * 16;
  const int nh = min(16, G - qg * 16);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;

  // The group's query rows, loaded into registers first so their latency overlaps
  // the context length and block-table lookups and the first KV copies; stored
  // to shared memory after those are issued. Rows past the group are zero
  // (their scores are 0, never stored).
  enum { QV = (16 * CPR + NWARPS * 32 - 1) / (NWARPS * 32) };
  uint4 qv[QV];
#pragma unroll
  for (int k = 0; k < QV; ++k) {
    const int i = k * NWARPS * 32 + threadIdx.x, r = i / CPR, c = i % CPR;
    qv[k] = make_uint4(0, 0, 0, 0);
    if (i < 16 * CPR && r < nh)
      qv[k] = *reinterpret_cast<const uint4 *>(q + seq * q_stride + (i64)(head0 + r) * D + c * 8);
  }

  const int ctx = context_lens[seq];
  const int t0 = nparts == 1 ? 0 : part * part_tokens;
  const int t1 = nparts == 1 ? ctx : min(ctx, t0 + part_tokens);
  const int nused = nparts == 1 ? 1 : min(nparts, (ctx + part_tokens - 1) / part_tokens);
  unsigned *counter = split_counters + (i64)seq * gridDim.x + blockIdx.x;
  if (nparts > 1 && t0 >= t1) {  // no tokens here: only count this CTA as arrived
    split_kv_finish<DT>(out, part_out, part_ml, counter, (i64)seq * num_heads + head0, nh, D,
                        nparts, nused);
    return;
  }

  const int *bt = block_tables + (i64)seq * bt_stride;
  const int bmask = (1 << bs_log2) - 1;
  const unsigned wpipe = smem_addr(pipe + warp * STAGES * STAGE_ELEMS);
  constexpr int STEP = NWARPS * TILE;
  const int first = t0 + warp * TILE;
  const int ntiles = first < t1 ? (t1 - first + STEP - 1) / STEP : 0;

  // Block-table entry of this lane's token in the next tile to issue, loaded one
  // tile early so the lookup latency never stalls the copies.
  int blk_next = 0;
  auto fetch_blk = [&](int it) {
    const int t = first + it * STEP + lane;
    if (it < ntiles && lane < TILE && t < t1) blk_next = bt[t >> bs_log2];
  };

  // Starts the copies of tile `it` into its stage; always commits a group so
  // the wait counts stay uniform at the end of the range.
  auto issue = [&](int it) {
    if (it < ntiles) {
      const int tb = first + it * STEP;
      const unsigned ks = wpipe + (it % STAGES) * STAGE_ELEMS * 2;
      const unsigned vs = ks + TILE * S::RP * 2;
      const i64 blk = blk_next;
      fetch_blk(it + 1);
      // lane r < TILE resolves token tb + r through the block table once
      i64 off = 0;
      int ok = 0;
      if (lane < TILE && tb + lane < t1) {
        const int t = tb + lane;
        off = (((blk * num_kv_heads + kvh) << bs_log2) + (t & bmask)) * D;
        ok = 16;
      }
      const int off_lo = (int)(unsigned)(off & 0xffffffffu), off_hi = (int)(off >> 32);
#pragma unroll
      for (int k = 0; k < TILE * CPR / 32; ++k) {
        const int i = k * 32 + lane, r = i / CPR, c = i % CPR;
        const i64 o = ((i64)__shfl_sync(0xffffffffu, off_hi, r) << 32) |
                      (unsigned)__shfl_sync(0xffffffffu, off_lo, r);
        const int n = __shfl_sync(0xffffffffu, ok, r);
        const unsigned so = stage_off<D>(r, c);
        cp_async16(ks + so, kc + o + c * 8, n);
        cp_async16(vs + so, vc + o + c * 8, n);
      }
    }
    cp_async_commit();
  };

  fetch_blk(0);
#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) issue(s);

#pragma unroll
  for (int k = 0; k < QV; ++k) {
    const int i = k * NWARPS * 32 + threadIdx.x, r = i / CPR, c = i % CPR;
    if (i < 16 * CPR) *reinterpret_cast<uint4 *>(qs + r * DP + c * 8) = qv[k];
  }
  __syncthreads();  // qs written
  QFrags<D> qf[1];
  qf[0].load(smem_addr(qs), lane);
  const float qscale = scale * LOG2E;
  SoftmaxRows<D> acc[1];
  acc[0].init();
  unsigned k_off[4], v_off[4];
  ldsm_offsets<D>(lane, k_off, v_off);

  for (int it = 0; it < ntiles; ++it) {
    cp_async_wait<STAGES - 2>();
    __syncwarp();  // every lane's copies of tile `it` landed; the stage read last round is free
    issue(it + STAGES - 1);
    const unsigned ks = wpipe + (it % STAGES) * STAGE_ELEMS * 2;
    const unsigned vs = ks + TILE * S::RP * 2;
    float s[1][1][2][4];
    tile_scores<DT, D>(s, qf, ks, k_off);
    unsigned pa[1][1][4];
    // finite maxima: the tile's first token is always in range
    const int tb = first + it * STEP;
    acc[0].template update<DT>(s[0], tb, tb + TILE > t1, t1, t1, qscale, lane, pa[0]);
    tile_pv<DT, D>(acc, pa, vs, v_off);
  }
  cp_async_wait<0>();
  acc[0].reduce_sums();
  const float m0 = acc[0].m0, m1 = acc[0].m1, l0 = acc[0].l0, l1 = acc[0].l1;
  const float(&o)[NTD][4] = acc[0].o;

  __syncthreads();  // every warp is done with its pipeline: reuse it for the merge
  enum { OP = S::OP };
  float *sm_o = reinterpret_cast<float *>(pipe);  // [NWARPS][16][OP]
  float *sm_m = sm_o + NWARPS * 16 * OP;          // [NWARPS][16]
  float *sm_l = sm_m + NWARPS * 16;
  {
    const int r0 = lane >> 2, c0 = 2 * (lane & 3);
    float *w0 = sm_o + (warp * 16 + r0) * OP + c0;
    float *w1 = w0 + 8 * OP;
    // only the group's rows (nh of the 16) are merged: the rest are not stored
    if (r0 < nh) {
#pragma unroll
      for (int j = 0; j < NTD; ++j) *reinterpret_cast<float2 *>(w0 + 8 * j) = make_float2(o[j][0], o[j][1]);
    }
    if (r0 + 8 < nh) {
#pragma unroll
      for (int j = 0; j < NTD; ++j) *reinterpret_cast<float2 *>(w1 + 8 * j) = make_float2(o[j][2], o[j][3]);
    }
    if ((lane & 3) == 0) {
      sm_m[warp * 16 + r0] = m0;
      sm_l[warp * 16 + r0] = l0;
      sm_m[warp * 16 + r0 + 8] = m1;
      sm_l[warp * 16 + r0 + 8] = l1;
    }
  }
  __syncthreads();

  // Merge the warps, 4 consecutive elements per thread (a single pass for a group of
  // 4 heads at head 128): the merge sits between a CTA's last tile and its exit, so
  // its dependent shared-memory round trips count once per wave of CTAs. A warp
  // that saw no token has m = -inf and weight 0.
  for (int idx = threadIdx.x; idx < nh * (D / 4); idx += NWARPS * 32) {
    const int g = idx / (D / 4), d = (idx % (D / 4)) * 4;
    float mw[NWARPS], M = neg_inf();
#pragma unroll
    for (int w = 0; w < NWARPS; ++w) {
      mw[w] = sm_m[w * 16 + g];
      M = fmaxf(M, mw[w]);
    }
    float L = 0.f, A[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
    for (int w = 0; w < NWARPS; ++w) {
      const float wt = mw[w] == neg_inf() ? 0.f : exp2f(mw[w] - M);
      const float4 v = *reinterpret_cast<const float4 *>(sm_o + (w * 16 + g) * OP + d);
      L += wt * sm_l[w * 16 + g];
      A[0] += wt * v.x;
      A[1] += wt * v.y;
      A[2] += wt * v.z;
      A[3] += wt * v.w;
    }
    store_head_result4<DT>(out, part_out, part_ml, (i64)seq * num_heads + head0 + g, d, D, nparts,
                           part, M, L, A);
  }
  if (nparts > 1)
    split_kv_finish<DT>(out, part_out, part_ml, counter, (i64)seq * num_heads + head0, nh, D,
                        nparts, nused);
#endif
}

}  // namespace ps

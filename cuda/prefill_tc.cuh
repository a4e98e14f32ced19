// Varlen causal prefill over the paged KV cache on tensor cores, for fp16 and
// bf16 (sm_80 and up); prefill.cuh keeps fp32 and older GPUs.
//
// Same contract as prefill.cuh: the new tokens of every sequence are packed in
// `q`; token i of a sequence with n new tokens and context_len c sits at
// position c - n + i and attends to cache positions 0..c-n+i (its own K/V was
// written before the call).
//
// Why: the CUDA-core kernel spends an FMA per (row, key, dimension) twice over
// and stalls on issue long before the tensor cores would. Here a CTA of 4
// warps owns ROWS (token, query head) rows of one sequence and KV head, taken
// in token-major order so the heads that share a KV head are served by one K/V
// read (32 tokens of a 4-head group at head 128). Each warp holds MT = 2 tiles
// of 16 rows for the mma tile math (mma_tile.cuh): every K and V fragment it
// reads from shared memory feeds both, and each chunk's copies and block-table
// work are spread over twice the rows (head 256 keeps one tile: two output
// accumulators would not fit the registers). A warp scores NS = 2 subtiles of
// 16 keys for both tiles before their softmax: 8 independent accumulators per
// k-step (16 keys for one tile at a time left the mma waiting on each other;
// ncu: 'wait' and short-scoreboard stalls, 37% tensor-pipe activity against
// FlashAttention-2's 56%). benchmarks/prefill.py measures the shapes against
// FlashAttention-2 (docs/kernels.md). K/V are staged through shared memory
// KC = 64 tokens at a time by all 128 threads (16-byte cp.async gathered
// through the block table, rows laid out as mma_tile.cuh says), in two stages
// so the copies of the next chunk overlap the math on this one. A warp skips
// the keys past its last row's position (the causal diagonal) and the masking
// below its first row's; rows keep their own limits on the diagonal.
//
// Tokens past the CTA's last position are zero-filled, never read. CTAs are
// laid out sequence after sequence, the last (longest) tiles of a sequence
// first, so the long CTAs start early and short ones fill the tail.
#pragma once
#include "mma_tile.cuh"

namespace ps {

template <int D>
struct PrefillTcShape : TileRows<D> {
  typedef TileRows<D> R;
  enum {
    NWARPS = 4,
    MT = D <= 128 ? 2 : 1,         // 16-row query tiles per warp
    NS = D <= 128 ? 2 : 4,         // 16-key subtiles per score step
    ROWS = 16 * MT * NWARPS,       // (token, query head) rows per CTA
    KC = 64,                       // KV tokens per stage
    STAGES = 2,
    STAGE_ELEMS = 2 * KC * R::RP,  // K rows then V rows
    SMEM_BYTES = STAGES * STAGE_ELEMS * 2 + ROWS * R::DP * 2 + 128,  // the host reads it from launch_table.cuh
    COPIES = KC * R::CPR / (NWARPS * 32),  // 16-byte copies per thread per stage, for K and for V
  };
  static_assert((KC * R::CPR) % (NWARPS * 32) == 0, "a stage must split evenly over the threads");
  static_assert((ROWS * R::CPR) % (NWARPS * 32) == 0, "the query rows must split evenly over the threads");
};

template <int DT, int D>
__global__ void __launch_bounds__(128) paged_prefill_tc_kernel(
    typename Elem<DT>::T *__restrict__ out,       // [T, H, D] contiguous
    const typename Elem<DT>::T *__restrict__ q,   // [T, H, D], token stride q_stride
    i64 q_stride,
    const typename Elem<DT>::T *__restrict__ kc,  // [blocks, Hkv, bs, D]
    const typename Elem<DT>::T *__restrict__ vc,
    const int *__restrict__ block_tables, int bt_stride,
    const int *__restrict__ query_start_loc,      // [S + 1]
    const int *__restrict__ context_lens,         // [S]
    int num_seqs, int num_heads, int num_kv_heads, int bs_log2, float scale) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  typedef typename Elem<DT>::T T;
  typedef PrefillTcShape<D> S;
  enum { ROWS = S::ROWS, MT = S::MT, NS = S::NS, KC = S::KC, STAGES = S::STAGES, CPR = S::CPR, DP = S::DP,
         NTD = S::NTD, STAGE_ELEMS = S::STAGE_ELEMS, NTHREADS = S::NWARPS * 32 };
  extern __shared__ uint4 tc_smem[];
  u16 *pipe = reinterpret_cast<u16 *>(align128(tc_smem));  // [STAGES][K rows, V rows]
  u16 *qs = pipe + STAGES * STAGE_ELEMS;                    // [ROWS][DP]

  const int G = num_heads / num_kv_heads;
  const int kvh = blockIdx.y;
  const PrefillTile pt = find_prefill_tile(blockIdx.x, query_start_loc, num_seqs, G, ROWS);
  if (pt.seq < 0) return;
  const int seq = pt.seq, n = pt.n;
  const int tile = pt.tiles - 1 - pt.tile;  // the last (longest) tile of a sequence first
  const int q0 = query_start_loc[seq];
  const int pos0 = context_lens[seq] - n;  // position of the first new token
  const int row0 = tile * ROWS;            // rows row0.. of the sequence: token r / G, head r % G
  const int nrows = min(ROWS, n * G - row0);
  const int kv_end = pos0 + (row0 + nrows - 1) / G + 1;  // the CTA reads keys [0, kv_end)
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int *bt = block_tables + (i64)seq * bt_stride;
  const int bmask = (1 << bs_log2) - 1;

  // Block-table entries of the next stage to issue: lane j holds the j-th block
  // the stage touches, loaded one stage early so the lookups never stall the copies.
  int blk_next = 0;
  const int stage_blocks = max(1, KC >> bs_log2);  // a stage starts on a block or inside one
  auto fetch_blk = [&](int st) {
    const int b = (st * KC >> bs_log2) + lane;
    if (lane < stage_blocks && st * KC < kv_end && (b << bs_log2) < kv_end) blk_next = bt[b];
  };
  const int nstages = (kv_end + KC - 1) / KC;

  // Starts the copies of KV chunk `st` into its stage buffer (zeros past kv_end);
  // always commits a group.
  auto issue = [&](int st) {
    if (st < nstages) {
      const int kv0 = st * KC, b0 = kv0 >> bs_log2;
      const unsigned ks = smem_addr(pipe + (st % STAGES) * STAGE_ELEMS);
      const unsigned vs = ks + KC * S::RP * 2;
      const int blk_lane = blk_next;
      fetch_blk(st + 1);
#pragma unroll
      for (int k = 0; k < S::COPIES; ++k) {
        const int i = k * NTHREADS + tid, r = i / CPR, c = i % CPR, t = kv0 + r;
        const i64 blk = __shfl_sync(0xffffffffu, blk_lane, ((t >> bs_log2) - b0) & 31);
        const bool ok = t < kv_end;
        const i64 off = ok ? (((blk * num_kv_heads + kvh) << bs_log2) + (t & bmask)) * D + c * 8 : 0;
        const unsigned so = stage_off<D>(r, c);
        cp_async16(ks + so, kc + off, ok ? 16 : 0);
        cp_async16(vs + so, vc + off, ok ? 16 : 0);
      }
    }
    cp_async_commit();
  };

  // Query rows (zeros past the sequence's rows) go with the first KV chunk.
#pragma unroll
  for (int k = 0; k < ROWS * CPR / NTHREADS; ++k) {
    const int i = k * NTHREADS + tid, r = i / CPR, c = i % CPR;
    const bool ok = r < nrows;
    const int g = row0 + (ok ? r : 0);
    const T *src = q + (i64)(q0 + g / G) * q_stride + (i64)(kvh * G + g % G) * D + c * 8;
    cp_async16(smem_addr(qs + r * DP + c * 8), src, ok ? 16 : 0);
  }
  fetch_blk(0);
  issue(0);

  // This lane's rows of query tile m of the warp: r0 = lane / 4 and r0 + 8. Key
  // t counts for a row while t < its limit (position + 1); rows past the
  // sequence take key 0 alone and are never stored. The warp stops after its
  // last row's limit.
  const int wrow = warp * 16 * MT;
  auto limit = [&](int r) { return r < nrows ? pos0 + (row0 + r) / G + 1 : 1; };
  int lim[MT][2];
#pragma unroll
  for (int m = 0; m < MT; ++m) {
    lim[m][0] = limit(wrow + 16 * m + (lane >> 2));
    lim[m][1] = limit(wrow + 16 * m + (lane >> 2) + 8);
  }
  const int warp_end = wrow < nrows ? limit(min(wrow + 16 * MT - 1, nrows - 1)) : 0;
  const int warp_first_end = wrow + 16 * MT - 1 < nrows ? limit(wrow) : 1;  // the smallest limit of the warp

  const float qscale = scale * LOG2E;
  QFrags<D, MT == 1 && D <= 128> qf[MT];  // two tiles' query fragments would not fit the registers
  SoftmaxRows<D> acc[MT];
#pragma unroll
  for (int m = 0; m < MT; ++m) acc[m].init();
  unsigned k_off[4], v_off[4];
  ldsm_offsets<D>(lane, k_off, v_off);

  for (int st = 0; st < nstages; ++st) {
    cp_async_wait<0>();
    __syncthreads();  // chunk st (and the query rows) landed for every thread; chunk st-1 is free
    if (st == 0) {
#pragma unroll
      for (int m = 0; m < MT; ++m) qf[m].load(smem_addr(qs + (wrow + 16 * m) * DP), lane);
    }
    issue(st + 1);
#pragma unroll
    for (int part = 0; part < KC / (16 * NS); ++part) {
      const int tb = st * KC + part * 16 * NS;
      if (tb >= warp_end) break;  // past the warp's diagonal (warp-uniform)
      const unsigned ks = smem_addr(pipe + (st % STAGES) * STAGE_ELEMS) + subtile_off<D>(part * NS);
      const unsigned vs = ks + KC * S::RP * 2;
      float s[MT][NS][2][4];
      tile_scores<DT, D>(s, qf, ks, k_off);
      unsigned pa[MT][NS][4];
      // finite maxima: key 0 (the first chunk) counts for every row; below the
      // diagonal (every key counts for every row of the warp) no masking
#pragma unroll
      for (int m = 0; m < MT; ++m)
        acc[m].template update<DT>(s[m], tb, tb + 16 * NS > warp_first_end, lim[m][0], lim[m][1], qscale, lane,
                                   pa[m]);
      tile_pv<DT, D>(acc, pa, vs, v_off);
    }
  }
  cp_async_wait<0>();

  // Each row's output straight from the accumulators: columns 8 j + 2 (lane % 4) + {0, 1}.
  const int c0 = 2 * (lane & 3);
#pragma unroll
  for (int m = 0; m < MT; ++m) {
    acc[m].reduce_sums();
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int r = wrow + 16 * m + (lane >> 2) + 8 * h;
      if (r >= nrows) continue;
      const int g = row0 + r;
      T *dst = out + ((i64)(q0 + g / G) * num_heads + kvh * G + g % G) * D + c0;
      const float inv = 1.f / (h ? acc[m].l1 : acc[m].l0);
#pragma unroll
      for (int j = 0; j < NTD; ++j)
        *reinterpret_cast<unsigned *>(dst + 8 * j) =
            pack2<DT>(acc[m].o[j][2 * h] * inv, acc[m].o[j][2 * h + 1] * inv);
    }
  }
#endif
}

}  // namespace ps

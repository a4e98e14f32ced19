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
// warps owns ROWS = 64 (token, query head) rows of one sequence and KV head,
// taken in token-major order so the heads that share a KV head are served by
// one K/V read (16 tokens of a 4-head group). Each warp holds 16 of the rows
// as the M rows of the mma tile math (mma_tile.cuh) and scores a whole chunk
// of KC = 64 keys at once: 8 independent accumulators per k-step, where 16
// keys at a time left the mma waiting on each other (ncu: 'wait' and short-
// scoreboard stalls dominated, 37% tensor-pipe activity against FlashAttention's
// 56%), and one max/rescale per 64 keys instead of four. K/V are staged through
// shared memory KC = 64 tokens at a time by all 128 threads (16-byte cp.async
// gathered through the block table, rows laid out as mma_tile.cuh says), in
// two stages so the copies of the next chunk overlap the math on this one.
// A warp skips the chunks past its last row's position (the causal diagonal)
// and the masking in chunks below its first row's; rows keep their own limits
// inside the diagonal chunks.
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
    ROWS = 16 * NWARPS,            // (token, query head) rows per CTA
    KC = 64,                       // KV tokens per stage
    STAGES = 2,
    STAGE_ELEMS = 2 * KC * R::RP,  // K rows then V rows
    SMEM_BYTES = STAGES * STAGE_ELEMS * 2 + ROWS * R::DP * 2 + 128,  // must match prefill_tc_smem_bytes in ops/loaders.py
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
  enum { ROWS = S::ROWS, KC = S::KC, NS = KC / 16, STAGES = S::STAGES, CPR = S::CPR, DP = S::DP,
         NTD = S::NTD, STAGE_ELEMS = S::STAGE_ELEMS, NTHREADS = S::NWARPS * 32 };
  extern __shared__ uint4 tc_smem[];
  u16 *pipe = reinterpret_cast<u16 *>(align128(tc_smem));  // [STAGES][K rows, V rows]
  u16 *qs = pipe + STAGES * STAGE_ELEMS;                    // [ROWS][DP]

  const int G = num_heads / num_kv_heads;
  const int kvh = blockIdx.y;
  // Find this CTA's (sequence, tile): tiles are laid out sequence after sequence.
  int tile = blockIdx.x, seq = -1, n = 0;
  for (int s = 0; s < num_seqs; ++s) {
    n = query_start_loc[s + 1] - query_start_loc[s];
    const int nt = (n * G + ROWS - 1) / ROWS;
    if (tile < nt) {
      seq = s;
      tile = nt - 1 - tile;  // the longest tile first
      break;
    }
    tile -= nt;
  }
  if (seq < 0) return;  // the grid is an upper bound on the number of tiles
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

  // This lane's rows r0 = lane / 4 and r0 + 8 of the warp: key t counts for a
  // row while t < its limit (position + 1); rows past the sequence take key 0
  // alone and are never stored. The warp stops after its last row's limit.
  const int wrow = warp * 16;
  auto limit = [&](int r) { return r < nrows ? pos0 + (row0 + r) / G + 1 : 1; };
  const int lim0 = limit(wrow + (lane >> 2)), lim1 = limit(wrow + (lane >> 2) + 8);
  const int warp_end = wrow < nrows ? limit(min(wrow + 15, nrows - 1)) : 0;
  const int warp_first_end = wrow + 15 < nrows ? limit(wrow) : 1;  // the smallest limit of the warp

  const float qscale = scale * LOG2E;
  QFrags<D> qf;
  SoftmaxRows<D> acc;
  acc.init();
  unsigned k_off[4], v_off[4];
  ldsm_offsets<D>(lane, k_off, v_off);

  for (int st = 0; st < nstages; ++st) {
    cp_async_wait<0>();
    __syncthreads();  // chunk st (and the query rows) landed for every thread; chunk st-1 is free
    if (st == 0) qf.load(smem_addr(qs + wrow * DP), lane);
    issue(st + 1);
    if (st * KC >= warp_end) continue;  // past the warp's diagonal (warp-uniform)
    const unsigned ks = smem_addr(pipe + (st % STAGES) * STAGE_ELEMS);
    const unsigned vs = ks + KC * S::RP * 2;
    float s[NS][2][4];
    tile_scores<DT, D>(s, qf, ks, k_off);
    unsigned pa[NS][4];
    // finite maxima: key 0 (the first chunk) counts for every row
    // below the diagonal (every key counts for every row) no masking
    acc.template update<DT>(s, st * KC, (st + 1) * KC > warp_first_end, lim0, lim1, qscale, lane, pa);
    acc.template add_pv<DT>(pa, vs, v_off);
  }
  cp_async_wait<0>();
  acc.reduce_sums();

  // Each row's output straight from the accumulators: columns 8 j + 2 (lane % 4) + {0, 1}.
  const int c0 = 2 * (lane & 3);
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    const int r = wrow + (lane >> 2) + 8 * h;
    if (r >= nrows) continue;
    const int g = row0 + r;
    T *dst = out + ((i64)(q0 + g / G) * num_heads + kvh * G + g % G) * D + c0;
    const float inv = 1.f / (h ? acc.l1 : acc.l0);
#pragma unroll
    for (int j = 0; j < NTD; ++j)
      *reinterpret_cast<unsigned *>(dst + 8 * j) = pack2<DT>(acc.o[j][2 * h] * inv, acc.o[j][2 * h + 1] * inv);
  }
#endif
}

}  // namespace ps

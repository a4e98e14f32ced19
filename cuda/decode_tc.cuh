// Decode paged attention on tensor cores, for fp16 and bf16 (sm_80 and up).
//
// Why: with 4 query heads per KV head the CUDA-core kernel (decode.cuh) spends
// about 5 instructions per KV element (4 FMAs, a conversion, shuffles) and runs
// out of issue slots before HBM runs out of bandwidth. Here one warp-wide
// mma.sync m16n8k16 does 2048 multiply-adds, so the math costs a few
// instructions per 16-token tile and the kernel streams KV at memory speed.
//
// One CTA of 4 warps serves one (sequence, KV head, group of up to 16 query
// heads, partition). The query heads of the group fill the M rows of the mma
// (rows past the group are zero), tokens are N and head_size is K for
// S = Q K^T; for O = P V tokens are K and head_size is N. Each warp owns every
// 4th 16-token tile of the CTA's token range and runs its own cp.async
// pipeline of STAGES tiles in shared memory (16-byte copies, one row of K and
// V per token, gathered through the block table), so STAGES-1 tiles per warp
// are in flight while it computes one; warps never wait on each other until
// the final merge. Softmax is online in the log2 domain with fp32 state; P is
// rounded to the input type for the P V product, as FlashAttention does.
//
// Stage layout. The copies of a warp are served whole only when the rows they
// fill start on 128-byte boundaries of shared memory; a row that straddles
// one has its sectors fetched from L2 twice (benchmarks/smem_layout_probe.cu:
// 1.56x the KV bytes from L2 with rows padded by 16 bytes, 2.0x with every row
// 16 bytes off, 1.25x aligned; docs/kernels.md). ldmatrix, for its part, wants the 8
// rows of one phase in 8 different 4-bank groups. For head sizes 64, 128 and
// 256 (rows of 128, 256, 512 bytes) rows are unpadded and 128-byte aligned,
// and the 16-byte chunk c of row r is stored at chunk c ^ (r & 7): both hold.
// 80 and 96 (rows of 160, 192 bytes) cannot be swizzled that way; their rows
// are padded by 16 bytes (conflict-free reads, some sectors fetched twice).
//
// Tokens past the context are zero-filled (cp.async with source size 0), never
// read: block-table padding is not dereferenced and 0 * NaN cannot occur.
// Split-KV partials are merged by the last CTA of each head group (split_kv_finish).
#pragma once
#include "common.cuh"

// Pipeline depth in 16-token tiles per warp (head 256 uses 2 so it fits 164 KiB
// of shared memory); must match decode_tc_stages in ops/loaders.py.
#ifndef PS_TC_STAGES
#define PS_TC_STAGES 3
#endif
// L2 prefetch qualifier of the KV copies: 256 B measured ~2% faster than none on H100.
#ifndef PS_TC_L2PF
#define PS_TC_L2PF ".L2::256B"
#endif

namespace ps {

template <int D>
struct TcShape {
  enum {
    NWARPS = 4,
    TILE = 16,                      // tokens per warp tile (one mma K of P V)
    STAGES = D >= 256 ? 2 : PS_TC_STAGES,  // 3 keeps two CTAs per SM at head 128
    SWZ = (D & (D - 1)) == 0,       // XOR-swizzled rows (else padded)
    DP = D + 8,                     // padded row of the query tile, in 16-bit elements
    RP = SWZ ? D : D + 8,           // row of a pipeline stage, in 16-bit elements
    CPR = D / 8,                    // 16-byte chunks per row
    KSTEPS = D / 16,                // mma K steps of Q K^T
    NTD = D / 8,                    // output n-tiles of P V
    STAGE_ELEMS = 2 * TILE * RP,    // K rows then V rows
    PIPE_BYTES = NWARPS * STAGES * STAGE_ELEMS * 2,
    SMEM_BYTES = 16 * DP * 2 + PIPE_BYTES + 128,  // must match decode_tc_smem_bytes in ops/loaders.py
    QREG = D <= 128,                // keep Q fragments in registers (else re-read from smem)
  };
  static_assert((TILE * CPR) % 32 == 0, "a tile must split evenly over the lanes");
  static_assert((NWARPS * 16 * D + NWARPS * 32) * 4 <= PIPE_BYTES, "merge area must fit the pipeline");
};

__device__ __forceinline__ unsigned smem_addr(const void *p) {
  unsigned r;
  asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(r) : "l"(p));
  return r;
}

// 16-byte global -> shared copy; src_bytes 0 writes zeros and reads nothing.
__device__ __forceinline__ void cp_async16(unsigned dst, const void *src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global" PS_TC_L2PF " [%0], [%1], 16, %2;" ::"r"(dst), "l"(src), "r"(src_bytes)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
}

__device__ __forceinline__ void ldsm_x4(unsigned (&r)[4], unsigned addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void ldsm_x4_t(unsigned (&r)[4], unsigned addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// c += a * b for one m16n8k16 tile, fp32 accumulate.
template <int DT>
__device__ __forceinline__ void mma16816(float (&c)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
  if (DT == DT_BF16)
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  else
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Byte offset of 16-byte chunk c of row r in a pipeline stage (see the top).
template <int D>
__device__ __forceinline__ unsigned stage_off(int r, int c) {
  typedef TcShape<D> S;
  return (unsigned)(r * S::RP + (S::SWZ ? c ^ (r & 7) : c) * 8) * 2;
}

// Two floats into one 16-bit pair, lo in the low half (the lower k index).
template <int DT>
__device__ __forceinline__ unsigned pack2(float lo, float hi) {
  unsigned r;
  if (DT == DT_BF16)
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
  else
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
  return r;
}

template <int DT, int D>
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
  typedef TcShape<D> S;
  enum { NWARPS = S::NWARPS, TILE = S::TILE, STAGES = S::STAGES, DP = S::DP, CPR = S::CPR,
         KSTEPS = S::KSTEPS, NTD = S::NTD, STAGE_ELEMS = S::STAGE_ELEMS };
  extern __shared__ uint4 tc_smem[];
  // Dynamic shared memory starts after the static (split_kv_finish's flag), so
  // the pipeline is put on the next 128-byte boundary (SMEM_BYTES has room for
  // it): rows misaligned by 16 bytes would split every sector a copy reads.
  // The query tile follows the pipeline.
  u16 *pipe = reinterpret_cast<u16 *>(reinterpret_cast<char *>(tc_smem) +
                                      ((128u - (smem_addr(tc_smem) & 127u)) & 127u));
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
  const unsigned qaddr = smem_addr(qs) + ((lane & 15) * DP + (lane >> 4) * 8) * 2;
  unsigned qa[S::QREG ? KSTEPS : 1][4];
  if (S::QREG) {
#pragma unroll
    for (int kk = 0; kk < (S::QREG ? KSTEPS : 1); ++kk) ldsm_x4(qa[kk], qaddr + kk * 32);
  }

  const float qscale = scale * LOG2E;
  // this thread's rows r0 = lane/4 and r0 + 8; its token columns 2*(lane%4) + {0, 1} of each n-tile
  float m0 = neg_inf(), m1 = neg_inf(), l0 = 0.f, l1 = 0.f;
  float o[NTD][4];
#pragma unroll
  for (int j = 0; j < NTD; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.f;

  // Byte offsets inside a stage of this lane's ldmatrix reads of K (non-transposed:
  // rows are tokens, the fragments are K^T) and V (transposed). Read i (a k-step of
  // Q K^T, a pair of n-tiles of P V) takes chunk 2 i + c0 of row r, stored at chunk
  // (2 i + c0) ^ (r & 7) = b + 2 (((i & 3) ^ y) + (i & ~3)) with b = c0 ^ (r & 1),
  // y = (r >> 1) & 3 (b = c0, y = 0 for padded rows): four offsets per lane, the
  // rest an immediate, so the loop adds nothing to the address math.
  unsigned k_off[4], v_off[4];
  {
    const int kr = ((lane >> 4) << 3) + (lane & 7), kc0 = (lane >> 3) & 1;
    const int vr = lane & 15, vc0 = lane >> 4;
    const int ky = S::SWZ ? (kr >> 1) & 3 : 0, vy = S::SWZ ? (vr >> 1) & 3 : 0;
    const int kb = S::SWZ ? kc0 ^ (kr & 1) : kc0, vb = S::SWZ ? vc0 ^ (vr & 1) : vc0;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      k_off[j] = (unsigned)(kr * S::RP * 2 + kb * 16 + 32 * (j ^ ky));
      v_off[j] = (unsigned)(vr * S::RP * 2 + vb * 16 + 32 * (j ^ vy));
    }
  }

  for (int it = 0; it < ntiles; ++it) {
    cp_async_wait<STAGES - 2>();
    __syncwarp();  // every lane's copies of tile `it` landed; the stage read last round is free
    issue(it + STAGES - 1);
    const unsigned ks = wpipe + (it % STAGES) * STAGE_ELEMS * 2;
    const unsigned vs = ks + TILE * S::RP * 2;
    const int tb = first + it * STEP;

    float s[2][4];
#pragma unroll
    for (int j = 0; j < 2; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < KSTEPS; ++kk) {
      unsigned b[4];
      ldsm_x4(b, ks + k_off[kk & 3] + 32 * (kk & ~3));
      if (S::QREG) {
        mma16816<DT>(s[0], qa[S::QREG ? kk : 0], b[0], b[1]);
        mma16816<DT>(s[1], qa[S::QREG ? kk : 0], b[2], b[3]);
      } else {
        unsigned a[4];
        ldsm_x4(a, qaddr + kk * 32);
        mma16816<DT>(s[0], a, b[0], b[1]);
        mma16816<DT>(s[1], a, b[2], b[3]);
      }
    }

    float mx0 = neg_inf(), mx1 = neg_inf();
#pragma unroll
    for (int j = 0; j < 2; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const bool valid = tb + 8 * j + 2 * (lane & 3) + (e & 1) < t1;
        s[j][e] = valid ? s[j][e] * qscale : neg_inf();
        if (e < 2) mx0 = fmaxf(mx0, s[j][e]);
        else mx1 = fmaxf(mx1, s[j][e]);
      }
    mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 1));
    mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 2));
    mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 1));
    mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 2));
    // finite: the tile's first token is always in range
    const float n0 = fmaxf(m0, mx0), n1 = fmaxf(m1, mx1);
    if (__any_sync(0xffffffffu, n0 > m0 || n1 > m1)) {  // once the maxima settle, no rescale
      const float a0 = exp2f(m0 - n0), a1 = exp2f(m1 - n1);
      l0 *= a0;
      l1 *= a1;
#pragma unroll
      for (int j = 0; j < NTD; ++j) {
        o[j][0] *= a0; o[j][1] *= a0;
        o[j][2] *= a1; o[j][3] *= a1;
      }
      m0 = n0;
      m1 = n1;
    }
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      s[j][0] = exp2f(s[j][0] - m0); s[j][1] = exp2f(s[j][1] - m0);
      s[j][2] = exp2f(s[j][2] - m1); s[j][3] = exp2f(s[j][3] - m1);
      l0 += s[j][0] + s[j][1];
      l1 += s[j][2] + s[j][3];
    }
    // the score accumulators are already laid out as the A fragment of P (16 x 16 tokens)
    const unsigned pa[4] = {pack2<DT>(s[0][0], s[0][1]), pack2<DT>(s[0][2], s[0][3]),
                            pack2<DT>(s[1][0], s[1][1]), pack2<DT>(s[1][2], s[1][3])};
#pragma unroll
    for (int jd = 0; jd < NTD / 2; ++jd) {
      unsigned b[4];
      ldsm_x4_t(b, vs + v_off[jd & 3] + 32 * (jd & ~3));
      mma16816<DT>(o[2 * jd], pa, b[0], b[1]);
      mma16816<DT>(o[2 * jd + 1], pa, b[2], b[3]);
    }
  }
  cp_async_wait<0>();

  l0 += __shfl_xor_sync(0xffffffffu, l0, 1);
  l0 += __shfl_xor_sync(0xffffffffu, l0, 2);
  l1 += __shfl_xor_sync(0xffffffffu, l1, 1);
  l1 += __shfl_xor_sync(0xffffffffu, l1, 2);

  __syncthreads();  // every warp is done with its pipeline: reuse it for the merge
  float *sm_o = reinterpret_cast<float *>(pipe);  // [NWARPS][16][D]
  float *sm_m = sm_o + NWARPS * 16 * D;           // [NWARPS][16]
  float *sm_l = sm_m + NWARPS * 16;
  {
    const int r0 = lane >> 2, c0 = 2 * (lane & 3);
    float *w0 = sm_o + (warp * 16 + r0) * D + c0;
    float *w1 = w0 + 8 * D;
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

  // Merge the warps; a warp that saw no token has m = -inf and weight 0.
  for (int idx = threadIdx.x; idx < nh * D; idx += NWARPS * 32) {
    const int g = idx / D, d = idx % D;
    float M = neg_inf();
#pragma unroll
    for (int w = 0; w < NWARPS; ++w) M = fmaxf(M, sm_m[w * 16 + g]);
    float L = 0.f, A = 0.f;
#pragma unroll
    for (int w = 0; w < NWARPS; ++w) {
      const float mw = sm_m[w * 16 + g];
      const float wt = mw == neg_inf() ? 0.f : exp2f(mw - M);
      L += wt * sm_l[w * 16 + g];
      A += wt * sm_o[(w * 16 + g) * D + d];
    }
    store_head_result<DT>(out, part_out, part_ml, (i64)seq * num_heads + head0 + g, d, D,
                          nparts, part, M, L, A);
  }
  if (nparts > 1)
    split_kv_finish<DT>(out, part_out, part_ml, counter, (i64)seq * num_heads + head0, nh, D,
                        nparts, nused);
#endif
}

}  // namespace ps

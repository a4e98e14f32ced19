// Tensor-core building blocks of the decode (decode_tc.cuh) and prefill
// (prefill_tc.cuh) kernels, for fp16 and bf16 on sm_80 and up: 16-byte
// cp.async, ldmatrix, mma.sync m16n8k16, the shared-memory layout of K/V rows,
// and the attention math of a warp's 16-row query tiles over 16-key subtiles
// (scores, online softmax, P V).
//
// Tile math. The 16 rows of a query tile are the M rows of the mma, keys are
// N and head_size is K for S = Q K^T; for O = P V keys are K and head_size is
// N. Softmax is online in the log2 domain (the scale times log2 e folded into
// the exp2 argument) with fp32 state; P is rounded to the input type for the
// P V product, as FlashAttention does. A lane holds rows r0 = lane / 4 and
// r0 + 8 and the key columns 2 * (lane % 4) + {0, 1} of each 8-key n-tile.
//
// Row layout. The copies of a warp are served whole only when the rows they
// fill start on 128-byte boundaries of shared memory; a row that straddles
// one has its sectors fetched from L2 twice (benchmarks/smem_layout_probe.cu:
// 1.56x the KV bytes from L2 with rows padded by 16 bytes, 2.0x with every row
// 16 bytes off, 1.25x aligned; docs/kernels.md). ldmatrix, for its part, wants the 8
// rows of one phase in 8 different 4-bank groups. For head sizes 64, 128 and
// 256 (rows of 128, 256, 512 bytes) rows are unpadded and 128-byte aligned,
// and the 16-byte chunk c of row r is stored at chunk c ^ (r & 7): both hold.
// 80 and 96 (rows of 160, 192 bytes) cannot be swizzled that way; their rows
// are padded by 16 bytes (conflict-free reads, some sectors fetched twice).
#pragma once
#include "common.cuh"

// L2 prefetch qualifier of the KV copies: 256 B measured ~2% faster than none on H100.
#ifndef PS_TC_L2PF
#define PS_TC_L2PF ".L2::256B"
#endif

namespace ps {

// Shared-memory rows of head size D (in 16-bit elements) and the mma steps over it.
template <int D>
struct TileRows {
  enum {
    SWZ = (D & (D - 1)) == 0,  // XOR-swizzled K/V rows (else padded)
    DP = D + 8,                // padded row of a query tile
    RP = SWZ ? D : D + 8,      // row of a K/V tile
    CPR = D / 8,               // 16-byte chunks per row
    KSTEPS = D / 16,           // mma K steps of Q K^T
    NTD = D / 8,               // output n-tiles of P V
  };
};

__device__ __forceinline__ unsigned smem_addr(const void *p) {
  unsigned r;
  asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(r) : "l"(p));
  return r;
}

// `p` advanced to the next 128-byte boundary of shared memory. Dynamic shared
// memory starts after any static (split_kv_finish's flag), 16 bytes in: rows
// misaligned by 16 bytes would split every sector a copy reads.
__device__ __forceinline__ char *align128(void *p) {
  return reinterpret_cast<char *>(p) + ((128u - (smem_addr(p) & 127u)) & 127u);
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

// Byte offset of 16-byte chunk c of row r in a K/V tile (see the top).
template <int D>
__device__ __forceinline__ unsigned stage_off(int r, int c) {
  typedef TileRows<D> S;
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

// Byte offsets inside a 16-row tile of this lane's ldmatrix reads of K
// (non-transposed: rows are tokens, the fragments are K^T) and V (transposed).
// Read i (a k-step of Q K^T, a pair of n-tiles of P V) takes chunk 2 i + c0 of
// row r, stored at chunk (2 i + c0) ^ (r & 7) = b + 2 (((i & 3) ^ y) + (i & ~3))
// with b = c0 ^ (r & 1), y = (r >> 1) & 3 (b = c0, y = 0 for padded rows): four
// offsets per lane, the rest an immediate, so the loops add no address math.
template <int D>
__device__ __forceinline__ void ldsm_offsets(int lane, unsigned (&k_off)[4], unsigned (&v_off)[4]) {
  typedef TileRows<D> S;
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

// Query A fragments, kept in registers (by default up to head size 128) or re-read
// from shared memory.
template <int D, bool IN_REGS = (D <= 128)>
struct QFrags {
  enum { REG = IN_REGS, N = REG ? D / 16 : 1 };
  unsigned a[N][4];
  unsigned addr;  // this lane's ldmatrix address in the padded [16][D + 8] query rows

  __device__ __forceinline__ void load(unsigned rows, int lane) {
    addr = rows + ((lane & 15) * TileRows<D>::DP + (lane >> 4) * 8) * 2;
    if (REG) {
#pragma unroll
      for (int kk = 0; kk < N; ++kk) ldsm_x4(a[kk], addr + kk * 32);
    }
  }
};

// Rescaling the output accumulators costs a multiply per element, so the running
// maximum is only raised once a new score exceeds it by more than this (log2
// units): P then stays below 2^8, which fp16, bf16 and the fp32 sums hold with
// room to spare, and the result is the same once divided by the sum. Measured
// 3-8% faster prefill on H100 (benchmarks/prefill.py) than raising it every tile.
constexpr float RESCALE_SLACK = 8.f;

// Byte offset of 16-token subtile j in a K or V tile of shared memory.
template <int D>
__device__ __forceinline__ unsigned subtile_off(int j) {
  return (unsigned)(j * 16 * TileRows<D>::RP * 2);
}

// Online softmax state of a lane's two rows and their output accumulators.
template <int D>
struct SoftmaxRows {
  float m0, m1, l0, l1;
  float o[D / 8][4];

  __device__ __forceinline__ void init() {
    m0 = m1 = neg_inf();
    l0 = l1 = 0.f;
#pragma unroll
    for (int j = 0; j < D / 8; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.f;
  }

  // Folds in the raw scores s (q . k) of tokens tb..tb+16 NS-1 and returns P as
  // the A fragments of the P V product. With `mask`, token t counts for row r0
  // only when t < lim0, for r0 + 8 when t < lim1; without, every token counts
  // (the caller knows the chunk is inside every row's range). Each row must have
  // a valid token in these or earlier tokens (m stays finite). m is kept in the
  // scaled log2 domain, so P = exp2(s * qscale - m) is one fma and an exp2.
  template <int DT, int NS>
  __device__ __forceinline__ void update(float (&s)[NS][2][4], int tb, bool mask, int lim0, int lim1,
                                         float qscale, int lane, unsigned (&pa)[NS][4]) {
    if (mask) {
#pragma unroll
      for (int j = 0; j < NS; ++j)
#pragma unroll
        for (int h = 0; h < 2; ++h)
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int t = tb + 16 * j + 8 * h + 2 * (lane & 3) + (e & 1);
            if (t >= (e < 2 ? lim0 : lim1)) s[j][h][e] = neg_inf();
          }
    }
    float mx0 = neg_inf(), mx1 = neg_inf();
#pragma unroll
    for (int j = 0; j < NS; ++j)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        mx0 = fmaxf(mx0, fmaxf(s[j][h][0], s[j][h][1]));
        mx1 = fmaxf(mx1, fmaxf(s[j][h][2], s[j][h][3]));
      }
    mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 1));
    mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 2));
    mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 1));
    mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 2));
    mx0 *= qscale;  // qscale > 0: the max of the scaled scores
    mx1 *= qscale;
    if (__any_sync(0xffffffffu, mx0 > m0 + RESCALE_SLACK || mx1 > m1 + RESCALE_SLACK)) {
      const float n0 = fmaxf(m0, mx0), n1 = fmaxf(m1, mx1);
      const float a0 = exp2f(m0 - n0), a1 = exp2f(m1 - n1);
      l0 *= a0;
      l1 *= a1;
#pragma unroll
      for (int j = 0; j < D / 8; ++j) {
        o[j][0] *= a0; o[j][1] *= a0;
        o[j][2] *= a1; o[j][3] *= a1;
      }
      m0 = n0;
      m1 = n1;
    }
#pragma unroll
    for (int j = 0; j < NS; ++j) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        s[j][h][0] = exp2f(fmaf(s[j][h][0], qscale, -m0)); s[j][h][1] = exp2f(fmaf(s[j][h][1], qscale, -m0));
        s[j][h][2] = exp2f(fmaf(s[j][h][2], qscale, -m1)); s[j][h][3] = exp2f(fmaf(s[j][h][3], qscale, -m1));
        l0 += s[j][h][0] + s[j][h][1];
        l1 += s[j][h][2] + s[j][h][3];
      }
      // the score accumulators are already laid out as the A fragment of P (16 x 16 tokens)
      pa[j][0] = pack2<DT>(s[j][0][0], s[j][0][1]);
      pa[j][1] = pack2<DT>(s[j][0][2], s[j][0][3]);
      pa[j][2] = pack2<DT>(s[j][1][0], s[j][1][1]);
      pa[j][3] = pack2<DT>(s[j][1][2], s[j][1][3]);
    }
  }

  // Row sums over the 4 lanes that share each row.
  __device__ __forceinline__ void reduce_sums() {
    l0 += __shfl_xor_sync(0xffffffffu, l0, 1);
    l0 += __shfl_xor_sync(0xffffffffu, l0, 2);
    l1 += __shfl_xor_sync(0xffffffffu, l1, 1);
    l1 += __shfl_xor_sync(0xffffffffu, l1, 2);
  }
};

// s[m][j] = Q_m K_j^T for MT 16-row query tiles and NS subtiles of 16 keys, the K
// rows of subtile j starting at shared byte address ks + subtile_off(j). Every K
// fragment read from shared memory feeds the MT tiles, and the 2 * NS * MT
// accumulators are independent, so the mma of one k-step do not wait on each other.
template <int DT, int D, int NS, int MT, bool QR>
__device__ __forceinline__ void tile_scores(float (&s)[MT][NS][2][4], const QFrags<D, QR> (&q)[MT], unsigned ks,
                                            const unsigned (&k_off)[4]) {
#pragma unroll
  for (int m = 0; m < MT; ++m)
#pragma unroll
    for (int j = 0; j < NS; ++j)
#pragma unroll
      for (int h = 0; h < 2; ++h) s[m][j][h][0] = s[m][j][h][1] = s[m][j][h][2] = s[m][j][h][3] = 0.f;
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    unsigned a[MT][4];
#pragma unroll
    for (int m = 0; m < MT; ++m) {
      if (QR) {
#pragma unroll
        for (int i = 0; i < 4; ++i) a[m][i] = q[m].a[QR ? kk : 0][i];
      } else {
        ldsm_x4(a[m], q[m].addr + kk * 32);
      }
    }
#pragma unroll
    for (int j = 0; j < NS; ++j) {
      unsigned b[4];
      ldsm_x4(b, ks + subtile_off<D>(j) + k_off[kk & 3] + 32 * (kk & ~3));
#pragma unroll
      for (int m = 0; m < MT; ++m) {
        mma16816<DT>(s[m][j][0], a[m], b[0], b[1]);
        mma16816<DT>(s[m][j][1], a[m], b[2], b[3]);
      }
    }
  }
}

// acc[m].o += P_m V over NS subtiles of 16 keys, the V rows of subtile j starting at
// shared byte address vs + subtile_off(j); every V fragment feeds the MT tiles.
template <int DT, int D, int NS, int MT>
__device__ __forceinline__ void tile_pv(SoftmaxRows<D> (&acc)[MT], const unsigned (&pa)[MT][NS][4], unsigned vs,
                                        const unsigned (&v_off)[4]) {
#pragma unroll
  for (int j = 0; j < NS; ++j)
#pragma unroll
    for (int jd = 0; jd < D / 16; ++jd) {
      unsigned b[4];
      ldsm_x4_t(b, vs + subtile_off<D>(j) + v_off[jd & 3] + 32 * (jd & ~3));
#pragma unroll
      for (int m = 0; m < MT; ++m) {
        mma16816<DT>(acc[m].o[2 * jd], pa[m][j], b[0], b[1]);
        mma16816<DT>(acc[m].o[2 * jd + 1], pa[m][j], b[2], b[3]);
      }
    }
}

}  // namespace ps

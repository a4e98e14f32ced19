// Varlen causal prefill over the paged KV cache.
//
// The new tokens of every sequence are packed in `q`; token i of a sequence
// with n new tokens and context_len c sits at position c - n + i and attends to
// cache positions 0..c-n+i (its own K/V was written before the call). A CTA
// owns ROWS (token, query head) rows of one sequence and one KV head, walks the
// sequence's KV in chunks of KC tokens staged in shared memory (read once per
// CTA, shared by all its rows) and keeps an online softmax per row.
//
// This is a plain CUDA-core kernel: each lane scores one KV token of the chunk
// against 4 rows, then owns head_size/32 output dimensions for P*V. It is
// correct for every shape and fast enough for prompts; tensor-core prefill is
// future work (see docs/kernels.md).
#pragma once
#include "common.cuh"

namespace ps {

struct PrefillShape {
  enum { KC = 32, ROWS = 16, RPW = 4, NWARPS = 4 };
};

// Dynamic shared memory bytes the prefill kernel needs for head size d.
__host__ __device__ constexpr int prefill_smem_bytes(int d) {
  return (PrefillShape::ROWS * d + PrefillShape::KC * (d + 1) + PrefillShape::KC * d) * 4;
}

template <int DT, int D>
__global__ void __launch_bounds__(128) paged_prefill_kernel(
    typename Elem<DT>::T *__restrict__ out,       // [T, H, D] contiguous
    const typename Elem<DT>::T *__restrict__ q,   // [T, H, D], token stride q_stride
    i64 q_stride,
    const typename Elem<DT>::T *__restrict__ kc,  // [blocks, Hkv, bs, D]
    const typename Elem<DT>::T *__restrict__ vc,
    const int *__restrict__ block_tables, int bt_stride,
    const int *__restrict__ query_start_loc,      // [S + 1]
    const int *__restrict__ context_lens,         // [S]
    int num_seqs, int num_heads, int num_kv_heads, int bs_log2, float scale) {
  typedef Elem<DT> E;
  enum { KC = PrefillShape::KC, ROWS = PrefillShape::ROWS, RPW = PrefillShape::RPW,
         VEC = E::VEC, NV = D / VEC, NI = (D + 31) / 32, KS = D + 1 };
  extern __shared__ float smem[];
  float *qs = smem;              // [ROWS][D]
  float *ks = qs + ROWS * D;     // [KC][D + 1]: odd stride, lanes read different rows
  float *vs = ks + KC * KS;      // [KC][D]

  const int G = num_heads / num_kv_heads;
  const int kvh = blockIdx.y;
  const PrefillTile pt = find_prefill_tile(blockIdx.x, query_start_loc, num_seqs, G, ROWS);
  if (pt.seq < 0) return;
  const int seq = pt.seq, tile = pt.tile, n = pt.n;
  const int ctx = context_lens[seq];
  const int q0 = query_start_loc[seq];
  const int first = tile * ROWS;
  const int last_pair = min(first + ROWS, n * G) - 1;
  const int kv_end = ctx - n + last_pair / G + 1;  // one past the furthest position any row sees

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const float qscale = scale * LOG2E;

  // Stage the scaled query rows; rows past the tile's last pair are zero.
  for (int i = threadIdx.x; i < ROWS * NV; i += blockDim.x) {
    const int r = i / NV, v = i % NV, pair = first + r;
    float f[VEC];
    if (pair <= last_pair) {
      const int t = q0 + pair / G, h = kvh * G + pair % G;
      E::unpack(*reinterpret_cast<const uint4 *>(q + t * q_stride + (i64)h * D + v * VEC), f);
    } else {
#pragma unroll
      for (int e = 0; e < VEC; ++e) f[e] = 0.f;
    }
#pragma unroll
    for (int e = 0; e < VEC; ++e) qs[r * D + v * VEC + e] = f[e] * qscale;
  }

  int pos[RPW];  // causal limit of each of this warp's rows; -1 = no row
#pragma unroll
  for (int r = 0; r < RPW; ++r) {
    const int pair = first + warp * RPW + r;
    pos[r] = pair <= last_pair ? ctx - n + pair / G : -1;
  }
  float m[RPW], l[RPW], acc[RPW][NI];
#pragma unroll
  for (int r = 0; r < RPW; ++r) {
    m[r] = neg_inf();
    l[r] = 0.f;
#pragma unroll
    for (int i = 0; i < NI; ++i) acc[r][i] = 0.f;
  }
  const int *bt = block_tables + (i64)seq * bt_stride;
  const int bmask = (1 << bs_log2) - 1;

  for (int c0 = 0; c0 < kv_end; c0 += KC) {
    __syncthreads();  // previous chunk fully consumed (and qs staged on the first pass)
    for (int i = threadIdx.x; i < KC * NV; i += blockDim.x) {
      const int j = i / NV, v = i % NV, t = c0 + j;
      float kf[VEC], vf[VEC];
      if (t < kv_end) {
        const i64 blk = bt[t >> bs_log2];
        const i64 base = (((blk * num_kv_heads + kvh) << bs_log2) + (t & bmask)) * D + v * VEC;
        E::unpack(ld_stream(kc + base), kf);
        E::unpack(ld_stream(vc + base), vf);
      } else {  // zeros, never garbage: masked weights are 0 and 0 * NaN would poison P*V
#pragma unroll
        for (int e = 0; e < VEC; ++e) kf[e] = vf[e] = 0.f;
      }
#pragma unroll
      for (int e = 0; e < VEC; ++e) {
        ks[j * KS + v * VEC + e] = kf[e];
        vs[j * D + v * VEC + e] = vf[e];
      }
    }
    __syncthreads();

    float s[RPW];
#pragma unroll
    for (int r = 0; r < RPW; ++r) s[r] = 0.f;
    const float *qw = qs + warp * RPW * D;
    const float *kr = ks + lane * KS;
#pragma unroll 4
    for (int d = 0; d < D; d += 4) {
      const float k0 = kr[d], k1 = kr[d + 1], k2 = kr[d + 2], k3 = kr[d + 3];
#pragma unroll
      for (int r = 0; r < RPW; ++r) {
        const float4 qv = *reinterpret_cast<const float4 *>(qw + r * D + d);
        s[r] = fmaf(qv.x, k0, fmaf(qv.y, k1, fmaf(qv.z, k2, fmaf(qv.w, k3, s[r]))));
      }
    }

    const int t = c0 + lane;
#pragma unroll
    for (int r = 0; r < RPW; ++r) {
      if (t > pos[r]) s[r] = neg_inf();
      float cmax = warp_max_xor(s[r], 1, 32);
      const float mnew = fmaxf(m[r], cmax);
      if (mnew == neg_inf()) { s[r] = 0.f; continue; }  // row sees nothing (yet)
      const float alpha = exp2f(m[r] - mnew);
      m[r] = mnew;
      s[r] = exp2f(s[r] - mnew);
      l[r] = l[r] * alpha + s[r];
#pragma unroll
      for (int i = 0; i < NI; ++i) acc[r][i] *= alpha;
    }

#pragma unroll 4
    for (int j = 0; j < KC; ++j) {
      float vj[NI];
#pragma unroll
      for (int i = 0; i < NI; ++i) {
        const int d = lane + 32 * i;
        vj[i] = (d < D) ? vs[j * D + d] : 0.f;
      }
#pragma unroll
      for (int r = 0; r < RPW; ++r) {
        const float p = __shfl_sync(0xffffffffu, s[r], j);
#pragma unroll
        for (int i = 0; i < NI; ++i) acc[r][i] = fmaf(p, vj[i], acc[r][i]);
      }
    }
  }

#pragma unroll
  for (int r = 0; r < RPW; ++r) {
    if (pos[r] < 0) continue;
    float L = l[r];
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) L += __shfl_xor_sync(0xffffffffu, L, o);
    const int pair = first + warp * RPW + r;
    const i64 orow = (i64)(q0 + pair / G) * num_heads + kvh * G + pair % G;
#pragma unroll
    for (int i = 0; i < NI; ++i) {
      const int d = lane + 32 * i;
      if (d < D) out[orow * D + d] = E::from_f(acc[r][i] / L);
    }
  }
}

}  // namespace ps

// Decode paged attention: one query token per sequence attends over the
// sequence's whole context, read block by block through its block table.
//
// One thread block (CTA) serves one (sequence, KV head, query-head group,
// partition). All query heads that share the KV head (GQA/MQA) live in the
// same CTA, so every KV byte is fetched from HBM exactly once. Each token row
// of K and V (head_size elements) is read by TPT lanes with 16-byte loads; a
// warp walks CHUNK tokens at a time and issues every K and V load of the chunk
// before doing any math, so NP*VPL*2 16-byte loads per lane are in flight.
// Softmax runs online in the log2 domain (q is pre-scaled by scale*log2(e)).
//
// Long contexts with few sequences split the context into partitions of
// part_tokens (gridDim.z > 1); each CTA then writes a normalised partial output
// plus its (max, sum), and the last CTA of each (sequence, head group) to finish
// merges them (split_kv_finish in common.cuh): one launch, no reduction kernel.
#pragma once
#include "common.cuh"

// Tuning knobs (measured on H100/H200, see docs/kernels.md): 16-byte loads
// per lane and chunk for K (and as many for V), and the most lanes per token.
#ifndef PS_DECODE_NP_BASE
#define PS_DECODE_NP_BASE 8
#endif
#ifndef PS_DECODE_LPT
#define PS_DECODE_LPT 32
#endif

namespace ps {

template <int DT, int D, int QPB>
struct DecodeShape {
  enum {
    VEC = Elem<DT>::VEC,
    NV = D / VEC,                   // 16-byte vectors per token row
    TPT = cmin(PS_DECODE_LPT, pow2_ceil(NV)),  // lanes per token
    VPL = (NV + TPT - 1) / TPT,     // vectors per lane
    TPW = 32 / TPT,                 // tokens per warp pass
    // passes per chunk: 8 K + 8 V vectors in flight per lane, halved for 8
    // query heads per CTA so the logits and accumulators stay in registers
    NP_ = (QPB >= 8 ? PS_DECODE_NP_BASE / 2 : PS_DECODE_NP_BASE) / VPL,
    NP = NP_ > 0 ? NP_ : 1,
    CHUNK = NP * TPW,               // tokens per warp iteration
    NWARPS = 4,
  };
};

template <int DT, int D, int QPB>
__global__ void __launch_bounds__(128) paged_decode_kernel(
    typename Elem<DT>::T *__restrict__ out,      // [S, H, D]      (nparts == 1)
    float *__restrict__ part_out,                // [S, H, P, D]   (nparts > 1)
    float *__restrict__ part_ml,                 // [S, H, P, 2]   (max, sum)
    const typename Elem<DT>::T *__restrict__ q,  // [S, H, D], sequence stride q_stride
    i64 q_stride,
    const typename Elem<DT>::T *__restrict__ kc,  // [blocks, Hkv, bs, D]
    const typename Elem<DT>::T *__restrict__ vc,  // [blocks, Hkv, bs, D]
    const int *__restrict__ block_tables, int bt_stride,
    const int *__restrict__ context_lens,
    unsigned *__restrict__ split_counters,       // [S, gridDim.x], zero   (nparts > 1)
    int num_heads, int num_kv_heads, int bs_log2, float scale, int part_tokens) {
  typedef Elem<DT> E;
  typedef typename E::T T;
  typedef DecodeShape<DT, D, QPB> S;
  enum { VEC = S::VEC, NV = S::NV, TPT = S::TPT, VPL = S::VPL, TPW = S::TPW, NP = S::NP,
         CHUNK = S::CHUNK, NWARPS = S::NWARPS };

  const int G = num_heads / num_kv_heads;
  const int groups = (G + QPB - 1) / QPB;
  const int kvh = blockIdx.x / groups;
  const int qg = blockIdx.x % groups;
  const int seq = blockIdx.y;
  const int part = blockIdx.z;
  const int nparts = gridDim.z;
  const int ctx = context_lens[seq];
  const int t0 = nparts == 1 ? 0 : part * part_tokens;
  const int t1 = nparts == 1 ? ctx : min(ctx, t0 + part_tokens);
  const int head0 = kvh * G + qg * QPB;
  const int nh = min(QPB, G - qg * QPB);
  const int nused = nparts == 1 ? 1 : min(nparts, (ctx + part_tokens - 1) / part_tokens);
  unsigned *counter = split_counters + (i64)seq * gridDim.x + blockIdx.x;
  if (nparts > 1 && t0 >= t1) {  // no tokens here: only count this CTA as arrived
    split_kv_finish<DT>(out, part_out, part_ml, counter, (i64)seq * num_heads + head0, nh, D,
                        nparts, nused);
    return;
  }

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int tok = lane / TPT, sub = lane % TPT;
  const float qscale = scale * LOG2E;

  float qf[QPB][VPL][VEC];
#pragma unroll
  for (int g = 0; g < QPB; ++g)
#pragma unroll
    for (int j = 0; j < VPL; ++j) {
      const int vi = j * TPT + sub;
      if (g < nh && vi < NV) {
        const uint4 v = *reinterpret_cast<const uint4 *>(q + seq * q_stride + (i64)(head0 + g) * D + vi * VEC);
        E::unpack(v, qf[g][j]);
#pragma unroll
        for (int e = 0; e < VEC; ++e) qf[g][j][e] *= qscale;
      } else {
#pragma unroll
        for (int e = 0; e < VEC; ++e) qf[g][j][e] = 0.f;
      }
    }

  float m[QPB], l[QPB], acc[QPB][VPL][VEC];
#pragma unroll
  for (int g = 0; g < QPB; ++g) {
    m[g] = neg_inf();
    l[g] = 0.f;
#pragma unroll
    for (int j = 0; j < VPL; ++j)
#pragma unroll
      for (int e = 0; e < VEC; ++e) acc[g][j][e] = 0.f;
  }

  const int *bt = block_tables + (i64)seq * bt_stride;
  const int bmask = (1 << bs_log2) - 1;

  // Issues every K and V load of the CHUNK tokens starting at c0.
  auto load_chunk = [&](int c0, uint4 (&kr)[NP][VPL], uint4 (&vr)[NP][VPL]) {
#pragma unroll
    for (int p = 0; p < NP; ++p) {
      const int t = c0 + p * TPW + tok;
      i64 base = 0;
      if (t < t1) {
        const i64 blk = bt[t >> bs_log2];
        base = (((blk * num_kv_heads + kvh) << bs_log2) + (t & bmask)) * D;
      }
#pragma unroll
      for (int j = 0; j < VPL; ++j) {
        const int vi = j * TPT + sub;
        if (t < t1 && vi < NV) {
          kr[p][j] = ld_stream(kc + base + vi * VEC);
          vr[p][j] = ld_stream(vc + base + vi * VEC);
        } else {
          kr[p][j] = make_uint4(0, 0, 0, 0);
          vr[p][j] = make_uint4(0, 0, 0, 0);
        }
      }
    }
  };

  constexpr int STEP = NWARPS * CHUNK;
  uint4 kr[NP][VPL], vr[NP][VPL];
  // A register double buffer (next chunk's loads issued before this chunk's
  // math) measured slower: it costs occupancy, and 3 CTAs of 4 warps per SM
  // already cover the latency.
  for (int c0 = t0 + warp * CHUNK; c0 < t1; c0 += STEP) {
    load_chunk(c0, kr, vr);

    float s[NP][QPB];
#pragma unroll
    for (int p = 0; p < NP; ++p) {
      float kf[VPL][VEC];
#pragma unroll
      for (int j = 0; j < VPL; ++j) E::unpack(kr[p][j], kf[j]);
#pragma unroll
      for (int g = 0; g < QPB; ++g) {
        float d = 0.f;
#pragma unroll
        for (int j = 0; j < VPL; ++j)
#pragma unroll
          for (int e = 0; e < VEC; ++e) d = fmaf(qf[g][j][e], kf[j][e], d);
#pragma unroll
        for (int o = TPT / 2; o > 0; o >>= 1) d += __shfl_xor_sync(0xffffffffu, d, o);
        s[p][g] = (c0 + p * TPW + tok < t1) ? d : neg_inf();
      }
    }

#pragma unroll
    for (int g = 0; g < QPB; ++g) {
      float cmax = s[0][g];
#pragma unroll
      for (int p = 1; p < NP; ++p) cmax = fmaxf(cmax, s[p][g]);
      cmax = warp_max_xor(cmax, TPT, 32);  // finite: token c0 is always valid
      if (cmax > m[g]) {  // warp-uniform; once the max settles no rescale is needed
        const float alpha = exp2f(m[g] - cmax);
        l[g] *= alpha;
#pragma unroll
        for (int j = 0; j < VPL; ++j)
#pragma unroll
          for (int e = 0; e < VEC; ++e) acc[g][j][e] *= alpha;
        m[g] = cmax;
      }
#pragma unroll
      for (int p = 0; p < NP; ++p) {
        s[p][g] = exp2f(s[p][g] - m[g]);
        l[g] += s[p][g];
      }
    }

#pragma unroll
    for (int p = 0; p < NP; ++p) {
      float vf[VPL][VEC];
#pragma unroll
      for (int j = 0; j < VPL; ++j) E::unpack(vr[p][j], vf[j]);
#pragma unroll
      for (int g = 0; g < QPB; ++g)
#pragma unroll
        for (int j = 0; j < VPL; ++j)
#pragma unroll
          for (int e = 0; e < VEC; ++e) acc[g][j][e] = fmaf(s[p][g], vf[j][e], acc[g][j][e]);
    }
  }

  // Merge the token groups of the warp (lanes differing in the bits >= TPT).
#pragma unroll
  for (int o = TPT; o < 32; o <<= 1)
#pragma unroll
    for (int g = 0; g < QPB; ++g) {
      l[g] += __shfl_xor_sync(0xffffffffu, l[g], o);
#pragma unroll
      for (int j = 0; j < VPL; ++j)
#pragma unroll
        for (int e = 0; e < VEC; ++e) acc[g][j][e] += __shfl_xor_sync(0xffffffffu, acc[g][j][e], o);
    }

  __shared__ float sm_acc[NWARPS][QPB][D];
  __shared__ float sm_m[NWARPS][QPB], sm_l[NWARPS][QPB];
  if (tok == 0) {
#pragma unroll
    for (int g = 0; g < QPB; ++g) {
#pragma unroll
      for (int j = 0; j < VPL; ++j) {
        const int vi = j * TPT + sub;
        if (vi < NV)
#pragma unroll
          for (int e = 0; e < VEC; ++e) sm_acc[warp][g][vi * VEC + e] = acc[g][j][e];
      }
      if (lane == 0) {
        sm_m[warp][g] = m[g];
        sm_l[warp][g] = l[g];
      }
    }
  }
  __syncthreads();

  // Merge the warps; a warp that saw no token has m = -inf and weight 0.
  for (int idx = threadIdx.x; idx < nh * D; idx += NWARPS * 32) {
    const int g = idx / D, d = idx % D;
    float M = neg_inf();
#pragma unroll
    for (int w = 0; w < NWARPS; ++w) M = fmaxf(M, sm_m[w][g]);
    float L = 0.f, A = 0.f;
#pragma unroll
    for (int w = 0; w < NWARPS; ++w) {
      const float wt = sm_m[w][g] == neg_inf() ? 0.f : exp2f(sm_m[w][g] - M);
      L += wt * sm_l[w][g];
      A += wt * sm_acc[w][g][d];
    }
    store_head_result<DT>(out, part_out, part_ml, (i64)seq * num_heads + head0 + g, d, D,
                          nparts, part, M, L, A);
  }
  if (nparts > 1)
    split_kv_finish<DT>(out, part_out, part_ml, counter, (i64)seq * num_heads + head0, nh, D,
                        nparts, nused);
}

}  // namespace ps

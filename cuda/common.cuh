// Shared device helpers for the paged-attention and cache kernels.
//
// Every .cuh in cuda/ is compiled by two loaders: nvcc (through CMake, into
// pagedserve._cuda) and NVRTC at run time (through CuPy). NVRTC has no host
// headers and no guaranteed search path, so these files include nothing: the
// 16-bit float types are handled as raw bits with our own conversions instead
// of cuda_fp16.h / cuda_bf16.h.
#pragma once

namespace ps {

// dtype codes shared with the Python wrapper (pagedserve/ops/_cuda_ops.py).
enum DType { DT_F32 = 0, DT_F16 = 1, DT_BF16 = 2 };

typedef unsigned short u16;
typedef long long i64;

__device__ __forceinline__ float half_to_float(u16 h) {
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
  return f;
}
__device__ __forceinline__ u16 float_to_half(float f) {
  u16 h;
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
  return h;
}
__device__ __forceinline__ float bf16_to_float(u16 b) {
  return __uint_as_float(((unsigned)b) << 16);
}
__device__ __forceinline__ u16 float_to_bf16(float f) {
  unsigned u = __float_as_uint(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;  // keep NaN a NaN
  u += 0x7fffu + ((u >> 16) & 1u);                      // round to nearest even
  return (u16)(u >> 16);
}

// Element type traits: storage type, elements per 16-byte vector, conversions.
template <int DT> struct Elem;
template <> struct Elem<DT_F32> {
  typedef float T;
  enum { VEC = 4 };
  static __device__ __forceinline__ float to_f(T x) { return x; }
  static __device__ __forceinline__ T from_f(float x) { return x; }
  static __device__ __forceinline__ void unpack(const uint4 &v, float *f) {
    f[0] = __uint_as_float(v.x); f[1] = __uint_as_float(v.y);
    f[2] = __uint_as_float(v.z); f[3] = __uint_as_float(v.w);
  }
};
template <> struct Elem<DT_F16> {
  typedef u16 T;
  enum { VEC = 8 };
  static __device__ __forceinline__ float to_f(T x) { return half_to_float(x); }
  static __device__ __forceinline__ T from_f(float x) { return float_to_half(x); }
  static __device__ __forceinline__ void unpack(const uint4 &v, float *f) {
    const unsigned w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      f[2 * i] = half_to_float((u16)(w[i] & 0xffffu));
      f[2 * i + 1] = half_to_float((u16)(w[i] >> 16));
    }
  }
};
template <> struct Elem<DT_BF16> {
  typedef u16 T;
  enum { VEC = 8 };
  static __device__ __forceinline__ float to_f(T x) { return bf16_to_float(x); }
  static __device__ __forceinline__ T from_f(float x) { return float_to_bf16(x); }
  static __device__ __forceinline__ void unpack(const uint4 &v, float *f) {
    const unsigned w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      f[2 * i] = __uint_as_float(w[i] << 16);
      f[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    }
  }
};

// 16-byte read-only load that does not keep the line in L1: KV bytes are read
// once per kernel, so caching them would only evict the block tables.
__device__ __forceinline__ uint4 ld_stream(const void *p) {
  uint4 v;
  asm("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

__device__ __forceinline__ float warp_max_xor(float v, int from, int to) {
  for (int o = from; o < to; o <<= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

constexpr int pow2_ceil(int x) { return x <= 1 ? 1 : 2 * pow2_ceil((x + 1) / 2); }
constexpr int cmin(int a, int b) { return a < b ? a : b; }

constexpr float LOG2E = 1.4426950408889634f;
__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000); }

// L2-only loads (skip L1) of partial results written by other CTAs of the
// same launch: L1 is not coherent across SMs.
__device__ __forceinline__ float2 ld_cg_f2(const float *p) {
  float2 v;
  asm volatile("ld.global.cg.v2.f32 {%0,%1}, [%2];" : "=f"(v.x), "=f"(v.y) : "l"(p));
  return v;
}
__device__ __forceinline__ float4 ld_cg_f4(const float *p) {
  float4 v;
  asm volatile("ld.global.cg.v4.f32 {%0,%1,%2,%3}, [%4];"
               : "=f"(v.x), "=f"(v.y), "=f"(v.z), "=f"(v.w)
               : "l"(p));
  return v;
}

// Stores element d of one query head's merged result (running max M, sum L, weighted
// value A), shared by both decode kernels: the output itself when the context was not
// split, else this partition's normalised partial and its (max, sum) for
// split_kv_finish. An empty context yields zeros.
template <int DT>
__device__ __forceinline__ void store_head_result(typename Elem<DT>::T *out, float *part_out,
                                                  float *part_ml, i64 row, int d, int D,
                                                  int nparts, int part, float M, float L,
                                                  float A) {
  if (nparts == 1) {
    out[row * D + d] = Elem<DT>::from_f(L > 0.f ? A / L : 0.f);
    return;
  }
  const i64 slot = row * nparts + part;
  part_out[slot * D + d] = A / L;
  if (d == 0) {
    part_ml[slot * 2] = M;
    part_ml[slot * 2 + 1] = L;
  }
}

// Split-KV epilogue shared by both decode kernels. Every CTA of a
// partitioned launch calls it once its normalised partial output and (max, sum)
// are stored (a CTA whose partition holds no tokens calls it at once). The CTAs
// of one (sequence, head group) count themselves on `counter`; the last to
// arrive merges the partitions into `out`, so no second launch is needed. The
// counter is back at 0 when the launch ends (the last CTA resets it), so the
// caller keeps one zeroed buffer and never clears it again.
// Layouts: part_out [S, H, P, D], part_ml [S, H, P, 2]; rows row0 .. row0+nh-1.
template <int DT>
__device__ __noinline__ void split_kv_finish(typename Elem<DT>::T *out, const float *part_out,
                                             const float *part_ml, unsigned *counter, i64 row0,
                                             int nh, int D, int nparts, int nused) {
  __shared__ int is_last;
  // The barrier orders the CTA's partial stores before thread 0's fence, which
  // makes them visible device-wide before the CTA counts itself (the pattern of
  // cooperative groups' grid sync).
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence();
    const bool last = atomicAdd(counter, 1u) == (unsigned)nparts - 1;
    if (last) {
      atomicExch(counter, 0u);  // every CTA of the group has arrived
      __threadfence();          // and every partial is visible to this CTA
    }
    is_last = last;
  }
  __syncthreads();
  if (!is_last) return;
  // One thread per 4 consecutive output elements; partitions in batches of 16 so
  // 32 loads are in flight before the online merge math.
  enum { B = 16 };
  const int vecs = D / 4;
  for (int i = threadIdx.x; i < nh * vecs; i += blockDim.x) {
    const int g = i / vecs, c = i - g * vecs;
    const i64 row = row0 + g;
    const float *ml = part_ml + row * nparts * 2;
    const float *po = part_out + row * nparts * D + c * 4;
    float M = neg_inf(), L = 0.f, a[4] = {0.f, 0.f, 0.f, 0.f};
    for (int p0 = 0; p0 < nused; p0 += B) {
      float2 w[B];
      float4 o[B];
#pragma unroll
      for (int k = 0; k < B; ++k)
        if (p0 + k < nused) {
          w[k] = ld_cg_f2(ml + 2 * (p0 + k));
          o[k] = ld_cg_f4(po + (i64)(p0 + k) * D);
        }
#pragma unroll
      for (int k = 0; k < B; ++k)
        if (p0 + k < nused) {
          const float nM = fmaxf(M, w[k].x);
          const float sc = exp2f(M - nM), wt = exp2f(w[k].x - nM) * w[k].y;
          L = L * sc + wt;
          a[0] = a[0] * sc + wt * o[k].x;
          a[1] = a[1] * sc + wt * o[k].y;
          a[2] = a[2] * sc + wt * o[k].z;
          a[3] = a[3] * sc + wt * o[k].w;
          M = nM;
        }
    }
    const float inv = L > 0.f ? 1.f / L : 0.f;  // an empty context yields zeros
#pragma unroll
    for (int e = 0; e < 4; ++e) out[row * D + c * 4 + e] = Elem<DT>::from_f(a[e] * inv);
  }
}

// The (sequence, tile) of CTA `cta` in a varlen prefill launch whose tiles of
// `rows` (token, query head) rows are laid out sequence after sequence, with
// `group` query heads per token; seq is -1 past the last tile (the grid is an
// upper bound, found without a host sync). n: the sequence's new tokens.
struct PrefillTile {
  int seq, tile, tiles, n;
};
__device__ __forceinline__ PrefillTile find_prefill_tile(int cta, const int *query_start_loc, int num_seqs,
                                                         int group, int rows) {
  for (int s = 0; s < num_seqs; ++s) {
    const int n = query_start_loc[s + 1] - query_start_loc[s];
    const int nt = (n * group + rows - 1) / rows;
    if (cta < nt) return PrefillTile{s, cta, nt, n};
    cta -= nt;
  }
  return PrefillTile{-1, 0, 0, 0};
}

}  // namespace ps

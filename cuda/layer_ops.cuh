// Element-wise work of a decoder layer, fused: each kernel reads its inputs
// once and writes its result once, where torch runs two to six kernels with a
// rounded intermediate tensor between them. They matter twice: a prompt step
// of 8192 tokens moves ~1 GB per layer through these ops, and a small decode
// step is bound by the number of launches.
//
// All math is in float32 and rounds once on the store (torch's unfused form
// rounds after every op, so results differ from it by at most an ulp or two
// of the 16-bit type). Rows are whole 16-byte vectors (head and hidden sizes
// of every supported model are multiples of 8 elements); the Python wrapper
// checks alignment before launching.
#pragma once
#include "common.cuh"

namespace ps {

// Loads / stores VEC elements (one 16-byte vector) as floats.
template <int DT>
__device__ __forceinline__ void load_vec(const typename Elem<DT>::T *p, float *f) {
  Elem<DT>::unpack(*reinterpret_cast<const uint4 *>(p), f);
}
template <int DT>
__device__ __forceinline__ void store_vec(typename Elem<DT>::T *p, const float *f) {
  union {
    uint4 u;
    typename Elem<DT>::T e[Elem<DT>::VEC];
  } v;
#pragma unroll
  for (int i = 0; i < Elem<DT>::VEC; ++i) v.e[i] = Elem<DT>::from_f(f[i]);
  *reinterpret_cast<uint4 *>(p) = v.u;
}

// out[t, i] = silu(x[t, i]) * x[t, inter + i]: the gate and up halves of the
// fused gate_up projection, one token per grid row. grid (tokens, chunks).
template <int DT>
__global__ void silu_and_mul_kernel(typename Elem<DT>::T *__restrict__ out,
                                    const typename Elem<DT>::T *__restrict__ x, int inter) {
  enum { VEC = Elem<DT>::VEC };
  const i64 t = blockIdx.x;
  const auto *gate = x + t * 2 * inter;
  const auto *up = gate + inter;
  auto *o = out + t * inter;
  for (int i = (blockIdx.y * blockDim.x + threadIdx.x) * VEC; i < inter; i += gridDim.y * blockDim.x * VEC) {
    float g[VEC], u[VEC], r[VEC];
    load_vec<DT>(gate + i, g);
    load_vec<DT>(up + i, u);
#pragma unroll
    for (int k = 0; k < VEC; ++k) r[k] = g[k] / (1.f + expf(-g[k])) * u[k];
    store_vec<DT>(o + i, r);
  }
}

// residual[t] += x[t] (rounded to the storage type, as an unfused add would
// store it), then out[t] = residual[t] / rms(residual[t]) * weight. One CTA per
// token; the row is read twice from global memory (the second read hits L1/L2).
template <int DT>
__global__ void fused_add_rms_norm_kernel(typename Elem<DT>::T *__restrict__ out,
                                          typename Elem<DT>::T *__restrict__ residual,
                                          const typename Elem<DT>::T *__restrict__ x,
                                          const typename Elem<DT>::T *__restrict__ weight,
                                          int hidden, float eps) {
  enum { VEC = Elem<DT>::VEC };
  typedef typename Elem<DT>::T T;
  const i64 t = blockIdx.x;
  T *res = residual + t * hidden;
  const T *in = x + t * hidden;
  T *dst = out + t * hidden;
  float sum = 0.f;
  for (int i = threadIdx.x * VEC; i < hidden; i += blockDim.x * VEC) {
    float a[VEC], b[VEC];
    load_vec<DT>(res + i, a);
    load_vec<DT>(in + i, b);
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      a[k] = Elem<DT>::to_f(Elem<DT>::from_f(a[k] + b[k]));  // the stored (rounded) sum
      sum += a[k] * a[k];
    }
    store_vec<DT>(res + i, a);
  }
  // Block reduction of the sum of squares: warps, then one warp over warp sums.
  __shared__ float warp_sums[32];
  __shared__ float inv_rms;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
  if ((threadIdx.x & 31) == 0) warp_sums[threadIdx.x >> 5] = sum;
  __syncthreads();
  if (threadIdx.x < 32) {
    float s = threadIdx.x < (blockDim.x >> 5) ? warp_sums[threadIdx.x] : 0.f;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    if (threadIdx.x == 0) inv_rms = rsqrtf(s / hidden + eps);
  }
  __syncthreads();
  const float r = inv_rms;
  for (int i = threadIdx.x * VEC; i < hidden; i += blockDim.x * VEC) {
    float a[VEC], w[VEC];
    load_vec<DT>(res + i, a);
    load_vec<DT>(weight + i, w);
#pragma unroll
    for (int k = 0; k < VEC; ++k) a[k] = a[k] * r * w[k];
    store_vec<DT>(dst + i, a);
  }
}

// Rotate-half RoPE in place on the query and key heads of each token (the
// first `num_heads` heads of a row of `row_stride` elements: the fused QKV
// output, whose V part is left alone). cos/sin are float32 tables
// [max_positions, head_size] with the rotate-half sign folded into sin
// (-sin on the first half), so element i becomes
//     x[i] * cos[i] + x[(i + half) % D] * sin[i].
// One thread rotates VEC pairs (i, i + half); grid (tokens).
template <int DT>
__global__ void rotary_kernel(typename Elem<DT>::T *__restrict__ x, i64 row_stride,
                              const i64 *__restrict__ positions, const float *__restrict__ cos_table,
                              const float *__restrict__ sin_table, int num_heads, int head_size) {
  enum { VEC = Elem<DT>::VEC };
  const i64 t = blockIdx.x;
  const int half = head_size >> 1, vecs = half / VEC;
  const float *cs = cos_table + positions[t] * head_size;
  const float *sn = sin_table + positions[t] * head_size;
  for (int item = threadIdx.x; item < num_heads * vecs; item += blockDim.x) {
    const int h = item / vecs, i = (item % vecs) * VEC;
    auto *lo = x + t * row_stride + (i64)h * head_size + i;
    auto *hi = lo + half;
    float a[VEC], b[VEC], ra[VEC], rb[VEC];
    load_vec<DT>(lo, a);
    load_vec<DT>(hi, b);
#pragma unroll
    for (int k = 0; k < VEC; ++k) {
      ra[k] = a[k] * cs[i + k] + b[k] * sn[i + k];
      rb[k] = b[k] * cs[half + i + k] + a[k] * sn[half + i + k];
    }
    store_vec<DT>(lo, ra);
    store_vec<DT>(hi, rb);
  }
}

}  // namespace ps

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

}  // namespace ps

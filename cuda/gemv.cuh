// Matrix-vector products of small-batch decode: out[m, n] = sum_k x[m, k] * w[n, k]
// for M <= 8 rows of x against a weight w [N, K] (torch's Linear layout).
//
// With one to a few tokens in a step, a projection reads its whole weight to do
// 2 * M FLOPs per weight element: it is bound by memory, and its floor is the
// weight's bytes over the HBM read rate. GEMM libraries tile for reuse that is
// not there at M = 1; this kernel only streams: each warp owns ROWS consecutive
// weight rows, every lane keeps ROWS x UNROLL 16-byte loads in flight (KV-style
// streaming loads that skip L1), and x (a few KiB, the same for every warp) is
// read through L1. Products accumulate in float32 per lane and are summed across
// the warp by shuffles; the result is rounded once.
//
// ROWS is 4 for wide weights (more bytes in flight per warp, x reused 4 times)
// and 1 for narrow ones (4096 rows): with 4, such a weight is only ~2 CTAs per
// SM and the SMs that get one CTA more finish last; with 1 the work splits
// into ~8 CTAs per SM. The Python wrapper picks.
//
// Rows are whole 16-byte vectors (K a multiple of 8 for 16-bit types, 4 for
// float32), checked by the Python wrapper. Rows of the last warp past N read the
// last row again and store nothing.
#pragma once
#include "common.cuh"

namespace ps {

struct GemvShape {
  enum { THREADS = 128, WARPS = THREADS / 32, UNROLL = 4, MAX_M = 8 };
};

template <int DT, int M, int ROWS>
__global__ void __launch_bounds__(GemvShape::THREADS)
    gemv_kernel(typename Elem<DT>::T *__restrict__ out, const typename Elem<DT>::T *__restrict__ x,
                const typename Elem<DT>::T *__restrict__ w, int n, int k) {
  enum { VEC = Elem<DT>::VEC, U = GemvShape::UNROLL };
  const int lane = threadIdx.x & 31;
  const i64 row0 = ((i64)blockIdx.x * GemvShape::WARPS + (threadIdx.x >> 5)) * ROWS;
  if (row0 >= n) return;
  const int kv = k / VEC;  // 16-byte vectors per row
  const uint4 *wrow[ROWS];
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
    const i64 row = row0 + r < n ? row0 + r : n - 1;
    wrow[r] = reinterpret_cast<const uint4 *>(w + row * k);
  }
  const uint4 *xv = reinterpret_cast<const uint4 *>(x);
  float acc[ROWS][M];
#pragma unroll
  for (int r = 0; r < ROWS; ++r)
#pragma unroll
    for (int m = 0; m < M; ++m) acc[r][m] = 0.f;

  for (int base = lane; base < kv; base += 32 * U) {
    uint4 wv[U][ROWS];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int v = base + u * 32;
#pragma unroll
      for (int r = 0; r < ROWS; ++r) wv[u][r] = v < kv ? ld_stream(wrow[r] + v) : make_uint4(0, 0, 0, 0);
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int v = base + u * 32;
      if (v >= kv) break;
#pragma unroll
      for (int m = 0; m < M; ++m) {
        float xf[VEC];
        Elem<DT>::unpack(__ldg(xv + (i64)m * kv + v), xf);
#pragma unroll
        for (int r = 0; r < ROWS; ++r) {
          float wf[VEC];
          Elem<DT>::unpack(wv[u][r], wf);
#pragma unroll
          for (int e = 0; e < VEC; ++e) acc[r][m] = fmaf(wf[e], xf[e], acc[r][m]);
        }
      }
    }
  }
#pragma unroll
  for (int r = 0; r < ROWS; ++r)
#pragma unroll
    for (int m = 0; m < M; ++m)
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) acc[r][m] += __shfl_xor_sync(0xffffffffu, acc[r][m], o);
  // Every lane holds every sum; lane r * M + m stores (row r, token m).
#pragma unroll
  for (int r = 0; r < ROWS; ++r)
#pragma unroll
    for (int m = 0; m < M; ++m)
      if (lane == r * M + m && row0 + r < n) out[(i64)m * n + row0 + r] = Elem<DT>::from_f(acc[r][m]);
}

}  // namespace ps

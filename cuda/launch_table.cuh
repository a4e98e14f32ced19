// The launch table: for every kernel instance a loader launches, its threads per CTA,
// the work rows one CTA covers and its dynamic shared memory, read off the kernels'
// own shape structs. It is the one place the host learns these numbers: the compiled
// module returns it (pagedserve._cuda.launch_table) and the NVRTC loader, which has
// no host compiler, reads it back from launch_table_kernel. ops/launch_table.py turns
// it into grids and shared-memory sizes for both loaders, which launch what they are
// given.
#pragma once
#include "decode.cuh"
#include "decode_tc.cuh"
#include "gemv.cuh"
#include "prefill.cuh"
#include "prefill_tc.cuh"

namespace ps {

// Kernel codes of a table row (KERNEL_CODES in ops/launch_table.py).
enum LaunchKernel { LK_DECODE = 0, LK_DECODE_TC = 1, LK_PREFILL = 2, LK_PREFILL_TC = 3, LK_GEMV = 4 };

// One kernel instance. size: the head size (gemv: the rows of x); variant: query heads
// per CTA (decode), pipeline stages (decode_tc), weight rows per warp (gemv), else 0;
// rows: query heads (decode), (token, query head) rows (prefill) or weight rows (gemv)
// per CTA.
struct LaunchRow {
  int kernel, size, variant, threads, rows, smem_bytes;
};
enum { LAUNCH_ROW_INTS = 6, LAUNCH_TABLE_MAX = 128 };

// Appends rows; with a null `out` it only counts them.
struct LaunchTableWriter {
  LaunchRow *out;
  int n;
  __host__ __device__ void add(int kernel, int size, int variant, int threads, int rows, int smem) {
    if (out != nullptr) out[n] = LaunchRow{kernel, size, variant, threads, rows, smem};
    ++n;
  }
};

template <int D, int QPB>
__host__ __device__ void add_decode_row(LaunchTableWriter &w) {
  typedef DecodeShape<DT_F16, D, QPB> S;  // threads do not depend on the dtype
  w.add(LK_DECODE, D, QPB, S::NWARPS * 32, QPB, 0);
}

template <int D, int ST>
__host__ __device__ void add_decode_tc_row(LaunchTableWriter &w) {
  typedef TcShape<D, ST> S;
  w.add(LK_DECODE_TC, D, ST, S::NWARPS * 32, S::HEADS, S::SMEM_BYTES);
}

template <int D>
__host__ __device__ void add_head_size_rows(LaunchTableWriter &w) {
  add_decode_row<D, 1>(w);
  add_decode_row<D, 2>(w);
  add_decode_row<D, 4>(w);
  add_decode_row<D, 8>(w);
  add_decode_tc_row<D, 2>(w);
  if constexpr (TcMaxStages<D>::VALUE >= 3) add_decode_tc_row<D, 3>(w);
  w.add(LK_PREFILL, D, 0, PrefillShape::NWARPS * 32, PrefillShape::ROWS, prefill_smem_bytes(D));
  typedef PrefillTcShape<D> P;
  w.add(LK_PREFILL_TC, D, 0, P::NWARPS * 32, P::ROWS, P::SMEM_BYTES);
}

// Every row, in a fixed order; returns the count.
__host__ __device__ inline int fill_launch_table(LaunchRow *out) {
  LaunchTableWriter w{out, 0};
  add_head_size_rows<64>(w);
  add_head_size_rows<80>(w);
  add_head_size_rows<96>(w);
  add_head_size_rows<128>(w);
  add_head_size_rows<256>(w);
  for (int m = 1; m <= GemvShape::MAX_M; ++m)
    for (int rpw = 1; rpw <= 4; rpw *= 4) w.add(LK_GEMV, m, rpw, GemvShape::THREADS, GemvShape::WARPS * rpw, 0);
  return w.n;
}

#ifdef __CUDACC_RTC__
// For the NVRTC loader (the compiled module calls fill_launch_table on the host):
// out holds LAUNCH_TABLE_MAX rows, count gets the number written.
__global__ void launch_table_kernel(LaunchRow *out, int *count) {
  if (blockIdx.x == 0 && threadIdx.x == 0) *count = fill_launch_table(out);
}
#endif

}  // namespace ps

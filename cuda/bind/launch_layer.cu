// Launchers of the fused layer kernels (cuda/layer_ops.cuh). The launch shape
// (threads per CTA, CTAs per token) comes from the Python wrapper, which gives
// the NVRTC loader the same one.
#include "../gemv.cuh"
#include "../layer_ops.cuh"
#include "launch_util.cuh"

namespace pscuda {

namespace {
template <typename F>
void with_dtype(int dtype, F &&f) {
  switch (dtype) {
    case ps::DT_F32: f(std::integral_constant<int, ps::DT_F32>()); break;
    case ps::DT_F16: f(std::integral_constant<int, ps::DT_F16>()); break;
    case ps::DT_BF16: f(std::integral_constant<int, ps::DT_BF16>()); break;
    default: unsupported("dtype code", dtype);
  }
}
}  // namespace

void silu_and_mul(int dtype, ptr out, ptr x, int num_tokens, int inter, int threads, int chunks,
                  ptr stream) {
  if (num_tokens == 0) return;
  with_dtype(dtype, [&](auto dc) {
    constexpr int DT = decltype(dc)::value;
    using T = typename ps::Elem<DT>::T;
    ps::silu_and_mul_kernel<DT><<<dim3(num_tokens, chunks), threads, 0, reinterpret_cast<cudaStream_t>(stream)>>>(
        reinterpret_cast<T *>(out), reinterpret_cast<const T *>(x), inter);
  });
  check_launch("silu_and_mul_kernel");
}

void fused_add_rms_norm(int dtype, ptr out, ptr residual, ptr x, ptr weight, int num_tokens,
                        int hidden, float eps, int threads, ptr stream) {
  if (num_tokens == 0) return;
  with_dtype(dtype, [&](auto dc) {
    constexpr int DT = decltype(dc)::value;
    using T = typename ps::Elem<DT>::T;
    ps::fused_add_rms_norm_kernel<DT><<<num_tokens, threads, 0, reinterpret_cast<cudaStream_t>(stream)>>>(
        reinterpret_cast<T *>(out), reinterpret_cast<T *>(residual), reinterpret_cast<const T *>(x),
        reinterpret_cast<const T *>(weight), hidden, eps);
  });
  check_launch("fused_add_rms_norm_kernel");
}

void rotary(int dtype, ptr x, std::int64_t row_stride, ptr positions, ptr cos_table, ptr sin_table,
            int num_tokens, int num_heads, int head_size, int threads, ptr stream) {
  if (num_tokens == 0) return;
  with_dtype(dtype, [&](auto dc) {
    constexpr int DT = decltype(dc)::value;
    using T = typename ps::Elem<DT>::T;
    ps::rotary_kernel<DT><<<num_tokens, threads, 0, reinterpret_cast<cudaStream_t>(stream)>>>(
        reinterpret_cast<T *>(x), row_stride, reinterpret_cast<const long long *>(positions),
        reinterpret_cast<const float *>(cos_table), reinterpret_cast<const float *>(sin_table),
        num_heads, head_size);
  });
  check_launch("rotary_kernel");
}

void gemv(int dtype, ptr out, ptr x, ptr w, int m, int n, int k, int rows_per_warp, int grid_x,
          ptr stream) {
  if (m == 0 || n == 0) return;
  if (m < 0 || m > ps::GemvShape::MAX_M) unsupported("gemv rows (1 to 8)", m);
  if (rows_per_warp != 1 && rows_per_warp != 4) unsupported("gemv rows_per_warp (1 or 4)", rows_per_warp);
  const dim3 grid(grid_x);
  auto st = reinterpret_cast<cudaStream_t>(stream);
  with_dtype(dtype, [&](auto dc) {
    constexpr int DT = decltype(dc)::value;
    using T = typename ps::Elem<DT>::T;
    auto launch = [&](auto mc) {
      constexpr int M = decltype(mc)::value;
      auto kernel = rows_per_warp == 4 ? ps::gemv_kernel<DT, M, 4> : ps::gemv_kernel<DT, M, 1>;
      kernel<<<grid, ps::GemvShape::THREADS, 0, st>>>(reinterpret_cast<T *>(out), reinterpret_cast<const T *>(x),
                                                      reinterpret_cast<const T *>(w), n, k);
    };
    switch (m) {
      case 1: launch(std::integral_constant<int, 1>()); break;
      case 2: launch(std::integral_constant<int, 2>()); break;
      case 3: launch(std::integral_constant<int, 3>()); break;
      case 4: launch(std::integral_constant<int, 4>()); break;
      case 5: launch(std::integral_constant<int, 5>()); break;
      case 6: launch(std::integral_constant<int, 6>()); break;
      case 7: launch(std::integral_constant<int, 7>()); break;
      default: launch(std::integral_constant<int, 8>()); break;
    }
  });
  check_launch("gemv_kernel");
}

}  // namespace pscuda

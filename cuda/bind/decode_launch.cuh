// Decode launcher for one dtype; decode_<dtype>.cu instantiate it so the three
// dtypes compile in parallel.
#pragma once
#include <type_traits>

#include "../decode.cuh"
#include "../decode_tc.cuh"
#include "launch_util.cuh"

namespace pscuda {

template <int DT>
void decode_dtype(const DecodeArgs &a) {
  if (a.grid_z > 1 && a.split_counters == 0) unsupported("split_counters 0 with partitions", a.grid_z);
  using T = typename ps::Elem<DT>::T;
  const int bs_log2 = log2_exact(a.block_size, "block_size");
  const dim3 grid(a.grid_x, a.grid_y, a.grid_z);
  auto stream = reinterpret_cast<cudaStream_t>(a.stream);
  with_head_size(a.head_size, [&](auto dc) {
    constexpr int D = decltype(dc)::value;
    auto go = [&](auto qc) {
      constexpr int QPB = decltype(qc)::value;
      ps::paged_decode_kernel<DT, D, QPB><<<grid, 128, 0, stream>>>(
          reinterpret_cast<T *>(a.out), reinterpret_cast<float *>(a.part_out),
          reinterpret_cast<float *>(a.part_ml), reinterpret_cast<const T *>(a.q), a.q_stride,
          reinterpret_cast<const T *>(a.key_cache), reinterpret_cast<const T *>(a.value_cache),
          reinterpret_cast<const int *>(a.block_tables), a.bt_stride,
          reinterpret_cast<const int *>(a.context_lens), reinterpret_cast<unsigned *>(a.split_counters),
          a.num_heads, a.num_kv_heads, bs_log2, a.scale, a.part_tokens);
    };
    if (a.qpb == 16) {  // tensor-core kernel (fp16/bf16): up to 16 query heads per CTA
      if constexpr (DT == ps::DT_F32) {
        unsupported("qpb 16 (tensor cores) with dtype code", DT);
      } else {
        auto tc = [&](auto sc) {
          constexpr int ST = decltype(sc)::value;
          constexpr int smem = ps::TcShape<D, ST>::SMEM_BYTES;
          auto kernel = ps::paged_decode_tc_kernel<DT, D, ST>;
          if (smem > 48 * 1024) {
            const cudaError_t err =
                cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
            if (err != cudaSuccess)
              throw std::runtime_error(std::string("decode smem: ") + cudaGetErrorString(err));
          }
          kernel<<<grid, 128, smem, stream>>>(
              reinterpret_cast<T *>(a.out), reinterpret_cast<float *>(a.part_out),
              reinterpret_cast<float *>(a.part_ml), reinterpret_cast<const T *>(a.q), a.q_stride,
              reinterpret_cast<const T *>(a.key_cache), reinterpret_cast<const T *>(a.value_cache),
              reinterpret_cast<const int *>(a.block_tables), a.bt_stride,
              reinterpret_cast<const int *>(a.context_lens),
              reinterpret_cast<unsigned *>(a.split_counters), a.num_heads, a.num_kv_heads,
              bs_log2, a.scale, a.part_tokens);
        };
        if (a.stages == 2) return tc(std::integral_constant<int, 2>());
        if constexpr (ps::TcMaxStages<D>::VALUE >= 3) {
          if (a.stages == 3) return tc(std::integral_constant<int, 3>());
        }
        unsupported("stages (2, or 3 below head size 256)", a.stages);
      }
      return;
    }
    switch (a.qpb) {
      case 1: go(std::integral_constant<int, 1>()); break;
      case 2: go(std::integral_constant<int, 2>()); break;
      case 4: go(std::integral_constant<int, 4>()); break;
      case 8: go(std::integral_constant<int, 8>()); break;
      default: unsupported("qpb", a.qpb);
    }
  });
  check_launch("paged_decode_kernel");  // split-KV partials are merged inside the launch
}

}  // namespace pscuda

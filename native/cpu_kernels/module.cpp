// pagedserve._cpu_kernels: the CPU kernels, for pagedserve.ops. Tensors arrive as data
// pointers with their sizes (this module does not link torch); ops/cpu_kernels.py
// checks dtypes, devices and layouts before every call, and the kernels check every
// index they will follow.
#include <pybind11/pybind11.h>

#include <cstdint>

#include "paged_attention.h"

namespace py = pybind11;
using pagedserve::cpu::DecodeArgs;
using pagedserve::cpu::DType;

namespace {

DType to_dtype(int code) {
  if (code == 0) return DType::kFloat32;
  if (code == 1) return DType::kBFloat16;
  throw std::invalid_argument("dtype code must be 0 (float32) or 1 (bfloat16)");
}

template <typename T>
T* ptr(uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

}  // namespace

PYBIND11_MODULE(_cpu_kernels, m) {
  m.doc() = "pagedserve's CPU kernels (called through pagedserve.ops)";
  m.def(
      "paged_decode_attention",
      [](uintptr_t out, int64_t out_stride, uintptr_t query, int64_t query_stride, int io_dtype,
         uintptr_t key_cache, uintptr_t value_cache, int cache_dtype, uintptr_t block_tables,
         int64_t block_table_stride, uintptr_t context_lens, int num_seqs, int num_heads,
         int num_kv_heads, int head_size, int block_size, int64_t num_blocks, float scale,
         int window, int num_threads) {
        DecodeArgs a;
        a.out = ptr<void>(out);
        a.out_stride = out_stride;
        a.query = ptr<const void>(query);
        a.query_stride = query_stride;
        a.io_dtype = to_dtype(io_dtype);
        a.key_cache = ptr<const void>(key_cache);
        a.value_cache = ptr<const void>(value_cache);
        a.cache_dtype = to_dtype(cache_dtype);
        a.block_tables = ptr<const int32_t>(block_tables);
        a.block_table_stride = block_table_stride;
        a.context_lens = ptr<const int32_t>(context_lens);
        a.num_seqs = num_seqs;
        a.num_heads = num_heads;
        a.num_kv_heads = num_kv_heads;
        a.head_size = head_size;
        a.block_size = block_size;
        a.num_blocks = num_blocks;
        a.scale = scale;
        a.window = window;
        a.num_threads = num_threads;
        py::gil_scoped_release release;
        pagedserve::cpu::paged_decode_attention(a);
      },
      py::arg("out"), py::arg("out_stride"), py::arg("query"), py::arg("query_stride"),
      py::arg("io_dtype"), py::arg("key_cache"), py::arg("value_cache"), py::arg("cache_dtype"),
      py::arg("block_tables"), py::arg("block_table_stride"), py::arg("context_lens"),
      py::arg("num_seqs"), py::arg("num_heads"), py::arg("num_kv_heads"), py::arg("head_size"),
      py::arg("block_size"), py::arg("num_blocks"), py::arg("scale"), py::arg("window"),
      py::arg("num_threads"));
}

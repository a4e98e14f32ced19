// pagedserve._cuda: registers the kernel launchers. Arguments are plain
// integers (device pointers, strides, shapes, dtype codes, the stream handle);
// pagedserve/ops/_cuda_ops.py and _cuda_layer_ops.py build them from torch tensors.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "launch.h"

namespace py = pybind11;
using namespace pscuda;

PYBIND11_MODULE(_cuda, m) {
  m.doc() = "Paged-attention and KV-cache CUDA kernels (raw-pointer launchers)";

  m.def("launch_table", &launch_table,
        "Rows (kernel, size, variant, threads, rows per CTA, dynamic smem bytes) of every "
        "kernel instance (cuda/launch_table.cuh).");

  m.def("decode",
        [](int dtype, int head_size, int qpb, int stages, ptr out, ptr part_out, ptr part_ml, ptr q,
           std::int64_t q_stride, ptr key_cache, ptr value_cache, ptr block_tables, int bt_stride,
           ptr context_lens, ptr split_counters, int num_heads, int num_kv_heads, int block_size,
           float scale, int part_tokens, int grid_x, int grid_y, int grid_z, ptr stream) {
          decode(DecodeArgs{dtype, head_size, qpb, stages, out, part_out, part_ml, q, q_stride,
                            key_cache, value_cache, block_tables, bt_stride, context_lens,
                            split_counters, num_heads, num_kv_heads, block_size, scale,
                            part_tokens, grid_x, grid_y, grid_z, stream});
        },
        py::arg("dtype"), py::arg("head_size"), py::arg("qpb"), py::arg("stages"), py::arg("out"),
        py::arg("part_out"), py::arg("part_ml"), py::arg("q"), py::arg("q_stride"), py::arg("key_cache"),
        py::arg("value_cache"), py::arg("block_tables"), py::arg("bt_stride"),
        py::arg("context_lens"), py::arg("split_counters"), py::arg("num_heads"),
        py::arg("num_kv_heads"), py::arg("block_size"), py::arg("scale"), py::arg("part_tokens"),
        py::arg("grid_x"), py::arg("grid_y"), py::arg("grid_z"), py::arg("stream"),
        "Decode paged attention (split-KV when grid_z > 1, merged in the same launch).");

  m.def("prefill",
        [](int dtype, int head_size, ptr out, ptr q, std::int64_t q_stride, ptr key_cache,
           ptr value_cache, ptr block_tables, int bt_stride, ptr query_start_loc, ptr context_lens,
           int num_seqs, int num_heads, int num_kv_heads, int block_size, float scale,
           bool tensor_cores, int grid_x, int grid_y, ptr stream) {
          prefill(PrefillArgs{dtype, head_size, out, q, q_stride, key_cache, value_cache,
                              block_tables, bt_stride, query_start_loc, context_lens, num_seqs,
                              num_heads, num_kv_heads, block_size, scale, tensor_cores ? 1 : 0,
                              grid_x, grid_y, stream});
        },
        py::arg("dtype"), py::arg("head_size"), py::arg("out"), py::arg("q"), py::arg("q_stride"),
        py::arg("key_cache"), py::arg("value_cache"), py::arg("block_tables"), py::arg("bt_stride"),
        py::arg("query_start_loc"), py::arg("context_lens"), py::arg("num_seqs"),
        py::arg("num_heads"), py::arg("num_kv_heads"), py::arg("block_size"), py::arg("scale"),
        py::arg("tensor_cores"), py::arg("grid_x"), py::arg("grid_y"), py::arg("stream"),
        "Varlen causal prefill over paged KV (tensor_cores: the fp16/bf16 mma kernel).");

  m.def("write_kv", &write_kv, py::arg("key"), py::arg("value"), py::arg("key_cache"),
        py::arg("value_cache"), py::arg("slot_mapping"), py::arg("key_stride"),
        py::arg("value_stride"), py::arg("num_tokens"), py::arg("num_kv_heads"),
        py::arg("row_bytes"), py::arg("block_size"), py::arg("stream"),
        "Scatter K/V rows into their cache slots; negative slots are skipped.");

  m.def("copy_blocks", &copy_blocks, py::arg("src_ptrs"), py::arg("dst_ptrs"), py::arg("mapping"),
        py::arg("num_pairs"), py::arg("num_tensors"), py::arg("block_bytes"), py::arg("stream"),
        "Copy (src, dst) block pairs for every tensor pair in one launch.");

  m.def("copy_blocks_from_host", &copy_blocks_from_host, py::arg("device"), py::arg("src_ptrs"),
        py::arg("dst_ptrs"), py::arg("pairs"), py::arg("num_pairs"), py::arg("num_tensors"),
        py::arg("block_bytes"), py::arg("stream"),
        "copy_blocks from host tables, staged through reused buffers; False while capturing.");

  m.def("memcpy_block_runs", &memcpy_block_runs, py::arg("ptrs"), py::arg("runs"),
        py::arg("num_runs"), py::arg("num_tensors"), py::arg("block_bytes"), py::arg("stream"),
        "cudaMemcpyAsync per (run of blocks, tensor); ptrs and runs are host arrays.");

  m.def("silu_and_mul", &silu_and_mul, py::arg("dtype"), py::arg("out"), py::arg("x"),
        py::arg("num_tokens"), py::arg("inter"), py::arg("threads"), py::arg("chunks"),
        py::arg("stream"), "out = silu(gate) * up over the fused gate_up rows.");

  m.def("fused_add_rms_norm", &fused_add_rms_norm, py::arg("dtype"), py::arg("out"),
        py::arg("residual"), py::arg("x"), py::arg("weight"), py::arg("num_tokens"),
        py::arg("hidden"), py::arg("eps"), py::arg("threads"), py::arg("stream"),
        "residual += x, then out = RMSNorm(residual) * weight.");

  m.def("rotary", &rotary, py::arg("dtype"), py::arg("x"), py::arg("row_stride"),
        py::arg("positions"), py::arg("cos_table"), py::arg("sin_table"), py::arg("num_tokens"),
        py::arg("num_heads"), py::arg("head_size"), py::arg("threads"), py::arg("stream"),
        "Rotate-half RoPE in place on the query and key heads.");

  m.def("gemv", &gemv, py::arg("dtype"), py::arg("out"), py::arg("x"), py::arg("w"), py::arg("m"),
        py::arg("n"), py::arg("k"), py::arg("rows_per_warp"), py::arg("grid_x"), py::arg("stream"),
        "out[m, n] = x[m] . w[n] for up to 8 rows of x (streams w once).");

  m.def("first_unpinned", &first_unpinned, py::arg("ptrs"), py::arg("count"),
        "Index of the first host-array pointer the GPU cannot address, or -1.");
}

// Host launchers of the kernels in cuda/*.cuh, built by nvcc into pagedserve._cuda.
// Pointers travel as integers and the stream as its raw handle, so neither this
// header nor module.cpp depends on PyTorch or on CUDA headers. Launch plans
// (query heads per CTA, partitioning) and grids are computed by the Python wrapper
// from the launch table (launch_table.cuh, returned by launch_table() here), which
// hands the same ones to the NVRTC loader: one table, one policy, two loaders.
#pragma once
#include <array>
#include <cstdint>
#include <vector>

namespace pscuda {

using ptr = std::uintptr_t;

struct DecodeArgs {
  int dtype, head_size, qpb;
  int stages;  // tensor-core pipeline depth (qpb 16): 2, or 3 below head size 256
  ptr out, part_out, part_ml, q;
  std::int64_t q_stride;
  ptr key_cache, value_cache, block_tables;
  int bt_stride;
  ptr context_lens;
  ptr split_counters;  // zeroed uint32 [num_seqs, CTAs per sequence] when grid_z > 1, else 0
  int num_heads, num_kv_heads, block_size;
  float scale;
  int part_tokens;
  int grid_x, grid_y, grid_z;  // (KV heads x head groups, sequences, partitions)
  ptr stream;
};

struct PrefillArgs {
  int dtype, head_size;
  ptr out, q;
  std::int64_t q_stride;
  ptr key_cache, value_cache, block_tables;
  int bt_stride;
  ptr query_start_loc, context_lens;
  int num_seqs, num_heads, num_kv_heads, block_size;
  float scale;
  int tensor_cores;  // 1: paged_prefill_tc_kernel (fp16/bf16, sm_80 and up)
  int grid_x, grid_y;  // (tiles of every sequence, KV heads); grid_x 0: nothing to do
  ptr stream;
};

// The launch table: rows of (kernel, size, variant, threads, rows, smem bytes), see
// launch_table.cuh.
std::vector<std::array<int, 6>> launch_table();

// Each throws std::runtime_error on a bad argument or a failed launch.
void decode(const DecodeArgs &a);
void prefill(const PrefillArgs &a);
void write_kv(ptr key, ptr value, ptr key_cache, ptr value_cache, ptr slot_mapping,
              std::int64_t key_stride, std::int64_t value_stride, int num_tokens,
              int num_kv_heads, int row_bytes, int block_size, ptr stream);
void copy_blocks(ptr src_ptrs, ptr dst_ptrs, ptr mapping, int num_pairs, int num_tensors,
                 std::int64_t block_bytes, ptr stream);
// copy_blocks with its tables given as HOST arrays (num_tensors source pointers,
// num_tensors destination pointers, [num_pairs, 2] block pairs): they go up in one
// copy through buffers of `device` that are reused call after call. Returns false,
// doing nothing, while `stream` captures a CUDA graph (which would keep reading them).
bool copy_blocks_from_host(int device, ptr src_ptrs, ptr dst_ptrs, ptr pairs, int num_pairs,
                           int num_tensors, std::int64_t block_bytes, ptr stream);
// Host side of swap. `ptrs` and `runs` are HOST arrays: num_tensors source
// pointers then num_tensors destination pointers, and [num_runs, 3] int64
// (src block, dst block, block count). One cudaMemcpyAsync per run and tensor
// (copy engines, no SM time, no synchronisation for pinned memory).
void memcpy_block_runs(ptr ptrs, ptr runs, int num_runs, int num_tensors, std::int64_t block_bytes,
                       ptr stream);
// Fused layer ops (cuda/layer_ops.cuh); rows are contiguous, 16-byte aligned.
// out[t] = silu(x[t, :inter]) * x[t, inter:]; grid (num_tokens, chunks).
void silu_and_mul(int dtype, ptr out, ptr x, int num_tokens, int inter, int threads, int chunks,
                  ptr stream);
// residual += x; out = rms_norm(residual) * weight; one CTA of `threads` per token.
void fused_add_rms_norm(int dtype, ptr out, ptr residual, ptr x, ptr weight, int num_tokens,
                        int hidden, float eps, int threads, ptr stream);
// Rotate-half RoPE in place on the first num_heads heads of each row of x.
void rotary(int dtype, ptr x, std::int64_t row_stride, ptr positions, ptr cos_table, ptr sin_table,
            int num_tokens, int num_heads, int head_size, int threads, ptr stream);
// out[m, n] = x[m, :] . w[n, :] for m < M <= 8 (small-batch decode projections);
// x [M, K], w [N, K], out [M, N], all contiguous, K a whole number of 16-byte vectors;
// rows_per_warp 1 or 4 (the wrapper picks by N, see cuda/gemv.cuh); grid_x CTAs.
void gemv(int dtype, ptr out, ptr x, ptr w, int m, int n, int k, int rows_per_warp, int grid_x,
          ptr stream);
// Index of the first of `count` pointers (a HOST int64 array) that the GPU
// cannot address (pageable host memory), or -1 when all can.
int first_unpinned(ptr ptrs, int count);

}  // namespace pscuda

// Host launchers of the kernels in cuda/*.cuh, built by nvcc into pagedserve._cuda.
// Pointers travel as integers and the stream as its raw handle, so neither this
// header nor module.cpp depends on PyTorch or on CUDA headers. Launch plans
// (query heads per CTA, partitioning) are chosen by the Python wrapper, which
// hands the same plan to the NVRTC loader: one policy, two loaders.
#pragma once
#include <cstdint>

namespace pscuda {

using ptr = std::uintptr_t;

struct DecodeArgs {
  int dtype, head_size, qpb;
  ptr out, part_out, part_ml, q;
  std::int64_t q_stride;
  ptr key_cache, value_cache, block_tables;
  int bt_stride;
  ptr context_lens;
  int num_seqs, num_heads, num_kv_heads, block_size;
  float scale;
  int part_tokens, nparts;
  ptr stream;
};

struct PrefillArgs {
  int dtype, head_size;
  ptr out, q;
  std::int64_t q_stride;
  ptr key_cache, value_cache, block_tables;
  int bt_stride;
  ptr query_start_loc, context_lens;
  int num_seqs, num_tokens, num_heads, num_kv_heads, block_size;
  float scale;
  ptr stream;
};

// Each throws std::runtime_error on a bad argument or a failed launch.
void decode(const DecodeArgs &a);
void prefill(const PrefillArgs &a);
void write_kv(ptr key, ptr value, ptr key_cache, ptr value_cache, ptr slot_mapping,
              std::int64_t key_stride, std::int64_t value_stride, int num_tokens,
              int num_kv_heads, int row_bytes, int block_size, ptr stream);
void copy_blocks(ptr src_ptrs, ptr dst_ptrs, ptr mapping, int num_pairs, int num_tensors,
                 std::int64_t block_bytes, ptr stream);

}  // namespace pscuda

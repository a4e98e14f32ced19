// Paged decode attention on CPU: each query attends over its sequence's KV blocks
// where they lie in the pool, through its block table. One pass reads every K row
// of the context once, a second every V row once; nothing is gathered or padded.
#pragma once
#include <cstdint>

namespace pagedserve::cpu {

enum class DType { kFloat32 = 0, kBFloat16 = 1 };

struct DecodeArgs {
  void* out;          // [num_seqs, num_heads, head_size] rows `out_stride` elements apart
  const void* query;  // [num_seqs, num_heads, head_size] rows `query_stride` elements apart
  int64_t out_stride = 0, query_stride = 0;
  DType io_dtype = DType::kFloat32;  // of query and out
  // [num_blocks, num_kv_heads, block_size, head_size], contiguous, both of cache_dtype.
  const void* key_cache;
  const void* value_cache;
  DType cache_dtype = DType::kFloat32;
  const int32_t* block_tables;  // [num_seqs, block_table_stride]
  int64_t block_table_stride = 0;
  const int32_t* context_lens;  // [num_seqs]: tokens of each context, the new one included
  int num_seqs = 0, num_heads = 0, num_kv_heads = 0, head_size = 0, block_size = 0;
  int64_t num_blocks = 0;
  float scale = 1.0f;
  int window = 0;  // > 0: only keys fewer than `window` positions back (sliding window)
  int num_threads = 1;
};

// Throws std::invalid_argument for inconsistent sizes and std::out_of_range for a
// context longer than its table or a block id outside the pool, before any work: the
// attention itself never reads outside the pool. An empty context gives zeros.
void paged_decode_attention(const DecodeArgs& args);

}  // namespace pagedserve::cpu

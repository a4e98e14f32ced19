// KV cache maintenance kernels. They move bytes only, so they are dtype-free:
// every row of head_size elements is a whole number of 16-byte vectors for all
// supported dtypes and head sizes.
#pragma once
#include "common.cuh"

namespace ps {

// write_kv (ops.write_kv): token t's K/V rows go to slot slot_mapping[t] of the cache
// ([blocks, Hkv, bs, D]); a negative slot (padding, or a token whose KV is not
// kept) is skipped. grid (num_tokens), any block size.
__global__ void write_kv_kernel(const char *__restrict__ key, const char *__restrict__ value,
                                char *__restrict__ key_cache, char *__restrict__ value_cache,
                                const i64 *__restrict__ slot_mapping, i64 key_stride,
                                i64 value_stride,  // token strides in bytes
                                int num_kv_heads, int row_vecs, int bs_log2) {
  const int t = blockIdx.x;
  const i64 slot = slot_mapping[t];
  if (slot < 0) return;
  const i64 blk = slot >> bs_log2;
  const i64 off = slot & ((1 << bs_log2) - 1);
  for (int i = threadIdx.x; i < num_kv_heads * row_vecs; i += blockDim.x) {
    const int h = i / row_vecs, v = i % row_vecs;
    const i64 dst = ((((blk * num_kv_heads + h) << bs_log2) + off) * row_vecs + v) * 16;
    const i64 src = (i64)i * 16;  // heads and dims are contiguous within a token
    *reinterpret_cast<uint4 *>(key_cache + dst) =
        *reinterpret_cast<const uint4 *>(key + t * key_stride + src);
    *reinterpret_cast<uint4 *>(value_cache + dst) =
        *reinterpret_cast<const uint4 *>(value + t * value_stride + src);
  }
}

// Copies whole blocks: pair x of `mapping` ([n, 2] = (src, dst) block ids) for
// tensor y, from src_ptrs[y] to dst_ptrs[y]. copy_blocks passes every layer's
// K and V caches as the tensors (one launch for all layers); swap passes one
// GPU cache and one pinned host cache, which the GPU reads or writes directly
// through unified addressing. grid (n, num_tensors).
__global__ void __launch_bounds__(256) copy_blocks_kernel(const i64 *__restrict__ src_ptrs,
                                                          const i64 *__restrict__ dst_ptrs,
                                                          const i64 *__restrict__ mapping,
                                                          i64 block_bytes) {
  enum { UNROLL = 4 };
  const i64 src_blk = mapping[2 * blockIdx.x], dst_blk = mapping[2 * blockIdx.x + 1];
  const uint4 *src = reinterpret_cast<const uint4 *>(src_ptrs[blockIdx.y] + src_blk * block_bytes);
  uint4 *dst = reinterpret_cast<uint4 *>(dst_ptrs[blockIdx.y] + dst_blk * block_bytes);
  const i64 n = block_bytes / 16;
  const int stride = blockDim.x;
  // UNROLL loads in flight per thread before the stores: host-mapped reads
  // cross PCIe and need many outstanding requests to reach full bandwidth.
  for (i64 base = threadIdx.x; base < n; base += (i64)stride * UNROLL) {
    uint4 r[UNROLL];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u)
      if (base + u * stride < n) r[u] = src[base + u * stride];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u)
      if (base + u * stride < n) dst[base + u * stride] = r[u];
  }
}

}  // namespace ps

// Entry points that dispatch on dtype, plus the prefill and cache-op launchers.
#include "../cache_ops.cuh"
#include "../launch_table.cuh"
#include "launch_util.cuh"

#include <algorithm>
#include <cstring>
#include <vector>

namespace pscuda {

std::vector<std::array<int, 6>> launch_table() {
  ps::LaunchRow rows[ps::LAUNCH_TABLE_MAX];
  const int n = ps::fill_launch_table(rows);
  std::vector<std::array<int, 6>> out;
  for (int i = 0; i < n; ++i) {
    const ps::LaunchRow &r = rows[i];
    out.push_back({r.kernel, r.size, r.variant, r.threads, r.rows, r.smem_bytes});
  }
  return out;
}

template <int DT> void decode_dtype(const DecodeArgs &a);

void decode(const DecodeArgs &a) {
  switch (a.dtype) {
    case ps::DT_F32: decode_dtype<ps::DT_F32>(a); break;
    case ps::DT_F16: decode_dtype<ps::DT_F16>(a); break;
    case ps::DT_BF16: decode_dtype<ps::DT_BF16>(a); break;
    default: unsupported("dtype code", a.dtype);
  }
}

template <int DT>
static void prefill_dtype(const PrefillArgs &a) {
  using T = typename ps::Elem<DT>::T;
  const int bs_log2 = log2_exact(a.block_size, "block_size");
  auto stream = reinterpret_cast<cudaStream_t>(a.stream);
  with_head_size(a.head_size, [&](auto dc) {
    constexpr int D = decltype(dc)::value;
    int smem = ps::prefill_smem_bytes(D);
    auto kernel = ps::paged_prefill_kernel<DT, D>;
    if (a.tensor_cores) {
      if constexpr (DT == ps::DT_F32) {
        unsupported("tensor_cores with dtype code", DT);
      } else {
        kernel = ps::paged_prefill_tc_kernel<DT, D>;
        smem = ps::PrefillTcShape<D>::SMEM_BYTES;
      }
    }
    if (smem > 48 * 1024) {
      const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
      if (err != cudaSuccess) throw std::runtime_error(std::string("prefill smem: ") + cudaGetErrorString(err));
    }
    kernel<<<dim3(a.grid_x, a.grid_y), 128, smem, stream>>>(
        reinterpret_cast<T *>(a.out), reinterpret_cast<const T *>(a.q), a.q_stride,
        reinterpret_cast<const T *>(a.key_cache), reinterpret_cast<const T *>(a.value_cache),
        reinterpret_cast<const int *>(a.block_tables), a.bt_stride,
        reinterpret_cast<const int *>(a.query_start_loc), reinterpret_cast<const int *>(a.context_lens),
        a.num_seqs, a.num_heads, a.num_kv_heads, bs_log2, a.scale);
  });
  check_launch("paged_prefill_kernel");
}

void prefill(const PrefillArgs &a) {
  if (a.grid_x == 0) return;
  switch (a.dtype) {
    case ps::DT_F32: prefill_dtype<ps::DT_F32>(a); break;
    case ps::DT_F16: prefill_dtype<ps::DT_F16>(a); break;
    case ps::DT_BF16: prefill_dtype<ps::DT_BF16>(a); break;
    default: unsupported("dtype code", a.dtype);
  }
}

void write_kv(ptr key, ptr value, ptr key_cache, ptr value_cache, ptr slot_mapping,
              std::int64_t key_stride, std::int64_t value_stride, int num_tokens,
              int num_kv_heads, int row_bytes, int block_size, ptr stream) {
  if (num_tokens == 0) return;
  if (row_bytes % 16) unsupported("row_bytes (must be a multiple of 16)", row_bytes);
  const int bs_log2 = log2_exact(block_size, "block_size");
  ps::write_kv_kernel<<<num_tokens, 128, 0, reinterpret_cast<cudaStream_t>(stream)>>>(
      reinterpret_cast<const char *>(key), reinterpret_cast<const char *>(value),
      reinterpret_cast<char *>(key_cache), reinterpret_cast<char *>(value_cache),
      reinterpret_cast<const long long *>(slot_mapping), key_stride, value_stride, num_kv_heads,
      row_bytes / 16, bs_log2);
  check_launch("write_kv_kernel");
}

void copy_blocks(ptr src_ptrs, ptr dst_ptrs, ptr mapping, int num_pairs, int num_tensors,
                 std::int64_t block_bytes, ptr stream) {
  if (num_pairs == 0 || num_tensors == 0) return;
  if (block_bytes % 16) unsupported("block_bytes (must be a multiple of 16)", (int)block_bytes);
  ps::copy_blocks_kernel<<<dim3(num_pairs, num_tensors), 256, 0, reinterpret_cast<cudaStream_t>(stream)>>>(
      reinterpret_cast<const long long *>(src_ptrs), reinterpret_cast<const long long *>(dst_ptrs),
      reinterpret_cast<const long long *>(mapping), block_bytes);
  check_launch("copy_blocks_kernel");
}

void memcpy_block_runs(ptr ptrs, ptr runs, int num_runs, int num_tensors, std::int64_t block_bytes,
                       ptr stream) {
  const auto *p = reinterpret_cast<const std::int64_t *>(ptrs);
  const auto *r = reinterpret_cast<const std::int64_t *>(runs);
  auto st = reinterpret_cast<cudaStream_t>(stream);
  for (int t = 0; t < num_tensors; ++t) {
    char *src = reinterpret_cast<char *>(p[t]);
    char *dst = reinterpret_cast<char *>(p[num_tensors + t]);
    for (int i = 0; i < num_runs; ++i) {
      const cudaError_t err = cudaMemcpyAsync(dst + r[3 * i + 1] * block_bytes, src + r[3 * i] * block_bytes,
                                              r[3 * i + 2] * block_bytes, cudaMemcpyDefault, st);
      if (err != cudaSuccess)
        throw std::runtime_error(std::string("swap cudaMemcpyAsync: ") + cudaGetErrorString(err));
    }
  }
}

namespace {
// The reused buffers of copy_blocks_from_host, one set per device: a pinned host
// table, its device copy, and events marking when the last upload has left the host
// side and when the last kernel has read the device side.
struct TableStaging {
  std::int64_t *host = nullptr, *dev = nullptr;
  std::size_t capacity = 0;  // int64 elements
  cudaEvent_t uploaded = nullptr, used = nullptr;
  cudaStream_t last_stream = nullptr;
};

void check(cudaError_t err, const char *what) {
  if (err != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(err));
}

TableStaging &staging_for(int device, std::size_t need) {
  static std::vector<TableStaging> all;
  if (all.size() <= static_cast<std::size_t>(device)) all.resize(device + 1);
  TableStaging &s = all[device];
  if (s.uploaded == nullptr) {
    check(cudaEventCreateWithFlags(&s.uploaded, cudaEventDisableTiming), "cudaEventCreate");
    check(cudaEventCreateWithFlags(&s.used, cudaEventDisableTiming), "cudaEventCreate");
  }
  if (need > s.capacity) {  // grow-only, doubling: rare, and only then synchronous
    check(cudaEventSynchronize(s.used), "cudaEventSynchronize");
    if (s.host != nullptr) check(cudaFreeHost(s.host), "cudaFreeHost");
    if (s.dev != nullptr) check(cudaFree(s.dev), "cudaFree");
    s.capacity = std::max(need, std::max<std::size_t>(2 * s.capacity, 4096));
    check(cudaMallocHost(reinterpret_cast<void **>(&s.host), s.capacity * 8), "cudaMallocHost");
    check(cudaMalloc(reinterpret_cast<void **>(&s.dev), s.capacity * 8), "cudaMalloc");
  }
  return s;
}
}  // namespace

bool copy_blocks_from_host(int device, ptr src_ptrs, ptr dst_ptrs, ptr pairs, int num_pairs,
                           int num_tensors, std::int64_t block_bytes, ptr stream) {
  if (num_pairs == 0 || num_tensors == 0) return true;
  if (block_bytes % 16) unsupported("block_bytes (must be a multiple of 16)", (int)block_bytes);
  auto st = reinterpret_cast<cudaStream_t>(stream);
  cudaStreamCaptureStatus capturing = cudaStreamCaptureStatusNone;
  check(cudaStreamIsCapturing(st, &capturing), "cudaStreamIsCapturing");
  if (capturing != cudaStreamCaptureStatusNone) return false;  // a graph would keep reading the buffer
  int previous = 0;
  check(cudaGetDevice(&previous), "cudaGetDevice");
  if (previous != device) check(cudaSetDevice(device), "cudaSetDevice");
  const std::size_t nt = num_tensors, n = num_pairs, need = 2 * nt + 2 * n;
  TableStaging &s = staging_for(device, need);
  // Same stream as last time: the next upload is queued after the last kernel, so only
  // the host side must be free. Another stream: wait until the last kernel is done.
  check(cudaEventSynchronize(st == s.last_stream ? s.uploaded : s.used), "cudaEventSynchronize");
  std::memcpy(s.host, reinterpret_cast<const void *>(src_ptrs), nt * 8);
  std::memcpy(s.host + nt, reinterpret_cast<const void *>(dst_ptrs), nt * 8);
  std::memcpy(s.host + 2 * nt, reinterpret_cast<const void *>(pairs), 2 * n * 8);
  check(cudaMemcpyAsync(s.dev, s.host, need * 8, cudaMemcpyHostToDevice, st), "cudaMemcpyAsync");
  check(cudaEventRecord(s.uploaded, st), "cudaEventRecord");
  copy_blocks(reinterpret_cast<ptr>(s.dev), reinterpret_cast<ptr>(s.dev + nt),
              reinterpret_cast<ptr>(s.dev + 2 * nt), num_pairs, num_tensors, block_bytes, stream);
  check(cudaEventRecord(s.used, st), "cudaEventRecord");
  s.last_stream = st;
  if (previous != device) check(cudaSetDevice(previous), "cudaSetDevice");
  return true;
}

int first_unpinned(ptr ptrs, int count) {
  const auto *p = reinterpret_cast<const std::int64_t *>(ptrs);
  for (int i = 0; i < count; ++i) {
    cudaPointerAttributes attr;
    if (cudaPointerGetAttributes(&attr, reinterpret_cast<const void *>(p[i])) != cudaSuccess) {
      cudaGetLastError();  // clear the error: an unknown pointer is simply not addressable
      return i;
    }
    if (attr.type == cudaMemoryTypeUnregistered) return i;
  }
  return -1;
}

}  // namespace pscuda

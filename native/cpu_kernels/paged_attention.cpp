// Paged decode attention on CPU (see paged_attention.h).
//
// Work item: one (sequence, KV head). Its query heads (the GQA group) are scaled into
// float32 once; pass 1 walks the context's blocks through the table, widens each K row
// once in registers and takes every query head's dot product from it; the softmax is
// exact (max, then exp and sum); pass 2 walks the blocks again and accumulates the V
// rows weighted by the probabilities, the accumulators of a tile of query heads held
// in registers for the whole context. All arithmetic is float32 whatever the storage:
// a bfloat16 value widens exactly.
//
// Why two passes over the blocks and not one online-softmax pass: a decode context is
// short enough (its scores fit in L1/L2) that keeping them costs nothing, and an exact
// softmax is simpler to read and to check against the float64 oracle.
//
// Memory: blocks lie anywhere in the pool, so the hardware prefetcher cannot follow a
// context; pass 1 requests the blocks ahead of it (K and V, into L2, a few lines per
// row), and past the end of its context the first blocks of the item the thread takes
// next. Pass 2 reads V from L2.
//
// The hot loops use GCC's vector extension (16 floats); on x86-64 the per-item
// function is compiled for AVX-512, AVX2 and baseline, and the loader picks the best
// the CPU has (GCC's target_clones), so one binary serves every x86 host.
#include "paged_attention.h"
#include "vector_math.h"

#include <algorithm>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define PAGEDSERVE_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define PAGEDSERVE_CLONES
#endif

namespace pagedserve::cpu {
namespace {

// The context one query attends to: positions [first, end).
struct Span {
  int first, end;
};

PAGEDSERVE_INLINE Span span_of(const DecodeArgs& a, int seq) {
  int end = a.context_lens[seq];
  int first = a.window > 0 ? std::max(0, end - a.window) : 0;
  return {first, end};
}

// One thread's working memory, sized once per call.
struct Scratch {
  std::vector<float> query;   // [group, head_size], scaled
  std::vector<float> scores;  // [group, context]: scores, then probabilities
  std::vector<float> partials;  // [group, 16 rows, 16 lanes]: partial dot products
};

// Asks for one cache line into L2 (prefetcht1), not L1: a block's rows are requested
// well before their use, and L1 requests would hold the core's few L1 miss buffers
// until they land, stalling the loads of the block being read. Measured: a third less
// time per cold call than with L1 requests (docs/kernels.md).
PAGEDSERVE_INLINE void request_line(const void* p) { __builtin_prefetch(p, 0, 1); }

constexpr int kPrefetchAhead = 2;  // blocks; 1-4 measured, 2 and 3 best (docs/kernels.md)

// The chunks of 16 of one row, widened into float32 lanes.
template <typename TKV>
PAGEDSERVE_INLINE void load_row(const TKV* row, f32x16* dst, int chunks) {
  for (int c = 0; c < chunks; ++c) dst[c] = load16(row + 16 * c);
}

constexpr int kMaxChunks = 16;  // head_size <= 256 (checked)

// sums[g] = sum over the context of probs[g][t] * V[t], for GT query heads of one KV
// head of `chunks` x 16 dimensions (NC when known at compile time, else 0). The
// accumulators (at most 16 vectors) live in registers from the first row to the last;
// each V row is widened once for all GT heads.
template <typename TKV, int NC, int GT>
PAGEDSERVE_INLINE void weighted_values(const DecodeArgs& a, const int32_t* table, int64_t head_rows,
                                       Span sp, const float* probs, int n, int chunks, float* sums) {
  constexpr int kAcc = NC > 0 ? NC : kMaxChunks;  // accumulators per head
  if constexpr (GT * kAcc <= 16) {
    const int nc = NC > 0 ? NC : chunks, d = 16 * nc;
    const int bs = a.block_size;
    const int64_t block_rows = int64_t(a.num_kv_heads) * bs;
    f32x16 acc[GT * kAcc];
    for (auto& v : acc) v = f32x16{};
    for (int b = sp.first / bs; b * bs < sp.end; ++b) {
      const int t0 = std::max(sp.first, b * bs) - b * bs, t1 = std::min(sp.end, b * bs + bs) - b * bs;
      const TKV* vb = static_cast<const TKV*>(a.value_cache) + (table[b] * block_rows + head_rows + t0) * d;
      const float* p = probs + (b * bs + t0 - sp.first);
      for (int t = 0; t < t1 - t0; ++t) {
        f32x16 v[kAcc];
        load_row(vb + int64_t(t) * d, v, nc);
        for (int g = 0; g < GT; ++g) {
          const float pg = p[int64_t(g) * n + t];
          for (int c = 0; c < nc; ++c) acc[g * kAcc + c] += pg * v[c];
        }
      }
    }
    for (int g = 0; g < GT; ++g)
      for (int c = 0; c < nc; ++c)
        std::memcpy(sums + g * d + 16 * c, &acc[g * kAcc + c], sizeof(f32x16));
  }
}

// NC: the head size in chunks of 16 when known at compile time (the usual 64 and 128:
// accumulators then live in registers), 0 for any other multiple of 16.
template <typename TIO, typename TKV, int NC>
PAGEDSERVE_INLINE void attend(const DecodeArgs& a, int item, int next, Scratch& s) {
  const int seq = item / a.num_kv_heads, head = item % a.num_kv_heads;
  const int group = a.num_heads / a.num_kv_heads, d = a.head_size, bs = a.block_size;
  const int chunks = NC > 0 ? NC : d / 16;
  const Span sp = span_of(a, seq);
  const int n = sp.end - sp.first;
  TIO* out = static_cast<TIO*>(a.out) + seq * a.out_stride + int64_t(head) * group * d;
  if (n <= 0) {
    for (int i = 0; i < group * d; ++i) narrow(0.0f, out + i);
    return;
  }
  const TIO* q = static_cast<const TIO*>(a.query) + seq * a.query_stride +
                 int64_t(head) * group * d;
  float* qf = s.query.data();
  for (int i = 0; i < group * d; ++i) qf[i] = widen(q[i]) * a.scale;

  const int32_t* table = a.block_tables + seq * a.block_table_stride;
  const int64_t head_rows = int64_t(head) * bs;  // row of (block 0, this head, slot 0)
  const int64_t block_rows = int64_t(a.num_kv_heads) * bs;
  float* scores = s.scores.data();
  float* partials = s.partials.data();

  // Pass 1: scores. Each K row is widened once, in registers, and every query head of
  // the group takes its dot product from it. While a block is read, the block
  // kPrefetchAhead further is requested a few lines per row (K and V): spread out, the
  // requests never fill the core's miss buffers at once.
  // The first row of block `b` of this item's stream to request: its own blocks, then
  // past its end the first ones of the item this thread takes next, so that those are
  // on their way during this item's softmax and pass 2. -1: nothing to request.
  const int last = (sp.end - 1) / bs;
  auto row_ahead = [&](int b) -> int64_t {
    if (b <= last) return table[b] * block_rows + head_rows;
    if (next < 0) return -1;
    const int next_seq = next / a.num_kv_heads;
    const Span next_sp = span_of(a, next_seq);
    const int nb = next_sp.first / bs + (b - last - 1);
    if (next_sp.end <= 0 || int64_t(nb) * bs >= next_sp.end) return -1;
    return a.block_tables[int64_t(next_seq) * a.block_table_stride + nb] * block_rows +
           int64_t(next % a.num_kv_heads) * bs;
  };
  const int64_t block_bytes = int64_t(bs) * d * sizeof(TKV);
  const int lines_per_row = int((block_bytes / 64 + bs - 1) / bs);
  const int64_t row_bytes = int64_t(lines_per_row) * 64;  // what is requested per row read
  // The K and V lines of one block (of this head) in bytes [from, to).
  auto request_block = [&](int64_t row, int64_t from, int64_t to) {
    const char* k = reinterpret_cast<const char*>(static_cast<const TKV*>(a.key_cache) + row * d);
    const char* v = reinterpret_cast<const char*>(static_cast<const TKV*>(a.value_cache) + row * d);
    for (int64_t off = from; off < std::min(to, block_bytes); off += 64) {
      request_line(k + off);
      request_line(v + off);
    }
  };
  // The first blocks, whole, before anything is read (for every item but a thread's
  // first, the previous item asked for them already: requests then find them cached).
  for (int b = sp.first / bs; b < sp.first / bs + kPrefetchAhead; ++b)
    if (const int64_t row = row_ahead(b); row >= 0) request_block(row, 0, block_bytes);
  for (int b = sp.first / bs; b * bs < sp.end; ++b) {
    const int t0 = std::max(sp.first, b * bs) - b * bs, t1 = std::min(sp.end, b * bs + bs) - b * bs;
    const TKV* kb = static_cast<const TKV*>(a.key_cache) + (table[b] * block_rows + head_rows + t0) * d;
    const int64_t ahead = row_ahead(b + kPrefetchAhead);
    float* out_scores = scores + (b * bs + t0 - sp.first);
    // Rows in runs of up to 16: each query head's 16-lane partial dot products of a
    // run are summed across lanes together (row_sums16), not one row at a time.
    for (int r0 = 0; r0 < t1 - t0; r0 += 16) {
      const int r1 = std::min(t1 - t0, r0 + 16);
      for (int t = r0; t < r1; ++t) {
        if (ahead >= 0) request_block(ahead, t * row_bytes, (t + 1) * row_bytes);
        f32x16 kc[NC > 0 ? NC : kMaxChunks];
        load_row(kb + int64_t(t) * d, kc, chunks);
        for (int g = 0; g < group; ++g) {
          const float* qg = qf + g * d;
          f32x16 dot = load16(qg) * kc[0];
          for (int c = 1; c < chunks; ++c) dot += load16(qg + 16 * c) * kc[c];
          std::memcpy(partials + (g * 16 + (t - r0)) * 16, &dot, sizeof dot);
        }
      }
      for (int g = 0; g < group; ++g) {
        const f32x16 sums = row_sums16(partials + g * 256, r1 - r0);
        if (r1 - r0 == 16)  // a whole run: one fixed-size store
          std::memcpy(out_scores + int64_t(g) * n + r0, &sums, sizeof sums);
        else
          std::memcpy(out_scores + int64_t(g) * n + r0, &sums, sizeof(float) * (r1 - r0));
      }
    }
    if (ahead >= 0)  // a partial block: the rest of the next one's lines
      request_block(ahead, (t1 - t0) * row_bytes, block_bytes);
  }

  // Softmax of each query head's row; the sums stay to divide the output once.
  float inv_sum[256];
  for (int g = 0; g < group; ++g) inv_sum[g] = 1.0f / softmax_numerators(scores + int64_t(g) * n, n);

  // Pass 2: the probability-weighted sums of V rows, into qf (free now). Query heads
  // in tiles whose accumulators all stay in registers for the whole context (4 heads
  // of 64, 2 of 128, 1 of a size known only at run time): each V row is widened once
  // per tile.
  constexpr int kTile = NC > 0 ? 16 / NC : 1;
  for (int g0 = 0; g0 < group; g0 += kTile) {
    const float* p = scores + int64_t(g0) * n;
    float* sums = qf + g0 * d;
    switch (std::min(kTile, group - g0)) {
      case 1: weighted_values<TKV, NC, 1>(a, table, head_rows, sp, p, n, chunks, sums); break;
      case 2: weighted_values<TKV, NC, 2>(a, table, head_rows, sp, p, n, chunks, sums); break;
      case 3: weighted_values<TKV, NC, 3>(a, table, head_rows, sp, p, n, chunks, sums); break;
      default: weighted_values<TKV, NC, 4>(a, table, head_rows, sp, p, n, chunks, sums); break;
    }
  }
  for (int g = 0; g < group; ++g)
    for (int i = 0; i < d; ++i) narrow(qf[g * d + i] * inv_sum[g], out + g * d + i);
}

// A head size the vector path does not take (not a multiple of 16): plain loops.
template <typename TIO, typename TKV>
PAGEDSERVE_INLINE void attend_scalar(const DecodeArgs& a, int item, Scratch& s) {
  const int seq = item / a.num_kv_heads, head = item % a.num_kv_heads;
  const int group = a.num_heads / a.num_kv_heads, d = a.head_size, bs = a.block_size;
  const Span sp = span_of(a, seq);
  const int n = sp.end - sp.first;
  TIO* out = static_cast<TIO*>(a.out) + seq * a.out_stride + int64_t(head) * group * d;
  if (n <= 0) {
    for (int i = 0; i < group * d; ++i) narrow(0.0f, out + i);
    return;
  }
  const TIO* q = static_cast<const TIO*>(a.query) + seq * a.query_stride + int64_t(head) * group * d;
  const int32_t* table = a.block_tables + seq * a.block_table_stride;
  const int64_t head_rows = int64_t(head) * bs, block_rows = int64_t(a.num_kv_heads) * bs;
  auto row = [&](const void* cache, int pos) {
    return static_cast<const TKV*>(cache) + (table[pos / bs] * block_rows + head_rows + pos % bs) * d;
  };
  float* scores = s.scores.data();
  for (int g = 0; g < group; ++g) {
    float* sc = scores + int64_t(g) * n;
    float m = -std::numeric_limits<float>::infinity();
    for (int t = 0; t < n; ++t) {
      const TKV* k = row(a.key_cache, sp.first + t);
      float dot = 0.0f;
      for (int i = 0; i < d; ++i) dot += widen(q[g * d + i]) * a.scale * widen(k[i]);
      sc[t] = dot;
      m = dot > m ? dot : m;
    }
    float sum = 0.0f;
    for (int t = 0; t < n; ++t) sum += (sc[t] = exp_nonpositive(sc[t] - m));
    for (int i = 0; i < d; ++i) {
      float acc = 0.0f;
      for (int t = 0; t < n; ++t) acc += sc[t] * widen(row(a.value_cache, sp.first + t)[i]);
      narrow(acc / sum, out + g * d + i);
    }
  }
}

template <typename TIO, typename TKV>
PAGEDSERVE_INLINE void attend_any(const DecodeArgs& a, int item, int next, Scratch& s) {
  switch (a.head_size) {
    case 64: return attend<TIO, TKV, 4>(a, item, next, s);
    case 128: return attend<TIO, TKV, 8>(a, item, next, s);
    default:
      if (a.head_size % 16 == 0) return attend<TIO, TKV, 0>(a, item, next, s);
      return attend_scalar<TIO, TKV>(a, item, s);
  }
}

using AttendFn = void (*)(const DecodeArgs&, int, int, Scratch&);

PAGEDSERVE_CLONES void attend_f32_f32(const DecodeArgs& a, int i, int next, Scratch& s) { attend_any<float, float>(a, i, next, s); }
PAGEDSERVE_CLONES void attend_f32_bf16(const DecodeArgs& a, int i, int next, Scratch& s) { attend_any<float, bf16>(a, i, next, s); }
PAGEDSERVE_CLONES void attend_bf16_f32(const DecodeArgs& a, int i, int next, Scratch& s) { attend_any<bf16, float>(a, i, next, s); }
PAGEDSERVE_CLONES void attend_bf16_bf16(const DecodeArgs& a, int i, int next, Scratch& s) { attend_any<bf16, bf16>(a, i, next, s); }

AttendFn pick(DType io, DType cache) {
  if (io == DType::kFloat32) return cache == DType::kFloat32 ? attend_f32_f32 : attend_f32_bf16;
  return cache == DType::kFloat32 ? attend_bf16_f32 : attend_bf16_bf16;
}

// Everything the items will read, checked once; returns the longest span.
int check(const DecodeArgs& a) {
  if (a.num_seqs < 0 || a.num_heads <= 0 || a.num_kv_heads <= 0 || a.head_size <= 0 ||
      a.block_size <= 0 || a.num_blocks < 0 || a.num_threads <= 0)
    throw std::invalid_argument("sizes and num_threads must be positive");
  if (a.num_heads % a.num_kv_heads != 0)
    throw std::invalid_argument("num_heads must be a multiple of num_kv_heads");
  if (a.num_heads / a.num_kv_heads > 256 || a.head_size > 256)
    throw std::invalid_argument("at most 256 query heads per KV head and a head size of 256");
  if (a.query_stride < int64_t(a.num_heads) * a.head_size ||
      a.out_stride < int64_t(a.num_heads) * a.head_size)
    throw std::invalid_argument("query and out rows must hold num_heads * head_size elements");
  int longest = 0;
  for (int seq = 0; seq < a.num_seqs; ++seq) {
    const Span sp = span_of(a, seq);
    if (sp.end < 0) throw std::invalid_argument("negative context length");
    if (sp.end == 0) continue;
    if ((int64_t(sp.end) + a.block_size - 1) / a.block_size > a.block_table_stride)
      throw std::out_of_range("context of sequence " + std::to_string(seq) +
                              " is longer than its block table");
    const int32_t* table = a.block_tables + seq * a.block_table_stride;
    for (int b = sp.first / a.block_size; int64_t(b) * a.block_size < sp.end; ++b)
      if (table[b] < 0 || table[b] >= a.num_blocks)
        throw std::out_of_range("block id " + std::to_string(table[b]) + " of sequence " +
                                std::to_string(seq) + " is outside the pool");
    longest = std::max(longest, sp.end - sp.first);
  }
  return longest;
}

}  // namespace

void paged_decode_attention(const DecodeArgs& a) {
  const int longest = check(a);
  const int group = a.num_heads / a.num_kv_heads;
  const int items = a.num_seqs * a.num_kv_heads;
  const AttendFn fn = pick(a.io_dtype, a.cache_dtype);
  // Contexts differ in length, so items are handed out one at a time.
#pragma omp parallel num_threads(a.num_threads) if (a.num_threads > 1 && items > 1)
  {
    Scratch s;
    s.query.resize(size_t(group) * a.head_size);
    s.partials.resize(size_t(group) * 16 * 16);
    s.scores.resize(size_t(group) * std::max(longest, 1));
#pragma omp for schedule(dynamic, 1)
    for (int item = 0; item < items; ++item) {
      // The item this thread most likely takes next (exact on one thread): its first
      // blocks are requested during this one.
      const int next = item + a.num_threads < items ? item + a.num_threads : -1;
      fn(a, item, next, s);
    }
  }
}

}  // namespace pagedserve::cpu

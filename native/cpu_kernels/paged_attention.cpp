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
#define PAGEDSERVE_INLINE inline __attribute__((always_inline))

namespace pagedserve::cpu {
namespace {

using bf16 = uint16_t;  // bfloat16 storage: the high half of a float32

PAGEDSERVE_INLINE float widen(float x) { return x; }
PAGEDSERVE_INLINE float widen(bf16 x) {
  uint32_t bits = static_cast<uint32_t>(x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

PAGEDSERVE_INLINE void narrow(float x, float* dst) { *dst = x; }
// Round to nearest even, NaN kept a (quiet) NaN: torch's float -> bfloat16 conversion.
PAGEDSERVE_INLINE void narrow(float x, bf16* dst) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  if ((bits & 0x7fffffffu) > 0x7f800000u) {
    *dst = 0x7fc0;
    return;
  }
  bits += 0x7fffu + ((bits >> 16) & 1u);
  *dst = static_cast<bf16>(bits >> 16);
}


// The context one query attends to: positions [first, end).
struct Span {
  int first, end;
};

PAGEDSERVE_INLINE Span span_of(const DecodeArgs& a, int seq) {
  int end = a.context_lens[seq];
  int first = a.window > 0 ? std::max(0, end - a.window) : 0;
  return {first, end};
}

// 16 floats. GCC's vector extension: each target clone lowers it to its own registers
// (one zmm, two ymm or four xmm), so the code below is written once for all of them.
typedef float f32x16 __attribute__((vector_size(64)));
typedef uint16_t u16x16 __attribute__((vector_size(32)));
typedef uint32_t u32x16 __attribute__((vector_size(64)));

// One thread's working memory, sized once per call.
struct Scratch {
  std::vector<float> query;   // [group, head_size], scaled
  std::vector<float> scores;  // [group, context]: scores, then probabilities
  std::vector<float> block;   // [block_size, head_size]: one block's rows, widened
  std::vector<float> partials;  // [group, 16 rows, 16 lanes]: partial dot products
};

PAGEDSERVE_INLINE f32x16 load16(const float* p) {
  f32x16 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
PAGEDSERVE_INLINE f32x16 load16(const bf16* p) {
  u16x16 h;
  std::memcpy(&h, p, sizeof h);
  u32x16 w = __builtin_convertvector(h, u32x16) << 16;
  f32x16 v;
  std::memcpy(&v, &w, sizeof v);
  return v;
}
// Lanes added as a tree (16 -> 8 -> 4 -> 2 -> 1): a left-to-right sum would chain 16
// dependent adds per dot product.
typedef float f32x8 __attribute__((vector_size(32)));
typedef float f32x4 __attribute__((vector_size(16)));
PAGEDSERVE_INLINE float sum16(f32x16 v) {
  f32x8 lo, hi;
  std::memcpy(&lo, &v, sizeof lo);
  std::memcpy(&hi, reinterpret_cast<const char*>(&v) + sizeof lo, sizeof hi);
  f32x8 s8 = lo + hi;
  f32x4 a, b;
  std::memcpy(&a, &s8, sizeof a);
  std::memcpy(&b, reinterpret_cast<const char*>(&s8) + sizeof a, sizeof b);
  f32x4 s4 = a + b;
  return (s4[0] + s4[2]) + (s4[1] + s4[3]);
}

typedef int32_t i32x16 __attribute__((vector_size(64)));

// out[r] = the sum of the 16 floats at rows + 16 r, for r < count (rows past count
// read as zero). Lanes are added pairwise across all rows at once (lane j with j + 8, then
// j + 4, j + 2, j + 1: the order of sum16), 30 shuffles and 15 adds for 16 sums.
PAGEDSERVE_INLINE f32x16 row_sums16(const float* rows, int count) {
  f32x16 v[16];
  for (int r = 0; r < 16; ++r) v[r] = r < count ? load16(rows + 16 * r) : f32x16{};
  const i32x16 halves_lo = {0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23};
  const i32x16 halves_hi = halves_lo + 8;
  const i32x16 quarters_lo = {0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27};
  const i32x16 quarters_hi = quarters_lo + 4;
  const i32x16 pairs_lo = {0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29};
  const i32x16 pairs_hi = pairs_lo + 2;
  const i32x16 evens = {0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30};
  const i32x16 odds = evens + 1;
  f32x16 h[8], q[4], p[2];
  // h[k]: rows 2k, 2k+1 as 8 lanes each
  for (int k = 0; k < 8; ++k)
    h[k] = __builtin_shuffle(v[2 * k], v[2 * k + 1], halves_lo) +
           __builtin_shuffle(v[2 * k], v[2 * k + 1], halves_hi);
  // q[k]: rows 4k..4k+3 as 4 lanes each
  for (int k = 0; k < 4; ++k)
    q[k] = __builtin_shuffle(h[2 * k], h[2 * k + 1], quarters_lo) +
           __builtin_shuffle(h[2 * k], h[2 * k + 1], quarters_hi);
  // p[k]: rows 8k..8k+7 as 2 lanes each
  for (int k = 0; k < 2; ++k)
    p[k] = __builtin_shuffle(q[2 * k], q[2 * k + 1], pairs_lo) +
           __builtin_shuffle(q[2 * k], q[2 * k + 1], pairs_hi);
  return __builtin_shuffle(p[0], p[1], evens) + __builtin_shuffle(p[0], p[1], odds);
}

// e^x for x <= 0 (a score minus the row's maximum), about 1 ulp: x = n ln2 + r with
// |r| <= ln2 / 2, e^r by its Taylor series to r^7 (error < 5e-9), 2^n by exponent bits.
// Written branch-free on 16 lanes (GCC's vector extension, below); below -87 it returns e^-87
// (1.6e-38), which no float32 sum of probabilities can tell from zero. NaN stays NaN.
PAGEDSERVE_INLINE f32x16 exp16_nonpositive(f32x16 x) {
  const f32x16 low = f32x16{} - 87.0f;
  x = x < low ? low : x;
  f32x16 n = __builtin_convertvector(__builtin_convertvector(x * 1.44269504f - 0.5f, i32x16), f32x16);
  f32x16 r = x - n * 0.693359375f + n * 2.12194440e-4f;
  f32x16 p = f32x16{} + 1.0f / 5040.0f;
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  u32x16 bits = (u32x16)(__builtin_convertvector(n, i32x16) + 127) << 23;
  f32x16 scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

// One value through the same arithmetic (softmax tails, the plain-loop path).
PAGEDSERVE_INLINE float exp_nonpositive(float x) { return exp16_nonpositive(f32x16{} + x)[0]; }

// row[i] <- e^(row[i] - max(row)) for i < n; returns their sum. Whole chunks of 16 go
// through the vector exp, the tail through the scalar one (the same function).
PAGEDSERVE_INLINE float softmax_numerators(float* row, int n) {
  const int whole = n / 16 * 16;
  float m = row[0];
  if (whole) {
    f32x16 m16 = load16(row);
    for (int i = 16; i < whole; i += 16) {
      f32x16 v = load16(row + i);
      m16 = v > m16 ? v : m16;
    }
    for (int l = 0; l < 16; ++l) m = m16[l] > m ? m16[l] : m;
  }
  for (int i = whole; i < n; ++i) m = row[i] > m ? row[i] : m;
  f32x16 sum16v = f32x16{};
  for (int i = 0; i < whole; i += 16) {
    f32x16 e = exp16_nonpositive(load16(row + i) - m);
    std::memcpy(row + i, &e, sizeof e);
    sum16v += e;
  }
  float sum = sum16(sum16v);
  for (int i = whole; i < n; ++i) sum += (row[i] = exp_nonpositive(row[i] - m));
  return sum;
}

// Asks for one cache line into L2 (prefetcht1), not L1: a block's rows are requested
// well before their use, and L1 requests would hold the core's few L1 miss buffers
// until they land, stalling the loads of the block being read. Measured: a third less
// time per cold call than with L1 requests (docs/kernels.md).
PAGEDSERVE_INLINE void request_line(const void* p) { __builtin_prefetch(p, 0, 1); }

// Asks for one block's rows of one head ahead of their use. Blocks lie anywhere in the
// pool, so the hardware prefetcher cannot guess the next one; without this, half the
// kernel's time was spent waiting on the first lines of each block.
template <typename TKV>
PAGEDSERVE_INLINE void prefetch_rows(const TKV* src, int rows, int d) {
  const char* p = reinterpret_cast<const char*>(src);
  const int64_t bytes = int64_t(rows) * d * sizeof(TKV);
  for (int64_t off = 0; off < bytes; off += 64) request_line(p + off);
}

constexpr int kPrefetchAhead = 2;  // blocks; 1-4 measured, 2 and 3 best (docs/kernels.md)

// Rows [t0, t1) of one block of one head, widened into `dst` ([rows, head_size]).
template <typename TKV>
PAGEDSERVE_INLINE void widen_rows(const TKV* src, int rows, int chunks, float* dst) {
  for (int r = 0; r < rows * chunks; ++r) {
    f32x16 v = load16(src + r * 16);
    std::memcpy(dst + r * 16, &v, sizeof v);
  }
}

// The chunks of 16 of one row, widened into float32 lanes.
template <typename TKV>
PAGEDSERVE_INLINE void load_row(const TKV* row, f32x16* dst, int chunks) {
  for (int c = 0; c < chunks; ++c) dst[c] = load16(row + 16 * c);
}

// sums[g] = sum over the context of probs[g][t] * V[t], for GT query heads of one KV
// head, head size 16 * NC. The GT * NC accumulators (at most 16 vectors) live in
// registers from the first row to the last; each V row is widened once for all GT.
template <typename TKV, int NC, int GT>
PAGEDSERVE_INLINE void weighted_values(const DecodeArgs& a, const int32_t* table, int64_t head_rows,
                                       Span sp, const float* probs, int n, float* sums) {
  if constexpr (GT * NC <= 16) {
    constexpr int d = 16 * NC;
    const int bs = a.block_size;
    const int64_t block_rows = int64_t(a.num_kv_heads) * bs;
    f32x16 acc[GT * NC];
    for (auto& v : acc) v = f32x16{};
    for (int b = sp.first / bs; b * bs < sp.end; ++b) {
      const int t0 = std::max(sp.first, b * bs) - b * bs, t1 = std::min(sp.end, b * bs + bs) - b * bs;
      const TKV* vb = static_cast<const TKV*>(a.value_cache) + (table[b] * block_rows + head_rows + t0) * d;
      const float* p = probs + (b * bs + t0 - sp.first);
      for (int t = 0; t < t1 - t0; ++t) {
        f32x16 v[NC];
        load_row(vb + t * d, v, NC);
        for (int g = 0; g < GT; ++g) {
          const float pg = p[int64_t(g) * n + t];
          for (int c = 0; c < NC; ++c) acc[g * NC + c] += pg * v[c];
        }
      }
    }
    for (int i = 0; i < GT * NC; ++i) std::memcpy(sums + 16 * i, &acc[i], sizeof(f32x16));
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

  // K and V rows of a block, requested kPrefetchAhead blocks before pass 1 reads its K
  // (V is read in pass 2, from L2 by then): several blocks in flight keep the memory
  // system busy where one block's arithmetic is too short to hide one block's misses.
  auto prefetch_block = [&](int b) {
    if (b * bs >= sp.end) return;
    const int64_t row = (table[b] * block_rows + head_rows) * d;
    prefetch_rows(static_cast<const TKV*>(a.key_cache) + row, bs, d);
    prefetch_rows(static_cast<const TKV*>(a.value_cache) + row, bs, d);
  };
  for (int b = sp.first / bs; b < sp.first / bs + kPrefetchAhead; ++b) prefetch_block(b);

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
  constexpr int kMaxChunks = 16;  // head_size <= 256 (checked)
  for (int b = sp.first / bs; b * bs < sp.end; ++b) {
    const int t0 = std::max(sp.first, b * bs) - b * bs, t1 = std::min(sp.end, b * bs + bs) - b * bs;
    const TKV* kb = static_cast<const TKV*>(a.key_cache) + (table[b] * block_rows + head_rows + t0) * d;
    const int64_t ahead = row_ahead(b + kPrefetchAhead);
    const char *pk = nullptr, *pv = nullptr;
    if (ahead >= 0) {
      pk = reinterpret_cast<const char*>(static_cast<const TKV*>(a.key_cache) + ahead * d);
      pv = reinterpret_cast<const char*>(static_cast<const TKV*>(a.value_cache) + ahead * d);
    }
    float* out_scores = scores + (b * bs + t0 - sp.first);
    // Rows in runs of up to 16: each query head's 16-lane partial dot products of a
    // run are summed across lanes together (row_sums16), not one row at a time.
    for (int r0 = 0; r0 < t1 - t0; r0 += 16) {
      const int r1 = std::min(t1 - t0, r0 + 16);
      for (int t = r0; t < r1; ++t) {
        if (pk) {
          for (int l = 0; l < lines_per_row; ++l) {
            const int64_t off = (int64_t(t) * lines_per_row + l) * 64;
            if (off < block_bytes) { request_line(pk + off); request_line(pv + off); }
          }
        }
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
    if (pk)  // a partial block: the rest of the next one's lines
      for (int64_t off = int64_t(t1 - t0) * lines_per_row * 64; off < block_bytes; off += 64) {
        request_line(pk + off);
        request_line(pv + off);
      }
  }

  // Softmax of each query head's row; the sums stay to divide the output once.
  float inv_sum[256];
  for (int g = 0; g < group; ++g) inv_sum[g] = 1.0f / softmax_numerators(scores + int64_t(g) * n, n);

  // Pass 2: the probability-weighted sums of V rows, into qf (free now).
  if constexpr (NC > 0) {
    // Query heads in tiles whose accumulators all stay in registers for the whole
    // context (4 heads of 64, 2 of 128): each V row is widened once per tile.
    constexpr int kTile = 16 / NC;
    for (int g0 = 0; g0 < group; g0 += kTile) {
      const float* p = scores + int64_t(g0) * n;
      float* sums = qf + g0 * d;
      switch (std::min(kTile, group - g0)) {
        case 1: weighted_values<TKV, NC, 1>(a, table, head_rows, sp, p, n, sums); break;
        case 2: weighted_values<TKV, NC, 2>(a, table, head_rows, sp, p, n, sums); break;
        case 3: weighted_values<TKV, NC, 3>(a, table, head_rows, sp, p, n, sums); break;
        default: weighted_values<TKV, NC, 4>(a, table, head_rows, sp, p, n, sums); break;
      }
    }
  } else {
    // Any other multiple of 16: one query head at a time over a block's widened rows,
    // the sums in memory between blocks.
    float* rows = s.block.data();
    f32x16 acc[kMaxChunks];
    std::fill(qf, qf + group * d, 0.0f);
    for (int b = sp.first / bs; b * bs < sp.end; ++b) {
      const int t0 = std::max(sp.first, b * bs) - b * bs, t1 = std::min(sp.end, b * bs + bs) - b * bs;
      const TKV* vb = static_cast<const TKV*>(a.value_cache) + (table[b] * block_rows + head_rows + t0) * d;
      widen_rows(vb, t1 - t0, chunks, rows);
      const float* probs = scores + (b * bs + t0 - sp.first);
      for (int g = 0; g < group; ++g) {
        float* ag = qf + g * d;
        for (int c = 0; c < chunks; ++c) acc[c] = load16(ag + 16 * c);
        for (int t = 0; t < t1 - t0; ++t) {
          const float p = probs[int64_t(g) * n + t];
          for (int c = 0; c < chunks; ++c) acc[c] += p * load16(rows + t * d + 16 * c);
        }
        for (int c = 0; c < chunks; ++c) std::memcpy(ag + 16 * c, &acc[c], sizeof(f32x16));
      }
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
    s.block.resize(size_t(a.block_size) * a.head_size);
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

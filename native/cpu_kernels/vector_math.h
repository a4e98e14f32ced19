// Float32 arithmetic on 16 lanes for the CPU kernels (paged_attention.cpp): bfloat16
// widening and rounding, loads, lane sums and e^x, written once with GCC's vector
// extension. Every function is inlined into the kernel's per-item function, so each
// of its target clones (AVX-512, AVX2, baseline) lowers them to its own registers.
#pragma once

#include <cstdint>
#include <cstring>

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

// 16 floats. GCC's vector extension: each target clone lowers it to its own registers
// (one zmm, two ymm or four xmm), so the code below is written once for all of them.
typedef float f32x16 __attribute__((vector_size(64)));
typedef uint16_t u16x16 __attribute__((vector_size(32)));
typedef uint32_t u32x16 __attribute__((vector_size(64)));

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

}  // namespace
}  // namespace pagedserve::cpu

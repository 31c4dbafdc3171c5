// Element types shared by the kernels: float32, bfloat16 (stored as uint16_t) and float16 (Half),
// computed in float32.
#pragma once

#include <cstdint>
#include <cstring>

// Hand-written AVX2 paths where the build targets AVX2 with FMA and F16C (x86-64-v3); portable
// loops elsewhere.
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define TW_AVX2 1
// AVX-512 variants of the hottest kernels, compiled for that level by GCC's target pragma and
// chosen at run time (tw::has_avx512), so that one build serves CPUs with and without it.
#if defined(__GNUC__) && !defined(__clang__) && !defined(TW_NO_AVX512)
#define TW_AVX512 1
#endif
#endif

namespace tw {

constexpr int kFloat32 = 0;
constexpr int kBFloat16 = 1;
constexpr int kFloat16 = 2;

// An IEEE half-precision number, by its bits (a type of its own, so that overloads tell it from
// bfloat16).
struct Half {
  uint16_t bits;
};

// The float32 value of a half's bits (exact: every half is a float32).
inline float half_to_float(uint16_t h) {
#ifdef TW_AVX2
  return _cvtsh_ss(h);
#else
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1Fu, mant = h & 0x3FFu, bits;
  if (exp == 0x1F) {
    bits = sign | 0x7F800000u | (mant << 13);
  } else if (exp != 0) {
    bits = sign | ((exp + 112) << 23) | (mant << 13);
  } else if (mant == 0) {
    bits = sign;
  } else {  // subnormal half: normalize
    exp = 113;
    while (!(mant & 0x400u)) {
      mant <<= 1;
      --exp;
    }
    bits = sign | (exp << 23) | ((mant & 0x3FFu) << 13);
  }
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
#endif
}

#ifdef TW_AVX512
// Whether this CPU (and its operating system) runs the AVX-512 variants: foundation, byte/word,
// doubleword/quadword and vector-length extensions, as x86-64-v4 has them.
inline bool has_avx512() {
  static const bool yes = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                          __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
  return yes;
}
#endif

// Part i of n things spread evenly over `parts` parts, the larger parts first (the kernels' tiles
// of rows: 12 rows in two tiles are 6 + 6, not 8 + 4).
inline int64_t even_share(int64_t n, int64_t parts, int64_t i) { return n / parts + (i < n % parts ? 1 : 0); }

inline float to_float(float x) { return x; }
inline float to_float(uint16_t x) {
  const uint32_t bits = static_cast<uint32_t>(x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}
inline float to_float(Half x) { return half_to_float(x.bits); }

inline void store(float x, float* dst) { *dst = x; }
inline void store(float x, uint16_t* dst) {
  // Round to nearest even, as torch does when it casts float32 to bfloat16.
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  bits += 0x7FFFu + ((bits >> 16) & 1u);
  *dst = static_cast<uint16_t>(bits >> 16);
}

#ifdef TW_AVX2
// Round to nearest even, as torch does when it casts float32 to float16 (F16C's conversion).
inline void store(float x, Half* dst) { dst->bits = _cvtss_sh(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
#endif

// The value a float32 result has once stored in T (for steps that torch rounds to T).
template <typename T>
inline float round_to(float x) {
  T t;
  store(x, &t);
  return to_float(t);
}

// f(T*) for the element type of an attention kernel's queries and output (float32, bfloat16),
// called with a null pointer of that type; 1 for a code it does not know.
template <typename F>
int with_query_type(int code, F&& f) {
  switch (code) {
    case kFloat32: return f(static_cast<float*>(nullptr));
    case kBFloat16: return f(static_cast<uint16_t*>(nullptr));
    default: return 1;
  }
}

// The same for a KV cache's element type (float32, bfloat16, float16).
template <typename F>
int with_cache_type(int code, F&& f) {
  switch (code) {
    case kFloat32: return f(static_cast<float*>(nullptr));
    case kBFloat16: return f(static_cast<uint16_t*>(nullptr));
    case kFloat16: return f(static_cast<Half*>(nullptr));
    default: return 1;
  }
}

// Whether a block table covers `len` tokens (1 <= len <= width * block_size) with block ids inside
// a pool of `num_blocks`: checked before a kernel reads anything through it.
inline bool table_in_range(const int64_t* table, int64_t len, int64_t width, int64_t block_size, int64_t num_blocks) {
  if (len < 1 || len > width * block_size) return false;
  for (int64_t b = 0; b < (len + block_size - 1) / block_size; ++b)
    if (table[b] < 0 || table[b] >= num_blocks) return false;
  return true;
}

#ifdef TW_AVX2
// Eight consecutive elements as float32 (exact: each 16-bit type widens without rounding).
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const uint16_t* p) {  // bfloat16: the high half of a float32
  const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}
inline __m256 load8(const Half* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
#endif

}  // namespace tw

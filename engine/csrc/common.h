// Element types shared by the kernels: float32 and bfloat16 (stored as uint16_t), computed in float32.
#pragma once

#include <cstdint>
#include <cstring>

// Hand-written AVX2 paths where the build targets AVX2 with FMA and F16C (x86-64-v3); portable
// loops elsewhere.
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define TW_AVX2 1
#endif

namespace tw {

constexpr int kFloat32 = 0;
constexpr int kBFloat16 = 1;

inline float to_float(float x) { return x; }
inline float to_float(uint16_t x) {
  const uint32_t bits = static_cast<uint32_t>(x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

inline void store(float x, float* dst) { *dst = x; }
inline void store(float x, uint16_t* dst) {
  // Round to nearest even, as torch does when it casts float32 to bfloat16.
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  bits += 0x7FFFu + ((bits >> 16) & 1u);
  *dst = static_cast<uint16_t>(bits >> 16);
}

// The value a float32 result has once stored in T (for steps that torch rounds to T).
template <typename T>
inline float round_to(float x) {
  T t;
  store(x, &t);
  return to_float(t);
}

}  // namespace tw

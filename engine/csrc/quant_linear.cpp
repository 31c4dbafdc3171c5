// y = x @ W.T for float32 activations and a weight kept in its GGUF block-quantized form (Q4_0,
// Q4_1, Q8_0, Q4_K), dequantized on the fly. Decoding reads every weight once per step for a
// handful of rows, so the step is bound by memory traffic: a Q4_1 weight is 5 bits instead of
// float32's 32.
//
// Exactness: each weight is dequantized to the float32 value gguf's reference dequantizer gives:
// a float16 scale times a small integer (a 6-bit sub-block scale, a 4- or 8-bit quant) is exact in
// float32, so where the reference rounds once (d * q + m, d * sc * q - dmin * m) a fused
// multiply-add rounds the same. Products with x are summed in float32: the result is F.linear on
// the dequantized matrix up to summation order, like any float32 matmul.
//
// Not Q6_K: its unpacking (6-bit quants split across two arrays) costs what its smaller reads save.
// On 12 [2048 -> 4096] matrices against the dense matmul in the same run, a 128-bit unpacking
// (both halves of a group, int8 scale per 16 weights) ran even at one row (16.6 against 17.2 ms)
// and slower at 2-32 rows (0.71-0.93x); a 256-bit one was slower still at one row.
//
// Layouts: x [M, K] row stride x_stride; w [N, row_bytes] (row n: the blocks of output feature n,
// as GGUF stores them); out [M, N] row stride out_stride. K is a multiple of the type's block
// (32 weights, or 256 for the K-quants); the kernel walks it in groups of 32.

#include <cstdint>
#include <cstring>
#include <vector>

#include "common.h"

namespace {

// ggml's type ids, as GGUF files and gguf.GGMLQuantizationType number them.
constexpr int kQ4_0 = 2;
constexpr int kQ4_1 = 3;
constexpr int kQ8_0 = 8;
constexpr int kQ4_K = 12;
// Weights dequantized in one step: four vectors of eight.
constexpr int64_t kGroup = 32;
// Weight rows dequantized together; every row of x is multiplied by them while they are in cache.
constexpr int kTileRows = 4;

constexpr int64_t block_elems(int type) { return type == kQ4_K ? 256 : 32; }

constexpr int64_t block_bytes(int type) {
  switch (type) {
    case kQ4_0: return 18;   // float16 d, 16 bytes of nibbles: w = d * (q - 8)
    case kQ4_1: return 20;   // float16 d, float16 m, 16 bytes of nibbles: w = d * q + m
    case kQ8_0: return 34;   // float16 d, 32 int8: w = d * q
    case kQ4_K: return 144;  // float16 d, dmin, 12 bytes of 6-bit scales and mins, 128 of nibbles
    default: return 0;
  }
}

// Q4_K's 6-bit scale and min of sub-block j (0-7), packed in 12 bytes as ggml packs them.
inline void q4k_scale_min(const uint8_t* sc, int j, int& scale, int& min) {
  if (j < 4) {
    scale = sc[j] & 63;
    min = sc[j + 4] & 63;
  } else {
    scale = (sc[j + 4] & 0x0F) | ((sc[j - 4] >> 6) << 4);
    min = (sc[j + 4] >> 4) | ((sc[j] >> 6) << 4);
  }
}

float half_to_float(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, sizeof h);
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

#ifdef TW_AVX2
inline void widen_u8(__m128i bytes16, __m256& a, __m256& b) {
  a = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(bytes16));
  b = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(bytes16, 8)));
}

inline void widen_i8(__m128i bytes16, __m256& a, __m256& b) {
  a = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes16));
  b = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(bytes16, 8)));
}

// Weights 32g..32g+31 of a row of blocks as four vectors, in order.
template <int Type>
inline void dequantize_group(const uint8_t* row, int64_t g, __m256 v[4]) {
  constexpr int64_t groups = block_elems(Type) / kGroup;
  const uint8_t* b = row + (g / groups) * block_bytes(Type);
  const int j = static_cast<int>(g % groups);
  const __m128i low4 = _mm_set1_epi8(0x0F);
  if constexpr (Type == kQ8_0) {
    const __m256 d = _mm256_set1_ps(half_to_float(b));
    widen_i8(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 2)), v[0], v[1]);
    widen_i8(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 18)), v[2], v[3]);
    for (int i = 0; i < 4; ++i) v[i] = _mm256_mul_ps(d, v[i]);
  } else if constexpr (Type == kQ4_0 || Type == kQ4_1) {
    // Low nibbles are elements 0-15, high nibbles 16-31.
    const __m256 d = _mm256_set1_ps(half_to_float(b));
    const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b + (Type == kQ4_1 ? 4 : 2)));
    const __m128i halves[2] = {_mm_and_si128(bytes, low4), _mm_and_si128(_mm_srli_epi16(bytes, 4), low4)};
    for (int h = 0; h < 2; ++h) {
      if constexpr (Type == kQ4_0) {
        // q - 8 in integers, so that the float work is the one multiply the reference does.
        widen_i8(_mm_sub_epi8(halves[h], _mm_set1_epi8(8)), v[2 * h], v[2 * h + 1]);
      } else {
        widen_u8(halves[h], v[2 * h], v[2 * h + 1]);
      }
    }
    for (int i = 0; i < 4; ++i) {
      if constexpr (Type == kQ4_0) {
        v[i] = _mm256_mul_ps(d, v[i]);
      } else {
        v[i] = _mm256_fmadd_ps(d, v[i], _mm256_set1_ps(half_to_float(b + 2)));
      }
    }
  } else {  // kQ4_K
    // Sub-block j: the low (j even) or high (j odd) nibbles of bytes 32 * (j / 2) .. +32.
    int scale, min;
    q4k_scale_min(b + 4, j, scale, min);
    const __m256 ds = _mm256_set1_ps(half_to_float(b) * static_cast<float>(scale));
    const __m256 neg_dm = _mm256_set1_ps(-(half_to_float(b + 2) * static_cast<float>(min)));
    const uint8_t* qs = b + 16 + (j / 2) * 32;
    for (int h = 0; h < 2; ++h) {
      __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs + 16 * h));
      if (j & 1) bytes = _mm_srli_epi16(bytes, 4);
      widen_u8(_mm_and_si128(bytes, low4), v[2 * h], v[2 * h + 1]);
    }
    for (int i = 0; i < 4; ++i) v[i] = _mm256_fmadd_ps(ds, v[i], neg_dm);
  }
}

template <int Type>
inline void dequantize_group(const uint8_t* row, int64_t g, float* dst) {
  __m256 v[4];
  dequantize_group<Type>(row, g, v);
  for (int i = 0; i < 4; ++i) _mm256_storeu_ps(dst + 8 * i, v[i]);
}
#else
// Weights 32g..32g+31 of a row of blocks, written to dst (the same formulas as the vector form).
template <int Type>
void dequantize_group(const uint8_t* row, int64_t g, float* dst) {
  constexpr int64_t groups = block_elems(Type) / kGroup;
  const uint8_t* b = row + (g / groups) * block_bytes(Type);
  const int j = static_cast<int>(g % groups);
  if constexpr (Type == kQ8_0) {
    const float d = half_to_float(b);
    for (int i = 0; i < 32; ++i) dst[i] = d * static_cast<float>(static_cast<int8_t>(b[2 + i]));
  } else if constexpr (Type == kQ4_0 || Type == kQ4_1) {
    const float d = half_to_float(b);
    const uint8_t* qs = b + (Type == kQ4_1 ? 4 : 2);
    const float m = Type == kQ4_1 ? half_to_float(b + 2) : 0.f;
    const int shift = Type == kQ4_0 ? 8 : 0;
    for (int i = 0; i < 16; ++i) {
      dst[i] = d * static_cast<float>((qs[i] & 0x0F) - shift) + m;
      dst[i + 16] = d * static_cast<float>((qs[i] >> 4) - shift) + m;
    }
  } else {  // kQ4_K
    int scale, min;
    q4k_scale_min(b + 4, j, scale, min);
    const float ds = half_to_float(b) * static_cast<float>(scale);
    const float dm = half_to_float(b + 2) * static_cast<float>(min);
    const uint8_t* qs = b + 16 + (j / 2) * 32;
    for (int i = 0; i < 32; ++i) dst[i] = ds * static_cast<float>((j & 1 ? qs[i] >> 4 : qs[i]) & 0x0F) - dm;
  }
}
#endif

template <int Type>
void dequantize_row(const uint8_t* row, int64_t k, float* dst) {
  for (int64_t g = 0; g < k / kGroup; ++g) dequantize_group<Type>(row, g, dst + g * kGroup);
}

#ifdef TW_AVX2
// The sums of each of four vectors: [sum(a0), sum(a1), sum(a2), sum(a3)].
inline __m128 sum4(__m256 a0, __m256 a1, __m256 a2, __m256 a3) {
  const __m256 t = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
  return _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
}

// out[m, 0..rows) = x[m] . w[r] for MR rows of x and the tile's kTileRows weight rows (w: the
// dequantized tile, rows of length k; rows past `rows` are zeros and not stored).
template <int MR>
inline void tile_dot(const float* x, int64_t x_stride, const float* w, int64_t k, float* out, int64_t out_stride,
                     int rows) {
  __m256 acc[MR][kTileRows];
  for (int m = 0; m < MR; ++m)
    for (int r = 0; r < kTileRows; ++r) acc[m][r] = _mm256_setzero_ps();
  for (int64_t i = 0; i < k; i += 8) {
    for (int m = 0; m < MR; ++m) {
      const __m256 xv = _mm256_loadu_ps(x + m * x_stride + i);
      for (int r = 0; r < kTileRows; ++r) acc[m][r] = _mm256_fmadd_ps(xv, _mm256_loadu_ps(w + r * k + i), acc[m][r]);
    }
  }
  for (int m = 0; m < MR; ++m) {
    alignas(16) float sums[kTileRows];
    _mm_store_ps(sums, sum4(acc[m][0], acc[m][1], acc[m][2], acc[m][3]));
    for (int r = 0; r < rows; ++r) out[m * out_stride + r] = sums[r];
  }
}

// tile_dot<MR> (MR <= 3) for a full tile straight from the blocks, without the dequantized copy:
// a few rows of x (a decode step alone, or of a few sequences) do too little arithmetic per weight
// to pay for storing and reloading it. The same products summed in the same order as tile_dot, so
// the result is bit for bit the same.
template <int Type, int MR>
inline void tile_dot_blocks(const float* x, int64_t x_stride, const uint8_t* w, int64_t row_bytes, int64_t k,
                            float* out, int64_t out_stride) {
  static_assert(MR >= 1 && MR <= 3, "12 accumulators and 4 weight vectors fill the 16 registers");
  const __m256 z = _mm256_setzero_ps();
  __m256 a00 = z, a01 = z, a02 = z, a03 = z, a10 = z, a11 = z, a12 = z, a13 = z, a20 = z, a21 = z, a22 = z, a23 = z;
  __m256 v[4];
  for (int64_t g = 0; g < k / kGroup; ++g) {
    const float* xb = x + g * kGroup;
#define TW_ROW_BLOCK(r)                                                                                       \
  dequantize_group<Type>(w + r * row_bytes, g, v);                                                           \
  for (int i = 0; i < 4; ++i) {                                                                              \
    a0##r = _mm256_fmadd_ps(_mm256_loadu_ps(xb + 8 * i), v[i], a0##r);                                       \
    if constexpr (MR > 1) a1##r = _mm256_fmadd_ps(_mm256_loadu_ps(xb + x_stride + 8 * i), v[i], a1##r);      \
    if constexpr (MR > 2) a2##r = _mm256_fmadd_ps(_mm256_loadu_ps(xb + 2 * x_stride + 8 * i), v[i], a2##r);  \
  }
    TW_ROW_BLOCK(0)
    TW_ROW_BLOCK(1)
    TW_ROW_BLOCK(2)
    TW_ROW_BLOCK(3)
#undef TW_ROW_BLOCK
  }
  _mm_storeu_ps(out, sum4(a00, a01, a02, a03));
  if constexpr (MR > 1) _mm_storeu_ps(out + out_stride, sum4(a10, a11, a12, a13));
  if constexpr (MR > 2) _mm_storeu_ps(out + 2 * out_stride, sum4(a20, a21, a22, a23));
}
#else
template <int MR>
inline void tile_dot(const float* x, int64_t x_stride, const float* w, int64_t k, float* out, int64_t out_stride,
                     int rows) {
  for (int m = 0; m < MR; ++m) {
    for (int r = 0; r < rows; ++r) {
      float sum = 0.f;
#pragma omp simd reduction(+ : sum)
      for (int64_t i = 0; i < k; ++i) sum += x[m * x_stride + i] * w[r * k + i];
      out[m * out_stride + r] = sum;
    }
  }
}
#endif

// Rows of x per micro-tile: 3 x 4 accumulators fill 12 of AVX2's 16 registers.
constexpr int kXRows = 3;
// Up to this many rows of x, tiles are multiplied straight from the blocks (tile_dot_blocks).
constexpr int64_t kBlockRows = 3;
// Rows of x multiplied by a tile while it is dequantized: about 256 KB of x, so that it stays in
// L2, and at least 24 rows, so that dequantizing stays a small part of the work. Chunks are of
// equal size, so that 64 rows are one chunk rather than 63 and 1.
int64_t chunk_rows(int64_t m_rows, int64_t k) {
  int64_t target = (256 * 1024) / (4 * k);
  target = target < 24 ? 24 : (target > 96 ? 96 : target);
  const int64_t chunks = (m_rows + target - 1) / target;
  const int64_t rows = (m_rows + chunks - 1) / chunks;
  return (rows + kXRows - 1) / kXRows * kXRows;
}

template <int Type>
void linear(const float* x, int64_t x_stride, int64_t m_rows, int64_t k, const uint8_t* w, int64_t row_bytes,
            int64_t n, float* out, int64_t out_stride, int num_threads) {
  const int64_t tiles = (n + kTileRows - 1) / kTileRows;
#pragma omp parallel num_threads(num_threads) if (tiles > 1)
  {
    // NOTE: one zeroed tile per thread and call: the rows past n in the last tile stay zero.
    std::vector<float> tile(kTileRows * k, 0.f);
    const int64_t chunk = chunk_rows(m_rows, k);
    for (int64_t m0 = 0; m0 < m_rows; m0 += chunk) {
      const int64_t m1 = m0 + chunk < m_rows ? m0 + chunk : m_rows;
#pragma omp for schedule(static)
      for (int64_t t = 0; t < tiles; ++t) {
        const int64_t n0 = t * kTileRows;
        const int rows = static_cast<int>(n - n0 < kTileRows ? n - n0 : kTileRows);
#ifdef TW_AVX2
        if (m1 - m0 <= kBlockRows && rows == kTileRows) {
          const float* xm = x + m0 * x_stride;
          const uint8_t* wt = w + n0 * row_bytes;
          float* o = out + m0 * out_stride + n0;
          if (m1 - m0 == 1) tile_dot_blocks<Type, 1>(xm, x_stride, wt, row_bytes, k, o, out_stride);
          if (m1 - m0 == 2) tile_dot_blocks<Type, 2>(xm, x_stride, wt, row_bytes, k, o, out_stride);
          if (m1 - m0 == 3) tile_dot_blocks<Type, 3>(xm, x_stride, wt, row_bytes, k, o, out_stride);
          continue;
        }
#endif
        for (int r = 0; r < rows; ++r) dequantize_row<Type>(w + (n0 + r) * row_bytes, k, tile.data() + r * k);
        int64_t m = m0;
        for (; m + kXRows <= m1; m += kXRows)
          tile_dot<kXRows>(x + m * x_stride, x_stride, tile.data(), k, out + m * out_stride + n0, out_stride, rows);
        for (; m < m1; ++m) tile_dot<1>(x + m * x_stride, x_stride, tile.data(), k, out + m * out_stride + n0, out_stride, rows);
      }
    }
  }
}

}  // namespace

extern "C" {

// Bytes of one row of k weights of a type, or 0 for a type this file does not handle or a k that
// is not a whole number of its blocks.
int64_t tw_quant_row_bytes(int type, int64_t k) {
  const int64_t bytes = block_bytes(type);
  return bytes == 0 || k <= 0 || k % block_elems(type) != 0 ? 0 : k / block_elems(type) * bytes;
}

// Returns 0 on success, 1 for an unhandled type, 2 for a K that is not a whole number of blocks
// or a row size that does not match K.
int tw_quant_linear(int type, const float* x, int64_t x_stride, int64_t m_rows, int64_t k, const void* w,
                    int64_t row_bytes, int64_t n, float* out, int64_t out_stride, int num_threads) {
  if (block_bytes(type) == 0) return 1;
  if (tw_quant_row_bytes(type, k) == 0 || row_bytes != tw_quant_row_bytes(type, k)) return 2;
  if (m_rows <= 0 || n <= 0) return 0;
  const uint8_t* blocks = static_cast<const uint8_t*>(w);
  switch (type) {
    case kQ4_0:
      linear<kQ4_0>(x, x_stride, m_rows, k, blocks, row_bytes, n, out, out_stride, num_threads);
      break;
    case kQ4_1:
      linear<kQ4_1>(x, x_stride, m_rows, k, blocks, row_bytes, n, out, out_stride, num_threads);
      break;
    case kQ8_0:
      linear<kQ8_0>(x, x_stride, m_rows, k, blocks, row_bytes, n, out, out_stride, num_threads);
      break;
    default:
      linear<kQ4_K>(x, x_stride, m_rows, k, blocks, row_bytes, n, out, out_stride, num_threads);
  }
  return 0;
}

}  // extern "C"

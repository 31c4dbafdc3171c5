// y = x @ W.T for float32 activations and a weight kept in its GGUF block-quantized form (Q4_0,
// Q4_1, Q8_0), dequantized on the fly. Decoding reads every weight once per step for a handful of
// rows, so the step is bound by memory traffic: a Q4_1 weight is 5 bits instead of float32's 32.
//
// Exactness: each weight is dequantized to the float32 value gguf's reference dequantizer gives
// (d * q is exact in float32 for a float16 d and a 4- or 8-bit q, so one rounding of d * q + m, fused
// or not, is the reference's), and products are summed in float32. The result is F.linear on the
// dequantized matrix up to summation order, like any other float32 matmul.
//
// Layouts: x [M, K] row stride x_stride; w [N, row_bytes] (row n: K / 32 blocks of output feature
// n, as GGUF stores them); out [M, N] row stride out_stride. K is a multiple of 32.

#include <cstdint>
#include <cstring>
#include <vector>

#include "common.h"

namespace {

// ggml's type ids, as GGUF files and gguf.GGMLQuantizationType number them.
constexpr int kQ4_0 = 2;
constexpr int kQ4_1 = 3;
constexpr int kQ8_0 = 8;
constexpr int64_t kBlock = 32;
// Weight rows dequantized together; every row of x is multiplied by them while they are in cache.
constexpr int kTileRows = 4;

int64_t block_bytes(int type) {
  switch (type) {
    case kQ4_0: return 18;  // float16 d, 16 bytes of nibbles: w = d * (q - 8)
    case kQ4_1: return 20;  // float16 d, float16 m, 16 bytes of nibbles: w = d * q + m
    case kQ8_0: return 34;  // float16 d, 32 int8: w = d * q
    default: return 0;
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
// The 32 weights of one block as four vectors, in order (low nibbles are elements 0-15, high
// nibbles 16-31).
template <int Type>
inline void dequantize_block(const uint8_t* b, __m256 v[4]) {
  const __m256 d = _mm256_set1_ps(half_to_float(b));
  if constexpr (Type == kQ8_0) {
    for (int i = 0; i < 4; ++i) {
      const __m128i q8 = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(b + 2 + 8 * i));
      v[i] = _mm256_mul_ps(d, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q8)));
    }
  } else {
    const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b + (Type == kQ4_1 ? 4 : 2)));
    const __m128i mask = _mm_set1_epi8(0x0F);
    const __m128i halves[2] = {_mm_and_si128(bytes, mask), _mm_and_si128(_mm_srli_epi16(bytes, 4), mask)};
    for (int h = 0; h < 2; ++h) {
      for (int i = 0; i < 2; ++i) {
        __m256i q = _mm256_cvtepu8_epi32(i ? _mm_srli_si128(halves[h], 8) : halves[h]);
        if constexpr (Type == kQ4_0) {
          q = _mm256_sub_epi32(q, _mm256_set1_epi32(8));
          v[2 * h + i] = _mm256_mul_ps(d, _mm256_cvtepi32_ps(q));
        } else {
          v[2 * h + i] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(q), _mm256_set1_ps(half_to_float(b + 2)));
        }
      }
    }
  }
}

template <int Type>
inline void dequantize_block(const uint8_t* b, float* dst) {
  __m256 v[4];
  dequantize_block<Type>(b, v);
  for (int i = 0; i < 4; ++i) _mm256_storeu_ps(dst + 8 * i, v[i]);
}
#else
// Writes the 32 weights of one block to dst (low nibbles are elements 0-15, high nibbles 16-31).
template <int Type>
void dequantize_block(const uint8_t* b, float* dst) {
  const float d = half_to_float(b);
  if constexpr (Type == kQ8_0) {
    for (int i = 0; i < 32; ++i) dst[i] = d * static_cast<float>(static_cast<int8_t>(b[2 + i]));
  } else {
    const uint8_t* qs = b + (Type == kQ4_1 ? 4 : 2);
    const float m = Type == kQ4_1 ? half_to_float(b + 2) : 0.f;
    const int shift = Type == kQ4_0 ? 8 : 0;
    for (int i = 0; i < 16; ++i) {
      dst[i] = d * static_cast<float>((qs[i] & 0x0F) - shift) + m;
      dst[i + 16] = d * static_cast<float>((qs[i] >> 4) - shift) + m;
    }
  }
}
#endif

template <int Type>
void dequantize_row(const uint8_t* row, int64_t k, float* dst) {
  const int64_t bytes = block_bytes(Type);
  for (int64_t b = 0; b < k / kBlock; ++b) dequantize_block<Type>(row + b * bytes, dst + b * kBlock);
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
  const int64_t bytes = block_bytes(Type);
  const __m256 z = _mm256_setzero_ps();
  __m256 a00 = z, a01 = z, a02 = z, a03 = z, a10 = z, a11 = z, a12 = z, a13 = z, a20 = z, a21 = z, a22 = z, a23 = z;
  __m256 v[4];
  for (int64_t b = 0; b < k / kBlock; ++b) {
    const float* xb = x + b * kBlock;
    const uint8_t* wb = w + b * bytes;
#define TW_ROW_BLOCK(r)                                                                                       \
  dequantize_block<Type>(wb + r * row_bytes, v);                                                             \
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

// Bytes of one 32-weight block of a type, or 0 for a type this file does not handle.
int64_t tw_quant_block_bytes(int type) { return block_bytes(type); }

// Returns 0 on success, 1 for an unhandled type, 2 for a K that is not a multiple of 32 or a row
// size that does not match K.
int tw_quant_linear(int type, const float* x, int64_t x_stride, int64_t m_rows, int64_t k, const void* w,
                    int64_t row_bytes, int64_t n, float* out, int64_t out_stride, int num_threads) {
  const int64_t bytes = block_bytes(type);
  if (bytes == 0) return 1;
  if (k % kBlock != 0 || row_bytes != k / kBlock * bytes) return 2;
  if (m_rows <= 0 || n <= 0) return 0;
  const uint8_t* blocks = static_cast<const uint8_t*>(w);
  switch (type) {
    case kQ4_0:
      linear<kQ4_0>(x, x_stride, m_rows, k, blocks, row_bytes, n, out, out_stride, num_threads);
      break;
    case kQ4_1:
      linear<kQ4_1>(x, x_stride, m_rows, k, blocks, row_bytes, n, out, out_stride, num_threads);
      break;
    default:
      linear<kQ8_0>(x, x_stride, m_rows, k, blocks, row_bytes, n, out, out_stride, num_threads);
  }
  return 0;
}

}  // extern "C"

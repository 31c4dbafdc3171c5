// y = x @ W.T for float32 activations and a GGUF block-quantized weight (Q4_0, Q4_1, Q8_0, Q4_K,
// Q5_K, Q6_K), repacked once at load into panels that are dequantized on the fly; or a plain
// float weight (F32, F16, BF16: a dense checkpoint's, in the narrowest of them that holds it
// exactly), in the same panels without scales, widened on the fly. Decoding reads every weight
// once per step for a handful of rows, so the step is bound by reading and unpacking weights: a
// packed Q4_1 weight is 6 bits instead of float32's 32 (Q8_0, Q5_K: 10; Q6_K: 12; BF16, F16: 16).
//
// Packed layout (tw_quant_pack): the output features in panels of 16 (the last one padded with
// zero weights); a panel is K / G groups, each holding G consecutive k for its 16 features (G = 32,
// or 16 for Q6_K, whose scales cover 16 weights):
//   float scale[16], float offset[16], then the quants k-major: for each of the G k, the 16
//   features' quants (4-bit types: 8 bytes, byte j = (feature j) | (feature j + 8) << 4; Q8_0,
//   Q5_K and Q6_K: 16 int8); for the float types, the values alone, k-major (16 a k).
// Weight (n, k) is fma(scale[n], q, offset[n]) for its group, or the float value widened (exact).
// k-major quants let a vector hold eight features at one k, so a row of x is a broadcast and each
// product goes straight into an output's accumulator: no horizontal sums, and any number of rows
// of x share one unpacking.
//
// Exactness: scale * q is exact in float32 for every type here (a float16 d times a 4- or 8-bit q,
// d times a 6-bit sub-block scale times a 4- or 5-bit q, or d times an int8 scale times a 6-bit
// q), so the one rounding of the fused multiply-add is the reference's (d * (q - 8) = fma(d, q,
// -8d); d * q + m; d * sc * q - dmin * m; d * sc * (q - 32), which rounds nowhere):
// each weight is the float32 value gguf's dequantizer gives. Every path sums an output's K
// products in the order k = 0, 1, ..., one fused multiply-add each, so a row gives the same bits
// alone and in any batch, and differs from F.linear on the dequantized matrix only by summation
// order, like any other float32 matmul.
//
// Layouts: x [M, K] row stride x_stride; blocks [N, row_bytes] as GGUF stores them (row n: the
// blocks of output feature n); out [M, N] row stride out_stride. K is a multiple of the type's
// block (32 weights, or 256 for the K-quants).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "common.h"

// Every loop of this file starts on a 64-byte boundary. Where a k loop landed otherwise depended on
// whatever code the library linked before it, and that alone moved the same matmul by up to 10%
// either way between builds (the 6-row loop is 128 bytes: aligned, it spans two 64-byte fetch
// windows, else three). With the hidden row pointers of panel_unpacked, measured alternating
// over the default model's 120 layer matmuls, built as the engine builds the library: 1.00-1.05x
// at 12-32 rows, 1.04-1.11x at 64 and 256, unchanged at 1-6.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("align-loops=64")
#endif

namespace {

// ggml's type ids, as GGUF files and gguf.GGMLQuantizationType number them.
constexpr int kF32 = 0;
constexpr int kF16 = 1;
constexpr int kBF16 = 30;
constexpr int kQ4_0 = 2;
constexpr int kQ4_1 = 3;
constexpr int kQ8_0 = 8;
constexpr int kQ4_K = 12;
constexpr int kQ5_K = 13;
constexpr int kQ6_K = 14;
// Output features per panel: two vectors of eight.
constexpr int kPanel = 16;
// Consecutive k that share one scale and offset per feature: 32, or 16 for Q6_K.
constexpr int kMaxGroup = 32;

// NOTE: float weights have no blocks; they take K in runs of 32, as a group of the panels.
constexpr int64_t block_elems(int type) { return type == kQ4_K || type == kQ5_K || type == kQ6_K ? 256 : 32; }

constexpr int64_t block_bytes(int type) {
  switch (type) {
    case kQ4_0: return 18;   // float16 d, 16 bytes of nibbles: w = d * (q - 8)
    case kQ4_1: return 20;   // float16 d, float16 m, 16 bytes of nibbles: w = d * q + m
    case kQ8_0: return 34;   // float16 d, 32 int8: w = d * q
    case kQ4_K: return 144;  // float16 d, dmin, 12 bytes of 6-bit scales and mins, 128 of nibbles
    case kQ5_K: return 176;  // as Q4_K, with 32 bytes of fifth bits between the scales and the nibbles
    case kQ6_K: return 210;  // 128 bytes of low nibbles, 64 of high 2-bit pairs, 16 int8 scales, float16 d
    case kF32: return 128;   // 32 float32
    case kF16: return 64;    // 32 float16
    case kBF16: return 64;   // 32 bfloat16
    default: return 0;
  }
}

// A panel's storage format, the kernels' template parameter: quants of 4 or 8 bits with a float32
// scale and offset per feature and group, or plain float32, float16 or bfloat16 values.
constexpr int kNibbles = 4;
constexpr int kInt8 = 8;
constexpr int kFloat32s = 32;
constexpr int kFloat16s = 16;
constexpr int kBFloat16s = 17;
constexpr bool is_float_format(int fmt) { return fmt >= kFloat16s; }

// NOTE: Q5_K's and Q6_K's quants (0-31, 0-63) take the 8-bit form, which unpacks as Q8_0's does
// (one widening per eight weights); their split high bits are put together once, at load.
constexpr int quant_format(int type) {
  switch (type) {
    case kQ4_0: case kQ4_1: case kQ4_K: return kNibbles;
    case kF32: return kFloat32s;
    case kF16: return kFloat16s;
    case kBF16: return kBFloat16s;
    default: return kInt8;
  }
}
constexpr int group_size(int type) { return type == kQ6_K ? 16 : 32; }
// Bytes of one group of a panel: scales, offsets and quants; or the float values alone.
constexpr int64_t group_bytes(int fmt, int group) {
  return fmt == kFloat32s ? group * kPanel * 4
         : is_float_format(fmt) ? group * kPanel * 2
                                : 2 * kPanel * 4 + group * kPanel * fmt / 8;
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

// The half-precision number stored (little-endian, unaligned) at p, as GGUF stores its scales.
float half_at(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, sizeof h);
  return tw::half_to_float(h);
}

// Group g (weights Gg..Gg+G-1, G = group_size(type)) of a GGUF row: its scale, offset and quants,
// so that weight i is fma(scale, q[i], offset).
void read_group(int type, const uint8_t* row, int64_t g, float& scale, float& offset, int q[kMaxGroup]) {
  const int64_t groups = block_elems(type) / group_size(type);
  const uint8_t* b = row + (g / groups) * block_bytes(type);
  if (type == kQ8_0) {
    scale = half_at(b);
    offset = 0.f;
    for (int i = 0; i < 32; ++i) q[i] = static_cast<int8_t>(b[2 + i]);
  } else if (type == kQ4_0 || type == kQ4_1) {
    // Low nibbles are elements 0-15, high nibbles 16-31.
    scale = half_at(b);
    offset = type == kQ4_0 ? -8.f * scale : half_at(b + 2);
    const uint8_t* qs = b + (type == kQ4_1 ? 4 : 2);
    for (int i = 0; i < 16; ++i) {
      q[i] = qs[i] & 0x0F;
      q[i + 16] = qs[i] >> 4;
    }
  } else if (type == kQ6_K) {
    // Group j of 16 (0-15): half h = j / 8 of the block, quarter s = (j % 8) / 2 of that half, its
    // first or second 16 weights; the low 4 bits come from a nibble of ql, the high 2 from qh.
    const int j = static_cast<int>(g % groups), h = j / 8, s = (j % 8) / 2, l0 = (j % 2) * 16;
    const uint8_t* ql = b + 64 * h + (s & 1) * 32;
    const uint8_t* qh = b + 128 + 32 * h;
    scale = half_at(b + 208) * static_cast<float>(static_cast<int8_t>(b[192 + 8 * h + 2 * s + j % 2]));
    offset = -32.f * scale;
    for (int i = 0; i < 16; ++i) {
      const int l = l0 + i;
      q[i] = ((s < 2 ? ql[l] : ql[l] >> 4) & 0x0F) | (((qh[l] >> (2 * s)) & 3) << 4);
    }
  } else {  // kQ4_K, kQ5_K: sub-block j is the low (j even) or high (j odd) nibbles of bytes 32 * (j / 2) .. +32
    const int j = static_cast<int>(g % groups);
    int sc, mn;
    q4k_scale_min(b + 4, j, sc, mn);
    scale = half_at(b) * static_cast<float>(sc);
    offset = -(half_at(b + 2) * static_cast<float>(mn));
    const uint8_t* qh = b + 16;  // Q5_K: bit j of byte i is the fifth bit of weight i of sub-block j
    const uint8_t* qs = b + (type == kQ5_K ? 48 : 16) + (j / 2) * 32;
    for (int i = 0; i < 32; ++i) {
      q[i] = (j & 1 ? qs[i] >> 4 : qs[i]) & 0x0F;
      if (type == kQ5_K) q[i] |= ((qh[i] >> j) & 1) << 4;
    }
  }
}

// Value i of a float format's group (or GGUF row), as float32: exact for each format.
template <int Fmt>
inline float float_weight(const uint8_t* values, int64_t i) {
  if constexpr (Fmt == kFloat32s) {
    float f;
    std::memcpy(&f, values + 4 * i, 4);
    return f;
  } else {
    uint16_t h;
    std::memcpy(&h, values + 2 * i, 2);
    return Fmt == kFloat16s ? tw::half_to_float(h) : tw::to_float(h);
  }
}

#ifdef TW_AVX2
// One group of a panel: its features' scales and offsets in registers, and its quants.
template <int Fmt>
struct Group {
  __m256 s0, s1, o0, o1;
  const uint8_t* quants;

  // Features 0-7 and 8-15 at the group's k index kk.
  inline void unpack(int64_t kk, __m256& w0, __m256& w1) const {
    if constexpr (is_float_format(Fmt)) {  // the values, widened as the attention kernels widen theirs
      using T = std::conditional_t<Fmt == kFloat32s, float, std::conditional_t<Fmt == kFloat16s, tw::Half, uint16_t>>;
      const T* w = reinterpret_cast<const T*>(quants) + kPanel * kk;
      w0 = tw::load8(w);
      w1 = tw::load8(w + 8);
    } else if constexpr (Fmt == kNibbles) {
      // NOTE: the eight bytes widen to 32 bits straight from memory, both nibbles in each lane, so
      // the high nibble is a shift with nothing to mask; and the int8 quants below widen from two
      // 8-byte loads rather than a byte shift of one. Fewer vector instructions per weight, the
      // same values: decoding one request, 1.17-1.22x a step (alternating in one process), 1.02-1.03x
      // at 32 rows, where more rows share each unpacked weight.
      const __m256i both = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(quants + 8 * kk)));
      const __m256i lo = _mm256_and_si256(both, _mm256_set1_epi32(0x0F)), hi = _mm256_srli_epi32(both, 4);
      w0 = _mm256_fmadd_ps(s0, _mm256_cvtepi32_ps(lo), o0);
      w1 = _mm256_fmadd_ps(s1, _mm256_cvtepi32_ps(hi), o1);
    } else {
      const uint8_t* q = quants + 16 * kk;
      const __m128i q0 = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(q));
      const __m128i q1 = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + 8));
      w0 = _mm256_fmadd_ps(s0, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q0)), o0);
      w1 = _mm256_fmadd_ps(s1, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q1)), o1);
    }
  }
};

template <int Fmt, int G>
inline Group<Fmt> load_group(const uint8_t* panel, int64_t g) {
  const uint8_t* group = panel + g * group_bytes(Fmt, G);
  if constexpr (is_float_format(Fmt)) {
    const __m256 unused = _mm256_setzero_ps();
    return {unused, unused, unused, unused, group};
  }
  const float* so = reinterpret_cast<const float*>(group);
  return {_mm256_loadu_ps(so), _mm256_loadu_ps(so + 8), _mm256_loadu_ps(so + 16), _mm256_loadu_ps(so + 24),
          group + 2 * kPanel * 4};
}

// NOTE: accumulators are named variables: GCC keeps an array of __m256 in memory and stores it on
// every iteration of the k loop.
#define TW_ROWS(F) F(0) F(1) F(2) F(3) F(4) F(5)
#define TW_ZERO_ACC                                                                                           \
  const __m256 zero = _mm256_setzero_ps();                                                                    \
  __m256 c00 = zero, c01 = zero, c10 = zero, c11 = zero, c20 = zero, c21 = zero, c30 = zero, c31 = zero, c40 = zero, \
         c41 = zero, c50 = zero, c51 = zero;
// The tile's rows of x (the unused ones at row 0).
#define TW_ROW_POINTERS                                                                                       \
  const float* x0 = x;                                                                                        \
  const float* x1 = x + (MR > 1 ? x_stride : 0);                                                              \
  const float* x2 = x + (MR > 2 ? 2 * x_stride : 0);                                                          \
  const float* x3 = x + (MR > 3 ? 3 * x_stride : 0);                                                          \
  const float* x4 = x + (MR > 4 ? 4 * x_stride : 0);                                                          \
  const float* x5 = x + (MR > 5 ? 5 * x_stride : 0);
// Row m's accumulators += x[m, kx] * (w0, w1).
#define TW_FMA_ROW(m)                                                                                         \
  if constexpr (MR > m) {                                                                                     \
    const __m256 a = _mm256_broadcast_ss(x##m + kx);                                                          \
    c##m##0 = _mm256_fmadd_ps(a, w0, c##m##0);                                                                \
    c##m##1 = _mm256_fmadd_ps(a, w1, c##m##1);                                                                \
  }
#define TW_STORE_ROW(m)                                                                                       \
  if constexpr (MR > m) {                                                                                     \
    _mm256_storeu_ps(out + m * out_stride, c##m##0);                                                          \
    _mm256_storeu_ps(out + m * out_stride + 8, c##m##1);                                                      \
  }

// out[MR rows, 16] = x[MR rows] @ panel, unpacking each weight in registers and using it at once:
// for a few rows of x, storing the unpacked panel and reading it back costs more than it saves.
template <int Fmt, int G, int MR>
void panel_direct(const float* x, int64_t x_stride, const uint8_t* panel, int64_t k, float* out, int64_t out_stride) {
  TW_ZERO_ACC
  TW_ROW_POINTERS
  for (int64_t g = 0; g < k / G; ++g) {
    const Group<Fmt> group = load_group<Fmt, G>(panel, g);
    for (int64_t kk = 0; kk < G; ++kk) {
      __m256 w0, w1;
      group.unpack(kk, w0, w1);
      const int64_t kx = g * G + kk;
      TW_ROWS(TW_FMA_ROW)
    }
  }
  TW_ROWS(TW_STORE_ROW)
}

// Weights k0..k1 of a panel as float32, [k][16] (k0 and k1 multiples of G).
template <int Fmt, int G>
void unpack_panel(const uint8_t* panel, int64_t k0, int64_t k1, float* dst) {
  for (int64_t g = k0 / G; g < k1 / G; ++g) {
    const Group<Fmt> group = load_group<Fmt, G>(panel, g);
    float* d = dst + (g * G - k0) * kPanel;
    for (int64_t kk = 0; kk < G; ++kk) {
      __m256 w0, w1;
      group.unpack(kk, w0, w1);
      _mm256_store_ps(d + kk * kPanel, w0);
      _mm256_store_ps(d + kk * kPanel + 8, w1);
    }
  }
}

// out[MR rows, 16] = (first ? 0 : out) + x[MR rows, kc] @ w[kc][16] (an unpacked panel).
template <int MR>
void panel_unpacked(const float* x, int64_t x_stride, const float* w, int64_t kc, float* out, int64_t out_stride,
                    bool first) {
  TW_ZERO_ACC
#define TW_LOAD_ROW(m)                                                                                        \
  if (MR > m && !first) {                                                                                     \
    c##m##0 = _mm256_loadu_ps(out + m * out_stride);                                                          \
    c##m##1 = _mm256_loadu_ps(out + m * out_stride + 8);                                                      \
  }
  TW_ROWS(TW_LOAD_ROW)
#undef TW_LOAD_ROW
  TW_ROW_POINTERS
  // NOTE: the six base pointers are hidden from the optimizer by an empty asm: left to itself, GCC
  // derives rows 3-5 from the stride inside the k loop, two more instructions a step (the 6-row
  // loop: 27 instructions in 133 bytes, against 25 in 128). The arithmetic is the same
  // instructions in the same order, so the same bits. (The direct path, whose loop also unpacks,
  // keeps the compiler's choice: there the asm cost registers and 6% at 4 rows.)
  asm("" : "+r"(x0), "+r"(x1), "+r"(x2), "+r"(x3), "+r"(x4), "+r"(x5));
  for (int64_t kx = 0; kx < kc; ++kx) {
    const __m256 w0 = _mm256_load_ps(w + kx * kPanel), w1 = _mm256_load_ps(w + kx * kPanel + 8);
    TW_ROWS(TW_FMA_ROW)
  }
  TW_ROWS(TW_STORE_ROW)
}
#undef TW_ROWS
#undef TW_ZERO_ACC
#undef TW_FMA_ROW
#undef TW_ROW_POINTERS
#undef TW_STORE_ROW

// Rows of x per micro-tile: 6 x 2 accumulators, two weight vectors and a broadcast fill 15 of
// AVX2's 16 registers.
constexpr int kTileRows = 6;
// Up to this many rows of x, panels are multiplied straight from their quants (panel_direct).
// Measured over the default model's matmuls on a 2-core AVX2 EPYC: at 4-6 rows 1.2-1.4x the
// unpacked path, at 12 rows 0.8x.
constexpr int64_t kDirectRows = 6;
// k per unpacked chunk: 36 KB of float32, about L1; the default model's K = 576 is one chunk.
constexpr int64_t kChunkK = 576;
// Rows of x per pass over the panels (each pass unpacks every panel again): at most about the L2
// cache's 512 KB (227 rows of K = 576), in passes of equal size, so that 240 rows are two passes
// of 120 rather than 227 and 13.
constexpr int64_t kChunkBytes = 512 * 1024;

// out[rows, 16] for rows <= kDirectRows, straight from the quants.
template <int Fmt, int G>
void direct(const float* x, int64_t x_stride, int64_t rows, const uint8_t* panel, int64_t k, float* out,
            int64_t out_stride) {
  switch (rows) {
    case 1: panel_direct<Fmt, G, 1>(x, x_stride, panel, k, out, out_stride); break;
    case 2: panel_direct<Fmt, G, 2>(x, x_stride, panel, k, out, out_stride); break;
    case 3: panel_direct<Fmt, G, 3>(x, x_stride, panel, k, out, out_stride); break;
    case 4: panel_direct<Fmt, G, 4>(x, x_stride, panel, k, out, out_stride); break;
    case 5: panel_direct<Fmt, G, 5>(x, x_stride, panel, k, out, out_stride); break;
    default: panel_direct<Fmt, G, 6>(x, x_stride, panel, k, out, out_stride); break;
  }
}

// out[rows, 16] (+)= x[rows, kc] @ w for any number of rows, in tiles of at most kTileRows.
//
// Where every tile can have 5 or 6 rows, the rows are spread evenly over the tiles (32 rows: 6, 6,
// 5, 5, 5, 5 rather than five of 6 and one of 2). A tile of 1-3 rows has too few accumulators to
// cover the FMA latency, so 32 rows took as long as 36. Tiles of 4 rows did no better than the
// short tail (0.92x at 8 rows as 4 + 4, 0.96x at 32 with a 4 + 4 tail), so fewer rows than that
// keep the short tile. The split changes no sum: each row is its own accumulators, k in order.
// Measured alternating: 1.02-1.04x over the default model's 120 layer matmuls at 26, 32 and 64
// rows (builds with the tile kernel out of line, so that both place its loops alike: where the
// compiler inlines it, where the loops land moved them by up to 10% either way between builds),
// and 1.03-1.04x for the engine's decode steps at 32 rows.
void unpacked(const float* x, int64_t x_stride, int64_t rows, const float* w, int64_t kc, float* out,
              int64_t out_stride, bool first) {
  const int64_t tiles = (rows + kTileRows - 1) / kTileRows;
  const bool even = rows >= 5 * tiles;
  int64_t m = 0;
  for (int64_t t = 0; t < tiles; ++t) {
    const int64_t r = even ? (rows - m + tiles - t - 1) / (tiles - t) : std::min<int64_t>(kTileRows, rows - m);
    const float* xm = x + m * x_stride;
    float* om = out + m * out_stride;
    switch (r) {
      case 1: panel_unpacked<1>(xm, x_stride, w, kc, om, out_stride, first); break;
      case 2: panel_unpacked<2>(xm, x_stride, w, kc, om, out_stride, first); break;
      case 3: panel_unpacked<3>(xm, x_stride, w, kc, om, out_stride, first); break;
      case 4: panel_unpacked<4>(xm, x_stride, w, kc, om, out_stride, first); break;
      case 5: panel_unpacked<5>(xm, x_stride, w, kc, om, out_stride, first); break;
      default: panel_unpacked<kTileRows>(xm, x_stride, w, kc, om, out_stride, first); break;
    }
    m += r;
  }
}

#ifdef TW_AVX512
// The same kernels for AVX-512 (x86-64-v4: Skylake-SP and later, Zen 4), chosen at run time where
// the CPU has it. A panel's 16 features are one 512-bit vector, so a row of a tile is one
// accumulator and its broadcast folds into the multiply-add, and 32 registers hold tiles of up to
// kWideTileRows rows. Each output is still one fused multiply-add per k, k in order, of the same
// unpacked weights: the bits of the AVX2 and portable paths.
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl")
namespace wide {

// One group of a panel, its 16 features' scales and offsets in two registers.
template <int Fmt>
struct Group {
  __m512 s, o;
  const uint8_t* quants;

  // The 16 features' weights at the group's k index kk.
  inline __m512 unpack(int64_t kk) const {
    if constexpr (Fmt == kFloat32s) {
      return _mm512_loadu_ps(reinterpret_cast<const float*>(quants) + kPanel * kk);
    } else if constexpr (Fmt == kFloat16s) {
      return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(quants + 2 * kPanel * kk)));
    } else if constexpr (Fmt == kBFloat16s) {
      const __m256i* values = reinterpret_cast<const __m256i*>(quants + 2 * kPanel * kk);
      return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(values)), 16));
    } else if constexpr (Fmt == kNibbles) {
      // NOTE: the eight bytes go to both halves of the vector; features 0-7 keep the low nibble,
      // 8-15 shift the high one down.
      int64_t bytes;
      std::memcpy(&bytes, quants + 8 * kk, sizeof bytes);
      const __m512i both = _mm512_cvtepu8_epi32(_mm_set1_epi64x(bytes));
      const __m512i shift = _mm512_set_epi32(4, 4, 4, 4, 4, 4, 4, 4, 0, 0, 0, 0, 0, 0, 0, 0);
      const __m512i q = _mm512_and_si512(_mm512_srlv_epi32(both, shift), _mm512_set1_epi32(0x0F));
      return _mm512_fmadd_ps(s, _mm512_cvtepi32_ps(q), o);
    } else {
      const __m512i q = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(quants + kPanel * kk)));
      return _mm512_fmadd_ps(s, _mm512_cvtepi32_ps(q), o);
    }
  }
};

template <int Fmt, int G>
inline Group<Fmt> load_group(const uint8_t* panel, int64_t g) {
  const uint8_t* group = panel + g * group_bytes(Fmt, G);
  if constexpr (is_float_format(Fmt)) return {_mm512_setzero_ps(), _mm512_setzero_ps(), group};
  const float* so = reinterpret_cast<const float*>(group);
  return {_mm512_loadu_ps(so), _mm512_loadu_ps(so + kPanel), group + 2 * kPanel * 4};
}

// Rows per tile: 12 accumulators, the weights and the unpacking's temporaries fit the 32
// registers, and 12 row pointers about fill the general ones. Over the default model's 120 layer
// matmuls on a 2-core Zen 4, tiles of up to 16 rows were 0.94x at 16-256 rows, of up to 8 equal.
constexpr int kWideTileRows = 12;

#define TW_WIDE_ROWS(F) F(0) F(1) F(2) F(3) F(4) F(5) F(6) F(7) F(8) F(9) F(10) F(11)
#define TW_WIDE_ACC(m) __m512 c##m = _mm512_setzero_ps();
#define TW_WIDE_LOAD(m) \
  if (MR > m && !first) c##m = _mm512_loadu_ps(out + m * out_stride);
#define TW_WIDE_PTR(m) const float* x##m = x + (MR > m ? m * x_stride : 0);
#define TW_WIDE_FMA(m) \
  if constexpr (MR > m) c##m = _mm512_fmadd_ps(_mm512_set1_ps(x##m[kx]), w, c##m);
#define TW_WIDE_STORE(m) \
  if constexpr (MR > m) _mm512_storeu_ps(out + m * out_stride, c##m);

// out[MR rows, 16] = (first ? 0 : out) + x[MR rows, k1 - k0] @ the panel's weights k0..k1 (multiples
// of G), unpacking each weight in registers and using it at once: the unpacking's vector work
// overlaps the tile's multiply-adds. With Keep, the weights also go to dst ([k][16]), for the
// chunk's other tiles (panel_unpacked).
template <int Fmt, int G, int MR, bool Keep>
void panel_direct(const float* x, int64_t x_stride, const uint8_t* panel, int64_t k0, int64_t k1, float* dst,
                  float* out, int64_t out_stride, bool first) {
  TW_WIDE_ROWS(TW_WIDE_ACC)
  TW_WIDE_ROWS(TW_WIDE_LOAD)
  TW_WIDE_ROWS(TW_WIDE_PTR)
  for (int64_t g = k0 / G; g < k1 / G; ++g) {
    const Group<Fmt> group = load_group<Fmt, G>(panel, g);
    for (int64_t kk = 0; kk < G; ++kk) {
      const __m512 w = group.unpack(kk);
      const int64_t kx = g * G + kk - k0;
      if constexpr (Keep) _mm512_store_ps(dst + kx * kPanel, w);
      TW_WIDE_ROWS(TW_WIDE_FMA)
    }
  }
  TW_WIDE_ROWS(TW_WIDE_STORE)
}

// out[MR rows, 16] = (first ? 0 : out) + x[MR rows, kc] @ w[kc][16] (an unpacked panel).
template <int MR>
void panel_unpacked(const float* x, int64_t x_stride, const float* w_panel, int64_t kc, float* out, int64_t out_stride,
                    bool first) {
  TW_WIDE_ROWS(TW_WIDE_ACC)
  TW_WIDE_ROWS(TW_WIDE_LOAD)
  TW_WIDE_ROWS(TW_WIDE_PTR)
  for (int64_t kx = 0; kx < kc; ++kx) {
    const __m512 w = _mm512_load_ps(w_panel + kx * kPanel);
    TW_WIDE_ROWS(TW_WIDE_FMA)
  }
  TW_WIDE_ROWS(TW_WIDE_STORE)
}
#undef TW_WIDE_ROWS
#undef TW_WIDE_ACC
#undef TW_WIDE_LOAD
#undef TW_WIDE_PTR
#undef TW_WIDE_FMA
#undef TW_WIDE_STORE

// out[rows, 16] (+)= x[rows, k1 - k0] @ the panel's weights k0..k1 (multiples of G), the rows
// spread evenly over tiles of at most kWideTileRows. Up to one tile, the weights are unpacked in
// registers only; past that, the first tile keeps them in dst (kChunkK x 16, 64-byte aligned) for
// the others. Against unpacking the chunk first and then running every tile over it: 1.10x at 32
// rows, 1.05x at 64 (the default model's layer matmuls, alternating in one process).
template <int Fmt, int G>
void multiply(const float* x, int64_t x_stride, int64_t rows, const uint8_t* panel, int64_t k0, int64_t k1, float* dst,
              float* out, int64_t out_stride, bool first) {
  const int64_t tiles = (rows + kWideTileRows - 1) / kWideTileRows;
  int64_t m = 0;
  for (int64_t t = 0; t < tiles; ++t) {
    const int64_t r = tw::even_share(rows, tiles, t);
    const float* xm = x + m * x_stride;
    float* om = out + m * out_stride;
    if (t == 0) {
      // NOTE: a chunk of one tile keeps nothing (Keep = false), so dst may be null for it.
      switch (r * 2 + (tiles > 1 ? 1 : 0)) {
#define TW_CASE(n)                                                                                                 \
  case 2 * n: panel_direct<Fmt, G, n, false>(xm, x_stride, panel, k0, k1, dst, om, out_stride, first); break;    \
  case 2 * n + 1: panel_direct<Fmt, G, n, true>(xm, x_stride, panel, k0, k1, dst, om, out_stride, first); break;
        TW_CASE(1) TW_CASE(2) TW_CASE(3) TW_CASE(4) TW_CASE(5) TW_CASE(6) TW_CASE(7) TW_CASE(8) TW_CASE(9)
        TW_CASE(10) TW_CASE(11) TW_CASE(12)
#undef TW_CASE
      }
    } else {
      switch (r) {
#define TW_CASE(n) \
  case n: panel_unpacked<n>(xm, x_stride, dst, k1 - k0, om, out_stride, first); break;
        TW_CASE(1) TW_CASE(2) TW_CASE(3) TW_CASE(4) TW_CASE(5) TW_CASE(6) TW_CASE(7) TW_CASE(8) TW_CASE(9)
        TW_CASE(10) TW_CASE(11) TW_CASE(12)
#undef TW_CASE
      }
    }
    m += r;
  }
}

}  // namespace wide
#pragma GCC pop_options
#endif

template <int Fmt, int G>
void linear(const float* x, int64_t x_stride, int64_t m_rows, int64_t k, const uint8_t* packed, int64_t n, float* out,
            int64_t out_stride, int num_threads) {
  const int64_t panels = (n + kPanel - 1) / kPanel;
  const int64_t panel_bytes = k / G * group_bytes(Fmt, G);
  const int64_t most_rows = kChunkBytes / (4 * k) > kTileRows ? kChunkBytes / (4 * k) : kTileRows;
  const int64_t passes = (m_rows + most_rows - 1) / most_rows;
  const int64_t chunk_rows = ((m_rows + passes - 1) / passes + kTileRows - 1) / kTileRows * kTileRows;
#ifdef TW_AVX512
  const bool wide = tw::has_avx512();
  const int64_t direct_rows = wide ? wide::kWideTileRows : kDirectRows;
#else
  const int64_t direct_rows = kDirectRows;
#endif
#pragma omp parallel num_threads(num_threads) if (panels > 1)
  {
    std::vector<float> scratch;  // a partial last panel's 16 columns
    float* unpacked_w = nullptr;
    std::vector<float> unpacked_store;
    if (m_rows > direct_rows) {
      // NOTE: 64-byte aligned for the aligned loads of panel_unpacked.
      unpacked_store.resize(kChunkK * kPanel + 16);
      const uintptr_t addr = reinterpret_cast<uintptr_t>(unpacked_store.data());
      unpacked_w = unpacked_store.data() + ((64 - addr % 64) % 64) / sizeof(float);
    }
    for (int64_t m0 = 0; m0 < m_rows; m0 += chunk_rows) {
      const int64_t rows = m_rows - m0 < chunk_rows ? m_rows - m0 : chunk_rows;
      const float* xm = x + m0 * x_stride;
      const auto panel_task = [&](int64_t p) {
        const uint8_t* panel = packed + p * panel_bytes;
        const int cols = static_cast<int>(n - p * kPanel < kPanel ? n - p * kPanel : kPanel);
        // NOTE: a partial panel is computed into a scratch tile, so that the kernels always store 16 columns.
        float* o = out + m0 * out_stride + p * kPanel;
        int64_t o_stride = out_stride;
        if (cols < kPanel) {
          scratch.assign(rows * kPanel, 0.f);
          o = scratch.data();
          o_stride = kPanel;
        }
#ifdef TW_AVX512
        if (wide && rows <= direct_rows) {
          wide::multiply<Fmt, G>(xm, x_stride, rows, panel, 0, k, nullptr, o, o_stride, true);
        } else if (wide) {
          for (int64_t k0 = 0; k0 < k; k0 += kChunkK) {
            const int64_t k1 = k0 + kChunkK < k ? k0 + kChunkK : k;
            wide::multiply<Fmt, G>(xm + k0, x_stride, rows, panel, k0, k1, unpacked_w, o, o_stride, k0 == 0);
          }
        } else
#endif
        if (rows <= direct_rows) {
          direct<Fmt, G>(xm, x_stride, rows, panel, k, o, o_stride);
        } else {
          for (int64_t k0 = 0; k0 < k; k0 += kChunkK) {
            const int64_t k1 = k0 + kChunkK < k ? k0 + kChunkK : k;
            unpack_panel<Fmt, G>(panel, k0, k1, unpacked_w);
            unpacked(xm + k0, x_stride, rows, unpacked_w, k1 - k0, o, o_stride, k0 == 0);
          }
        }
        if (cols < kPanel)
          for (int64_t m = 0; m < rows; ++m)
            std::memcpy(out + (m0 + m) * out_stride + p * kPanel, o + m * kPanel, sizeof(float) * cols);
      };
      // NOTE: every thread takes the same branch (rows is shared), as a worksharing loop needs.
      // A few rows' panels take microseconds, where handing them out one by one costs more than
      // it balances; past that, guided hands out shrinking runs of panels, so that a thread that
      // started late (woken from sleep) or runs slower (a busy host) is made up for by the
      // others. Measured over the default model's 120 layer matmuls on a 2-core AVX2 EPYC,
      // alternating: 1.03-1.13x at 8-256 rows against the static schedule.
      if (rows <= direct_rows) {
#pragma omp for schedule(static)
        for (int64_t p = 0; p < panels; ++p) panel_task(p);
      } else {
#pragma omp for schedule(guided)
        for (int64_t p = 0; p < panels; ++p) panel_task(p);
      }
    }
  }
}
#else
// The same sums in the same order as the AVX2 path (one fused multiply-add per product, k in
// order), so that both give the same bits.
template <int Fmt, int G>
void linear(const float* x, int64_t x_stride, int64_t m_rows, int64_t k, const uint8_t* packed, int64_t n, float* out,
            int64_t out_stride, int num_threads) {
  const int64_t panels = (n + kPanel - 1) / kPanel;
  const int64_t panel_bytes = k / G * group_bytes(Fmt, G);
#pragma omp parallel for num_threads(num_threads) schedule(static) if (panels > 1)
  for (int64_t p = 0; p < panels; ++p) {
    const uint8_t* panel = packed + p * panel_bytes;
    const int cols = static_cast<int>(n - p * kPanel < kPanel ? n - p * kPanel : kPanel);
    for (int64_t m = 0; m < m_rows; ++m) {
      float acc[kPanel] = {};
      for (int64_t g = 0; g < k / G; ++g) {
        const uint8_t* group = panel + g * group_bytes(Fmt, G);
        if constexpr (is_float_format(Fmt)) {
          for (int64_t kk = 0; kk < G; ++kk) {
            const float a = x[m * x_stride + g * G + kk];
            for (int c = 0; c < kPanel; ++c) acc[c] = std::fma(a, float_weight<Fmt>(group, kk * kPanel + c), acc[c]);
          }
          continue;
        }
        float so[2 * kPanel];
        std::memcpy(so, group, sizeof so);
        const uint8_t* quants = group + 2 * kPanel * 4;
        for (int64_t kk = 0; kk < G; ++kk) {
          const float a = x[m * x_stride + g * G + kk];
          for (int c = 0; c < kPanel; ++c) {
            int q;
            if constexpr (Fmt == kNibbles) {
              q = (quants[8 * kk + (c & 7)] >> (c < 8 ? 0 : 4)) & 0x0F;
            } else {
              q = static_cast<int8_t>(quants[16 * kk + c]);
            }
            acc[c] = std::fma(a, std::fma(so[c], static_cast<float>(q), so[kPanel + c]), acc[c]);
          }
        }
      }
      for (int c = 0; c < cols; ++c) out[m * out_stride + p * kPanel + c] = acc[c];
    }
  }
}
#endif

}  // namespace

extern "C" {

// The widest vectors tw_quant_linear multiplies with on this CPU, in bits: 512 where the build has
// the AVX-512 variants and the CPU runs them, 256 for the AVX2 paths, 0 for the portable loops.
int tw_quant_vector_bits() {
#ifdef TW_AVX512
  if (tw::has_avx512()) return 512;
#endif
#ifdef TW_AVX2
  return 256;
#else
  return 0;
#endif
}

// Bytes of one GGUF row of k weights of a type, or 0 for a type this file does not handle or a k
// that is not a whole number of its blocks.
int64_t tw_quant_row_bytes(int type, int64_t k) {
  const int64_t bytes = block_bytes(type);
  return bytes == 0 || k <= 0 || k % block_elems(type) != 0 ? 0 : k / block_elems(type) * bytes;
}

// Bytes of the packed form of an [n, k] weight of a type, or 0 where tw_quant_row_bytes is 0.
int64_t tw_quant_packed_bytes(int type, int64_t k, int64_t n) {
  if (tw_quant_row_bytes(type, k) == 0 || n <= 0) return 0;
  return (n + kPanel - 1) / kPanel * (k / group_size(type)) * group_bytes(quant_format(type), group_size(type));
}

// Repacks GGUF rows (blocks [n, row_bytes]) into the panels tw_quant_linear reads (packed:
// tw_quant_packed_bytes bytes). Returns 0, 1 for an unhandled type, 2 for a K that is not a
// whole number of blocks or a row size that does not match it.
int tw_quant_pack(int type, const void* blocks, int64_t row_bytes, int64_t k, int64_t n, void* packed,
                  int num_threads) {
  if (block_bytes(type) == 0) return 1;
  if (tw_quant_packed_bytes(type, k, n) == 0 || row_bytes != tw_quant_row_bytes(type, k)) return 2;
  const int fmt = quant_format(type), gsize = group_size(type);
  const int64_t groups = k / gsize, panels = (n + kPanel - 1) / kPanel;
  const int64_t gbytes = group_bytes(fmt, gsize);
  const int64_t elem = fmt == kFloat32s ? 4 : 2;  // a float format's bytes per value
  uint8_t* dst = static_cast<uint8_t*>(packed);
  std::memset(dst, 0, static_cast<size_t>(tw_quant_packed_bytes(type, k, n)));
#pragma omp parallel for num_threads(num_threads) schedule(static)
  for (int64_t p = 0; p < panels; ++p) {
    for (int c = 0; c < kPanel && p * kPanel + c < n; ++c) {
      const uint8_t* row = static_cast<const uint8_t*>(blocks) + (p * kPanel + c) * row_bytes;
      for (int64_t g = 0; g < groups; ++g) {
        uint8_t* group = dst + (p * groups + g) * gbytes;
        if (is_float_format(fmt)) {  // the values as they are, k-major
          for (int i = 0; i < gsize; ++i)
            std::memcpy(group + (i * kPanel + c) * elem, row + (g * gsize + i) * elem, static_cast<size_t>(elem));
          continue;
        }
        float scale, offset;
        int q[kMaxGroup];
        read_group(type, row, g, scale, offset, q);
        std::memcpy(group + 4 * c, &scale, 4);
        std::memcpy(group + 4 * (kPanel + c), &offset, 4);
        uint8_t* quants = group + 2 * kPanel * 4;
        for (int i = 0; i < gsize; ++i) {
          if (fmt == kInt8) {
            quants[16 * i + c] = static_cast<uint8_t>(q[i]);
          } else {
            quants[8 * i + (c & 7)] |= static_cast<uint8_t>(q[i] << (c < 8 ? 0 : 4));
          }
        }
      }
    }
  }
  return 0;
}

// out = x @ W.T for W packed by tw_quant_pack. Returns 0, 1 for an unhandled type, 2 for a K that
// is not a whole number of blocks.
int tw_quant_linear(int type, const float* x, int64_t x_stride, int64_t m_rows, int64_t k, const void* packed,
                    int64_t n, float* out, int64_t out_stride, int num_threads) {
  if (block_bytes(type) == 0) return 1;
  if (tw_quant_row_bytes(type, k) == 0) return 2;
  if (m_rows <= 0 || n <= 0) return 0;
  const uint8_t* p = static_cast<const uint8_t*>(packed);
  switch (group_size(type) == 16 ? -1 : quant_format(type)) {
    case -1: linear<kInt8, 16>(x, x_stride, m_rows, k, p, n, out, out_stride, num_threads); break;
    case kInt8: linear<kInt8, 32>(x, x_stride, m_rows, k, p, n, out, out_stride, num_threads); break;
    case kNibbles: linear<kNibbles, 32>(x, x_stride, m_rows, k, p, n, out, out_stride, num_threads); break;
    case kFloat32s: linear<kFloat32s, 32>(x, x_stride, m_rows, k, p, n, out, out_stride, num_threads); break;
    case kFloat16s: linear<kFloat16s, 32>(x, x_stride, m_rows, k, p, n, out, out_stride, num_threads); break;
    default: linear<kBFloat16s, 32>(x, x_stride, m_rows, k, p, n, out, out_stride, num_threads); break;
  }
  return 0;
}

}  // extern "C"

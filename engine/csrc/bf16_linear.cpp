// y = x @ W.T for a bfloat16 model on a CPU with AVX512-BF16 (Zen 4, Cooper Lake, Sapphire Rapids):
// bfloat16 activations and weights, float32 sums, the result rounded to bfloat16 as torch rounds a
// bfloat16 matmul's output. VDPBF16PS multiplies 32 pairs of bfloat16 a vector, twice float32's
// multiply-adds per instruction.
//
// Packed layout (tw_bf16_pack): the output features in panels of 16 (the last padded with zero
// weights); a panel is K / 2 pairs of k, each 16 features x (w[f][2p], w[f][2p + 1]), 64 bytes, so
// that a vector holds one pair for each feature and a row of x is a broadcast of its pair.
//
// Every output sums its K / 2 pairs in the order p = 0, 1, ..., one instruction each, so a row gives
// the same bits alone and in any batch. VDPBF16PS treats bfloat16 subnormals as zero and flushes
// subnormal results, as the hardware defines it; beyond that the result differs from F.linear only
// by summation order.
//
// Layouts: x [M, K] bfloat16 with row stride x_stride; w [N, K] bfloat16 rows; out [M, N] bfloat16
// with row stride out_stride. K even.

#include <cstdint>
#include <cstring>
#include <vector>

#include "common.h"

#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("align-loops=64")
#endif

namespace {

constexpr int kPanel = 16;

int64_t packed_bytes(int64_t k, int64_t n) { return (n + kPanel - 1) / kPanel * k * kPanel * 2; }

#if defined(TW_AVX512)
#define TW_BF16_KERNEL 1
// NOTE: outside the target pragma: every CPU runs this check.
bool has_avx512_bf16() {
  static const bool yes = tw::has_avx512() && __builtin_cpu_supports("avx512bf16");
  return yes;
}

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,avx512bf16")

// A tile is up to 8 rows by two panels (32 features): at 6-12 rows the multiply-adds cover
// VDPBF16PS's latency (a 2-core Zen 4 measured 214 GFLOP/s a core at 6 and 8 rows, 200 at 12, 152
// at 4, in a microbenchmark), and a second panel shares each row's broadcast. Over the default
// model's 120 layer matmuls, two panels against one: 1.17x at 32 rows, 1.20x at 64; 12 rows by two
// panels against 8: 0.96x at 32-100.
constexpr int kTileRows = 8;
constexpr int kGroup = 2;  // panels a tile covers

#define TW_ROWS(F) F(0) F(1) F(2) F(3) F(4) F(5) F(6) F(7)
#define TW_ACC(m) __m512 c##m = _mm512_setzero_ps(), d##m = _mm512_setzero_ps();
#define TW_PTR(m) const uint16_t* x##m = x + (MR > m ? m * x_stride : 0);
#define TW_DOT(m)                                                                                  \
  if constexpr (MR > m) {                                                                          \
    uint32_t pair;                                                                                 \
    std::memcpy(&pair, x##m + 2 * p, sizeof pair);                                                 \
    const __m512bh b = (__m512bh)_mm512_set1_epi32(static_cast<int>(pair));                       \
    c##m = _mm512_dpbf16_ps(c##m, b, w0);                                                          \
    if constexpr (NP > 1) d##m = _mm512_dpbf16_ps(d##m, b, w1);                                    \
  }
// Rounds to nearest even as tw::store does (torch's float32 -> bfloat16), 16 outputs at a time.
#define TW_ROUND(acc, dst)                                                                         \
  {                                                                                                \
    const __m512i bits = _mm512_castps_si512(acc);                                                 \
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));      \
    const __m512i rounded = _mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF))); \
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), _mm512_cvtepi32_epi16(_mm512_srli_epi32(rounded, 16))); \
  }
#define TW_STORE(m)                                                                                \
  if constexpr (MR > m) {                                                                          \
    TW_ROUND(c##m, out + m * out_stride)                                                           \
    if constexpr (NP > 1) TW_ROUND(d##m, out + m * out_stride + kPanel)                            \
  }

// out[MR rows, NP * 16] = x[MR rows, K] @ NP consecutive panels, rounded to bfloat16. It also asks
// for the `ahead` panels (0 to 2, the same size) from `next` line by line, into L2: the first tile
// of a group streams its weights from memory, and at 8 rows the multiply-adds want them faster than
// the hardware prefetcher alone brings them (prefetching the next panel against none: 1.3x at 8
// rows, 1.1x at 32, over the default model's layer matmuls).
template <int MR, int NP>
void panel_tile(const uint16_t* x, int64_t x_stride, const uint8_t* panel, int64_t panel_bytes, int64_t k,
                uint16_t* out, int64_t out_stride, const uint8_t* next, int ahead) {
  TW_ROWS(TW_ACC)
  TW_ROWS(TW_PTR)
  const uint8_t* second = panel + (NP > 1 ? panel_bytes : 0);
  for (int64_t p = 0; p < k / 2; ++p) {
    if (ahead > 0) _mm_prefetch(reinterpret_cast<const char*>(next + 64 * p), _MM_HINT_T2);
    if (ahead > 1) _mm_prefetch(reinterpret_cast<const char*>(next + panel_bytes + 64 * p), _MM_HINT_T2);
    const __m512bh w0 = (__m512bh)_mm512_loadu_si512(panel + 64 * p);
    [[maybe_unused]] __m512bh w1;
    if constexpr (NP > 1) w1 = (__m512bh)_mm512_loadu_si512(second + 64 * p);
    TW_ROWS(TW_DOT)
  }
  TW_ROWS(TW_STORE)
}
#undef TW_ROWS
#undef TW_ACC
#undef TW_PTR
#undef TW_DOT
#undef TW_ROUND
#undef TW_STORE

// panel_tile for r rows (1 to kTileRows).
template <int NP>
void tile(int64_t r, const uint16_t* x, int64_t x_stride, const uint8_t* panel, int64_t panel_bytes, int64_t k,
          uint16_t* out, int64_t out_stride, const uint8_t* next, int ahead) {
  switch (r) {
    case 1: panel_tile<1, NP>(x, x_stride, panel, panel_bytes, k, out, out_stride, next, ahead); break;
    case 2: panel_tile<2, NP>(x, x_stride, panel, panel_bytes, k, out, out_stride, next, ahead); break;
    case 3: panel_tile<3, NP>(x, x_stride, panel, panel_bytes, k, out, out_stride, next, ahead); break;
    case 4: panel_tile<4, NP>(x, x_stride, panel, panel_bytes, k, out, out_stride, next, ahead); break;
    case 5: panel_tile<5, NP>(x, x_stride, panel, panel_bytes, k, out, out_stride, next, ahead); break;
    case 6: panel_tile<6, NP>(x, x_stride, panel, panel_bytes, k, out, out_stride, next, ahead); break;
    case 7: panel_tile<7, NP>(x, x_stride, panel, panel_bytes, k, out, out_stride, next, ahead); break;
    default: panel_tile<kTileRows, NP>(x, x_stride, panel, panel_bytes, k, out, out_stride, next, ahead); break;
  }
}

void linear(const uint16_t* x, int64_t x_stride, int64_t m_rows, int64_t k, const uint8_t* packed, int64_t n,
            uint16_t* out, int64_t out_stride, int num_threads) {
  const int64_t panels = (n + kPanel - 1) / kPanel;
  // NOTE: panels in pairs only where that leaves at least two pairs a thread; a narrow matmul (or
  // many threads) keeps single panels, so that every thread has a share. The bits are the same.
  const int64_t group = panels >= 2 * kGroup * num_threads ? kGroup : 1;
  const int64_t groups = (panels + group - 1) / group;
  const int64_t panel_bytes = k * kPanel * 2;
  const int64_t tiles = (m_rows + kTileRows - 1) / kTileRows;
#pragma omp parallel num_threads(num_threads) if (groups > 1)
  {
    std::vector<uint16_t> scratch;  // a partial last group's columns
    // NOTE: guided, as in quant_linear: a thread that started late is made up for by the others.
    // Its chunks are runs of groups, so a group's next one is mostly the same thread's.
#pragma omp for schedule(guided)
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t first = g * group;
      const int64_t np = panels - first < group ? panels - first : group;
      const uint8_t* panel = packed + first * panel_bytes;
      const int64_t cols = n - first * kPanel < np * kPanel ? n - first * kPanel : np * kPanel;
      uint16_t* o = out + first * kPanel;
      int64_t o_stride = out_stride;
      if (cols < np * kPanel) {
        scratch.assign(m_rows * np * kPanel, 0);
        o = scratch.data();
        o_stride = np * kPanel;
      }
      // The next group's panels, asked for by this group's first tile.
      const int64_t next = first + np;
      const int ahead = static_cast<int>(panels - next < group ? panels - next : group);
      const uint8_t* ahead_panels = packed + next * panel_bytes;
      static_assert(kGroup == 2, "a group is one or two panels");
      int64_t m = 0;
      for (int64_t t = 0; t < tiles; ++t) {
        const int64_t r = tw::even_share(m_rows, tiles, t);
        const uint16_t* xm = x + m * x_stride;
        uint16_t* om = o + m * o_stride;
        const int a = t == 0 ? ahead : 0;
        if (np == 2)
          tile<2>(r, xm, x_stride, panel, panel_bytes, k, om, o_stride, ahead_panels, a);
        else
          tile<1>(r, xm, x_stride, panel, panel_bytes, k, om, o_stride, ahead_panels, a);
        m += r;
      }
      if (cols < np * kPanel)
        for (int64_t r = 0; r < m_rows; ++r)
          std::memcpy(out + r * out_stride + first * kPanel, o + r * o_stride, sizeof(uint16_t) * cols);
    }
  }
}

#pragma GCC pop_options
#endif

}  // namespace

extern "C" {

// Whether tw_bf16_linear runs on this CPU (AVX512-BF16, and a build with its kernel).
int tw_bf16_linear_available() {
#ifdef TW_BF16_KERNEL
  return has_avx512_bf16() ? 1 : 0;
#else
  return 0;
#endif
}

// Bytes of the packed form of an [n, k] bfloat16 weight; 0 for an odd or non-positive k, or n <= 0.
int64_t tw_bf16_packed_bytes(int64_t k, int64_t n) { return k <= 0 || k % 2 != 0 || n <= 0 ? 0 : packed_bytes(k, n); }

// Repacks w ([n, k] bfloat16, row stride k) into the pairs tw_bf16_linear reads. Returns 0, or 2 for
// a shape tw_bf16_packed_bytes refuses.
int tw_bf16_pack(const uint16_t* w, int64_t k, int64_t n, void* packed, int num_threads) {
  if (tw_bf16_packed_bytes(k, n) == 0) return 2;
  uint16_t* dst = static_cast<uint16_t*>(packed);
  const int64_t panels = (n + kPanel - 1) / kPanel;
#pragma omp parallel for num_threads(num_threads) schedule(static)
  for (int64_t pn = 0; pn < panels; ++pn) {
    uint16_t* panel = dst + pn * k * kPanel;
    for (int64_t p = 0; p < k / 2; ++p)
      for (int f = 0; f < kPanel; ++f) {
        const int64_t row = pn * kPanel + f;
        panel[(p * kPanel + f) * 2] = row < n ? w[row * k + 2 * p] : 0;
        panel[(p * kPanel + f) * 2 + 1] = row < n ? w[row * k + 2 * p + 1] : 0;
      }
  }
  return 0;
}

// out = x @ W.T for W packed by tw_bf16_pack. Returns 0, 1 where tw_bf16_linear_available is 0, 2
// for a shape tw_bf16_packed_bytes refuses.
int tw_bf16_linear(const uint16_t* x, int64_t x_stride, int64_t m_rows, int64_t k, const void* packed, int64_t n,
                   uint16_t* out, int64_t out_stride, int num_threads) {
  if (tw_bf16_linear_available() == 0) return 1;
  if (tw_bf16_packed_bytes(k, n) == 0) return 2;
  if (m_rows <= 0) return 0;
#ifdef TW_BF16_KERNEL
  linear(x, x_stride, m_rows, k, static_cast<const uint8_t*>(packed), n, out, out_stride, num_threads);
#endif
  return 0;
}

}  // extern "C"

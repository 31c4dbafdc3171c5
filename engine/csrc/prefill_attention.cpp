// Paged prompt attention on the CPU: each prompt chunk's query tokens attend causally to the keys
// before them, read in place from the block pool through the chunk's block table, one tile of keys
// at a time with a running softmax per query (flash attention: no score matrix over the whole
// context, no gathered copy of it, and no work for the tiles a causal mask hides).
//
// Built by tokenwire/engine/native.py with decode_attention.cpp, into the same library.
//
// Layouts (all contiguous, row-major):
//   q, out:        [num_tokens, num_q_heads, head_dim], float32 or bfloat16; chunk c's queries are
//                  the query_lens[c] rows after those of chunks 0..c-1
//   k_cache/v_cache: [num_blocks, block_size, num_kv_heads, head_dim], float32, bfloat16 or float16
//   block_tables:  [num_chunks, table_width] int64, row stride `table_stride`
//   query_lens, context_lens: [num_chunks] int64; chunk c's queries sit at positions
//                  context_lens[c] - query_lens[c] .. context_lens[c] - 1, and query position p
//                  sees keys 0..p, all of them already in the pool (the step writes its keys first)
// Query head h attends through KV head h / (num_q_heads / num_kv_heads) (grouped-query attention).
//
// A task is one chunk's tile of queries for one KV head, with the query heads of that KV head as
// further rows: row r is query r / group, head r % group. Scores are kept transposed, [key][row],
// so that the running softmax is elementwise across rows (eight rows to a vector, no horizontal
// reductions). Each row's arithmetic is the same whatever the other rows of its task are, and key
// tiles start at multiples of kKeyTile positions: a prompt gets the same bits however the
// scheduler splits it into chunks. The AVX2 path takes a key tile one score tile of rows at a
// time, through the last key that tile's last row sees: the keys past it would be masked for every
// row there, and a masked key adds exact zeros to a row's sums, so leaving them out changes no bit.
// Measured alternating on 30 layers' float32 pools, one 2,048-token step of 14 fresh prompts of
// 32-256 tokens: 1.22-1.31x with the transposition below and the first tile's unread
// accumulators; 1.15x for the same chunks after 1,536 tokens of context.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <vector>

#include "common.h"

namespace {

using tw::store;
using tw::to_float;

// Keys per tile of the running softmax: a tile's keys and values in float32 (16 KB each at a head
// size of 64) stay in L1 while a task's rows go through them.
constexpr int64_t kKeyTile = 64;
// Rows (query tokens x the query heads of one KV head) per task: enough rows that a tile's keys,
// converted once, serve many of them, few enough that the task's buffers stay in L2.
// NOTE: every task reads all the keys and values its queries see, so long contexts want many
// rows; once tasks stopped computing their padding rows (only whole score tiles of them), 192
// rows (64 queries of a 3-head group) against 96, alternating on 30 layers' pools: 1.02x on 14
// fresh prompts of 32-256 tokens, 1.09x on one prompt of 1,600, 1.17x on 14 chunks after 1,536
// tokens each. 288 rows: 0.96x and 0.97x of 192 on the first and last. (Before that change, 64
// and 96 had been the fastest against 48 and 192, with key tiles of 32 and 128 no better.)
constexpr int64_t kTaskRows = 192;
// Rows are padded to a multiple of the score tile's 24 rows (three vectors).
constexpr int64_t kRowAlign = 24;
// The score of a key a row must not see, and a row's maximum before its first key. Finite, since
// the kernels are compiled to assume no infinities; exp of it minus any real score is 0.
constexpr float kMasked = -std::numeric_limits<float>::max();

struct Chunk {
  int64_t q_start, ctx0;  // its first row in q, and that query's position
  const int64_t* table;
};

struct Task {
  int64_t chunk, kv_head, i0, i1;  // queries i0..i1-1 of the chunk
};

// One thread's buffers for a task of `rows` (padded) rows.
struct Work {
  int64_t rows = 0, D = 0;
  std::vector<float> qt;      // [D][rows]: queries scaled, transposed
  std::vector<float> keys;    // [kKeyTile][D] the tile's keys in float32
  std::vector<float> values;  // [kKeyTile][D]
  std::vector<float> scores;  // [kKeyTile][rows]: scores, then softmax weights
  std::vector<float> acc;     // [rows][D]: outputs before division by the row's sum
  std::vector<float> m, l, alpha, pos;  // [rows]: running maximum, running sum, rescale, position

  Work(int64_t rows_, int64_t D_) : rows(rows_), D(D_) {
    qt.resize(D * rows);
    keys.resize(kKeyTile * D);
    values.resize(kKeyTile * D);
    scores.resize(kKeyTile * rows);
    acc.resize(rows * D);
    m.resize(rows);
    l.resize(rows);
    alpha.resize(rows);
    pos.resize(rows);
  }
};

// The tile's keys and values (positions t0..t0+n-1, KV head `col` / D) in float32.
template <typename TC>
void load_tile(const TC* k_cache, const TC* v_cache, const Chunk& chunk, int64_t block_size, int64_t token_stride,
               int64_t col, int64_t t0, int64_t n, int64_t D, float* keys, float* values) {
  for (int64_t i = 0; i < n; ++i) {
    const int64_t t = t0 + i;
    const int64_t offset = (chunk.table[t / block_size] * block_size + t % block_size) * token_stride + col;
    const TC* k = k_cache + offset;
    const TC* v = v_cache + offset;
#ifdef TW_AVX2
    if (D % 8 == 0) {
      for (int64_t d = 0; d < D; d += 8) {
        _mm256_storeu_ps(keys + i * D + d, tw::load8(k + d));
        _mm256_storeu_ps(values + i * D + d, tw::load8(v + d));
      }
      continue;
    }
#endif
    for (int64_t d = 0; d < D; ++d) {
      keys[i * D + d] = to_float(k[d]);
      values[i * D + d] = to_float(v[d]);
    }
  }
}

// scores[n][r] = q[r] . k[n] for keys 0..nk-1 and rows r0..r1-1, the generic form.
void tile_scores(Work& w, int64_t nk, int64_t r0, int64_t r1) {
  const int64_t R = w.rows, D = w.D;
  for (int64_t n = 0; n < nk; ++n) {
    float* s = w.scores.data() + n * R;
    std::fill(s + r0, s + r1, 0.f);
    for (int64_t d = 0; d < D; ++d) {
      const float k = w.keys[n * D + d];
      const float* q = w.qt.data() + d * R;
#pragma omp simd
      for (int64_t r = r0; r < r1; ++r) s[r] += q[r] * k;
    }
  }
}

// acc[r] = acc[r] * alpha[r] + sum over n of p[n][r] v[n], for rows r0..r1-1, the generic form.
void tile_values(Work& w, int64_t nk, int64_t r0, int64_t r1) {
  const int64_t R = w.rows, D = w.D;
  for (int64_t r = r0; r < r1; ++r) {
    float* a = w.acc.data() + r * D;
    const float alpha = w.alpha[r];
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) a[d] *= alpha;
    for (int64_t n = 0; n < nk; ++n) {
      const float p = w.scores[n * R + r];
      const float* v = w.values.data() + n * D;
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) a[d] += p * v[d];
    }
  }
}

// The running softmax over one tile, the generic form: rows r0..r1-1 take the tile's scores
// into their maximum and sum, turn them into weights, and keep the factor their earlier
// accumulation must be scaled by.
void tile_softmax(Work& w, int64_t nk, int64_t r0, int64_t r1) {
  const int64_t R = w.rows;
  for (int64_t r = r0; r < r1; ++r) {
    float mt = w.m[r];
    for (int64_t n = 0; n < nk; ++n) mt = std::max(mt, w.scores[n * R + r]);
    float sum = 0.f;
    for (int64_t n = 0; n < nk; ++n) {
      float& s = w.scores[n * R + r];
      s = std::exp(s - mt);
      sum += s;
    }
    w.alpha[r] = std::exp(w.m[r] - mt);
    w.l[r] = w.l[r] * w.alpha[r] + sum;
    w.m[r] = mt;
  }
}

#ifdef TW_AVX2
// e^x for eight floats: 2^k * e^f with k = round(x / ln 2) and a polynomial on f in
// [-ln2/2, ln2/2] (Cephes' expf, within 2 ulp); 0 below -87.3, where e^x is no longer a normal
// float (so a masked score weighs exactly 0), and x is taken as at most 88.
inline __m256 exp8(__m256 x) {
  const __m256 lowest = _mm256_set1_ps(-87.33654f);
  const __m256 keep = _mm256_cmp_ps(x, lowest, _CMP_GE_OQ);
  x = _mm256_min_ps(_mm256_max_ps(x, lowest), _mm256_set1_ps(88.f));
  const __m256 k = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 f = _mm256_fnmadd_ps(k, _mm256_set1_ps(0.693359375f), x);
  f = _mm256_fnmadd_ps(k, _mm256_set1_ps(-2.12194440e-4f), f);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(f, f), _mm256_add_ps(f, _mm256_set1_ps(1.f)));
  // 2^k for k in [-126, 127], built in the exponent field.
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(k), _mm256_set1_epi32(127)), 23);
  return _mm256_and_ps(_mm256_mul_ps(y, _mm256_castsi256_ps(e)), keep);
}

// NOTE: accumulators are named variables (GCC keeps an array of __m256 in memory).
#define TW_FOR3(F) F(0) F(1) F(2)

// scores[n0 + k][r0 .. r0+24) for NK <= 4 keys: three vectors of query rows stay in registers
// along each key's dimensions, each loaded once for every key of the tile (7 loads per 12 FMAs).
template <int NK>
inline void score_tile(Work& w, int64_t n0, int64_t r0) {
  const int64_t R = w.rows, D = w.D;
  const float* k0 = w.keys.data() + n0 * D;
  const __m256 zero = _mm256_setzero_ps();
#define TW_ZERO(k) __m256 a##k##0 = zero, a##k##1 = zero, a##k##2 = zero;
  TW_ZERO(0) TW_ZERO(1) TW_ZERO(2) TW_ZERO(3)
#undef TW_ZERO
  const float* q = w.qt.data() + r0;
  for (int64_t d = 0; d < D; ++d, q += R) {
    const __m256 q0 = _mm256_loadu_ps(q), q1 = _mm256_loadu_ps(q + 8), q2 = _mm256_loadu_ps(q + 16);
#define TW_KEY(k)                                                  \
  if constexpr (NK > k) {                                          \
    const __m256 kb = _mm256_broadcast_ss(k0 + k * D + d);         \
    a##k##0 = _mm256_fmadd_ps(q0, kb, a##k##0);                    \
    a##k##1 = _mm256_fmadd_ps(q1, kb, a##k##1);                    \
    a##k##2 = _mm256_fmadd_ps(q2, kb, a##k##2);                    \
  }
    TW_KEY(0) TW_KEY(1) TW_KEY(2) TW_KEY(3)
  }
#define TW_STORE(k)                                                \
  if constexpr (NK > k) {                                          \
    float* s = w.scores.data() + (n0 + k) * R + r0;                \
    _mm256_storeu_ps(s, a##k##0);                                  \
    _mm256_storeu_ps(s + 8, a##k##1);                              \
    _mm256_storeu_ps(s + 16, a##k##2);                             \
  }
  TW_STORE(0) TW_STORE(1) TW_STORE(2) TW_STORE(3)
#undef TW_STORE
#undef TW_KEY
}

void tile_scores_avx2(Work& w, int64_t nk, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; r += kRowAlign) {
    int64_t n0 = 0;
    for (; n0 + 4 <= nk; n0 += 4) score_tile<4>(w, n0, r);
    switch (nk - n0) {
      case 1: score_tile<1>(w, n0, r); break;
      case 2: score_tile<2>(w, n0, r); break;
      case 3: score_tile<3>(w, n0, r); break;
      default: break;
    }
  }
}

// acc[r0 + i][c0 .. c0+32) for three rows: scaled by the rows' alpha, then the tile's weighted
// values added, four value vectors loaded once for the three rows (7 loads per 12 FMAs).
// On a task's first tile (First) the rows start from zero instead (acc is not read).
template <bool First>
inline void value_tile(Work& w, int64_t nk, int64_t r0, int64_t c0) {
  const int64_t R = w.rows, D = w.D;
  const __m256 zero = _mm256_setzero_ps();
#define TW_LOAD(i)                                                                       \
  float* acc##i = w.acc.data() + (r0 + i) * D + c0;                                      \
  __m256 a##i##0 = zero, a##i##1 = zero, a##i##2 = zero, a##i##3 = zero;                 \
  if constexpr (!First) {                                                                \
    const __m256 al##i = _mm256_broadcast_ss(w.alpha.data() + r0 + i);                   \
    a##i##0 = _mm256_mul_ps(_mm256_loadu_ps(acc##i), al##i);                             \
    a##i##1 = _mm256_mul_ps(_mm256_loadu_ps(acc##i + 8), al##i);                         \
    a##i##2 = _mm256_mul_ps(_mm256_loadu_ps(acc##i + 16), al##i);                        \
    a##i##3 = _mm256_mul_ps(_mm256_loadu_ps(acc##i + 24), al##i);                        \
  }
  TW_FOR3(TW_LOAD)
#undef TW_LOAD
  const float* p = w.scores.data() + r0;
  const float* v = w.values.data() + c0;
  for (int64_t n = 0; n < nk; ++n, p += R, v += D) {
    const __m256 v0 = _mm256_loadu_ps(v), v1 = _mm256_loadu_ps(v + 8), v2 = _mm256_loadu_ps(v + 16),
                 v3 = _mm256_loadu_ps(v + 24);
#define TW_ROW(i)                                                 \
  {                                                               \
    const __m256 pb = _mm256_broadcast_ss(p + i);                 \
    a##i##0 = _mm256_fmadd_ps(pb, v0, a##i##0);                   \
    a##i##1 = _mm256_fmadd_ps(pb, v1, a##i##1);                   \
    a##i##2 = _mm256_fmadd_ps(pb, v2, a##i##2);                   \
    a##i##3 = _mm256_fmadd_ps(pb, v3, a##i##3);                   \
  }
    TW_FOR3(TW_ROW)
#undef TW_ROW
  }
#define TW_STORE(i)                         \
  _mm256_storeu_ps(acc##i, a##i##0);        \
  _mm256_storeu_ps(acc##i + 8, a##i##1);    \
  _mm256_storeu_ps(acc##i + 16, a##i##2);   \
  _mm256_storeu_ps(acc##i + 24, a##i##3);
  TW_FOR3(TW_STORE)
#undef TW_STORE
}
#undef TW_FOR3

void tile_values_avx2(Work& w, int64_t nk, int64_t r0, int64_t r1, bool first) {
  for (int64_t r = r0; r < r1; r += 3)
    for (int64_t c = 0; c < w.D; c += 32) {
      if (first) {
        value_tile<true>(w, nk, r, c);
      } else {
        value_tile<false>(w, nk, r, c);
      }
    }
}

// The running softmax of tile_softmax, eight rows to a vector.
void tile_softmax_avx2(Work& w, int64_t nk, int64_t r0, int64_t r1) {
  const int64_t R = w.rows;
  for (int64_t r = r0; r < r1; r += 8) {
    const __m256 m_old = _mm256_loadu_ps(w.m.data() + r);
    __m256 mt = m_old;
    for (int64_t n = 0; n < nk; ++n) mt = _mm256_max_ps(mt, _mm256_loadu_ps(w.scores.data() + n * R + r));
    __m256 sum = _mm256_setzero_ps();
    for (int64_t n = 0; n < nk; ++n) {
      float* s = w.scores.data() + n * R + r;
      const __m256 p = exp8(_mm256_sub_ps(_mm256_loadu_ps(s), mt));
      _mm256_storeu_ps(s, p);
      sum = _mm256_add_ps(sum, p);
    }
    const __m256 alpha = exp8(_mm256_sub_ps(m_old, mt));
    _mm256_storeu_ps(w.alpha.data() + r, alpha);
    _mm256_storeu_ps(w.l.data() + r, _mm256_fmadd_ps(_mm256_loadu_ps(w.l.data() + r), alpha, sum));
    _mm256_storeu_ps(w.m.data() + r, mt);
  }
}

// qt[d][r] = row(r)[d] * scale for rows 0..rows-1 (rows a multiple of 8; a null row is zeros), eight
// rows by eight dimensions at a time through an 8 x 8 transpose in registers: the scalar loop's
// stores, each to another cache line, took a seventh of the kernel's time on short prompts.
template <typename RowFn>
void transpose_queries(const RowFn& row, int64_t rows, int64_t D, int64_t R, float scale, float* qt) {
  const __m256 s = _mm256_set1_ps(scale), zero = _mm256_setzero_ps();
  for (int64_t r8 = 0; r8 < rows; r8 += 8) {
    decltype(row(0)) src[8];
    for (int j = 0; j < 8; ++j) src[j] = row(r8 + j);
    for (int64_t d = 0; d < D; d += 8) {
      __m256 v[8];
      for (int j = 0; j < 8; ++j) v[j] = src[j] != nullptr ? _mm256_mul_ps(tw::load8(src[j] + d), s) : zero;
      const __m256 t0 = _mm256_unpacklo_ps(v[0], v[1]), t1 = _mm256_unpackhi_ps(v[0], v[1]);
      const __m256 t2 = _mm256_unpacklo_ps(v[2], v[3]), t3 = _mm256_unpackhi_ps(v[2], v[3]);
      const __m256 t4 = _mm256_unpacklo_ps(v[4], v[5]), t5 = _mm256_unpackhi_ps(v[4], v[5]);
      const __m256 t6 = _mm256_unpacklo_ps(v[6], v[7]), t7 = _mm256_unpackhi_ps(v[6], v[7]);
      const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
      const __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
      const __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
      const __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
      float* out = qt + d * R + r8;
      _mm256_storeu_ps(out + 0 * R, _mm256_permute2f128_ps(u0, u4, 0x20));
      _mm256_storeu_ps(out + 1 * R, _mm256_permute2f128_ps(u1, u5, 0x20));
      _mm256_storeu_ps(out + 2 * R, _mm256_permute2f128_ps(u2, u6, 0x20));
      _mm256_storeu_ps(out + 3 * R, _mm256_permute2f128_ps(u3, u7, 0x20));
      _mm256_storeu_ps(out + 4 * R, _mm256_permute2f128_ps(u0, u4, 0x31));
      _mm256_storeu_ps(out + 5 * R, _mm256_permute2f128_ps(u1, u5, 0x31));
      _mm256_storeu_ps(out + 6 * R, _mm256_permute2f128_ps(u2, u6, 0x31));
      _mm256_storeu_ps(out + 7 * R, _mm256_permute2f128_ps(u3, u7, 0x31));
    }
  }
}
#endif

// Scores of keys the rows must not see (past their position) become kMasked. Only tiles that reach
// past the first active row's position need it.
void mask_tile(Work& w, int64_t t0, int64_t nk, int64_t r0, int64_t r1) {
  const int64_t R = w.rows;
  for (int64_t n = 0; n < nk; ++n) {
    const float key_pos = static_cast<float>(t0 + n);
    float* s = w.scores.data() + n * R;
#pragma omp simd
    for (int64_t r = r0; r < r1; ++r) s[r] = key_pos > w.pos[r] ? kMasked : s[r];
  }
}

// One task: the chunk's queries i0..i1-1 through KV head j.
template <typename TQ, typename TC>
void run_task(const Task& task, const Chunk& chunk, const TQ* q, const TC* k_cache, const TC* v_cache, TQ* out,
              int64_t num_q_heads, int64_t num_kv_heads, int64_t group, int64_t block_size, float scale, Work& w) {
  const int64_t D = w.D, R = w.rows;
  const int64_t real_rows = (task.i1 - task.i0) * group;
  // Rows past the task's real ones are padding up to whole score tiles; the rest of w.rows is not read.
  const int64_t used_rows = (real_rows + kRowAlign - 1) / kRowAlign * kRowAlign;
  const int64_t h0 = task.kv_head * group;
  // Queries, scaled and transposed; padding rows are zero queries at the last query's position.
  const auto query_row = [&](int64_t r) -> const TQ* {
    return r < real_rows ? q + ((chunk.q_start + task.i0 + r / group) * num_q_heads + h0 + r % group) * D : nullptr;
  };
  for (int64_t r = 0; r < used_rows; ++r)
    w.pos[r] = static_cast<float>(chunk.ctx0 + (r < real_rows ? task.i0 + r / group : task.i1 - 1));
  int64_t transposed = 0;
#ifdef TW_AVX2
  if (D % 8 == 0) {
    transpose_queries(query_row, used_rows, D, R, scale, w.qt.data());
    transposed = used_rows;
  }
#endif
  for (int64_t r = transposed; r < used_rows; ++r) {
    const TQ* qr = query_row(r);
    for (int64_t d = 0; d < D; ++d) w.qt[d * R + r] = qr != nullptr ? to_float(qr[d]) * scale : 0.f;
  }
  std::fill(w.m.begin(), w.m.end(), kMasked);
  std::fill(w.l.begin(), w.l.end(), 0.f);
#ifdef TW_AVX2
  const bool vectorized = D % 32 == 0;
#else
  const bool vectorized = false;
#endif
  // NOTE: the vectorized path's first key tile writes every used row's acc without reading it.
  if (!vectorized) std::fill(w.acc.begin(), w.acc.begin() + used_rows * D, 0.f);
  const int64_t end = chunk.ctx0 + task.i1;  // keys 0..end-1
  for (int64_t t0 = 0; t0 < end; t0 += kKeyTile) {
    const int64_t nk = std::min(kKeyTile, end - t0);
    // Rows before the first that sees any of these keys skip the tile (a fully masked tile would
    // leave them as they are anyway); whole score tiles of rows, so the AVX2 loops stay aligned.
    const int64_t first = std::max<int64_t>(0, t0 - chunk.ctx0 - task.i0) * group;
    const int64_t r0 = std::min(first, real_rows - 1) / kRowAlign * kRowAlign;
    load_tile(k_cache, v_cache, chunk, block_size, num_kv_heads * D, task.kv_head * D, t0, nk, D, w.keys.data(),
              w.values.data());
#ifdef TW_AVX2
    if (vectorized) {
      // One score tile of rows at a time, through the keys its last row sees: keys past that are
      // masked for every row of it, and would only add exact zeros to its sums.
      for (int64_t rb = r0; rb < used_rows; rb += kRowAlign) {
        const int64_t nkb = std::min<int64_t>(nk, static_cast<int64_t>(w.pos[rb + kRowAlign - 1]) - t0 + 1);
        tile_scores_avx2(w, nkb, rb, rb + kRowAlign);
        if (t0 + nkb - 1 > w.pos[rb]) mask_tile(w, t0, nkb, rb, rb + kRowAlign);
        tile_softmax_avx2(w, nkb, rb, rb + kRowAlign);
        tile_values_avx2(w, nkb, rb, rb + kRowAlign, t0 == 0);
      }
      continue;
    }
#endif
    tile_scores(w, nk, r0, used_rows);
    if (t0 + nk - 1 > w.pos[r0]) mask_tile(w, t0, nk, r0, used_rows);
    tile_softmax(w, nk, r0, used_rows);
    tile_values(w, nk, r0, used_rows);
  }
  for (int64_t r = 0; r < real_rows; ++r) {
    TQ* o = out + ((chunk.q_start + task.i0 + r / group) * num_q_heads + h0 + r % group) * D;
    const float inv = 1.f / w.l[r];
    for (int64_t d = 0; d < D; ++d) store(w.acc[r * D + d] * inv, o + d);
  }
}

template <typename TQ, typename TC>
void prefill_attention(const TQ* q, const TC* k_cache, const TC* v_cache, const int64_t* block_tables,
                       int64_t table_stride, const int64_t* query_lens, const int64_t* context_lens, TQ* out,
                       int64_t num_chunks, int64_t num_q_heads, int64_t num_kv_heads, int64_t head_dim,
                       int64_t block_size, float scale, int num_threads) {
  const int64_t group = num_q_heads / num_kv_heads;
  const int64_t tile_queries = std::max<int64_t>(1, kTaskRows / group);
  const int64_t rows = (tile_queries * group + kRowAlign - 1) / kRowAlign * kRowAlign;
  std::vector<Chunk> chunks;
  std::vector<Task> tasks;
  int64_t start = 0;
  for (int64_t c = 0; c < num_chunks; ++c) {
    chunks.push_back({start, context_lens[c] - query_lens[c], block_tables + c * table_stride});
    for (int64_t i0 = 0; i0 < query_lens[c]; i0 += tile_queries)
      for (int64_t j = 0; j < num_kv_heads; ++j) tasks.push_back({c, j, i0, std::min(i0 + tile_queries, query_lens[c])});
    start += query_lens[c];
  }
  // The tasks with the most keys first, so that the dynamic schedule ends with short ones.
  const auto keys_of = [&](const Task& t) { return chunks[t.chunk].ctx0 + t.i1; };
  std::stable_sort(tasks.begin(), tasks.end(), [&](const Task& a, const Task& b) { return keys_of(a) > keys_of(b); });
  const int64_t num_tasks = static_cast<int64_t>(tasks.size());
#pragma omp parallel num_threads(std::max<int64_t>(1, std::min<int64_t>(num_threads, num_tasks)))
  {
    Work w(rows, head_dim);
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < num_tasks; ++t)
      run_task(tasks[t], chunks[tasks[t].chunk], q, k_cache, v_cache, out, num_q_heads, num_kv_heads, group,
               block_size, scale, w);
  }
}

}  // namespace

extern "C" {

// Returns 0 on success, 1 for an element type it does not handle (dtype: queries and output,
// float32 or bfloat16; cache_dtype: float32, bfloat16 or float16), 2 for a query or context length
// out of range or a block id outside the pool (checked before anything is read through the tables).
int tw_paged_prefill_attention(int dtype, int cache_dtype, const void* q, const void* k_cache, const void* v_cache,
                               int64_t num_cache_blocks, const int64_t* block_tables, int64_t table_stride,
                               int64_t table_width, const int64_t* query_lens, const int64_t* context_lens,
                               void* out, int64_t num_chunks, int64_t num_q_heads, int64_t num_kv_heads,
                               int64_t head_dim, int64_t block_size, float scale, int num_threads) {
  for (int64_t c = 0; c < num_chunks; ++c) {
    const int64_t* table = block_tables + c * table_stride;
    if (query_lens[c] < 1 || query_lens[c] > context_lens[c] ||
        !tw::table_in_range(table, context_lens[c], table_width, block_size, num_cache_blocks))
      return 2;
  }
  return tw::with_query_type(dtype, [&](auto* query_type) {
    using TQ = std::remove_pointer_t<decltype(query_type)>;
    return tw::with_cache_type(cache_dtype, [&](auto* cache_type) {
      using TC = std::remove_pointer_t<decltype(cache_type)>;
      prefill_attention(static_cast<const TQ*>(q), static_cast<const TC*>(k_cache), static_cast<const TC*>(v_cache),
                        block_tables, table_stride, query_lens, context_lens, static_cast<TQ*>(out), num_chunks,
                        num_q_heads, num_kv_heads, head_dim, block_size, scale, num_threads);
      return 0;
    });
  });
}

}  // extern "C"

// Paged decode attention on the CPU: one query token per sequence, keys and values read in place
// from the block pool through each sequence's block table (no gather, no padding).
//
// Built by tokenwire/engine/native.py with the system C++ compiler and loaded with ctypes, so it
// uses only the C ABI: raw pointers, sizes, and an element-type code.
//
// Layouts (all contiguous, row-major):
//   q, out:        [num_seqs, num_q_heads, head_dim], float32 or bfloat16
//   k_cache/v_cache: [num_blocks, block_size, num_kv_heads, head_dim], float32, bfloat16 or float16
//                  (a cache may be narrower than the model: it is read in float32)
//   block_tables:  [num_seqs, table_width] int64, row stride `table_stride`
//   context_lens:  [num_seqs] int64, each in [1, table_width * block_size]
// Query head h attends through KV head h / (num_q_heads / num_kv_heads) (grouped-query attention).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "common.h"

namespace {

using tw::store;
using tw::to_float;
constexpr int kAbiVersion = 11;

// Pool offsets (in elements) of positions 0..len-1 of one sequence, from its block table.
inline void token_offsets(const int64_t* table, int64_t len, int64_t block_size, int64_t token_stride,
                          std::vector<int64_t>& offsets) {
  offsets.resize(static_cast<size_t>(len));
  for (int64_t t = 0; t < len; ++t) offsets[t] = (table[t / block_size] * block_size + t % block_size) * token_stride;
}

// The pieces of one task: `rows` query heads (qf, scaled, float32), query head r reading KV head
// r / group at column (r / group) * D of each token's row (pool + offsets[t]).
struct Task {
  const float* qf;
  const int64_t* offsets;
  int64_t len, rows, group, D;
};

// scores[r, t] = q[r] . k[t], the generic form.
template <typename T>
void key_scores(const Task& task, const T* keys, float* scores) {
  for (int64_t t = 0; t < task.len; ++t) {
    const T* k_row = keys + task.offsets[t];
    for (int64_t r = 0; r < task.rows; ++r) {
      const T* k = k_row + (r / task.group) * task.D;
      const float* qr = task.qf + r * task.D;
      float dot = 0.f;
#pragma omp simd reduction(+ : dot)
      for (int64_t d = 0; d < task.D; ++d) dot += qr[d] * to_float(k[d]);
      scores[r * task.len + t] = dot;
    }
  }
}

// acc[r] = sum over t of p[r, t] v[t], the generic form.
template <typename T>
void weighted_values(const Task& task, const T* values, const float* probs, float* acc) {
  std::fill(acc, acc + task.rows * task.D, 0.f);
  for (int64_t t = 0; t < task.len; ++t) {
    const T* v_row = values + task.offsets[t];
    for (int64_t r = 0; r < task.rows; ++r) {
      const T* v = v_row + (r / task.group) * task.D;
      const float p = probs[r * task.len + t];
      float* a = acc + r * task.D;
#pragma omp simd
      for (int64_t d = 0; d < task.D; ++d) a[d] += p * to_float(v[d]);
    }
  }
}

#ifdef TW_AVX2
using tw::load8;

// Asks for the rows of tokens [t0, t1) of a task (all its KV heads) to be brought into the cache:
// the rows of a sequence are scattered over the pool by its block table, and the tiles do enough
// arithmetic per row that their loads alone keep too few misses in flight (on one thread over 64
// sequences of 200 tokens, the tiles ran at 0.83x the eight-token path without it, 1.31x with it).
// NOTE: into L2, not L1: on a Zen 4, over 30 layers' pools of 32 sequences of 150-300 tokens,
// measured alternating, 1.5x over bfloat16 caches (1.6x at 64 sequences, 1.4x at 4) and 1.3x over
// float32 against asking for L1 (whose few miss buffers the requests held, stalling the loads).
template <typename T>
inline void prefetch_rows(const Task& task, const T* base, int64_t t0, int64_t t1) {
  const int64_t bytes = task.rows / task.group * task.D * static_cast<int64_t>(sizeof(T));
  for (int64_t t = t0; t < t1; ++t) {
    const char* row = reinterpret_cast<const char*>(base + task.offsets[t]);
    for (int64_t b = 0; b < bytes; b += 64) _mm_prefetch(row + b, _MM_HINT_T2);
  }
}

// Tokens ahead of the eight being scored whose key rows, and whose value rows, the eight-token path
// asks for, so that the values pass then reads from the cache. Without them the loads waited on
// memory: over 30 layers' float32 pools of 32 sequences of 150-300 tokens, reading the same rows
// and nothing else took 0.54 ms a layer, the kernel 0.91-0.98 ms (its arithmetic alone, with the
// rows in L1, 0.27 ms). With them, measured alternating: 1.11x there, 1.13x at 64 sequences of
// 100-400 tokens, 1.03x for one sequence of ~1,000, unchanged for short ones.
constexpr int64_t kRowKeyPrefetch = 32;
constexpr int64_t kRowValuePrefetch = 16;

// [sum(a0), ..., sum(a7)]: eight dot products finished with one reduction instead of eight.
inline __m256 sum8(__m256 a0, __m256 a1, __m256 a2, __m256 a3, __m256 a4, __m256 a5, __m256 a6, __m256 a7) {
  const __m256 lo4 = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
  const __m256 hi4 = _mm256_hadd_ps(_mm256_hadd_ps(a4, a5), _mm256_hadd_ps(a6, a7));
  return _mm256_add_ps(_mm256_permute2f128_ps(lo4, hi4, 0x20), _mm256_permute2f128_ps(lo4, hi4, 0x31));
}

// Keys with D a multiple of 8: eight tokens at a time, so that eight independent dot products are
// in flight and share one reduction. The rows of later tokens are asked for along the way, spread
// over the query heads (a burst of them at once stalls the loads behind it).
template <typename T>
void key_scores_avx2(const Task& task, const T* keys, const T* values, float* scores) {
  const int64_t D = task.D;
  for (int64_t t0 = 0; t0 < task.len; t0 += 8) {
    const int64_t n = std::min<int64_t>(8, task.len - t0);
    const T* k[8];
    for (int i = 0; i < 8; ++i) k[i] = keys + task.offsets[t0 + (i < n ? i : 0)];
    for (int64_t r = 0; r < task.rows; ++r) {
      const int64_t i0 = r * 8 / task.rows, i1 = (r + 1) * 8 / task.rows;  // this head's share of the eight
      prefetch_rows(task, keys, std::min(t0 + kRowKeyPrefetch + i0, task.len),
                    std::min(t0 + kRowKeyPrefetch + i1, task.len));
      prefetch_rows(task, values, std::min(t0 + kRowValuePrefetch + i0, task.len),
                    std::min(t0 + kRowValuePrefetch + i1, task.len));
      const int64_t col = (r / task.group) * D;
      const float* qr = task.qf + r * D;
      __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
      for (int64_t d = 0; d < D; d += 8) {
        const __m256 qv = _mm256_loadu_ps(qr + d);
        a0 = _mm256_fmadd_ps(qv, load8(k[0] + col + d), a0);
        a1 = _mm256_fmadd_ps(qv, load8(k[1] + col + d), a1);
        a2 = _mm256_fmadd_ps(qv, load8(k[2] + col + d), a2);
        a3 = _mm256_fmadd_ps(qv, load8(k[3] + col + d), a3);
        a4 = _mm256_fmadd_ps(qv, load8(k[4] + col + d), a4);
        a5 = _mm256_fmadd_ps(qv, load8(k[5] + col + d), a5);
        a6 = _mm256_fmadd_ps(qv, load8(k[6] + col + d), a6);
        a7 = _mm256_fmadd_ps(qv, load8(k[7] + col + d), a7);
      }
      const __m256 dots = sum8(a0, a1, a2, a3, a4, a5, a6, a7);
      float* dst = scores + r * task.len + t0;
      if (n == 8) {
        _mm256_storeu_ps(dst, dots);
      } else {
        alignas(32) float tmp[8];
        _mm256_store_ps(tmp, dots);
        std::copy(tmp, tmp + n, dst);
      }
    }
  }
}

// Values with D a multiple of 8: 64 columns of one query head's output in eight registers while
// the tokens stream past (a task's values stay in L2 for its other query heads).
template <typename T>
void weighted_values_avx2(const Task& task, const T* values, const float* probs, float* acc) {
  const int64_t D = task.D;
  for (int64_t r = 0; r < task.rows; ++r) {
    const float* p = probs + r * task.len;
    for (int64_t c0 = 0; c0 < D; c0 += 64) {
      const int64_t col = (r / task.group) * D + c0;
      const int64_t width = std::min<int64_t>(64, D - c0);
      float* a = acc + r * D + c0;
      if (width < 64) {  // a head size that is not a multiple of 64: the generic loop
        std::fill(a, a + width, 0.f);
        for (int64_t t = 0; t < task.len; ++t) {
          const T* v = values + task.offsets[t] + col;
          for (int64_t d = 0; d < width; ++d) a[d] += p[t] * to_float(v[d]);
        }
        continue;
      }
      __m256 c0v = _mm256_setzero_ps(), c1 = c0v, c2 = c0v, c3 = c0v, c4 = c0v, c5 = c0v, c6 = c0v, c7 = c0v;
      for (int64_t t = 0; t < task.len; ++t) {
        const T* v = values + task.offsets[t] + col;
        const __m256 pv = _mm256_broadcast_ss(p + t);
        c0v = _mm256_fmadd_ps(pv, load8(v), c0v);
        c1 = _mm256_fmadd_ps(pv, load8(v + 8), c1);
        c2 = _mm256_fmadd_ps(pv, load8(v + 16), c2);
        c3 = _mm256_fmadd_ps(pv, load8(v + 24), c3);
        c4 = _mm256_fmadd_ps(pv, load8(v + 32), c4);
        c5 = _mm256_fmadd_ps(pv, load8(v + 40), c5);
        c6 = _mm256_fmadd_ps(pv, load8(v + 48), c6);
        c7 = _mm256_fmadd_ps(pv, load8(v + 56), c7);
      }
      _mm256_storeu_ps(a, c0v);
      _mm256_storeu_ps(a + 8, c1);
      _mm256_storeu_ps(a + 16, c2);
      _mm256_storeu_ps(a + 24, c3);
      _mm256_storeu_ps(a + 32, c4);
      _mm256_storeu_ps(a + 40, c5);
      _mm256_storeu_ps(a + 48, c6);
      _mm256_storeu_ps(a + 56, c7);
    }
  }
}

// [sum(a0), sum(a1), sum(a2), sum(a3)]: four dot products finished with one reduction.
inline __m128 sum4(__m256 a0, __m256 a1, __m256 a2, __m256 a3) {
  const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
  return _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
}

// The tiled path (16-bit caches): query heads that share a KV head go through its keys and values
// together, at most kTileHeads at a time, so that each key and value vector is loaded (and widened)
// once for all of them. On the 2-core EPYC this was measured on, a loop that loads a vector for
// every FMA runs at about half the FMA rate; a tile of 3 heads x 4 vectors loads 7 per 12 FMAs,
// and its 12 accumulators, three query vectors (or weights) and the loaded vector fill AVX2's 16
// registers.
constexpr int64_t kTileHeads = 3;

// NOTE: accumulators are named variables (GCC keeps an array of __m256 in memory), for NQ query
// heads q0..q0+NQ-1 and four tokens (keys) or four column vectors (values).
#define TW_HEADS(F) F(0) F(1) F(2)
#define TW_ZERO4(h) __m256 a##h##0 = zero, a##h##1 = zero, a##h##2 = zero, a##h##3 = zero;
// a0j, a1j, a2j += s_0, s_1, s_2 times one vector loaded from src (a key's or a value's), for the
// tile's NQ heads: the vector is loaded once for all of them.
#define TW_FMA_HEADS(j, src)                                          \
  {                                                                   \
    const __m256 x = load8(src);                                      \
    a0##j = _mm256_fmadd_ps(s_0, x, a0##j);                           \
    if constexpr (NQ > 1) a1##j = _mm256_fmadd_ps(s_1, x, a1##j);     \
    if constexpr (NQ > 2) a2##j = _mm256_fmadd_ps(s_2, x, a2##j);     \
  }

// scores[q, t0..t0+n) for NQ query heads from q0 of one KV head (at column col of each token's
// row), n <= 4 tokens, each key vector loaded once for every head of the tile.
template <int NQ, typename T>
inline void key_tile(const Task& task, const T* keys, int64_t q0, int64_t col, int64_t t0, int64_t n, float* scores) {
  const int64_t D = task.D;
  const T* k[4];
  for (int i = 0; i < 4; ++i) k[i] = keys + task.offsets[t0 + (i < n ? i : 0)] + col;
  const float* q = task.qf + q0 * D;
  const __m256 zero = _mm256_setzero_ps();
  TW_HEADS(TW_ZERO4)
  for (int64_t d = 0; d < D; d += 8) {
    // The tile's query vectors stay in registers while each token's key vector is loaded once.
    const __m256 s_0 = _mm256_loadu_ps(q + d);
    const __m256 s_1 = NQ > 1 ? _mm256_loadu_ps(q + D + d) : zero;
    const __m256 s_2 = NQ > 2 ? _mm256_loadu_ps(q + 2 * D + d) : zero;
    TW_FMA_HEADS(0, k[0] + d) TW_FMA_HEADS(1, k[1] + d) TW_FMA_HEADS(2, k[2] + d) TW_FMA_HEADS(3, k[3] + d)
  }
#define TW_STORE_SCORES(h)                                                        \
  if constexpr (NQ > h) {                                                         \
    alignas(16) float dots[4];                                                    \
    _mm_store_ps(dots, sum4(a##h##0, a##h##1, a##h##2, a##h##3));                 \
    std::copy(dots, dots + n, scores + (q0 + h) * task.len + t0);                 \
  }
  TW_HEADS(TW_STORE_SCORES)
#undef TW_STORE_SCORES
}

// acc[q, 0..32) (+)= sum over t in [t0, t1) of p[q, t] v[t, col ..] for NQ query heads from q0 of
// one KV head (acc points at the columns' start in query head 0's row): 32 columns of each head's
// output in registers while the tokens go by.
template <int NQ, typename T>
inline void value_tile(const Task& task, const T* values, const float* probs, int64_t q0, int64_t col, int64_t t0,
                       int64_t t1, float* acc) {
  const int64_t len = task.len, D = task.D;
  const __m256 zero = _mm256_setzero_ps();
  TW_HEADS(TW_ZERO4)
#define TW_LOAD_ACC(h)                                       \
  if (NQ > h && t0 > 0) {                                    \
    const float* a = acc + (q0 + h) * D;                     \
    a##h##0 = _mm256_loadu_ps(a);                            \
    a##h##1 = _mm256_loadu_ps(a + 8);                        \
    a##h##2 = _mm256_loadu_ps(a + 16);                       \
    a##h##3 = _mm256_loadu_ps(a + 24);                       \
  }
  TW_HEADS(TW_LOAD_ACC)
#undef TW_LOAD_ACC
  for (int64_t t = t0; t < t1; ++t) {
    const T* v = values + task.offsets[t] + col;
    // The tile's weights for this token stay in registers while each value vector is loaded once.
    const __m256 s_0 = _mm256_broadcast_ss(probs + q0 * len + t);
    const __m256 s_1 = NQ > 1 ? _mm256_broadcast_ss(probs + (q0 + 1) * len + t) : zero;
    const __m256 s_2 = NQ > 2 ? _mm256_broadcast_ss(probs + (q0 + 2) * len + t) : zero;
    TW_FMA_HEADS(0, v) TW_FMA_HEADS(1, v + 8) TW_FMA_HEADS(2, v + 16) TW_FMA_HEADS(3, v + 24)
  }
#define TW_STORE_ACC(h)                                      \
  if constexpr (NQ > h) {                                    \
    float* a = acc + (q0 + h) * D;                           \
    _mm256_storeu_ps(a, a##h##0);                            \
    _mm256_storeu_ps(a + 8, a##h##1);                        \
    _mm256_storeu_ps(a + 16, a##h##2);                       \
    _mm256_storeu_ps(a + 24, a##h##3);                       \
  }
  TW_HEADS(TW_STORE_ACC)
#undef TW_STORE_ACC
}
#undef TW_FMA_HEADS
#undef TW_ZERO4
#undef TW_HEADS

// f(std::integral_constant<int, NQ>, q0) for each tile of query heads: every KV head's group of
// query heads, kTileHeads at a time.
template <typename F>
inline void for_each_head_tile(const Task& task, F&& f) {
  for (int64_t g0 = 0; g0 < task.rows; g0 += task.group) {
    for (int64_t q0 = g0; q0 < g0 + task.group; q0 += kTileHeads) {
      switch (std::min(kTileHeads, g0 + task.group - q0)) {
        case 1: f(std::integral_constant<int, 1>(), q0); break;
        case 2: f(std::integral_constant<int, 2>(), q0); break;
        default: f(std::integral_constant<int, 3>(), q0); break;
      }
    }
  }
}

// Tokens per step through values: 16 tokens' rows (12 KB for three KV heads of 64) stay in L1
// while every tile of query heads reads them.
constexpr int64_t kValueStep = 16;

// Tokens ahead of the keys being scored whose rows are asked for (8 and 32 did worse), and of
// whose value rows (16 did no better): the values pass then finds its first rows in the cache
// (over float16 caches of 32 sequences of 150-300 tokens, 1.13x the kernel without it).
constexpr int64_t kKeyPrefetch = 16;
constexpr int64_t kTileValuePrefetch = 8;

// Keys with D a multiple of 32. Tokens are the outer loop, so that memory is read row after row,
// in order (a pass per KV head, each reading a third of every row, ran at 0.7x).
template <typename T>
void key_scores_tiled(const Task& task, const T* keys, const T* values, float* scores) {
  for (int64_t t0 = 0; t0 < task.len; t0 += 4) {
    const int64_t n = std::min<int64_t>(4, task.len - t0);
    prefetch_rows(task, keys, std::min(t0 + kKeyPrefetch, task.len), std::min(t0 + kKeyPrefetch + 4, task.len));
    prefetch_rows(task, values, std::min(t0 + kTileValuePrefetch, task.len),
                  std::min(t0 + kTileValuePrefetch + 4, task.len));
    for_each_head_tile(task, [&](auto nq, int64_t q0) {
      key_tile<decltype(nq)::value>(task, keys, q0, (q0 / task.group) * task.D, t0, n, scores);
    });
  }
}

// Values with D a multiple of 32, tokens the outer loop as for keys, the next step's rows asked for.
template <typename T>
void weighted_values_tiled(const Task& task, const T* values, const float* probs, float* acc) {
  for (int64_t t0 = 0; t0 < task.len; t0 += kValueStep) {
    const int64_t t1 = std::min(t0 + kValueStep, task.len);
    prefetch_rows(task, values, t1, std::min(t1 + kValueStep, task.len));
    for_each_head_tile(task, [&](auto nq, int64_t q0) {
      const int64_t col = (q0 / task.group) * task.D;
      for (int64_t c0 = 0; c0 < task.D; c0 += 32)
        value_tile<decltype(nq)::value>(task, values, probs, q0, col + c0, t0, t1, acc + c0);
    });
  }
}
#endif

// Softmax of each row of scores [rows, len] in place (subtracting the row's maximum keeps exp in range).
inline void softmax_rows(float* scores, int64_t rows, int64_t len) {
  for (int64_t r = 0; r < rows; ++r) {
    float* row = scores + r * len;
    float m = row[0];
    for (int64_t t = 1; t < len; ++t) m = std::max(m, row[t]);
    float sum = 0.f;
#pragma omp simd reduction(+ : sum)
    for (int64_t t = 0; t < len; ++t) {
      row[t] = std::exp(row[t] - m);
      sum += row[t];
    }
    const float inv = 1.f / sum;
#pragma omp simd
    for (int64_t t = 0; t < len; ++t) row[t] *= inv;
  }
}

// One task's attention: scores, softmax, weighted values. Each key and each value is read from
// memory once, for every query head of its group.
template <typename T>
void attend(const Task& task, const T* keys, const T* values, float* scores, float* acc) {
#ifdef TW_AVX2
  // NOTE: a 16-bit cache goes through the tiles, which load each key and value once for a tile of
  // query heads; over float32, where twice the bytes come from memory, reading eight tokens' rows
  // at once did better (measured over 30 pools of 64 sequences, alternating: the tiles at 1.27x
  // and 1.37x over bfloat16 and float16 caches, at 0.89x over float32).
  if constexpr (sizeof(T) == 2) {
    if (task.D % 32 == 0) {
      key_scores_tiled(task, keys, values, scores);
      softmax_rows(scores, task.rows, task.len);
      weighted_values_tiled(task, values, scores, acc);
      return;
    }
  }
  if (task.D % 8 == 0) {
    key_scores_avx2(task, keys, values, scores);
    softmax_rows(scores, task.rows, task.len);
    weighted_values_avx2(task, values, scores, acc);
    return;
  }
#endif
  key_scores(task, keys, scores);
  softmax_rows(scores, task.rows, task.len);
  weighted_values(task, values, scores, acc);
}

template <typename TQ, typename TC>
void decode_attention(const TQ* q, const TC* k_cache, const TC* v_cache, const int64_t* block_tables,
                      int64_t table_stride, const int64_t* context_lens, TQ* out, int64_t num_seqs,
                      int64_t num_q_heads, int64_t num_kv_heads, int64_t head_dim, int64_t block_size,
                      float scale, int num_threads) {
  const int64_t group = num_q_heads / num_kv_heads;
  const int64_t D = head_dim;
  const int64_t token_stride = num_kv_heads * D;
  // A task is one sequence, reading each token's keys for all KV heads at once (whole rows of the
  // pool, which is 2-3x faster than a pass per head); with fewer sequences than about two per
  // thread, a task is one (sequence, KV head), so that a lone sequence still uses every thread.
  const int64_t heads_per_task = num_seqs >= 2 * num_threads ? num_kv_heads : 1;
  const int64_t tasks_per_seq = num_kv_heads / heads_per_task;
  const int64_t rows = heads_per_task * group;  // query heads of one task
#pragma omp parallel num_threads(num_threads)
  {
    // Per thread: the task's queries in float32, its tokens' pool offsets, a row of scores per
    // query head, accumulators.
    std::vector<float> qf(rows * D), scores, acc(rows * D);
    std::vector<int64_t> offsets;
    // Sequences come longest first (the runner orders them), which the dynamic schedule balances.
#pragma omp for schedule(dynamic, 1)
    for (int64_t task_id = 0; task_id < num_seqs * tasks_per_seq; ++task_id) {
      const int64_t s = task_id / tasks_per_seq, h0 = (task_id % tasks_per_seq) * heads_per_task;
      const int64_t len = context_lens[s];
      const TQ* qs = q + (s * num_q_heads + h0 * group) * D;
      for (int64_t i = 0; i < rows * D; ++i) qf[i] = to_float(qs[i]) * scale;
      token_offsets(block_tables + s * table_stride, len, block_size, token_stride, offsets);
      scores.resize(static_cast<size_t>(rows * len));
      const Task task{qf.data(), offsets.data(), len, rows, group, D};
      attend(task, k_cache + h0 * D, v_cache + h0 * D, scores.data(), acc.data());
      TQ* o = out + (s * num_q_heads + h0 * group) * D;
      for (int64_t i = 0; i < rows * D; ++i) store(acc[i], o + i);
    }
  }
}

}  // namespace

extern "C" {

int tw_abi_version() { return kAbiVersion; }

// Returns 0 on success, 1 for an element type it does not handle (dtype: queries and output,
// float32 or bfloat16; cache_dtype: float32, bfloat16 or float16), 2 for a context length or block
// id out of range (checked before anything is read through the tables).
int tw_paged_decode_attention(int dtype, int cache_dtype, const void* q, const void* k_cache, const void* v_cache,
                              int64_t num_cache_blocks, const int64_t* block_tables,
                              int64_t table_stride, int64_t table_width, const int64_t* context_lens,
                              void* out, int64_t num_seqs, int64_t num_q_heads, int64_t num_kv_heads,
                              int64_t head_dim, int64_t block_size, float scale, int num_threads) {
  for (int64_t s = 0; s < num_seqs; ++s)
    if (!tw::table_in_range(block_tables + s * table_stride, context_lens[s], table_width, block_size, num_cache_blocks))
      return 2;
  return tw::with_query_type(dtype, [&](auto* query_type) {
    using TQ = std::remove_pointer_t<decltype(query_type)>;
    return tw::with_cache_type(cache_dtype, [&](auto* cache_type) {
      using TC = std::remove_pointer_t<decltype(cache_type)>;
      decode_attention(static_cast<const TQ*>(q), static_cast<const TC*>(k_cache), static_cast<const TC*>(v_cache),
                       block_tables, table_stride, context_lens, static_cast<TQ*>(out), num_seqs, num_q_heads,
                       num_kv_heads, head_dim, block_size, scale, num_threads);
      return 0;
    });
  });
}

}  // extern "C"

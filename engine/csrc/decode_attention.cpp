// Paged decode attention on the CPU: one query token per sequence, keys and values read in place
// from the block pool through each sequence's block table (no gather, no padding).
//
// Built by tokenwire/engine/native.py with the system C++ compiler and loaded with ctypes, so it
// uses only the C ABI: raw pointers, sizes, and an element-type code.
//
// Layouts (all contiguous, row-major):
//   q, out:        [num_seqs, num_q_heads, head_dim]
//   k_cache/v_cache: [num_blocks, block_size, num_kv_heads, head_dim]
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
constexpr int kAbiVersion = 5;

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
// [sum(a0), ..., sum(a7)]: eight dot products finished with one reduction instead of eight.
inline __m256 sum8(__m256 a0, __m256 a1, __m256 a2, __m256 a3, __m256 a4, __m256 a5, __m256 a6, __m256 a7) {
  const __m256 lo4 = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
  const __m256 hi4 = _mm256_hadd_ps(_mm256_hadd_ps(a4, a5), _mm256_hadd_ps(a6, a7));
  return _mm256_add_ps(_mm256_permute2f128_ps(lo4, hi4, 0x20), _mm256_permute2f128_ps(lo4, hi4, 0x31));
}

// float32 keys with D a multiple of 8: eight tokens at a time, so that eight independent dot
// products are in flight and share one reduction.
void key_scores_avx2(const Task& task, const float* keys, float* scores) {
  const int64_t D = task.D;
  for (int64_t t0 = 0; t0 < task.len; t0 += 8) {
    const int64_t n = std::min<int64_t>(8, task.len - t0);
    const float* k[8];
    for (int i = 0; i < 8; ++i) k[i] = keys + task.offsets[t0 + (i < n ? i : 0)];
    for (int64_t r = 0; r < task.rows; ++r) {
      const int64_t col = (r / task.group) * D;
      const float* qr = task.qf + r * D;
      __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
      for (int64_t d = 0; d < D; d += 8) {
        const __m256 qv = _mm256_loadu_ps(qr + d);
        a0 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k[0] + col + d), a0);
        a1 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k[1] + col + d), a1);
        a2 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k[2] + col + d), a2);
        a3 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k[3] + col + d), a3);
        a4 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k[4] + col + d), a4);
        a5 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k[5] + col + d), a5);
        a6 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k[6] + col + d), a6);
        a7 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k[7] + col + d), a7);
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

// float32 values with D a multiple of 8: 64 columns of one query head's output in eight registers
// while the tokens stream past (a task's values stay in L2 for its other query heads).
void weighted_values_avx2(const Task& task, const float* values, const float* probs, float* acc) {
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
          const float* v = values + task.offsets[t] + col;
          for (int64_t d = 0; d < width; ++d) a[d] += p[t] * v[d];
        }
        continue;
      }
      __m256 c0v = _mm256_setzero_ps(), c1 = c0v, c2 = c0v, c3 = c0v, c4 = c0v, c5 = c0v, c6 = c0v, c7 = c0v;
      for (int64_t t = 0; t < task.len; ++t) {
        const float* v = values + task.offsets[t] + col;
        const __m256 pv = _mm256_broadcast_ss(p + t);
        c0v = _mm256_fmadd_ps(pv, _mm256_loadu_ps(v), c0v);
        c1 = _mm256_fmadd_ps(pv, _mm256_loadu_ps(v + 8), c1);
        c2 = _mm256_fmadd_ps(pv, _mm256_loadu_ps(v + 16), c2);
        c3 = _mm256_fmadd_ps(pv, _mm256_loadu_ps(v + 24), c3);
        c4 = _mm256_fmadd_ps(pv, _mm256_loadu_ps(v + 32), c4);
        c5 = _mm256_fmadd_ps(pv, _mm256_loadu_ps(v + 40), c5);
        c6 = _mm256_fmadd_ps(pv, _mm256_loadu_ps(v + 48), c6);
        c7 = _mm256_fmadd_ps(pv, _mm256_loadu_ps(v + 56), c7);
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
  if constexpr (std::is_same_v<T, float>) {
    if (task.D % 8 == 0) {
      key_scores_avx2(task, keys, scores);
      softmax_rows(scores, task.rows, task.len);
      weighted_values_avx2(task, values, scores, acc);
      return;
    }
  }
#endif
  key_scores(task, keys, scores);
  softmax_rows(scores, task.rows, task.len);
  weighted_values(task, values, scores, acc);
}

template <typename T>
void decode_attention(const T* q, const T* k_cache, const T* v_cache, const int64_t* block_tables,
                      int64_t table_stride, const int64_t* context_lens, T* out, int64_t num_seqs,
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
      const T* qs = q + (s * num_q_heads + h0 * group) * D;
      for (int64_t i = 0; i < rows * D; ++i) qf[i] = to_float(qs[i]) * scale;
      token_offsets(block_tables + s * table_stride, len, block_size, token_stride, offsets);
      scores.resize(static_cast<size_t>(rows * len));
      const Task task{qf.data(), offsets.data(), len, rows, group, D};
      attend(task, k_cache + h0 * D, v_cache + h0 * D, scores.data(), acc.data());
      T* o = out + (s * num_q_heads + h0 * group) * D;
      for (int64_t i = 0; i < rows * D; ++i) store(acc[i], o + i);
    }
  }
}

}  // namespace

extern "C" {

int tw_abi_version() { return kAbiVersion; }

// Returns 0 on success, 1 for an element type it does not handle, 2 for a context length or
// block id out of range (checked before anything is read through the tables).
int tw_paged_decode_attention(int dtype, const void* q, const void* k_cache, const void* v_cache,
                              int64_t num_cache_blocks, const int64_t* block_tables,
                              int64_t table_stride, int64_t table_width, const int64_t* context_lens,
                              void* out, int64_t num_seqs, int64_t num_q_heads, int64_t num_kv_heads,
                              int64_t head_dim, int64_t block_size, float scale, int num_threads) {
  for (int64_t s = 0; s < num_seqs; ++s) {
    const int64_t len = context_lens[s];
    if (len < 1 || len > table_width * block_size) return 2;
    for (int64_t b = 0; b < (len + block_size - 1) / block_size; ++b) {
      const int64_t id = block_tables[s * table_stride + b];
      if (id < 0 || id >= num_cache_blocks) return 2;
    }
  }
  switch (dtype) {
    case tw::kFloat32:
      decode_attention(static_cast<const float*>(q), static_cast<const float*>(k_cache),
                       static_cast<const float*>(v_cache), block_tables, table_stride, context_lens,
                       static_cast<float*>(out), num_seqs, num_q_heads, num_kv_heads, head_dim,
                       block_size, scale, num_threads);
      return 0;
    case tw::kBFloat16:
      decode_attention(static_cast<const uint16_t*>(q), static_cast<const uint16_t*>(k_cache),
                       static_cast<const uint16_t*>(v_cache), block_tables, table_stride, context_lens,
                       static_cast<uint16_t*>(out), num_seqs, num_q_heads, num_kv_heads, head_dim,
                       block_size, scale, num_threads);
      return 0;
    default:
      return 1;
  }
}

}  // extern "C"

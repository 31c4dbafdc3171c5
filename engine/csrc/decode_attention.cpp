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
#include <vector>

#include "common.h"

namespace {

using tw::store;
using tw::to_float;
constexpr int kAbiVersion = 4;

// Calls fn(row, t) for positions t = 0..len-1 of one sequence, with row pointing at position t's
// entry in the pool, walking the block table in order.
template <typename T, typename Fn>
inline void for_each_token(const T* pool, const int64_t* table, int64_t len, int64_t block_size,
                           int64_t token_stride, Fn&& fn) {
  const int64_t block_stride = block_size * token_stride;
  for (int64_t b = 0, t = 0; t < len; ++b) {
    const T* block = pool + table[b] * block_stride;
    const int64_t n = std::min(block_size, len - t);
    for (int64_t o = 0; o < n; ++o, ++t) fn(block + o * token_stride, t);
  }
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
    // Per thread: the task's queries in float32, a row of scores per query head, accumulators.
    std::vector<float> qf(rows * D), scores, acc(rows * D);
    // Sequences come longest first (the runner orders them), which the dynamic schedule balances.
#pragma omp for schedule(dynamic, 1)
    for (int64_t task = 0; task < num_seqs * tasks_per_seq; ++task) {
      const int64_t s = task / tasks_per_seq, h0 = (task % tasks_per_seq) * heads_per_task;
      const int64_t len = context_lens[s];
      const int64_t* table = block_tables + s * table_stride;
      const T* qs = q + (s * num_q_heads + h0 * group) * D;
      for (int64_t i = 0; i < rows * D; ++i) qf[i] = to_float(qs[i]) * scale;
      scores.resize(static_cast<size_t>(rows * len));

      // Scores: each key is read once, for every query head of its group.
      for_each_token(k_cache + h0 * D, table, len, block_size, token_stride, [&](const T* k_row, int64_t t) {
        for (int64_t r = 0; r < rows; ++r) {
          const T* k = k_row + (r / group) * D;
          const float* qr = qf.data() + r * D;
          float dot = 0.f;
#pragma omp simd reduction(+ : dot)
          for (int64_t d = 0; d < D; ++d) dot += qr[d] * to_float(k[d]);
          scores[r * len + t] = dot;
        }
      });

      // Softmax per query head (subtracting the row's maximum keeps exp in range).
      for (int64_t r = 0; r < rows; ++r) {
        float* row = scores.data() + r * len;
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

      // Weighted sum of values, each value read once.
      std::fill(acc.begin(), acc.end(), 0.f);
      for_each_token(v_cache + h0 * D, table, len, block_size, token_stride, [&](const T* v_row, int64_t t) {
        for (int64_t r = 0; r < rows; ++r) {
          const T* v = v_row + (r / group) * D;
          const float p = scores[r * len + t];
          float* a = acc.data() + r * D;
#pragma omp simd
          for (int64_t d = 0; d < D; ++d) a[d] += p * to_float(v[d]);
        }
      });
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

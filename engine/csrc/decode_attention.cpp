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
#include <cstring>
#include <vector>

namespace {

constexpr int kAbiVersion = 2;
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

template <typename T>
void decode_attention(const T* q, const T* k_cache, const T* v_cache, const int64_t* block_tables,
                      int64_t table_stride, const int64_t* context_lens, T* out, int64_t num_seqs,
                      int64_t num_q_heads, int64_t num_kv_heads, int64_t head_dim, int64_t block_size,
                      float scale, int num_threads) {
  const int64_t group = num_q_heads / num_kv_heads;
  const int64_t D = head_dim;
  const int64_t token_stride = num_kv_heads * D;
  const int64_t block_stride = block_size * token_stride;
#pragma omp parallel num_threads(num_threads)
  {
    // Per thread: the queries in float32, one row of scores per query head, one accumulator per head.
    std::vector<float> qf(num_q_heads * D), scores, acc(num_q_heads * D);
    // One sequence per task, longest first as the runner orders them: the dynamic schedule then
    // balances the threads.
#pragma omp for schedule(dynamic, 1)
    for (int64_t s = 0; s < num_seqs; ++s) {
      const int64_t len = context_lens[s];
      const int64_t num_blocks = (len + block_size - 1) / block_size;
      const int64_t* table = block_tables + s * table_stride;
      for (int64_t i = 0; i < num_q_heads * D; ++i) qf[i] = to_float(q[s * num_q_heads * D + i]) * scale;
      scores.resize(static_cast<size_t>(num_q_heads * len));

      // Scores: each key is read once, for all query heads of its group.
      for (int64_t b = 0; b < num_blocks; ++b) {
        const T* kb = k_cache + table[b] * block_stride;
        const int64_t n = std::min(block_size, len - b * block_size);
        for (int64_t o = 0; o < n; ++o) {
          const int64_t t = b * block_size + o;
          for (int64_t h = 0; h < num_kv_heads; ++h) {
            const T* k = kb + o * token_stride + h * D;
            for (int64_t g = 0; g < group; ++g) {
              const int64_t r = h * group + g;
              const float* qr = qf.data() + r * D;
              float dot = 0.f;
#pragma omp simd reduction(+ : dot)
              for (int64_t d = 0; d < D; ++d) dot += qr[d] * to_float(k[d]);
              scores[r * len + t] = dot;
            }
          }
        }
      }

      // Softmax per query head (subtracting the row's maximum keeps exp in range).
      for (int64_t r = 0; r < num_q_heads; ++r) {
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
      for (int64_t b = 0; b < num_blocks; ++b) {
        const T* vb = v_cache + table[b] * block_stride;
        const int64_t n = std::min(block_size, len - b * block_size);
        for (int64_t o = 0; o < n; ++o) {
          const int64_t t = b * block_size + o;
          for (int64_t h = 0; h < num_kv_heads; ++h) {
            const T* v = vb + o * token_stride + h * D;
            for (int64_t g = 0; g < group; ++g) {
              const int64_t r = h * group + g;
              const float p = scores[r * len + t];
              float* a = acc.data() + r * D;
#pragma omp simd
              for (int64_t d = 0; d < D; ++d) a[d] += p * to_float(v[d]);
            }
          }
        }
      }
      T* o = out + s * num_q_heads * D;
      for (int64_t i = 0; i < num_q_heads * D; ++i) store(acc[i], o + i);
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
    case kFloat32:
      decode_attention(static_cast<const float*>(q), static_cast<const float*>(k_cache),
                       static_cast<const float*>(v_cache), block_tables, table_stride, context_lens,
                       static_cast<float*>(out), num_seqs, num_q_heads, num_kv_heads, head_dim,
                       block_size, scale, num_threads);
      return 0;
    case kBFloat16:
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

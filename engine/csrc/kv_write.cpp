// Writes a step's new keys and values into the paged KV pool, one row per token at its slot
// (block id * block size + offset). torch does this as two index_copy_ calls per layer, which at a
// decode step cost more in dispatch than the copy itself (about 35 us a layer for one token).
//
// A row is a token's keys (or values) for every KV head, in the cache's element type: the caller
// converts them first, so this is a plain copy of bytes.

#include <cstdint>
#include <cstring>

namespace {

// Below this many bytes per pool, one thread is faster than a parallel region.
constexpr int64_t kParallelBytes = 1 << 20;

}  // namespace

extern "C" {

// Copies row t of k and v (row_bytes each; rows k_stride and v_stride bytes apart) to row slots[t]
// of k_cache and v_cache (num_slots contiguous rows of row_bytes each). Returns 0, or 2 when a slot
// is outside [0, num_slots), checked before anything is written.
int tw_write_kv(const void* k, int64_t k_stride, const void* v, int64_t v_stride, void* k_cache, void* v_cache,
                const int64_t* slots, int64_t num_tokens, int64_t num_slots, int64_t row_bytes, int num_threads) {
  for (int64_t t = 0; t < num_tokens; ++t)
    if (slots[t] < 0 || slots[t] >= num_slots) return 2;
  const char* ks = static_cast<const char*>(k);
  const char* vs = static_cast<const char*>(v);
  char* kc = static_cast<char*>(k_cache);
  char* vc = static_cast<char*>(v_cache);
#pragma omp parallel for num_threads(num_threads) if (num_tokens * row_bytes >= kParallelBytes)
  for (int64_t t = 0; t < num_tokens; ++t) {
    std::memcpy(kc + slots[t] * row_bytes, ks + t * k_stride, static_cast<size_t>(row_bytes));
    std::memcpy(vc + slots[t] * row_bytes, vs + t * v_stride, static_cast<size_t>(row_bytes));
  }
  return 0;
}

}  // extern "C"

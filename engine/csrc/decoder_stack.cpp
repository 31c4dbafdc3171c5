// A LLaMA decoder stack over a flat batch in one call, in float32 (projections from GGUF blocks) or
// bfloat16 (projections through the AVX512-BF16 kernel). Each layer is RMSNorm, the fused q/k/v
// projection, RoPE, the KV write, paged attention (decode rows, then prompt chunks), the output
// projection and the residual add; then RMSNorm, the fused gate/up projection, SiLU-and-multiply,
// the down projection and the residual add.
//
// These are the kernels the layer's torch modules call one by one (models/llama.py with native
// ops), called here with the same arguments in the same order, so the hidden states are the same
// bits. What goes is the Python and torch dispatch between them, ten to twenty microseconds an op
// and about a dozen ops a layer: at a decode step of a few rows that is as long as the arithmetic.
//
// Layouts: x [T, hidden] of the stack's dtype (the residual stream, updated in place; a bfloat16
// add rounds its float32 sum, as torch's does); cos, sin [T, head_dim] float32;
// slots [T]; the first num_decode rows are single-token decodes (tables [num_decode, width], row
// stride decode_stride, lengths decode_lens), the rest prompt chunks one after another (tables
// [num_chunks, width], lengths query_lens and context_lens), as AttentionMetadata describes them.
// Per layer, plan holds kPlanFields int64: the two norm weights; for each of the four projections
// up to kMaxParts (packed weight, GGUF type, output columns) triples, unused ones zero (a fused
// weight whose shards have different types, as in a Q4_K_M file, is one part per run of a type,
// each writing its own columns; in bfloat16, one part of type kBf16Part packed by tw_bf16_pack);
// and the layer's key and value pools ([num_blocks, block_size, num_kv_heads, head_dim] of
// cache_dtype: for float32, float32 or bfloat16 or float16, into which the new keys and values are
// rounded to nearest even, as torch's .to() rounds them, NaN aside; for bfloat16, bfloat16).

#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "common.h"

extern "C" {
int tw_rms_norm(int dtype, const void* x, int64_t x_stride, const void* weight, void* out, int64_t out_stride,
                int64_t rows, int64_t dim, float eps, int num_threads);
int tw_rotary(int dtype, void* x, int64_t row_stride, int64_t rows, int64_t heads, int64_t head_dim,
              const float* cos, const float* sin, int num_threads);
int tw_silu_and_mul(int dtype, const void* x, int64_t x_stride, void* out, int64_t rows, int64_t width,
                    int num_threads);
int tw_quant_linear(int type, const float* x, int64_t x_stride, int64_t m_rows, int64_t k, const void* packed,
                    int64_t n, float* out, int64_t out_stride, int num_threads);
int tw_bf16_linear(const uint16_t* x, int64_t x_stride, int64_t m_rows, int64_t k, const void* packed, int64_t n,
                   uint16_t* out, int64_t out_stride, int num_threads);
int tw_write_kv(const void* k, int64_t k_stride, const void* v, int64_t v_stride, void* k_cache, void* v_cache,
                const int64_t* slots, int64_t num_tokens, int64_t num_slots, int64_t row_bytes, int num_threads);
int tw_paged_decode_attention(int dtype, int cache_dtype, const void* q, const void* k_cache, const void* v_cache,
                              int64_t num_cache_blocks, const int64_t* block_tables, int64_t table_stride,
                              int64_t table_width, const int64_t* context_lens, void* out, int64_t num_seqs,
                              int64_t num_q_heads, int64_t num_kv_heads, int64_t head_dim, int64_t block_size,
                              float scale, int num_threads);
int tw_paged_prefill_attention(int dtype, int cache_dtype, const void* q, const void* k_cache, const void* v_cache,
                               int64_t num_cache_blocks, const int64_t* block_tables, int64_t table_stride,
                               int64_t table_width, const int64_t* query_lens, const int64_t* context_lens,
                               void* out, int64_t num_chunks, int64_t num_q_heads, int64_t num_kv_heads,
                               int64_t head_dim, int64_t block_size, float scale, int num_threads);
}

namespace {

// Parts per projection, and int64 fields per part (weight, type, columns) and per projection.
constexpr int64_t kMaxParts = 3;
constexpr int64_t kPartFields = 3;
constexpr int64_t kProjectionFields = kMaxParts * kPartFields;
// The type of a bfloat16 stack's parts: weights packed by tw_bf16_pack (no GGUF type is negative).
constexpr int64_t kBf16Part = -1;

// Offsets of a layer's fields in the plan.
enum PlanField : int64_t {
  kInputNorm = 0,
  kPostNorm = 1,
  kQKV = 2,
  kOut = kQKV + kProjectionFields,
  kGateUp = kOut + kProjectionFields,
  kDown = kGateUp + kProjectionFields,
  kKeyCache = kDown + kProjectionFields,
  kValueCache,
  kPlanFields
};

template <typename T>
T* field(const int64_t* layer, int64_t f) {
  return reinterpret_cast<T*>(static_cast<intptr_t>(layer[f]));
}

// out[rows, cols] (row stride out_stride) = x[rows, k] @ W.T for one part: from GGUF blocks in
// float32, through the AVX512-BF16 kernel in bfloat16. Nonzero where the part's type is not the
// matmul's (or this CPU has no AVX512-BF16).
int part_matmul(const int64_t* part, const float* x, int64_t rows, int64_t k, float* out, int64_t cols,
                int64_t out_stride, int num_threads) {
  return tw_quant_linear(static_cast<int>(part[1]), x, k, rows, k, field<const void>(part, 0), cols, out, out_stride,
                         num_threads);
}
int part_matmul(const int64_t* part, const uint16_t* x, int64_t rows, int64_t k, uint16_t* out, int64_t cols,
                int64_t out_stride, int num_threads) {
  if (part[1] != kBf16Part) return 1;
  return tw_bf16_linear(x, k, rows, k, field<const void>(part, 0), cols, out, out_stride, num_threads);
}

// out[rows, n] = x[rows, k] @ W.T for a projection's parts (at `projection` in a layer's plan),
// each writing its own columns, as GGUFLinear does. 1 where a part's type is not the matmul's or
// the parts' columns do not add up to n.
template <typename T>
int project(const int64_t* projection, const T* x, int64_t rows, int64_t k, T* out, int64_t n, int num_threads) {
  int64_t col = 0;
  for (int64_t p = 0; p < kMaxParts && projection[p * kPartFields] != 0; ++p) {
    const int64_t* part = projection + p * kPartFields;
    const int64_t cols = part[2];
    if (col + cols > n || part_matmul(part, x, rows, k, out + col, cols, n, num_threads) != 0) return 1;
    col += cols;
  }
  return col == n ? 0 : 1;
}

// Below this many elements, one thread is faster than a parallel region.
constexpr int64_t kParallelElements = 1 << 16;

// Rows of k and v (row stride `stride` floats, `width` each) in a 16-bit cache type T, all k rows
// and then all v rows, for tw_write_kv.
template <typename T>
void narrow_rows(const float* k, const float* v, int64_t stride, int64_t rows, int64_t width, T* dst) {
  for (int64_t t = 0; t < rows; ++t)
    for (int64_t i = 0; i < width; ++i) {
      tw::store(k[t * stride + i], dst + t * width + i);
      tw::store(v[t * stride + i], dst + (rows + t) * width + i);
    }
}

// narrow_rows for a cache type code (bfloat16, or float16 where F16C converts it); false for another.
bool narrow_kv(int cache_dtype, const float* k, const float* v, int64_t stride, int64_t rows, int64_t width,
               uint16_t* dst) {
  if (cache_dtype == tw::kBFloat16) {
    narrow_rows(k, v, stride, rows, width, dst);
    return true;
  }
#ifdef TW_AVX2
  if (cache_dtype == tw::kFloat16) {
    narrow_rows(k, v, stride, rows, width, reinterpret_cast<tw::Half*>(dst));
    return true;
  }
#endif
  return false;
}

// x += y over n elements: torch's x + y, element by element (in bfloat16, the float32 sum rounded).
template <typename T>
void add_into(T* x, const T* y, int64_t n, int num_threads) {
#pragma omp parallel for num_threads(num_threads) if (n >= kParallelElements)
  for (int64_t i = 0; i < n; ++i) tw::store(tw::to_float(x[i]) + tw::to_float(y[i]), x + i);
}

// The rows a layer's attention and MLP run over: the first num_decode are single-token decodes,
// the rest prompt chunks, as tw_decoder_stack takes them.
struct Rows {
  int64_t count, num_decode;
  const int64_t* decode_tables;
  int64_t decode_stride, decode_width;
  const int64_t* decode_lens;
  int64_t num_chunks;
  const int64_t* chunk_tables;
  int64_t chunk_stride, chunk_width;
  const int64_t* query_lens;
  const int64_t* context_lens;
};

// The model's shapes and the step's buffers (scratch laid out for `capacity` rows) for a stack of
// element type T (float, or uint16_t for bfloat16).
template <typename T>
struct Stack {
  static constexpr int kDtype = std::is_same_v<T, float> ? tw::kFloat32 : tw::kBFloat16;
  int64_t hidden, num_heads, num_kv_heads, D, intermediate, q_size, kv_size, qkv_size;
  float eps, scale;
  int cache_dtype;
  int64_t num_blocks, block_size;
  int num_threads;
  T *h, *qkv, *q, *attn, *y, *gate_up, *act;
  uint16_t* narrow;

  Stack(int64_t hidden_, int64_t heads, int64_t kv_heads, int64_t head_dim, int64_t inter, float eps_, float scale_,
        int cache_dtype_, int64_t num_blocks_, int64_t block_size_, int threads, T* scratch, int64_t capacity)
      : hidden(hidden_), num_heads(heads), num_kv_heads(kv_heads), D(head_dim), intermediate(inter),
        q_size(heads * head_dim), kv_size(kv_heads * head_dim), qkv_size(q_size + 2 * kv_size), eps(eps_),
        scale(scale_), cache_dtype(cache_dtype_), num_blocks(num_blocks_), block_size(block_size_),
        num_threads(threads) {
    // Scratch rows: h [hidden] (norm outputs), qkv, q (contiguous for attention), attention
    // output, y [hidden] (the projections back to hidden), gate/up [2 I], act [I], and room for the
    // step's keys and values in a 16-bit cache type (2 x kv_size 16-bit numbers a row; float32 only).
    const int64_t rows = capacity;
    h = scratch;
    qkv = h + rows * hidden;
    q = qkv + rows * qkv_size;
    attn = q + rows * q_size;
    y = attn + rows * q_size;
    gate_up = y + rows * hidden;
    act = gate_up + rows * 2 * intermediate;
    narrow = reinterpret_cast<uint16_t*>(act + rows * intermediate);
  }

  // A layer's first half over `rows` rows of x: RMSNorm, the q/k/v projection (into qkv), RoPE and the
  // KV write. 0, or tw_decoder_stack's error codes.
  int keys_and_values(const int64_t* layer, const T* x, int64_t rows, const float* cos, const float* sin,
                      const int64_t* slots) const {
    tw_rms_norm(kDtype, x, hidden, field<const T>(layer, kInputNorm), h, hidden, rows, hidden, eps, num_threads);
    if (project(layer + kQKV, h, rows, hidden, qkv, qkv_size, num_threads) != 0) return 1;
    // q and k side by side: one rotation covers both, in place.
    tw_rotary(kDtype, qkv, qkv_size, rows, num_heads + num_kv_heads, D, cos, sin, num_threads);
    void* k_cache = field<void>(layer, kKeyCache);
    void* v_cache = field<void>(layer, kValueCache);
    const T* k = qkv + q_size;
    constexpr int64_t size = sizeof(T);
    int rc;
    if (cache_dtype == kDtype) {
      rc = tw_write_kv(k, qkv_size * size, k + kv_size, qkv_size * size, k_cache, v_cache, slots, rows,
                       num_blocks * block_size, kv_size * size, num_threads);
    } else if constexpr (std::is_same_v<T, float>) {
      if (!narrow_kv(cache_dtype, k, k + kv_size, qkv_size, rows, kv_size, narrow)) return 1;
      rc = tw_write_kv(narrow, kv_size * 2, narrow + rows * kv_size, kv_size * 2, k_cache, v_cache, slots, rows,
                       num_blocks * block_size, kv_size * 2, num_threads);
    } else {
      return 1;  // a bfloat16 stack writes a bfloat16 cache only
    }
    return rc == 0 ? 0 : 2;
  }

  // The rest of the layer over `rows` (their queries in qkv, their residual stream in x): paged
  // attention (decode rows, then prompt chunks), the output projection and the residual add; then
  // RMSNorm, the fused gate/up projection, SiLU-and-multiply, the down projection and the add.
  int attention_and_mlp(const int64_t* layer, T* x, const Rows& rows) const {
    const int64_t count = rows.count;
    void* k_cache = field<void>(layer, kKeyCache);
    void* v_cache = field<void>(layer, kValueCache);
    for (int64_t t = 0; t < count; ++t) std::memcpy(q + t * q_size, qkv + t * qkv_size, sizeof(T) * q_size);
    if (rows.num_decode > 0 &&
        tw_paged_decode_attention(kDtype, cache_dtype, q, k_cache, v_cache, num_blocks, rows.decode_tables,
                                  rows.decode_stride, rows.decode_width, rows.decode_lens, attn, rows.num_decode,
                                  num_heads, num_kv_heads, D, block_size, scale, num_threads) != 0)
      return 2;
    if (rows.num_chunks > 0 &&
        tw_paged_prefill_attention(kDtype, cache_dtype, q + rows.num_decode * q_size, k_cache, v_cache,
                                   num_blocks, rows.chunk_tables, rows.chunk_stride, rows.chunk_width,
                                   rows.query_lens, rows.context_lens, attn + rows.num_decode * q_size,
                                   rows.num_chunks, num_heads, num_kv_heads, D, block_size, scale, num_threads) != 0)
      return 2;
    if (project(layer + kOut, attn, count, q_size, y, hidden, num_threads) != 0) return 1;
    add_into(x, y, count * hidden, num_threads);
    tw_rms_norm(kDtype, x, hidden, field<const T>(layer, kPostNorm), h, hidden, count, hidden, eps, num_threads);
    if (project(layer + kGateUp, h, count, hidden, gate_up, 2 * intermediate, num_threads) != 0) return 1;
    tw_silu_and_mul(kDtype, gate_up, 2 * intermediate, act, count, intermediate, num_threads);
    if (project(layer + kDown, act, count, intermediate, y, hidden, num_threads) != 0) return 1;
    add_into(x, y, count * hidden, num_threads);
    return 0;
  }
};

// Whether every projection part of the plan is of the kind a stack of dtype code `dtype` multiplies
// by (packed for the bfloat16 kernel exactly in bfloat16): checked before any layer runs, since a
// norm of the other dtype would read its weights at the wrong width.
bool parts_match(const int64_t* plan, int64_t num_layers, int dtype) {
  for (int64_t l = 0; l < num_layers; ++l)
    for (int64_t f = kQKV; f < kKeyCache; f += kPartFields) {
      const int64_t* part = plan + l * kPlanFields + f;
      if (part[0] != 0 && (part[1] == kBf16Part) != (dtype == tw::kBFloat16)) return false;
    }
  return true;
}

// Whether out_rows[0..num_out) are ascending, distinct rows of a batch of `count`.
bool ascending_rows(const int64_t* out_rows, int64_t num_out, int64_t count) {
  for (int64_t j = 0; j < num_out; ++j)
    if (out_rows[j] < 0 || out_rows[j] >= count || (j > 0 && out_rows[j] <= out_rows[j - 1])) return false;
  return true;
}

// Rows out_rows (ascending_rows) of x and qkv moved to the front, in order, and the Rows they
// make: a decode row keeps its table and length; a prompt row becomes a chunk of one query at its
// position, which the prompt kernel gives the same bits as in its whole chunk
// (csrc/prefill_attention.cpp), as the row-wise matmuls and norms give theirs. Tables and lengths
// go into `ints`.
template <typename T>
Rows gather_rows(const Rows& rows, const int64_t* out_rows, int64_t num_out, T* x, int64_t hidden, T* qkv,
                 int64_t qkv_size, std::vector<int64_t>& ints) {
  int64_t num_decode = 0;
  for (int64_t j = 0; j < num_out; ++j) num_decode += out_rows[j] < rows.num_decode;
  const int64_t num_chunks = num_out - num_decode;
  const int64_t dw = rows.decode_width, cw = rows.chunk_width;
  ints.assign(static_cast<size_t>(num_decode * (dw + 1) + num_chunks * (cw + 2)), 0);
  int64_t* decode_tables = ints.data();
  int64_t* decode_lens = decode_tables + num_decode * dw;
  int64_t* chunk_tables = decode_lens + num_decode;
  int64_t* query_lens = chunk_tables + num_chunks * cw;
  int64_t* context_lens = query_lens + num_chunks;
  int64_t c = 0, chunk_start = rows.num_decode;  // the chunk holding the current prompt row, its first row
  for (int64_t j = 0; j < num_out; ++j) {
    const int64_t r = out_rows[j];
    if (r != j) {  // r > j: row j has been moved already or is not an output
      std::memcpy(x + j * hidden, x + r * hidden, sizeof(T) * hidden);
      std::memcpy(qkv + j * qkv_size, qkv + r * qkv_size, sizeof(T) * qkv_size);
    }
    if (j < num_decode) {
      std::memcpy(decode_tables + j * dw, rows.decode_tables + r * rows.decode_stride, sizeof(int64_t) * dw);
      decode_lens[j] = rows.decode_lens[r];
      continue;
    }
    while (r >= chunk_start + rows.query_lens[c]) chunk_start += rows.query_lens[c++];
    const int64_t i = j - num_decode;
    std::memcpy(chunk_tables + i * cw, rows.chunk_tables + c * rows.chunk_stride, sizeof(int64_t) * cw);
    query_lens[i] = 1;
    context_lens[i] = rows.context_lens[c] - rows.query_lens[c] + (r - chunk_start) + 1;
  }
  return Rows{num_out,    num_decode,   decode_tables, dw, dw, decode_lens,
              num_chunks, chunk_tables, cw,            cw, query_lens, context_lens};
}

template <typename T>
int run(const int64_t* plan, int64_t num_layers, T* x, int64_t num_tokens, int64_t hidden, int64_t num_heads,
        int64_t num_kv_heads, int64_t head_dim, int64_t intermediate, float eps, const float* cos, const float* sin,
        const int64_t* slots, const Rows& all, const int64_t* out_rows, int64_t num_out, int cache_dtype,
        int64_t num_blocks, int64_t block_size, float scale, void* scratch, int num_threads) {
  const Stack<T> stack(hidden, num_heads, num_kv_heads, head_dim, intermediate, eps, scale, cache_dtype, num_blocks,
                       block_size, num_threads, static_cast<T*>(scratch), num_tokens);
  for (int64_t l = 0; l < num_layers; ++l) {
    const int64_t* layer = plan + l * kPlanFields;
    int rc = stack.keys_and_values(layer, x, num_tokens, cos, sin, slots);
    if (rc != 0) return rc;
    if (l + 1 < num_layers || num_out < 0 || num_out == num_tokens) {
      rc = stack.attention_and_mlp(layer, x, all);
    } else {
      std::vector<int64_t> ints;
      const Rows wanted = gather_rows(all, out_rows, num_out, x, hidden, stack.qkv, stack.qkv_size, ints);
      rc = num_out == 0 ? 0 : stack.attention_and_mlp(layer, x, wanted);
    }
    if (rc != 0) return rc;
  }
  return 0;
}

}  // namespace

extern "C" {

// int64 fields per layer of tw_decoder_stack's plan.
int64_t tw_decoder_stack_plan_fields() { return kPlanFields; }

// Floats of scratch tw_decoder_stack needs per row of the batch (of either dtype).
int64_t tw_decoder_stack_scratch(int64_t hidden, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                                 int64_t intermediate) {
  const int64_t q_size = num_heads * head_dim, qkv = (num_heads + 2 * num_kv_heads) * head_dim;
  return 2 * hidden + qkv + 2 * q_size + 3 * intermediate + num_kv_heads * head_dim;
}

// Runs num_layers layers over x (dtype: float32, or bfloat16 with bfloat16 parts and pools). With
// num_out < 0, every row's hidden state, in place. Otherwise only those of rows out_rows[0..num_out)
// (ascending) are wanted: the last layer writes every row's keys and values, then runs its
// attention and MLP on those rows alone, left in x[0..num_out) (the other rows' work there feeds
// nothing: in a prompt chunk only the last row is sampled). Returns 0; 1 for a dtype it does not
// run, parts of the other dtype's kind (before anything runs), a projection whose parts the matmul
// does not take (a type, or columns that do not add up) or a cache type this build does not write;
// 2 for a slot, block id or length out of range, query lengths that do not add up to the prompt
// rows, or output rows that are not ascending rows of the batch (each checked before it is read
// through).
int tw_decoder_stack(int dtype, const int64_t* plan, int64_t num_layers, void* x, int64_t num_tokens,
                     int64_t hidden, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                     int64_t intermediate, float eps,
                     const float* cos, const float* sin, const int64_t* slots, int64_t num_decode,
                     const int64_t* decode_tables, int64_t decode_stride, int64_t decode_width,
                     const int64_t* decode_lens, int64_t num_chunks, const int64_t* chunk_tables,
                     int64_t chunk_stride, int64_t chunk_width, const int64_t* query_lens,
                     const int64_t* context_lens, const int64_t* out_rows, int64_t num_out, int cache_dtype,
                     int64_t num_blocks, int64_t block_size, float scale, void* scratch, int num_threads) {
  if (!parts_match(plan, num_layers, dtype)) return 1;
  int64_t prompt_rows = 0;
  for (int64_t c = 0; c < num_chunks; ++c) prompt_rows += query_lens[c];
  if (num_decode < 0 || prompt_rows != num_tokens - num_decode || !ascending_rows(out_rows, num_out, num_tokens))
    return 2;
  const Rows all{num_tokens, num_decode,   decode_tables, decode_stride, decode_width, decode_lens,
                 num_chunks, chunk_tables, chunk_stride,  chunk_width,   query_lens,   context_lens};
  return tw::with_query_type(dtype, [&](auto* type) {
    using T = std::remove_pointer_t<decltype(type)>;
    return run(plan, num_layers, static_cast<T*>(x), num_tokens, hidden, num_heads, num_kv_heads, head_dim,
               intermediate, eps, cos, sin, slots, all, out_rows, num_out, cache_dtype, num_blocks, block_size, scale,
               scratch, num_threads);
  });
}

}  // extern "C"

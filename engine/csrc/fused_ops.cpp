// Row-wise operations of a decoder layer that torch runs as several small kernels each: RMSNorm,
// rotary embedding (in place) and SiLU-and-multiply. For one decode token a torch op costs more in
// dispatch than in arithmetic, so one call here replaces three to eight of them.
//
// Every result equals torch's formula computed in float32 and rounded where the torch code rounds;
// rows are parallel only when there is enough work to pay for waking the threads.

#include <cmath>
#include <cstdint>

#include "common.h"

namespace {

using tw::round_to;
using tw::store;
using tw::to_float;

// Below this many elements, one thread is faster than a parallel region.
constexpr int64_t kParallelElements = 1 << 15;

// out[t] = x[t] / sqrt(mean(x[t]^2) + eps) * weight, as RMSNorm.forward: in float32, the
// normalized row rounded to T before the weight multiplies it (a no-op for float32).
template <typename T>
void rms_norm(const T* x, int64_t x_stride, const T* weight, T* out, int64_t out_stride, int64_t rows,
              int64_t dim, float eps, int num_threads) {
#pragma omp parallel for num_threads(num_threads) if (rows * dim >= kParallelElements)
  for (int64_t t = 0; t < rows; ++t) {
    const T* xr = x + t * x_stride;
    T* o = out + t * out_stride;
    float sum = 0.f;
#pragma omp simd reduction(+ : sum)
    for (int64_t i = 0; i < dim; ++i) sum += to_float(xr[i]) * to_float(xr[i]);
    const float r = 1.f / std::sqrt(sum / static_cast<float>(dim) + eps);
    for (int64_t i = 0; i < dim; ++i) store(round_to<T>(to_float(xr[i]) * r) * to_float(weight[i]), o + i);
  }
}

// Rotates the two halves of each head in place: x1' = x1 cos - x2 sin, x2' = x2 cos + x1 sin, with
// the angle of the row's position (cos, sin: [rows, head_dim] float32, halves equal).
template <typename T>
void rotary(T* x, int64_t row_stride, int64_t rows, int64_t heads, int64_t head_dim, const float* cos,
            const float* sin, int num_threads) {
  const int64_t half = head_dim / 2;
#pragma omp parallel for num_threads(num_threads) if (rows * heads * head_dim >= kParallelElements)
  for (int64_t t = 0; t < rows; ++t) {
    const float* c = cos + t * head_dim;
    const float* s = sin + t * head_dim;
    for (int64_t h = 0; h < heads; ++h) {
      T* v = x + t * row_stride + h * head_dim;
#pragma omp simd
      for (int64_t i = 0; i < half; ++i) {
        const float a = to_float(v[i]), b = to_float(v[i + half]);
        store(a * c[i] - b * s[i], v + i);
        store(b * c[i + half] + a * s[i + half], v + i + half);
      }
    }
  }
}

// out[t, i] = silu(gate) * up for gate = x[t, i], up = x[t, width + i]; each factor rounded to T
// as torch's F.silu(gate) * up rounds it.
template <typename T>
void silu_and_mul(const T* x, int64_t x_stride, T* out, int64_t rows, int64_t width, int num_threads) {
#pragma omp parallel for num_threads(num_threads) if (rows * width >= kParallelElements)
  for (int64_t t = 0; t < rows; ++t) {
    const T* g = x + t * x_stride;
    const T* u = g + width;
    T* o = out + t * width;
#pragma omp simd
    for (int64_t i = 0; i < width; ++i) {
      const float a = to_float(g[i]);
      store(round_to<T>(a / (1.f + std::exp(-a))) * to_float(u[i]), o + i);
    }
  }
}

}  // namespace

extern "C" {

// Each returns 0 on success and 1 for an element type it does not handle.

int tw_rms_norm(int dtype, const void* x, int64_t x_stride, const void* weight, void* out, int64_t out_stride,
                int64_t rows, int64_t dim, float eps, int num_threads) {
  switch (dtype) {
    case tw::kFloat32:
      rms_norm(static_cast<const float*>(x), x_stride, static_cast<const float*>(weight), static_cast<float*>(out),
               out_stride, rows, dim, eps, num_threads);
      return 0;
    case tw::kBFloat16:
      rms_norm(static_cast<const uint16_t*>(x), x_stride, static_cast<const uint16_t*>(weight),
               static_cast<uint16_t*>(out), out_stride, rows, dim, eps, num_threads);
      return 0;
    default:
      return 1;
  }
}

int tw_rotary(int dtype, void* x, int64_t row_stride, int64_t rows, int64_t heads, int64_t head_dim,
              const float* cos, const float* sin, int num_threads) {
  switch (dtype) {
    case tw::kFloat32:
      rotary(static_cast<float*>(x), row_stride, rows, heads, head_dim, cos, sin, num_threads);
      return 0;
    case tw::kBFloat16:
      rotary(static_cast<uint16_t*>(x), row_stride, rows, heads, head_dim, cos, sin, num_threads);
      return 0;
    default:
      return 1;
  }
}

int tw_silu_and_mul(int dtype, const void* x, int64_t x_stride, void* out, int64_t rows, int64_t width,
                    int num_threads) {
  switch (dtype) {
    case tw::kFloat32:
      silu_and_mul(static_cast<const float*>(x), x_stride, static_cast<float*>(out), rows, width, num_threads);
      return 0;
    case tw::kBFloat16:
      silu_and_mul(static_cast<const uint16_t*>(x), x_stride, static_cast<uint16_t*>(out), rows, width,
                   num_threads);
      return 0;
    default:
      return 1;
  }
}

}  // extern "C"

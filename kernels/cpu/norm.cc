#include "kernels/norm.h"

#include <cmath>

namespace pds::kernels::cpu {
namespace {
inline void NormRow(const float* x, const float* w, float* out, int64_t cols, float eps) {
  double sum = 0.0;
  for (int64_t c = 0; c < cols; ++c) sum += static_cast<double>(x[c]) * x[c];
  const float inv = static_cast<float>(1.0 / std::sqrt(sum / cols + eps));
  for (int64_t c = 0; c < cols; ++c) out[c] = x[c] * inv * w[c];
}
}  // namespace

void RmsNorm(const float* x, int64_t x_stride, const float* w, float* out, int64_t out_stride,
             int64_t rows, int64_t cols, float eps) {
  for (int64_t r = 0; r < rows; ++r) NormRow(x + r * x_stride, w, out + r * out_stride, cols, eps);
}

void AddRmsNorm(float* residual, const float* delta, const float* w, float* out, int64_t rows,
                int64_t cols, float eps) {
  for (int64_t r = 0; r < rows; ++r) {
    float* x = residual + r * cols;
    const float* d = delta + r * cols;
    for (int64_t c = 0; c < cols; ++c) x[c] += d[c];
    NormRow(x, w, out + r * cols, cols, eps);
  }
}

void HeadRmsNorm(float* x, int64_t token_stride, const float* w, int64_t tokens, int64_t heads,
                 int64_t head_dim, float eps) {
  for (int64_t t = 0; t < tokens; ++t) {
    for (int64_t h = 0; h < heads; ++h) {
      float* row = x + t * token_stride + h * head_dim;
      NormRow(row, w, row, head_dim, eps);
    }
  }
}

}  // namespace pds::kernels::cpu

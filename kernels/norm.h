// RMSNorm variants: out = x * w / sqrt(mean(x^2) + eps) over the last dimension.
#pragma once

#include <cstdint>

namespace pds::kernels::cpu {

// x: [rows, cols] row stride x_stride; w: [cols]; out: [rows, cols] row stride out_stride.
// out may alias x.
void RmsNorm(const float* x, int64_t x_stride, const float* w, float* out, int64_t out_stride,
             int64_t rows, int64_t cols, float eps);

// residual[rows, cols] += delta[rows, cols]; out = RmsNorm(residual). All contiguous.
void AddRmsNorm(float* residual, const float* delta, const float* w, float* out, int64_t rows,
                int64_t cols, float eps);

// Per-head RMSNorm in place (Qwen3 q/k norm): x is [tokens, heads, head_dim] with row
// (token) stride token_stride; w: [head_dim].
void HeadRmsNorm(float* x, int64_t token_stride, const float* w, int64_t tokens, int64_t heads,
                 int64_t head_dim, float eps);

}  // namespace pds::kernels::cpu

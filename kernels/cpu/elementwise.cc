#include "kernels/elementwise.h"

#include <cmath>
#include <cstring>

namespace pds::kernels::cpu {

void Embed(const float* table, const int32_t* ids, float* out, int64_t tokens, int64_t hidden) {
  for (int64_t t = 0; t < tokens; ++t) {
    std::memcpy(out + t * hidden, table + static_cast<int64_t>(ids[t]) * hidden,
                hidden * sizeof(float));
  }
}

void AddBias(float* x, int64_t x_stride, const float* bias, int64_t rows, int64_t cols) {
  for (int64_t r = 0; r < rows; ++r) {
    float* row = x + r * x_stride;
    for (int64_t c = 0; c < cols; ++c) row[c] += bias[c];
  }
}

void Add(float* x, const float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] += y[i];
}

void SiluGate(const float* gate_up, float* out, int64_t tokens, int64_t inter) {
  for (int64_t t = 0; t < tokens; ++t) {
    const float* g = gate_up + t * 2 * inter;
    const float* u = g + inter;
    float* o = out + t * inter;
    for (int64_t i = 0; i < inter; ++i) o[i] = g[i] / (1.0f + std::exp(-g[i])) * u[i];
  }
}

void GatherRows(const float* x, const int32_t* rows, float* out, int64_t n, int64_t cols) {
  for (int64_t r = 0; r < n; ++r) {
    std::memcpy(out + r * cols, x + static_cast<int64_t>(rows[r]) * cols, cols * sizeof(float));
  }
}

}  // namespace pds::kernels::cpu

#include "kernels/rope.h"

#include <cmath>

namespace pds::kernels::cpu {

void RopeCosSin(const int32_t* positions, const float* inv_freq, float* cos, float* sin,
                int64_t tokens, int64_t half) {
  for (int64_t t = 0; t < tokens; ++t) {
    for (int64_t j = 0; j < half; ++j) {
      const double angle = static_cast<double>(positions[t]) * static_cast<double>(inv_freq[j]);
      cos[t * half + j] = static_cast<float>(std::cos(angle));
      sin[t * half + j] = static_cast<float>(std::sin(angle));
    }
  }
}

void ApplyRope(float* x, int64_t token_stride, const float* cos, const float* sin, int64_t tokens,
               int64_t heads, int64_t half) {
  for (int64_t t = 0; t < tokens; ++t) {
    const float* c = cos + t * half;
    const float* s = sin + t * half;
    for (int64_t h = 0; h < heads; ++h) {
      float* v = x + t * token_stride + h * 2 * half;
      for (int64_t j = 0; j < half; ++j) {
        const float a = v[j];
        const float b = v[j + half];
        v[j] = a * c[j] - b * s[j];
        v[j + half] = b * c[j] + a * s[j];
      }
    }
  }
}

}  // namespace pds::kernels::cpu

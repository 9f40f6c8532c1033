// Rotary position embedding, HF rotate-half convention on HF weight layout:
// out[j] = x[j] cos - x[j + d/2] sin, out[j + d/2] = x[j + d/2] cos + x[j] sin.
#pragma once

#include <cstdint>

namespace pds::kernels::cpu {

// cos/sin: [tokens, half] with angle = positions[t] * inv_freq[j]; inv_freq: [half].
// Angles are computed in double so that long positions keep full float precision.
void RopeCosSin(const int32_t* positions, const float* inv_freq, float* cos, float* sin,
                int64_t tokens, int64_t half);

// In place on x: [tokens, heads, 2 * half] with token stride token_stride.
void ApplyRope(float* x, int64_t token_stride, const float* cos, const float* sin, int64_t tokens,
               int64_t heads, int64_t half);

}  // namespace pds::kernels::cpu

// Matrix products in the layout of linear layers: weights are [out, in] (as in HF files).
#pragma once

#include <cstdint>

namespace pds::kernels::cpu {

// c[m, n] = a[m, k] * w[n, k]^T (+ c if accumulate).
// a: [m, k] row stride lda; w: [n, k] contiguous; c: [m, n] row stride ldc.
void Gemm(const float* a, int64_t lda, const float* w, float* c, int64_t ldc, int64_t m, int64_t n,
          int64_t k, bool accumulate = false);

}  // namespace pds::kernels::cpu

#include "kernels/gemm.h"

#include <cblas.h>

namespace pds::kernels::cpu {

void Gemm(const float* a, int64_t lda, const float* w, float* c, int64_t ldc, int64_t m, int64_t n,
          int64_t k, bool accumulate) {
  if (m == 0 || n == 0) return;
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<int>(m), static_cast<int>(n),
              static_cast<int>(k), 1.0f, a, static_cast<int>(lda), w, static_cast<int>(k),
              accumulate ? 1.0f : 0.0f, c, static_cast<int>(ldc));
}

}  // namespace pds::kernels::cpu

#include "kernels/gemm.h"

#include <cblas.h>

#include <algorithm>

#include "kernels/threads.h"

namespace pds::kernels::cpu {

// OpenBLAS runs single-threaded (threads.cc sets it); the output columns are split across
// our own pool instead, so one pool owns every core and nothing spins against it.
void Gemm(const float* a, int64_t lda, const float* w, float* c, int64_t ldc, int64_t m, int64_t n,
          int64_t k, bool accumulate) {
  if (m == 0 || n == 0) return;
  constexpr int64_t kAlign = 64;
  const int64_t threads = std::min<int64_t>(NumThreads(), (n + kAlign - 1) / kAlign);
  const int64_t per = (n + threads - 1) / threads;
  const int64_t chunk = (per + kAlign - 1) / kAlign * kAlign;
  ParallelFor((n + chunk - 1) / chunk, [&](int64_t begin, int64_t end) {
    for (int64_t part = begin; part < end; ++part) {
      const int64_t n0 = part * chunk;
      const int64_t cols = std::min(chunk, n - n0);
      if (m == 1) {  // a matrix-vector product: OpenBLAS's gemv path is the faster one
        cblas_sgemv(CblasRowMajor, CblasNoTrans, static_cast<int>(cols), static_cast<int>(k), 1.0f,
                    w + n0 * k, static_cast<int>(k), a, 1, accumulate ? 1.0f : 0.0f, c + n0, 1);
        continue;
      }
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, static_cast<int>(m),
                  static_cast<int>(cols), static_cast<int>(k), 1.0f, a, static_cast<int>(lda),
                  w + n0 * k, static_cast<int>(k), accumulate ? 1.0f : 0.0f, c + n0,
                  static_cast<int>(ldc));
    }
  });
}

}  // namespace pds::kernels::cpu

#include "kernels/gemm.h"

#include <cblas.h>

#include <algorithm>

#include "kernels/cpu/simd.h"
#include "kernels/threads.h"

namespace pds::kernels::cpu {
namespace {

// Up to this many rows, products read each weight row once for all rows of `a`: the weight
// stream is the cost, and OpenBLAS's small-M sgemm re-reads it (measured on 1536x512, 2
// threads: sgemm took 1.8x the one-row time from 2 rows on; this kernel keeps 1 to 4 rows at
// the one-row time). Past 4 rows the loads of `a` bound this simple loop, and sgemm is as
// fast; a register-blocked micro-kernel would be the next step.
constexpr int64_t kSmallM = 8;  // up to here the weight-streaming kernels beat sgemm

}  // namespace

// c[i, j] (+)= a[i, :] . w[j, :] for i < m <= 4 (8), j in [n0, n1): each weight row is read
// once for all m rows (decode batches are bound by reading the weights). Rows past m alias
// row 0 and their sums are dropped, so one loop body serves every m. Not in the anonymous
// namespace: GCC's target_clones warns on internal-linkage functions.
PDS_SIMD_CLONES void SmallMGemm4(const float* a, int64_t lda, const float* w, float* c, int64_t ldc,
                                 int64_t m, int64_t n0, int64_t n1, int64_t k, bool accumulate) {
  const float* r0 = a;
  const float* r1 = a + (m > 1 ? lda : 0);
  const float* r2 = a + (m > 2 ? 2 * lda : 0);
  const float* r3 = a + (m > 3 ? 3 * lda : 0);
  for (int64_t j = n0; j < n1; ++j) {
    const float* wr = w + j * k;
    float s0 = 0, s1 = 0, s2 = 0, s3 = 0;
#pragma omp simd reduction(+ : s0, s1, s2, s3)
    for (int64_t p = 0; p < k; ++p) {
      const float x = wr[p];
      s0 += r0[p] * x;
      s1 += r1[p] * x;
      s2 += r2[p] * x;
      s3 += r3[p] * x;
    }
    const float sums[4] = {s0, s1, s2, s3};
    for (int64_t i = 0; i < m; ++i) {
      c[i * ldc + j] = accumulate ? c[i * ldc + j] + sums[i] : sums[i];
    }
  }
}

// The same for 4 < m <= 8.
PDS_SIMD_CLONES void SmallMGemm8(const float* a, int64_t lda, const float* w, float* c, int64_t ldc,
                                 int64_t m, int64_t n0, int64_t n1, int64_t k, bool accumulate) {
  const float* r0 = a;
  const float* r1 = a + lda;
  const float* r2 = a + 2 * lda;
  const float* r3 = a + 3 * lda;
  const float* r4 = a + 4 * lda;
  const float* r5 = a + (m > 5 ? 5 * lda : 0);
  const float* r6 = a + (m > 6 ? 6 * lda : 0);
  const float* r7 = a + (m > 7 ? 7 * lda : 0);
  for (int64_t j = n0; j < n1; ++j) {
    const float* wr = w + j * k;
    float s0 = 0, s1 = 0, s2 = 0, s3 = 0, s4 = 0, s5 = 0, s6 = 0, s7 = 0;
#pragma omp simd reduction(+ : s0, s1, s2, s3, s4, s5, s6, s7)
    for (int64_t p = 0; p < k; ++p) {
      const float x = wr[p];
      s0 += r0[p] * x;
      s1 += r1[p] * x;
      s2 += r2[p] * x;
      s3 += r3[p] * x;
      s4 += r4[p] * x;
      s5 += r5[p] * x;
      s6 += r6[p] * x;
      s7 += r7[p] * x;
    }
    const float sums[8] = {s0, s1, s2, s3, s4, s5, s6, s7};
    for (int64_t i = 0; i < m; ++i) {
      c[i * ldc + j] = accumulate ? c[i * ldc + j] + sums[i] : sums[i];
    }
  }
}

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
      if (m <= 4) {
        SmallMGemm4(a, lda, w, c, ldc, m, n0, n0 + cols, k, accumulate);
        continue;
      }
      if (m <= kSmallM) {
        SmallMGemm8(a, lda, w, c, ldc, m, n0, n0 + cols, k, accumulate);
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

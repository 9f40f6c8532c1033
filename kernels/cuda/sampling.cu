// Greedy selection on the GPU: one block per row of fp32 logits.
#include <cfloat>

#include "kernels/cuda/common.cuh"

namespace pds::kernels::cuda {
namespace {

// (value, index) better than the other: larger value, then lower index; NaN never wins.
__device__ __forceinline__ bool Better(float v, int32_t i, float ov, int32_t oi) {
  if (isnan(v)) return false;
  if (isnan(ov)) return true;
  return v > ov || (v == ov && i < oi);
}

__global__ void ArgmaxKernel(const float* logits, int64_t n, int32_t* ids) {
  const float* row = logits + blockIdx.x * n;
  float best = NAN;
  int32_t best_i = 0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    if (Better(row[i], static_cast<int32_t>(i), best, best_i)) {
      best = row[i];
      best_i = static_cast<int32_t>(i);
    }
  }
  for (int o = 16; o > 0; o >>= 1) {
    const float ov = __shfl_xor_sync(0xffffffffu, best, o);
    const int32_t oi = __shfl_xor_sync(0xffffffffu, best_i, o);
    if (Better(ov, oi, best, best_i)) {
      best = ov;
      best_i = oi;
    }
  }
  __shared__ float vals[32];
  __shared__ int32_t idx[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) {
    vals[warp] = best;
    idx[warp] = best_i;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < static_cast<int>(blockDim.x >> 5); ++w) {
      if (Better(vals[w], idx[w], best, best_i)) {
        best = vals[w];
        best_i = idx[w];
      }
    }
    ids[blockIdx.x] = best_i;
  }
}

}  // namespace

cudaError_t ArgmaxRows(const float* logits, int64_t rows, int64_t n, int32_t* ids,
                       cudaStream_t stream) {
  if (rows <= 0) return cudaSuccess;
  ArgmaxKernel<<<static_cast<unsigned>(rows), 1024, 0, stream>>>(logits, n, ids);
  return cudaGetLastError();
}

}  // namespace pds::kernels::cuda

// RMSNorm variants (twins of kernels/cpu/norm.cc): one block per row, fp32 sums.
#include "kernels/cuda/common.cuh"

namespace pds::kernels::cuda {
namespace {

inline int ThreadsFor(int64_t cols) {
  if (cols >= 1024) return 256;
  if (cols >= 256) return 128;
  return 32;
}

// out = x * w / sqrt(mean(x^2) + eps) for one row; x may alias out.
template <typename T>
__device__ void NormRow(const T* x, const T* w, T* out, int64_t cols, float eps, float* scratch) {
  float sum = 0.0f;
  for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) {
    const float v = ToFloat(x[c]);
    sum += v * v;
  }
  const float inv = rsqrtf(BlockSum(sum, scratch) / static_cast<float>(cols) + eps);
  for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) {
    out[c] = FromFloat<T>(ToFloat(x[c]) * inv * ToFloat(w[c]));
  }
}

template <typename T>
__global__ void RmsNormKernel(const T* x, int64_t x_stride, const T* w, T* out, int64_t out_stride,
                              int64_t cols, float eps) {
  __shared__ float scratch[32];
  const int64_t r = blockIdx.x;
  NormRow(x + r * x_stride, w, out + r * out_stride, cols, eps, scratch);
}

template <typename T>
__global__ void AddRmsNormKernel(T* residual, const T* delta, const T* w, T* out, int64_t cols,
                                 float eps) {
  __shared__ float scratch[32];
  const int64_t r = blockIdx.x;
  T* x = residual + r * cols;
  const T* d = delta + r * cols;
  for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) {
    x[c] = FromFloat<T>(ToFloat(x[c]) + ToFloat(d[c]));
  }
  // Each thread reads back only the columns it wrote, so no barrier is needed here.
  NormRow(x, w, out + r * cols, cols, eps, scratch);
}

// One warp per (token, head).
template <typename T>
__global__ void HeadRmsNormKernel(T* x, int64_t token_stride, const T* w, int64_t tokens,
                                  int64_t heads, int64_t head_dim, float eps) {
  const int64_t item = blockIdx.x * int64_t{blockDim.x / 32} + threadIdx.x / 32;
  if (item >= tokens * heads) return;
  const int lane = threadIdx.x & 31;
  T* row = x + (item / heads) * token_stride + (item % heads) * head_dim;
  float sum = 0.0f;
  for (int64_t c = lane; c < head_dim; c += 32) {
    const float v = ToFloat(row[c]);
    sum += v * v;
  }
  const float inv = rsqrtf(WarpSum(sum) / static_cast<float>(head_dim) + eps);
  for (int64_t c = lane; c < head_dim; c += 32) {
    row[c] = FromFloat<T>(ToFloat(row[c]) * inv * ToFloat(w[c]));
  }
}

}  // namespace

cudaError_t RmsNorm(Half16 t, const void* x, int64_t x_stride, const void* w, void* out,
                    int64_t out_stride, int64_t rows, int64_t cols, float eps,
                    cudaStream_t stream) {
  if (rows <= 0) return cudaSuccess;
  return Dispatch16(t, [&](auto z) {
    using T = decltype(z);
    RmsNormKernel<<<static_cast<unsigned>(rows), ThreadsFor(cols), 0, stream>>>(
        static_cast<const T*>(x), x_stride, static_cast<const T*>(w), static_cast<T*>(out),
        out_stride, cols, eps);
    return cudaGetLastError();
  });
}

cudaError_t AddRmsNorm(Half16 t, void* residual, const void* delta, const void* w, void* out,
                       int64_t rows, int64_t cols, float eps, cudaStream_t stream) {
  if (rows <= 0) return cudaSuccess;
  return Dispatch16(t, [&](auto z) {
    using T = decltype(z);
    AddRmsNormKernel<<<static_cast<unsigned>(rows), ThreadsFor(cols), 0, stream>>>(
        static_cast<T*>(residual), static_cast<const T*>(delta), static_cast<const T*>(w),
        static_cast<T*>(out), cols, eps);
    return cudaGetLastError();
  });
}

cudaError_t HeadRmsNorm(Half16 t, void* x, int64_t token_stride, const void* w, int64_t tokens,
                        int64_t heads, int64_t head_dim, float eps, cudaStream_t stream) {
  const int64_t items = tokens * heads;
  if (items <= 0) return cudaSuccess;
  return Dispatch16(t, [&](auto z) {
    using T = decltype(z);
    HeadRmsNormKernel<<<Blocks(items, 8), 256, 0, stream>>>(
        static_cast<T*>(x), token_stride, static_cast<const T*>(w), tokens, heads, head_dim, eps);
    return cudaGetLastError();
  });
}

}  // namespace pds::kernels::cuda

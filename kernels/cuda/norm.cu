// RMSNorm variants (twins of kernels/cpu/norm.cc): one block per row, fp32 sums.
#include <initializer_list>

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
  PdlWaitAndTrigger();
  __shared__ float scratch[32];
  const int64_t r = blockIdx.x;
  NormRow(x + r * x_stride, w, out + r * out_stride, cols, eps, scratch);
}

template <typename T>
__global__ void AddRmsNormKernel(T* residual, const T* delta, const T* w, T* out, int64_t cols,
                                 float eps) {
  PdlWaitAndTrigger();
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
  PdlWaitAndTrigger();
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

// Rows of up to 8192 columns with 16-byte aligned rows: one thread per 8 columns, each row
// read once into registers (the residual add, the sum of squares and the scaling all from
// them). At batch 1 a row is one block, so this is latency, not bandwidth: one load per
// thread instead of a loop of dependent 2-byte loads.
constexpr int kVecMaxCols = 8 * 1024;

template <typename T>
__global__ void RmsNormVecKernel(const T* x, int64_t x_stride, T* residual, const T* delta,
                                 const T* w, T* out, int64_t out_stride, int64_t cols, float eps) {
  PdlWaitAndTrigger();
  __shared__ float scratch[32];
  const int64_t r = blockIdx.x;
  const int64_t c = int64_t{threadIdx.x} * 8;
  const bool active = c < cols;
  float v[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  if (active) {
    if (residual != nullptr) {  // residual += delta, rounded, then normed
      float d[8];
      Load8(residual + r * cols + c, v);
      Load8(delta + r * cols + c, d);
#pragma unroll
      for (int i = 0; i < 8; ++i) v[i] = v[i] + d[i];
      const uint4 packed = Pack8<T>(v);
      *reinterpret_cast<uint4*>(residual + r * cols + c) = packed;
      Unpack8<T>(packed, v);
    } else {
      Load8(x + r * x_stride + c, v);
    }
  }
  float sum = 0.0f;
#pragma unroll
  for (int i = 0; i < 8; ++i) sum += v[i] * v[i];
  const float inv = rsqrtf(BlockSum(sum, scratch) / static_cast<float>(cols) + eps);
  if (!active) return;
  float wv[8];
  Load8(w + c, wv);
#pragma unroll
  for (int i = 0; i < 8; ++i) v[i] = v[i] * inv * wv[i];
  const int64_t at = residual != nullptr ? r * cols + c : r * out_stride + c;
  *reinterpret_cast<uint4*>(out + at) = Pack8<T>(v);
}

bool VecOk(int64_t cols, std::initializer_list<const void*> ptrs,
           std::initializer_list<int64_t> strides) {
  if (cols % 8 != 0 || cols > kVecMaxCols) return false;
  for (const void* p : ptrs) {
    if (reinterpret_cast<uintptr_t>(p) % 16 != 0) return false;
  }
  for (int64_t s : strides) {
    if (s % 8 != 0) return false;
  }
  return true;
}

inline int VecThreads(int64_t cols) { return static_cast<int>((cols / 8 + 31) / 32 * 32); }

}  // namespace

cudaError_t RmsNorm(Half16 t, const void* x, int64_t x_stride, const void* w, void* out,
                    int64_t out_stride, int64_t rows, int64_t cols, float eps,
                    cudaStream_t stream) {
  if (rows <= 0) return cudaSuccess;
  if (VecOk(cols, {x, w, out}, {x_stride, out_stride})) {
    return Dispatch16(t, [&](auto z) {
      using T = decltype(z);
      LaunchKernel(RmsNormVecKernel<T>, static_cast<unsigned>(rows), VecThreads(cols), 0, stream,
                   static_cast<const T*>(x), x_stride, nullptr, nullptr, static_cast<const T*>(w),
                   static_cast<T*>(out), out_stride, cols, eps);
      return cudaGetLastError();
    });
  }
  return Dispatch16(t, [&](auto z) {
    using T = decltype(z);
    LaunchKernel(RmsNormKernel<T>, static_cast<unsigned>(rows), ThreadsFor(cols), 0, stream,
                 static_cast<const T*>(x), x_stride, static_cast<const T*>(w), static_cast<T*>(out),
                 out_stride, cols, eps);
    return cudaGetLastError();
  });
}

cudaError_t AddRmsNorm(Half16 t, void* residual, const void* delta, const void* w, void* out,
                       int64_t rows, int64_t cols, float eps, cudaStream_t stream) {
  if (rows <= 0) return cudaSuccess;
  if (VecOk(cols, {residual, delta, w, out}, {})) {
    return Dispatch16(t, [&](auto z) {
      using T = decltype(z);
      LaunchKernel(RmsNormVecKernel<T>, static_cast<unsigned>(rows), VecThreads(cols), 0, stream,
                   nullptr, 0, static_cast<T*>(residual), static_cast<const T*>(delta),
                   static_cast<const T*>(w), static_cast<T*>(out), cols, cols, eps);
      return cudaGetLastError();
    });
  }
  return Dispatch16(t, [&](auto z) {
    using T = decltype(z);
    LaunchKernel(AddRmsNormKernel<T>, static_cast<unsigned>(rows), ThreadsFor(cols), 0, stream,
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
    LaunchKernel(HeadRmsNormKernel<T>, Blocks(items, 8), 256, 0, stream, static_cast<T*>(x),
                 token_stride, static_cast<const T*>(w), tokens, heads, head_dim, eps);
    return cudaGetLastError();
  });
}

}  // namespace pds::kernels::cuda

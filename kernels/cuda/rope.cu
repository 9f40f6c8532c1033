// Rotary position embedding (twin of kernels/cpu/rope.cc): a cos/sin table per batch with
// angles in double, then rotate-half applied to q and k in place.
#include "kernels/cuda/common.cuh"

namespace pds::kernels::cuda {
namespace {

__global__ void RopeCosSinKernel(const int32_t* positions, const float* inv_freq, float* cos_out,
                                 float* sin_out, int64_t tokens, int64_t half) {
  PdlWaitAndTrigger();
  const int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x;
  if (i >= tokens * half) return;
  const int64_t t = i / half, j = i - t * half;
  const double angle = static_cast<double>(positions[t]) * static_cast<double>(inv_freq[j]);
  double s, c;
  sincos(angle, &s, &c);
  cos_out[i] = static_cast<float>(c);
  sin_out[i] = static_cast<float>(s);
}

// One thread per (token, head, j < half) over q heads then k heads.
template <typename T>
__global__ void ApplyRopeKernel(T* q, T* k, int64_t token_stride, const float* cos_t,
                                const float* sin_t, int64_t tokens, int64_t q_heads,
                                int64_t kv_heads, int64_t half) {
  PdlWaitAndTrigger();
  const int64_t heads = q_heads + kv_heads;
  const int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x;
  if (i >= tokens * heads * half) return;
  const int64_t j = i % half;
  const int64_t h = (i / half) % heads;
  const int64_t t = i / (half * heads);
  T* row = h < q_heads ? q + t * token_stride + h * 2 * half
                       : k + t * token_stride + (h - q_heads) * 2 * half;
  const float c = cos_t[t * half + j], s = sin_t[t * half + j];
  const float x1 = ToFloat(row[j]), x2 = ToFloat(row[j + half]);
  row[j] = FromFloat<T>(x1 * c - x2 * s);
  row[j + half] = FromFloat<T>(x2 * c + x1 * s);
}

}  // namespace

cudaError_t RopeCosSin(const int32_t* positions, const float* inv_freq, float* cos, float* sin,
                       int64_t tokens, int64_t half, cudaStream_t stream) {
  if (tokens * half <= 0) return cudaSuccess;
  LaunchKernel(RopeCosSinKernel, Blocks(tokens * half, 256), 256, 0, stream, positions, inv_freq,
               cos, sin, tokens, half);
  return cudaGetLastError();
}

cudaError_t ApplyRope(Half16 t, void* q, void* k, int64_t token_stride, const float* cos,
                      const float* sin, int64_t tokens, int64_t q_heads, int64_t kv_heads,
                      int64_t half, cudaStream_t stream) {
  const int64_t n = tokens * (q_heads + kv_heads) * half;
  if (n <= 0) return cudaSuccess;
  return Dispatch16(t, [&](auto z) {
    using T = decltype(z);
    LaunchKernel(ApplyRopeKernel<T>, Blocks(n, 256), 256, 0, stream, static_cast<T*>(q),
                 static_cast<T*>(k), token_stride, cos, sin, tokens, q_heads, kv_heads, half);
    return cudaGetLastError();
  });
}

}  // namespace pds::kernels::cuda

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

// Rotates the pair (row[j], row[j + half]) by the angle of (c, s), in place; returns the new
// values. The one rotation both kernels below use, so that the fused op rounds exactly as
// ApplyRope does.
template <typename T>
__device__ __forceinline__ void RotatePair(T* row, int64_t j, int64_t half, float c, float s) {
  const float x1 = ToFloat(row[j]), x2 = ToFloat(row[j + half]);
  row[j] = FromFloat<T>(x1 * c - x2 * s);
  row[j + half] = FromFloat<T>(x2 * c + x1 * s);
}

// Thread i's item in both kernels below: token t, head h (q heads, then KV heads), pair j.
struct RopeItem {
  int64_t t, h, j;
};
__device__ __forceinline__ RopeItem RopeItemOf(int64_t i, int64_t heads, int64_t half) {
  return {i / (half * heads), (i / half) % heads, i % half};
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
  const auto [t, h, j] = RopeItemOf(i, heads, half);
  T* row = h < q_heads ? q + t * token_stride + h * 2 * half
                       : k + t * token_stride + (h - q_heads) * 2 * half;
  RotatePair(row, j, half, cos_t[t * half + j], sin_t[t * half + j]);
}

// ApplyRope and WriteKv in one launch (one thread per (token, head, j < half) as there): a
// thread of a KV head also stores its rotated K pair and the V pair at the same dims into the
// token's cache slot (none for a negative slot).
template <typename T>
__global__ void RopeWriteKvKernel(T* q, T* k, const T* v, int64_t token_stride, const float* cos_t,
                                  const float* sin_t, const int32_t* slots, int64_t tokens,
                                  int64_t q_heads, int64_t kv_heads, int64_t half, T* k_cache,
                                  T* v_cache, int64_t block_size) {
  PdlWaitAndTrigger();
  const int64_t heads = q_heads + kv_heads;
  const int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x;
  if (i >= tokens * heads * half) return;
  const auto [t, h, j] = RopeItemOf(i, heads, half);
  const float c = cos_t[t * half + j], s = sin_t[t * half + j];
  if (h < q_heads) {
    RotatePair(q + t * token_stride + h * 2 * half, j, half, c, s);
    return;
  }
  const int64_t kvh = h - q_heads;
  T* row = k + t * token_stride + kvh * 2 * half;
  RotatePair(row, j, half, c, s);
  const int32_t slot = slots[t];
  if (slot < 0) return;
  const int64_t block = slot / block_size, offset = slot % block_size;
  const int64_t dst = ((block * kv_heads + kvh) * block_size + offset) * 2 * half;
  const T* v_row = v + t * token_stride + kvh * 2 * half;
  k_cache[dst + j] = row[j];
  k_cache[dst + j + half] = row[j + half];
  v_cache[dst + j] = v_row[j];
  v_cache[dst + j + half] = v_row[j + half];
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

cudaError_t RopeWriteKv(Half16 t, void* q, void* k, const void* v, int64_t token_stride,
                        const float* cos, const float* sin, const int32_t* slots, int64_t tokens,
                        int64_t q_heads, int64_t kv_heads, int64_t half, void* k_cache,
                        void* v_cache, int64_t block_size, cudaStream_t stream) {
  const int64_t n = tokens * (q_heads + kv_heads) * half;
  if (n <= 0) return cudaSuccess;
  if (block_size <= 0) return cudaErrorInvalidValue;
  return Dispatch16(t, [&](auto z) {
    using T = decltype(z);
    LaunchKernel(RopeWriteKvKernel<T>, Blocks(n, 256), 256, 0, stream, static_cast<T*>(q),
                 static_cast<T*>(k), static_cast<const T*>(v), token_stride, cos, sin, slots,
                 tokens, q_heads, kv_heads, half, static_cast<T*>(k_cache),
                 static_cast<T*>(v_cache), block_size);
    return cudaGetLastError();
  });
}

}  // namespace pds::kernels::cuda

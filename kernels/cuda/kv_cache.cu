// Writing new K/V rows into the paged cache (twin of cpu::WriteKv).
#include "kernels/cuda/common.cuh"

namespace pds::kernels::cuda {
namespace {

// One thread per (token, kv head, dim) element of K and of V.
template <typename T>
__global__ void WriteKvKernel(const T* k, const T* v, int64_t kv_stride, const int32_t* slots,
                              int64_t tokens, T* k_cache, T* v_cache, int64_t kv_heads,
                              int64_t block_size, int64_t head_dim) {
  const int64_t per_token = kv_heads * head_dim;
  const int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x;
  if (i >= tokens * per_token) return;
  const int64_t t = i / per_token, hd = i - t * per_token;
  const int32_t slot = slots[t];
  if (slot < 0) return;
  const int64_t block = slot / block_size, offset = slot % block_size;
  const int64_t h = hd / head_dim, d = hd - h * head_dim;
  const int64_t dst = ((block * kv_heads + h) * block_size + offset) * head_dim + d;
  k_cache[dst] = k[t * kv_stride + hd];
  v_cache[dst] = v[t * kv_stride + hd];
}

}  // namespace

cudaError_t WriteKv(Half16 t, const void* k, const void* v, int64_t kv_stride, const int32_t* slots,
                    int64_t tokens, void* k_cache, void* v_cache, int64_t kv_heads,
                    int64_t block_size, int64_t head_dim, cudaStream_t stream) {
  const int64_t n = tokens * kv_heads * head_dim;
  if (n <= 0) return cudaSuccess;
  return Dispatch16(t, [&](auto z) {
    using T = decltype(z);
    WriteKvKernel<<<Blocks(n, 256), 256, 0, stream>>>(
        static_cast<const T*>(k), static_cast<const T*>(v), kv_stride, slots, tokens,
        static_cast<T*>(k_cache), static_cast<T*>(v_cache), kv_heads, block_size, head_dim);
    return cudaGetLastError();
  });
}

}  // namespace pds::kernels::cuda

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

// Grid (count, 2 * layers): one CUDA block per (cache block, layer and K/V).
__global__ void CopyBlocksKernel(const uint8_t* src, size_t src_pool_bytes, uint8_t* dst,
                                 size_t dst_pool_bytes, const int32_t* src_blocks,
                                 const int32_t* dst_blocks, int32_t layer_begin,
                                 size_t block_bytes) {
  const size_t pool = 2 * static_cast<size_t>(layer_begin) + blockIdx.y;
  const uint4* from = reinterpret_cast<const uint4*>(src + pool * src_pool_bytes +
                                                     src_blocks[blockIdx.x] * block_bytes);
  uint4* to =
      reinterpret_cast<uint4*>(dst + pool * dst_pool_bytes + dst_blocks[blockIdx.x] * block_bytes);
  for (size_t i = threadIdx.x; i < block_bytes / 16; i += blockDim.x) to[i] = from[i];
}

}  // namespace

cudaError_t CopyBlocks(const void* src, size_t src_pool_bytes, void* dst, size_t dst_pool_bytes,
                       const int32_t* src_blocks, const int32_t* dst_blocks, int32_t count,
                       int32_t layer_begin, int32_t layer_end, size_t block_bytes,
                       cudaStream_t stream) {
  if (block_bytes % 16 != 0) return cudaErrorInvalidValue;
  if (count <= 0 || layer_end <= layer_begin) return cudaSuccess;
  const dim3 grid(static_cast<unsigned>(count),
                  static_cast<unsigned>(2 * (layer_end - layer_begin)));
  CopyBlocksKernel<<<grid, 256, 0, stream>>>(static_cast<const uint8_t*>(src), src_pool_bytes,
                                             static_cast<uint8_t*>(dst), dst_pool_bytes, src_blocks,
                                             dst_blocks, layer_begin, block_bytes);
  return cudaGetLastError();
}

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

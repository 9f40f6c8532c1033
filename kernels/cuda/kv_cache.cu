// Writing new K/V rows into the paged cache (twin of cpu::WriteKv).
#include <algorithm>
#include <atomic>
#include <cstdint>

#include "kernels/cuda/common.cuh"

namespace pds::kernels::cuda {
namespace {

// One thread per (token, kv head, dim) element of K and of V.
template <typename T>
__global__ void WriteKvKernel(const T* k, const T* v, int64_t kv_stride, const int32_t* slots,
                              int64_t tokens, T* k_cache, T* v_cache, int64_t kv_heads,
                              int64_t block_size, int64_t head_dim) {
  PdlWaitAndTrigger();
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

constexpr int kCopyThreads = 256;
// 16-byte loads each thread has in flight before its stores: a 32 KiB cache block is one pass
// of a CUDA block (256 threads x 8 x 16 bytes).
constexpr int kCopyUnroll = 8;

// Grid-stride over the (pool, block) items of the layers' K and V pools: item i copies block
// src_blocks[i % count] of pool 2 layer_begin + i / count to block dst_blocks[i % count] of the
// same pool of dst. Each thread issues kCopyUnroll 16-byte streaming loads before it stores
// them, with consecutive threads on consecutive 16-byte words.
__global__ void __launch_bounds__(kCopyThreads)
    CopyBlocksKernel(const uint8_t* __restrict__ src, size_t src_pool_bytes,
                     uint8_t* __restrict__ dst, size_t dst_pool_bytes,
                     const int32_t* __restrict__ src_blocks, const int32_t* __restrict__ dst_blocks,
                     int64_t count, int64_t items, int64_t layer_begin, size_t block_bytes) {
  PdlWaitAndTrigger();
  const int64_t words = static_cast<int64_t>(block_bytes / 16);
  for (int64_t item = blockIdx.x; item < items; item += gridDim.x) {
    const int64_t p = item / count, b = item - p * count;
    const size_t pool = 2 * static_cast<size_t>(layer_begin) + static_cast<size_t>(p);
    const uint4* from = reinterpret_cast<const uint4*>(
        src + pool * src_pool_bytes + static_cast<size_t>(src_blocks[b]) * block_bytes);
    uint4* to = reinterpret_cast<uint4*>(dst + pool * dst_pool_bytes +
                                         static_cast<size_t>(dst_blocks[b]) * block_bytes);
    for (int64_t base = threadIdx.x; base < words; base += kCopyThreads * kCopyUnroll) {
      uint4 v[kCopyUnroll];
#pragma unroll
      for (int u = 0; u < kCopyUnroll; ++u) {
        const int64_t i = base + u * kCopyThreads;
        if (i < words) v[u] = __ldcs(from + i);
      }
#pragma unroll
      for (int u = 0; u < kCopyUnroll; ++u) {
        const int64_t i = base + u * kCopyThreads;
        if (i < words) __stcs(to + i, v[u]);
      }
    }
  }
}

// CUDA blocks of CopyBlocksKernel resident at once on `device` (0: unknown), cached per device.
int CopyBlocksResident(int device) {
  constexpr int kMaxDevices = 64;
  static std::atomic<int> cached[kMaxDevices];  // zero: not known yet
  if (device < 0 || device >= kMaxDevices) return 0;
  int resident = cached[device].load(std::memory_order_relaxed);
  if (resident > 0) return resident;
  int sms = 0, per_sm = 0;
  if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess ||
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, CopyBlocksKernel, kCopyThreads, 0) !=
          cudaSuccess ||
      sms <= 0 || per_sm <= 0) {
    cudaGetLastError();  // not sticky: clear it
    return 0;
  }
  resident = sms * per_sm;
  cached[device].store(resident, std::memory_order_relaxed);
  return resident;
}

}  // namespace

cudaError_t CopyBlocks(const void* src, size_t src_pool_bytes, void* dst, size_t dst_pool_bytes,
                       const int32_t* src_blocks, const int32_t* dst_blocks, int32_t count,
                       int32_t layer_begin, int32_t layer_end, size_t block_bytes,
                       cudaStream_t stream) {
  if (block_bytes % 16 != 0) return cudaErrorInvalidValue;
  if (count <= 0 || layer_end <= layer_begin) return cudaSuccess;
  // The 16-byte accesses need 16-byte aligned pools (every block then is).
  if ((reinterpret_cast<uintptr_t>(src) | reinterpret_cast<uintptr_t>(dst) | src_pool_bytes |
       dst_pool_bytes) %
          16 !=
      0) {
    return cudaErrorMisalignedAddress;
  }
  const int64_t items = int64_t{count} * 2 * (int64_t{layer_end} - layer_begin);
  // As many CUDA blocks as fit on the device at once (each then strides over the items), at
  // most one per item; where the device is unknown, one per item up to a grid-dimension cap.
  int device = -1;
  int resident = cudaGetDevice(&device) == cudaSuccess ? CopyBlocksResident(device) : 0;
  if (resident <= 0) {
    cudaGetLastError();
    resident = 1 << 20;
  }
  const int64_t grid = std::min<int64_t>(items, resident);
  LaunchKernel(CopyBlocksKernel, static_cast<unsigned>(grid), kCopyThreads, 0, stream,
               static_cast<const uint8_t*>(src), src_pool_bytes, static_cast<uint8_t*>(dst),
               dst_pool_bytes, src_blocks, dst_blocks, count, items, layer_begin, block_bytes);
  return cudaGetLastError();
}

cudaError_t WriteKv(Half16 t, const void* k, const void* v, int64_t kv_stride, const int32_t* slots,
                    int64_t tokens, void* k_cache, void* v_cache, int64_t kv_heads,
                    int64_t block_size, int64_t head_dim, cudaStream_t stream) {
  const int64_t n = tokens * kv_heads * head_dim;
  if (n <= 0) return cudaSuccess;
  return Dispatch16(t, [&](auto z) {
    using T = decltype(z);
    LaunchKernel(WriteKvKernel<T>, Blocks(n, 256), 256, 0, stream, static_cast<const T*>(k),
                 static_cast<const T*>(v), kv_stride, slots, tokens, static_cast<T*>(k_cache),
                 static_cast<T*>(v_cache), kv_heads, block_size, head_dim);
    return cudaGetLastError();
  });
}

}  // namespace pds::kernels::cuda

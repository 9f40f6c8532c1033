// Device helpers shared by the kernels of kernels/cuda: 16-bit <-> fp32 conversion, 16-byte
// vector loads, warp reductions and the type dispatch of the launchers.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels/cuda/ops.h"

namespace pds::kernels::cuda {

__device__ __forceinline__ float ToFloat(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float ToFloat(__half v) { return __half2float(v); }

template <typename T>
__device__ __forceinline__ T FromFloat(float v);
template <>
__device__ __forceinline__ __nv_bfloat16 FromFloat<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}
template <>
__device__ __forceinline__ __half FromFloat<__half>(float v) {
  return __float2half_rn(v);
}

// Eight 16-bit values held in one 16-byte word, as floats.
template <typename T>
__device__ __forceinline__ void Unpack8(const uint4& raw, float (&out)[8]) {
  const T* v = reinterpret_cast<const T*>(&raw);
#pragma unroll
  for (int i = 0; i < 8; ++i) out[i] = ToFloat(v[i]);
}

// Eight floats rounded to 16 bits in one 16-byte word.
template <typename T>
__device__ __forceinline__ uint4 Pack8(const float (&in)[8]) {
  uint4 raw;
  T* v = reinterpret_cast<T*>(&raw);
#pragma unroll
  for (int i = 0; i < 8; ++i) v[i] = FromFloat<T>(in[i]);
  return raw;
}

// Eight 16-bit values loaded as one 16-byte access (address 16-byte aligned).
template <typename T>
__device__ __forceinline__ void Load8(const T* p, float (&out)[8]) {
  Unpack8<T>(*reinterpret_cast<const uint4*>(p), out);
}

__device__ __forceinline__ float WarpSum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float WarpMax(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Sum over a block of up to 1024 threads; every thread gets the result. `scratch` holds 32
// floats of shared memory.
__device__ __forceinline__ float BlockSum(float v, float* scratch) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  v = WarpSum(v);
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  const int warps = (blockDim.x + 31) >> 5;
  v = lane < warps ? scratch[lane] : 0.0f;
  return WarpSum(v);
}

inline unsigned Blocks(int64_t n, int threads) {
  return static_cast<unsigned>((n + threads - 1) / threads);
}

// Calls f(T{}) with T the CUDA type of `t`.
template <typename F>
cudaError_t Dispatch16(Half16 t, F&& f) {
  if (t == Half16::kBF16) return f(__nv_bfloat16{});
  return f(__half{});
}

}  // namespace pds::kernels::cuda

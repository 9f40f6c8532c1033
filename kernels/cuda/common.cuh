// Device helpers shared by the kernels of kernels/cuda: 16-bit <-> fp32 conversion, 16-byte
// vector loads, warp reductions and the type dispatch of the launchers.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <utility>

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

// Programmatic dependent launch (Hopper and later). Every kernel of kernels/cuda starts with
// PdlWaitAndTrigger(): it returns once the kernels before it in the stream have completed and
// their writes are visible (a no-op for a kernel launched normally), then lets the next kernel
// in the stream be scheduled at once, so that kernel's launch and prologue overlap this one's
// run instead of following its completion. LaunchKernel launches with that attribute when
// ProgrammaticLaunch() is on.
__device__ __forceinline__ void PdlWaitAndTrigger() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

template <typename... KernelArgs, typename... Args>
void LaunchKernel(void (*kernel)(KernelArgs...), dim3 grid, dim3 block, size_t smem,
                  cudaStream_t stream, Args&&... args) {
  cudaLaunchAttribute attr{};
  attr.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr.val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t config{};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  config.attrs = &attr;
  config.numAttrs = ProgrammaticLaunch() ? 1 : 0;
  // The error (if any) is also the thread's last error, which the launchers return.
  (void)cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...);
}

// Lets `kernel` launch with `bytes` of dynamic shared memory on the current device (above
// 48 KiB a kernel must opt in, per device). Sets the attribute once per kernel and device.
cudaError_t AllowDynamicSmemImpl(const void* kernel, size_t bytes);
template <typename... KernelArgs>
cudaError_t AllowDynamicSmem(void (*kernel)(KernelArgs...), size_t bytes) {
  if (bytes <= 48 * 1024) return cudaSuccess;
  return AllowDynamicSmemImpl(reinterpret_cast<const void*>(kernel), bytes);
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

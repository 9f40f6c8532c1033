// Elementwise ops of the transformer block on 16-bit activations (twins of
// kernels/cpu/elementwise.cc), plus random fill.
#include <atomic>
#include <cstdlib>
#include <map>
#include <mutex>
#include <string>
#include <string_view>
#include <utility>

#include "kernels/cuda/common.cuh"
#include "kernels/random_fill.h"

namespace pds::kernels::cuda {
namespace {

constexpr int kThreads = 256;

// Grid-stride loops with the grid capped: any n fits.
inline unsigned GridFor(int64_t n) {
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  return static_cast<unsigned>(blocks < 65535 * 8 ? (blocks > 0 ? blocks : 1) : 65535 * 8);
}

template <typename T>
__global__ void EmbedKernel(const T* table, const int32_t* ids, T* out, int64_t tokens,
                            int64_t hidden) {
  PdlWaitAndTrigger();
  const int64_t n = tokens * hidden;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x) {
    const int64_t t = i / hidden, c = i - t * hidden;
    out[i] = table[static_cast<int64_t>(ids[t]) * hidden + c];
  }
}

template <typename T>
__global__ void AddBiasKernel(T* x, int64_t x_stride, const T* bias, int64_t rows, int64_t cols) {
  PdlWaitAndTrigger();
  const int64_t n = rows * cols;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x) {
    const int64_t r = i / cols, c = i - r * cols;
    T& v = x[r * x_stride + c];
    v = FromFloat<T>(ToFloat(v) + ToFloat(bias[c]));
  }
}

template <typename T>
__global__ void AddKernel(T* x, const T* y, int64_t n) {
  PdlWaitAndTrigger();
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x) {
    x[i] = FromFloat<T>(ToFloat(x[i]) + ToFloat(y[i]));
  }
}

template <typename T>
__global__ void SiluGateKernel(const T* gate_up, T* out, int64_t tokens, int64_t inter) {
  PdlWaitAndTrigger();
  const int64_t n = tokens * inter;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x) {
    const int64_t t = i / inter, c = i - t * inter;
    const float g = ToFloat(gate_up[t * 2 * inter + c]);
    const float u = ToFloat(gate_up[t * 2 * inter + inter + c]);
    out[i] = FromFloat<T>(g / (1.0f + __expf(-g)) * u);
  }
}

template <typename T>
__global__ void GatherRowsKernel(const T* x, const int32_t* rows, T* out, int64_t n, int64_t cols) {
  PdlWaitAndTrigger();
  const int64_t total = n * cols;
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < total;
       i += int64_t{gridDim.x} * blockDim.x) {
    const int64_t r = i / cols, c = i - r * cols;
    out[i] = x[static_cast<int64_t>(rows[r]) * cols + c];
  }
}

template <typename T>
__global__ void FillRandomKernel(T* dst, int64_t n, float scale, float offset, uint64_t seed) {
  PdlWaitAndTrigger();
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < n;
       i += int64_t{gridDim.x} * blockDim.x) {
    dst[i] = FromFloat<T>(RandomFillValue(seed, static_cast<uint64_t>(i), scale, offset));
  }
}

KernelSettings* LoadSettings() {
  auto* k = new KernelSettings();
  auto env = [](const char* name) -> std::string_view {
    const char* v = std::getenv(name);
    return v != nullptr ? std::string_view(v) : std::string_view();
  };
  int device = 0, major = 0;
  k->programmatic_launch =
      env("PDS_PDL") != "0" && cudaGetDevice(&device) == cudaSuccess &&
      cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) == cudaSuccess &&
      major >= 9;
  k->legacy_decode = env("PDS_ATTN_DECODE") == "legacy";
  k->mma_decode = env("PDS_ATTN_DECODE") == "mma";
  k->prefill_warps = std::atoi(std::string(env("PDS_ATTN_PREFILL_WARPS")).c_str());
  k->gemv_mma = env("PDS_GEMV_IMPL") == "mma";
  k->gemv_warps = std::atoi(std::string(env("PDS_GEMV_WARPS")).c_str());
  k->gemv_unroll8 = env("PDS_GEMV_UNROLL") == "8";
  k->fuse_rope_kv = env("PDS_FUSE_ROPE_KV") == "1";
  k->fused_combine = env("PDS_ATTN_COMBINE") == "fused";
  return k;
}

// Replaced whole on a reload (the old copy is kept: a launch on another thread may hold it).
std::atomic<const KernelSettings*> settings{nullptr};

void Publish(KernelSettings* k) { settings.store(k, std::memory_order_release); }

}  // namespace

const KernelSettings& Settings() {
  const KernelSettings* k = settings.load(std::memory_order_acquire);
  if (k != nullptr) return *k;
  KernelSettings* loaded = LoadSettings();
  const KernelSettings* expected = nullptr;
  if (!settings.compare_exchange_strong(expected, loaded)) {
    delete loaded;
    return *expected;
  }
  return *loaded;
}

void ReloadKernelSettings() { Publish(LoadSettings()); }

bool ProgrammaticLaunch() { return Settings().programmatic_launch; }

cudaError_t AllowDynamicSmemImpl(const void* kernel, size_t bytes) {
  int device = 0;
  cudaError_t e = cudaGetDevice(&device);
  if (e != cudaSuccess) return e;
  static std::mutex mu;
  static std::map<std::pair<const void*, int>, size_t> allowed;  // largest opt-in so far
  std::lock_guard<std::mutex> lock(mu);
  size_t& done = allowed[{kernel, device}];
  if (done >= bytes) return cudaSuccess;
  e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                           static_cast<int>(bytes));
  if (e == cudaSuccess) done = bytes;
  return e;
}

void SetProgrammaticLaunch(bool on) {
  auto* k = new KernelSettings(Settings());
  k->programmatic_launch = on;
  Publish(k);
}

cudaError_t Embed(Half16 t, const void* table, const int32_t* ids, void* out, int64_t tokens,
                  int64_t hidden, cudaStream_t stream) {
  return Dispatch16(t, [&](auto z) {
    using T = decltype(z);
    LaunchKernel(EmbedKernel<T>, GridFor(tokens * hidden), kThreads, 0, stream,
                 static_cast<const T*>(table), ids, static_cast<T*>(out), tokens, hidden);
    return cudaGetLastError();
  });
}

cudaError_t AddBias(Half16 t, void* x, int64_t x_stride, const void* bias, int64_t rows,
                    int64_t cols, cudaStream_t stream) {
  return Dispatch16(t, [&](auto z) {
    using T = decltype(z);
    LaunchKernel(AddBiasKernel<T>, GridFor(rows * cols), kThreads, 0, stream, static_cast<T*>(x),
                 x_stride, static_cast<const T*>(bias), rows, cols);
    return cudaGetLastError();
  });
}

cudaError_t Add(Half16 t, void* x, const void* y, int64_t n, cudaStream_t stream) {
  return Dispatch16(t, [&](auto z) {
    using T = decltype(z);
    LaunchKernel(AddKernel<T>, GridFor(n), kThreads, 0, stream, static_cast<T*>(x),
                 static_cast<const T*>(y), n);
    return cudaGetLastError();
  });
}

cudaError_t SiluGate(Half16 t, const void* gate_up, void* out, int64_t tokens, int64_t inter,
                     cudaStream_t stream) {
  return Dispatch16(t, [&](auto z) {
    using T = decltype(z);
    LaunchKernel(SiluGateKernel<T>, GridFor(tokens * inter), kThreads, 0, stream,
                 static_cast<const T*>(gate_up), static_cast<T*>(out), tokens, inter);
    return cudaGetLastError();
  });
}

cudaError_t GatherRows(Half16 t, const void* x, const int32_t* rows, void* out, int64_t n,
                       int64_t cols, cudaStream_t stream) {
  return Dispatch16(t, [&](auto z) {
    using T = decltype(z);
    LaunchKernel(GatherRowsKernel<T>, GridFor(n * cols), kThreads, 0, stream,
                 static_cast<const T*>(x), rows, static_cast<T*>(out), n, cols);
    return cudaGetLastError();
  });
}

cudaError_t FillRandom(Half16 t, void* dst, int64_t n, float scale, float offset, uint64_t seed,
                       cudaStream_t stream) {
  return Dispatch16(t, [&](auto z) {
    using T = decltype(z);
    LaunchKernel(FillRandomKernel<T>, GridFor(n), kThreads, 0, stream, static_cast<T*>(dst), n,
                 scale, offset, seed);
    return cudaGetLastError();
  });
}

}  // namespace pds::kernels::cuda

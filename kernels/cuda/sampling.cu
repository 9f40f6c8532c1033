// Greedy selection on the GPU: one block per row of fp32 logits.
#include <cfloat>

#include "kernels/cuda/common.cuh"

namespace pds::kernels::cuda {
namespace {

// (value, index) better than the other: larger value, then lower index; NaN never wins.
__device__ __forceinline__ bool Better(float v, int32_t i, float ov, int32_t oi) {
  if (isnan(v)) return false;
  if (isnan(ov)) return true;
  return v > ov || (v == ov && i < oi);
}

__global__ void ArgmaxKernel(const float* logits, int64_t n, int32_t* ids) {
  PdlWaitAndTrigger();
  const float* row = logits + blockIdx.x * n;
  float best = NAN;
  int32_t best_i = 0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    if (Better(row[i], static_cast<int32_t>(i), best, best_i)) {
      best = row[i];
      best_i = static_cast<int32_t>(i);
    }
  }
  for (int o = 16; o > 0; o >>= 1) {
    const float ov = __shfl_xor_sync(0xffffffffu, best, o);
    const int32_t oi = __shfl_xor_sync(0xffffffffu, best_i, o);
    if (Better(ov, oi, best, best_i)) {
      best = ov;
      best_i = oi;
    }
  }
  __shared__ float vals[32];
  __shared__ int32_t idx[32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) {
    vals[warp] = best;
    idx[warp] = best_i;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < static_cast<int>(blockDim.x >> 5); ++w) {
      if (Better(vals[w], idx[w], best, best_i)) {
        best = vals[w];
        best_i = idx[w];
      }
    }
    ids[blockIdx.x] = best_i;
  }
}

}  // namespace

cudaError_t ArgmaxRows(const float* logits, int64_t rows, int64_t n, int32_t* ids,
                       cudaStream_t stream) {
  if (rows <= 0) return cudaSuccess;
  LaunchKernel(ArgmaxKernel, static_cast<unsigned>(rows), 1024, 0, stream, logits, n, ids);
  return cudaGetLastError();
}

}  // namespace pds::kernels::cuda

namespace pds::kernels::cuda {
namespace {

constexpr int kSampleThreads = 1024;

// Larger key = earlier in the order: higher logit, then lower index. NaN is never a candidate.
__device__ __forceinline__ uint64_t OrderKey(float v, int64_t i) {
  uint32_t bits = __float_as_uint(v);
  if ((bits & 0x7FFFFFFFu) == 0)
    bits = 0;  // -0.0 ties with +0.0 (lower index first), as on the CPU
  bits = (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
  return (static_cast<uint64_t>(bits) << 32) | (0xFFFFFFFFu - static_cast<uint32_t>(i));
}

struct SelectShared {
  double hist[256];
  uint64_t prefix;
  double above;
  int pick_last;
};

// The key of the first candidate (key >= lo, in descending key order) at which the running
// weight reaches the target: above + w > target (strict) or >= target. When no candidate
// does (rounding at the very end), the last candidate. weight(v) is the element's weight.
template <typename Weight>
__device__ uint64_t RadixSelect(const float* row, int64_t n, uint64_t lo, double target,
                                bool strict, Weight weight, SelectShared& sh) {
  if (threadIdx.x == 0) {
    sh.prefix = 0;
    sh.above = 0.0;
    sh.pick_last = 0;
  }
  uint64_t mask = 0;
  for (int shift = 56; shift >= 0; shift -= 8) {
    for (int b = threadIdx.x; b < 256; b += blockDim.x) sh.hist[b] = 0.0;
    __syncthreads();
    const uint64_t prefix = sh.prefix;
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
      const float v = row[i];
      if (isnan(v)) continue;
      const uint64_t key = OrderKey(v, i);
      if (key < lo || (key & mask) != prefix) continue;
      atomicAdd(&sh.hist[(key >> shift) & 255], weight(v));
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      int sel = -1, last = -1;
      double above = sh.above;
      for (int b = 255; b >= 0; --b) {
        const double h = sh.hist[b];
        if (h <= 0.0) continue;
        last = b;
        if (sh.pick_last) continue;
        const double acc = above + h;
        if (strict ? acc > target : acc >= target) {
          sel = b;
          break;
        }
        above = acc;
      }
      if (sel < 0) {
        sel = last < 0 ? 0 : last;
        sh.pick_last = 1;
      } else {
        sh.above = above;
      }
      sh.prefix = prefix | (static_cast<uint64_t>(sel) << shift);
    }
    mask |= uint64_t{0xFF} << shift;
    __syncthreads();
  }
  const uint64_t result = sh.prefix;
  __syncthreads();  // everyone has read it before a next selection resets it
  return result;
}

__device__ double BlockSumDouble(double v, double* scratch) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < static_cast<int>(blockDim.x >> 5) ? scratch[lane] : 0.0;
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__global__ void __launch_bounds__(kSampleThreads)
    SampleKernel(const float* logits, int64_t n, const RowSampling* sampling, int32_t* tokens) {
  PdlWaitAndTrigger();
  __shared__ SelectShared sh;
  __shared__ double scratch[32];
  __shared__ float fscratch[32];
  const float* row = logits + blockIdx.x * n;
  const RowSampling sp = sampling[blockIdx.x];
  // Max and number of non-NaN logits.
  float m = -INFINITY;
  double valid = 0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    if (!isnan(row[i])) {
      m = fmaxf(m, row[i]);
      valid += 1;
    }
  }
  m = WarpMax(m);
  {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) fscratch[warp] = m;
    __syncthreads();
    m = -INFINITY;
    for (int w = 0; w < static_cast<int>(blockDim.x >> 5); ++w) m = fmaxf(m, fscratch[w]);
  }
  valid = BlockSumDouble(valid, scratch);
  if (valid == 0) {
    if (threadIdx.x == 0) tokens[blockIdx.x] = 0;
    return;
  }
  auto count = [](float) { return 1.0; };
  uint64_t lo = 0;
  // Greedy, or an infinite top logit (no softmax: the CPU rule takes the first in the order).
  if (sp.temperature == 0.0f || sp.top_k == 1 || isinf(m)) {
    lo = RadixSelect(row, n, 0, 1.0, false, count, sh);  // the first key in the order
  } else {
    if (sp.top_k > 0 && sp.top_k < valid) {
      lo = RadixSelect(row, n, 0, static_cast<double>(sp.top_k), false, count, sh);
    }
    const float inv_t = 1.0f / sp.temperature;
    auto mass = [m, inv_t](float v) { return static_cast<double>(__expf((v - m) * inv_t)); };
    auto total_from = [&](uint64_t from) {
      double t = 0.0;
      for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
        const float v = row[i];
        if (!isnan(v) && OrderKey(v, i) >= from) t += mass(v);
      }
      return BlockSumDouble(t, scratch);
    };
    double total = total_from(lo);
    if (sp.top_p < 1.0f) {
      lo = RadixSelect(row, n, lo, static_cast<double>(sp.top_p) * total, false, mass, sh);
      total = total_from(lo);
    }
    lo = RadixSelect(row, n, lo, sp.u * total, true, mass, sh);
  }
  if (threadIdx.x == 0) {
    tokens[blockIdx.x] = static_cast<int32_t>(0xFFFFFFFFu - static_cast<uint32_t>(lo));
  }
}

}  // namespace

cudaError_t SampleRows(const float* logits, int64_t rows, int64_t n, const RowSampling* sampling,
                       int32_t* tokens, cudaStream_t stream) {
  if (rows <= 0) return cudaSuccess;
  LaunchKernel(SampleKernel, static_cast<unsigned>(rows), kSampleThreads, 0, stream, logits, n,
               sampling, tokens);
  return cudaGetLastError();
}

}  // namespace pds::kernels::cuda

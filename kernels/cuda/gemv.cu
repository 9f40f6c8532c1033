// Skinny GEMM for decode (m <= kGemvMaxRows activation rows): c[m, n] = a[m, k] w[n, k]^T,
// bound by reading w once. The dot products run on the tensor cores (mma.sync m16n8k16, fp32
// accumulation) rather than on FMAs: at m = 8 an FMA loop needs 64 FMAs per 16 bytes of weight
// plus the activation conversions, about the SMs' whole issue rate at HBM speed, while one mma
// takes 512 bytes of weight for all 8 rows.
//
// Block: one tile of 16 weight rows (the mma's M), 1-16 warps splitting k. Lane (g, t) =
// (lane / 4, lane % 4) loads, per 32-column chunk, 16 bytes (8 columns from 8 t) of weight rows
// g and g + 8 of the tile and 16 bytes of activation row g at the same columns. A dot product
// does not care in which order its k terms come, so those registers are the A and B fragments
// as they are: the first mma takes columns 8t..8t+3 in its k slots {2t, 2t+1, 2t+8, 2t+9},
// the second columns 8t+4..8t+7, in A (rows g, g + 8) and B (column g = activation row g)
// alike. No shuffles, no shared-memory staging; activation rows past m and columns past k load
// as zeros (no memory access), weight rows past n too. Each warp takes kUnroll consecutive
// chunks per step (2 kUnroll 16-byte weight loads in flight per lane, every row read in 256- or
// 512-byte runs), steps of all warps interleaved over k; the warps' 16x8 partial tiles are
// summed in shared memory in a fixed order (deterministic) and written by the block.
//
// Weights are read with ld.global.nc.L1::no_allocate (streamed: in L1 they would only evict
// the activations, which every block re-reads, from L1 or L2). 62 registers at kUnroll 4: up
// to 4 blocks of 8 warps per SM, 8 weight loads (4 KiB per warp) in flight each.

#include "kernels/cuda/common.cuh"

namespace pds::kernels::cuda {
namespace {

constexpr int kTileRows = 16;   // weight rows per block (the M of m16n8k16)
constexpr int kChunkCols = 32;  // columns per lane-quad load: 4 lanes x 8 (two k16 mma steps)
constexpr int kMaxWarps = 16;

template <typename T>
__device__ __forceinline__ void Mma(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2,
                                    uint32_t a3, uint32_t b0, uint32_t b1);

template <>
__device__ __forceinline__ void Mma<__nv_bfloat16>(float (&d)[4], uint32_t a0, uint32_t a1,
                                                   uint32_t a2, uint32_t a3, uint32_t b0,
                                                   uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

template <>
__device__ __forceinline__ void Mma<__half>(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2,
                                            uint32_t a3, uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// 16 bytes at p when `pred`, else zeros (no access): a predicated load, no branch. Weights
// (`kStream`) are not kept in L1; activations are.
template <bool kStream>
__device__ __forceinline__ uint4 Load16(const void* p, bool pred) {
  uint4 v;
  if constexpr (kStream) {
    asm volatile(
        "{\n .reg .pred p;\n setp.ne.b32 p, %5, 0;\n"
        " mov.b32 %0, 0;\n mov.b32 %1, 0;\n mov.b32 %2, 0;\n mov.b32 %3, 0;\n"
        " @p ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];\n}\n"
        : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
        : "l"(p), "r"(static_cast<int>(pred)));
  } else {
    asm volatile(
        "{\n .reg .pred p;\n setp.ne.b32 p, %5, 0;\n"
        " mov.b32 %0, 0;\n mov.b32 %1, 0;\n mov.b32 %2, 0;\n mov.b32 %3, 0;\n"
        " @p ld.global.nc.v4.u32 {%0,%1,%2,%3}, [%4];\n}\n"
        : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
        : "l"(p), "r"(static_cast<int>(pred)));
  }
  return v;
}

template <typename Out>
__device__ __forceinline__ Out Convert(float v) {
  return FromFloat<Out>(v);
}
template <>
__device__ __forceinline__ float Convert<float>(float v) {
  return v;
}

// Where a warp's partial tile keeps (tile row, activation row) in `partial` (j * 32 + lane):
// accumulator element j of lane (g, t) holds tile row g + 8 (j / 2), activation row
// 2 t + j % 2 (the m16n8 C layout).
__device__ __forceinline__ int AccIndex(int tile_row, int act_row) {
  return (tile_row / 8 * 2 + act_row % 2) * 32 + (tile_row % 8) * 4 + act_row / 2;
}

// kUnroll 8 (PDS_GEMV_UNROLL=8, for measurements): 140 registers, one block of 8 warps per SM.
template <typename T, typename Out, int kUnroll>
__global__ void __launch_bounds__(kUnroll > 4 ? 256 : 32 * kMaxWarps, kUnroll > 4 ? 1 : 0)
    GemvKernel(const T* __restrict__ a, int64_t lda, const T* __restrict__ w, int64_t n, int64_t k,
               Out* __restrict__ c, int m) {
  PdlWaitAndTrigger();
  __shared__ float partial[kMaxWarps][4 * 32];  // [warp][j * 32 + lane]
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int64_t row0 = int64_t{blockIdx.x} * kTileRows;
  const bool lo_ok = row0 + g < n, hi_ok = row0 + g + 8 < n, x_ok = g < m;
  // Pointers stay inside the operands; the loads of rows past n or m are predicated off.
  const T* w_lo = w + (lo_ok ? row0 + g : n - 1) * k + 8 * t;
  const T* w_hi = w + (hi_ok ? row0 + g + 8 : n - 1) * k + 8 * t;
  const T* x = a + (x_ok ? g : 0) * lda + 8 * t;
  const int64_t lane_k = k - 8 * t;  // chunk offset `cc` is inside the row iff cc < lane_k
  constexpr int kStepCols = kChunkCols * kUnroll;
  float acc[2][4] = {{0.0f, 0.0f, 0.0f, 0.0f}, {0.0f, 0.0f, 0.0f, 0.0f}};
  for (int64_t col = int64_t{warp} * kStepCols; col < k; col += int64_t{warps} * kStepCols) {
    uint4 lo[kUnroll], hi[kUnroll], xv[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t cc = col + u * kChunkCols;
      const bool in = cc < lane_k;
      lo[u] = Load16<true>(w_lo + cc, in && lo_ok);
      hi[u] = Load16<true>(w_hi + cc, in && hi_ok);
      xv[u] = Load16<false>(x + cc, in && x_ok);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      Mma<T>(acc[0], lo[u].x, hi[u].x, lo[u].y, hi[u].y, xv[u].x, xv[u].y);
      Mma<T>(acc[1], lo[u].z, hi[u].z, lo[u].w, hi[u].w, xv[u].z, xv[u].w);
    }
  }
#pragma unroll
  for (int j = 0; j < 4; ++j) partial[warp][j * 32 + lane] = acc[0][j] + acc[1][j];
  __syncthreads();
  // Thread e writes tile row e % 16 of activation row e / 16 (consecutive threads, consecutive
  // outputs), the warps' partial sums added in warp order.
  for (int e = threadIdx.x; e < kTileRows * 8; e += blockDim.x) {
    const int tile_row = e % kTileRows, act_row = e / kTileRows;
    const int64_t row = row0 + tile_row;
    if (act_row >= m || row >= n) continue;
    const int at = AccIndex(tile_row, act_row);
    float v = partial[0][at];
    for (int i = 1; i < warps; ++i) v += partial[i][at];
    c[act_row * n + row] = Convert<Out>(v);
  }
}

// Row-streaming GEMV for m <= kGemvFmaRows, on FMAs: a warp owns kRows weight rows and walks
// each in 512-byte strides (lane l takes bytes 16 l .. 16 l + 15 of a stride, so every load
// instruction reads 512 contiguous bytes of one row), kUnroll strides of each row in flight
// (kRows kUnroll 16-byte loads per lane); the activation chunks at the same columns come
// through L1 (the block's warps read the same ones); one warp sum per output at the end. At
// m <= 4 the FMAs and the activation loads stay well under the SM's issue and L1 rates at HBM
// speed, and the weight stream is fully coalesced, unlike the tensor-core kernel's 64-byte
// row pieces.
constexpr int kRowsThreads = 256;

template <typename T, typename Out, int M, int kRows>
__global__ void __launch_bounds__(kRowsThreads)
    GemvRowsKernel(const T* __restrict__ a, int64_t lda, const T* __restrict__ w, int64_t n,
                   int64_t k, Out* __restrict__ c) {
  PdlWaitAndTrigger();
  constexpr int kUnroll = kRows >= 2 ? 4 : 8;
  const int lane = threadIdx.x & 31;
  const int64_t row0 = ((int64_t{blockIdx.x} * kRowsThreads + threadIdx.x) >> 5) * kRows;
  if (row0 >= n) return;         // whole warps leave together
  const int64_t chunks = k / 8;  // 16-byte chunks per row
  float acc[kRows][M];
#pragma unroll
  for (int r = 0; r < kRows; ++r)
#pragma unroll
    for (int mm = 0; mm < M; ++mm) acc[r][mm] = 0.0f;
  const T* rows[kRows];
#pragma unroll
  for (int r = 0; r < kRows; ++r) rows[r] = w + (row0 + r < n ? row0 + r : row0) * k;
  for (int64_t base = lane; base < chunks; base += 32 * kUnroll) {
    uint4 wv[kRows][kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t chunk = base + 32 * u;
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        wv[r][u] = Load16<true>(rows[r] + chunk * 8, chunk < chunks && row0 + r < n);
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t chunk = base + 32 * u;
      if (chunk >= chunks) break;
      float x[M][8];
#pragma unroll
      for (int mm = 0; mm < M; ++mm)
        Unpack8<T>(Load16<false>(a + mm * lda + chunk * 8, true), x[mm]);
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        float wf[8];
        Unpack8<T>(wv[r][u], wf);
#pragma unroll
        for (int mm = 0; mm < M; ++mm)
#pragma unroll
          for (int i = 0; i < 8; ++i) acc[r][mm] += wf[i] * x[mm][i];
      }
    }
  }
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
#pragma unroll
    for (int mm = 0; mm < M; ++mm) {
      const float v = WarpSum(acc[r][mm]);
      if (lane == 0 && row0 + r < n) c[mm * n + row0 + r] = Convert<Out>(v);
    }
  }
}

template <typename T, typename Out, int M>
cudaError_t LaunchRows(const void* a, int64_t lda, const void* w, int64_t n, int64_t k, void* c,
                       cudaStream_t stream) {
  // Two rows per warp (each activation chunk serves both), one where that leaves fewer warps
  // than the GPU holds in flight (small n).
  constexpr int kWarpsPerBlock = kRowsThreads / 32;
  if (n >= 2 * 32 * 132) {
    const int64_t blocks = (n + 2 * kWarpsPerBlock - 1) / (2 * kWarpsPerBlock);
    LaunchKernel(GemvRowsKernel<T, Out, M, 2>, static_cast<unsigned>(blocks), kRowsThreads, 0,
                 stream, static_cast<const T*>(a), lda, static_cast<const T*>(w), n, k,
                 static_cast<Out*>(c));
  } else {
    const int64_t blocks = (n + kWarpsPerBlock - 1) / kWarpsPerBlock;
    LaunchKernel(GemvRowsKernel<T, Out, M, 1>, static_cast<unsigned>(blocks), kRowsThreads, 0,
                 stream, static_cast<const T*>(a), lda, static_cast<const T*>(w), n, k,
                 static_cast<Out*>(c));
  }
  return cudaGetLastError();
}

template <typename T, typename Out>
cudaError_t DispatchRows(const void* a, int64_t lda, const void* w, int64_t n, int64_t k, void* c,
                         int64_t m, cudaStream_t stream) {
  switch (m) {
    case 1:
      return LaunchRows<T, Out, 1>(a, lda, w, n, k, c, stream);
    case 2:
      return LaunchRows<T, Out, 2>(a, lda, w, n, k, c, stream);
    case 3:
      return LaunchRows<T, Out, 3>(a, lda, w, n, k, c, stream);
    default:
      return LaunchRows<T, Out, 4>(a, lda, w, n, k, c, stream);
  }
}

int NumSms() {
  int device = 0, sms = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess ||
      sms <= 0) {
    return 132;
  }
  return sms;
}

template <typename T, typename Out, int kUnroll>
cudaError_t Launch(const void* a, int64_t lda, const void* w, int64_t n, int64_t k, void* c,
                   int64_t m, int warps, cudaStream_t stream) {
  const int64_t tiles = (n + kTileRows - 1) / kTileRows;
  if (warps < 1) {
    // Enough warps in flight: 8 per 16-row tile (n = 4096: 256 blocks, about 2 per SM), 16
    // when there are fewer tiles than SMs; never more than the k steps.
    warps = tiles < NumSms() ? 16 : 8;
    const int64_t steps = (k + kChunkCols * kUnroll - 1) / (kChunkCols * kUnroll);
    if (steps < warps) warps = static_cast<int>(steps);
  }
  const int max_warps = kUnroll > 4 ? 8 : kMaxWarps;
  if (warps > max_warps) warps = max_warps;
  LaunchKernel(GemvKernel<T, Out, kUnroll>, static_cast<unsigned>(tiles), 32 * warps, 0, stream,
               static_cast<const T*>(a), lda, static_cast<const T*>(w), n, k, static_cast<Out*>(c),
               static_cast<int>(m));
  return cudaGetLastError();
}

}  // namespace

bool GemvSupported(const void* a, int64_t lda, const void* w, int64_t k, int64_t m) {
  const auto aligned = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; };
  if (m < 1 || m > kGemvMaxRows || k <= 0 || k % 8 != 0) return false;
  if (a == nullptr || w == nullptr || !aligned(a) || !aligned(w)) return false;
  return m == 1 || (lda % 8 == 0 && lda >= k);
}

cudaError_t Gemv(Half16 t, const void* a, int64_t lda, const void* w, int64_t n, int64_t k, void* c,
                 bool c_fp32, int64_t m, cudaStream_t stream) {
  if (m <= 0 || n <= 0) return cudaSuccess;
  if (!GemvSupported(a, lda, w, k, m) || c == nullptr) return cudaErrorInvalidValue;
  if ((n + kTileRows - 1) / kTileRows > 0x7fffffff) return cudaErrorInvalidValue;
  // Measurement knobs (KernelSettings): the tensor-core kernel's warps per block (1-16) and
  // 8 chunks per step (at most 8 warps); m <= kGemvFmaRows takes the row-streaming FMA kernel
  // unless gemv_mma.
  const KernelSettings& knobs = Settings();
  const int warps = knobs.gemv_warps;
  const bool unroll8 = knobs.gemv_unroll8;
  const bool rows = m <= kGemvFmaRows && !knobs.gemv_mma;
  return Dispatch16(t, [&](auto z) -> cudaError_t {
    using T = decltype(z);
    if (rows) {
      return c_fp32 ? DispatchRows<T, float>(a, lda, w, n, k, c, m, stream)
                    : DispatchRows<T, T>(a, lda, w, n, k, c, m, stream);
    }
    if (c_fp32) {
      return unroll8 ? Launch<T, float, 8>(a, lda, w, n, k, c, m, warps, stream)
                     : Launch<T, float, 4>(a, lda, w, n, k, c, m, warps, stream);
    }
    return unroll8 ? Launch<T, T, 8>(a, lda, w, n, k, c, m, warps, stream)
                   : Launch<T, T, 4>(a, lda, w, n, k, c, m, warps, stream);
  });
}

}  // namespace pds::kernels::cuda

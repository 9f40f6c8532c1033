// Paged prefill attention for head dims 64 and 128 on the tensor cores with mma.sync
// (m16n8k16, 16-bit inputs, fp32 accumulation), flash-attention-2 style: scores, softmax
// state and the output stay in registers.
//
// Grid (query tiles, heads, seqs); 4 warps, a 64-row query tile (16 rows per warp). The block
// gathers each 64-position K/V tile from the paged cache into shared memory; each warp keeps
// its Q fragments in registers, computes S = Q K^T (8 n-tiles of 8 positions), masks and
// scales, updates the online softmax of its two rows per lane (quad shuffles), reuses the
// S accumulators as the A fragments of P (the m16n8k16 C and A layouts line up) and adds P V.
// Tiles beyond a warp's last causal position are skipped by that warp.
#include <cfloat>
#include <cstdlib>

#include "kernels/cuda/attention_internal.cuh"

namespace pds::kernels::cuda {
namespace {

constexpr int kBk = 64;  // K/V positions per tile

template <typename T>
__device__ __forceinline__ void Mma16816(float (&d)[4], const uint32_t (&a)[4],
                                         const uint32_t (&b)[2]);

template <>
__device__ __forceinline__ void Mma16816<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4],
                                                        const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

template <>
__device__ __forceinline__ void Mma16816<__half>(float (&d)[4], const uint32_t (&a)[4],
                                                 const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

__device__ __forceinline__ void CpAsync16(void* smem, const void* gmem, bool valid) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem),
               "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void CpAsyncCommit() { asm volatile("cp.async.commit_group;\n"); }
template <int N>
__device__ __forceinline__ void CpAsyncWait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// Two values as one 32-bit register of 16-bit halves (the first in the low half).
template <typename T>
__device__ __forceinline__ uint32_t Pack(float lo, float hi) {
  const T l = FromFloat<T>(lo), h = FromFloat<T>(hi);
  return static_cast<uint32_t>(*reinterpret_cast<const uint16_t*>(&l)) |
         (static_cast<uint32_t>(*reinterpret_cast<const uint16_t*>(&h)) << 16);
}

// Two 8x8 16-bit matrices from shared memory, transposed: rows at the addresses of lanes
// 0-7 and 8-15 (16-byte aligned).
__device__ __forceinline__ void LdMatrixX2Trans(uint32_t (&b)[2], const void* row) {
  const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];\n"
               : "=r"(b[0]), "=r"(b[1])
               : "r"(addr));
}

// kWarps warps of 16 query rows each: a query tile of kBq = 16 kWarps rows.
template <typename T, int D, int kWarps>
__global__ void __launch_bounds__(32 * kWarps)
    PrefillMmaKernel(const T* __restrict__ q, int64_t q_stride, const T* __restrict__ k_cache,
                     const T* __restrict__ v_cache, PagedBatch batch, T* __restrict__ out,
                     int heads, int kv_heads, float scale, bool all_rows) {
  constexpr int kBq = 16 * kWarps, kThreads = 32 * kWarps;
  constexpr int kLd = D + 8;  // shared-memory row stride (elements): conflict-free fragments
  constexpr int kVecs = D / 8;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* qs = reinterpret_cast<T*>(smem_raw);
  T* ks = qs + kBq * kLd;      // two K tiles
  T* vs = ks + 2 * kBk * kLd;  // two V tiles

  const int s = blockIdx.z, h = blockIdx.y;
  const int q0 = batch.cu_q[s];
  const int q_len = batch.cu_q[s + 1] - q0;
  if (!all_rows && q_len == 1) return;  // the decode kernel's
  const int row0 = blockIdx.x * kBq;
  if (row0 >= q_len) return;
  const int rows = min(kBq, q_len - row0);
  const int prefix = batch.kv_lens[s] - q_len;
  const int kvh = h / (heads / kv_heads);
  const int kv_end = prefix + row0 + rows;
  const int32_t* table = batch.block_tables + int64_t{s} * batch.max_blocks;
  const int bs = batch.block_size;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, tig = lane & 3;
  const int wrow = warp * 16;

  // Q, then K/V tiles, arrive by cp.async (16 bytes, zero-filled past the data) into two
  // buffers: the next tile's copies fly while the warps compute on the current one.
  for (int i = tid; i < kBq * kVecs; i += kThreads) {
    const int r = i / kVecs, c = (i % kVecs) * 8;
    const bool valid = r < rows;
    CpAsync16(qs + r * kLd + c, valid ? q + int64_t{q0 + row0 + r} * q_stride + h * D + c : q,
              valid);
  }
  auto load_tile = [&](int kt, int buf) {
    T* kd = ks + buf * kBk * kLd;
    T* vd = vs + buf * kBk * kLd;
    for (int i = tid; i < kBk * kVecs; i += kThreads) {
      const int r = i / kVecs, c = (i % kVecs) * 8;
      const int pos = kt + r;
      const bool valid = pos < kv_end;
      int64_t off = 0;
      if (valid) off = ((int64_t{table[pos / bs]} * kv_heads + kvh) * bs + pos % bs) * D + c;
      CpAsync16(kd + r * kLd + c, k_cache + off, valid);
      CpAsync16(vd + r * kLd + c, v_cache + off, valid);
    }
  };
  load_tile(0, 0);
  CpAsyncCommit();
  CpAsyncWait<0>();
  __syncthreads();
  uint32_t qf[D / 16][4];
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    const T* base = qs + (wrow + g) * kLd + kk * 16 + tig * 2;
    qf[kk][0] = *reinterpret_cast<const uint32_t*>(base);
    qf[kk][1] = *reinterpret_cast<const uint32_t*>(base + 8 * kLd);
    qf[kk][2] = *reinterpret_cast<const uint32_t*>(base + 8);
    qf[kk][3] = *reinterpret_cast<const uint32_t*>(base + 8 * kLd + 8);
  }
  float o[D / 8][4];
#pragma unroll
  for (int n = 0; n < D / 8; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.0f;
  // This lane's two rows: wrow + g and wrow + g + 8.
  float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.0f, l1 = 0.0f;
  const int pos0 = prefix + row0 + wrow + g, pos1 = pos0 + 8;
  const int warp_last = prefix + row0 + wrow + 15;

  for (int kt = 0, buf = 0; kt < kv_end; kt += kBk, buf ^= 1) {
    if (kt + kBk < kv_end) {
      load_tile(kt + kBk, buf ^ 1);
      CpAsyncCommit();
      CpAsyncWait<1>();
    } else {
      CpAsyncWait<0>();
    }
    __syncthreads();        // this tile has landed for every thread
    if (kt <= warp_last) {  // else every position of the tile is after this warp's rows
      const T* kt_s = ks + buf * kBk * kLd;
      const T* vt_s = vs + buf * kBk * kLd;
      float sacc[kBk / 8][4];
#pragma unroll
      for (int n = 0; n < kBk / 8; ++n) {
        sacc[n][0] = sacc[n][1] = sacc[n][2] = sacc[n][3] = 0.0f;
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
          const T* kb = kt_s + (n * 8 + g) * kLd + kk * 16 + tig * 2;
          const uint32_t b[2] = {*reinterpret_cast<const uint32_t*>(kb),
                                 *reinterpret_cast<const uint32_t*>(kb + 8)};
          Mma16816<T>(sacc[n], qf[kk], b);
        }
      }
      // Causal mask and scale; row maxima over the quad that shares each row.
      float mx0 = -INFINITY, mx1 = -INFINITY;
#pragma unroll
      for (int n = 0; n < kBk / 8; ++n) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int col = kt + n * 8 + tig * 2 + e;
          sacc[n][e] = col <= pos0 ? sacc[n][e] * scale : -INFINITY;
          sacc[n][2 + e] = col <= pos1 ? sacc[n][2 + e] * scale : -INFINITY;
          mx0 = fmaxf(mx0, sacc[n][e]);
          mx1 = fmaxf(mx1, sacc[n][2 + e]);
        }
      }
#pragma unroll
      for (int off = 1; off < 4; off <<= 1) {
        mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, off));
        mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, off));
      }
      const float mn0 = fmaxf(m0, mx0), mn1 = fmaxf(m1, mx1);
      const float ref0 = mn0 == -INFINITY ? 0.0f : mn0, ref1 = mn1 == -INFINITY ? 0.0f : mn1;
      const float alpha0 = __expf(m0 - ref0), alpha1 = __expf(m1 - ref1);
      m0 = mn0;
      m1 = mn1;
      // P as the A fragments of P V: k-step j covers n-tiles 2j (cols 0-7) and 2j+1 (8-15).
      uint32_t pf[kBk / 16][4];
      float sum0 = 0.0f, sum1 = 0.0f;
#pragma unroll
      for (int n = 0; n < kBk / 8; ++n) {
        const float p00 = __expf(sacc[n][0] - ref0), p01 = __expf(sacc[n][1] - ref0);
        const float p10 = __expf(sacc[n][2] - ref1), p11 = __expf(sacc[n][3] - ref1);
        sum0 += p00 + p01;
        sum1 += p10 + p11;
        pf[n / 2][(n % 2) * 2] = Pack<T>(p00, p01);
        pf[n / 2][(n % 2) * 2 + 1] = Pack<T>(p10, p11);
      }
#pragma unroll
      for (int off = 1; off < 4; off <<= 1) {
        sum0 += __shfl_xor_sync(0xffffffffu, sum0, off);
        sum1 += __shfl_xor_sync(0xffffffffu, sum1, off);
      }
      l0 = l0 * alpha0 + sum0;
      l1 = l1 * alpha1 + sum1;
#pragma unroll
      for (int n = 0; n < D / 8; ++n) {
        o[n][0] *= alpha0;
        o[n][1] *= alpha0;
        o[n][2] *= alpha1;
        o[n][3] *= alpha1;
      }
#pragma unroll
      for (int j = 0; j < kBk / 16; ++j) {
        // B fragments of V (k = position, n = dim) by a transposing ldmatrix: lanes 0-15 name
        // the 16 rows of the k-step.
        const T* v_row = vt_s + (j * 16 + (lane & 15)) * kLd;
#pragma unroll
        for (int n = 0; n < D / 8; ++n) {
          uint32_t b[2];
          LdMatrixX2Trans(b, v_row + n * 8);
          Mma16816<T>(o[n], pf[j], b);
        }
      }
    }
    __syncthreads();  // every warp is done with this buffer before it is refilled
  }

  const float inv0 = 1.0f / l0, inv1 = 1.0f / l1;
  const int r0 = wrow + g, r1 = r0 + 8;
#pragma unroll
  for (int n = 0; n < D / 8; ++n) {
    const int c = n * 8 + tig * 2;
    if (r0 < rows) {
      *reinterpret_cast<uint32_t*>(out + (int64_t{q0 + row0 + r0} * heads + h) * D + c) =
          Pack<T>(o[n][0] * inv0, o[n][1] * inv0);
    }
    if (r1 < rows) {
      *reinterpret_cast<uint32_t*>(out + (int64_t{q0 + row0 + r1} * heads + h) * D + c) =
          Pack<T>(o[n][2] * inv1, o[n][3] * inv1);
    }
  }
}

template <typename T, int D, int kWarps>
cudaError_t Launch(const AttentionArgs& a, bool all_rows, cudaStream_t stream) {
  constexpr int kBq = 16 * kWarps;
  auto* kernel = PrefillMmaKernel<T, D, kWarps>;
  constexpr size_t smem = size_t{kBq + 4 * kBk} * (D + 8) * sizeof(T);
  if (smem > 48 * 1024) {
    const cudaError_t e =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (e != cudaSuccess) return e;
  }
  const unsigned tiles = static_cast<unsigned>((a.plan.max_q_len + kBq - 1) / kBq);
  const dim3 grid(tiles, static_cast<unsigned>(a.heads), static_cast<unsigned>(a.batch.num_seqs));
  kernel<<<grid, 32 * kWarps, smem, stream>>>(
      static_cast<const T*>(a.q), a.q_stride, static_cast<const T*>(a.k_cache),
      static_cast<const T*>(a.v_cache), a.batch, static_cast<T*>(a.out), static_cast<int>(a.heads),
      static_cast<int>(a.kv_heads), a.scale, all_rows);
  return cudaGetLastError();
}

// Query-tile height: 4 warps (64 rows) by default; PDS_ATTN_PREFILL_WARPS=8 picks 128-row
// tiles (half the K/V traffic per FLOP, one block per SM) for measurements.
template <typename T, int D>
cudaError_t LaunchTile(const AttentionArgs& a, bool all_rows, cudaStream_t stream) {
  const char* warps = std::getenv("PDS_ATTN_PREFILL_WARPS");
  if (warps != nullptr && std::atoi(warps) == 8) return Launch<T, D, 8>(a, all_rows, stream);
  return Launch<T, D, 4>(a, all_rows, stream);
}

}  // namespace

cudaError_t LaunchPrefillAttentionMma(Half16 t, const AttentionArgs& a, bool all_rows,
                                      cudaStream_t stream) {
  return Dispatch16(t, [&](auto z) -> cudaError_t {
    using T = decltype(z);
    if (a.head_dim == 64) return LaunchTile<T, 64>(a, all_rows, stream);
    if (a.head_dim == 128) return LaunchTile<T, 128>(a, all_rows, stream);
    return cudaErrorInvalidValue;
  });
}

}  // namespace pds::kernels::cuda

// Paged prefill attention on the tensor cores (flash-attention style): causal, ragged batch,
// new query rows attending to a cached prefix through the block table. Head dims 64 and 128
// go to the mma.sync kernel (attention_prefill_mma.cu); this WMMA kernel, with its fp32
// output tile in shared memory, serves the others (16, 32, 256).
//
// Grid (query tiles, heads, seqs); 4 warps, a 64-row query tile (16 rows per warp). For each
// 64-position K/V tile up to the tile's last row, the block gathers K and V from the paged
// cache into shared memory; each warp computes S = Q K^T with WMMA (16-bit in, fp32 out),
// applies the causal mask and an online softmax per row (two lanes per row), rescales its
// fp32 output rows and adds P V with WMMA. No score matrix goes to global memory.
#include <mma.h>

#include <cfloat>

#include "kernels/cuda/attention_internal.cuh"

namespace pds::kernels::cuda {
namespace {

namespace wmma = nvcuda::wmma;

constexpr int kBq = 64, kBk = 64, kThreads = 128;

template <int D>
struct Smem {
  static constexpr int kLdT = D + 8;    // 16-bit Q/K/V tiles (padding against bank conflicts)
  static constexpr int kLdS = kBk + 4;  // fp32 scores
  static constexpr int kLdP = kBk + 8;  // 16-bit probabilities
  static constexpr int kLdO = D + 4;    // fp32 output accumulator
  static constexpr size_t kQ = 0;
  static constexpr size_t kK = kQ + size_t{kBq} * kLdT * 2;
  static constexpr size_t kV = kK + size_t{kBk} * kLdT * 2;
  static constexpr size_t kS = kV + size_t{kBk} * kLdT * 2;
  static constexpr size_t kP = kS + size_t{kBq} * kLdS * 4;
  static constexpr size_t kO = kP + size_t{kBq} * kLdP * 2;
  static constexpr size_t kBytes = kO + size_t{kBq} * kLdO * 4;
};

template <typename T, int D>
__global__ void __launch_bounds__(kThreads)
    PrefillKernel(const T* __restrict__ q, int64_t q_stride, const T* __restrict__ k_cache,
                  const T* __restrict__ v_cache, PagedBatch batch, T* __restrict__ out, int heads,
                  int kv_heads, float scale, bool all_rows) {
  PdlWaitAndTrigger();
  using L = Smem<D>;
  extern __shared__ __align__(128) unsigned char smem[];
  T* qs = reinterpret_cast<T*>(smem + L::kQ);
  T* ks = reinterpret_cast<T*>(smem + L::kK);
  T* vs = reinterpret_cast<T*>(smem + L::kV);
  float* ss = reinterpret_cast<float*>(smem + L::kS);
  T* ps = reinterpret_cast<T*>(smem + L::kP);
  float* os = reinterpret_cast<float*>(smem + L::kO);

  const int s = blockIdx.z, h = blockIdx.y;
  const int q0 = batch.cu_q[s];
  const int q_len = batch.cu_q[s + 1] - q0;
  if (!all_rows && q_len == 1) return;  // the decode kernel's
  const int row0 = blockIdx.x * kBq;
  if (row0 >= q_len) return;
  const int rows = min(kBq, q_len - row0);
  const int prefix = batch.kv_lens[s] - q_len;
  const int kvh = h / (heads / kv_heads);
  const int kv_end = prefix + row0 + rows;  // one past the tile's last position
  const int32_t* table = batch.block_tables + int64_t{s} * batch.max_blocks;
  const int bs = batch.block_size;
  constexpr int kVecs = D / 8;  // 16-byte vectors per row
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;

  for (int i = tid; i < kBq * kVecs; i += kThreads) {
    const int r = i / kVecs, c = (i % kVecs) * 8;
    uint4 val = make_uint4(0, 0, 0, 0);
    if (r < rows) {
      val = *reinterpret_cast<const uint4*>(q + int64_t{q0 + row0 + r} * q_stride + h * D + c);
    }
    *reinterpret_cast<uint4*>(qs + r * L::kLdT + c) = val;
  }
  for (int i = tid; i < kBq * D; i += kThreads) os[(i / D) * L::kLdO + i % D] = 0.0f;

  // Softmax state of row `my_row`, kept by both of its lanes.
  const int my_row = warp * 16 + lane / 2, half = lane & 1;
  const int my_pos = prefix + row0 + my_row;
  float m_run = -INFINITY, l_run = 0.0f;

  for (int kt = 0; kt < kv_end; kt += kBk) {
    __syncthreads();  // the previous tile's readers are done (and Q/O are initialized)
    for (int i = tid; i < kBk * kVecs; i += kThreads) {
      const int r = i / kVecs, c = (i % kVecs) * 8;
      const int pos = kt + r;
      uint4 kv = make_uint4(0, 0, 0, 0), vv = make_uint4(0, 0, 0, 0);
      if (pos < kv_end) {
        const int64_t block = table[pos / bs];
        const int64_t off = ((block * kv_heads + kvh) * bs + pos % bs) * D + c;
        kv = *reinterpret_cast<const uint4*>(k_cache + off);
        vv = *reinterpret_cast<const uint4*>(v_cache + off);
      }
      *reinterpret_cast<uint4*>(ks + r * L::kLdT + c) = kv;
      *reinterpret_cast<uint4*>(vs + r * L::kLdT + c) = vv;
    }
    __syncthreads();

    // S = Q K^T for this warp's 16 rows.
    {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[kBk / 16];
#pragma unroll
      for (int n = 0; n < kBk / 16; ++n) wmma::fill_fragment(acc[n], 0.0f);
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
        wmma::load_matrix_sync(a, qs + warp * 16 * L::kLdT + kk * 16, L::kLdT);
#pragma unroll
        for (int n = 0; n < kBk / 16; ++n) {
          wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> b;
          wmma::load_matrix_sync(b, ks + n * 16 * L::kLdT + kk * 16, L::kLdT);
          wmma::mma_sync(acc[n], a, b, acc[n]);
        }
      }
#pragma unroll
      for (int n = 0; n < kBk / 16; ++n) {
        wmma::store_matrix_sync(ss + warp * 16 * L::kLdS + n * 16, acc[n], L::kLdS,
                                wmma::mem_row_major);
      }
    }
    __syncwarp();

    // Online softmax: each lane takes half of its row's 64 columns.
    {
      float* srow = ss + my_row * L::kLdS + half * 32;
      float mx = -INFINITY;
#pragma unroll 8
      for (int j = 0; j < 32; ++j) {
        const int col = kt + half * 32 + j;
        const float v = col <= my_pos ? srow[j] * scale : -INFINITY;
        srow[j] = v;
        mx = fmaxf(mx, v);
      }
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      const float m_new = fmaxf(m_run, mx);
      const float ref = m_new == -INFINITY ? 0.0f : m_new;
      const float alpha = __expf(m_run - ref);
      T* prow = ps + my_row * L::kLdP + half * 32;
      float sum = 0.0f;
#pragma unroll 8
      for (int j = 0; j < 32; ++j) {
        const float p = __expf(srow[j] - ref);
        prow[j] = FromFloat<T>(p);
        sum += p;
      }
      sum += __shfl_xor_sync(0xffffffffu, sum, 1);
      l_run = l_run * alpha + sum;
      m_run = m_new;
      float* orow = os + my_row * L::kLdO + half * (D / 2);
#pragma unroll 8
      for (int j = 0; j < D / 2; ++j) orow[j] *= alpha;
    }
    __syncwarp();

    // O += P V.
#pragma unroll
    for (int n = 0; n < D / 16; ++n) {
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> o;
      float* optr = os + warp * 16 * L::kLdO + n * 16;
      wmma::load_matrix_sync(o, optr, L::kLdO, wmma::mem_row_major);
#pragma unroll
      for (int kk = 0; kk < kBk / 16; ++kk) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> b;
        wmma::load_matrix_sync(a, ps + warp * 16 * L::kLdP + kk * 16, L::kLdP);
        wmma::load_matrix_sync(b, vs + kk * 16 * L::kLdT + n * 16, L::kLdT);
        wmma::mma_sync(o, a, b, o);
      }
      wmma::store_matrix_sync(optr, o, L::kLdO, wmma::mem_row_major);
    }
    __syncwarp();
  }

  if (my_row < rows) {
    const float inv = 1.0f / l_run;
    const float* orow = os + my_row * L::kLdO + half * (D / 2);
    T* dst = out + (int64_t{q0 + row0 + my_row} * heads + h) * D + half * (D / 2);
    for (int j = 0; j < D / 2; ++j) dst[j] = FromFloat<T>(orow[j] * inv);
  }
}

template <typename T, int D>
cudaError_t Launch(const AttentionArgs& a, bool all_rows, cudaStream_t stream) {
  auto* kernel = PrefillKernel<T, D>;
  constexpr size_t smem = Smem<D>::kBytes;
  if (const cudaError_t e = AllowDynamicSmem(kernel, smem); e != cudaSuccess) return e;
  const unsigned tiles = static_cast<unsigned>((a.plan.max_q_len + kBq - 1) / kBq);
  const dim3 grid(tiles, static_cast<unsigned>(a.heads), static_cast<unsigned>(a.batch.num_seqs));
  LaunchKernel(kernel, grid, kThreads, smem, stream, static_cast<const T*>(a.q), a.q_stride,
               static_cast<const T*>(a.k_cache), static_cast<const T*>(a.v_cache), a.batch,
               static_cast<T*>(a.out), static_cast<int>(a.heads), static_cast<int>(a.kv_heads),
               a.scale, all_rows);
  return cudaGetLastError();
}

}  // namespace

cudaError_t LaunchPrefillAttention(Half16 t, const AttentionArgs& a, bool all_rows,
                                   cudaStream_t stream) {
  return Dispatch16(t, [&](auto z) -> cudaError_t {
    using T = decltype(z);
    switch (a.head_dim) {
      case 16:
        return Launch<T, 16>(a, all_rows, stream);
      case 32:
        return Launch<T, 32>(a, all_rows, stream);
      case 64:
      case 128:
        return LaunchPrefillAttentionMma(t, a, all_rows, stream);
      case 256:
        return Launch<T, 256>(a, all_rows, stream);
      default:
        return cudaErrorInvalidValue;
    }
  });
}

}  // namespace pds::kernels::cuda

// Paged decode attention: one query row per sequence, split-KV.
//
// Grid (kv_heads * head_groups, seqs, splits); 128 threads. A block takes G query heads that
// share one KV head and a run of `split_tokens` positions. Lanes work in groups of D/8, each
// lane holding 8 dims of a K/V row (one 16-byte load), so a warp reads 32/(D/8) rows per step
// fully coalesced and every K/V element is loaded once for the G heads. Pass 1 writes scaled
// scores to shared memory, the block takes max and exp-sum, pass 2 accumulates P V. With one
// split the block writes the normalized output; with several it writes (unnormalized sum, max,
// exp-sum) to the workspace and a combine kernel merges the splits.
#include <cfloat>

#include "kernels/cuda/attention_internal.cuh"

namespace pds::kernels::cuda {
namespace {

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;

template <typename T, int D, int G>
__global__ void __launch_bounds__(kThreads)
    DecodeKernel(const T* __restrict__ q, int64_t q_stride, const T* __restrict__ k_cache,
                 const T* __restrict__ v_cache, PagedBatch batch, T* __restrict__ out, int heads,
                 int kv_heads, float scale, int split_tokens, int num_splits,
                 float* __restrict__ part_o, float* __restrict__ part_ml) {
  // K/V rows in flight per lane group (fewer where the q and accumulator registers are many).
  constexpr int kUnroll = G * D >= 1024 ? 4 : 8;
  constexpr int kLanesPerRow = D / 8;
  constexpr int kRowsPerWarp = 32 / kLanesPerRow;
  constexpr int kRowsPerStep = kRowsPerWarp * kWarps;
  extern __shared__ float smem[];
  float* scores = smem;                  // [G][split_tokens]
  float* red = smem + G * split_tokens;  // [kWarps][G] reductions
  float* acc_s = red + kWarps * G;       // [kWarps][G][D]

  const int s = blockIdx.y;
  const int q_row = batch.cu_q[s];
  if (batch.cu_q[s + 1] - q_row != 1) return;  // not a decode row: the prefill kernel's
  const int kv_len = batch.kv_lens[s];
  const int start = blockIdx.z * split_tokens;
  if (start >= kv_len) return;
  const int end = min(kv_len, start + split_tokens);
  const int n = end - start;
  const int groups = heads / kv_heads / G;
  const int kvh = blockIdx.x / groups;
  const int h0 = kvh * (heads / kv_heads) + (blockIdx.x % groups) * G;

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int seg = lane % kLanesPerRow, row_in_warp = lane / kLanesPerRow;
  float qv[G][8];
#pragma unroll
  for (int g = 0; g < G; ++g) {
    Load8(q + int64_t{q_row} * q_stride + (h0 + g) * D + seg * 8, qv[g]);
#pragma unroll
    for (int i = 0; i < 8; ++i) qv[g][i] *= scale;
  }
  const int32_t* table = batch.block_tables + int64_t{s} * batch.max_blocks;
  const int bs = batch.block_size;
  auto row_offset = [&](int pos) {
    const int64_t block = table[pos / bs];
    return ((block * kv_heads + kvh) * bs + pos % bs) * D + seg * 8;
  };

  // Pass 1: scores. Each lane group issues kUnroll row loads before using them (memory-level
  // parallelism: decode attention is bound by HBM bandwidth).
  for (int base = start + warp * kRowsPerWarp; base < end; base += kRowsPerStep * kUnroll) {
    uint4 raw[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int pos = base + u * kRowsPerStep + row_in_warp;
      raw[u] = pos < end ? *reinterpret_cast<const uint4*>(k_cache + row_offset(pos))
                         : make_uint4(0, 0, 0, 0);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int pos = base + u * kRowsPerStep + row_in_warp;
      float kv[8];
      Unpack8<T>(raw[u], kv);
#pragma unroll
      for (int g = 0; g < G; ++g) {
        float d = 0.0f;
#pragma unroll
        for (int i = 0; i < 8; ++i) d += qv[g][i] * kv[i];
#pragma unroll
        for (int o = kLanesPerRow / 2; o > 0; o >>= 1) d += __shfl_xor_sync(0xffffffffu, d, o);
        if (pos < end && seg == 0) scores[g * split_tokens + (pos - start)] = d;
      }
    }
  }
  __syncthreads();

  // Max and exp-sum per head over the split.
  float m[G], l[G];
#pragma unroll
  for (int g = 0; g < G; ++g) {
    float v = -FLT_MAX;
    for (int i = threadIdx.x; i < n; i += kThreads) v = fmaxf(v, scores[g * split_tokens + i]);
    v = WarpMax(v);
    if (lane == 0) red[warp * G + g] = v;
  }
  __syncthreads();
#pragma unroll
  for (int g = 0; g < G; ++g) {
    m[g] = red[g];
    for (int w = 1; w < kWarps; ++w) m[g] = fmaxf(m[g], red[w * G + g]);
  }
  __syncthreads();
#pragma unroll
  for (int g = 0; g < G; ++g) {
    float v = 0.0f;
    for (int i = threadIdx.x; i < n; i += kThreads) {
      const float p = __expf(scores[g * split_tokens + i] - m[g]);
      scores[g * split_tokens + i] = p;
      v += p;
    }
    v = WarpSum(v);
    if (lane == 0) red[warp * G + g] = v;
  }
  __syncthreads();
#pragma unroll
  for (int g = 0; g < G; ++g) {
    l[g] = 0.0f;
    for (int w = 0; w < kWarps; ++w) l[g] += red[w * G + g];
  }

  // Pass 2: P V.
  float acc[G][8];
#pragma unroll
  for (int g = 0; g < G; ++g)
#pragma unroll
    for (int i = 0; i < 8; ++i) acc[g][i] = 0.0f;
  for (int base = start + warp * kRowsPerWarp; base < end; base += kRowsPerStep * kUnroll) {
    uint4 raw[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int pos = base + u * kRowsPerStep + row_in_warp;
      raw[u] = pos < end ? *reinterpret_cast<const uint4*>(v_cache + row_offset(pos))
                         : make_uint4(0, 0, 0, 0);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int pos = base + u * kRowsPerStep + row_in_warp;
      if (pos >= end) continue;
      float vv[8];
      Unpack8<T>(raw[u], vv);
#pragma unroll
      for (int g = 0; g < G; ++g) {
        const float p = scores[g * split_tokens + (pos - start)];
#pragma unroll
        for (int i = 0; i < 8; ++i) acc[g][i] += p * vv[i];
      }
    }
  }
  // Sum over the row groups of the warp (lanes with the same seg), then over warps.
#pragma unroll
  for (int g = 0; g < G; ++g)
#pragma unroll
    for (int i = 0; i < 8; ++i)
#pragma unroll
      for (int o = kLanesPerRow; o < 32; o <<= 1)
        acc[g][i] += __shfl_xor_sync(0xffffffffu, acc[g][i], o);
  if (row_in_warp == 0) {
#pragma unroll
    for (int g = 0; g < G; ++g)
#pragma unroll
      for (int i = 0; i < 8; ++i) acc_s[(warp * G + g) * D + seg * 8 + i] = acc[g][i];
  }
  __syncthreads();
  for (int e = threadIdx.x; e < G * D; e += kThreads) {
    const int g = e / D, d = e % D;
    float sum = 0.0f;
    for (int w = 0; w < kWarps; ++w) sum += acc_s[(w * G + g) * D + d];
    const int h = h0 + g;
    if (num_splits == 1) {
      out[(int64_t{q_row} * heads + h) * D + d] = FromFloat<T>(sum / l[g]);
    } else {
      const int64_t part = (int64_t{s} * heads + h) * num_splits + blockIdx.z;
      part_o[part * D + d] = sum;
      if (d == 0) {
        part_ml[part * 2] = m[g];
        part_ml[part * 2 + 1] = l[g];
      }
    }
  }
}

// Merges the splits of each (sequence, head): grid (heads, seqs), D threads.
template <typename T>
__global__ void CombineKernel(PagedBatch batch, T* out, int heads, int head_dim, int split_tokens,
                              int num_splits, const float* part_o, const float* part_ml) {
  const int s = blockIdx.y, h = blockIdx.x, d = threadIdx.x;
  const int q_row = batch.cu_q[s];
  if (batch.cu_q[s + 1] - q_row != 1) return;
  const int splits = (batch.kv_lens[s] + split_tokens - 1) / split_tokens;
  const int64_t base = (int64_t{s} * heads + h) * num_splits;
  float m = -FLT_MAX;
  for (int i = 0; i < splits; ++i) m = fmaxf(m, part_ml[(base + i) * 2]);
  float num = 0.0f, den = 0.0f;
  for (int i = 0; i < splits; ++i) {
    const float w = __expf(part_ml[(base + i) * 2] - m);
    num += w * part_o[(base + i) * head_dim + d];
    den += w * part_ml[(base + i) * 2 + 1];
  }
  out[(int64_t{q_row} * heads + h) * head_dim + d] = FromFloat<T>(num / den);
}

template <typename T, int D, int G>
cudaError_t LaunchDecode(const AttentionArgs& a, cudaStream_t stream) {
  const AttentionPlan& plan = a.plan;
  const int groups = static_cast<int>(a.heads / a.kv_heads / G);
  const dim3 grid(static_cast<unsigned>(a.kv_heads * groups),
                  static_cast<unsigned>(a.batch.num_seqs), static_cast<unsigned>(plan.num_splits));
  const size_t smem = sizeof(float) * (G * plan.split_tokens + kWarps * G + kWarps * G * D);
  auto* kernel = DecodeKernel<T, D, G>;
  if (smem > 48 * 1024) {
    cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (e != cudaSuccess) return e;
  }
  float* part_o = static_cast<float*>(a.workspace);
  float* part_ml = part_o + DecodeWorkspaceFloats(a.batch.num_seqs, a.heads, D, plan.num_splits) -
                   int64_t{a.batch.num_seqs} * a.heads * plan.num_splits * 2;
  kernel<<<grid, kThreads, smem, stream>>>(
      static_cast<const T*>(a.q), a.q_stride, static_cast<const T*>(a.k_cache),
      static_cast<const T*>(a.v_cache), a.batch, static_cast<T*>(a.out), static_cast<int>(a.heads),
      static_cast<int>(a.kv_heads), a.scale, plan.split_tokens, plan.num_splits, part_o, part_ml);
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess || plan.num_splits == 1) return e;
  CombineKernel<T><<<dim3(static_cast<unsigned>(a.heads), static_cast<unsigned>(a.batch.num_seqs)),
                     D, 0, stream>>>(a.batch, static_cast<T*>(a.out), static_cast<int>(a.heads), D,
                                     plan.split_tokens, plan.num_splits, part_o, part_ml);
  return cudaGetLastError();
}

template <typename T, int D>
cudaError_t DecodeForDim(const AttentionArgs& a, cudaStream_t stream) {
  switch (HeadsPerBlock(a.heads, a.kv_heads)) {
    case 8:
      return LaunchDecode<T, D, 8>(a, stream);
    case 4:
      return LaunchDecode<T, D, 4>(a, stream);
    case 2:
      return LaunchDecode<T, D, 2>(a, stream);
    default:
      return LaunchDecode<T, D, 1>(a, stream);
  }
}

}  // namespace

int64_t DecodeWorkspaceFloats(int32_t num_seqs, int64_t heads, int64_t head_dim,
                              int32_t num_splits) {
  if (num_splits <= 1) return 0;
  return int64_t{num_seqs} * heads * num_splits * (head_dim + 2);
}

cudaError_t LaunchDecodeAttention(Half16 t, const AttentionArgs& a, cudaStream_t stream) {
  return Dispatch16(t, [&](auto z) -> cudaError_t {
    using T = decltype(z);
    switch (a.head_dim) {
      case 16:
        return DecodeForDim<T, 16>(a, stream);
      case 32:
        return DecodeForDim<T, 32>(a, stream);
      case 64:
        return DecodeForDim<T, 64>(a, stream);
      case 128:
        return DecodeForDim<T, 128>(a, stream);
      case 256:
        return DecodeForDim<T, 256>(a, stream);
      default:
        return cudaErrorInvalidValue;
    }
  });
}

}  // namespace pds::kernels::cuda

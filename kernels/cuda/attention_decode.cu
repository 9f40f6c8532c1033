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

#include "kernels/cuda/attention_mma.cuh"

namespace pds::kernels::cuda {
namespace {

constexpr int kThreads = 128;
constexpr int kWarps = kThreads / 32;

// What a decode block (grid (kv_heads * head groups, seqs, splits)) works on: its sequence's
// query row, the positions [start, end) of its split, its KV head and first query head.
// valid = false: not a decode row (the prefill kernel's) or a split past the context.
struct DecodeBlock {
  bool valid = false;
  int seq = 0, q_row = 0, start = 0, end = 0, kvh = 0, h0 = 0;
};

template <int G>
__device__ __forceinline__ DecodeBlock LocateDecodeBlock(const PagedBatch& batch, int heads,
                                                         int kv_heads, int split_tokens) {
  DecodeBlock b;
  b.seq = blockIdx.y;
  b.q_row = batch.cu_q[b.seq];
  if (batch.cu_q[b.seq + 1] - b.q_row != 1) return b;
  const int kv_len = batch.kv_lens[b.seq];
  b.start = blockIdx.z * split_tokens;
  if (b.start >= kv_len) return b;
  b.end = min(kv_len, b.start + split_tokens);
  const int groups = heads / kv_heads / G;
  b.kvh = blockIdx.x / groups;
  b.h0 = b.kvh * (heads / kv_heads) + (blockIdx.x % groups) * G;
  b.valid = true;
  return b;
}

// The G query heads' dims seg * 8 .. seg * 8 + 7, times the softmax scale.
template <typename T, int D, int G>
__device__ __forceinline__ void LoadScaledQ(const T* q, int64_t q_stride, const DecodeBlock& b,
                                            int seg, float scale, float (&qv)[G][8]) {
#pragma unroll
  for (int g = 0; g < G; ++g) {
    Load8(q + int64_t{b.q_row} * q_stride + (b.h0 + g) * D + seg * 8, qv[g]);
#pragma unroll
    for (int i = 0; i < 8; ++i) qv[g][i] *= scale;
  }
}

// The splits of a sequence: those its context reaches, at most the launch's.
__device__ __forceinline__ int SplitsOf(int kv_len, int split_tokens, int num_splits) {
  return min((kv_len + split_tokens - 1) / split_tokens, num_splits);
}

// The output of one (sequence, head) at dim d from its `splits` partial results at
// part_o / part_ml[base..]: their sums weighed by exp(their max - the largest max), over their
// weighed exp-sums. Volatile loads: other blocks wrote them (in this launch when fused), so
// they are neither cached in L1 nor moved above the caller's fence.
__device__ __forceinline__ float MergeSplits(const volatile float* part_o,
                                             const volatile float* part_ml, int64_t base,
                                             int splits, int head_dim, int d) {
  float m = -FLT_MAX;
  for (int i = 0; i < splits; ++i) m = fmaxf(m, part_ml[(base + i) * 2]);
  float num = 0.0f, den = 0.0f;
  for (int i = 0; i < splits; ++i) {
    const float w = __expf(part_ml[(base + i) * 2] - m);
    num += w * part_o[(base + i) * head_dim + d];
    den += w * part_ml[(base + i) * 2 + 1];
  }
  return num / den;
}

// The fused combine (`counters` given, PDS_ATTN_COMBINE=fused): called by every thread of a
// decode block after it wrote its split's partial results. The block of a (sequence, head
// group) that counts last merges all its splits into `out` and sets the counter back to 0 for
// the next launch; the others return. (The classic threadfence reduction: each thread's writes
// are made visible before the count, and the last block reads them after it.)
template <typename T, int D, int G>
__device__ __forceinline__ void MergeIfLast(const PagedBatch& batch, const DecodeBlock& blk,
                                            int heads, int split_tokens, int num_splits,
                                            const float* part_o, const float* part_ml,
                                            int32_t* counters, T* out) {
  __shared__ int last;
  const int splits = SplitsOf(batch.kv_lens[blk.seq], split_tokens, num_splits);
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) {
    int32_t* counter = counters + int64_t{blockIdx.y} * gridDim.x + blockIdx.x;
    last = atomicAdd(counter, 1) == splits - 1;
    if (last) atomicExch(counter, 0);  // every split of this launch has counted
  }
  __syncthreads();
  if (!last) return;
  __threadfence();
  for (int e = threadIdx.x; e < G * D; e += blockDim.x) {
    const int h = blk.h0 + e / D, d = e % D;
    const int64_t base = (int64_t{blk.seq} * heads + h) * num_splits;
    out[(int64_t{blk.q_row} * heads + h) * D + d] =
        FromFloat<T>(MergeSplits(part_o, part_ml, base, splits, D, d));
  }
}

template <typename T, int D, int G>
__global__ void __launch_bounds__(kThreads)
    DecodeKernel(const T* __restrict__ q, int64_t q_stride, const T* __restrict__ k_cache,
                 const T* __restrict__ v_cache, PagedBatch batch, T* __restrict__ out, int heads,
                 int kv_heads, float scale, int split_tokens, int num_splits,
                 float* __restrict__ part_o, float* __restrict__ part_ml, int32_t* counters) {
  PdlWaitAndTrigger();
  // K/V rows in flight per lane group (fewer where the q and accumulator registers are many).
  constexpr int kUnroll = G * D >= 1024 ? 4 : 8;
  constexpr int kLanesPerRow = D / 8;
  constexpr int kRowsPerWarp = 32 / kLanesPerRow;
  constexpr int kRowsPerStep = kRowsPerWarp * kWarps;
  extern __shared__ float smem[];
  float* scores = smem;                  // [G][split_tokens]
  float* red = smem + G * split_tokens;  // [kWarps][G] reductions
  float* acc_s = red + kWarps * G;       // [kWarps][G][D]

  const DecodeBlock blk = LocateDecodeBlock<G>(batch, heads, kv_heads, split_tokens);
  if (!blk.valid) return;
  const int s = blk.seq, q_row = blk.q_row, start = blk.start, end = blk.end, kvh = blk.kvh,
            h0 = blk.h0;
  const int n = end - start;

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int seg = lane % kLanesPerRow, row_in_warp = lane / kLanesPerRow;
  float qv[G][8];
  LoadScaledQ<T, D, G>(q, q_stride, blk, seg, scale, qv);
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
  if (num_splits > 1 && counters != nullptr) {
    MergeIfLast<T, D, G>(batch, blk, heads, split_tokens, num_splits, part_o, part_ml, counters,
                         out);
  }
}

// Merges the splits of each (sequence, head): grid (heads, seqs), D threads.
template <typename T>
__global__ void CombineKernel(PagedBatch batch, T* out, int heads, int head_dim, int split_tokens,
                              int num_splits, const float* part_o, const float* part_ml) {
  PdlWaitAndTrigger();
  const int s = blockIdx.y, h = blockIdx.x, d = threadIdx.x;
  const int q_row = batch.cu_q[s];
  if (batch.cu_q[s + 1] - q_row != 1) return;
  const int splits = SplitsOf(batch.kv_lens[s], split_tokens, num_splits);
  const int64_t base = (int64_t{s} * heads + h) * num_splits;
  out[(int64_t{q_row} * heads + h) * head_dim + d] =
      FromFloat<T>(MergeSplits(part_o, part_ml, base, splits, head_dim, d));
}

// Sums each of the G values of a lane over the L lanes of its row group (L a power of two, at
// least G; groups contiguous and aligned) in G - 1 + log2(L / G) shuffles instead of
// G log2(L): at each halving step a lane keeps the half of the heads its lane bit selects and
// adds the partner's partial sums of that half. Returns the total of head seg / (L / G).
template <int G, int L>
__device__ __forceinline__ float ReduceHeads(float (&v)[G], int seg) {
#pragma unroll
  for (int step = 0; (G >> step) > 1; ++step) {
    const int half = (G >> step) / 2, o = L >> (step + 1);
    const bool upper = (seg & o) != 0;
#pragma unroll
    for (int j = 0; j < half; ++j) {
      const float send = upper ? v[j] : v[j + half];
      const float keep = upper ? v[j + half] : v[j];
      v[j] = keep + __shfl_xor_sync(0xffffffffu, send, o);
    }
  }
#pragma unroll
  for (int o = L / G / 2; o > 0; o >>= 1) v[0] += __shfl_xor_sync(0xffffffffu, v[0], o);
  return v[0];
}

// Pipelined decode (head dims 64 and 128). Same grid and outputs as DecodeKernel, but each
// warp streams its own chunks of C positions (chunks warp, warp + 4, ...) through a
// kPipeStages-deep ring of cp.async copies in shared memory and keeps an online softmax, so
// the K and V of the next chunks are in flight while a chunk is computed, without registers
// holding them and without a block-wide barrier in the loop. Warps merge their (max, sum,
// output) at the end.
constexpr int kPipeStages = 3;

template <int G>
__host__ __device__ constexpr int PipeChunk() {
  return G >= 8 ? 4 : 8;  // G * C <= 32: a chunk's scores are one per lane
}

template <typename T, int D, int G>
__host__ __device__ constexpr size_t PipeSmemBytes() {
  constexpr size_t ring = size_t{kWarps} * kPipeStages * 2 * PipeChunk<G>() * D * sizeof(T);
  constexpr size_t merge = sizeof(float) * kWarps * G * (D + 2);
  return (ring > merge ? ring : merge) + sizeof(float) * kWarps * (32 + G);
}

template <typename T, int D, int G>
__global__ void __launch_bounds__(kThreads, G >= 8 ? 2 : 4)
    PipelinedDecodeKernel(const T* __restrict__ q, int64_t q_stride, const T* __restrict__ k_cache,
                          const T* __restrict__ v_cache, PagedBatch batch, T* __restrict__ out,
                          int heads, int kv_heads, float scale, int split_tokens, int num_splits,
                          float* __restrict__ part_o, float* __restrict__ part_ml,
                          int32_t* counters) {
  PdlWaitAndTrigger();
  constexpr int C = PipeChunk<G>();
  constexpr int L = D / 8;           // lanes per K/V row, 8 dims (16 bytes) each
  constexpr int R = 32 / L;          // rows per warp step
  constexpr int kPieces = C * L;     // 16-byte pieces of a chunk's K (and of its V)
  constexpr int kStage = 2 * C * D;  // elements per ring slot: K rows, then V rows
  static_assert(G <= L && C % R == 0 && kPieces % 32 == 0 && G * C <= 32);
  constexpr size_t kScratchOffset = PipeSmemBytes<T, D, G>() - sizeof(float) * kWarps * (32 + G);
  extern __shared__ __align__(16) unsigned char smem_raw[];

  const DecodeBlock blk = LocateDecodeBlock<G>(batch, heads, kv_heads, split_tokens);
  if (!blk.valid) return;
  const int s = blk.seq, q_row = blk.q_row, start = blk.start, end = blk.end, kvh = blk.kvh,
            h0 = blk.h0;

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int seg = lane % L, rg = lane / L;
  float qv[G][8];
  LoadScaledQ<T, D, G>(q, q_stride, blk, seg, scale, qv);
  const int32_t* table = batch.block_tables + int64_t{s} * batch.max_blocks;
  const int bs = batch.block_size;
  const bool pow2 = (bs & (bs - 1)) == 0;
  const int shift = __ffs(bs) - 1;
  auto row_start = [&](int pos) {  // element offset of position pos's row for this KV head
    const int blk = pow2 ? pos >> shift : pos / bs;
    const int64_t block = table[blk];
    return ((block * kv_heads + kvh) * bs + (pos - blk * bs)) * D;
  };

  T* ring = reinterpret_cast<T*>(smem_raw) + warp * kPipeStages * kStage;
  float* sc = reinterpret_cast<float*>(smem_raw + kScratchOffset) + warp * (32 + G);
  float* alpha_s = sc + 32;
  const int chunks = (end - start + C - 1) / C;
  const int my_chunks = chunks > warp ? (chunks - warp + kWarps - 1) / kWarps : 0;
  auto chunk_start = [&](int i) { return start + (warp + i * kWarps) * C; };
  // The warp's i-th chunk into ring slot i % kPipeStages (positions past the end zero-filled);
  // always one commit group, so the group count per iteration is uniform.
  auto issue = [&](int i) {
    if (i < my_chunks) {
      const int c0 = chunk_start(i);
      T* slot = ring + (i % kPipeStages) * kStage;
#pragma unroll
      for (int j = 0; j < kPieces / 32; ++j) {
        const int piece = lane + 32 * j;
        const int r = piece / L, sg = piece % L;
        const bool valid = c0 + r < end;
        const int64_t off = (valid ? row_start(c0 + r) : 0) + sg * 8;
        CpAsync16(slot + r * D + sg * 8, k_cache + off, valid);
        CpAsync16(slot + C * D + r * D + sg * 8, v_cache + off, valid);
      }
    }
    CpAsyncCommit();
  };

  // Online softmax state of head lane / C, held by the lanes below G * C.
  const bool owner = lane < G * C;
  const int own_c = lane % C;
  float m = -FLT_MAX, l = 0.0f;
  float acc[G][8];
#pragma unroll
  for (int g = 0; g < G; ++g)
#pragma unroll
    for (int i = 0; i < 8; ++i) acc[g][i] = 0.0f;

#pragma unroll
  for (int i = 0; i < kPipeStages - 1; ++i) issue(i);
  for (int i = 0; i < my_chunks; ++i) {
    CpAsyncWait<kPipeStages - 2>();
    __syncwarp();
    issue(i + kPipeStages - 1);  // into the slot chunk i - 1 used
    const T* slot = ring + (i % kPipeStages) * kStage;
    const int c0 = chunk_start(i);
#pragma unroll
    for (int r0 = 0; r0 < C; r0 += R) {
      const int r = r0 + rg;
      float kv[8];
      Unpack8<T>(*reinterpret_cast<const uint4*>(slot + r * D + seg * 8), kv);
      float d[G];
#pragma unroll
      for (int g = 0; g < G; ++g) {
        d[g] = 0.0f;
#pragma unroll
        for (int e = 0; e < 8; ++e) d[g] += qv[g][e] * kv[e];
      }
      const float score = ReduceHeads<G, L>(d, seg);
      if (seg % (L / G) == 0) sc[(seg / (L / G)) * C + r] = score;
    }
    __syncwarp();
    const bool live = owner && c0 + own_c < end;
    const float score = live ? sc[lane] : -FLT_MAX;
    float chunk_max = score;
#pragma unroll
    for (int o = C / 2; o > 0; o >>= 1)
      chunk_max = fmaxf(chunk_max, __shfl_xor_sync(0xffffffffu, chunk_max, o));
    const float m_new = fmaxf(m, chunk_max);
    const float p = live ? __expf(score - m_new) : 0.0f;
    float p_sum = p;
#pragma unroll
    for (int o = C / 2; o > 0; o >>= 1) p_sum += __shfl_xor_sync(0xffffffffu, p_sum, o);
    const float alpha = __expf(m - m_new);
    l = l * alpha + p_sum;
    m = m_new;
    if (owner) sc[lane] = p;
    if (owner && own_c == 0) alpha_s[lane / C] = alpha;
    __syncwarp();
#pragma unroll
    for (int g = 0; g < G; ++g) {
      const float a = alpha_s[g];
#pragma unroll
      for (int e = 0; e < 8; ++e) acc[g][e] *= a;
    }
#pragma unroll
    for (int r0 = 0; r0 < C; r0 += R) {
      const int r = r0 + rg;
      float vv[8];
      Unpack8<T>(*reinterpret_cast<const uint4*>(slot + C * D + r * D + seg * 8), vv);
#pragma unroll
      for (int g = 0; g < G; ++g) {
        const float pg = sc[g * C + r];
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[g][e] += pg * vv[e];
      }
    }
  }
  CpAsyncWait<0>();

  // Sum over the warp's row groups, then merge the warps through shared memory (over the ring).
#pragma unroll
  for (int g = 0; g < G; ++g)
#pragma unroll
    for (int e = 0; e < 8; ++e)
#pragma unroll
      for (int o = L; o < 32; o <<= 1) acc[g][e] += __shfl_xor_sync(0xffffffffu, acc[g][e], o);
  __syncthreads();
  float* acc_s = reinterpret_cast<float*>(smem_raw);  // [kWarps][G][D]
  float* ml_s = acc_s + kWarps * G * D;               // [kWarps][G] (max, sum)
  if (rg == 0) {
#pragma unroll
    for (int g = 0; g < G; ++g)
#pragma unroll
      for (int e = 0; e < 8; ++e) acc_s[(warp * G + g) * D + seg * 8 + e] = acc[g][e];
  }
  if (owner && own_c == 0) {
    ml_s[(warp * G + lane / C) * 2] = m;
    ml_s[(warp * G + lane / C) * 2 + 1] = l;
  }
  __syncthreads();
  for (int e = threadIdx.x; e < G * D; e += kThreads) {
    const int g = e / D, d = e % D;
    float mx = -FLT_MAX;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) mx = fmaxf(mx, ml_s[(w * G + g) * 2]);
    float num = 0.0f, den = 0.0f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      const float wgt = __expf(ml_s[(w * G + g) * 2] - mx);
      num += wgt * acc_s[(w * G + g) * D + d];
      den += wgt * ml_s[(w * G + g) * 2 + 1];
    }
    const int h = h0 + g;
    if (num_splits == 1) {
      out[(int64_t{q_row} * heads + h) * D + d] = FromFloat<T>(num / den);
    } else {
      const int64_t part = (int64_t{s} * heads + h) * num_splits + blockIdx.z;
      part_o[part * D + d] = num;
      if (d == 0) {
        part_ml[part * 2] = mx;
        part_ml[part * 2 + 1] = den;
      }
    }
  }
  if (num_splits > 1 && counters != nullptr) {
    MergeIfLast<T, D, G>(batch, blk, heads, split_tokens, num_splits, part_o, part_ml, counters,
                         out);
  }
}

// Decode on the tensor cores (PDS_ATTN_DECODE=mma; head dims 64 and 128). Same grid, outputs
// and split workspace as the pipelined kernel. Per chunk of 16 positions a warp computes
// S^T = K Q^T (positions as the m16n8k16 rows, the block's G query heads as its 8 columns;
// columns G..7 are zero heads) and O^T += V^T P^T (dims as rows), with K and V fragments from
// ldmatrix and P^T turned into the B operand by movmatrix. That is D/8 ldmatrix.x4, D/8 mmas,
// 2 movmatrix and 6 shuffles per chunk, where the pipelined kernel issues about three times as
// many shared-memory loads, stores and shuffles (ncu, H100 run 2: its shared-memory pipe, not
// DRAM, is the limit). As there, each warp streams its own chunks (warp, warp + 4, ...)
// through a kMmaStages-deep cp.async ring without block barriers, and the warps merge at the
// end; the softmax runs in the exp2 domain as in the prefill kernel.
constexpr int kMmaChunk = 16;
constexpr int kMmaStages = 3;

template <typename T, int D, int G>
__host__ __device__ constexpr size_t MmaDecodeSmemBytes() {
  // Rows padded by 8 elements so that the 8 rows an ldmatrix phase reads hit distinct banks.
  constexpr size_t ring = size_t{kWarps} * kMmaStages * 2 * kMmaChunk * (D + 8) * sizeof(T);
  constexpr size_t merge = sizeof(float) * kWarps * G * (D + 2);
  return ring > merge ? ring : merge;
}

// The transpose of an 8x8 16-bit matrix held as the m16n8k16 fragments hold one (lane l: row
// l / 4, columns 2 (l % 4) and + 1).
__device__ __forceinline__ uint32_t TransposeFragment(uint32_t x) {
  uint32_t y;
  asm volatile("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;\n" : "=r"(y) : "r"(x));
  return y;
}

template <typename T, int D, int G>
__global__ void __launch_bounds__(kThreads, D == 64 ? 4 : 2)  // what the ring's size allows
    MmaDecodeKernel(const T* __restrict__ q, int64_t q_stride, const T* __restrict__ k_cache,
                    const T* __restrict__ v_cache, PagedBatch batch, T* __restrict__ out, int heads,
                    int kv_heads, float scale, int split_tokens, int num_splits,
                    float* __restrict__ part_o, float* __restrict__ part_ml, int32_t* counters) {
  PdlWaitAndTrigger();
  constexpr int C = kMmaChunk;
  constexpr int kLd = D + 8;  // row stride in shared memory (elements)
  constexpr uint32_t kRowBytes = kLd * sizeof(T);
  constexpr int L = D / 8;             // 16-byte pieces per K/V row
  constexpr int kPieces = C * L;       // pieces of a chunk's K (and of its V)
  constexpr int kStage = 2 * C * kLd;  // elements per ring slot: C K rows, then C V rows
  static_assert(G >= 1 && G <= 8 && kPieces % 32 == 0 && C == 16, "fragment mapping");
  extern __shared__ __align__(16) unsigned char smem_raw[];

  const DecodeBlock blk = LocateDecodeBlock<G>(batch, heads, kv_heads, split_tokens);
  if (!blk.valid) return;
  const int start = blk.start, end = blk.end, kvh = blk.kvh;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int g = lane >> 2, tig = lane & 3;

  // Q^T as B fragments: column g < G is query head h0 + g, k-step kk's b0 / b1 its dims
  // 16 kk + 2 tig (+1) and + 8; columns G..7 are zero. A negative scale flips Q's signs (exact)
  // so that scores go to the exp2 domain through c = |scale| log2(e).
  const float c = fmaxf(fabsf(scale) * 1.4426950408889634f, FLT_MIN);
  const uint32_t flip = scale < 0.0f ? 0x80008000u : 0u;
  uint32_t qf[D / 16][2];
  {
    const T* qrow = q + int64_t{blk.q_row} * q_stride + (blk.h0 + min(g, G - 1)) * D + 2 * tig;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      qf[kk][0] = g < G ? *reinterpret_cast<const uint32_t*>(qrow + kk * 16) ^ flip : 0u;
      qf[kk][1] = g < G ? *reinterpret_cast<const uint32_t*>(qrow + kk * 16 + 8) ^ flip : 0u;
    }
  }

  const int32_t* table = batch.block_tables + int64_t{blk.seq} * batch.max_blocks;
  const int bs = batch.block_size;
  const bool pow2 = (bs & (bs - 1)) == 0;
  const int shift = __ffs(bs) - 1;
  auto row_start = [&](int pos) {  // element offset of position pos's row for this KV head
    const int bi = pow2 ? pos >> shift : pos / bs;
    const int64_t block = table[bi];
    return ((block * kv_heads + kvh) * bs + (pos - bi * bs)) * D;
  };
  T* ring = reinterpret_cast<T*>(smem_raw) + warp * kMmaStages * kStage;
  const int chunks = (end - start + C - 1) / C;
  const int my_chunks = chunks > warp ? (chunks - warp + kWarps - 1) / kWarps : 0;
  auto chunk_start = [&](int i) { return start + (warp + i * kWarps) * C; };
  // The warp's i-th chunk into ring slot i % kMmaStages (positions past the end zero-filled);
  // always one commit group, so the group count per iteration is uniform.
  auto issue = [&](int i) {
    if (i < my_chunks) {
      const int c0 = chunk_start(i);
      T* slot = ring + (i % kMmaStages) * kStage;
#pragma unroll
      for (int j = 0; j < kPieces / 32; ++j) {
        const int piece = lane + 32 * j;
        const int r = piece / L, sg = piece % L;
        const bool valid = c0 + r < end;
        const int64_t off = (valid ? row_start(c0 + r) : 0) + sg * 8;
        CpAsync16(slot + r * kLd + sg * 8, k_cache + off, valid);
        CpAsync16(slot + (C + r) * kLd + sg * 8, v_cache + off, valid);
      }
    }
    CpAsyncCommit();
  };
  // ldmatrix lane addresses within a slot. K as A (rows = positions, k = dims; matrices:
  // positions 0-7 / 8-15 x dims 0-7, then x dims 8-15): row l % 16, dim offset 8 (l / 16). V^T
  // as A by .trans (rows = dims, k = positions; matrices: positions 0-7 x dims 0-7, 0-7 x 8-15,
  // 8-15 x 0-7, 8-15 x 8-15): row C + (l % 8) + 8 (l / 16), dim offset 8 ((l / 8) % 2).
  const uint32_t ring_addr = static_cast<uint32_t>(__cvta_generic_to_shared(ring));
  const uint32_t k_lane = (lane & 15) * kRowBytes + (lane >> 4) * 8 * sizeof(T);
  const uint32_t v_lane =
      (C + (lane & 7) + ((lane >> 4) << 3)) * kRowBytes + ((lane >> 3) & 1) * 8 * sizeof(T);

  // Heads 2 tig and 2 tig + 1 (columns of S^T and O^T): running maxima (raw scores), this
  // lane's shares of the running sums; o[dp] holds dims 16 dp + g ([0], [1]: the two heads)
  // and 16 dp + g + 8 ([2], [3]).
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};
  float o[D / 16][4];
#pragma unroll
  for (int n = 0; n < D / 16; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.0f;

#pragma unroll
  for (int i = 0; i < kMmaStages - 1; ++i) issue(i);
  for (int i = 0; i < my_chunks; ++i) {
    CpAsyncWait<kMmaStages - 2>();
    __syncwarp();
    issue(i + kMmaStages - 1);  // into the slot chunk i - 1 used
    const uint32_t slot = ring_addr + (i % kMmaStages) * kStage * sizeof(T);
    const int c0 = chunk_start(i);
    // S^T: st[0], st[1] = position c0 + g, heads 2 tig, 2 tig + 1; st[2], st[3] = c0 + g + 8.
    float st[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      uint32_t a[4];
      LdMatrixX4(a, slot + k_lane + kk * 16 * sizeof(T));
      Mma16816<T>(st, a, qf[kk][0], qf[kk][1]);
    }
    if (c0 + C > end) {  // positions past the split's end (zero-filled rows) score -inf
      if (c0 + g >= end) st[0] = st[1] = -INFINITY;
      if (c0 + g + 8 >= end) st[2] = st[3] = -INFINITY;
    }
    // Online softmax per head over the chunk's 16 positions (lanes of one tig share a head
    // pair). Position c0 < end is in every chunk: the maxima are finite.
    float mx0 = fmaxf(st[0], st[2]), mx1 = fmaxf(st[1], st[3]);
#pragma unroll
    for (int off = 4; off < 32; off <<= 1) {
      mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, off));
      mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, off));
    }
    const float mn0 = fmaxf(m[0], mx0), mn1 = fmaxf(m[1], mx1);
    const float ref0 = __fmul_rn(mn0, c), ref1 = __fmul_rn(mn1, c);
    if (__any_sync(0xffffffffu, mn0 > m[0] || mn1 > m[1])) {
      const float alpha0 = Exp2(__fmul_rn(m[0], c) - ref0);  // 0 before any term (m = -inf)
      const float alpha1 = Exp2(__fmul_rn(m[1], c) - ref1);
      l[0] *= alpha0;
      l[1] *= alpha1;
#pragma unroll
      for (int n = 0; n < D / 16; ++n) {
        o[n][0] *= alpha0;
        o[n][1] *= alpha1;
        o[n][2] *= alpha0;
        o[n][3] *= alpha1;
      }
    }
    m[0] = mn0;
    m[1] = mn1;
    const float p0 = Exp2(fmaf(st[0], c, -ref0)), p1 = Exp2(fmaf(st[1], c, -ref1));
    const float p2 = Exp2(fmaf(st[2], c, -ref0)), p3 = Exp2(fmaf(st[3], c, -ref1));
    l[0] += p0 + p2;
    l[1] += p1 + p3;
    // P^T (positions x heads) as the B operand of O^T += V^T P^T: b0 / b1 hold head g's
    // probabilities at positions 2 tig (+1) / 8 + 2 tig (+1), the transposes of this lane's
    // (position g / g + 8, heads 2 tig, 2 tig + 1) pairs.
    const uint32_t b0 = TransposeFragment(Pack<T>(p0, p1));
    const uint32_t b1 = TransposeFragment(Pack<T>(p2, p3));
#pragma unroll
    for (int dp = 0; dp < D / 16; ++dp) {
      uint32_t a[4];
      LdMatrixX4Trans(a, slot + v_lane + dp * 16 * sizeof(T));
      Mma16816<T>(o[dp], a, b0, b1);
    }
  }
  CpAsyncWait<0>();

  // Merge the warps through shared memory (over the ring): each head's sum over the lanes of
  // its tig, then each warp's (exp2-domain maximum, sum, output) per head.
#pragma unroll
  for (int off = 4; off < 32; off <<= 1) {
    l[0] += __shfl_xor_sync(0xffffffffu, l[0], off);
    l[1] += __shfl_xor_sync(0xffffffffu, l[1], off);
  }
  __syncthreads();
  float* acc_s = reinterpret_cast<float*>(smem_raw);  // [kWarps][G][D]
  float* ml_s = acc_s + kWarps * G * D;               // [kWarps][G] (max * c, sum)
#pragma unroll
  for (int e = 0; e < 2; ++e) {
    const int hh = 2 * tig + e;
    if (hh >= G) continue;
    float* row = acc_s + (warp * G + hh) * D + g;
#pragma unroll
    for (int n = 0; n < D / 16; ++n) {
      row[16 * n] = o[n][e];
      row[16 * n + 8] = o[n][2 + e];
    }
    if (g == 0) {
      ml_s[(warp * G + hh) * 2] = my_chunks > 0 ? __fmul_rn(m[e], c) : -INFINITY;
      ml_s[(warp * G + hh) * 2 + 1] = l[e];
    }
  }
  __syncthreads();
  for (int e = threadIdx.x; e < G * D; e += kThreads) {
    const int hh = e / D, d = e % D;
    float mx = -INFINITY;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) mx = fmaxf(mx, ml_s[(w * G + hh) * 2]);
    float num = 0.0f, den = 0.0f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      const float wgt = Exp2(ml_s[(w * G + hh) * 2] - mx);  // 0 for a warp without positions
      num += wgt * acc_s[(w * G + hh) * D + d];
      den += wgt * ml_s[(w * G + hh) * 2 + 1];
    }
    const int h = blk.h0 + hh;
    if (num_splits == 1) {
      out[(int64_t{blk.q_row} * heads + h) * D + d] = FromFloat<T>(num / den);
    } else {
      // The combine kernel weighs splits by exp(max): the natural-log scaled score, mx ln 2.
      const int64_t part = (int64_t{blk.seq} * heads + h) * num_splits + blockIdx.z;
      part_o[part * D + d] = num;
      if (d == 0) {
        part_ml[part * 2] = mx * 0.6931471805599453f;
        part_ml[part * 2 + 1] = den;
      }
    }
  }
  if (num_splits > 1 && counters != nullptr) {
    MergeIfLast<T, D, G>(batch, blk, heads, split_tokens, num_splits, part_o, part_ml, counters,
                         out);
  }
}

template <typename T, int D, int G>
cudaError_t LaunchDecode(const AttentionArgs& a, cudaStream_t stream) {
  const AttentionPlan& plan = a.plan;
  const int groups = static_cast<int>(a.heads / a.kv_heads / G);
  const dim3 grid(static_cast<unsigned>(a.kv_heads * groups),
                  static_cast<unsigned>(a.batch.num_seqs), static_cast<unsigned>(plan.num_splits));
  float* part_o = static_cast<float*>(a.workspace);
  float* part_ml = part_o + DecodeWorkspaceFloats(a.batch.num_seqs, a.heads, D, plan.num_splits) -
                   int64_t{a.batch.num_seqs} * a.heads * plan.num_splits * 2;
  // The fused combine where asked for and the caller's counters cover the grid's blocks.
  int32_t* counters = Settings().fused_combine && plan.num_splits > 1 &&
                              int64_t{grid.x} * grid.y <= a.split_counter_slots
                          ? a.split_counters
                          : nullptr;
  const auto args = [&](auto kernel, size_t smem) {
    LaunchKernel(kernel, grid, kThreads, smem, stream, static_cast<const T*>(a.q), a.q_stride,
                 static_cast<const T*>(a.k_cache), static_cast<const T*>(a.v_cache), a.batch,
                 static_cast<T*>(a.out), static_cast<int>(a.heads), static_cast<int>(a.kv_heads),
                 a.scale, plan.split_tokens, plan.num_splits, part_o, part_ml, counters);
  };
  bool pipelined = false;
  if constexpr (D == 64 || D == 128) pipelined = PipelinedDecode(D);
  if (pipelined && Settings().mma_decode) {
    if constexpr (D == 64 || D == 128) {
      constexpr size_t smem = MmaDecodeSmemBytes<T, D, G>();
      auto* kernel = MmaDecodeKernel<T, D, G>;
      if (const cudaError_t e = AllowDynamicSmem(kernel, smem); e != cudaSuccess) return e;
      args(kernel, smem);
    }
  } else if (pipelined) {
    if constexpr (D == 64 || D == 128) {
      constexpr size_t smem = PipeSmemBytes<T, D, G>();
      auto* kernel = PipelinedDecodeKernel<T, D, G>;
      if (const cudaError_t e = AllowDynamicSmem(kernel, smem); e != cudaSuccess) return e;
      args(kernel, smem);
    }
  } else {
    const size_t smem = sizeof(float) * (G * plan.split_tokens + kWarps * G + kWarps * G * D);
    auto* kernel = DecodeKernel<T, D, G>;
    if (const cudaError_t e = AllowDynamicSmem(kernel, smem); e != cudaSuccess) return e;
    args(kernel, smem);
  }
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess || plan.num_splits == 1 || counters != nullptr) return e;
  LaunchKernel(CombineKernel<T>,
               dim3(static_cast<unsigned>(a.heads), static_cast<unsigned>(a.batch.num_seqs)), D, 0,
               stream, a.batch, static_cast<T*>(a.out), static_cast<int>(a.heads), D,
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

bool PipelinedDecode(int64_t head_dim) {
  return !Settings().legacy_decode && (head_dim == 64 || head_dim == 128);
}

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

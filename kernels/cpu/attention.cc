#include "kernels/attention.h"

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstring>
#include <vector>

#include "kernels/cpu/simd.h"
#include "kernels/threads.h"

namespace pds::kernels::cpu {

void WriteKv(const float* k, const float* v, int64_t kv_stride, const int32_t* slots,
             int64_t tokens, float* k_cache, float* v_cache, int64_t kv_heads, int64_t block_size,
             int64_t head_dim) {
  const size_t row_bytes = head_dim * sizeof(float);
  for (int64_t t = 0; t < tokens; ++t) {
    const int64_t slot = slots[t];
    if (slot < 0) continue;
    const int64_t block = slot / block_size;
    const int64_t offset = slot % block_size;
    for (int64_t h = 0; h < kv_heads; ++h) {
      const int64_t dst = ((block * kv_heads + h) * block_size + offset) * head_dim;
      std::memcpy(k_cache + dst, k + t * kv_stride + h * head_dim, row_bytes);
      std::memcpy(v_cache + dst, v + t * kv_stride + h * head_dim, row_bytes);
    }
  }
}

namespace {

PDS_ALWAYS_INLINE float Dot(const float* a, const float* b, int64_t n) {
  float s = 0.0f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

PDS_ALWAYS_INLINE void Axpy(float w, const float* x, float* y, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] += w * x[i];
}

// Attention of the `group` query heads that share kv head `kvh`, for one query row at
// position `pos`: each K and V row is read once for the whole group.
// q: group rows of head_dim (stride head_dim); out likewise. scores: [group, pos + 1].
PDS_SIMD_CLONES void AttendRow(const float* q, const float* k_cache, const float* v_cache,
                               const int32_t* table, int64_t pos, int64_t kvh, int64_t kv_heads,
                               int64_t bs, int64_t head_dim, int64_t group, float scale,
                               float* scores, float* out) {
  const int64_t n = pos + 1;
  // Walk the block table block by block: a block's rows of this kv head are contiguous.
  for (int64_t start = 0; start < n; start += bs) {
    const float* kb = k_cache + (table[start / bs] * kv_heads + kvh) * bs * head_dim;
    const int64_t rows = std::min(bs, n - start);
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t g = 0; g < group; ++g) {
        scores[g * n + start + r] = Dot(q + g * head_dim, kb + r * head_dim, head_dim) * scale;
      }
    }
  }
  for (int64_t g = 0; g < group; ++g) {
    float* sg = scores + g * n;
    float max_score = -FLT_MAX;
    for (int64_t p = 0; p < n; ++p) max_score = std::max(max_score, sg[p]);
    float denom = 0.0f;
#pragma omp simd reduction(+ : denom)
    for (int64_t p = 0; p < n; ++p) {
      sg[p] = expf(sg[p] - max_score);
      denom += sg[p];
    }
    const float inv = 1.0f / denom;
    for (int64_t p = 0; p < n; ++p) sg[p] *= inv;
    std::fill(out + g * head_dim, out + (g + 1) * head_dim, 0.0f);
  }
  for (int64_t start = 0; start < n; start += bs) {
    const float* vb = v_cache + (table[start / bs] * kv_heads + kvh) * bs * head_dim;
    const int64_t rows = std::min(bs, n - start);
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t g = 0; g < group; ++g) {
        Axpy(scores[g * n + start + r], vb + r * head_dim, out + g * head_dim, head_dim);
      }
    }
  }
}

}  // namespace

void PagedAttention(const float* q, int64_t q_stride, const float* k_cache, const float* v_cache,
                    const PagedBatch& batch, float* out, int64_t heads, int64_t kv_heads,
                    int64_t head_dim, float scale) {
  const int64_t group = heads / kv_heads;
  const int64_t bs = batch.block_size;
  // Work items: (sequence, kv head, query row); a decode step has one row per sequence.
  std::vector<int64_t> item_start(batch.num_seqs + 1, 0);
  for (int32_t s = 0; s < batch.num_seqs; ++s) {
    item_start[s + 1] = item_start[s] + (batch.cu_q[s + 1] - batch.cu_q[s]) * kv_heads;
  }
  ParallelFor(item_start[batch.num_seqs], [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    std::vector<float> acc(group * head_dim);
    int32_t s = 0;
    for (int64_t item = begin; item < end; ++item) {
      while (item >= item_start[s + 1]) ++s;
      const int64_t local = item - item_start[s];
      const int64_t i = local / kv_heads;  // query row within the sequence
      const int64_t kvh = local % kv_heads;
      const int64_t q_len = batch.cu_q[s + 1] - batch.cu_q[s];
      const int64_t row = batch.cu_q[s] + i;
      const int64_t pos = batch.kv_lens[s] - q_len + i;
      scores.resize(group * (pos + 1));
      AttendRow(q + row * q_stride + kvh * group * head_dim, k_cache, v_cache,
                batch.block_tables + static_cast<int64_t>(s) * batch.max_blocks, pos, kvh, kv_heads,
                bs, head_dim, group, scale, scores.data(), acc.data());
      std::memcpy(out + (row * heads + kvh * group) * head_dim, acc.data(),
                  group * head_dim * sizeof(float));
    }
  });
}

}  // namespace pds::kernels::cpu

#include "kernels/attention.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

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

void PagedAttention(const float* q, int64_t q_stride, const float* k_cache, const float* v_cache,
                    const PagedBatch& batch, float* out, int64_t heads, int64_t kv_heads,
                    int64_t head_dim, float scale) {
  const int64_t group = heads / kv_heads;
  const int64_t bs = batch.block_size;
  const int64_t work = static_cast<int64_t>(batch.num_seqs) * heads;
  ParallelFor(work, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    std::vector<float> acc(head_dim);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t s = item / heads;
      const int64_t h = item % heads;
      const int64_t kvh = h / group;
      const int32_t* table = batch.block_tables + s * batch.max_blocks;
      const int64_t q_begin = batch.cu_q[s];
      const int64_t q_len = batch.cu_q[s + 1] - q_begin;
      const int64_t kv_len = batch.kv_lens[s];
      scores.resize(kv_len);
      for (int64_t i = 0; i < q_len; ++i) {
        const int64_t row = q_begin + i;
        const float* qv = q + row * q_stride + h * head_dim;
        const int64_t n = kv_len - q_len + i + 1;  // positions 0..pos inclusive
        float max_score = -INFINITY;
        for (int64_t p = 0; p < n; ++p) {
          const float* kv = k_cache + ((table[p / bs] * kv_heads + kvh) * bs + p % bs) * head_dim;
          float dot = 0.0f;
          for (int64_t d = 0; d < head_dim; ++d) dot += qv[d] * kv[d];
          scores[p] = dot * scale;
          max_score = std::max(max_score, scores[p]);
        }
        double denom = 0.0;
        for (int64_t p = 0; p < n; ++p) {
          scores[p] = std::exp(scores[p] - max_score);
          denom += scores[p];
        }
        const float inv = static_cast<float>(1.0 / denom);
        std::fill(acc.begin(), acc.end(), 0.0f);
        for (int64_t p = 0; p < n; ++p) {
          const float* vv = v_cache + ((table[p / bs] * kv_heads + kvh) * bs + p % bs) * head_dim;
          const float w = scores[p] * inv;
          for (int64_t d = 0; d < head_dim; ++d) acc[d] += w * vv[d];
        }
        std::memcpy(out + (row * heads + h) * head_dim, acc.data(), head_dim * sizeof(float));
      }
    }
  });
}

}  // namespace pds::kernels::cpu

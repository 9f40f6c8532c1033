// Attention over a paged KV cache, for prefill (many queries per sequence, causal, possibly
// extending a cached prefix) and decode (one query per sequence) alike.
//
// KV cache layout per layer (HND): k_cache, v_cache: [num_blocks, kv_heads, block_size,
// head_dim]. Position p of a sequence lives in block block_table[p / block_size] at slot
// p % block_size.
#pragma once

#include <cstdint>

namespace pds::kernels {

// A ragged batch as seen by attention; all arrays are host (CPU) or device (CUDA) memory.
struct PagedBatch {
  int32_t num_seqs = 0;
  const int32_t* cu_q = nullptr;     // [num_seqs + 1]: query rows of seq s are [cu_q[s], cu_q[s+1])
  const int32_t* kv_lens = nullptr;  // [num_seqs]: context length after this step
  const int32_t* block_tables = nullptr;  // [num_seqs, max_blocks] row-major
  int32_t max_blocks = 0;
  int32_t block_size = 0;
};

namespace cpu {

// Writes new K/V rows into the cache: k, v: [tokens, kv_heads, head_dim] with token stride
// kv_stride; slots[t] = block * block_size + offset (negative: skip).
void WriteKv(const float* k, const float* v, int64_t kv_stride, const int32_t* slots,
             int64_t tokens, float* k_cache, float* v_cache, int64_t kv_heads, int64_t block_size,
             int64_t head_dim);

// out[t, h, :] = softmax(q[t, h] . K[0..pos(t)] * scale) V, with pos(t) the position of the
// query row t: query row i of seq s (i < q_len) is at position kv_len - q_len + i.
// q: [tokens, heads, head_dim] token stride q_stride; out: [tokens, heads, head_dim]
// contiguous. Query head h reads kv head h / (heads / kv_heads).
void PagedAttention(const float* q, int64_t q_stride, const float* k_cache, const float* v_cache,
                    const PagedBatch& batch, float* out, int64_t heads, int64_t kv_heads,
                    int64_t head_dim, float scale);

}  // namespace cpu
}  // namespace pds::kernels

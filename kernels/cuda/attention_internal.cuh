// Shared between the paged attention kernels of kernels/cuda (not a public header).
#pragma once

#include "kernels/cuda/common.cuh"

namespace pds::kernels::cuda {

struct AttentionArgs {
  const void* q = nullptr;
  int64_t q_stride = 0;
  const void* k_cache = nullptr;
  const void* v_cache = nullptr;
  PagedBatch batch;
  AttentionPlan plan;
  void* out = nullptr;
  int64_t heads = 0, kv_heads = 0, head_dim = 0;
  float scale = 1.0f;
  void* workspace = nullptr;
};

// Query heads one decode block serves (they share a KV head): the largest of 8, 4, 2, 1 that
// divides heads / kv_heads.
inline int64_t HeadsPerBlock(int64_t heads, int64_t kv_heads) {
  const int64_t ratio = heads / kv_heads;
  for (int64_t g : {8, 4, 2}) {
    if (ratio % g == 0) return g;
  }
  return 1;
}

// fp32 elements of the decode kernel's split workspace (0 with one split).
int64_t DecodeWorkspaceFloats(int32_t num_seqs, int64_t heads, int64_t head_dim,
                              int32_t num_splits);
// Decode rows (sequences with one query row); others are skipped.
cudaError_t LaunchDecodeAttention(Half16 t, const AttentionArgs& a, cudaStream_t stream);
// Sequences with more than one query row (`all_rows`: every sequence, decode rows too).
cudaError_t LaunchPrefillAttention(Half16 t, const AttentionArgs& a, bool all_rows,
                                   cudaStream_t stream);
// The same with mma.sync and register-resident state, for head dims 64 and 128 (what
// LaunchPrefillAttention uses for them).
cudaError_t LaunchPrefillAttentionMma(Half16 t, const AttentionArgs& a, bool all_rows,
                                      cudaStream_t stream);

}  // namespace pds::kernels::cuda

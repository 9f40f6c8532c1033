// Shared between the paged attention kernels of kernels/cuda (not a public header).
#pragma once

#include "kernels/cuda/common.cuh"

namespace pds::kernels::cuda {

// 16 bytes global -> shared without registers (zero-filled when !valid; `gmem` must still be a
// mapped address), and the commit / wait of such copies (wait: at most N groups in flight).
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
  int32_t* split_counters = nullptr;  // see PagedAttention
  int64_t split_counter_slots = 0;
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

// Whether decode rows of this head dim take the pipelined kernel (64 and 128; the environment
// variable PDS_ATTN_DECODE=legacy selects the register-loading kernel for measurements, and
// PDS_ATTN_DECODE=mma the tensor-core one, which splits the same way). Its splits need no
// shared memory per position, so they are not capped in length.
bool PipelinedDecode(int64_t head_dim);
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

// PagedAttention's plan and dispatch to the decode and prefill kernels.
#include <algorithm>

#include "kernels/cuda/attention_internal.cuh"

namespace pds::kernels::cuda {
bool AttentionHeadDimSupported(int64_t head_dim) {
  return head_dim == 16 || head_dim == 32 || head_dim == 64 || head_dim == 128 || head_dim == 256;
}

size_t PlanAttention(AttentionPlan& plan, int32_t num_seqs, int64_t heads, int64_t kv_heads,
                     int64_t head_dim) {
  plan.split_tokens = 0;
  plan.num_splits = 0;
  if (!plan.has_decode_rows || num_seqs <= 0 || kv_heads <= 0 || plan.max_kv_len <= 0) return 0;
  // Enough blocks to fill the GPU twice over; each split at least 64 positions. Measured on the
  // H100 (llama3-8b, batch 64, context 1024): 155 us per layer with this, 189 us when aiming at 32
  // blocks per SM.
  const int64_t items = int64_t{num_seqs} * (heads / HeadsPerBlock(heads, kv_heads));
  const int64_t max_len = plan.max_kv_len;
  int64_t splits = (2 * int64_t{plan.num_sms} + items - 1) / items;
  splits = std::clamp<int64_t>(splits, 1, (max_len + 63) / 64);
  // The register-loading kernel keeps a split's scores in shared memory: at most 512.
  if (!PipelinedDecode(head_dim)) splits = std::max<int64_t>(splits, (max_len + 511) / 512);
  int64_t split_tokens = (max_len + splits - 1) / splits;
  split_tokens = (split_tokens + 63) / 64 * 64;
  plan.split_tokens = static_cast<int32_t>(split_tokens);
  plan.num_splits = static_cast<int32_t>((max_len + split_tokens - 1) / split_tokens);
  return static_cast<size_t>(DecodeWorkspaceFloats(num_seqs, heads, head_dim, plan.num_splits)) *
         sizeof(float);
}

cudaError_t PagedAttention(Half16 t, const void* q, int64_t q_stride, const void* k_cache,
                           const void* v_cache, const PagedBatch& batch, const AttentionPlan& plan,
                           void* out, int64_t heads, int64_t kv_heads, int64_t head_dim,
                           float scale, void* workspace, cudaStream_t stream,
                           int32_t* split_counters, int64_t split_counter_slots) {
  auto misaligned = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 != 0; };
  if (!AttentionHeadDimSupported(head_dim) || kv_heads <= 0 || heads % kv_heads != 0 ||
      q_stride % 8 != 0 || misaligned(q) || misaligned(out) || misaligned(k_cache) ||
      misaligned(v_cache) || (plan.has_decode_rows && plan.num_splits <= 0)) {
    return cudaErrorInvalidValue;
  }
  if (batch.num_seqs <= 0) return cudaSuccess;
  AttentionArgs a;
  a.q = q;
  a.q_stride = q_stride;
  a.k_cache = k_cache;
  a.v_cache = v_cache;
  a.batch = batch;
  a.plan = plan;
  a.out = out;
  a.heads = heads;
  a.kv_heads = kv_heads;
  a.head_dim = head_dim;
  a.scale = scale;
  a.workspace = workspace;
  a.split_counters = split_counters;
  a.split_counter_slots = split_counters != nullptr ? split_counter_slots : 0;
  if (plan.has_decode_rows) {
    const cudaError_t e = LaunchDecodeAttention(t, a, stream);
    if (e != cudaSuccess) return e;
  }
  if (plan.has_prefill_rows) return LaunchPrefillAttention(t, a, /*all_rows=*/false, stream);
  return cudaSuccess;
}

}  // namespace pds::kernels::cuda

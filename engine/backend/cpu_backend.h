// The CPU backend: fp32 everywhere, ops from kernels/cpu. It is the reference the CUDA
// backend is checked against.
#pragma once

#include "engine/backend/backend.h"

namespace pds::engine {

class CpuBackend : public Backend {
 public:
  // num_threads <= 0: all hardware threads. The CPU thread pool is process-wide (one per
  // worker process), so the last backend created sets it.
  explicit CpuBackend(int num_threads);

  std::string name() const override { return "cpu"; }
  DType compute_dtype() const override { return DType::kF32; }

  absl::StatusOr<DeviceBuffer> Allocate(size_t bytes, absl::string_view what) override;
  absl::StatusOr<DeviceBuffer> Upload(const void* host, DType src_dtype, size_t count,
                                      absl::string_view what) override;
  absl::Status CopyToHost(void* host, const void* device, size_t bytes) override;
  absl::Status CopyFromHost(void* device, const void* host, size_t bytes) override;
  absl::Status CopyDevice(void* dst, const void* src, size_t bytes) override;
  absl::Status Zero(void* device, size_t bytes) override;
  absl::Status FillRandom(void* device, size_t count, float scale, float offset,
                          uint64_t seed) override;
  absl::Status Synchronize() override { return absl::OkStatus(); }

  absl::Status BeginBatch(const BatchMetadata& batch) override;
  absl::Status Embed(const Weight& table, void* out, int64_t hidden) override;
  absl::Status Gemm(const void* a, int64_t lda, const Weight& w, void* c, int64_t m) override;
  absl::Status AddBias(void* x, int64_t stride, const Weight& bias, int64_t rows) override;
  absl::Status RmsNorm(const void* x, const Weight& w, void* out, int64_t rows, float eps) override;
  absl::Status AddRmsNorm(void* residual, const void* delta, const Weight& w, void* out,
                          int64_t rows, float eps) override;
  absl::Status HeadRmsNorm(void* x, int64_t token_stride, const Weight& w, int64_t tokens,
                           int64_t heads, float eps) override;
  absl::Status Rope(void* q, void* k, int64_t token_stride, int64_t q_heads, int64_t kv_heads,
                    int64_t head_dim, const float* inv_freq_host) override;
  absl::Status WriteKv(const void* k, const void* v, int64_t token_stride, void* k_cache,
                       void* v_cache, int64_t kv_heads, int64_t head_dim) override;
  absl::Status Attention(const void* q, int64_t q_stride, const void* k_cache, const void* v_cache,
                         void* out, int64_t heads, int64_t kv_heads, int64_t head_dim,
                         float scale) override;
  absl::Status SiluGate(const void* gate_up, void* out, int64_t tokens, int64_t inter) override;
  absl::Status Add(void* x, const void* y, int64_t n) override;
  absl::Status GatherLastRows(const void* x, void* out, int64_t cols) override;
  absl::Status Logits(const void* x, const Weight& lm_head, int64_t rows,
                      float* host_logits) override;

 private:
  const BatchMetadata* batch_ = nullptr;
  uint64_t batch_generation_ = 0;
  // RoPE cos/sin for the current batch, cached across layers.
  uint64_t rope_generation_ = 0;
  const float* rope_inv_freq_ = nullptr;
  std::vector<float> cos_, sin_;
};

}  // namespace pds::engine

// The CUDA backend: bf16 or fp16 weights, activations and KV cache with fp32 accumulation;
// GEMMs through cuBLAS, the other ops from kernels/cuda. Every launch goes on the backend's
// one stream; errors come back as absl::Status naming the op. CopyToHost and CopyFromHost
// (callable from any thread) use a second stream and are ordered after compute only through
// Synchronize (every forward pass ends synchronized). Decode steps are recorded as CUDA
// graphs per (batch size, block-table width) and replayed (see Backend::BeginGraph). Only compiled
// where CUDA is (PDS_HAVE_CUDA); CreateBackend({.kind = "cuda"}) is the way in.
#pragma once

#include <cuda_runtime_api.h>

#include <memory>
#include <string>
#include <vector>

#include "engine/backend/backend.h"

namespace pds::engine {

class CudaBackend final : public Backend {
 public:
  // Selects `options.device`, creates the stream, the cuBLAS handle and its workspace.
  static absl::StatusOr<std::unique_ptr<CudaBackend>> Create(const BackendOptions& options);
  ~CudaBackend() override;

  std::string name() const override;
  DType compute_dtype() const override { return dtype_; }
  int device() const { return device_; }
  cudaStream_t stream() const { return stream_; }

  absl::StatusOr<DeviceBuffer> Allocate(size_t bytes, absl::string_view what) override;
  absl::StatusOr<DeviceBuffer> Upload(const void* host, DType src_dtype, size_t count,
                                      absl::string_view what) override;
  absl::Status CopyToHost(void* host, const void* device, size_t bytes) override;
  absl::Status CopyFromHost(void* device, const void* host, size_t bytes) override;
  absl::Status CopyDevice(void* dst, const void* src, size_t bytes) override;
  absl::Status Zero(void* device, size_t bytes) override;
  absl::Status FillRandom(void* device, size_t count, float scale, float offset,
                          uint64_t seed) override;
  absl::Status Synchronize() override;
  // An event recorded on the compute stream (not inside a graph recording).
  absl::StatusOr<std::shared_ptr<Mark>> MarkIssued() override;

  absl::Status BeginBatch(const BatchMetadata& batch) override;
  int32_t graph_block_bucket() const override;
  absl::StatusOr<GraphMode> BeginGraph(uint64_t key) override;
  absl::StatusOr<bool> EndGraph() override;
  void AbortGraph() override;
  void DropGraphs() override;
  // Turns graph recording and replay on or off (BackendOptions::cuda_graphs at creation).
  void SetGraphsEnabled(bool enabled);
  size_t num_graphs() const;
  // Op timing for benchmarks: while on, each op (outside graph recording) is bracketed by CUDA
  // events; TakeOpProfile synchronizes and returns the GPU time per op name since the last
  // call, largest first.
  struct OpTime {
    std::string name;
    double ms = 0;
    int64_t calls = 0;
  };
  void SetOpProfiling(bool enabled);
  std::vector<OpTime> TakeOpProfile();

  struct State;  // public for the op timer in the .cc
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
  // One launch with PDS_FUSE_ROPE_KV=1 (kernels::cuda::RopeWriteKv), else the two ops.
  absl::Status RopeWriteKv(void* q, void* k, const void* v, int64_t token_stride, int64_t q_heads,
                           int64_t kv_heads, int64_t head_dim, const float* inv_freq_host,
                           void* k_cache, void* v_cache) override;
  absl::Status Attention(const void* q, int64_t q_stride, const void* k_cache, const void* v_cache,
                         void* out, int64_t heads, int64_t kv_heads, int64_t head_dim,
                         float scale) override;
  absl::Status SiluGate(const void* gate_up, void* out, int64_t tokens, int64_t inter) override;
  absl::Status Add(void* x, const void* y, int64_t n) override;
  absl::Status GatherLastRows(const void* x, void* out, int64_t cols) override;
  absl::Status Logits(const void* x, const Weight& lm_head, int64_t rows,
                      float* host_logits) override;
  absl::Status SampleTokens(const void* x, const Weight& lm_head, int64_t rows,
                            const std::vector<kernels::RowSampling>& sampling,
                            const std::vector<uint8_t>& host_rows, float* host_logits,
                            int32_t* tokens) override;

 private:
  CudaBackend() = default;
  // lm_head projection of `rows` rows into the fp32 device logits buffer.
  absl::Status ProjectLogits(const void* x, const Weight& lm_head, int64_t rows);
  // The batch's RoPE cos/sin tables for these frequencies (computed once per batch).
  absl::Status EnsureRopeTables(int64_t half, const float* inv_freq_host);

  int device_ = 0;
  DType dtype_ = DType::kBF16;
  cudaStream_t stream_ = nullptr;
  std::unique_ptr<State> state_;
};

// Whether a CUDA device is usable in this process (for tests that skip without one).
bool CudaDeviceAvailable();

}  // namespace pds::engine

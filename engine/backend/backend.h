// The compute backend: memory and the ops of the forward pass, on some device. The model
// code calls only this interface; CPU (fp32) and CUDA (bf16/fp16) implement it. Pointers
// passed to ops are backend memory; shapes are documented in kernels/*.h.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "engine/common/dtype.h"
#include "kernels/attention.h"
#include "kernels/random_fill.h"
#include "kernels/sampling.h"

namespace pds::engine {

// Backend memory with an owner-supplied release function. Move-only.
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  DeviceBuffer(void* data, size_t bytes, std::function<void(void*)> release)
      : data_(data), bytes_(bytes), release_(std::move(release)) {}
  DeviceBuffer(DeviceBuffer&& other) noexcept { *this = std::move(other); }
  DeviceBuffer& operator=(DeviceBuffer&& other) noexcept;
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  ~DeviceBuffer() { Reset(); }

  void* data() const { return data_; }
  template <typename T>
  T* as() const {
    return static_cast<T*>(data_);
  }
  size_t bytes() const { return bytes_; }
  void Reset();

 private:
  void* data_ = nullptr;
  size_t bytes_ = 0;
  std::function<void(void*)> release_;
};

// A weight on the backend in its compute dtype; [rows, cols] or [n] (cols = 1 for vectors).
struct Weight {
  DeviceBuffer buffer;
  int64_t rows = 0;
  int64_t cols = 0;
  const void* data() const { return buffer.data(); }
};

// Per-forward metadata of a ragged batch, built on the host by the model. The backend
// copies what it needs to its memory in BeginBatch; later ops may use it.
struct BatchMetadata {
  std::vector<int32_t> token_ids;     // [tokens]
  std::vector<int32_t> positions;     // [tokens]
  std::vector<int32_t> slots;         // [tokens]: cache slot (block * block_size + offset)
  std::vector<int32_t> cu_q;          // [seqs + 1]
  std::vector<int32_t> kv_lens;       // [seqs]
  std::vector<int32_t> block_tables;  // [seqs, max_blocks]
  std::vector<int32_t> last_rows;     // [seqs]: row of each sequence's last new token
  int32_t max_blocks = 0;
  int32_t block_size = 0;
  int32_t num_tokens() const { return static_cast<int32_t>(token_ids.size()); }
  int32_t num_seqs() const { return static_cast<int32_t>(kv_lens.size()); }
};

class Backend {
 public:
  virtual ~Backend() = default;

  virtual std::string name() const = 0;
  // dtype of activations, KV cache and weights on this backend.
  virtual DType compute_dtype() const = 0;

  // Memory.
  virtual absl::StatusOr<DeviceBuffer> Allocate(size_t bytes, absl::string_view what) = 0;
  // Converts host data of `src_dtype` to compute dtype in backend memory.
  virtual absl::StatusOr<DeviceBuffer> Upload(const void* host, DType src_dtype, size_t count,
                                              absl::string_view what) = 0;
  virtual absl::Status CopyToHost(void* host, const void* device, size_t bytes) = 0;
  virtual absl::Status CopyFromHost(void* device, const void* host, size_t bytes) = 0;
  // Sets `bytes` of backend memory to zero.
  virtual absl::Status Zero(void* device, size_t bytes) = 0;
  // Fills `count` compute-dtype elements with offset + scale * u, u uniform in [-1, 1) drawn
  // from a counter-based hash of (seed, index): the same values on every backend (before
  // rounding to the compute dtype). For random-weight benchmarks: never zeros.
  virtual absl::Status FillRandom(void* device, size_t count, float scale, float offset,
                                  uint64_t seed) = 0;
  // Copies within backend memory (used by KV block copies and transfer packing).
  virtual absl::Status CopyDevice(void* dst, const void* src, size_t bytes) = 0;
  virtual absl::Status Synchronize() = 0;

  // A point in the work issued so far, for readers on other threads (the layer-by-layer KV
  // hand-off: "layer l's K/V are written" while the forward goes on). A backend whose ops run
  // before they return (CPU) has reached every mark when it is made.
  class Mark {
   public:
    virtual ~Mark() = default;
    // Whether the work issued before the mark is complete (never blocks); an error when the
    // device failed.
    virtual absl::StatusOr<bool> Reached() = 0;
  };
  // A mark after everything issued so far (on the compute stream). Callable only from the
  // thread that issues the ops; the mark may be polled and destroyed on any thread.
  virtual absl::StatusOr<std::shared_ptr<Mark>> MarkIssued();

  // Batch metadata for the ops below that take indices (Embed, Rope, WriteKv, Attention,
  // GatherLastRows).
  virtual absl::Status BeginBatch(const BatchMetadata& batch) = 0;

  // Graph replay of a forward's ops (CUDA graphs), for decode steps. After BeginBatch, a
  // caller asks BeginGraph(key) with a key that fixes every shape and size of the ops that
  // follow: kReplay means a graph for the key exists and the caller skips the ops; kCapture
  // means the ops that follow are being recorded; kNone means run them as usual. EndGraph
  // (after kCapture or kReplay) finishes the recording and launches the graph, and returns
  // false when a recording could not be used (the caller then runs the ops itself);
  // AbortGraph ends a recording after an error. DropGraphs forgets every graph (the caller's
  // buffers moved). graph_block_bucket() > 0 asks callers to pad a graph batch's block-table width
  // to a multiple of it (so that the key changes rarely); 0: no graphs.
  enum class GraphMode { kNone, kCapture, kReplay };
  virtual int32_t graph_block_bucket() const { return 0; }
  virtual absl::StatusOr<GraphMode> BeginGraph(uint64_t key) { return GraphMode::kNone; }
  virtual absl::StatusOr<bool> EndGraph() { return false; }
  virtual void AbortGraph() {}
  virtual void DropGraphs() {}

  // Ops; `x` arguments are compute-dtype activations, row-major.
  virtual absl::Status Embed(const Weight& table, void* out, int64_t hidden) = 0;
  // c[m, n] = a[m, k] w[n, k]^T; a has row stride lda.
  virtual absl::Status Gemm(const void* a, int64_t lda, const Weight& w, void* c, int64_t m) = 0;
  virtual absl::Status AddBias(void* x, int64_t stride, const Weight& bias, int64_t rows) = 0;
  virtual absl::Status RmsNorm(const void* x, const Weight& w, void* out, int64_t rows,
                               float eps) = 0;
  // residual += delta; out = RmsNorm(residual).
  virtual absl::Status AddRmsNorm(void* residual, const void* delta, const Weight& w, void* out,
                                  int64_t rows, float eps) = 0;
  virtual absl::Status HeadRmsNorm(void* x, int64_t token_stride, const Weight& w, int64_t tokens,
                                   int64_t heads, float eps) = 0;
  // Applies RoPE at the batch positions to q (q_heads) and k (kv_heads), in place.
  virtual absl::Status Rope(void* q, void* k, int64_t token_stride, int64_t q_heads,
                            int64_t kv_heads, int64_t head_dim, const float* inv_freq_host) = 0;
  virtual absl::Status WriteKv(const void* k, const void* v, int64_t token_stride, void* k_cache,
                               void* v_cache, int64_t kv_heads, int64_t head_dim) = 0;
  // Rope on q and k, then WriteKv of the rotated k and of v: what the model does before each
  // layer's attention. The default makes the two calls; a backend may fuse them (same results).
  virtual absl::Status RopeWriteKv(void* q, void* k, const void* v, int64_t token_stride,
                                   int64_t q_heads, int64_t kv_heads, int64_t head_dim,
                                   const float* inv_freq_host, void* k_cache, void* v_cache);
  virtual absl::Status Attention(const void* q, int64_t q_stride, const void* k_cache,
                                 const void* v_cache, void* out, int64_t heads, int64_t kv_heads,
                                 int64_t head_dim, float scale) = 0;
  virtual absl::Status SiluGate(const void* gate_up, void* out, int64_t tokens, int64_t inter) = 0;
  virtual absl::Status Add(void* x, const void* y, int64_t n) = 0;
  // out[s] = x[last_rows[s]] for each sequence.
  virtual absl::Status GatherLastRows(const void* x, void* out, int64_t cols) = 0;
  // Final projection to fp32 host logits [rows, vocab].
  virtual absl::Status Logits(const void* x, const Weight& lm_head, int64_t rows,
                              float* host_logits) = 0;
  // The same projection and each row's token: tokens[r] from row r under sampling[r] (the
  // rule of kernels::cpu::SampleLogits; greedy is argmax), and rows with host_rows[r] set
  // also get their logits in host_logits (at r * vocab; others are left alone). A device
  // backend samples where the logits are and copies only the rows asked for. The default runs
  // Logits and samples on the host.
  virtual absl::Status SampleTokens(const void* x, const Weight& lm_head, int64_t rows,
                                    const std::vector<kernels::RowSampling>& sampling,
                                    const std::vector<uint8_t>& host_rows, float* host_logits,
                                    int32_t* tokens);
};

struct BackendOptions {
  std::string kind = "cpu";    // "cpu" or "cuda"
  int num_threads = 0;         // CPU threads (0: all cores)
  int device = 0;              // CUDA device ordinal
  DType dtype = DType::kBF16;  // CUDA compute dtype: kBF16 or kF16 (the CPU is always fp32)
  bool cuda_graphs = true;     // CUDA: replay decode steps from captured graphs
};

// Creates a backend; "cuda" fails with a clear status where the CUDA backend is not built.
absl::StatusOr<std::unique_ptr<Backend>> CreateBackend(const BackendOptions& options);

}  // namespace pds::engine

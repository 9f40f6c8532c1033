#include "engine/backend/cpu_backend.h"

#include <cstdlib>
#include <cstring>
#include <new>
#include <thread>

#include "absl/strings/str_cat.h"
#include "kernels/attention.h"
#include "kernels/elementwise.h"
#include "kernels/gemm.h"
#include "kernels/norm.h"
#include "kernels/rope.h"
#include "kernels/threads.h"

namespace pds::engine {
namespace cpu = ::pds::kernels::cpu;

namespace {
const float* F(const void* p) { return static_cast<const float*>(p); }
float* F(void* p) { return static_cast<float*>(p); }
}  // namespace

CpuBackend::CpuBackend(int num_threads) {
  if (num_threads <= 0) num_threads = static_cast<int>(std::thread::hardware_concurrency());
  cpu::SetNumThreads(num_threads);
}

absl::StatusOr<DeviceBuffer> CpuBackend::Allocate(size_t bytes, absl::string_view what) {
  const size_t rounded = (std::max<size_t>(bytes, 1) + 63) / 64 * 64;
  void* p = std::aligned_alloc(64, rounded);
  if (p == nullptr) {
    return absl::ResourceExhaustedError(
        absl::StrCat("cpu backend: cannot allocate ", bytes, " bytes for ", what));
  }
  return DeviceBuffer(p, bytes, [](void* q) { std::free(q); });
}

absl::StatusOr<DeviceBuffer> CpuBackend::Upload(const void* host, DType src_dtype, size_t count,
                                                absl::string_view what) {
  auto buffer = Allocate(count * sizeof(float), what);
  if (!buffer.ok()) return buffer.status();
  ConvertToFloat(src_dtype, host, buffer->as<float>(), count);
  return buffer;
}

absl::Status CpuBackend::CopyToHost(void* host, const void* device, size_t bytes) {
  std::memcpy(host, device, bytes);
  return absl::OkStatus();
}

absl::Status CpuBackend::CopyFromHost(void* device, const void* host, size_t bytes) {
  std::memcpy(device, host, bytes);
  return absl::OkStatus();
}

absl::Status CpuBackend::CopyDevice(void* dst, const void* src, size_t bytes) {
  std::memmove(dst, src, bytes);
  return absl::OkStatus();
}

absl::Status CpuBackend::Zero(void* device, size_t bytes) {
  std::memset(device, 0, bytes);
  return absl::OkStatus();
}

absl::Status CpuBackend::FillRandom(void* device, size_t count, float scale, float offset,
                                    uint64_t seed) {
  float* out = F(device);
  for (size_t i = 0; i < count; ++i) out[i] = kernels::RandomFillValue(seed, i, scale, offset);
  return absl::OkStatus();
}

absl::Status CpuBackend::BeginBatch(const BatchMetadata& batch) {
  batch_ = &batch;
  ++batch_generation_;
  return absl::OkStatus();
}

absl::Status CpuBackend::Embed(const Weight& table, void* out, int64_t hidden) {
  cpu::Embed(F(table.data()), batch_->token_ids.data(), F(out), batch_->num_tokens(), hidden);
  return absl::OkStatus();
}

absl::Status CpuBackend::Gemm(const void* a, int64_t lda, const Weight& w, void* c, int64_t m) {
  cpu::Gemm(F(a), lda, F(w.data()), F(c), w.rows, m, w.rows, w.cols);
  return absl::OkStatus();
}

absl::Status CpuBackend::AddBias(void* x, int64_t stride, const Weight& bias, int64_t rows) {
  cpu::AddBias(F(x), stride, F(bias.data()), rows, bias.rows);
  return absl::OkStatus();
}

absl::Status CpuBackend::RmsNorm(const void* x, const Weight& w, void* out, int64_t rows,
                                 float eps) {
  cpu::RmsNorm(F(x), w.rows, F(w.data()), F(out), w.rows, rows, w.rows, eps);
  return absl::OkStatus();
}

absl::Status CpuBackend::AddRmsNorm(void* residual, const void* delta, const Weight& w, void* out,
                                    int64_t rows, float eps) {
  cpu::AddRmsNorm(F(residual), F(delta), F(w.data()), F(out), rows, w.rows, eps);
  return absl::OkStatus();
}

absl::Status CpuBackend::HeadRmsNorm(void* x, int64_t token_stride, const Weight& w, int64_t tokens,
                                     int64_t heads, float eps) {
  cpu::HeadRmsNorm(F(x), token_stride, F(w.data()), tokens, heads, w.rows, eps);
  return absl::OkStatus();
}

absl::Status CpuBackend::Rope(void* q, void* k, int64_t token_stride, int64_t q_heads,
                              int64_t kv_heads, int64_t head_dim, const float* inv_freq_host) {
  const int64_t tokens = batch_->num_tokens();
  const int64_t half = head_dim / 2;
  if (rope_generation_ != batch_generation_ || rope_inv_freq_ != inv_freq_host) {
    cos_.resize(tokens * half);
    sin_.resize(tokens * half);
    cpu::RopeCosSin(batch_->positions.data(), inv_freq_host, cos_.data(), sin_.data(), tokens,
                    half);
    rope_generation_ = batch_generation_;
    rope_inv_freq_ = inv_freq_host;
  }
  cpu::ApplyRope(F(q), token_stride, cos_.data(), sin_.data(), tokens, q_heads, half);
  cpu::ApplyRope(F(k), token_stride, cos_.data(), sin_.data(), tokens, kv_heads, half);
  return absl::OkStatus();
}

absl::Status CpuBackend::WriteKv(const void* k, const void* v, int64_t token_stride, void* k_cache,
                                 void* v_cache, int64_t kv_heads, int64_t head_dim) {
  cpu::WriteKv(F(k), F(v), token_stride, batch_->slots.data(), batch_->num_tokens(), F(k_cache),
               F(v_cache), kv_heads, batch_->block_size, head_dim);
  return absl::OkStatus();
}

absl::Status CpuBackend::Attention(const void* q, int64_t q_stride, const void* k_cache,
                                   const void* v_cache, void* out, int64_t heads, int64_t kv_heads,
                                   int64_t head_dim, float scale) {
  kernels::PagedBatch pb;
  pb.num_seqs = batch_->num_seqs();
  pb.cu_q = batch_->cu_q.data();
  pb.kv_lens = batch_->kv_lens.data();
  pb.block_tables = batch_->block_tables.data();
  pb.max_blocks = batch_->max_blocks;
  pb.block_size = batch_->block_size;
  cpu::PagedAttention(F(q), q_stride, F(k_cache), F(v_cache), pb, F(out), heads, kv_heads, head_dim,
                      scale);
  return absl::OkStatus();
}

absl::Status CpuBackend::SiluGate(const void* gate_up, void* out, int64_t tokens, int64_t inter) {
  cpu::SiluGate(F(gate_up), F(out), tokens, inter);
  return absl::OkStatus();
}

absl::Status CpuBackend::Add(void* x, const void* y, int64_t n) {
  cpu::Add(F(x), F(y), n);
  return absl::OkStatus();
}

absl::Status CpuBackend::GatherLastRows(const void* x, void* out, int64_t cols) {
  cpu::GatherRows(F(x), batch_->last_rows.data(), F(out), batch_->num_seqs(), cols);
  return absl::OkStatus();
}

absl::Status CpuBackend::Logits(const void* x, const Weight& lm_head, int64_t rows,
                                float* host_logits) {
  cpu::Gemm(F(x), lm_head.cols, F(lm_head.data()), host_logits, lm_head.rows, rows, lm_head.rows,
            lm_head.cols);
  return absl::OkStatus();
}

}  // namespace pds::engine

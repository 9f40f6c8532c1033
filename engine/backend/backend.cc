#include "engine/backend/backend.h"

#include "absl/strings/str_cat.h"
#include "engine/backend/cpu_backend.h"
#include "engine/common/status_macros.h"
#include "kernels/sampling.h"
#if PDS_HAVE_CUDA
#include "engine/backend/cuda_backend.h"
#endif

namespace pds::engine {

DeviceBuffer& DeviceBuffer::operator=(DeviceBuffer&& other) noexcept {
  if (this != &other) {
    Reset();
    data_ = other.data_;
    bytes_ = other.bytes_;
    release_ = std::move(other.release_);
    other.data_ = nullptr;
    other.bytes_ = 0;
    other.release_ = nullptr;
  }
  return *this;
}

void DeviceBuffer::Reset() {
  if (data_ != nullptr && release_) release_(data_);
  data_ = nullptr;
  bytes_ = 0;
  release_ = nullptr;
}

namespace {
class ReachedMark final : public Backend::Mark {
 public:
  absl::StatusOr<bool> Reached() override { return true; }
};
}  // namespace

absl::StatusOr<std::shared_ptr<Backend::Mark>> Backend::MarkIssued() {
  static const auto reached = std::make_shared<ReachedMark>();
  return reached;
}

absl::Status Backend::RopeWriteKv(void* q, void* k, const void* v, int64_t token_stride,
                                  int64_t q_heads, int64_t kv_heads, int64_t head_dim,
                                  const float* inv_freq_host, void* k_cache, void* v_cache) {
  PDS_RETURN_IF_ERROR(Rope(q, k, token_stride, q_heads, kv_heads, head_dim, inv_freq_host));
  return WriteKv(k, v, token_stride, k_cache, v_cache, kv_heads, head_dim);
}

absl::Status Backend::SampleTokens(const void* x, const Weight& lm_head, int64_t rows,
                                   const std::vector<kernels::RowSampling>& sampling,
                                   const std::vector<uint8_t>& host_rows, float* host_logits,
                                   int32_t* tokens) {
  PDS_RETURN_IF_ERROR(Logits(x, lm_head, rows, host_logits));
  for (int64_t r = 0; r < rows; ++r) {
    tokens[r] = kernels::cpu::DrawToken(host_logits + r * lm_head.rows, lm_head.rows, sampling[r]);
  }
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<Backend>> CreateBackend(const BackendOptions& options) {
  if (options.kind == "cpu") return std::unique_ptr<Backend>(new CpuBackend(options.num_threads));
  if (options.kind == "cuda") {
#if PDS_HAVE_CUDA
    PDS_ASSIGN_OR_RETURN(std::unique_ptr<CudaBackend> cuda, CudaBackend::Create(options));
    return std::unique_ptr<Backend>(std::move(cuda));
#else
    return absl::UnimplementedError(
        "backend 'cuda' is not available in this build (built without CUDA: no nvcc was found)");
#endif
  }
  return absl::InvalidArgumentError(
      absl::StrCat("unknown backend '", options.kind, "' (expected cpu or cuda)"));
}

}  // namespace pds::engine

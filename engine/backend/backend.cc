#include "engine/backend/backend.h"

#include "absl/strings/str_cat.h"
#include "engine/backend/cpu_backend.h"

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

absl::StatusOr<std::unique_ptr<Backend>> CreateBackend(const BackendOptions& options) {
  if (options.kind == "cpu") return std::unique_ptr<Backend>(new CpuBackend(options.num_threads));
  if (options.kind == "cuda") {
    return absl::UnimplementedError(
        "backend 'cuda' is not available in this build (the CUDA backend is not built yet)");
  }
  return absl::InvalidArgumentError(
      absl::StrCat("unknown backend '", options.kind, "' (expected cpu or cuda)"));
}

}  // namespace pds::engine

// Reader for the safetensors format (memory-mapped, validated) and for HF model
// directories whose weights are one file or shards listed in model.safetensors.index.json.
#pragma once

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "engine/common/dtype.h"

namespace pds::engine {

struct TensorInfo {
  std::string name;
  std::string dtype_name;  // as in the header, e.g. "BF16", "I64"
  size_t element_size = 0;
  std::vector<int64_t> shape;
  uint64_t begin = 0;  // byte offsets relative to the start of the data section
  uint64_t end = 0;
  int64_t numel() const;
};

// Parses and validates a safetensors header: `file` is the whole file's bytes. Checks the
// header length, JSON, dtypes, shapes, that offsets lie inside the file, match the shape's
// byte size and do not overlap. `source` names the file in error messages.
absl::StatusOr<std::vector<TensorInfo>> ParseSafetensorsHeader(const uint8_t* file, size_t size,
                                                               absl::string_view source,
                                                               uint64_t* data_start);

// One memory-mapped .safetensors file.
class SafetensorsFile {
 public:
  static absl::StatusOr<std::unique_ptr<SafetensorsFile>> Open(const std::string& path);
  ~SafetensorsFile();
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  const std::string& path() const { return path_; }
  const std::vector<TensorInfo>& tensors() const { return tensors_; }
  const TensorInfo* Find(absl::string_view name) const;
  const void* Data(const TensorInfo& info) const { return base_ + data_start_ + info.begin; }

 private:
  SafetensorsFile() = default;
  std::string path_;
  const uint8_t* base_ = nullptr;
  size_t size_ = 0;
  uint64_t data_start_ = 0;
  std::vector<TensorInfo> tensors_;
  std::map<std::string, size_t, std::less<>> index_;
};

// A tensor as stored in a file: a view into mapped memory.
struct TensorView {
  const void* data = nullptr;
  DType dtype = DType::kF32;
  std::vector<int64_t> shape;
  const std::string* file = nullptr;  // for error messages
  int64_t numel() const;
};

// All weight files of a model directory, each mapped once.
class WeightFiles {
 public:
  // Opens <dir>/model.safetensors, or the shards named by <dir>/model.safetensors.index.json.
  static absl::StatusOr<WeightFiles> Open(const std::string& dir);

  bool Contains(absl::string_view name) const { return where_.find(name) != where_.end(); }
  // The tensor `name`; NotFound names the tensor, InvalidArgument an unsupported dtype.
  absl::StatusOr<TensorView> Get(absl::string_view name) const;
  // Like Get, and also checks the shape; the error names the file and tensor.
  absl::StatusOr<TensorView> Get(absl::string_view name, const std::vector<int64_t>& shape) const;
  std::vector<std::string> Names() const;
  size_t num_files() const { return files_.size(); }
  const std::string& dir() const { return dir_; }

 private:
  std::string dir_;
  std::vector<std::shared_ptr<SafetensorsFile>> files_;
  std::map<std::string, std::pair<const SafetensorsFile*, const TensorInfo*>, std::less<>> where_;
};

}  // namespace pds::engine

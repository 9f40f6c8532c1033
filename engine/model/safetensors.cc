#include "engine/model/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "engine/common/status_macros.h"
#include "nlohmann/json.hpp"

namespace pds::engine {
namespace {

using nlohmann::json;

constexpr uint64_t kMaxHeaderBytes = 100ull << 20;

size_t ElementSize(absl::string_view dtype) {
  if (dtype == "F64" || dtype == "I64" || dtype == "U64") return 8;
  if (dtype == "F32" || dtype == "I32" || dtype == "U32") return 4;
  if (dtype == "F16" || dtype == "BF16" || dtype == "I16" || dtype == "U16") return 2;
  if (dtype == "I8" || dtype == "U8" || dtype == "BOOL" || dtype == "F8_E4M3" ||
      dtype == "F8_E5M2") {
    return 1;
  }
  return 0;
}

absl::Status Bad(absl::string_view source, absl::string_view what) {
  return absl::InvalidArgumentError(absl::StrCat(source, ": ", what));
}

std::string ShapeString(const std::vector<int64_t>& shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ", "), "]");
}

}  // namespace

int64_t TensorInfo::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

int64_t TensorView::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

absl::StatusOr<std::vector<TensorInfo>> ParseSafetensorsHeader(const uint8_t* file, size_t size,
                                                               absl::string_view source,
                                                               uint64_t* data_start) {
  if (size < 8)
    return Bad(source, "truncated safetensors file (shorter than its 8-byte header length)");
  uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | file[i];
  if (header_len > kMaxHeaderBytes) {
    return Bad(source, absl::StrCat("safetensors header length ", header_len, " is too large"));
  }
  if (header_len > size - 8) {
    return Bad(source, absl::StrCat("truncated safetensors file: header of ", header_len,
                                    " bytes but only ", size - 8, " bytes follow"));
  }
  const uint64_t data_offset = 8 + header_len;
  const uint64_t data_size = size - data_offset;
  json header = json::parse(file + 8, file + data_offset, nullptr, /*allow_exceptions=*/false);
  if (header.is_discarded()) return Bad(source, "safetensors header is not valid JSON");
  if (!header.is_object()) return Bad(source, "safetensors header is not a JSON object");

  std::vector<TensorInfo> tensors;
  for (auto it = header.begin(); it != header.end(); ++it) {
    if (it.key() == "__metadata__") continue;
    const json& entry = it.value();
    const std::string where = absl::StrCat("tensor '", it.key(), "'");
    if (!entry.is_object()) return Bad(source, absl::StrCat(where, ": entry is not an object"));
    TensorInfo info;
    info.name = it.key();
    auto dtype = entry.find("dtype");
    if (dtype == entry.end() || !dtype->is_string()) {
      return Bad(source, absl::StrCat(where, ": missing dtype"));
    }
    info.dtype_name = dtype->get<std::string>();
    info.element_size = ElementSize(info.dtype_name);
    if (info.element_size == 0) {
      return Bad(source, absl::StrCat(where, ": unknown dtype '", info.dtype_name, "'"));
    }
    auto shape = entry.find("shape");
    if (shape == entry.end() || !shape->is_array()) {
      return Bad(source, absl::StrCat(where, ": missing shape"));
    }
    uint64_t numel = 1;
    for (const auto& d : *shape) {
      if (!d.is_number_unsigned()) {
        return Bad(source, absl::StrCat(where, ": shape entries must be non-negative integers"));
      }
      const uint64_t dim = d.get<uint64_t>();
      if (dim > (1ull << 40) || (dim != 0 && numel > (1ull << 50) / dim)) {
        return Bad(source, absl::StrCat(where, ": shape is too large"));
      }
      numel *= dim;
      info.shape.push_back(static_cast<int64_t>(dim));
    }
    auto offsets = entry.find("data_offsets");
    if (offsets == entry.end() || !offsets->is_array() || offsets->size() != 2 ||
        !(*offsets)[0].is_number_unsigned() || !(*offsets)[1].is_number_unsigned()) {
      return Bad(source, absl::StrCat(where, ": data_offsets must be two non-negative integers"));
    }
    info.begin = (*offsets)[0].get<uint64_t>();
    info.end = (*offsets)[1].get<uint64_t>();
    if (info.begin > info.end) {
      return Bad(source, absl::StrCat(where, ": data_offsets begin > end"));
    }
    if (info.end > data_size) {
      return Bad(source, absl::StrCat(where, ": data_offsets [", info.begin, ", ", info.end,
                                      ") point past the end of the file (", data_size,
                                      " data bytes); the file may be truncated"));
    }
    if (info.end - info.begin != numel * info.element_size) {
      return Bad(source,
                 absl::StrCat(where, ": ", info.end - info.begin, " bytes do not match shape ",
                              ShapeString(info.shape), " of ", info.dtype_name));
    }
    tensors.push_back(std::move(info));
  }
  // Empty tensors occupy no bytes: they overlap nothing (HF writes them at any offset).
  std::vector<const TensorInfo*> by_offset;
  for (const auto& t : tensors) {
    if (t.end > t.begin) by_offset.push_back(&t);
  }
  std::sort(by_offset.begin(), by_offset.end(),
            [](const TensorInfo* a, const TensorInfo* b) { return a->begin < b->begin; });
  for (size_t i = 1; i < by_offset.size(); ++i) {
    if (by_offset[i]->begin < by_offset[i - 1]->end) {
      return Bad(source, absl::StrCat("tensors '", by_offset[i - 1]->name, "' and '",
                                      by_offset[i]->name, "' overlap in the file"));
    }
  }
  if (data_start) *data_start = data_offset;
  return tensors;
}

absl::StatusOr<std::unique_ptr<SafetensorsFile>> SafetensorsFile::Open(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    return absl::NotFoundError(absl::StrCat("cannot open ", path, ": ", std::strerror(errno)));
  }
  struct stat st;
  if (::fstat(fd, &st) != 0) {
    ::close(fd);
    return absl::InternalError(absl::StrCat("cannot stat ", path, ": ", std::strerror(errno)));
  }
  std::unique_ptr<SafetensorsFile> file(new SafetensorsFile());
  file->path_ = path;
  file->size_ = static_cast<size_t>(st.st_size);
  if (file->size_ > 0) {
    void* base = ::mmap(nullptr, file->size_, PROT_READ, MAP_PRIVATE, fd, 0);
    if (base == MAP_FAILED) {
      ::close(fd);
      return absl::InternalError(absl::StrCat("cannot mmap ", path, ": ", std::strerror(errno)));
    }
    file->base_ = static_cast<const uint8_t*>(base);
  }
  ::close(fd);
  PDS_ASSIGN_OR_RETURN(file->tensors_,
                       ParseSafetensorsHeader(file->base_, file->size_, path, &file->data_start_));
  for (size_t i = 0; i < file->tensors_.size(); ++i) file->index_[file->tensors_[i].name] = i;
  return file;
}

SafetensorsFile::~SafetensorsFile() {
  if (base_ != nullptr) ::munmap(const_cast<uint8_t*>(base_), size_);
}

const TensorInfo* SafetensorsFile::Find(absl::string_view name) const {
  auto it = index_.find(name);
  return it == index_.end() ? nullptr : &tensors_[it->second];
}

absl::StatusOr<WeightFiles> WeightFiles::Open(const std::string& dir) {
  namespace fs = std::filesystem;
  WeightFiles result;
  result.dir_ = dir;
  const fs::path root(dir);
  const fs::path single = root / "model.safetensors";
  const fs::path index = root / "model.safetensors.index.json";
  std::map<std::string, std::shared_ptr<SafetensorsFile>> by_file;
  auto open_file = [&](const std::string& name) -> absl::StatusOr<SafetensorsFile*> {
    auto it = by_file.find(name);
    if (it != by_file.end()) return it->second.get();
    const fs::path p = root / name;
    if (!fs::exists(p)) {
      return absl::NotFoundError(absl::StrCat("weight file ", p.string(), " is missing"));
    }
    PDS_ASSIGN_OR_RETURN(std::unique_ptr<SafetensorsFile> f, SafetensorsFile::Open(p.string()));
    std::shared_ptr<SafetensorsFile> shared = std::move(f);
    by_file[name] = shared;
    result.files_.push_back(shared);
    return shared.get();
  };
  if (fs::exists(index)) {
    std::ifstream in(index, std::ios::binary);
    std::stringstream ss;
    ss << in.rdbuf();
    json j = json::parse(ss.str(), nullptr, false);
    if (j.is_discarded() || !j.is_object()) return Bad(index.string(), "invalid JSON");
    auto map = j.find("weight_map");
    if (map == j.end() || !map->is_object()) return Bad(index.string(), "missing 'weight_map'");
    for (auto it = map->begin(); it != map->end(); ++it) {
      if (!it.value().is_string()) {
        return Bad(index.string(),
                   absl::StrCat("weight_map entry '", it.key(), "' is not a file name"));
      }
      const std::string file_name = it.value().get<std::string>();
      if (file_name.find('/') != std::string::npos || file_name.find("..") != std::string::npos) {
        return Bad(index.string(), absl::StrCat("weight_map entry '", it.key(),
                                                "' names a file outside the directory"));
      }
      PDS_ASSIGN_OR_RETURN(SafetensorsFile * f, open_file(file_name));
      const TensorInfo* info = f->Find(it.key());
      if (info == nullptr) {
        return absl::NotFoundError(absl::StrCat(index.string(), ": tensor '", it.key(),
                                                "' is listed for ", f->path(),
                                                " but that file does not contain it"));
      }
      result.where_[it.key()] = {f, info};
    }
  } else if (fs::exists(single)) {
    PDS_ASSIGN_OR_RETURN(SafetensorsFile * f, open_file("model.safetensors"));
    for (const auto& info : f->tensors()) result.where_[info.name] = {f, &info};
  } else {
    return absl::NotFoundError(absl::StrCat("model directory '", dir,
                                            "' has no model.safetensors or "
                                            "model.safetensors.index.json"));
  }
  return result;
}

absl::StatusOr<TensorView> WeightFiles::Get(absl::string_view name) const {
  auto it = where_.find(name);
  if (it == where_.end()) {
    return absl::NotFoundError(
        absl::StrCat("model directory '", dir_, "': missing tensor '", name, "'"));
  }
  const auto& [file, info] = it->second;
  auto dtype = ParseDType(info->dtype_name);
  if (!dtype.ok() ||
      (info->dtype_name != "F32" && info->dtype_name != "F16" && info->dtype_name != "BF16")) {
    return Bad(file->path(), absl::StrCat("tensor '", name, "' has dtype ", info->dtype_name,
                                          "; only F32, F16 and BF16 weights are supported"));
  }
  TensorView view;
  view.data = file->Data(*info);
  view.dtype = *dtype;
  view.shape = info->shape;
  view.file = &file->path();
  return view;
}

absl::StatusOr<TensorView> WeightFiles::Get(absl::string_view name,
                                            const std::vector<int64_t>& shape) const {
  PDS_ASSIGN_OR_RETURN(TensorView view, Get(name));
  if (view.shape != shape) {
    return Bad(*view.file, absl::StrCat("tensor '", name, "' has shape ", ShapeString(view.shape),
                                        ", expected ", ShapeString(shape)));
  }
  return view;
}

std::vector<std::string> WeightFiles::Names() const {
  std::vector<std::string> names;
  for (const auto& [name, unused] : where_) names.push_back(name);
  return names;
}

}  // namespace pds::engine

// Named model shapes: small generated models for tests and the CPU demo, and the shapes of
// real models for GPU benchmarks.
#pragma once

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "engine/model/config.h"

namespace pds::engine {

// tiny, small, llama3-8b, llama3.2-1b, qwen2.5-7b. INVALID_ARGUMENT lists the names.
absl::StatusOr<ModelConfig> PresetConfig(absl::string_view name);
std::vector<std::string> PresetNames();

// config.json text for `config` (HF field names).
std::string ConfigJson(const ModelConfig& config);

}  // namespace pds::engine

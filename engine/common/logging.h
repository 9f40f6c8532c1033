// One named spdlog logger per component, created in one place.
#pragma once

#include <memory>

#include "absl/strings/string_view.h"
#include "spdlog/spdlog.h"

namespace pds {

// Returns the logger for `component` ("engine", "model", "kv", "server", ...), creating it
// (stderr, shared format) on first use. Thread-safe.
std::shared_ptr<spdlog::logger> Logger(absl::string_view component);

// Sets the level of every pdserve logger ("trace", "debug", "info", "warn", "error", "off").
void SetLogLevel(absl::string_view level);

}  // namespace pds

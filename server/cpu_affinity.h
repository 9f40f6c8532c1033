// Pinning a process's threads to CPUs (`--cpus LIST` of the worker, profile and generate
// commands; `pdserve up --pin-cpus`).
#pragma once

#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace pds::server {

// "3", "0-3", "0,2,4-5" -> the sorted, distinct CPU numbers; INVALID_ARGUMENT for anything
// else (empty items, reversed or unbounded ranges, numbers of 1024 and above).
absl::StatusOr<std::vector<int>> ParseCpuList(absl::string_view list);

// The CPU numbers as a list ParseCpuList reads ("0-3,6").
std::string FormatCpuList(const std::vector<int>& cpus);

// The CPUs the calling thread may run on (its affinity mask: a taskset, a container's
// cpuset), sorted; all configured CPUs if the mask cannot be read.
std::vector<int> AllowedCpus();

// Restricts the calling thread, and so every thread it creates afterwards, to `list`.
// INVALID_ARGUMENT when the list does not parse or names a CPU this process may not use.
absl::Status PinToCpus(absl::string_view list);

}  // namespace pds::server

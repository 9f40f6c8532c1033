#include "server/cpu_affinity.h"

#include <sched.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"

namespace pds::server {
namespace {

constexpr int kMaxCpu = 1024;

absl::StatusOr<int> ParseCpu(absl::string_view s, absl::string_view list) {
  int cpu = -1;
  if (!absl::SimpleAtoi(s, &cpu) || cpu < 0 || cpu >= kMaxCpu) {
    return absl::InvalidArgumentError(
        absl::StrCat("bad CPU list '", list, "': '", s, "' is not a CPU number below ", kMaxCpu));
  }
  return cpu;
}

}  // namespace

absl::StatusOr<std::vector<int>> ParseCpuList(absl::string_view list) {
  std::vector<int> cpus;
  if (list.empty()) return absl::InvalidArgumentError("empty CPU list");
  for (absl::string_view item : absl::StrSplit(list, ',')) {
    const size_t dash = item.find('-');
    if (dash == absl::string_view::npos) {
      absl::StatusOr<int> cpu = ParseCpu(item, list);
      if (!cpu.ok()) return cpu.status();
      cpus.push_back(*cpu);
      continue;
    }
    absl::StatusOr<int> first = ParseCpu(item.substr(0, dash), list);
    if (!first.ok()) return first.status();
    absl::StatusOr<int> last = ParseCpu(item.substr(dash + 1), list);
    if (!last.ok()) return last.status();
    if (*last < *first) {
      return absl::InvalidArgumentError(
          absl::StrCat("bad CPU list '", list, "': range '", item, "' runs backwards"));
    }
    for (int c = *first; c <= *last; ++c) cpus.push_back(c);
  }
  std::sort(cpus.begin(), cpus.end());
  cpus.erase(std::unique(cpus.begin(), cpus.end()), cpus.end());
  return cpus;
}

std::string FormatCpuList(const std::vector<int>& cpus) {
  std::string out;
  for (size_t i = 0; i < cpus.size();) {
    size_t j = i;
    while (j + 1 < cpus.size() && cpus[j + 1] == cpus[j] + 1) ++j;
    if (!out.empty()) out += ",";
    out += j == i ? absl::StrCat(cpus[i]) : absl::StrCat(cpus[i], "-", cpus[j]);
    i = j + 1;
  }
  return out;
}

std::vector<int> AllowedCpus() {
  std::vector<int> cpus;
  cpu_set_t set;
  CPU_ZERO(&set);
  if (sched_getaffinity(0, sizeof(set), &set) == 0) {
    for (int c = 0; c < CPU_SETSIZE; ++c) {
      if (CPU_ISSET(c, &set)) cpus.push_back(c);
    }
  }
  if (cpus.empty()) {
    const long configured = std::max(1L, sysconf(_SC_NPROCESSORS_CONF));
    for (int c = 0; c < configured && c < CPU_SETSIZE; ++c) cpus.push_back(c);
  }
  return cpus;
}

absl::Status PinToCpus(absl::string_view list) {
  absl::StatusOr<std::vector<int>> cpus = ParseCpuList(list);
  if (!cpus.ok()) return cpus.status();
  // Checked against the machine, not the calling thread's current mask: a thread may widen
  // its own mask (a neighbour thread pinned apart from its creator).
  const long configured = sysconf(_SC_NPROCESSORS_CONF);
  cpu_set_t set;
  CPU_ZERO(&set);
  for (int c : *cpus) {
    if (c >= configured || c >= CPU_SETSIZE) {
      return absl::InvalidArgumentError(
          absl::StrCat("--cpus ", list, ": CPU ", c, " does not exist (", configured, " CPUs)"));
    }
    CPU_SET(c, &set);
  }
  if (sched_setaffinity(0, sizeof(set), &set) != 0) {
    return absl::InvalidArgumentError(absl::StrCat("--cpus ", list, ": ", std::strerror(errno),
                                                   " (none of them is available here?)"));
  }
  // The kernel may grant fewer (a cpuset): every CPU asked for must be in the result.
  cpu_set_t got;
  CPU_ZERO(&got);
  if (sched_getaffinity(0, sizeof(got), &got) != 0) {
    return absl::InternalError(absl::StrCat("sched_getaffinity: ", std::strerror(errno)));
  }
  for (int c : *cpus) {
    if (!CPU_ISSET(c, &got)) {
      return absl::InvalidArgumentError(
          absl::StrCat("--cpus ", list, ": CPU ", c, " is not available to this process"));
    }
  }
  return absl::OkStatus();
}

}  // namespace pds::server

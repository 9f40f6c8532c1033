// --search: the highest request rate whose SLO attainment reaches a target. Pure logic; the
// caller supplies a function that runs (or simulates) one rate and returns its metrics.
//
// Sweep `steps` rates evenly spaced over [min_rate, max_rate] in increasing order, stopping
// at the first rate that misses the target; then bisect `bisect_steps` times between the
// highest passing rate and the lowest failing one. The answer is the highest rate measured to
// pass. When even min_rate fails the search reports found = false (rate 0); when max_rate
// passes it reports max_rate with hit_max = true (the true maximum may be higher).
#pragma once

#include <functional>
#include <vector>

#include "absl/status/statusor.h"
#include "client/bench_metrics.h"

namespace pds::client {

struct SearchOptions {
  double min_rate = 0.5;
  double max_rate = 8;
  int steps = 6;         // sweep points, >= 1
  int bisect_steps = 3;  // bisections after the sweep, >= 0
  double attainment_target = 0.9;
};

struct SearchResult {
  std::vector<SearchPoint> points;  // in the order they were run
  bool found = false;               // some rate met the target
  bool hit_max = false;             // max_rate itself met it
  double best_rate = 0;             // the highest rate that met it (0 when none)
};

using RunAtRate = std::function<absl::StatusOr<BenchMetrics>(double rate)>;

// At most steps + bisect_steps runs. An error from `run` ends the search with that error.
absl::StatusOr<SearchResult> SearchMaxRate(const SearchOptions& options, const RunAtRate& run);

}  // namespace pds::client

#include "client/rate_search.h"

#include <algorithm>
#include <cmath>

#include "absl/strings/str_cat.h"

namespace pds::client {

absl::StatusOr<SearchResult> SearchMaxRate(const SearchOptions& options, const RunAtRate& run) {
  if (!(options.min_rate > 0) || !(options.max_rate >= options.min_rate) ||
      !std::isfinite(options.max_rate)) {
    return absl::InvalidArgumentError(absl::StrCat("search rates need 0 < min <= max, got [",
                                                   options.min_rate, ", ", options.max_rate, "]"));
  }
  if (options.steps < 1 || options.bisect_steps < 0) {
    return absl::InvalidArgumentError("search steps must be >= 1 and bisections >= 0");
  }
  if (options.steps == 1 && options.max_rate > options.min_rate) {
    // One step measures only the lowest rate: it could not show that the highest passes.
    return absl::InvalidArgumentError(
        absl::StrCat("a sweep of [", options.min_rate, ", ", options.max_rate,
                     "] needs at least 2 steps (1 step: give the same min and max rate)"));
  }
  if (!(options.attainment_target > 0 && options.attainment_target <= 1)) {
    return absl::InvalidArgumentError("the attainment target must be in (0, 1]");
  }
  SearchResult result;
  auto measure = [&](double rate) -> absl::StatusOr<bool> {
    auto metrics = run(rate);
    if (!metrics.ok()) return metrics.status();
    result.points.push_back({rate, *metrics});
    bool pass = metrics->slo_attainment >= options.attainment_target;
    if (pass && rate > result.best_rate) {
      result.best_rate = rate;
      result.found = true;
    }
    return pass;
  };
  double pass_rate = 0, fail_rate = -1;
  for (int i = 0; i < options.steps; ++i) {
    double rate = options.steps == 1 ? options.max_rate
                                     : options.min_rate + (options.max_rate - options.min_rate) *
                                                              i / (options.steps - 1);
    auto pass = measure(rate);
    if (!pass.ok()) return pass.status();
    if (!*pass) {
      fail_rate = rate;
      break;
    }
    pass_rate = rate;
  }
  if (fail_rate < 0) {
    result.hit_max = true;
    return result;
  }
  if (pass_rate == 0) return result;  // even the lowest rate misses the target
  for (int i = 0; i < options.bisect_steps; ++i) {
    double mid = (pass_rate + fail_rate) / 2;
    auto pass = measure(mid);
    if (!pass.ok()) return pass.status();
    (*pass ? pass_rate : fail_rate) = mid;
  }
  return result;
}

}  // namespace pds::client

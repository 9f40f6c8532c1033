#include "engine/runtime/speculative.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>

#include "scheduler/latency_model.h"

namespace pds::engine {

namespace {

// Candidate ends `ends` (positions whose token is the last one, latest first) to the drafts.
template <typename Ends>
std::vector<int32_t> DraftsFrom(std::span<const int32_t> tokens, int32_t ngram_min,
                                int32_t ngram_max, int32_t k, Ends&& ends) {
  std::vector<int32_t> drafts;
  const int64_t n = static_cast<int64_t>(tokens.size());
  ngram_min = std::max(ngram_min, 1);
  if (k <= 0 || ngram_max < ngram_min || n < ngram_min + 1) return drafts;
  int64_t best_len = 0;
  int64_t best_end = -1;  // where the best occurrence's last token is
  // From the latest candidate back: a longer match replaces the best one, so the latest of the
  // longest wins, and a full-length match ends the search.
  ends([&](int64_t end) {
    int64_t len = 1;
    while (len < ngram_max && end - len >= 0 && tokens[end - len] == tokens[n - 1 - len]) ++len;
    if (len > best_len) {
      best_len = len;
      best_end = end;
    }
    return len < ngram_max;  // go on
  });
  if (best_len < ngram_min) return drafts;
  drafts.reserve(static_cast<size_t>(k));
  for (int64_t i = best_end + 1; static_cast<int32_t>(drafts.size()) < k; ++i) {
    drafts.push_back(i < n ? tokens[i] : drafts[static_cast<size_t>(i - n)]);
  }
  return drafts;
}

}  // namespace

std::vector<int32_t> ProposeNgramDrafts(std::span<const int32_t> tokens, int32_t ngram_min,
                                        int32_t ngram_max, int32_t k) {
  return DraftsFrom(tokens, ngram_min, ngram_max, k, [&](auto&& visit) {
    const int64_t n = static_cast<int64_t>(tokens.size());
    for (int64_t end = n - 2; end >= 0; --end) {
      if (tokens[end] == tokens[n - 1] && !visit(end)) return;
    }
  });
}

void NgramIndex::Extend(std::span<const int32_t> tokens) {
  for (; indexed_ < tokens.size(); ++indexed_) {
    positions_[tokens[indexed_]].push_back(static_cast<int32_t>(indexed_));
  }
}

std::vector<int32_t> NgramIndex::Propose(std::span<const int32_t> tokens, int32_t ngram_min,
                                         int32_t ngram_max, int32_t k) const {
  return DraftsFrom(tokens, ngram_min, ngram_max, k, [&](auto&& visit) {
    const int64_t n = static_cast<int64_t>(tokens.size());
    if (n == 0) return;
    auto it = positions_.find(tokens[n - 1]);
    if (it == positions_.end()) return;
    const std::vector<int32_t>& at = it->second;
    for (auto p = at.rbegin(); p != at.rend(); ++p) {
      if (*p <= n - 2 && !visit(*p)) return;
    }
  });
}

StepCostFn FreeRows() {
  return [](const StepShape&) { return 1.0; };
}

namespace {

StepShape Plus(StepShape a, const StepShape& b) {
  a.rows += b.rows;
  a.kv += b.kv;
  a.drafts = a.drafts || b.drafts;
  return a;
}

}  // namespace

std::vector<int32_t> ChooseDrafts(const StepCostFn& cost, const StepShape& decodes, double tokens,
                                  std::span<const DraftCandidate> candidates,
                                  const DraftLimits& limits) {
  std::vector<int32_t> chosen(candidates.size(), 0);
  constexpr double kTiny = 1e-12;  // a model may call a step or a row free
  const StepCostFn& price = limits.cap_cost ? limits.cap_cost : cost;
  const auto capped = [&](const StepShape& s) {
    return limits.max_seconds > 0 && price(Plus(s, limits.others)) > limits.max_seconds;
  };
  const double base_seconds = std::max(cost(decodes), kTiny);
  struct Option {
    double keep;  // the chance that the draft is kept (all before it kept too)
    size_t who;
    int32_t j;  // 1-based
  };
  std::vector<Option> options;
  for (size_t i = 0; i < candidates.size(); ++i) {
    const double a = std::clamp(candidates[i].accept, 0.0, 1.0);
    double keep = 1;
    for (int32_t j = 1; j <= candidates[i].drafts; ++j) {
      keep *= a;
      if (keep < kMinDraftKeepChance) break;
      options.push_back({keep, i, j});
    }
  }
  // A draft's row costs what any other's does (one row, its own position read): the likeliest
  // go first (a candidate's drafts stay in order, their chances falling with j or tying, the
  // sort being stable).
  std::stable_sort(options.begin(), options.end(),
                   [](const Option& x, const Option& y) { return x.keep > y.keep; });
  StepShape shape = decodes;
  double sum = tokens;
  double best_tokens = tokens, best_seconds = base_seconds;
  size_t best = 0;
  const size_t most = std::min(options.size(), static_cast<size_t>(std::max(limits.rows, 0)));
  for (size_t n = 0; n < most; ++n) {
    shape.rows += 1;
    shape.kv += 1;
    shape.drafts = true;
    sum += options[n].keep;
    if (capped(shape)) break;
    const double seconds = std::max(cost(shape), kTiny);
    if (sum * best_seconds > best_tokens * seconds) {  // more tokens per second
      best_tokens = sum;
      best_seconds = seconds;
      best = n + 1;
    }
  }
  for (size_t n = 0; n < best; ++n) {
    chosen[options[n].who] = std::max(chosen[options[n].who], options[n].j);
  }
  return chosen;
}

void DraftAcceptance::Update(int32_t drafted, int32_t kept) {
  kept_ = kept_ * kFade + kept;
  rejected_ = rejected_ * kFade + (kept < drafted ? 1 : 0);
}

namespace {

// Feature k of a step (0: drafts, 1: rows, 2: kv).
double Feature(const StepShape& s, int k) {
  return k == 0 ? (s.drafts ? 1.0 : 0.0) : k == 1 ? s.rows : static_cast<double>(s.kv);
}

}  // namespace

void StepTimeModel::Observe(const StepShape& shape, double seconds) {
  if (!(seconds > 0) || shape.rows <= 0) return;
  std::deque<Sample>& kind = shape.drafts ? drafted_ : plain_;
  kind.emplace_back(shape, seconds);
  if (kind.size() > (shape.drafts ? kDrafted : kPlain)) kind.pop_front();
  (shape.drafts ? last_drafted_ : last_plain_) = steps_++;
  if (++since_fit_ >= kRefitEvery) {
    since_fit_ = 0;
    Fit();
  }
}

std::optional<bool> StepTimeModel::Lacks() const {
  const auto lacking = [&](const std::deque<Sample>& kind, int64_t last) {
    return static_cast<int32_t>(kind.size()) < kMinSide || steps_ - last >= kStale;
  };
  if (lacking(drafted_, last_drafted_)) return true;
  if (lacking(plain_, last_plain_)) return false;
  return std::nullopt;
}

void StepTimeModel::Fit() {
  std::vector<Sample> all(plain_.begin(), plain_.end());
  all.insert(all.end(), drafted_.begin(), drafted_.end());
  if (!Solve(all) || !row_cost_known_) return;
  // Once more without the samples the fit misses by far more than it misses most by.
  std::vector<double> misses;
  for (const auto& [shape, seconds] : all) {
    misses.push_back(std::abs(*Predict(shape) - seconds) / seconds);
  }
  std::vector<double> sorted = misses;
  std::nth_element(sorted.begin(), sorted.begin() + sorted.size() / 2, sorted.end());
  const double limit = std::max(5 * sorted[sorted.size() / 2], 0.05);
  std::vector<Sample> kept;
  for (size_t i = 0; i < all.size(); ++i) {
    if (misses[i] <= limit) kept.push_back(all[i]);
  }
  if (kept.size() < all.size() && kept.size() >= all.size() / 2) Solve(kept);
}

bool StepTimeModel::Solve(const std::vector<Sample>& samples) {
  // The features the samples determine: at least kMinSide of them off the median value.
  std::vector<int> free;
  for (int k = 0; k < 3; ++k) {
    std::vector<double> values;
    for (const auto& [shape, seconds] : samples) values.push_back(Feature(shape, k));
    std::nth_element(values.begin(), values.begin() + values.size() / 2, values.end());
    const double median = values[values.size() / 2];
    const auto off = std::count_if(samples.begin(), samples.end(),
                                   [&](const Sample& s) { return Feature(s.first, k) != median; });
    if (off >= kMinSide) free.push_back(k);
  }
  // Weights for relative error, scaled to a mean of one (the solver's singularity test is
  // absolute).
  std::vector<double> w;
  for (const auto& [shape, seconds] : samples) w.push_back(1.0 / (seconds * seconds));
  const double mean = std::accumulate(w.begin(), w.end(), 0.0) / static_cast<double>(w.size());
  for (double& x : w) x /= mean;
  bool intercept = true;
  while (true) {
    std::vector<std::vector<double>> x;
    std::vector<double> y;
    for (const auto& [shape, seconds] : samples) {
      std::vector<double> row;
      if (intercept) row.push_back(1.0);
      double fixed = 0;
      for (int k = 0; k < 3; ++k) {
        if (std::find(free.begin(), free.end(), k) != free.end()) {
          row.push_back(Feature(shape, k));
        } else {
          fixed += coef_[k + 1] * Feature(shape, k);
        }
      }
      x.push_back(std::move(row));
      y.push_back(seconds - fixed);
    }
    if (x[0].empty()) return false;
    auto beta = scheduler::LeastSquares(x, y, w);
    if (!beta.ok()) {
      // Two features move together here (rows = 1 + [drafts] with one draft at a time, say):
      // drafts go first (rows then carry their cost), then kv.
      if (free.empty()) return false;
      auto drop = std::find(free.begin(), free.end(), 0);                     // drafts
      if (drop == free.end()) drop = std::find(free.begin(), free.end(), 2);  // kv
      if (drop == free.end()) drop = free.begin();
      free.erase(drop);
      continue;
    }
    const size_t first = intercept ? 1 : 0;  // of the features' coefficients in beta
    if (intercept && (*beta)[0] < 0) {       // no step costs less than nothing: a = 0, and again
      intercept = false;
      continue;
    }
    size_t negative = free.size();
    for (size_t f = 0; f < free.size(); ++f) {
      if ((*beta)[first + f] < 0) negative = f;
    }
    if (negative < free.size()) {  // noise, or nearly collinear with another: zero, and again
      coef_[free[negative] + 1] = 0;
      if (free[negative] == 1) row_cost_known_ = true;
      free.erase(free.begin() + static_cast<std::ptrdiff_t>(negative));
      continue;
    }
    coef_[0] = intercept ? (*beta)[0] : 0.0;
    for (size_t f = 0; f < free.size(); ++f) {
      coef_[free[f] + 1] = (*beta)[first + f];
      if (free[f] == 1) row_cost_known_ = true;
    }
    return true;
  }
}

std::optional<double> StepTimeModel::Predict(const StepShape& shape) const {
  if (!row_cost_known_) return std::nullopt;
  return coef_[0] + coef_[1] * Feature(shape, 0) + coef_[2] * Feature(shape, 1) +
         coef_[3] * Feature(shape, 2);
}

}  // namespace pds::engine

#include "engine/runtime/speculative.h"

#include <algorithm>
#include <cmath>
#include <limits>

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

std::vector<int32_t> ChooseDrafts(const StepCostFn& cost, const StepShape& base, double base_tokens,
                                  std::span<const DraftCandidate> candidates, double max_seconds) {
  std::vector<int32_t> chosen(candidates.size(), 0);
  constexpr double kTiny = 1e-12;  // a model may call a step or a row free
  const double base_seconds = std::max(cost(base), kTiny);
  if (max_seconds > 0 && base_seconds > max_seconds) return chosen;
  struct Option {
    double keep;   // the chance that the draft is kept (all before it kept too)
    double worth;  // keep per second its row adds
    size_t who;
    int32_t j;  // 1-based
  };
  // A row's own time: what it adds to a step that already has drafts (the drafting overhead
  // is the whole set's, weighed below).
  StepShape drafted = base;
  drafted.drafts = true;
  const double drafted_seconds = cost(drafted);
  std::vector<Option> options;
  for (size_t i = 0; i < candidates.size(); ++i) {
    const double a = std::clamp(candidates[i].accept, 0.0, 1.0);
    double keep = 1;
    double worth = std::numeric_limits<double>::infinity();
    for (int32_t j = 1; j <= candidates[i].drafts; ++j) {
      keep *= a;
      if (keep < kMinDraftKeepChance) break;
      StepShape one = drafted;
      one.rows += 1;
      one.attended += candidates[i].position + j;  // the row at position + j - 1
      worth = std::min(worth, keep / std::max(cost(one) - drafted_seconds, kTiny));
      options.push_back({keep, worth, i, j});
    }
  }
  // Most worth first (the fractional knapsack's order); a candidate's drafts stay in order
  // (their worth is made non-increasing in j, and the sort is stable).
  std::stable_sort(options.begin(), options.end(),
                   [](const Option& x, const Option& y) { return x.worth > y.worth; });
  StepShape shape = base;
  double tokens = base_tokens;
  double best_tokens = base_tokens, best_seconds = base_seconds;
  size_t best = 0;
  for (size_t n = 0; n < options.size(); ++n) {
    const Option& o = options[n];
    shape.rows += 1;
    shape.attended += candidates[o.who].position + o.j;
    shape.drafts = true;
    tokens += o.keep;
    const double seconds = std::max(cost(shape), kTiny);
    if (max_seconds > 0 && seconds > max_seconds) break;
    if (tokens * best_seconds > best_tokens * seconds) {  // more tokens per second
      best_tokens = tokens;
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

void StepTimeModel::Observe(const StepShape& shape, double seconds) {
  if (!(seconds > 0) || shape.rows <= 0) return;
  samples_.emplace_back(shape, seconds);
  if (samples_.size() > kWindow) samples_.pop_front();
  if (++since_fit_ >= kRefitEvery) {
    since_fit_ = 0;
    Fit();
  }
}

void StepTimeModel::Fit() {
  // Feature k + 1 of a sample (k: 0 drafts, 1 rows, 2 attended; 0 is the intercept).
  auto feature = [](const StepShape& s, int k) {
    return k == 0 ? (s.drafts ? 1.0 : 0.0) : k == 1 ? s.rows : static_cast<double>(s.attended);
  };
  // The features the window determines: those that vary in it. The others keep their fitted
  // value (0 if never fitted), taken off the times first.
  std::vector<int> free;
  for (int k = 0; k < 3; ++k) {
    double lo = feature(samples_.front().first, k), hi = lo;
    for (const auto& [shape, seconds] : samples_) {
      lo = std::min(lo, feature(shape, k));
      hi = std::max(hi, feature(shape, k));
    }
    if (hi > lo) free.push_back(k);
  }
  // Least squares on relative error; a feature fitted below zero (noise, or collinear with
  // another) is fixed at zero and the rest fitted again.
  while (true) {
    std::vector<std::vector<double>> x;
    std::vector<double> y, w;
    for (const auto& [shape, seconds] : samples_) {
      std::vector<double> row{1.0};
      double fixed = 0;
      for (int k = 0; k < 3; ++k) {
        if (std::find(free.begin(), free.end(), k) != free.end()) {
          row.push_back(feature(shape, k));
        } else {
          fixed += coef_[k + 1] * feature(shape, k);
        }
      }
      x.push_back(std::move(row));
      y.push_back(seconds - fixed);
      w.push_back(1.0 / (seconds * seconds));
    }
    auto beta = scheduler::LeastSquares(x, y, w);
    if (!beta.ok()) {
      if (free.empty()) return;
      free.pop_back();  // attended (then rows) may be a multiple of another feature here
      continue;
    }
    size_t negative = free.size();
    for (size_t f = 0; f < free.size(); ++f) {
      if ((*beta)[f + 1] < 0) negative = f;
    }
    if (negative < free.size()) {
      coef_[free[negative] + 1] = 0;
      if (free[negative] == 1) row_cost_known_ = true;  // rows varied: they cost nothing here
      free.erase(free.begin() + static_cast<std::ptrdiff_t>(negative));
      continue;
    }
    coef_[0] = (*beta)[0];
    for (size_t f = 0; f < free.size(); ++f) {
      coef_[free[f] + 1] = (*beta)[f + 1];
      if (free[f] == 1) row_cost_known_ = true;
    }
    return;
  }
}

std::optional<double> StepTimeModel::Predict(const StepShape& shape) const {
  if (!row_cost_known_) return std::nullopt;
  return coef_[0] + coef_[1] * (shape.drafts ? 1.0 : 0.0) + coef_[2] * shape.rows +
         coef_[3] * static_cast<double>(shape.attended);
}

}  // namespace pds::engine

#include "kernels/sampling.h"

#include <algorithm>
#include <cmath>

namespace pds::kernels::cpu {
namespace {
// log softmax over the non-NaN logits (the samplers never pick a NaN). An infinite top logit
// has no softmax: +inf logits share all the mass, and a row of -inf leaves -inf for all.
class LogSoftmax {
 public:
  LogSoftmax(const float* logits, int64_t n) {
    float max_logit = -INFINITY;
    for (int64_t i = 0; i < n; ++i) {
      if (logits[i] > max_logit) max_logit = logits[i];
      positive_inf_ += logits[i] == INFINITY;
    }
    if (std::isinf(max_logit)) {
      lse_ = max_logit;
      return;
    }
    double sum = 0.0;
    for (int64_t i = 0; i < n; ++i) {
      if (!std::isnan(logits[i])) sum += std::exp(static_cast<double>(logits[i]) - max_logit);
    }
    lse_ = max_logit + std::log(sum);
  }
  double Of(float logit) const {
    if (positive_inf_ > 0) {
      return logit == INFINITY ? -std::log(static_cast<double>(positive_inf_)) : -INFINITY;
    }
    if (std::isinf(lse_)) return -INFINITY;
    return logit - lse_;
  }

 private:
  double lse_ = 0;
  int64_t positive_inf_ = 0;
};
}  // namespace

int32_t Argmax(const float* logits, int64_t n) {
  int32_t best = 0;
  float best_value = -INFINITY;
  bool found = false;
  for (int64_t i = 0; i < n; ++i) {
    if (std::isnan(logits[i])) continue;
    if (!found || logits[i] > best_value) {
      best = static_cast<int32_t>(i);
      best_value = logits[i];
      found = true;
    }
  }
  return best;
}

int32_t SampleLogits(const float* logits, int64_t n, float temperature, int32_t top_k, float top_p,
                     double u, std::vector<std::pair<float, int32_t>>& scratch) {
  scratch.clear();
  for (int64_t i = 0; i < n; ++i) {
    if (!std::isnan(logits[i])) scratch.emplace_back(logits[i], static_cast<int32_t>(i));
  }
  if (scratch.empty()) return 0;
  auto greater = [](const std::pair<float, int32_t>& a, const std::pair<float, int32_t>& b) {
    return a.first != b.first ? a.first > b.first : a.second < b.second;
  };
  size_t keep = scratch.size();
  if (top_k > 0 && static_cast<size_t>(top_k) < keep) {
    keep = static_cast<size_t>(top_k);
    std::partial_sort(scratch.begin(), scratch.begin() + keep, scratch.end(), greater);
    scratch.resize(keep);
  } else {
    std::sort(scratch.begin(), scratch.end(), greater);
  }
  // An infinite top logit has no softmax: +inf takes all the mass, and a row of -inf has none
  // anywhere. Either way the first candidate in the order (the lowest index among the top).
  if (std::isinf(scratch[0].first)) return scratch[0].second;
  // Softmax over the kept candidates, highest first.
  const double max_logit = scratch[0].first;
  std::vector<double> probs(keep);
  double total = 0.0;
  for (size_t i = 0; i < keep; ++i) {
    probs[i] = std::exp((scratch[i].first - max_logit) / temperature);
    total += probs[i];
  }
  if (top_p < 1.0f) {
    double cumulative = 0.0;
    size_t cut = keep;
    for (size_t i = 0; i < keep; ++i) {
      cumulative += probs[i] / total;
      if (cumulative >= top_p) {
        cut = i + 1;
        break;
      }
    }
    keep = cut;
    total = 0.0;
    for (size_t i = 0; i < keep; ++i) total += probs[i];
  }
  double target = u * total;
  for (size_t i = 0; i < keep; ++i) {
    target -= probs[i];
    if (target < 0.0) return scratch[i].second;
  }
  return scratch[keep - 1].second;
}

float LogProb(const float* logits, int64_t n, int32_t id) {
  return static_cast<float>(LogSoftmax(logits, n).Of(logits[id]));
}

std::vector<std::pair<int32_t, float>> TopLogProbs(const float* logits, int64_t n, int32_t k) {
  const LogSoftmax log_softmax(logits, n);
  std::vector<std::pair<float, int32_t>> all;
  all.reserve(n);
  for (int64_t i = 0; i < n; ++i) {
    if (!std::isnan(logits[i])) all.emplace_back(logits[i], static_cast<int32_t>(i));
  }
  const size_t keep = std::min<size_t>(std::max(k, 0), all.size());
  std::partial_sort(all.begin(), all.begin() + keep, all.end(), [](const auto& a, const auto& b) {
    return a.first != b.first ? a.first > b.first : a.second < b.second;
  });
  std::vector<std::pair<int32_t, float>> result;
  for (size_t i = 0; i < keep; ++i) {
    result.emplace_back(all[i].second, static_cast<float>(log_softmax.Of(all[i].first)));
  }
  return result;
}

}  // namespace pds::kernels::cpu

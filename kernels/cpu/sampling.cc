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
    // Each term in float (its error a few parts in 1e7, far below what a logprob shows), the
    // sum in double.
    double sum = 0.0;
    for (int64_t i = 0; i < n; ++i) {
      if (!std::isnan(logits[i])) sum += std::exp(logits[i] - max_logit);
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

namespace {

// A candidate token: its logit, id and softmax mass exp((logit - max) / T).
struct Candidate {
  float value;
  int32_t id;
  double mass;
};
// The rule's order: larger logit first, then lower id.
bool Before(const Candidate& a, const Candidate& b) {
  return a.value != b.value ? a.value > b.value : a.id < b.id;
}

// Rearranges c[begin, end) so that c[begin, pos) are the candidates before the cut in the
// rule's order (in no order themselves) and c[pos] is the cut: the first candidate at which
// the mass so far reaches `need` (strict: exceeds it). The last candidate when none does.
// Expected linear time (quickselect on the order, carrying the masses).
size_t Cut(std::vector<Candidate>& c, size_t begin, size_t end, double need, bool strict) {
  auto reached = [strict](double mass, double need) { return strict ? mass > need : mass >= need; };
  while (end - begin > 16) {
    // Median of three by the order as the pivot, moved to the end.
    const size_t mid = begin + (end - begin) / 2;
    if (Before(c[mid], c[begin])) std::swap(c[mid], c[begin]);
    if (Before(c[end - 1], c[begin])) std::swap(c[end - 1], c[begin]);
    if (Before(c[end - 1], c[mid])) std::swap(c[end - 1], c[mid]);
    std::swap(c[mid], c[end - 1]);
    const Candidate pivot = c[end - 1];
    size_t store = begin;
    double ahead = 0.0;  // the mass of those before the pivot
    for (size_t i = begin; i + 1 < end; ++i) {
      if (Before(c[i], pivot)) {
        ahead += c[i].mass;
        std::swap(c[i], c[store++]);
      }
    }
    std::swap(c[store], c[end - 1]);  // the pivot, after those before it
    if (reached(ahead, need)) {
      end = store;  // the cut is before the pivot
    } else if (reached(ahead + pivot.mass, need) || store + 1 == end) {
      return store;
    } else {
      need -= ahead + pivot.mass;
      begin = store + 1;
    }
  }
  std::sort(c.begin() + begin, c.begin() + end, Before);
  double mass = 0.0;
  for (size_t i = begin; i < end; ++i) {
    mass += c[i].mass;
    if (reached(mass, need)) return i;
  }
  return end - 1;
}

}  // namespace

int32_t DrawToken(const float* logits, int64_t n, const RowSampling& rule) {
  return rule.greedy() ? Argmax(logits, n)
                       : SampleLogits(logits, n, rule.temperature, rule.top_k, rule.top_p, rule.u);
}

int32_t SampleLogits(const float* logits, int64_t n, float temperature, int32_t top_k, float top_p,
                     double u) {
  // The rule: the candidates in order (larger logit, then lower id), the first top_k of them
  // (top_k <= 0: all), then the shortest prefix whose softmax mass reaches top_p, then the
  // first whose running mass exceeds u times theirs. Computed by selection, not a sort: a
  // candidate with no mass (exp of its distance to the top, over T, below 1e-30 of the top's)
  // can never be drawn and is left out.
  float max_logit = -INFINITY;
  int32_t first_max = -1;
  int64_t valid = 0;
  for (int64_t i = 0; i < n; ++i) {
    const float v = logits[i];
    if (std::isnan(v)) continue;
    ++valid;
    if (first_max < 0 || v > max_logit) {
      max_logit = v;
      first_max = static_cast<int32_t>(i);
    }
  }
  if (valid == 0) return 0;
  // An infinite top logit has no softmax: +inf takes all the mass, and a row of -inf has none
  // anywhere. Either way the first candidate in the order (the lowest index among the top).
  if (std::isinf(max_logit)) return first_max;
  thread_local std::vector<Candidate> c;
  c.clear();
  const double floor = max_logit + temperature * -69.0;  // exp(-69) < 1e-30
  for (int64_t i = 0; i < n; ++i) {
    const float v = logits[i];
    if (!(v >= floor)) continue;  // NaN, -inf, or no mass
    c.push_back(
        {v, static_cast<int32_t>(i), std::exp((static_cast<double>(v) - max_logit) / temperature)});
  }
  size_t keep = c.size();
  if (top_k > 0 && static_cast<int64_t>(top_k) < valid && static_cast<size_t>(top_k) < keep) {
    std::nth_element(c.begin(), c.begin() + top_k - 1, c.end(), Before);
    keep = static_cast<size_t>(top_k);
  }
  double total = 0.0;
  for (size_t i = 0; i < keep; ++i) total += c[i].mass;
  if (top_p < 1.0f) {
    keep = Cut(c, 0, keep, static_cast<double>(top_p) * total, /*strict=*/false) + 1;
    total = 0.0;
    for (size_t i = 0; i < keep; ++i) total += c[i].mass;
  }
  return c[Cut(c, 0, keep, u * total, /*strict=*/true)].id;
}

float LogProb(const float* logits, int64_t n, int32_t id) {
  return static_cast<float>(LogSoftmax(logits, n).Of(logits[id]));
}

namespace {

// The k largest logits (ties: the lower id first), NaN left out, as logprobs: one pass with a
// heap of k entries.
std::vector<std::pair<int32_t, float>> Top(const LogSoftmax& log_softmax, const float* logits,
                                           int64_t n, int32_t k) {
  std::vector<std::pair<int32_t, float>> result;
  if (k <= 0) return result;
  const auto better = [](const std::pair<float, int32_t>& a, const std::pair<float, int32_t>& b) {
    return a.first != b.first ? a.first > b.first : a.second < b.second;
  };
  std::vector<std::pair<float, int32_t>> heap;  // the worst kept on top
  heap.reserve(static_cast<size_t>(k));
  for (int64_t i = 0; i < n; ++i) {
    if (std::isnan(logits[i])) continue;
    const std::pair<float, int32_t> e{logits[i], static_cast<int32_t>(i)};
    if (heap.size() < static_cast<size_t>(k)) {
      heap.push_back(e);
      std::push_heap(heap.begin(), heap.end(), better);
    } else if (better(e, heap.front())) {
      std::pop_heap(heap.begin(), heap.end(), better);
      heap.back() = e;
      std::push_heap(heap.begin(), heap.end(), better);
    }
  }
  std::sort(heap.begin(), heap.end(), better);
  for (const auto& [logit, id] : heap) {
    result.emplace_back(id, static_cast<float>(log_softmax.Of(logit)));
  }
  return result;
}

}  // namespace

std::vector<std::pair<int32_t, float>> TopLogProbs(const float* logits, int64_t n, int32_t k) {
  return Top(LogSoftmax(logits, n), logits, n, k);
}

float LogProbAndTop(const float* logits, int64_t n, int32_t id, int32_t k,
                    std::vector<std::pair<int32_t, float>>& top, int32_t* rank) {
  const LogSoftmax log_softmax(logits, n);
  top = Top(log_softmax, logits, n, k);
  if (rank != nullptr) {
    int32_t larger = 0;
    for (int64_t i = 0; i < n; ++i) larger += logits[i] > logits[id];
    *rank = larger + 1;
  }
  return static_cast<float>(log_softmax.Of(logits[id]));
}

}  // namespace pds::kernels::cpu

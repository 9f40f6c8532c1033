#include "scheduler/batch_policy.h"

#include <algorithm>
#include <limits>
#include <numeric>
#include <tuple>

#include "absl/strings/str_cat.h"

namespace pds::scheduler {

namespace {

// A waiting best-effort sequence: planned after every other.
bool Deferred(const BatchCandidate& c) { return c.best_effort && !c.running; }

// Chunks `order` (indices into candidates) under the budget, FCFS style.
std::vector<PlannedChunk> ChunkInOrder(absl::Span<const BatchCandidate> candidates,
                                       const std::vector<size_t>& order,
                                       const BatchBudget& budget) {
  std::vector<PlannedChunk> plan;
  int32_t left = std::max(budget.max_batch_tokens, 0);
  for (size_t index : order) {
    if (static_cast<int32_t>(plan.size()) >= budget.max_running || left == 0) break;
    const int32_t pending = candidates[index].pending_tokens;
    if (pending <= 0) continue;
    const int32_t chunk = std::min(pending, left);
    plan.push_back({index, chunk});
    left -= chunk;
  }
  return plan;
}

class FcfsBatchPolicy : public BatchPolicy {
 public:
  std::string name() const override { return "fcfs"; }
  std::vector<PlannedChunk> Plan(absl::Span<const BatchCandidate> candidates,
                                 const BatchBudget& budget) const override {
    std::vector<size_t> order(candidates.size());
    std::iota(order.begin(), order.end(), size_t{0});
    std::stable_partition(order.begin(), order.end(),
                          [&](size_t i) { return !Deferred(candidates[i]); });
    return ChunkInOrder(candidates, order, budget);
  }
};

class EdfBatchPolicy : public BatchPolicy {
 public:
  std::string name() const override { return "edf"; }
  std::vector<PlannedChunk> Plan(absl::Span<const BatchCandidate> candidates,
                                 const BatchBudget& budget) const override {
    std::vector<size_t> order(candidates.size());
    std::iota(order.begin(), order.end(), size_t{0});
    auto key = [&](size_t i) {
      const BatchCandidate& c = candidates[i];
      const double deadline = c.running
                                  ? -std::numeric_limits<double>::infinity()
                                  : c.deadline_s.value_or(std::numeric_limits<double>::infinity());
      return std::make_tuple(Deferred(c), deadline, i);
    };
    std::stable_sort(order.begin(), order.end(),
                     [&](size_t a, size_t b) { return key(a) < key(b); });
    return ChunkInOrder(candidates, order, budget);
  }
};

}  // namespace

std::unique_ptr<BatchPolicy> MakeFcfsBatchPolicy() { return std::make_unique<FcfsBatchPolicy>(); }

std::unique_ptr<BatchPolicy> MakeEdfBatchPolicy() { return std::make_unique<EdfBatchPolicy>(); }

absl::StatusOr<std::unique_ptr<BatchPolicy>> MakeBatchPolicy(absl::string_view name) {
  if (name == "fcfs") return MakeFcfsBatchPolicy();
  if (name == "edf") return MakeEdfBatchPolicy();
  return absl::InvalidArgumentError(
      absl::StrCat("unknown batch policy '", name, "' (fcfs or edf)"));
}

}  // namespace pds::scheduler

// Batch formation: which runnable sequences go into an engine step, and how many tokens each
// computes. Pure logic, shared by the engine (engine/runtime/llm_engine.cc) and the simulator
// (scheduler/simulator.h), so both form batches with the same code.
//
// The policy only proposes: it returns the planned (sequence, chunk) list in the order the
// engine should try them. The engine then reserves KV blocks for each in that order
// (preempting when a running sequence needs a block). A running sequence that cannot get its
// blocks ends the batch; a waiting one that cannot is skipped with every waiting one after it,
// the running ones after it still run. Chunks are computed
// against the budget left after the sequences before them, so every prefix is consistent.
// When the engine preempts a sequence (its pending tokens change), it asks again for the
// sequences not yet in the batch, with the budget that is left.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"

namespace pds::scheduler {

// One runnable sequence (not held after prefill, not importing), given in admission order.
struct BatchCandidate {
  int32_t pending_tokens = 0;  // tokens without K/V yet: the prompt (left), or 1 when decoding
  bool running = false;        // already admitted (holds KV blocks and is mid-flight)
  // Optional SLO deadline (seconds, any clock shared by the candidates): for a sequence
  // still in prefill, when its first token is due; for a decoding one, when its next token is.
  std::optional<double> deadline_s;
  // Admitted although predicted to miss its SLO (admission control's best-effort mode): while
  // waiting, it is planned after every other waiting sequence, so it cannot push them past
  // their deadlines. Once running it keeps its place like any other.
  bool best_effort = false;
};

struct BatchBudget {
  int32_t max_batch_tokens = 2048;  // tokens computed by one step (prefill chunks + decodes)
  int32_t max_running = 64;         // sequences in one step
};

struct PlannedChunk {
  size_t index = 0;   // into the candidates
  int32_t chunk = 0;  // tokens to compute this step, 1 <= chunk <= pending_tokens
};

class BatchPolicy {
 public:
  virtual ~BatchPolicy() = default;
  virtual std::string name() const = 0;
  // The planned batch, in the order the engine should reserve it. Never more than
  // `budget.max_running` entries, and the chunks sum to at most `budget.max_batch_tokens`.
  // Candidates with no pending tokens are skipped.
  virtual std::vector<PlannedChunk> Plan(absl::Span<const BatchCandidate> candidates,
                                         const BatchBudget& budget) const = 0;
};

// First come first served in admission order (waiting best-effort sequences after the
// others); each sequence gets min(pending, remaining budget); stop at max_running sequences
// or when the budget is spent.
std::unique_ptr<BatchPolicy> MakeFcfsBatchPolicy();

// Earliest deadline first: the sequences already running keep their admission order and go
// first (so that decodes, which hold blocks and are cheap, are never starved and nothing is
// preempted for a newcomer), then the waiting ones by deadline (those without one last, in
// admission order; ties by admission order; waiting best-effort ones after all of them); chunks and
// stops as FCFS. It does not yet drop sequences that cannot make their deadline: that needs the
// latency model (admission control) and is for a later policy.
std::unique_ptr<BatchPolicy> MakeEdfBatchPolicy();

// By name: "fcfs" or "edf".
absl::StatusOr<std::unique_ptr<BatchPolicy>> MakeBatchPolicy(absl::string_view name);

}  // namespace pds::scheduler

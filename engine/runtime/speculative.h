// Speculative decoding by prompt lookup (n-gram drafts): a decoding sequence whose latest
// tokens occurred earlier in its prompt or reply guesses that what followed them there follows
// again. The engine computes the guesses (drafts) in the same step as the sequence's next
// token, draws a token from every draft position's logits by the request's own rule, and keeps
// the drafts up to the first whose drawn token differs, plus that drawn token. Because a
// draft is deterministic, keeping draft d exactly when the draw at its position is d gives
// each token the distribution (and, for a seeded request, the token, up to the last-bit
// differences between step shapes) that decoding one token per step gives.
#pragma once

#include <array>
#include <cstdint>
#include <deque>
#include <functional>
#include <optional>
#include <span>
#include <vector>

#include "absl/container/flat_hash_map.h"

namespace pds::engine {

// The shape of a step, for its time: the rows computed, the cached positions they attend in
// all (a row at position p attends p + 1), and whether any of them are drafts (a step with
// drafts draws their rows too, and on a GPU is never replayed from the decode step's graph).
struct StepShape {
  int32_t rows = 0;
  int64_t attended = 0;
  bool drafts = false;
};
// A step's predicted time in seconds.
using StepCostFn = std::function<double(const StepShape&)>;
// A cost under which rows are free: every proposed draft likelier than kMinDraftKeepChance
// goes in.
StepCostFn FreeRows();

struct SpeculativeOptions {
  int32_t num_tokens = 0;  // drafts per sequence and step (0: off)
  // The suffix looked up: the longest of ngram_max tokens down to ngram_min that occurred
  // before (its latest occurrence).
  int32_t ngram_max = 4;
  int32_t ngram_min = 2;
  // What a step costs, to choose the drafts that pay for their rows (ChooseDrafts). Unset:
  // the engine measures its own decode steps (StepTimeModel); until those determine the
  // cost of a row, every proposed draft goes in.
  StepCostFn step_cost;
};

// One sequence's proposed drafts, for ChooseDrafts.
struct DraftCandidate {
  int32_t drafts = 0;    // proposed (in order: draft j is kept only if drafts 0..j-1 were)
  double accept = 0.5;   // the chance that a draft is kept when those before it were
  int64_t position = 0;  // of its first draft
};

// Drafts whose chance of being kept is below this never go in, whatever the model says a
// row costs (the host's work for them is not in it).
inline constexpr double kMinDraftKeepChance = 1.0 / 32;

// How many of each candidate's drafts a step carries: those that raise its expected tokens
// per second by `cost`. `base` is the step without drafts and `base_tokens` the tokens it
// sends; the j-th draft of a candidate (1-based) adds accept^j expected tokens and one row at
// position + j - 1. Drafts are ranked by expected tokens per second of their own row, and the
// best number of the highest ranked go in (the step's drafting overhead is paid once, so a
// few drafts may not pay where more do). With `max_seconds` > 0, no draft goes in that would
// push the predicted step past it.
std::vector<int32_t> ChooseDrafts(const StepCostFn& cost, const StepShape& base, double base_tokens,
                                  std::span<const DraftCandidate> candidates,
                                  double max_seconds = 0);

// A sequence's record of drafts kept: counts that fade by `kFade` per decode step, so the
// estimate follows a reply whose repetitiveness changes, and a sequence whose drafts stopped
// paying is tried again after a while. The estimate starts at one half.
class DraftAcceptance {
 public:
  static constexpr double kFade = 0.97;
  // One decode step: `drafted` drafts of which the first `kept` were kept (0, 0: none drafted).
  void Update(int32_t drafted, int32_t kept);
  double estimate() const { return (kept_ + 1) / (kept_ + rejected_ + 2); }

 private:
  double kept_ = 0;
  double rejected_ = 0;
};

// Decode step time as the engine measures it: seconds = a + g * [drafts] + b * rows
// + c * attended, fitted by least squares on relative error over the latest kWindow steps made
// only of decodes (with or without drafts). A coefficient that those steps do not determine
// (every step had the same rows, say) keeps its last fitted value; until the cost of a row is
// determined once, Predict has nothing.
class StepTimeModel {
 public:
  static constexpr size_t kWindow = 128;
  static constexpr int32_t kRefitEvery = 8;
  void Observe(const StepShape& shape, double seconds);
  std::optional<double> Predict(const StepShape& shape) const;
  // a, g, b, c (g and c 0 while undetermined).
  const std::array<double, 4>& coefficients() const { return coef_; }

 private:
  void Fit();
  std::deque<std::pair<StepShape, double>> samples_;
  int32_t since_fit_ = 0;
  std::array<double, 4> coef_{};
  bool row_cost_known_ = false;
};

// Up to `k` drafts for the token after `tokens`: the tokens that followed the latest earlier
// occurrence of `tokens`' longest suffix of ngram_min..ngram_max tokens (empty when none
// occurred). A continuation that reaches the end of `tokens` goes on with the drafts
// themselves, so a repeating pattern is drafted in full.
std::vector<int32_t> ProposeNgramDrafts(std::span<const int32_t> tokens, int32_t ngram_min,
                                        int32_t ngram_max, int32_t k);

// The same drafts from a sequence's positions by token id, kept as the sequence grows: a step
// looks at the earlier occurrences of its last token only, latest first, instead of scanning
// the whole sequence (which costs tens of microseconds per sequence at 32k tokens).
class NgramIndex {
 public:
  // Indexes tokens[indexed(), tokens.size()): `tokens` must extend what was indexed before.
  void Extend(std::span<const int32_t> tokens);
  size_t indexed() const { return indexed_; }
  // ProposeNgramDrafts(tokens, ...), for `tokens` indexed whole.
  std::vector<int32_t> Propose(std::span<const int32_t> tokens, int32_t ngram_min,
                               int32_t ngram_max, int32_t k) const;

 private:
  absl::flat_hash_map<int32_t, std::vector<int32_t>> positions_;  // ascending
  size_t indexed_ = 0;
};

}  // namespace pds::engine

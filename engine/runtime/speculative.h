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
#include <limits>
#include <optional>
#include <span>
#include <vector>

#include "absl/container/flat_hash_map.h"

namespace pds::engine {

// The shape of a step, for its time: the rows computed, the cached positions read (per
// sequence, those its rows attend, counted once: attention reads a sequence's K/V once for all
// its rows), and whether any rows are drafts (a step with drafts also draws their rows, and
// on a GPU is never replayed from the decode step's graph).
struct StepShape {
  int32_t rows = 0;
  int64_t kv = 0;
  bool drafts = false;
};
// A step's predicted time in seconds.
using StepCostFn = std::function<double(const StepShape&)>;

enum class DraftChoice {
  kPaying,  // the drafts that raise the step's expected tokens per second (ChooseDrafts)
  kAll,     // every proposed draft likelier than kMinDraftKeepChance
};

struct SpeculativeOptions {
  int32_t num_tokens = 0;  // drafts per sequence and step (0: off)
  // The suffix looked up: the longest of ngram_max tokens down to ngram_min that occurred
  // before (its latest occurrence).
  int32_t ngram_max = 4;
  int32_t ngram_min = 2;
  DraftChoice choice = DraftChoice::kPaying;
  // kPaying: what a step costs. Unset: the engine times its own decode steps (StepTimeModel);
  // until those determine the cost of a row, every proposed draft goes in.
  StepCostFn step_cost;
};

// One sequence's proposed drafts, for ChooseDrafts.
struct DraftCandidate {
  int32_t drafts = 0;   // proposed (in order: draft j is kept only if drafts 0..j-1 were)
  double accept = 0.5;  // the chance that a draft is kept when those before it were
};

// Drafts whose chance of being kept is below this never go in, whatever the model says a
// row costs (the host's work for them is not in it).
inline constexpr double kMinDraftKeepChance = 1.0 / 32;

struct DraftLimits {
  int32_t rows = std::numeric_limits<int32_t>::max();  // draft rows in all (token budget)
  double max_seconds = 0;  // > 0: no draft may push the predicted step past this
  StepShape others;        // the step's rows that are not decodes (prefill chunks)
  StepCostFn cap_cost;     // prices the step for the cap (unset: the choice's own cost)
};

// How many of each candidate's drafts a step carries: those that raise the expected tokens
// per second of its decodes (`decodes`: their rows, sending `tokens` tokens; the step's other
// rows count only for the cap: a prefill chunk is not traded against drafts). The j-th draft of
// a candidate (1-based) adds accept^j expected tokens and one row. Drafts are ranked by
// expected tokens per second of their own row, and the best number of the highest ranked go
// in (the step's drafting overhead is paid once, so a few drafts may not pay where more do).
std::vector<int32_t> ChooseDrafts(const StepCostFn& cost, const StepShape& decodes, double tokens,
                                  std::span<const DraftCandidate> candidates,
                                  const DraftLimits& limits = {});
// A cost under which rows are free: every proposed draft likelier than kMinDraftKeepChance
// goes in (DraftChoice::kAll).
StepCostFn FreeRows();

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

// Decode step time as the engine measures it: seconds = a + g [drafts] + b rows + c kv,
// fitted by least squares on relative error over the latest steps made only of decodes: the
// latest kDrafted with drafts and the latest kPlain without (kept apart, so that a kind the
// engine runs rarely, to measure it, stays in the fit), once more without the samples far off
// the first fit (a graph capture, a stall). A feature is fitted only when at least kMinSide
// samples differ from its median value; the others keep their last fitted value (0 if never
// fitted). Coefficients fitted below zero are zero (the rest fitted again without them).
// Until the cost of a row has been fitted once, Predict has nothing.
class StepTimeModel {
 public:
  static constexpr size_t kDrafted = 32;
  static constexpr size_t kPlain = 96;
  static constexpr int32_t kRefitEvery = 8;
  static constexpr int32_t kMinSide = 8;
  // A kind of step whose latest sample is this many steps old is measured again.
  static constexpr int64_t kStale = 1024;
  void Observe(const StepShape& shape, double seconds);
  std::optional<double> Predict(const StepShape& shape) const;
  // a, g, b, c (0 while not fitted).
  const std::array<double, 4>& coefficients() const { return coef_; }
  // The kind of step to run now and then (the engine does, one decision in 32) to keep g
  // measured: with drafts (true) or without (false), when fewer than kMinSide of that kind are
  // kept or the latest is kStale steps old; nothing otherwise.
  std::optional<bool> Lacks() const;

 private:
  using Sample = std::pair<StepShape, double>;
  void Fit();
  // Fits `samples`; false when they determine nothing.
  bool Solve(const std::vector<Sample>& samples);
  std::deque<Sample> drafted_, plain_;
  int64_t steps_ = 0;                            // observed
  int64_t last_drafted_ = -1, last_plain_ = -1;  // steps_ at the latest of each kind
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

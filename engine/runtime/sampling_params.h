// Per-request sampling parameters and the seeded sampler that applies them.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"
#include "kernels/sampling.h"

namespace pds::engine {

struct SamplingParams {
  float temperature = 0.0f;      // 0: greedy (argmax)
  int32_t top_k = 0;             // 0: no limit
  float top_p = 1.0f;            // 1: no limit
  std::optional<uint64_t> seed;  // unset: drawn at random per request
  int32_t max_tokens = 16;
  bool ignore_eos = false;
  std::vector<int32_t> stop_token_ids;
  int32_t logprobs = -1;  // < 0: none; k >= 0: the sampled token's logprob plus top k
  // Structured output (engine/runtime/json_constraint.h): JSON Schema text the reply must be
  // JSON of; empty: none. The reply ends ("stop") when its JSON is complete.
  std::string json_schema;
  // Or a regular expression (engine/runtime/regex.h) the whole reply matches; empty: none.
  std::string regex;
  // A reasoning model's constrained reply: free until token `reasoning_end` (>= 0; such as
  // </think>), then constrained. `reasoning_inside`: the prompt opened the reasoning; else
  // `reasoning_open` (such as <think>) may start it as the first token (JsonMatcher::ReasonFirst).
  int32_t reasoning_open = -1;
  int32_t reasoning_end = -1;
  bool reasoning_inside = false;

  // INVALID_ARGUMENT naming the offending field.
  absl::Status Validate(int64_t vocab_size) const;
};

enum class FinishReason { kNone, kStop, kLength, kCancelled, kError };
absl::string_view FinishReasonName(FinishReason reason);  // "stop", "length", "cancelled", ...

// Draws tokens for one request: a pure function of (seed, step, logits), so the same seed
// gives the same tokens from the same logits whatever the batch or the machine's thread count.
// The logits themselves are not bitwise batch-invariant: a step of more than 8 tokens sums its
// GEMMs in BLAS's order, not the small-batch kernels', so the last bits differ and a draw at a
// boundary (or a greedy near-tie) can go the other way.
class Sampler {
 public:
  Sampler(const SamplingParams& params, uint64_t seed) : params_(params), seed_(seed) {}
  // How the token of generation step `step` is chosen (the backend samples where the logits
  // are, by kernels::cpu::SampleLogits's rule).
  kernels::RowSampling RowParams(int64_t step) const;

 private:
  SamplingParams params_;
  uint64_t seed_;
};

// Uniform double in [0, 1) from (seed, step) (splitmix64 finalizer).
double UniformFromSeed(uint64_t seed, uint64_t step);

}  // namespace pds::engine

// Per-request sampling parameters and the seeded sampler that applies them.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"
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
  // < 0: none; k >= 0: each prompt token's logprob (after the first) plus the top k there,
  // from the model's raw logits (TokenOutput::prompt_logprobs). The prompt is then computed
  // whole (its cached prefix is not used).
  int32_t prompt_logprobs = -1;
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
  // Logits processing, applied on the host to the row before the draw, in this order: tokens
  // not in `allowed_token_ids` (when given) are refused; before `min_tokens` tokens, the EOS and
  // stop tokens are refused; `logit_bias` is added; `repetition_penalty` (vLLM's: over the prompt's
  // and the reply's tokens, a positive logit divided by it, a negative one multiplied), then
  // `frequency_penalty` times a token's count in the reply plus `presence_penalty` if it is there
  // (OpenAI's) are taken off; `min_p` (sampling only) refuses tokens less likely than min_p times
  // the likeliest.
  float presence_penalty = 0.0f;                      // [-2, 2]
  float frequency_penalty = 0.0f;                     // [-2, 2]
  float repetition_penalty = 1.0f;                    // (0, 10]; 1: none
  std::vector<std::pair<int32_t, float>> logit_bias;  // (token, bias in [-100, 100]), <= 1024
  int32_t min_tokens = 0;                             // <= max_tokens
  float min_p = 0.0f;                                 // [0, 1]
  // vLLM's: the only tokens the reply may have (empty: any); not with json_schema or regex.
  std::vector<int32_t> allowed_token_ids;
  bool ProcessesLogits() const {
    return presence_penalty != 0.0f || frequency_penalty != 0.0f || repetition_penalty != 1.0f ||
           !logit_bias.empty() || min_tokens > 0 || (min_p > 0.0f && temperature > 0.0f) ||
           !allowed_token_ids.empty();
  }

  // INVALID_ARGUMENT naming the offending field. `eos_token_ids`: the model's (with min_tokens,
  // allowed_token_ids must hold a token that is neither EOS, unless ignore_eos, nor a stop
  // token).
  absl::Status Validate(int64_t vocab_size, absl::Span<const int32_t> eos_token_ids = {}) const;
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

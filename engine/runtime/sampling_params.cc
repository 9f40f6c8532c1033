#include "engine/runtime/sampling_params.h"

#include <algorithm>
#include <cmath>
#include <tuple>

#include "absl/strings/str_cat.h"
#include "kernels/sampling.h"

namespace pds::engine {

absl::Status SamplingParams::Validate(int64_t vocab_size,
                                      absl::Span<const int32_t> eos_token_ids) const {
  if (!std::isfinite(temperature) || temperature < 0.0f) {
    return absl::InvalidArgumentError(
        absl::StrCat("temperature must be a finite number >= 0, got ", temperature));
  }
  if (top_k < 0) return absl::InvalidArgumentError(absl::StrCat("top_k must be >= 0, got ", top_k));
  if (!(top_p > 0.0f && top_p <= 1.0f)) {
    return absl::InvalidArgumentError(absl::StrCat("top_p must be in (0, 1], got ", top_p));
  }
  if (max_tokens < 1) {
    return absl::InvalidArgumentError(absl::StrCat("max_tokens must be >= 1, got ", max_tokens));
  }
  if (logprobs > 20) {
    return absl::InvalidArgumentError(absl::StrCat("logprobs must be <= 20, got ", logprobs));
  }
  if (prompt_logprobs < -1 || prompt_logprobs > 20) {
    return absl::InvalidArgumentError(
        absl::StrCat("prompt_logprobs must be in [0, 20] (-1: none), got ", prompt_logprobs));
  }
  if (!json_schema.empty() && !regex.empty()) {
    return absl::InvalidArgumentError("json_schema and regex both constrain the reply: one only");
  }
  for (int32_t id : stop_token_ids) {
    if (id < 0 || id >= vocab_size) {
      return absl::InvalidArgumentError(
          absl::StrCat("stop token id ", id, " outside the vocabulary [0, ", vocab_size, ")"));
    }
  }
  for (const auto& [name, value, lo, hi] :
       {std::tuple<const char*, float, float, float>{"presence_penalty", presence_penalty, -2, 2},
        {"frequency_penalty", frequency_penalty, -2, 2},
        {"min_p", min_p, 0, 1}}) {
    if (!(value >= lo && value <= hi)) {
      return absl::InvalidArgumentError(
          absl::StrCat(name, " must be in [", lo, ", ", hi, "], got ", value));
    }
  }
  if (!(repetition_penalty > 0.0f && repetition_penalty <= 10.0f)) {
    return absl::InvalidArgumentError(
        absl::StrCat("repetition_penalty must be in (0, 10], got ", repetition_penalty));
  }
  if (logit_bias.size() > 1024) {
    return absl::InvalidArgumentError(
        absl::StrCat("logit_bias has ", logit_bias.size(), " entries; at most 1024"));
  }
  for (size_t i = 0; i < logit_bias.size(); ++i) {
    const auto& [id, bias] = logit_bias[i];
    for (size_t j = 0; j < i; ++j) {
      if (logit_bias[j].first == id) {
        return absl::InvalidArgumentError(absl::StrCat("logit_bias names token ", id, " twice"));
      }
    }
    if (id < 0 || id >= vocab_size) {
      return absl::InvalidArgumentError(absl::StrCat(
          "logit_bias token id ", id, " outside the vocabulary [0, ", vocab_size, ")"));
    }
    if (!(bias >= -100.0f && bias <= 100.0f)) {
      return absl::InvalidArgumentError(
          absl::StrCat("logit_bias of token ", id, " must be in [-100, 100], got ", bias));
    }
  }
  if (min_tokens < 0 || min_tokens > max_tokens) {
    return absl::InvalidArgumentError(
        absl::StrCat("min_tokens must be in [0, max_tokens = ", max_tokens, "], got ", min_tokens));
  }
  if (min_tokens > 0 && (!json_schema.empty() || !regex.empty())) {
    return absl::InvalidArgumentError(
        "min_tokens with structured output: the reply ends when its structure is complete");
  }
  if (!allowed_token_ids.empty()) {
    if (!json_schema.empty() || !regex.empty()) {
      return absl::InvalidArgumentError(
          "allowed_token_ids with structured output: the constraint chooses the tokens");
    }
    if (static_cast<int64_t>(allowed_token_ids.size()) > vocab_size) {
      return absl::InvalidArgumentError(
          absl::StrCat("allowed_token_ids has ", allowed_token_ids.size(),
                       " entries, more than the vocabulary's ", vocab_size));
    }
    bool any_before_min = false;  // a token min_tokens does not refuse
    for (int32_t id : allowed_token_ids) {
      if (id < 0 || id >= vocab_size) {
        return absl::InvalidArgumentError(absl::StrCat(
            "allowed_token_ids holds ", id, ", outside the vocabulary [0, ", vocab_size, ")"));
      }
      const auto in = [id](absl::Span<const int32_t> ids) {
        return std::find(ids.begin(), ids.end(), id) != ids.end();
      };
      if ((ignore_eos || !in(eos_token_ids)) && !in(stop_token_ids)) any_before_min = true;
    }
    if (min_tokens > 0 && !any_before_min) {
      return absl::InvalidArgumentError(
          "min_tokens with allowed_token_ids that are all EOS or stop tokens: no token is left");
    }
  }
  return absl::OkStatus();
}

absl::string_view FinishReasonName(FinishReason reason) {
  switch (reason) {
    case FinishReason::kNone:
      return "none";
    case FinishReason::kStop:
      return "stop";
    case FinishReason::kLength:
      return "length";
    case FinishReason::kCancelled:
      return "cancelled";
    case FinishReason::kError:
      return "error";
  }
  return "?";
}

double UniformFromSeed(uint64_t seed, uint64_t step) {
  uint64_t z = seed + 0x9e3779b97f4a7c15ull * (step + 1);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  z = z ^ (z >> 31);
  return static_cast<double>(z >> 11) * 0x1.0p-53;
}

kernels::RowSampling Sampler::RowParams(int64_t step) const {
  kernels::RowSampling r;
  r.temperature = params_.temperature;
  r.top_k = params_.top_k;
  r.top_p = params_.top_p;
  r.u = r.greedy() ? 0.0 : UniformFromSeed(seed_, step);
  return r;
}

}  // namespace pds::engine

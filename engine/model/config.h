// Model configuration read from an HF model directory's config.json (+ generation_config.json).
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace pds::engine {

enum class Architecture { kLlama, kMistral, kQwen2, kQwen3 };

struct RopeScaling {
  // Only "llama3" scaling is supported; absent means plain RoPE.
  double factor = 1.0;
  double low_freq_factor = 1.0;
  double high_freq_factor = 4.0;
  int64_t original_max_position_embeddings = 8192;
};

struct ModelConfig {
  std::string architecture_name;  // as written in config.json, e.g. "LlamaForCausalLM"
  Architecture architecture = Architecture::kLlama;
  int64_t vocab_size = 0;
  int64_t hidden_size = 0;
  int64_t intermediate_size = 0;
  int64_t num_layers = 0;
  int64_t num_heads = 0;
  int64_t num_kv_heads = 0;
  int64_t head_dim = 0;
  int64_t max_position_embeddings = 0;
  double rms_norm_eps = 1e-6;
  double rope_theta = 10000.0;
  std::optional<RopeScaling> rope_scaling;
  bool tie_word_embeddings = false;
  bool qkv_bias = false;  // bias on q/k/v projections (Qwen2 always; Llama attention_bias)
  bool o_bias = false;    // bias on o_proj (Llama attention_bias)
  bool qk_norm = false;   // per-head RMSNorm on q and k before RoPE (Qwen3)
  std::optional<int64_t> sliding_window;  // Mistral/Qwen2 when in use: caps the context
  std::optional<int32_t> bos_token_id;
  std::vector<int32_t> eos_token_ids;  // union of config.json and generation_config.json

  int64_t q_size() const { return num_heads * head_dim; }
  int64_t kv_size() const { return num_kv_heads * head_dim; }
  // Longest context the engine serves exactly (max positions, capped by a sliding window).
  int64_t max_context() const;
  // Parameter count (embeddings and lm_head included once each when untied).
  int64_t num_parameters() const;
};

// Parses config.json text; `source` names the file in error messages.
absl::StatusOr<ModelConfig> ParseModelConfig(absl::string_view json_text, absl::string_view source);

// Applies generation_config.json text (bos/eos ids) onto `config`.
absl::Status ApplyGenerationConfig(absl::string_view json_text, absl::string_view source,
                                   ModelConfig& config);

// Reads <dir>/config.json and, if present, <dir>/generation_config.json.
absl::StatusOr<ModelConfig> LoadModelConfig(const std::string& dir);

// RoPE inverse frequencies [head_dim / 2], with llama3 scaling applied when configured.
std::vector<float> RopeInvFreq(const ModelConfig& config);

}  // namespace pds::engine

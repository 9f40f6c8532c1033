#include "engine/model/presets.h"

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "nlohmann/json.hpp"

namespace pds::engine {
namespace {

ModelConfig Llama(int64_t vocab, int64_t hidden, int64_t inter, int64_t layers, int64_t heads,
                  int64_t kv_heads, int64_t max_pos) {
  ModelConfig c;
  c.architecture_name = "LlamaForCausalLM";
  c.architecture = Architecture::kLlama;
  c.vocab_size = vocab;
  c.hidden_size = hidden;
  c.intermediate_size = inter;
  c.num_layers = layers;
  c.num_heads = heads;
  c.num_kv_heads = kv_heads;
  c.head_dim = hidden / heads;
  c.max_position_embeddings = max_pos;
  c.rms_norm_eps = 1e-5;
  c.rope_theta = 10000.0;
  return c;
}

}  // namespace

std::vector<std::string> PresetNames() {
  return {"tiny", "small", "llama3-8b", "llama3.2-1b", "qwen2.5-7b"};
}

absl::StatusOr<ModelConfig> PresetConfig(absl::string_view name) {
  if (name == "tiny") {
    // Unit tests: a few layers, hidden 64, GQA 4:2.
    return Llama(512, 64, 160, 2, 4, 2, 2048);
  }
  if (name == "small") {
    // The CPU demo model: about 34M parameters.
    ModelConfig c = Llama(8192, 512, 1536, 8, 8, 4, 4096);
    c.rope_theta = 500000.0;
    return c;
  }
  if (name == "llama3-8b") {
    ModelConfig c = Llama(128256, 4096, 14336, 32, 32, 8, 8192);
    c.rope_theta = 500000.0;
    return c;
  }
  if (name == "llama3.2-1b") {
    ModelConfig c = Llama(128256, 2048, 8192, 16, 32, 8, 131072);
    c.rope_theta = 500000.0;
    c.tie_word_embeddings = true;
    RopeScaling rs;
    rs.factor = 32.0;
    rs.low_freq_factor = 1.0;
    rs.high_freq_factor = 4.0;
    rs.original_max_position_embeddings = 8192;
    c.rope_scaling = rs;
    return c;
  }
  if (name == "qwen2.5-7b") {
    ModelConfig c = Llama(152064, 3584, 18944, 28, 28, 4, 32768);
    c.architecture_name = "Qwen2ForCausalLM";
    c.architecture = Architecture::kQwen2;
    c.qkv_bias = true;
    c.rms_norm_eps = 1e-6;
    c.rope_theta = 1000000.0;
    return c;
  }
  return absl::InvalidArgumentError(absl::StrCat(
      "unknown preset '", name, "' (known: ", absl::StrJoin(PresetNames(), ", "), ")"));
}

std::string ConfigJson(const ModelConfig& c) {
  nlohmann::ordered_json j;
  j["architectures"] = {c.architecture_name};
  switch (c.architecture) {
    case Architecture::kLlama:
      j["model_type"] = "llama";
      break;
    case Architecture::kMistral:
      j["model_type"] = "mistral";
      break;
    case Architecture::kQwen2:
      j["model_type"] = "qwen2";
      break;
    case Architecture::kQwen3:
      j["model_type"] = "qwen3";
      break;
  }
  j["vocab_size"] = c.vocab_size;
  j["hidden_size"] = c.hidden_size;
  j["intermediate_size"] = c.intermediate_size;
  j["num_hidden_layers"] = c.num_layers;
  j["num_attention_heads"] = c.num_heads;
  j["num_key_value_heads"] = c.num_kv_heads;
  j["head_dim"] = c.head_dim;
  j["max_position_embeddings"] = c.max_position_embeddings;
  j["rms_norm_eps"] = c.rms_norm_eps;
  j["rope_theta"] = c.rope_theta;
  if (c.rope_scaling) {
    j["rope_scaling"] = {
        {"rope_type", "llama3"},
        {"factor", c.rope_scaling->factor},
        {"low_freq_factor", c.rope_scaling->low_freq_factor},
        {"high_freq_factor", c.rope_scaling->high_freq_factor},
        {"original_max_position_embeddings", c.rope_scaling->original_max_position_embeddings}};
  } else {
    j["rope_scaling"] = nullptr;
  }
  j["tie_word_embeddings"] = c.tie_word_embeddings;
  if (c.architecture == Architecture::kLlama || c.architecture == Architecture::kMistral ||
      c.architecture == Architecture::kQwen3) {
    j["attention_bias"] = c.qkv_bias;
  }
  if (c.sliding_window) {
    j["sliding_window"] = *c.sliding_window;
    if (c.architecture != Architecture::kMistral) j["use_sliding_window"] = true;
  }
  j["hidden_act"] = "silu";
  if (c.bos_token_id) j["bos_token_id"] = *c.bos_token_id;
  if (c.eos_token_ids.size() == 1) {
    j["eos_token_id"] = c.eos_token_ids[0];
  } else if (!c.eos_token_ids.empty()) {
    j["eos_token_id"] = c.eos_token_ids;
  }
  j["torch_dtype"] = "float32";
  return j.dump(2) + "\n";
}

}  // namespace pds::engine

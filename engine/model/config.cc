#include "engine/model/config.h"

#include <cmath>
#include <filesystem>
#include <fstream>
#include <numbers>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "engine/common/status_macros.h"
#include "nlohmann/json.hpp"

namespace pds::engine {
namespace {

using nlohmann::json;

absl::Status Invalid(absl::string_view source, absl::string_view what) {
  return absl::InvalidArgumentError(absl::StrCat(source, ": ", what));
}

// Reads an integer field; `required` fields must be present.
absl::Status ReadInt(const json& j, absl::string_view source, const char* key, bool required,
                     int64_t& out) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) {
    if (required) return Invalid(source, absl::StrCat("missing required field '", key, "'"));
    return absl::OkStatus();
  }
  if (!it->is_number_integer()) {
    return Invalid(source, absl::StrCat("field '", key, "' must be an integer"));
  }
  out = it->get<int64_t>();
  return absl::OkStatus();
}

absl::Status ReadDouble(const json& j, absl::string_view source, const char* key, double& out) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return absl::OkStatus();
  if (!it->is_number()) return Invalid(source, absl::StrCat("field '", key, "' must be a number"));
  out = it->get<double>();
  return absl::OkStatus();
}

absl::Status ReadBool(const json& j, absl::string_view source, const char* key, bool& out) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return absl::OkStatus();
  if (!it->is_boolean()) return Invalid(source, absl::StrCat("field '", key, "' must be a bool"));
  out = it->get<bool>();
  return absl::OkStatus();
}

// Token id fields may be an integer or a list of integers.
absl::Status ReadIds(const json& j, absl::string_view source, const char* key,
                     std::vector<int32_t>& out) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return absl::OkStatus();
  auto add = [&](const json& v) -> absl::Status {
    if (!v.is_number_integer() || v.get<int64_t>() < 0 || v.get<int64_t>() > INT32_MAX) {
      return Invalid(source, absl::StrCat("field '", key, "' must hold non-negative token ids"));
    }
    out.push_back(static_cast<int32_t>(v.get<int64_t>()));
    return absl::OkStatus();
  };
  if (it->is_array()) {
    for (const auto& v : *it) PDS_RETURN_IF_ERROR(add(v));
  } else {
    PDS_RETURN_IF_ERROR(add(*it));
  }
  return absl::OkStatus();
}

absl::StatusOr<json> ParseObject(absl::string_view text, absl::string_view source) {
  json j = json::parse(text.begin(), text.end(), nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) return Invalid(source, "invalid JSON");
  if (!j.is_object()) return Invalid(source, "expected a JSON object");
  return j;
}

absl::StatusOr<std::string> ReadFile(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot open ", path.string()));
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

void AddUnique(std::vector<int32_t>& ids, int32_t id) {
  for (int32_t existing : ids) {
    if (existing == id) return;
  }
  ids.push_back(id);
}

}  // namespace

int64_t ModelConfig::max_context() const {
  int64_t limit = max_position_embeddings > 0 ? max_position_embeddings : INT32_MAX;
  if (sliding_window && *sliding_window > 0) limit = std::min(limit, *sliding_window);
  return limit;
}

int64_t ModelConfig::num_parameters() const {
  int64_t per_layer = hidden_size * (q_size() + 2 * kv_size()) + q_size() * hidden_size +
                      3 * hidden_size * intermediate_size + 2 * hidden_size;
  if (qkv_bias) per_layer += q_size() + 2 * kv_size();
  if (o_bias) per_layer += hidden_size;
  if (qk_norm) per_layer += 2 * head_dim;
  int64_t total = num_layers * per_layer + vocab_size * hidden_size + hidden_size;
  if (!tie_word_embeddings) total += vocab_size * hidden_size;
  return total;
}

absl::StatusOr<ModelConfig> ParseModelConfig(absl::string_view json_text,
                                             absl::string_view source) {
  PDS_ASSIGN_OR_RETURN(json j, ParseObject(json_text, source));
  ModelConfig c;
  auto arch = j.find("architectures");
  if (arch == j.end() || !arch->is_array() || arch->empty() || !(*arch)[0].is_string()) {
    return Invalid(source, "missing 'architectures' (a list naming the model class)");
  }
  c.architecture_name = (*arch)[0].get<std::string>();
  if (c.architecture_name == "LlamaForCausalLM") {
    c.architecture = Architecture::kLlama;
  } else if (c.architecture_name == "MistralForCausalLM") {
    c.architecture = Architecture::kMistral;
  } else if (c.architecture_name == "Qwen2ForCausalLM") {
    c.architecture = Architecture::kQwen2;
  } else if (c.architecture_name == "Qwen3ForCausalLM") {
    c.architecture = Architecture::kQwen3;
  } else {
    return Invalid(source, absl::StrCat("unsupported architecture '", c.architecture_name,
                                        "' (supported: LlamaForCausalLM, MistralForCausalLM, "
                                        "Qwen2ForCausalLM, Qwen3ForCausalLM)"));
  }
  PDS_RETURN_IF_ERROR(ReadInt(j, source, "vocab_size", true, c.vocab_size));
  PDS_RETURN_IF_ERROR(ReadInt(j, source, "hidden_size", true, c.hidden_size));
  PDS_RETURN_IF_ERROR(ReadInt(j, source, "intermediate_size", true, c.intermediate_size));
  PDS_RETURN_IF_ERROR(ReadInt(j, source, "num_hidden_layers", true, c.num_layers));
  PDS_RETURN_IF_ERROR(ReadInt(j, source, "num_attention_heads", true, c.num_heads));
  c.num_kv_heads = c.num_heads;
  PDS_RETURN_IF_ERROR(ReadInt(j, source, "num_key_value_heads", false, c.num_kv_heads));
  if (c.num_heads > 0) c.head_dim = c.hidden_size / c.num_heads;
  PDS_RETURN_IF_ERROR(ReadInt(j, source, "head_dim", false, c.head_dim));
  PDS_RETURN_IF_ERROR(
      ReadInt(j, source, "max_position_embeddings", false, c.max_position_embeddings));
  PDS_RETURN_IF_ERROR(ReadDouble(j, source, "rms_norm_eps", c.rms_norm_eps));
  PDS_RETURN_IF_ERROR(ReadDouble(j, source, "rope_theta", c.rope_theta));
  PDS_RETURN_IF_ERROR(ReadBool(j, source, "tie_word_embeddings", c.tie_word_embeddings));
  bool attention_bias = false;
  PDS_RETURN_IF_ERROR(ReadBool(j, source, "attention_bias", attention_bias));
  switch (c.architecture) {
    case Architecture::kLlama:
    case Architecture::kMistral:
      c.qkv_bias = attention_bias;
      c.o_bias = attention_bias;
      break;
    case Architecture::kQwen2:
      c.qkv_bias = true;
      break;
    case Architecture::kQwen3:
      c.qkv_bias = attention_bias;
      c.o_bias = attention_bias;
      c.qk_norm = true;
      break;
  }

  // Features the engine does not implement are refused by name rather than computed wrongly.
  bool mlp_bias = false;
  PDS_RETURN_IF_ERROR(ReadBool(j, source, "mlp_bias", mlp_bias));
  if (mlp_bias) return Invalid(source, "'mlp_bias: true' is not supported");
  auto act = j.find("hidden_act");
  if (act != j.end() && !act->is_null() &&
      (!act->is_string() || act->get<std::string>() != "silu")) {
    // Named by its value when a (short) string, else by its JSON type: a dump of an arbitrary
    // value could be huge, or nested deep enough to exhaust the stack.
    const std::string what = act->is_string() && act->get_ref<const std::string&>().size() <= 64
                                 ? absl::StrCat("'", act->get_ref<const std::string&>(), "'")
                                 : absl::StrCat("(a JSON ", act->type_name(), ")");
    return Invalid(source, absl::StrCat("unsupported hidden_act ", what, " (supported: silu)"));
  }

  // Sliding window: Mistral uses it whenever set; Qwen2/3 only with use_sliding_window.
  int64_t window = 0;
  PDS_RETURN_IF_ERROR(ReadInt(j, source, "sliding_window", false, window));
  bool use_window = c.architecture == Architecture::kMistral;
  PDS_RETURN_IF_ERROR(ReadBool(j, source, "use_sliding_window", use_window));
  if (use_window && window > 0) c.sliding_window = window;

  auto scaling = j.find("rope_scaling");
  if (scaling != j.end() && !scaling->is_null()) {
    if (!scaling->is_object()) return Invalid(source, "'rope_scaling' must be an object or null");
    std::string type;
    for (const char* key : {"rope_type", "type"}) {
      auto t = scaling->find(key);
      if (t != scaling->end() && t->is_string()) {
        type = t->get<std::string>();
        break;
      }
    }
    if (type == "llama3") {
      RopeScaling rs;
      PDS_RETURN_IF_ERROR(ReadDouble(*scaling, source, "factor", rs.factor));
      PDS_RETURN_IF_ERROR(ReadDouble(*scaling, source, "low_freq_factor", rs.low_freq_factor));
      PDS_RETURN_IF_ERROR(ReadDouble(*scaling, source, "high_freq_factor", rs.high_freq_factor));
      PDS_RETURN_IF_ERROR(ReadInt(*scaling, source, "original_max_position_embeddings", false,
                                  rs.original_max_position_embeddings));
      if (rs.factor <= 0 || rs.high_freq_factor <= rs.low_freq_factor ||
          rs.original_max_position_embeddings <= 0) {
        return Invalid(source, "invalid llama3 rope_scaling parameters");
      }
      c.rope_scaling = rs;
    } else if (type != "default" && !type.empty()) {
      return Invalid(
          source, absl::StrCat("unsupported rope_scaling type '", type, "' (supported: llama3)"));
    }
  }

  std::vector<int32_t> bos;
  PDS_RETURN_IF_ERROR(ReadIds(j, source, "bos_token_id", bos));
  if (!bos.empty()) c.bos_token_id = bos[0];
  std::vector<int32_t> eos;
  PDS_RETURN_IF_ERROR(ReadIds(j, source, "eos_token_id", eos));
  for (int32_t id : eos) AddUnique(c.eos_token_ids, id);

  // Validation of shapes that the engine relies on.
  auto positive = [&](int64_t v, const char* name) -> absl::Status {
    if (v <= 0) return Invalid(source, absl::StrCat("'", name, "' must be positive, got ", v));
    return absl::OkStatus();
  };
  PDS_RETURN_IF_ERROR(positive(c.vocab_size, "vocab_size"));
  PDS_RETURN_IF_ERROR(positive(c.hidden_size, "hidden_size"));
  PDS_RETURN_IF_ERROR(positive(c.intermediate_size, "intermediate_size"));
  PDS_RETURN_IF_ERROR(positive(c.num_layers, "num_hidden_layers"));
  PDS_RETURN_IF_ERROR(positive(c.num_heads, "num_attention_heads"));
  PDS_RETURN_IF_ERROR(positive(c.num_kv_heads, "num_key_value_heads"));
  PDS_RETURN_IF_ERROR(positive(c.head_dim, "head_dim"));
  if (c.vocab_size > INT32_MAX) return Invalid(source, "'vocab_size' too large");
  // Upper bounds far above any real model's (Llama 3.1 405B: hidden 16384, 126 layers,
  // intermediate 53248, 128 heads of 128): beyond them the sizes derived from these fields
  // (parameters, per-layer buffers) would overflow or exhaust memory before a tensor is read.
  auto at_most = [&](int64_t v, int64_t limit, const char* name) -> absl::Status {
    if (v > limit) {
      return Invalid(source, absl::StrCat("'", name, "' of ", v,
                                          " is beyond what the engine "
                                          "supports (at most ",
                                          limit, ")"));
    }
    return absl::OkStatus();
  };
  PDS_RETURN_IF_ERROR(at_most(c.hidden_size, int64_t{1} << 17, "hidden_size"));
  PDS_RETURN_IF_ERROR(at_most(c.intermediate_size, int64_t{1} << 20, "intermediate_size"));
  PDS_RETURN_IF_ERROR(at_most(c.num_layers, 1024, "num_hidden_layers"));
  PDS_RETURN_IF_ERROR(at_most(c.num_heads, 4096, "num_attention_heads"));
  PDS_RETURN_IF_ERROR(at_most(c.num_kv_heads, 4096, "num_key_value_heads"));
  PDS_RETURN_IF_ERROR(at_most(c.head_dim, 1024, "head_dim"));
  if (c.num_heads % c.num_kv_heads != 0) {
    return Invalid(
        source, absl::StrCat("num_attention_heads (", c.num_heads,
                             ") must be a multiple of num_key_value_heads (", c.num_kv_heads, ")"));
  }
  if (c.head_dim % 2 != 0) return Invalid(source, "'head_dim' must be even for RoPE");
  if (c.rms_norm_eps <= 0) return Invalid(source, "'rms_norm_eps' must be positive");
  if (c.rope_theta <= 0) return Invalid(source, "'rope_theta' must be positive");
  for (int32_t id : c.eos_token_ids) {
    if (id >= c.vocab_size) return Invalid(source, "eos_token_id out of vocabulary range");
  }
  if (c.bos_token_id && *c.bos_token_id >= c.vocab_size) {
    return Invalid(source, "bos_token_id out of vocabulary range");
  }
  return c;
}

absl::Status ApplyGenerationConfig(absl::string_view json_text, absl::string_view source,
                                   ModelConfig& config) {
  PDS_ASSIGN_OR_RETURN(json j, ParseObject(json_text, source));
  std::vector<int32_t> bos, eos;
  PDS_RETURN_IF_ERROR(ReadIds(j, source, "bos_token_id", bos));
  PDS_RETURN_IF_ERROR(ReadIds(j, source, "eos_token_id", eos));
  if (!bos.empty()) config.bos_token_id = bos[0];
  for (int32_t id : eos) {
    if (id >= config.vocab_size) return Invalid(source, "eos_token_id out of vocabulary range");
    AddUnique(config.eos_token_ids, id);
  }
  return absl::OkStatus();
}

absl::StatusOr<ModelConfig> LoadModelConfig(const std::string& dir) {
  const std::filesystem::path root(dir);
  const auto config_path = root / "config.json";
  if (!std::filesystem::exists(config_path)) {
    return absl::NotFoundError(absl::StrCat("model directory '", dir, "' has no config.json"));
  }
  PDS_ASSIGN_OR_RETURN(std::string text, ReadFile(config_path));
  PDS_ASSIGN_OR_RETURN(ModelConfig config, ParseModelConfig(text, config_path.string()));
  const auto gen_path = root / "generation_config.json";
  if (std::filesystem::exists(gen_path)) {
    PDS_ASSIGN_OR_RETURN(std::string gen_text, ReadFile(gen_path));
    PDS_RETURN_IF_ERROR(ApplyGenerationConfig(gen_text, gen_path.string(), config));
  }
  return config;
}

std::vector<float> RopeInvFreq(const ModelConfig& config) {
  const int64_t half = config.head_dim / 2;
  std::vector<float> inv_freq(half);
  for (int64_t j = 0; j < half; ++j) {
    // HF computes inv_freq in float32: 1 / theta^(2j/d).
    const float exponent = static_cast<float>(2 * j) / static_cast<float>(config.head_dim);
    double freq = 1.0 / std::pow(config.rope_theta, static_cast<double>(exponent));
    if (config.rope_scaling) {
      const RopeScaling& rs = *config.rope_scaling;
      const double orig = static_cast<double>(rs.original_max_position_embeddings);
      const double low_freq_wavelen = orig / rs.low_freq_factor;
      const double high_freq_wavelen = orig / rs.high_freq_factor;
      const double wavelen = 2.0 * std::numbers::pi / freq;
      if (wavelen > low_freq_wavelen) {
        freq = freq / rs.factor;
      } else if (wavelen >= high_freq_wavelen) {
        const double smooth =
            (orig / wavelen - rs.low_freq_factor) / (rs.high_freq_factor - rs.low_freq_factor);
        freq = (1.0 - smooth) * freq / rs.factor + smooth * freq;
      }
    }
    inv_freq[j] = static_cast<float>(freq);
  }
  return inv_freq;
}

}  // namespace pds::engine

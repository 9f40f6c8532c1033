#include "tests/testing/reference_model.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <nlohmann/json.hpp>
#include <numbers>
#include <optional>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace pds::testing {
namespace {

using json = nlohmann::json;

absl::StatusOr<std::string> ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot open ", path));
  std::string data((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (in.bad()) return absl::InvalidArgumentError(absl::StrCat("error reading ", path));
  return data;
}

absl::StatusOr<json> ReadJson(const std::string& path) {
  absl::StatusOr<std::string> text = ReadFile(path);
  if (!text.ok()) return text.status();
  json j = json::parse(*text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": not a JSON object"));
  }
  return j;
}

// ---- config.json field access (absent or null fields take the default, if any) ----

const json* Field(const json& j, const std::string& key) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return nullptr;
  return &*it;
}

absl::StatusOr<int64_t> GetInt(const json& j, const std::string& key, const std::string& where,
                               std::optional<int64_t> def = std::nullopt) {
  const json* f = Field(j, key);
  if (f == nullptr) {
    if (def.has_value()) return *def;
    return absl::InvalidArgumentError(absl::StrCat(where, ": missing field ", key));
  }
  if (f->is_number_integer()) return f->get<int64_t>();
  if (f->is_number_float()) {
    double d = f->get<double>();
    if (std::isfinite(d) && d == std::floor(d) && std::fabs(d) < 9e15) {
      return static_cast<int64_t>(d);
    }
  }
  return absl::InvalidArgumentError(absl::StrCat(where, ": field ", key, " is not an integer"));
}

absl::StatusOr<double> GetDouble(const json& j, const std::string& key, const std::string& where,
                                 std::optional<double> def = std::nullopt) {
  const json* f = Field(j, key);
  if (f == nullptr) {
    if (def.has_value()) return *def;
    return absl::InvalidArgumentError(absl::StrCat(where, ": missing field ", key));
  }
  if (!f->is_number()) {
    return absl::InvalidArgumentError(absl::StrCat(where, ": field ", key, " is not a number"));
  }
  return f->get<double>();
}

absl::StatusOr<bool> GetBool(const json& j, const std::string& key, const std::string& where,
                             bool def) {
  const json* f = Field(j, key);
  if (f == nullptr) return def;
  if (!f->is_boolean()) {
    return absl::InvalidArgumentError(absl::StrCat(where, ": field ", key, " is not a bool"));
  }
  return f->get<bool>();
}

absl::StatusOr<std::string> GetString(const json& j, const std::string& key,
                                      const std::string& where, const std::string& def) {
  const json* f = Field(j, key);
  if (f == nullptr) return def;
  if (!f->is_string()) {
    return absl::InvalidArgumentError(absl::StrCat(where, ": field ", key, " is not a string"));
  }
  return f->get<std::string>();
}

#define REF_ASSIGN_OR_RETURN(lhs, expr)         \
  auto lhs##_or = (expr);                       \
  if (!lhs##_or.ok()) return lhs##_or.status(); \
  auto lhs = std::move(*lhs##_or)

// ---- safetensors ----

double HalfToDouble(uint16_t h) {
  const int sign = (h >> 15) & 1;
  const int exp = (h >> 10) & 0x1f;
  const int mant = h & 0x3ff;
  double v;
  if (exp == 0) {
    v = std::ldexp(static_cast<double>(mant), -24);  // Zero or subnormal.
  } else if (exp == 31) {
    v = mant == 0 ? std::numeric_limits<double>::infinity()
                  : std::numeric_limits<double>::quiet_NaN();
  } else {
    v = std::ldexp(static_cast<double>(mant + 1024), exp - 25);
  }
  return sign ? -v : v;
}

double FloatBitsToDouble(uint32_t bits) {
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return static_cast<double>(f);
}

uint64_t LoadLe(const unsigned char* p, int bytes) {
  uint64_t v = 0;
  for (int i = bytes - 1; i >= 0; --i) v = (v << 8) | p[i];
  return v;
}

// The parsed header of one .safetensors file.
struct SafetensorsFile {
  std::string path;
  uint64_t data_start = 0;  // Absolute offset of the byte after the header.
  uint64_t data_size = 0;   // Bytes available after the header.
  json header;
};

absl::StatusOr<SafetensorsFile> OpenSafetensors(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot open ", path));
  std::error_code ec;
  const uint64_t file_size = std::filesystem::file_size(path, ec);
  if (ec) return absl::InvalidArgumentError(absl::StrCat("cannot stat ", path));
  unsigned char len_bytes[8];
  if (file_size < 8 || !in.read(reinterpret_cast<char*>(len_bytes), 8)) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": too short for a safetensors header"));
  }
  const uint64_t n = LoadLe(len_bytes, 8);
  if (n > file_size - 8) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": header length ", n, " exceeds file size ", file_size));
  }
  std::string text(n, '\0');
  if (n > 0 && !in.read(text.data(), static_cast<std::streamsize>(n))) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": cannot read header"));
  }
  SafetensorsFile f;
  f.path = path;
  f.data_start = 8 + n;
  f.data_size = file_size - 8 - n;
  f.header = json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (f.header.is_discarded() || !f.header.is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": header is not a JSON object"));
  }
  return f;
}

struct Tensor {
  std::vector<int64_t> shape;
  std::vector<double> data;
};

absl::StatusOr<Tensor> ReadTensor(const SafetensorsFile& f, const std::string& name) {
  const std::string where = absl::StrCat(f.path, ": tensor ", name);
  auto it = f.header.find(name);
  if (name == "__metadata__" || it == f.header.end()) {
    return absl::NotFoundError(absl::StrCat(where, " not found"));
  }
  const json& e = *it;
  if (!e.is_object()) return absl::InvalidArgumentError(absl::StrCat(where, ": bad entry"));
  auto dtype_it = e.find("dtype");
  auto shape_it = e.find("shape");
  auto off_it = e.find("data_offsets");
  if (dtype_it == e.end() || !dtype_it->is_string() || shape_it == e.end() ||
      !shape_it->is_array() || off_it == e.end() || !off_it->is_array() || off_it->size() != 2 ||
      !(*off_it)[0].is_number_unsigned() || !(*off_it)[1].is_number_unsigned()) {
    return absl::InvalidArgumentError(absl::StrCat(where, ": malformed header entry"));
  }
  const std::string dtype = dtype_it->get<std::string>();
  int elem_size;
  if (dtype == "F32") {
    elem_size = 4;
  } else if (dtype == "F16" || dtype == "BF16") {
    elem_size = 2;
  } else if (dtype == "F64") {
    elem_size = 8;
  } else {
    return absl::InvalidArgumentError(absl::StrCat(where, ": unsupported dtype ", dtype));
  }
  Tensor t;
  uint64_t numel = 1;
  for (const json& d : *shape_it) {
    if (!d.is_number_unsigned()) {
      return absl::InvalidArgumentError(absl::StrCat(where, ": bad shape"));
    }
    const uint64_t dim = d.get<uint64_t>();
    if (dim != 0 && numel > (uint64_t{1} << 40) / dim) {
      return absl::InvalidArgumentError(absl::StrCat(where, ": shape too large"));
    }
    numel *= dim;
    t.shape.push_back(static_cast<int64_t>(dim));
  }
  const uint64_t begin = (*off_it)[0].get<uint64_t>();
  const uint64_t end = (*off_it)[1].get<uint64_t>();
  if (begin > end || end > f.data_size || end - begin != numel * elem_size) {
    return absl::InvalidArgumentError(absl::StrCat(where, ": data_offsets [", begin, ", ", end,
                                                   ") do not match dtype ", dtype, ", ", numel,
                                                   " elements and ", f.data_size, " data bytes"));
  }
  std::ifstream in(f.path, std::ios::binary);
  std::vector<unsigned char> raw(end - begin);
  if (!in || !in.seekg(static_cast<std::streamoff>(f.data_start + begin)) ||
      (!raw.empty() &&
       !in.read(reinterpret_cast<char*>(raw.data()), static_cast<std::streamsize>(raw.size())))) {
    return absl::InvalidArgumentError(absl::StrCat(where, ": read failed"));
  }
  t.data.resize(numel);
  for (uint64_t i = 0; i < numel; ++i) {
    const unsigned char* p = raw.data() + i * elem_size;
    if (dtype == "F32") {
      t.data[i] = FloatBitsToDouble(static_cast<uint32_t>(LoadLe(p, 4)));
    } else if (dtype == "F16") {
      t.data[i] = HalfToDouble(static_cast<uint16_t>(LoadLe(p, 2)));
    } else if (dtype == "BF16") {
      t.data[i] = FloatBitsToDouble(static_cast<uint32_t>(LoadLe(p, 2)) << 16);
    } else {
      const uint64_t bits = LoadLe(p, 8);
      double d;
      std::memcpy(&d, &bits, sizeof(d));
      t.data[i] = d;
    }
  }
  return t;
}

// Finds tensors across one or more safetensors files.
class WeightSource {
 public:
  static absl::StatusOr<WeightSource> Open(const std::string& dir) {
    WeightSource s;
    const std::string index_path = dir + "/model.safetensors.index.json";
    if (!std::filesystem::exists(index_path)) {
      REF_ASSIGN_OR_RETURN(f, OpenSafetensors(dir + "/model.safetensors"));
      s.files_.emplace(f.path, std::move(f));
      s.single_ = dir + "/model.safetensors";
      return s;
    }
    REF_ASSIGN_OR_RETURN(index, ReadJson(index_path));
    auto wm = index.find("weight_map");
    if (wm == index.end() || !wm->is_object()) {
      return absl::InvalidArgumentError(absl::StrCat(index_path, ": missing weight_map"));
    }
    for (auto it = wm->begin(); it != wm->end(); ++it) {
      if (!it.value().is_string()) {
        return absl::InvalidArgumentError(
            absl::StrCat(index_path, ": weight_map entry for ", it.key(), " is not a string"));
      }
      const std::string path = dir + "/" + it.value().get<std::string>();
      s.weight_map_[it.key()] = path;
      if (s.files_.count(path) == 0) {
        REF_ASSIGN_OR_RETURN(f, OpenSafetensors(path));
        s.files_.emplace(path, std::move(f));
      }
    }
    s.index_path_ = index_path;
    return s;
  }

  // Reads `name` and checks its shape.
  absl::StatusOr<std::vector<double>> Get(const std::string& name,
                                          const std::vector<int64_t>& shape) const {
    std::string path = single_;
    if (path.empty()) {
      auto it = weight_map_.find(name);
      if (it == weight_map_.end()) {
        return absl::NotFoundError(
            absl::StrCat(index_path_, ": tensor ", name, " not in weight_map"));
      }
      path = it->second;
    }
    REF_ASSIGN_OR_RETURN(t, ReadTensor(files_.at(path), name));
    if (t.shape != shape) {
      return absl::InvalidArgumentError(absl::StrCat(path, ": tensor ", name, " has shape [",
                                                     absl::StrJoin(t.shape, ","), "], expected [",
                                                     absl::StrJoin(shape, ","), "]"));
    }
    return std::move(t.data);
  }

 private:
  std::string single_;  // Set when there is no index.
  std::string index_path_;
  std::map<std::string, std::string> weight_map_;
  std::map<std::string, SafetensorsFile> files_;
};

}  // namespace

absl::StatusOr<ReferenceModel> ReferenceModel::Load(const std::string& dir) {
  const std::string cfg_path = dir + "/config.json";
  REF_ASSIGN_OR_RETURN(cfg, ReadJson(cfg_path));

  std::string arch;
  if (auto a = cfg.find("architectures");
      a != cfg.end() && a->is_array() && !a->empty() && (*a)[0].is_string()) {
    arch = (*a)[0].get<std::string>();
  }
  const bool is_llama = arch == "LlamaForCausalLM";
  const bool is_mistral = arch == "MistralForCausalLM";
  const bool is_qwen2 = arch == "Qwen2ForCausalLM";
  const bool is_qwen3 = arch == "Qwen3ForCausalLM";
  if (!is_llama && !is_mistral && !is_qwen2 && !is_qwen3) {
    return absl::InvalidArgumentError(
        absl::StrCat(cfg_path, ": unsupported architecture '", arch, "'"));
  }

  REF_ASSIGN_OR_RETURN(hidden, GetInt(cfg, "hidden_size", cfg_path));
  REF_ASSIGN_OR_RETURN(inter, GetInt(cfg, "intermediate_size", cfg_path));
  REF_ASSIGN_OR_RETURN(n_layers, GetInt(cfg, "num_hidden_layers", cfg_path));
  REF_ASSIGN_OR_RETURN(n_heads, GetInt(cfg, "num_attention_heads", cfg_path));
  REF_ASSIGN_OR_RETURN(n_kv, GetInt(cfg, "num_key_value_heads", cfg_path, n_heads));
  REF_ASSIGN_OR_RETURN(vocab, GetInt(cfg, "vocab_size", cfg_path));
  REF_ASSIGN_OR_RETURN(eps, GetDouble(cfg, "rms_norm_eps", cfg_path));
  REF_ASSIGN_OR_RETURN(tied, GetBool(cfg, "tie_word_embeddings", cfg_path, false));
  REF_ASSIGN_OR_RETURN(attn_bias, GetBool(cfg, "attention_bias", cfg_path, false));
  REF_ASSIGN_OR_RETURN(mlp_bias, GetBool(cfg, "mlp_bias", cfg_path, false));
  REF_ASSIGN_OR_RETURN(act, GetString(cfg, "hidden_act", cfg_path, "silu"));
  const int64_t kMax = int64_t{1} << 24;
  if (hidden <= 0 || inter <= 0 || n_layers < 0 || n_heads <= 0 || n_kv <= 0 || vocab <= 0 ||
      hidden > kMax || inter > kMax || n_layers > 4096 || n_heads > 4096 || vocab > kMax ||
      n_heads % n_kv != 0) {
    return absl::InvalidArgumentError(absl::StrCat(cfg_path, ": invalid model dimensions"));
  }
  if (n_heads > 0 && hidden % n_heads != 0 && Field(cfg, "head_dim") == nullptr) {
    return absl::InvalidArgumentError(
        absl::StrCat(cfg_path, ": hidden_size not divisible by num_attention_heads"));
  }
  REF_ASSIGN_OR_RETURN(head_dim, GetInt(cfg, "head_dim", cfg_path, hidden / n_heads));
  if (head_dim <= 0 || head_dim % 2 != 0 || head_dim > 65536) {
    return absl::InvalidArgumentError(absl::StrCat(cfg_path, ": invalid head_dim ", head_dim));
  }
  if (act != "silu") {
    return absl::InvalidArgumentError(absl::StrCat(cfg_path, ": unsupported hidden_act ", act));
  }

  // RoPE: rope_theta/rope_scaling, or the newer combined "rope_parameters".
  const json* rope = Field(cfg, "rope_scaling");
  const json* rope_params = Field(cfg, "rope_parameters");
  double theta_default = 10000.0;
  if (rope_params != nullptr && rope_params->is_object()) {
    REF_ASSIGN_OR_RETURN(t, GetDouble(*rope_params, "rope_theta", cfg_path, 10000.0));
    theta_default = t;
    if (rope == nullptr) rope = rope_params;
  }
  REF_ASSIGN_OR_RETURN(theta, GetDouble(cfg, "rope_theta", cfg_path, theta_default));
  std::vector<double> inv_freq(head_dim / 2);
  for (int64_t j = 0; j < head_dim / 2; ++j) {
    inv_freq[j] = 1.0 / std::pow(theta, static_cast<double>(2 * j) / static_cast<double>(head_dim));
  }
  if (rope != nullptr) {
    if (!rope->is_object()) {
      return absl::InvalidArgumentError(absl::StrCat(cfg_path, ": rope_scaling is not an object"));
    }
    REF_ASSIGN_OR_RETURN(type_old, GetString(*rope, "type", cfg_path, "default"));
    REF_ASSIGN_OR_RETURN(type, GetString(*rope, "rope_type", cfg_path, type_old));
    if (type == "llama3") {
      REF_ASSIGN_OR_RETURN(factor, GetDouble(*rope, "factor", cfg_path));
      REF_ASSIGN_OR_RETURN(low, GetDouble(*rope, "low_freq_factor", cfg_path));
      REF_ASSIGN_OR_RETURN(high, GetDouble(*rope, "high_freq_factor", cfg_path));
      REF_ASSIGN_OR_RETURN(orig, GetDouble(*rope, "original_max_position_embeddings", cfg_path));
      const double low_wavelen = orig / low;
      const double high_wavelen = orig / high;
      for (double& f : inv_freq) {
        const double wavelen = 2 * std::numbers::pi / f;
        if (wavelen < high_wavelen) continue;
        if (wavelen > low_wavelen) {
          f = f / factor;
        } else {
          const double smooth = (orig / wavelen - low) / (high - low);
          f = (1 - smooth) * f / factor + smooth * f;
        }
      }
    } else if (type == "linear") {
      REF_ASSIGN_OR_RETURN(factor, GetDouble(*rope, "factor", cfg_path));
      for (double& f : inv_freq) f /= factor;
    } else if (type != "default") {
      return absl::InvalidArgumentError(
          absl::StrCat(cfg_path, ": unsupported rope scaling type ", type));
    }
  }

  // Sliding-window attention (HF semantics: position i sees j with i - window < j <= i).
  std::vector<int> windows(n_layers, 0);
  if (is_mistral) {
    REF_ASSIGN_OR_RETURN(w, GetInt(cfg, "sliding_window", cfg_path, 0));
    for (int& lw : windows) lw = static_cast<int>(std::min<int64_t>(std::max<int64_t>(w, 0), kMax));
  } else if (is_qwen2 || is_qwen3) {
    REF_ASSIGN_OR_RETURN(use_sw, GetBool(cfg, "use_sliding_window", cfg_path, false));
    REF_ASSIGN_OR_RETURN(w, GetInt(cfg, "sliding_window", cfg_path, 0));
    if (use_sw && w > 0) {
      REF_ASSIGN_OR_RETURN(max_window_layers, GetInt(cfg, "max_window_layers", cfg_path, 28));
      const json* types = Field(cfg, "layer_types");
      for (int64_t i = 0; i < n_layers; ++i) {
        bool sliding = i >= max_window_layers;
        if (types != nullptr && types->is_array() &&
            types->size() == static_cast<size_t>(n_layers)) {
          sliding = (*types)[i] == "sliding_attention";
        }
        if (sliding) windows[i] = static_cast<int>(std::min<int64_t>(w, kMax));
      }
    }
  }

  REF_ASSIGN_OR_RETURN(src, WeightSource::Open(dir));
  ReferenceModel m;
  m.vocab_size_ = static_cast<int>(vocab);
  m.hidden_ = static_cast<int>(hidden);
  m.num_heads_ = static_cast<int>(n_heads);
  m.num_kv_heads_ = static_cast<int>(n_kv);
  m.head_dim_ = static_cast<int>(head_dim);
  m.eps_ = eps;
  m.inv_freq_ = std::move(inv_freq);
  m.tied_ = tied;

  auto load_vec = [&](const std::string& name, int64_t n,
                      std::vector<double>* out) -> absl::Status {
    REF_ASSIGN_OR_RETURN(v, src.Get(name, {n}));
    *out = std::move(v);
    return absl::OkStatus();
  };
  auto load_linear = [&](const std::string& prefix, int64_t out, int64_t in, bool bias,
                         Linear* lin) -> absl::Status {
    lin->out = static_cast<int>(out);
    lin->in = static_cast<int>(in);
    REF_ASSIGN_OR_RETURN(w, src.Get(prefix + ".weight", {out, in}));
    lin->w = std::move(w);
    if (bias) return load_vec(prefix + ".bias", out, &lin->b);
    return absl::OkStatus();
  };
#define REF_RETURN_IF_ERROR(expr) \
  if (absl::Status s = (expr); !s.ok()) return s

  REF_ASSIGN_OR_RETURN(embed, src.Get("model.embed_tokens.weight", {vocab, hidden}));
  m.embed_ = std::move(embed);
  const int64_t q_dim = n_heads * head_dim;
  const int64_t kv_dim = n_kv * head_dim;
  const bool qkv_bias = is_qwen2 || ((is_llama || is_qwen3) && attn_bias);
  const bool o_bias = (is_llama || is_qwen3) && attn_bias;
  const bool ffn_bias = is_llama && mlp_bias;
  m.layers_.resize(n_layers);
  for (int64_t i = 0; i < n_layers; ++i) {
    Layer& l = m.layers_[i];
    const std::string p = absl::StrCat("model.layers.", i, ".");
    l.sliding_window = windows[i];
    REF_RETURN_IF_ERROR(load_vec(p + "input_layernorm.weight", hidden, &l.input_norm));
    REF_RETURN_IF_ERROR(
        load_vec(p + "post_attention_layernorm.weight", hidden, &l.post_attention_norm));
    REF_RETURN_IF_ERROR(load_linear(p + "self_attn.q_proj", q_dim, hidden, qkv_bias, &l.q));
    REF_RETURN_IF_ERROR(load_linear(p + "self_attn.k_proj", kv_dim, hidden, qkv_bias, &l.k));
    REF_RETURN_IF_ERROR(load_linear(p + "self_attn.v_proj", kv_dim, hidden, qkv_bias, &l.v));
    REF_RETURN_IF_ERROR(load_linear(p + "self_attn.o_proj", hidden, q_dim, o_bias, &l.o));
    if (is_qwen3) {
      REF_RETURN_IF_ERROR(load_vec(p + "self_attn.q_norm.weight", head_dim, &l.q_norm));
      REF_RETURN_IF_ERROR(load_vec(p + "self_attn.k_norm.weight", head_dim, &l.k_norm));
    }
    REF_RETURN_IF_ERROR(load_linear(p + "mlp.gate_proj", inter, hidden, ffn_bias, &l.gate));
    REF_RETURN_IF_ERROR(load_linear(p + "mlp.up_proj", inter, hidden, ffn_bias, &l.up));
    REF_RETURN_IF_ERROR(load_linear(p + "mlp.down_proj", hidden, inter, ffn_bias, &l.down));
  }
  REF_RETURN_IF_ERROR(load_vec("model.norm.weight", hidden, &m.final_norm_));
  if (!tied) {
    REF_RETURN_IF_ERROR(load_linear("lm_head", vocab, hidden, false, &m.lm_head_));
  }
#undef REF_RETURN_IF_ERROR
  return m;
}

std::vector<double> ReferenceModel::Apply(const Linear& lin, const std::vector<double>& x) {
  std::vector<double> y(lin.out);
  for (int o = 0; o < lin.out; ++o) {
    const double* w = lin.w.data() + static_cast<size_t>(o) * lin.in;
    double acc = 0;
    for (int i = 0; i < lin.in; ++i) acc += w[i] * x[i];
    y[o] = acc + (lin.b.empty() ? 0.0 : lin.b[o]);
  }
  return y;
}

std::vector<double> ReferenceModel::RmsNorm(const std::vector<double>& x,
                                            const std::vector<double>& w, double eps) {
  double ss = 0;
  for (double v : x) ss += v * v;
  const double r = 1.0 / std::sqrt(ss / static_cast<double>(x.size()) + eps);
  std::vector<double> y(x.size());
  for (size_t i = 0; i < x.size(); ++i) y[i] = x[i] * r * w[i];
  return y;
}

void ReferenceModel::Rope(double* x, int pos) const {
  const int half = head_dim_ / 2;
  for (int j = 0; j < half; ++j) {
    const double angle = static_cast<double>(pos) * inv_freq_[j];
    const double c = std::cos(angle);
    const double s = std::sin(angle);
    const double a = x[j];
    const double b = x[j + half];
    x[j] = a * c - b * s;
    x[j + half] = b * c + a * s;
  }
}

std::vector<std::vector<double>> ReferenceModel::Forward(const std::vector<int32_t>& tokens) const {
  const int n = static_cast<int>(tokens.size());
  for (int32_t t : tokens) {
    if (t < 0 || t >= vocab_size_) return {};
  }
  const int hd = head_dim_;
  const int group = num_heads_ / num_kv_heads_;
  const double scale = 1.0 / std::sqrt(static_cast<double>(hd));

  std::vector<std::vector<double>> x(n);
  for (int i = 0; i < n; ++i) {
    const double* e = embed_.data() + static_cast<size_t>(tokens[i]) * hidden_;
    x[i].assign(e, e + hidden_);
  }

  for (const Layer& l : layers_) {
    // Projections, optional per-head q/k norm (Qwen3), then RoPE.
    std::vector<std::vector<double>> q(n), k(n), v(n);
    for (int i = 0; i < n; ++i) {
      const std::vector<double> h = RmsNorm(x[i], l.input_norm, eps_);
      q[i] = Apply(l.q, h);
      k[i] = Apply(l.k, h);
      v[i] = Apply(l.v, h);
      auto per_head = [&](std::vector<double>& t, int heads, const std::vector<double>& norm) {
        for (int hh = 0; hh < heads; ++hh) {
          double* p = t.data() + static_cast<size_t>(hh) * hd;
          if (!norm.empty()) {
            std::vector<double> head(p, p + hd);
            head = RmsNorm(head, norm, eps_);
            std::copy(head.begin(), head.end(), p);
          }
          Rope(p, i);
        }
      };
      per_head(q[i], num_heads_, l.q_norm);
      per_head(k[i], num_kv_heads_, l.k_norm);
    }

    // Causal softmax attention, then o_proj and residual.
    for (int i = 0; i < n; ++i) {
      const int first = l.sliding_window > 0 ? std::max(0, i - l.sliding_window + 1) : 0;
      std::vector<double> attn(static_cast<size_t>(num_heads_) * hd, 0.0);
      for (int hh = 0; hh < num_heads_; ++hh) {
        const int kvh = hh / group;
        const double* qh = q[i].data() + static_cast<size_t>(hh) * hd;
        std::vector<double> scores(i + 1 - first);
        double mx = -std::numeric_limits<double>::infinity();
        for (int j = first; j <= i; ++j) {
          const double* kh = k[j].data() + static_cast<size_t>(kvh) * hd;
          double dot = 0;
          for (int d = 0; d < hd; ++d) dot += qh[d] * kh[d];
          scores[j - first] = dot * scale;
          mx = std::max(mx, scores[j - first]);
        }
        double sum = 0;
        for (double& s : scores) {
          s = std::exp(s - mx);
          sum += s;
        }
        double* out = attn.data() + static_cast<size_t>(hh) * hd;
        for (int j = first; j <= i; ++j) {
          const double p = scores[j - first] / sum;
          const double* vh = v[j].data() + static_cast<size_t>(kvh) * hd;
          for (int d = 0; d < hd; ++d) out[d] += p * vh[d];
        }
      }
      const std::vector<double> o = Apply(l.o, attn);
      for (int d = 0; d < hidden_; ++d) x[i][d] += o[d];
    }

    // MLP: down(silu(gate(h)) * up(h)), residual.
    for (int i = 0; i < n; ++i) {
      const std::vector<double> h = RmsNorm(x[i], l.post_attention_norm, eps_);
      std::vector<double> g = Apply(l.gate, h);
      const std::vector<double> u = Apply(l.up, h);
      for (size_t j = 0; j < g.size(); ++j) g[j] = g[j] / (1.0 + std::exp(-g[j])) * u[j];
      const std::vector<double> dn = Apply(l.down, g);
      for (int d = 0; d < hidden_; ++d) x[i][d] += dn[d];
    }
  }

  std::vector<std::vector<double>> logits(n);
  for (int i = 0; i < n; ++i) {
    const std::vector<double> h = RmsNorm(x[i], final_norm_, eps_);
    if (!tied_) {
      logits[i] = Apply(lm_head_, h);
      continue;
    }
    logits[i].resize(vocab_size_);
    for (int t = 0; t < vocab_size_; ++t) {
      const double* e = embed_.data() + static_cast<size_t>(t) * hidden_;
      double acc = 0;
      for (int d = 0; d < hidden_; ++d) acc += e[d] * h[d];
      logits[i][t] = acc;
    }
  }
  return logits;
}

#undef REF_ASSIGN_OR_RETURN

}  // namespace pds::testing

#include "engine/model/model_writer.h"

#include <cmath>
#include <filesystem>
#include <fstream>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "engine/common/status_macros.h"
#include "engine/model/presets.h"
#include "engine/tokenizer/bpe_builder.h"
#include "nlohmann/json.hpp"

namespace pds::engine {
namespace {

uint64_t Mix(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

uint64_t HashName(const std::string& name, uint64_t seed) {
  uint64_t h = Mix(seed + 0x9e3779b97f4a7c15ull);
  for (unsigned char c : name) h = Mix(h ^ c);
  return h;
}

// Deterministic pseudo-normal values: element i of a tensor depends only on (key, i), so the
// contents do not depend on sharding or chunking.
float Normal(uint64_t key, int64_t i) {
  const uint64_t a = Mix(key ^ Mix(static_cast<uint64_t>(i) * 2 + 1));
  const uint64_t b = Mix(a + 0x632be59bd9b4e019ull);
  const double u1 = (static_cast<double>(a >> 11) + 0.5) * 0x1.0p-53;
  const double u2 = static_cast<double>(b >> 11) * 0x1.0p-53;
  return static_cast<float>(std::sqrt(-2.0 * std::log(u1)) * std::cos(2.0 * M_PI * u2));
}

TensorSpec Gaussian(const std::string& name, std::vector<int64_t> shape, uint64_t seed, float mean,
                    float stddev) {
  TensorSpec spec;
  spec.name = name;
  spec.shape = std::move(shape);
  const uint64_t key = HashName(name, seed);
  spec.fill = [key, mean, stddev](int64_t begin, int64_t n, float* out) {
    for (int64_t i = 0; i < n; ++i) out[i] = mean + stddev * Normal(key, begin + i);
  };
  return spec;
}

absl::Status WriteText(const std::filesystem::path& path, const std::string& text) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out << text;
  out.close();
  if (!out) return absl::InternalError(absl::StrCat("cannot write ", path.string()));
  return absl::OkStatus();
}

}  // namespace

int64_t TensorSpec::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

absl::Status WriteSafetensors(const std::string& path, const std::vector<TensorSpec>& tensors,
                              DType dtype) {
  const size_t esize = DTypeSize(dtype);
  nlohmann::ordered_json header = nlohmann::ordered_json::object();
  header["__metadata__"] = {{"format", "pt"}};
  uint64_t offset = 0;
  for (const TensorSpec& t : tensors) {
    const uint64_t bytes = static_cast<uint64_t>(t.numel()) * esize;
    header[t.name] = {{"dtype", std::string(DTypeName(dtype))},
                      {"shape", t.shape},
                      {"data_offsets", {offset, offset + bytes}}};
    offset += bytes;
  }
  std::string header_text = header.dump();
  while ((header_text.size() + 8) % 8 != 0) header_text.push_back(' ');  // align the data
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  if (!out) return absl::InternalError(absl::StrCat("cannot create ", path));
  const uint64_t len = header_text.size();
  char len_bytes[8];
  for (int i = 0; i < 8; ++i) len_bytes[i] = static_cast<char>((len >> (8 * i)) & 0xff);
  out.write(len_bytes, 8);
  out.write(header_text.data(), static_cast<std::streamsize>(header_text.size()));
  constexpr int64_t kChunk = 1 << 20;
  std::vector<float> values(kChunk);
  std::vector<char> encoded(kChunk * esize);
  for (const TensorSpec& t : tensors) {
    const int64_t n = t.numel();
    for (int64_t begin = 0; begin < n; begin += kChunk) {
      const int64_t count = std::min(kChunk, n - begin);
      t.fill(begin, count, values.data());
      ConvertFromFloat(dtype, values.data(), encoded.data(), count);
      out.write(encoded.data(), static_cast<std::streamsize>(count * esize));
    }
  }
  out.close();
  if (!out) return absl::InternalError(absl::StrCat("cannot write ", path));
  return absl::OkStatus();
}

std::vector<TensorSpec> RandomWeights(const ModelConfig& c, uint64_t seed) {
  const int64_t H = c.hidden_size, Q = c.q_size(), KV = c.kv_size(), I = c.intermediate_size;
  const float in_h = 1.0f / std::sqrt(static_cast<float>(H));
  std::vector<TensorSpec> t;
  t.push_back(Gaussian("model.embed_tokens.weight", {c.vocab_size, H}, seed, 0.0f, 1.0f));
  for (int64_t l = 0; l < c.num_layers; ++l) {
    const std::string p = absl::StrCat("model.layers.", l, ".");
    t.push_back(Gaussian(p + "input_layernorm.weight", {H}, seed, 1.0f, 0.1f));
    t.push_back(Gaussian(p + "self_attn.q_proj.weight", {Q, H}, seed, 0.0f, in_h));
    t.push_back(Gaussian(p + "self_attn.k_proj.weight", {KV, H}, seed, 0.0f, in_h));
    t.push_back(Gaussian(p + "self_attn.v_proj.weight", {KV, H}, seed, 0.0f, in_h));
    if (c.qkv_bias) {
      t.push_back(Gaussian(p + "self_attn.q_proj.bias", {Q}, seed, 0.0f, 0.1f));
      t.push_back(Gaussian(p + "self_attn.k_proj.bias", {KV}, seed, 0.0f, 0.1f));
      t.push_back(Gaussian(p + "self_attn.v_proj.bias", {KV}, seed, 0.0f, 0.1f));
    }
    if (c.qk_norm) {
      t.push_back(Gaussian(p + "self_attn.q_norm.weight", {c.head_dim}, seed, 1.0f, 0.1f));
      t.push_back(Gaussian(p + "self_attn.k_norm.weight", {c.head_dim}, seed, 1.0f, 0.1f));
    }
    t.push_back(Gaussian(p + "self_attn.o_proj.weight", {H, Q}, seed, 0.0f,
                         0.5f / std::sqrt(static_cast<float>(Q))));
    if (c.o_bias) t.push_back(Gaussian(p + "self_attn.o_proj.bias", {H}, seed, 0.0f, 0.1f));
    t.push_back(Gaussian(p + "post_attention_layernorm.weight", {H}, seed, 1.0f, 0.1f));
    t.push_back(Gaussian(p + "mlp.gate_proj.weight", {I, H}, seed, 0.0f, in_h));
    t.push_back(Gaussian(p + "mlp.up_proj.weight", {I, H}, seed, 0.0f, in_h));
    t.push_back(Gaussian(p + "mlp.down_proj.weight", {H, I}, seed, 0.0f,
                         0.5f / std::sqrt(static_cast<float>(I))));
  }
  t.push_back(Gaussian("model.norm.weight", {H}, seed, 1.0f, 0.1f));
  if (!c.tie_word_embeddings) {
    // A peaked output distribution: logits with a spread of a few units.
    t.push_back(Gaussian("lm_head.weight", {c.vocab_size, H}, seed, 0.0f, 3.0f * in_h));
  }
  return t;
}

absl::Status WriteRandomModel(ModelConfig config, const MakeModelOptions& options) {
  namespace fs = std::filesystem;
  const fs::path dir(options.out_dir);
  std::error_code ec;
  fs::create_directories(dir, ec);
  if (ec) {
    return absl::InternalError(absl::StrCat("cannot create ", dir.string(), ": ", ec.message()));
  }
  if (options.write_tokenizer) {
    PDS_ASSIGN_OR_RETURN(
        GeneratedTokenizer tok,
        BuildByteLevelBpeTokenizer(static_cast<int32_t>(config.vocab_size), options.seed));
    config.bos_token_id = tok.bos_id;
    config.eos_token_ids = {tok.eos_id, tok.eot_id};
    PDS_RETURN_IF_ERROR(WriteText(dir / "tokenizer.json", tok.tokenizer_json));
    PDS_RETURN_IF_ERROR(WriteText(dir / "tokenizer_config.json", tok.tokenizer_config_json));
  }
  PDS_RETURN_IF_ERROR(WriteText(dir / "config.json", ConfigJson(config)));
  nlohmann::ordered_json gen;
  if (config.bos_token_id) gen["bos_token_id"] = *config.bos_token_id;
  if (!config.eos_token_ids.empty()) gen["eos_token_id"] = config.eos_token_ids;
  gen["do_sample"] = false;
  PDS_RETURN_IF_ERROR(WriteText(dir / "generation_config.json", gen.dump(2) + "\n"));

  std::vector<TensorSpec> tensors = RandomWeights(config, options.seed);
  const size_t esize = DTypeSize(options.dtype);
  fs::remove(dir / "model.safetensors", ec);
  fs::remove(dir / "model.safetensors.index.json", ec);
  if (options.max_shard_bytes <= 0) {
    return WriteSafetensors((dir / "model.safetensors").string(), tensors, options.dtype);
  }
  // Greedy sharding in tensor order.
  std::vector<std::vector<TensorSpec>> shards(1);
  int64_t in_shard = 0;
  uint64_t total = 0;
  for (TensorSpec& t : tensors) {
    const int64_t bytes = t.numel() * static_cast<int64_t>(esize);
    if (in_shard > 0 && in_shard + bytes > options.max_shard_bytes) {
      shards.emplace_back();
      in_shard = 0;
    }
    in_shard += bytes;
    total += bytes;
    shards.back().push_back(std::move(t));
  }
  nlohmann::ordered_json index;
  index["metadata"] = {{"total_size", total}};
  index["weight_map"] = nlohmann::ordered_json::object();
  for (size_t s = 0; s < shards.size(); ++s) {
    const std::string file =
        absl::StrFormat("model-%05d-of-%05d.safetensors", s + 1, shards.size());
    PDS_RETURN_IF_ERROR(WriteSafetensors((dir / file).string(), shards[s], options.dtype));
    for (const TensorSpec& t : shards[s]) index["weight_map"][t.name] = file;
  }
  return WriteText(dir / "model.safetensors.index.json", index.dump(2) + "\n");
}

}  // namespace pds::engine

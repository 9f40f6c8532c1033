// Broken model directories give clear errors that name the problem, never a crash.
#include <filesystem>
#include <fstream>

#include "engine/backend/cpu_backend.h"
#include "engine/model/transformer.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/testing/test_util.h"

namespace pds::engine {
namespace {

namespace fs = std::filesystem;

std::string ReadAll(const fs::path& p) {
  std::ifstream in(p, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

void WriteAll(const fs::path& p, const std::string& s) {
  std::ofstream out(p, std::ios::binary | std::ios::trunc);
  out << s;
}

// Rewrites the safetensors header of `file` with `edit` applied (keeps the data).
void EditHeader(const fs::path& file, const std::function<void(nlohmann::json&)>& edit) {
  std::string bytes = ReadAll(file);
  uint64_t len = 0;
  for (int i = 7; i >= 0; --i) len = (len << 8) | static_cast<unsigned char>(bytes[i]);
  nlohmann::json header = nlohmann::json::parse(bytes.substr(8, len));
  edit(header);
  std::string text = header.dump();
  while (text.size() % 8 != 0) text.push_back(' ');
  std::string out(8, '\0');
  for (int i = 0; i < 8; ++i) out[i] = static_cast<char>((text.size() >> (8 * i)) & 0xff);
  WriteAll(file, out + text + bytes.substr(8 + len));
}

class ModelLoadingTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto dir = testing::MakeModelDir(testing::SmallTestConfig(), "loading_base", 5);
    ASSERT_TRUE(dir.ok()) << dir.status();
    base_ = *dir;
  }
  // A fresh copy of the good model to break.
  fs::path Copy(const std::string& name) {
    const fs::path dir = fs::path(testing::ScratchDir()) / ("broken_" + name);
    fs::remove_all(dir);
    fs::copy(base_, dir, fs::copy_options::recursive);
    return dir;
  }
  absl::Status Load(const fs::path& dir) {
    CpuBackend backend(1);
    return Transformer::Load(dir.string(), backend).status();
  }
  void ExpectError(const fs::path& dir, absl::StatusCode code,
                   const std::vector<std::string>& fragments) {
    absl::Status s = Load(dir);
    ASSERT_FALSE(s.ok()) << "loading " << dir << " should fail";
    EXPECT_EQ(s.code(), code) << s;
    for (const auto& f : fragments) {
      EXPECT_NE(s.message().find(f), std::string::npos) << "'" << f << "' not in: " << s;
    }
  }
  std::string base_;
};

TEST_F(ModelLoadingTest, GoodModelLoads) { EXPECT_TRUE(Load(base_).ok()); }

TEST_F(ModelLoadingTest, MissingDirectoryOrConfig) {
  ExpectError("/nonexistent/model", absl::StatusCode::kNotFound, {"config.json"});
  auto dir = Copy("no_config");
  fs::remove(dir / "config.json");
  ExpectError(dir, absl::StatusCode::kNotFound, {"config.json"});
}

TEST_F(ModelLoadingTest, MissingWeights) {
  auto dir = Copy("no_weights");
  fs::remove(dir / "model.safetensors");
  ExpectError(dir, absl::StatusCode::kNotFound, {"model.safetensors"});
}

TEST_F(ModelLoadingTest, InvalidJsonConfig) {
  auto dir = Copy("bad_json");
  WriteAll(dir / "config.json", "{\"architectures\": [\"LlamaForCausalLM\", ");
  ExpectError(dir, absl::StatusCode::kInvalidArgument, {"config.json", "invalid JSON"});
}

TEST_F(ModelLoadingTest, UnknownArchitecture) {
  auto dir = Copy("bad_arch");
  auto j = nlohmann::json::parse(ReadAll(dir / "config.json"));
  j["architectures"] = {"GPT2LMHeadModel"};
  WriteAll(dir / "config.json", j.dump());
  ExpectError(dir, absl::StatusCode::kInvalidArgument, {"GPT2LMHeadModel", "unsupported"});
}

TEST_F(ModelLoadingTest, ConfigFieldOfWrongType) {
  auto dir = Copy("bad_field");
  auto j = nlohmann::json::parse(ReadAll(dir / "config.json"));
  j["hidden_size"] = "forty-eight";
  WriteAll(dir / "config.json", j.dump());
  ExpectError(dir, absl::StatusCode::kInvalidArgument, {"hidden_size"});
}

TEST_F(ModelLoadingTest, SizesBeyondAnyModelAreRefusedBeforeAllocating) {
  // Positive but absurd values must be a clear error, not an allocation failure (or overflow)
  // while the model is built.
  for (const auto& [field, value] :
       std::vector<std::pair<std::string, int64_t>>{{"num_hidden_layers", 1000000000000},
                                                    {"head_dim", int64_t{1} << 40},
                                                    {"hidden_size", int64_t{1} << 40},
                                                    {"intermediate_size", int64_t{1} << 40},
                                                    {"num_attention_heads", int64_t{1} << 40}}) {
    auto dir = Copy("huge_" + field);
    auto j = nlohmann::json::parse(ReadAll(dir / "config.json"));
    j[field] = value;
    WriteAll(dir / "config.json", j.dump());
    ExpectError(dir, absl::StatusCode::kInvalidArgument, {"config.json", field, "at most"});
  }
}

TEST_F(ModelLoadingTest, OddHiddenActValuesAreNamedWithoutDumpingThem) {
  auto dir = Copy("odd_act");
  // 200000 nested arrays: printing the value recursively would exhaust the stack.
  std::string nested(200000, '[');
  nested += std::string(200000, ']');
  std::string text = ReadAll(dir / "config.json");
  const size_t brace = text.rfind('}');
  ASSERT_NE(brace, std::string::npos);
  text.insert(brace, ", \"hidden_act\": " + nested);
  WriteAll(dir / "config.json", text);
  ExpectError(dir, absl::StatusCode::kInvalidArgument, {"hidden_act", "array"});
}

TEST_F(ModelLoadingTest, EmptyTensorsOverlapNothing) {
  // An empty tensor's offsets may sit at (or inside) another tensor's bytes.
  auto dir = Copy("empty_tensor");
  EditHeader(dir / "model.safetensors", [](nlohmann::json& h) {
    auto offsets = h["model.norm.weight"]["data_offsets"];
    const uint64_t begin = offsets[0].get<uint64_t>();
    h["extra.empty_a"] = {{"dtype", "F32"}, {"shape", {0}}, {"data_offsets", {begin, begin}}};
    h["extra.empty_b"] = {
        {"dtype", "F32"}, {"shape", {0, 4}}, {"data_offsets", {begin + 8, begin + 8}}};
  });
  const absl::Status loaded = Load(dir);
  EXPECT_TRUE(loaded.ok()) << loaded;
}

TEST_F(ModelLoadingTest, UnsupportedFeaturesAreRefusedByName) {
  const std::vector<std::pair<std::string, nlohmann::json>> edits = {
      {"mlp_bias", true},
      {"hidden_act", "gelu"},
      {"rope_scaling", {{"rope_type", "yarn"}, {"factor", 4.0}}},
  };
  for (const auto& [field, value] : edits) {
    auto dir = Copy("unsupported_" + field);
    auto j = nlohmann::json::parse(ReadAll(dir / "config.json"));
    j[field] = value;
    WriteAll(dir / "config.json", j.dump());
    ExpectError(dir, absl::StatusCode::kInvalidArgument, {"config.json", field});
  }
}

TEST_F(ModelLoadingTest, HeadsNotDivisibleByKvHeads) {
  auto dir = Copy("bad_gqa");
  auto j = nlohmann::json::parse(ReadAll(dir / "config.json"));
  j["num_key_value_heads"] = 3;
  WriteAll(dir / "config.json", j.dump());
  ExpectError(dir, absl::StatusCode::kInvalidArgument, {"num_key_value_heads"});
}

TEST_F(ModelLoadingTest, TruncatedSafetensors) {
  auto dir = Copy("truncated");
  const std::string bytes = ReadAll(dir / "model.safetensors");
  WriteAll(dir / "model.safetensors", bytes.substr(0, bytes.size() / 2));
  ExpectError(dir, absl::StatusCode::kInvalidArgument, {"model.safetensors", "truncated"});
  WriteAll(dir / "model.safetensors", bytes.substr(0, 5));
  ExpectError(dir, absl::StatusCode::kInvalidArgument, {"truncated"});
  WriteAll(dir / "model.safetensors", bytes.substr(0, 20));
  ExpectError(dir, absl::StatusCode::kInvalidArgument, {"truncated"});
}

TEST_F(ModelLoadingTest, OffsetsPastEndOfFile) {
  auto dir = Copy("past_end");
  EditHeader(dir / "model.safetensors", [](nlohmann::json& h) {
    auto& t = h["model.norm.weight"];
    t["data_offsets"] = {1ull << 40, (1ull << 40) + 48 * 4};
  });
  ExpectError(dir, absl::StatusCode::kInvalidArgument, {"model.norm.weight", "past the end"});
}

TEST_F(ModelLoadingTest, OverlappingTensors) {
  auto dir = Copy("overlap");
  EditHeader(dir / "model.safetensors", [](nlohmann::json& h) {
    auto offsets = h["model.layers.0.input_layernorm.weight"]["data_offsets"];
    h["model.norm.weight"]["data_offsets"] = offsets;
  });
  ExpectError(dir, absl::StatusCode::kInvalidArgument, {"overlap"});
}

TEST_F(ModelLoadingTest, WrongShape) {
  auto dir = Copy("wrong_shape");
  EditHeader(dir / "model.safetensors", [](nlohmann::json& h) {
    h["model.norm.weight"]["shape"] = {6, 8};  // same bytes, wrong shape
  });
  ExpectError(dir, absl::StatusCode::kInvalidArgument,
              {"model.safetensors", "model.norm.weight", "[6, 8]", "expected [48]"});
}

TEST_F(ModelLoadingTest, ShapeThatDoesNotMatchItsBytes) {
  auto dir = Copy("shape_bytes");
  EditHeader(dir / "model.safetensors",
             [](nlohmann::json& h) { h["model.norm.weight"]["shape"] = {49}; });
  ExpectError(dir, absl::StatusCode::kInvalidArgument, {"model.norm.weight", "do not match"});
}

TEST_F(ModelLoadingTest, UnsupportedDtype) {
  auto dir = Copy("wrong_dtype");
  EditHeader(dir / "model.safetensors", [](nlohmann::json& h) {
    h["model.norm.weight"]["dtype"] = "I32";  // same element size as F32
  });
  ExpectError(dir, absl::StatusCode::kInvalidArgument, {"model.norm.weight", "I32"});
  EditHeader(dir / "model.safetensors",
             [](nlohmann::json& h) { h["model.norm.weight"]["dtype"] = "Q4_K"; });
  ExpectError(dir, absl::StatusCode::kInvalidArgument, {"model.norm.weight", "unknown dtype"});
}

TEST_F(ModelLoadingTest, MissingTensor) {
  auto dir = Copy("missing_tensor");
  EditHeader(dir / "model.safetensors",
             [](nlohmann::json& h) { h.erase("model.layers.1.mlp.up_proj.weight"); });
  ExpectError(dir, absl::StatusCode::kNotFound, {"model.layers.1.mlp.up_proj.weight"});
}

TEST_F(ModelLoadingTest, ShardIndexNamingAMissingFileOrTensor) {
  ModelConfig config = testing::SmallTestConfig();
  auto dir = testing::MakeModelDir(config, "loading_sharded", 5, DType::kBF16, 20000);
  ASSERT_TRUE(dir.ok()) << dir.status();
  EXPECT_TRUE(Load(*dir).ok());
  const fs::path index = fs::path(*dir) / "model.safetensors.index.json";
  const auto original = nlohmann::json::parse(ReadAll(index));
  auto j = original;
  j["weight_map"]["model.norm.weight"] = "model-00099-of-00099.safetensors";
  WriteAll(index, j.dump());
  ExpectError(*dir, absl::StatusCode::kNotFound, {"model-00099-of-00099.safetensors"});
  j = original;
  j["weight_map"]["model.ghost.weight"] = original["weight_map"].begin().value();
  WriteAll(index, j.dump());
  absl::Status s = Load(*dir);
  EXPECT_FALSE(s.ok());
  EXPECT_NE(s.message().find("model.ghost.weight"), std::string::npos) << s;
}

}  // namespace
}  // namespace pds::engine

// The CPU engine against an independent float64 reference forward pass (tests/testing/
// reference_model.cc shares no code with the engine) on tiny random models of every
// supported variant.
#include <algorithm>
#include <cmath>
#include <memory>

#include "engine/backend/cpu_backend.h"
#include "engine/model/transformer.h"
#include "engine/runtime/llm_engine.h"
#include "gtest/gtest.h"
#include "tests/testing/reference_model.h"
#include "tests/testing/test_util.h"

namespace pds::engine {
namespace {

struct Variant {
  std::string name;
  std::function<void(ModelConfig&)> edit;
  DType dtype = DType::kF32;
  int64_t shard_bytes = 0;
};

std::vector<Variant> Variants() {
  return {
      {"llama_gqa", [](ModelConfig&) {}},
      {"llama_mha", [](ModelConfig& c) { c.num_kv_heads = c.num_heads; }},
      {"llama_gqa8_headdim",
       [](ModelConfig& c) {
         c.num_heads = 8;
         c.num_kv_heads = 1;
         c.head_dim = 8;  // q size 64 != hidden 48
       }},
      {"llama_attention_bias", [](ModelConfig& c) { c.qkv_bias = c.o_bias = true; }},
      {"mistral",
       [](ModelConfig& c) {
         c.architecture_name = "MistralForCausalLM";
         c.architecture = Architecture::kMistral;
         c.sliding_window = 4096;
       }},
      {"qwen2_bias",
       [](ModelConfig& c) {
         c.architecture_name = "Qwen2ForCausalLM";
         c.architecture = Architecture::kQwen2;
         c.qkv_bias = true;
         c.rope_theta = 1000000.0;
       }},
      {"qwen3_qk_norm",
       [](ModelConfig& c) {
         c.architecture_name = "Qwen3ForCausalLM";
         c.architecture = Architecture::kQwen3;
         c.qk_norm = true;
         c.head_dim = 16;
         c.rms_norm_eps = 1e-6;
       }},
      {"tied_embeddings", [](ModelConfig& c) { c.tie_word_embeddings = true; }},
      {"llama3_rope_scaling",
       [](ModelConfig& c) {
         RopeScaling rs;
         rs.factor = 8.0;
         rs.low_freq_factor = 1.0;
         rs.high_freq_factor = 4.0;
         rs.original_max_position_embeddings = 256;
         c.rope_scaling = rs;
       }},
      {"odd_sizes",
       [](ModelConfig& c) {
         c.vocab_size = 277;
         c.hidden_size = 36;
         c.intermediate_size = 77;
         c.num_layers = 3;
         c.num_heads = 3;
         c.num_kv_heads = 1;
         c.head_dim = 12;
       }},
      {"f16_weights", [](ModelConfig&) {}, DType::kF16},
      {"bf16_weights", [](ModelConfig&) {}, DType::kBF16},
      {"sharded", [](ModelConfig&) {}, DType::kF32, 24000},
  };
}

void PrintTo(const Variant& v, std::ostream* os) { *os << v.name; }

class ReferenceParityTest : public ::testing::TestWithParam<Variant> {};

std::vector<int32_t> RandomTokens(int n, int64_t vocab, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<int32_t> ids(n);
  for (auto& id : ids) id = static_cast<int32_t>(rng() % vocab);
  return ids;
}

::testing::AssertionResult LogitsMatch(const std::vector<float>& engine,
                                       const std::vector<double>& reference) {
  double scale = 0.0;
  for (double v : reference) scale = std::max(scale, std::abs(v));
  return testing::AllClose(engine, reference, 1e-4, 1e-4 * scale);
}

TEST_P(ReferenceParityTest, LogitsAndGreedyTokensMatchFloat64Reference) {
  const Variant& v = GetParam();
  ModelConfig config = testing::SmallTestConfig();
  v.edit(config);
  auto dir = testing::MakeModelDir(config, "parity_" + v.name, 7, v.dtype, v.shard_bytes);
  ASSERT_TRUE(dir.ok()) << dir.status();
  auto reference = testing::ReferenceModel::Load(*dir);
  ASSERT_TRUE(reference.ok()) << reference.status();
  CpuBackend backend(1);
  auto model = Transformer::Load(*dir, backend);
  ASSERT_TRUE(model.ok()) << model.status();
  const int64_t vocab = config.vocab_size;

  const std::vector<int32_t> prompt = RandomTokens(13, vocab, 42);
  const auto ref_logits = reference->Forward(prompt);
  ASSERT_EQ(ref_logits.size(), prompt.size());

  // One prefill of the whole prompt: logits of the last position.
  auto cache = KvCache::Create(backend, (*model)->CacheShape(8, 4));
  ASSERT_TRUE(cache.ok()) << cache.status();
  {
    BlockTable table;
    ASSERT_TRUE(table.Reserve(prompt.size(), 4, cache->allocator()).ok());
    SequenceInput in{prompt, 0, &table};
    std::vector<float> logits;
    ASSERT_TRUE((*model)->Forward({&in, 1}, *cache, logits).ok());
    EXPECT_TRUE(LogitsMatch(logits, ref_logits.back())) << "prefill, last position";
    ASSERT_TRUE(table.Release(cache->allocator()).ok());
  }
  // Token by token (decode path): logits of every position.
  {
    BlockTable table;
    for (size_t i = 0; i < prompt.size(); ++i) {
      ASSERT_TRUE(table.Reserve(i + 1, 4, cache->allocator()).ok());
      SequenceInput in{std::span<const int32_t>(&prompt[i], 1), static_cast<int32_t>(i), &table};
      std::vector<float> logits;
      ASSERT_TRUE((*model)->Forward({&in, 1}, *cache, logits).ok());
      EXPECT_TRUE(LogitsMatch(logits, ref_logits[i])) << "decode, position " << i;
    }
    ASSERT_TRUE(table.Release(cache->allocator()).ok());
  }
  // Greedy generation: the engine's tokens equal the reference's argmax, re-run in full.
  auto engine = LlmEngine::Create(**model, EngineOptions{.block_size = 4, .num_blocks = 16});
  ASSERT_TRUE(engine.ok()) << engine.status();
  GenerateRequest request;
  request.prompt = prompt;
  request.params.max_tokens = 8;
  request.params.ignore_eos = true;
  auto results = (*engine)->Generate({request});
  ASSERT_TRUE(results.ok()) << results.status();
  const auto& generated = (*results)[0].token_ids;
  ASSERT_EQ(generated.size(), 8u);
  std::vector<int32_t> context = prompt;
  for (int32_t token : generated) {
    const auto all = reference->Forward(context);
    const std::vector<double>& last = all.back();
    std::vector<double> sorted = last;
    std::partial_sort(sorted.begin(), sorted.begin() + 2, sorted.end(), std::greater<>());
    const int32_t argmax =
        static_cast<int32_t>(std::max_element(last.begin(), last.end()) - last.begin());
    if (sorted[0] - sorted[1] < 1e-3) break;  // a near-tie: float error may pick either
    ASSERT_EQ(token, argmax) << "at generated position " << context.size() - prompt.size();
    context.push_back(token);
  }
  EXPECT_GE(context.size() - prompt.size(), 4u) << "too many near-ties to compare greedy tokens";
}

INSTANTIATE_TEST_SUITE_P(Variants, ReferenceParityTest, ::testing::ValuesIn(Variants()),
                         [](const auto& info) { return info.param.name; });

}  // namespace
}  // namespace pds::engine

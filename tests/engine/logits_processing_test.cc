// Logits processing (SamplingParams: penalties, logit_bias, min_tokens, min_p): each step's
// processed row equals an independent application of the rules to the model's raw logits for
// the same context, the drawn token follows from it, and every knob has its effect.
#include <algorithm>
#include <cmath>
#include <limits>
#include <map>
#include <memory>
#include <random>
#include <set>

#include "engine/backend/cpu_backend.h"
#include "engine/model/transformer.h"
#include "engine/runtime/llm_engine.h"
#include "gtest/gtest.h"
#include "tests/testing/test_util.h"

namespace pds::engine {
namespace {

class LogitsProcessingTest : public ::testing::Test {
 protected:
  void SetUp() override {
    config_ = testing::SmallTestConfig();
    backend_ = std::make_unique<CpuBackend>(1);
    auto model = Transformer::CreateRandom(config_, *backend_, 9);
    ASSERT_TRUE(model.ok()) << model.status();
    model_ = std::move(*model);
  }
  GenerateResult Run(GenerateRequest r) {
    auto engine = LlmEngine::Create(*model_, {.block_size = 16, .num_blocks = 64});
    EXPECT_TRUE(engine.ok()) << engine.status();
    if (r.id.empty()) r.id = "r";
    auto result = (*engine)->Generate({r});
    EXPECT_TRUE(result.ok()) << result.status();
    return result.ok() ? (*result)[0] : GenerateResult();
  }
  // The model's raw logits after `context` (a one-token request of it).
  std::vector<float> Raw(const std::vector<int32_t>& context) {
    GenerateRequest r;
    r.prompt = context;
    r.params.max_tokens = 1;
    r.params.ignore_eos = true;
    r.return_logits = true;
    return Run(r).logits.at(0);
  }
  std::vector<int32_t> Prompt(int n, uint32_t seed) {
    std::mt19937 rng(seed);
    std::vector<int32_t> p;
    for (int i = 0; i < n; ++i) p.push_back(static_cast<int32_t>(rng() % 40));  // repeats
    return p;
  }

  ModelConfig config_;
  std::unique_ptr<CpuBackend> backend_;
  std::unique_ptr<Transformer> model_;
};

// The rules, written from SamplingParams' description.
std::vector<float> Reference(std::vector<float> row, const SamplingParams& p,
                             const std::vector<int32_t>& prompt, const std::vector<int32_t>& reply,
                             const std::vector<int32_t>& eos) {
  constexpr float kNever = -std::numeric_limits<float>::infinity();
  if (!p.allowed_token_ids.empty()) {
    const std::set<int32_t> allowed(p.allowed_token_ids.begin(), p.allowed_token_ids.end());
    for (size_t t = 0; t < row.size(); ++t) {
      if (!allowed.contains(static_cast<int32_t>(t))) row[t] = kNever;
    }
  }
  if (static_cast<int32_t>(reply.size()) < p.min_tokens) {
    for (int32_t t : eos) row[t] = kNever;
    for (int32_t t : p.stop_token_ids) row[t] = kNever;
  }
  for (const auto& [id, bias] : p.logit_bias) row[id] += bias;
  std::set<int32_t> seen(prompt.begin(), prompt.end());
  seen.insert(reply.begin(), reply.end());
  for (int32_t t : seen) {
    if (p.repetition_penalty != 1.0f) {
      row[t] = row[t] > 0 ? row[t] / p.repetition_penalty : row[t] * p.repetition_penalty;
    }
  }
  std::map<int32_t, int> counts;
  for (int32_t t : reply) ++counts[t];
  for (const auto& [t, c] : counts) row[t] -= p.frequency_penalty * c + p.presence_penalty;
  if (p.min_p > 0 && p.temperature > 0) {
    const float max = *std::max_element(row.begin(), row.end());
    for (float& l : row) {
      if (std::exp((l - max) / p.temperature) < p.min_p) l = kNever;
    }
  }
  return row;
}

TEST_F(LogitsProcessingTest, EachStepsRowIsTheRulesAppliedToTheRawLogits) {
  for (int variant = 0; variant < 6; ++variant) {
    GenerateRequest r;
    r.prompt = Prompt(24, variant);
    r.params.max_tokens = 10;
    r.params.ignore_eos = true;
    r.return_logits = true;
    SamplingParams& p = r.params;
    p.repetition_penalty = variant == 0 ? 1.3f : variant == 1 ? 0.8f : 1.0f;
    p.frequency_penalty = variant == 2 ? 0.7f : variant == 3 ? -0.4f : 0.0f;
    p.presence_penalty = variant >= 2 ? 0.5f : 0.0f;
    p.logit_bias = {{5, 2.5f}, {7, -3.0f}};
    if (variant == 3 || variant == 5) {
      p.temperature = 0.8f;
      p.seed = 4;
      p.min_p = 0.05f;
    }
    if (variant >= 4) p.allowed_token_ids = {3, 5, 7, 11, 20, 33, 5};  // (a repeat is harmless)
    const GenerateResult got = Run(r);
    ASSERT_EQ(got.token_ids.size(), 10u);
    std::vector<int32_t> context = r.prompt, reply;
    for (size_t k = 0; k < got.token_ids.size(); ++k) {
      const std::vector<float> want = Reference(Raw(context), p, r.prompt, reply, {});
      ASSERT_EQ(got.logits[k].size(), want.size());
      for (size_t t = 0; t < want.size(); ++t) {
        if (std::isinf(want[t])) {
          EXPECT_TRUE(std::isinf(got.logits[k][t])) << "variant " << variant << " step " << k;
        } else {
          EXPECT_NEAR(got.logits[k][t], want[t], 2e-3f * (1 + std::abs(want[t])))
              << "variant " << variant << " step " << k << " token " << t;
        }
      }
      if (p.temperature == 0) {
        EXPECT_EQ(got.token_ids[k], std::max_element(got.logits[k].begin(), got.logits[k].end()) -
                                        got.logits[k].begin());
      } else {
        EXPECT_FALSE(std::isinf(got.logits[k][got.token_ids[k]]));  // min_p kept it
      }
      if (!p.allowed_token_ids.empty()) {
        EXPECT_NE(
            std::find(p.allowed_token_ids.begin(), p.allowed_token_ids.end(), got.token_ids[k]),
            p.allowed_token_ids.end());
      }
      context.push_back(got.token_ids[k]);
      reply.push_back(got.token_ids[k]);
    }
  }
}

TEST_F(LogitsProcessingTest, KnobsHaveTheirEffect) {
  const std::vector<int32_t> prompt = Prompt(16, 1);
  // A +100 bias: that token every time; -100 on the greedy choice: never it.
  GenerateRequest r;
  r.prompt = prompt;
  r.params.max_tokens = 8;
  r.params.ignore_eos = true;
  const GenerateResult plain = Run(r);
  r.params.logit_bias = {{11, 100.0f}};
  for (int32_t t : Run(r).token_ids) EXPECT_EQ(t, 11);
  r.params.logit_bias = {{plain.token_ids[0], -100.0f}};
  for (int32_t t : Run(r).token_ids) EXPECT_NE(t, plain.token_ids[0]);
  // min_tokens: EOS (biased to win) and stop tokens wait for it.
  const int32_t eos = config_.eos_token_ids.at(0);
  r.params.ignore_eos = false;
  r.params.logit_bias = {{eos, 100.0f}};
  r.params.min_tokens = 5;
  GenerateResult ended = Run(r);
  ASSERT_EQ(ended.token_ids.size(), 6u);
  EXPECT_EQ(ended.token_ids.back(), eos);
  EXPECT_EQ(ended.finish, FinishReason::kStop);
  r.params.logit_bias = {{9, 100.0f}};
  r.params.stop_token_ids = {9};
  ended = Run(r);
  ASSERT_EQ(ended.token_ids.size(), 6u);
  EXPECT_EQ(ended.token_ids.back(), 9);
  // A strong frequency penalty: no token three times in 12 greedy tokens.
  r = GenerateRequest();
  r.prompt = prompt;
  r.params.max_tokens = 12;
  r.params.ignore_eos = true;
  r.params.frequency_penalty = 2.0f;
  r.params.presence_penalty = 2.0f;
  std::map<int32_t, int> counts;
  for (int32_t t : Run(r).token_ids) EXPECT_LT(++counts[t], 3) << t;
  // min_p 1 with sampling: only the likeliest token, as greedy.
  r = GenerateRequest();
  r.prompt = prompt;
  r.params.max_tokens = 8;
  r.params.ignore_eos = true;
  r.params.temperature = 1.5f;
  r.params.min_p = 1.0f;
  r.params.seed = 3;
  EXPECT_EQ(Run(r).token_ids, plain.token_ids);
}

// Under a constraint, min_p counts from the likeliest token the constraint allows (the mask
// comes first): min_p 1 then draws the constrained greedy reply, whatever the temperature.
TEST_F(LogitsProcessingTest, MinPCountsFromTheLikeliestAllowedToken) {
  std::vector<std::string> bytes;
  std::vector<bool> usable;
  for (int64_t id = 0; id < config_.vocab_size; ++id) {
    bytes.push_back(id < 256 ? std::string(1, static_cast<char>(id)) : "x");
    usable.push_back(id > 0 && id < 256);
  }
  auto vocab = std::make_shared<TokenVocabulary>(std::move(bytes), std::move(usable),
                                                 std::vector<int32_t>{0});
  auto run = [&](float temperature, float min_p) {
    auto engine = LlmEngine::Create(*model_, {.block_size = 16, .num_blocks = 64});
    EXPECT_TRUE(engine.ok());
    (*engine)->set_token_vocabulary(vocab);
    GenerateRequest r;
    r.id = "c";
    r.prompt = Prompt(12, 5);
    r.params.max_tokens = 12;
    r.params.regex = "[0-9]{3}-[a-f]{4}";
    r.params.temperature = temperature;
    r.params.min_p = min_p;
    r.params.seed = 8;
    auto result = (*engine)->Generate({r});
    EXPECT_TRUE(result.ok()) << result.status();
    std::string text;
    for (int32_t t : (*result)[0].token_ids) text += static_cast<char>(t);
    return text;
  };
  const std::string greedy = run(0.0f, 0.0f);
  EXPECT_EQ(greedy.size(), 8u) << greedy;
  EXPECT_EQ(run(1.5f, 1.0f), greedy);
}

// Prompt logprobs: entry i is prompt token i + 1's log-softmax in the raw logits after the
// tokens before it, with the top k there; the same in one step, in chunks of 5 tokens beside
// another request, and when the prompt's blocks are already cached (they are computed again).
TEST_F(LogitsProcessingTest, PromptLogprobsAreThoseOfTheRawLogitsBeforeEachToken) {
  const std::vector<int32_t> prompt = Prompt(37, 11);
  std::vector<TokenLogprobs> want;
  for (size_t p = 1; p < prompt.size(); ++p) {
    const std::vector<float> raw = Raw(std::vector<int32_t>(prompt.begin(), prompt.begin() + p));
    TokenLogprobs lp;
    lp.logprob = kernels::cpu::LogProb(raw.data(), config_.vocab_size, prompt[p]);
    lp.top = kernels::cpu::TopLogProbs(raw.data(), config_.vocab_size, 3);
    lp.rank = 1 + static_cast<int32_t>(std::count_if(raw.begin(), raw.end(),
                                                     [&](float v) { return v > raw[prompt[p]]; }));
    want.push_back(std::move(lp));
  }
  auto check = [&](const std::vector<TokenLogprobs>& got, const std::string& what) {
    ASSERT_EQ(got.size(), want.size()) << what;
    for (size_t i = 0; i < want.size(); ++i) {
      EXPECT_NEAR(got[i].logprob, want[i].logprob, 2e-4f) << what << " entry " << i;
      EXPECT_NEAR(got[i].rank, want[i].rank, 1) << what << " entry " << i;  // (near-ties)
      ASSERT_EQ(got[i].top.size(), 3u) << what;
      for (size_t k = 0; k < 3; ++k) {
        EXPECT_EQ(got[i].top[k].first, want[i].top[k].first) << what << " entry " << i;
        EXPECT_NEAR(got[i].top[k].second, want[i].top[k].second, 2e-4f) << what;
      }
    }
  };
  for (const int32_t budget : {2048, 5}) {
    auto engine = LlmEngine::Create(
        *model_, {.block_size = 16, .num_blocks = 64, .max_batch_tokens = budget});
    ASSERT_TRUE(engine.ok()) << engine.status();
    GenerateRequest r;
    r.id = "p";
    r.prompt = prompt;
    r.params.max_tokens = 3;
    r.params.ignore_eos = true;
    r.params.prompt_logprobs = 3;
    GenerateRequest other;  // shares the steps (and, the second time, the cached blocks)
    other.id = "o";
    other.prompt = prompt;
    other.params.max_tokens = 4;
    other.params.ignore_eos = true;
    auto first = (*engine)->Generate({other, r});  // (r's rows after other's in the batch)
    ASSERT_TRUE(first.ok()) << first.status();
    check((*first)[1].prompt_logprobs, absl::StrCat("budget ", budget));
    EXPECT_TRUE((*first)[0].prompt_logprobs.empty());
    auto again = (*engine)->Generate({r});  // its blocks are cached now
    ASSERT_TRUE(again.ok()) << again.status();
    check((*again)[0].prompt_logprobs, absl::StrCat("budget ", budget, ", cached"));
    EXPECT_EQ((*again)[0].token_ids, (*first)[1].token_ids);
  }
  // A pool too small for three such requests at once: sequences are preempted and computed
  // again; each still gets its prompt logprobs once, whole.
  auto engine = LlmEngine::Create(
      *model_,
      {.block_size = 16, .num_blocks = 7, .max_batch_tokens = 16, .prefix_caching = false});
  ASSERT_TRUE(engine.ok()) << engine.status();
  std::vector<GenerateRequest> three;
  for (int i = 0; i < 3; ++i) {
    GenerateRequest r;
    r.id = absl::StrCat("t", i);
    r.prompt = prompt;
    r.params.max_tokens = 40;  // 77 tokens: 5 blocks each, 7 in all
    r.params.ignore_eos = true;
    r.params.prompt_logprobs = 3;
    three.push_back(r);
  }
  auto crowded = (*engine)->Generate(three);
  ASSERT_TRUE(crowded.ok()) << crowded.status();
  EXPECT_GT((*engine)->num_preemptions(), 0);
  for (int i = 0; i < 3; ++i) check((*crowded)[i].prompt_logprobs, absl::StrCat("crowded ", i));
}

TEST_F(LogitsProcessingTest, BadValuesAreRefusedByName) {
  const int64_t vocab = config_.vocab_size;
  auto check = [&](auto set, const char* name) {
    SamplingParams p;
    set(p);
    const absl::Status s = p.Validate(vocab);
    EXPECT_TRUE(absl::IsInvalidArgument(s)) << name;
    EXPECT_NE(std::string(s.message()).find(name), std::string::npos) << s;
  };
  check([](SamplingParams& p) { p.presence_penalty = 2.5f; }, "presence_penalty");
  check([](SamplingParams& p) { p.frequency_penalty = -3; }, "frequency_penalty");
  check([](SamplingParams& p) { p.repetition_penalty = 0; }, "repetition_penalty");
  check([](SamplingParams& p) { p.min_p = 1.5f; }, "min_p");
  check(
      [&](SamplingParams& p) {
        p.logit_bias = {{static_cast<int32_t>(vocab), 1.0f}};
      },
      "logit_bias");
  check([](SamplingParams& p) { p.logit_bias = {{1, 101.0f}}; }, "logit_bias");
  check([](SamplingParams& p) { p.min_tokens = 17; }, "min_tokens");  // max_tokens 16
  check(
      [](SamplingParams& p) {
        p.min_tokens = 2;
        p.regex = "a+";
      },
      "min_tokens");
  check([](SamplingParams& p) { p.presence_penalty = std::nanf(""); }, "presence_penalty");
  check([](SamplingParams& p) { p.logit_bias = {{3, 1.0f}, {3, 2.0f}}; }, "logit_bias");
  check(
      [&](SamplingParams& p) {
        p.allowed_token_ids = {1, static_cast<int32_t>(vocab)};
      },
      "allowed_token_ids");
  check([](SamplingParams& p) { p.allowed_token_ids = {-1}; }, "allowed_token_ids");
  check([](SamplingParams& p) { p.prompt_logprobs = 21; }, "prompt_logprobs");
  check(
      [](SamplingParams& p) {
        p.allowed_token_ids = {1, 2};
        p.json_schema = "{}";
      },
      "allowed_token_ids");
  // With min_tokens, a token that is neither EOS nor a stop token must be allowed.
  SamplingParams p;
  p.allowed_token_ids = {2, 9};
  p.stop_token_ids = {9};
  p.min_tokens = 1;
  const std::vector<int32_t> eos = {2};
  EXPECT_TRUE(absl::IsInvalidArgument(p.Validate(vocab, eos))) << p.Validate(vocab, eos);
  p.ignore_eos = true;  // EOS is an ordinary token then
  EXPECT_TRUE(p.Validate(vocab, eos).ok());
  p.ignore_eos = false;
  p.allowed_token_ids.push_back(4);
  EXPECT_TRUE(p.Validate(vocab, eos).ok());
}

}  // namespace
}  // namespace pds::engine

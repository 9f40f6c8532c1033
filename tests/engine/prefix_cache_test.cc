// Automatic prefix caching: sequences that start from K/V an earlier sequence computed give the
// tokens and logits of an engine without the cache, compute only what is not cached, and
// return every block.
#include <map>
#include <memory>
#include <random>

#include "engine/backend/cpu_backend.h"
#include "engine/model/transformer.h"
#include "engine/runtime/llm_engine.h"
#include "gtest/gtest.h"
#include "tests/testing/test_util.h"

namespace pds::engine {
namespace {

class PrefixCacheEngineTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ModelConfig config = testing::SmallTestConfig();
    config.num_layers = 3;
    auto dir = testing::MakeModelDir(config, "prefix_cache", 5);
    ASSERT_TRUE(dir.ok()) << dir.status();
    backend_ = std::make_unique<CpuBackend>(1);
    auto model = Transformer::Load(*dir, *backend_);
    ASSERT_TRUE(model.ok()) << model.status();
    model_ = std::move(*model);
    vocab_ = config.vocab_size;
  }

  std::vector<int32_t> RandomTokens(int n, uint64_t seed) const {
    std::mt19937_64 rng(seed);
    std::vector<int32_t> t(n);
    for (int32_t& v : t) v = static_cast<int32_t>(rng() % vocab_);
    return t;
  }

  static GenerateRequest Request(const std::string& id, std::vector<int32_t> prompt,
                                 int max_tokens = 5) {
    GenerateRequest r;
    r.id = id;
    r.prompt = std::move(prompt);
    r.params.max_tokens = max_tokens;
    r.params.ignore_eos = true;
    r.return_logits = true;
    return r;
  }

  static std::vector<int32_t> Concat(std::vector<int32_t> a, const std::vector<int32_t>& b) {
    a.insert(a.end(), b.begin(), b.end());
    return a;
  }

  // Runs each wave of requests to completion, one wave after the other, on one engine.
  struct Run {
    std::map<std::string, GenerateResult> results;
    int64_t hit_tokens = 0;
    int64_t query_tokens = 0;
    int64_t evictions = 0;
  };
  Run RunWaves(EngineOptions options, const std::vector<std::vector<GenerateRequest>>& waves) {
    Run run;
    auto engine = LlmEngine::Create(*model_, options);
    EXPECT_TRUE(engine.ok()) << engine.status();
    if (!engine.ok()) return run;
    for (const auto& wave : waves) {
      auto results = (*engine)->Generate(wave);
      EXPECT_TRUE(results.ok()) << results.status();
      if (!results.ok()) return run;
      for (GenerateResult& r : *results) run.results[r.request_id] = std::move(r);
    }
    EXPECT_EQ((*engine)->num_free_blocks(), (*engine)->cache().allocator().num_blocks())
        << "every block is returned (cached ones count as free)";
    run.hit_tokens = (*engine)->num_prefix_hit_tokens();
    run.query_tokens = (*engine)->num_prefix_query_tokens();
    run.evictions = (*engine)->cache().allocator().num_evictions();
    return run;
  }

  // The cached run's tokens equal the uncached run's, logits within float rounding.
  static void ExpectSameOutputs(const Run& cached, const Run& plain) {
    ASSERT_EQ(cached.results.size(), plain.results.size());
    for (const auto& [id, expected] : plain.results) {
      const GenerateResult& got = cached.results.at(id);
      EXPECT_EQ(got.token_ids, expected.token_ids) << id;
      ASSERT_EQ(got.logits.size(), expected.logits.size()) << id;
      for (size_t t = 0; t < got.logits.size(); ++t) {
        double scale = 0;
        for (float v : expected.logits[t]) scale = std::max<double>(scale, std::abs(v));
        EXPECT_TRUE(testing::AllClose(got.logits[t], expected.logits[t], 1e-5, 1e-5 * scale))
            << id << " token " << t;
      }
    }
  }

  // Runs the waves with and without the cache and compares them; returns the cached run.
  Run CompareWithUncached(EngineOptions options,
                          const std::vector<std::vector<GenerateRequest>>& waves) {
    options.prefix_caching = false;
    Run plain = RunWaves(options, waves);
    EXPECT_EQ(plain.hit_tokens, 0);
    options.prefix_caching = true;
    Run cached = RunWaves(options, waves);
    ExpectSameOutputs(cached, plain);
    return cached;
  }

  std::unique_ptr<CpuBackend> backend_;
  std::unique_ptr<Transformer> model_;
  int64_t vocab_ = 0;
};

TEST_F(PrefixCacheEngineTest, SharedSystemPromptIsComputedOnce) {
  const std::vector<int32_t> system = RandomTokens(37, 1);  // 4 whole blocks of 8 + 5
  std::vector<std::vector<GenerateRequest>> waves = {
      {Request("first", Concat(system, RandomTokens(6, 2)))},
      {Request("a", Concat(system, RandomTokens(1, 3))),
       Request("b", Concat(system, RandomTokens(9, 4))),
       Request("c", Concat(system, RandomTokens(20, 5))),
       // The system prompt's later blocks after another first block: nothing to reuse (their
       // K/V depend on every token before them).
       Request("d", Concat(RandomTokens(8, 11),
                           std::vector<int32_t>(system.begin() + 8, system.end())))}};
  Run run = CompareWithUncached({.block_size = 8, .num_blocks = 64}, waves);
  EXPECT_EQ(run.hit_tokens, 3 * 32) << "each of a, b, c starts after 4 cached blocks";
  EXPECT_EQ(run.query_tokens, 43 + 38 + 46 + 57 + 37);
  EXPECT_EQ(run.evictions, 0);
}

TEST_F(PrefixCacheEngineTest, RepeatedPromptComputesAtLeastItsLastToken) {
  // A prompt of whole blocks finds all but its last block (its last token's logits are needed);
  // one token longer finds all of them and computes one token.
  const std::vector<int32_t> p = RandomTokens(32, 6);
  std::vector<std::vector<GenerateRequest>> waves = {
      {Request("p1", p)}, {Request("p2", p)}, {Request("p3", Concat(p, {7}))}, {Request("p4", p)}};
  Run run = CompareWithUncached({.block_size = 8, .num_blocks = 64}, waves);
  EXPECT_EQ(run.hit_tokens, 24 + 32 + 24);
}

TEST_F(PrefixCacheEngineTest, SequencesComputedTogetherAreBothCachedWhole) {
  // Two prompts with the same first 16 tokens run in one step: the second's copy of the first
  // two blocks is not cached (the first's are), but its own blocks chain on them, so a
  // follow-up of the second finds all 48 of its tokens.
  const std::vector<int32_t> shared = RandomTokens(16, 60);
  const std::vector<int32_t> s2 = Concat(shared, RandomTokens(32, 62));
  std::vector<std::vector<GenerateRequest>> waves = {
      {Request("s1", Concat(shared, RandomTokens(32, 61))), Request("s2", s2)},
      {Request("next", Concat(s2, RandomTokens(5, 63)))}};
  Run run = CompareWithUncached({.block_size = 8, .num_blocks = 64}, waves);
  EXPECT_EQ(run.hit_tokens, 48);
}

TEST_F(PrefixCacheEngineTest, ChunkedPromptSharesTheChunksAlreadyComputed) {
  // A 64-token prompt prefilled 16 tokens a step; after its third step a request sharing its
  // first 48 tokens arrives and starts from the three chunks computed so far.
  const std::vector<int32_t> a = RandomTokens(64, 8);
  std::vector<int32_t> b(a.begin(), a.begin() + 48);
  b = Concat(b, RandomTokens(10, 9));
  for (bool caching : {false, true}) {
    auto engine = LlmEngine::Create(
        *model_,
        {.block_size = 8, .num_blocks = 64, .max_batch_tokens = 16, .prefix_caching = caching});
    ASSERT_TRUE(engine.ok());
    ASSERT_TRUE((*engine)->AddRequest(Request("a", a)).ok());
    for (int i = 0; i < 3; ++i) ASSERT_TRUE((*engine)->Step().ok());
    ASSERT_TRUE((*engine)->AddRequest(Request("b", b)).ok());
    std::map<std::string, std::vector<int32_t>> tokens;
    bool b_planned = false;
    while ((*engine)->HasWork()) {
      auto out = (*engine)->Step();
      ASSERT_TRUE(out.ok()) << out.status();
      for (const auto& [id, chunk] : (*engine)->last_batch()) {
        if (id == "b" && !b_planned) {
          b_planned = true;
          // The budget left after a's chunk: 16 - 16 = 0 in a's prefill steps, so b waits; its
          // first chunk is at most its uncached 10 tokens.
          if (caching) EXPECT_LE(chunk, 10);
        }
      }
      for (const TokenOutput& o : *out) tokens[o.request_id].push_back(o.token);
    }
    if (caching) {
      EXPECT_EQ((*engine)->num_prefix_hit_tokens(), 48);
    } else {
      EXPECT_EQ((*engine)->num_prefix_hit_tokens(), 0);
    }
    EXPECT_EQ(tokens["a"].size(), 5u);
    EXPECT_EQ(tokens["b"].size(), 5u);
    EXPECT_EQ((*engine)->num_free_blocks(), 64);
  }
}

TEST_F(PrefixCacheEngineTest, StartsFromTheBlocksOfAPromptStillInPrefill) {
  // Under a 16-token budget a 40-token prompt takes three steps. Before the third, b arrives
  // sharing a's first 32 tokens, which a's first two steps computed: in the third step a
  // computes its last 8 and b, with the 8 tokens left of the budget, its own 6 after the 32
  // cached ones, so both first tokens come from that step. Tokens as without the cache.
  const std::vector<int32_t> a = RandomTokens(40, 64);
  const std::vector<int32_t> b =
      Concat(std::vector<int32_t>(a.begin(), a.begin() + 32), RandomTokens(6, 65));
  std::map<std::string, std::vector<int32_t>> tokens[2];
  for (bool caching : {false, true}) {
    auto engine = LlmEngine::Create(
        *model_,
        {.block_size = 8, .num_blocks = 64, .max_batch_tokens = 16, .prefix_caching = caching});
    ASSERT_TRUE(engine.ok());
    ASSERT_TRUE((*engine)->AddRequest(Request("a", a)).ok());
    for (int i = 0; i < 2; ++i) ASSERT_TRUE((*engine)->Step().ok());  // a: 32 of 40 computed
    ASSERT_TRUE((*engine)->AddRequest(Request("b", b)).ok());
    auto third = (*engine)->Step();
    ASSERT_TRUE(third.ok()) << third.status();
    if (caching) {
      ASSERT_EQ(third->size(), 2u) << "a's last chunk and all of b's uncached tokens";
      EXPECT_EQ((*engine)->num_prefix_hit_tokens(), 32);
    } else {
      EXPECT_EQ(third->size(), 1u) << "b computes 8 of its 38 tokens";
    }
    for (const TokenOutput& o : *third) tokens[caching][o.request_id].push_back(o.token);
    while ((*engine)->HasWork()) {
      auto out = (*engine)->Step();
      ASSERT_TRUE(out.ok()) << out.status();
      for (const TokenOutput& o : *out) tokens[caching][o.request_id].push_back(o.token);
    }
    EXPECT_EQ((*engine)->num_free_blocks(), 64);
  }
  EXPECT_EQ(tokens[1], tokens[0]);
}

TEST_F(PrefixCacheEngineTest, CachedPrefixCutsTheStepsToTheFirstToken) {
  // Under a 16-token budget a 72-token prompt takes 5 prefill steps; with its first 64 tokens
  // cached it takes one.
  const std::vector<int32_t> p = RandomTokens(72, 10);
  auto engine =
      LlmEngine::Create(*model_, {.block_size = 8, .num_blocks = 64, .max_batch_tokens = 16});
  ASSERT_TRUE(engine.ok());
  int32_t reported = -1;  // the first token's cached_prompt_tokens
  auto steps_to_first_token = [&](const std::string& id) {
    EXPECT_TRUE((*engine)->AddRequest(Request(id, p, 1)).ok());
    int steps = 0;
    while ((*engine)->HasWork()) {
      auto out = (*engine)->Step();
      EXPECT_TRUE(out.ok());
      ++steps;
      if (out.ok() && !out->empty()) reported = (*out)[0].cached_prompt_tokens;
      if (!out.ok() || !out->empty()) break;
    }
    EXPECT_FALSE((*engine)->HasWork());
    return steps;
  };
  EXPECT_EQ(steps_to_first_token("cold"), 5);
  EXPECT_EQ(reported, 0);
  EXPECT_EQ(steps_to_first_token("warm"), 1);
  EXPECT_EQ(reported, 64) << "the first token tells how much of the prompt was cached";
  EXPECT_EQ((*engine)->num_prefix_hit_tokens(), 64);
}

TEST_F(PrefixCacheEngineTest, EvictionUnderPressureStaysExact) {
  // 20 blocks of 4: the cache of one 24-token prompt survives the next few only in part.
  std::vector<std::vector<GenerateRequest>> waves;
  for (int i = 0; i < 6; ++i)
    waves.push_back({Request("r" + std::to_string(i), RandomTokens(24, 20 + i))});
  waves.push_back({Request("again0", RandomTokens(24, 20))});
  waves.push_back({Request("again5", RandomTokens(24, 25))});
  // Two at once that share a prefix with each other and with nothing cached.
  const std::vector<int32_t> shared = RandomTokens(16, 40);
  waves.push_back({Request("s1", Concat(shared, RandomTokens(5, 41))),
                   Request("s2", Concat(shared, RandomTokens(7, 42)))});
  waves.push_back({Request("s3", Concat(shared, RandomTokens(3, 43)))});
  Run run = CompareWithUncached({.block_size = 4, .num_blocks = 20}, waves);
  EXPECT_GT(run.evictions, 0);
  EXPECT_GE(run.hit_tokens, 20) << "again5 finds its 5 whole blocks (the latest prompt)";
}

TEST_F(PrefixCacheEngineTest, HeldSequenceOwnsItsCachedPrefixUntilReleased) {
  // A prefill worker's held sequence shares the cached blocks; its KV (for the hand-off)
  // lists them, and releasing it returns everything.
  const std::vector<int32_t> system = RandomTokens(24, 50);
  auto engine = LlmEngine::Create(*model_, {.block_size = 8, .num_blocks = 16});
  ASSERT_TRUE(engine.ok());
  ASSERT_TRUE((*engine)->Generate({Request("warm", Concat(system, {1, 2}))}).ok());
  GenerateRequest held = Request("held", Concat(system, {3, 4, 5}));
  held.hold_kv_after_prefill = true;
  ASSERT_TRUE((*engine)->AddRequest(held).ok());
  auto out = (*engine)->Step();
  ASSERT_TRUE(out.ok()) << out.status();
  ASSERT_EQ(out->size(), 1u);
  EXPECT_TRUE((*out)[0].kv_held);
  auto kv = (*engine)->GetHeld("held");
  ASSERT_TRUE(kv.ok());
  EXPECT_EQ(kv->num_tokens, 27);
  ASSERT_EQ(kv->blocks.size(), 4u);
  EXPECT_EQ((*engine)->num_prefix_hit_tokens(), 24);
  ASSERT_TRUE((*engine)->Cancel("held").ok());
  EXPECT_EQ((*engine)->num_free_blocks(), 16);
  // And a request the size of the whole cache still gets every block (evicting the cache).
  ASSERT_TRUE((*engine)->Generate({Request("big", RandomTokens(120, 51), 2)}).ok());
  EXPECT_EQ((*engine)->num_free_blocks(), 16);
}

}  // namespace
}  // namespace pds::engine

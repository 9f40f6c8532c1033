// Sampling, stopping, logprobs, validation and cancellation of the generation engine.
#include <algorithm>
#include <cstring>
#include <map>
#include <memory>
#include <set>

#include "absl/strings/str_cat.h"
#include "engine/backend/cpu_backend.h"
#include "engine/model/presets.h"
#include "engine/model/transformer.h"
#include "engine/runtime/llm_engine.h"
#include "gtest/gtest.h"
#include "tests/testing/test_util.h"

namespace pds::engine {
namespace {

class GenerationTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    auto dir = testing::MakeModelDir(testing::SmallTestConfig(), "generation", 9);
    ASSERT_TRUE(dir.ok()) << dir.status();
    backend_ = new CpuBackend(1);
    auto model = Transformer::Load(*dir, *backend_);
    ASSERT_TRUE(model.ok()) << model.status();
    model_ = model->release();
  }
  static void TearDownTestSuite() {
    delete model_;
    delete backend_;
  }
  std::unique_ptr<LlmEngine> NewEngine(EngineOptions options = {.block_size = 8,
                                                                .num_blocks = 64}) {
    auto engine = LlmEngine::Create(*model_, options);
    EXPECT_TRUE(engine.ok()) << engine.status();
    return std::move(*engine);
  }
  GenerateResult Run(GenerateRequest r) {
    auto results = NewEngine()->Generate({std::move(r)});
    EXPECT_TRUE(results.ok()) << results.status();
    return results.ok() ? (*results)[0] : GenerateResult{};
  }
  static GenerateRequest Request(SamplingParams params,
                                 std::vector<int32_t> prompt = {5, 17, 42, 8, 99}) {
    GenerateRequest r;
    r.prompt = std::move(prompt);
    r.params = std::move(params);
    return r;
  }
  static CpuBackend* backend_;
  static Transformer* model_;
};
CpuBackend* GenerationTest::backend_ = nullptr;
Transformer* GenerationTest::model_ = nullptr;

TEST_F(GenerationTest, SameSeedSameTokensDifferentSeedDifferentTokens) {
  SamplingParams p{.temperature = 1.0f, .seed = 1234, .max_tokens = 24, .ignore_eos = true};
  const auto a = Run(Request(p));
  const auto b = Run(Request(p));
  EXPECT_EQ(a.token_ids, b.token_ids);
  p.seed = 99;
  const auto c = Run(Request(p));
  EXPECT_NE(a.token_ids, c.token_ids);
  // Sampling at temperature 1 is not greedy.
  const auto greedy = Run(Request({.max_tokens = 24, .ignore_eos = true}));
  EXPECT_NE(a.token_ids, greedy.token_ids);
}

TEST_F(GenerationTest, SeededSamplingDoesNotDependOnTheBatch) {
  SamplingParams p{.temperature = 0.8f,
                   .top_k = 50,
                   .top_p = 0.9f,
                   .seed = 7,
                   .max_tokens = 12,
                   .ignore_eos = true};
  const auto alone = Run(Request(p));
  std::vector<GenerateRequest> batch;
  for (int i = 0; i < 4; ++i) {
    GenerateRequest other = Request({.temperature = 1.0f,
                                     .seed = static_cast<uint64_t>(i),
                                     .max_tokens = 3 + i,
                                     .ignore_eos = true},
                                    {static_cast<int32_t>(10 + i), 3, 4});
    other.id = "other" + std::to_string(i);
    batch.push_back(other);
  }
  GenerateRequest mine = Request(p);
  mine.id = "mine";
  batch.insert(batch.begin() + 2, mine);
  auto results = NewEngine()->Generate(batch);
  ASSERT_TRUE(results.ok());
  EXPECT_EQ((*results)[2].request_id, "mine");
  EXPECT_EQ((*results)[2].token_ids, alone.token_ids);
}

TEST_F(GenerationTest, TopKOneAndTinyTopPAreGreedy) {
  const auto greedy = Run(Request({.max_tokens = 10, .ignore_eos = true}));
  const auto top1 = Run(
      Request({.temperature = 1.5f, .top_k = 1, .seed = 3, .max_tokens = 10, .ignore_eos = true}));
  const auto nucleus = Run(Request(
      {.temperature = 1.5f, .top_p = 1e-6f, .seed = 3, .max_tokens = 10, .ignore_eos = true}));
  EXPECT_EQ(top1.token_ids, greedy.token_ids);
  EXPECT_EQ(nucleus.token_ids, greedy.token_ids);
}

TEST_F(GenerationTest, StopTokenEosAndMaxTokens) {
  const auto free_run = Run(Request({.max_tokens = 12, .ignore_eos = true}));
  ASSERT_EQ(free_run.token_ids.size(), 12u);
  EXPECT_EQ(free_run.finish, FinishReason::kLength);
  const int32_t stop = free_run.token_ids[5];
  const size_t first = std::find(free_run.token_ids.begin(), free_run.token_ids.end(), stop) -
                       free_run.token_ids.begin();
  const auto stopped =
      Run(Request({.max_tokens = 12, .ignore_eos = true, .stop_token_ids = {stop}}));
  EXPECT_EQ(stopped.finish, FinishReason::kStop);
  ASSERT_EQ(stopped.token_ids.size(), first + 1);
  EXPECT_EQ(stopped.token_ids.back(), stop);

  // EOS from the model's config ends generation unless ignore_eos: the same weights (same
  // seed) with eos set to a token the greedy run produces.
  ModelConfig config = testing::SmallTestConfig();
  config.eos_token_ids = {stop};
  auto dir = testing::MakeModelDir(config, "generation_eos", 9);
  ASSERT_TRUE(dir.ok()) << dir.status();
  CpuBackend backend(1);
  auto model = Transformer::Load(*dir, backend);
  ASSERT_TRUE(model.ok()) << model.status();
  for (bool ignore_eos : {false, true}) {
    auto engine = LlmEngine::Create(**model, {.block_size = 8, .num_blocks = 64});
    ASSERT_TRUE(engine.ok());
    auto results = (*engine)->Generate({Request({.max_tokens = 12, .ignore_eos = ignore_eos})});
    ASSERT_TRUE(results.ok()) << results.status();
    if (ignore_eos) {
      EXPECT_EQ((*results)[0].token_ids, free_run.token_ids);
      EXPECT_EQ((*results)[0].finish, FinishReason::kLength);
    } else {
      EXPECT_EQ((*results)[0].token_ids, stopped.token_ids);
      EXPECT_EQ((*results)[0].finish, FinishReason::kStop);
    }
  }
}

TEST_F(GenerationTest, LogprobsAreSortedNormalizedAndIncludeTheGreedyToken) {
  const auto r = Run(Request({.max_tokens = 6, .ignore_eos = true, .logprobs = 5}));
  ASSERT_EQ(r.logprobs.size(), 6u);
  for (size_t i = 0; i < r.logprobs.size(); ++i) {
    const auto& lp = r.logprobs[i];
    ASSERT_EQ(lp.top.size(), 5u);
    EXPECT_EQ(lp.top[0].first, r.token_ids[i]) << "greedy picks the most likely token";
    EXPECT_FLOAT_EQ(lp.top[0].second, lp.logprob);
    double mass = 0;
    for (size_t k = 0; k < lp.top.size(); ++k) {
      EXPECT_LE(lp.top[k].second, 0.0f);
      if (k > 0) {
        EXPECT_LE(lp.top[k].second, lp.top[k - 1].second);
      }
      mass += std::exp(lp.top[k].second);
    }
    EXPECT_LE(mass, 1.0 + 1e-5);
    EXPECT_GT(mass, 0.0);
  }
}

TEST_F(GenerationTest, BadRequestsAreInvalidArgument) {
  auto engine = NewEngine();
  auto code = [&](GenerateRequest r) { return engine->AddRequest(std::move(r)).code(); };
  EXPECT_EQ(code(Request({}, {})), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(code(Request({}, {1, 300})), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(code(Request({}, {-1})), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(code(Request({.temperature = -1.0f})), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(code(Request({.temperature = NAN})), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(code(Request({.top_p = 0.0f})), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(code(Request({.top_k = -2})), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(code(Request({.max_tokens = 0})), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(code(Request({.stop_token_ids = {1000}})), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(code(Request({.logprobs = 21})), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(code(Request({}, std::vector<int32_t>(1024, 3))), absl::StatusCode::kInvalidArgument)
      << "longer than the context";
  // Longer than the whole KV cache: 64 blocks of 8.
  EXPECT_EQ(code(Request({}, std::vector<int32_t>(600, 3))), absl::StatusCode::kResourceExhausted);
  GenerateRequest named = Request({});
  named.id = "dup";
  EXPECT_TRUE(engine->AddRequest(named).ok());
  EXPECT_EQ(engine->AddRequest(named).code(), absl::StatusCode::kAlreadyExists);
}

TEST_F(GenerationTest, CancelFreesBlocksAtAnyTime) {
  auto engine = NewEngine();
  const int32_t total = engine->num_free_blocks();
  for (int i = 0; i < 3; ++i) {
    GenerateRequest r =
        Request({.max_tokens = 50, .ignore_eos = true}, std::vector<int32_t>(30, 4));
    r.id = "c" + std::to_string(i);
    ASSERT_TRUE(engine->AddRequest(r).ok());
  }
  ASSERT_TRUE(engine->Step().ok());
  ASSERT_TRUE(engine->Step().ok());
  EXPECT_LT(engine->num_free_blocks(), total);
  EXPECT_TRUE(engine->Cancel("c1").ok());
  EXPECT_EQ(engine->Cancel("c1").code(), absl::StatusCode::kNotFound);
  ASSERT_TRUE(engine->Step().ok());
  EXPECT_TRUE(engine->Cancel("c0").ok());
  EXPECT_TRUE(engine->Cancel("c2").ok());
  EXPECT_FALSE(engine->HasWork());
  EXPECT_EQ(engine->num_free_blocks(), total);
}

}  // namespace
}  // namespace pds::engine

namespace pds::engine {
namespace {

// Generated weights are scaled so that greedy generation is not degenerate: the top-2 logit
// margins sit far above float error and the output is not one token repeated.
// The disaggregated path inside one process: engine A prefills and holds the KV, its blocks
// are copied into blocks engine B reserved, B activates and decodes. The tokens equal one
// engine doing both, seeded sampling included, and both engines end with every block free.
TEST_F(GenerationTest, HeldPrefillHandedToAnotherEngineContinuesIdentically) {
  for (float temperature : {0.0f, 0.9f}) {
    SamplingParams p{.temperature = temperature, .seed = 77, .max_tokens = 12, .ignore_eos = true};
    std::vector<int32_t> prompt = {3, 14, 15, 92, 65, 35, 89, 79, 32, 38, 46};
    const GenerateResult whole = Run(Request(p, prompt));
    ASSERT_EQ(whole.token_ids.size(), 12u);

    auto prefill = NewEngine();
    auto decode = NewEngine();
    GenerateRequest r = Request(p, prompt);
    r.id = "x";
    r.hold_kv_after_prefill = true;
    ASSERT_TRUE(prefill->AddRequest(r).ok());
    std::vector<TokenOutput> outs;
    while (outs.empty()) {
      auto step = prefill->Step();
      ASSERT_TRUE(step.ok()) << step.status();
      outs = std::move(*step);
    }
    ASSERT_EQ(outs.size(), 1u);
    EXPECT_TRUE(outs[0].kv_held);
    EXPECT_EQ(outs[0].token, whole.token_ids[0]);
    EXPECT_FALSE(prefill->HasRunnable());
    auto held = prefill->GetHeld("x");
    ASSERT_TRUE(held.ok()) << held.status();
    EXPECT_EQ(held->num_tokens, static_cast<int32_t>(prompt.size()));

    r.hold_kv_after_prefill = false;
    auto reserved = decode->ReserveImport(r, held->num_tokens);
    ASSERT_TRUE(reserved.ok()) << reserved.status();
    ASSERT_EQ(reserved->size(), held->blocks.size());
    EXPECT_FALSE(decode->HasRunnable());
    const KvCacheShape& shape = prefill->cache().shape();
    const size_t bytes = shape.BlockBytes(DType::kF32);
    for (int layer = 0; layer < shape.num_layers; ++layer) {
      for (size_t i = 0; i < reserved->size(); ++i) {
        std::memcpy(static_cast<char*>(decode->cache().k(layer)) + (*reserved)[i] * bytes,
                    static_cast<char*>(prefill->cache().k(layer)) + held->blocks[i] * bytes, bytes);
        std::memcpy(static_cast<char*>(decode->cache().v(layer)) + (*reserved)[i] * bytes,
                    static_cast<char*>(prefill->cache().v(layer)) + held->blocks[i] * bytes, bytes);
      }
    }
    ASSERT_TRUE(prefill->Cancel("x").ok());
    EXPECT_EQ(prefill->num_free_blocks(), 64);
    ASSERT_TRUE(decode->ActivateImport("x", outs[0].token).ok());
    std::vector<int32_t> tokens = {outs[0].token};
    while (decode->HasWork()) {
      auto step = decode->Step();
      ASSERT_TRUE(step.ok()) << step.status();
      for (const TokenOutput& o : *step) tokens.push_back(o.token);
    }
    EXPECT_EQ(tokens, whole.token_ids) << "temperature " << temperature;
    EXPECT_EQ(decode->num_free_blocks(), 64);
  }
}

TEST_F(GenerationTest, ImportsWaitForRoomAndCancelFreesReservedBlocks) {
  auto decode = NewEngine({.block_size = 8, .num_blocks = 4});
  GenerateRequest r = Request({.max_tokens = 4});
  r.id = "a";
  r.prompt.assign(20, 7);  // 3 blocks
  auto a = decode->ReserveImport(r, 20);
  ASSERT_TRUE(a.ok()) << a.status();
  r.id = "b";
  EXPECT_EQ(decode->ReserveImport(r, 20).status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(decode->ReserveImport(r, 19).status().code(), absl::StatusCode::kInvalidArgument);
  r.id = "a";
  EXPECT_EQ(decode->ReserveImport(r, 20).status().code(), absl::StatusCode::kAlreadyExists);
  EXPECT_EQ(decode->num_held(), 1u);
  ASSERT_TRUE(decode->Cancel("a").ok());
  EXPECT_EQ(decode->num_free_blocks(), 4);
  EXPECT_EQ(decode->ActivateImport("a", 1).code(), absl::StatusCode::kNotFound);
}

// With the EDF batch policy and a budget of one prompt per step, the request whose first
// token is due first is prefilled first whatever the admission order; FCFS keeps the order.
TEST_F(GenerationTest, EdfPrefillsTheEarliestTtftDeadlineFirstAndBestEffortLast) {
  for (const char* name : {"fcfs", "edf"}) {
    auto policy = scheduler::MakeBatchPolicy(name);
    ASSERT_TRUE(policy.ok());
    auto engine = NewEngine({.block_size = 8,
                             .num_blocks = 64,
                             .max_batch_tokens = 8,
                             .batch_policy = std::move(*policy)});
    for (int i = 0; i < 4; ++i) {
      GenerateRequest r = Request({.max_tokens = 2}, std::vector<int32_t>(8, 10 + i));
      r.id = absl::StrCat("r", i);
      r.ttft_deadline_s = 100.0 - i;  // the last added is due first
      // r3 was admitted best-effort: whatever its deadline, it waits for the others.
      r.best_effort = i == 3;
      ASSERT_TRUE(engine->AddRequest(r).ok());
    }
    std::vector<std::string> first_tokens;
    while (engine->HasWork()) {
      auto step = engine->Step();
      ASSERT_TRUE(step.ok());
      for (const TokenOutput& o : *step) {
        if (std::find(first_tokens.begin(), first_tokens.end(), o.request_id) ==
            first_tokens.end()) {
          first_tokens.push_back(o.request_id);
        }
      }
    }
    const std::vector<std::string> expected =
        std::string(name) == "edf" ? std::vector<std::string>{"r2", "r1", "r0", "r3"}
                                   : std::vector<std::string>{"r0", "r1", "r2", "r3"};
    EXPECT_EQ(first_tokens, expected) << name;
  }
}

// A lower cap on sequences per step (the TPOT cap of decode workers) holds for every step and
// changes no tokens.
TEST_F(GenerationTest, MaxRunningCapBoundsEveryStep) {
  auto engine = NewEngine();
  engine->set_max_running(2);
  EXPECT_EQ(engine->max_running(), 2);
  std::vector<GenerateRequest> requests;
  for (int i = 0; i < 5; ++i) {
    GenerateRequest r = Request({.max_tokens = 6, .ignore_eos = true}, {5, 6, 7, 8 + i});
    r.id = absl::StrCat("c", i);
    ASSERT_TRUE(engine->AddRequest(r).ok());
    requests.push_back(r);
  }
  std::map<std::string, std::vector<int32_t>> tokens;
  while (engine->HasWork()) {
    auto step = engine->Step();
    ASSERT_TRUE(step.ok());
    EXPECT_LE(engine->last_batch().size(), 2u);
    for (const TokenOutput& o : *step) tokens[o.request_id].push_back(o.token);
  }
  for (const GenerateRequest& r : requests) EXPECT_EQ(tokens[r.id], Run(r).token_ids) << r.id;
  engine->set_max_running(0);
  EXPECT_EQ(engine->max_running(), 1);
}

TEST(PresetModelTest, TinyPresetHasClearMarginsAndVariedOutput) {
  auto config = PresetConfig("tiny");
  ASSERT_TRUE(config.ok());
  auto dir = testing::MakeModelDir(*config, "preset_tiny", 0, DType::kF32, 0, /*tokenizer=*/true);
  ASSERT_TRUE(dir.ok()) << dir.status();
  CpuBackend backend(1);
  auto model = Transformer::Load(*dir, backend);
  ASSERT_TRUE(model.ok()) << model.status();
  auto engine = LlmEngine::Create(**model, {.block_size = 16, .num_blocks = 64});
  ASSERT_TRUE(engine.ok());
  GenerateRequest r;
  r.prompt = {1, 2, 3, 4, 5};
  r.params.max_tokens = 64;
  r.params.ignore_eos = true;
  r.params.logprobs = 2;
  auto results = (*engine)->Generate({r});
  ASSERT_TRUE(results.ok()) << results.status();
  const auto& res = (*results)[0];
  int clear = 0;
  for (const auto& lp : res.logprobs) clear += (lp.top[0].second - lp.top[1].second) > 1e-3f;
  EXPECT_GE(clear, 58) << "top-2 margins above 1e-3 in at least 90% of steps";
  std::set<int32_t> distinct(res.token_ids.begin(), res.token_ids.end());
  EXPECT_GE(distinct.size(), 16u) << "greedy output is not stuck on a few tokens";
}

}  // namespace
}  // namespace pds::engine

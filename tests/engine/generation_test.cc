// Sampling, stopping, logprobs, validation and cancellation of the generation engine.
#include <algorithm>
#include <atomic>
#include <cstring>
#include <map>
#include <memory>
#include <set>
#include <thread>

#include "absl/strings/str_cat.h"
#include "engine/backend/cpu_backend.h"
#include "engine/model/presets.h"
#include "engine/model/transformer.h"
#include "engine/runtime/kv_handoff.h"
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
  // Steps `engine` until a step produces output; returns it (empty after a failed step).
  static std::vector<TokenOutput> StepUntilOutput(LlmEngine& engine) {
    for (int i = 0; i < 1000; ++i) {
      auto step = engine.Step();
      EXPECT_TRUE(step.ok()) << step.status();
      if (!step.ok() || !step->empty())
        return step.ok() ? std::move(*step) : std::vector<TokenOutput>{};
    }
    ADD_FAILURE() << "no output in 1000 steps";
    return {};
  }
  // What a KV transfer does: every layer's K and V of blocks `from` of `source` into blocks
  // `to` of `dest` (same shapes, CPU memory).
  // What a transfer does: copies the source's blocks after those the destination holds.
  static void CopyKv(const LlmEngine& source, const std::vector<int32_t>& all,
                     const LlmEngine& dest, const ImportReservation& reservation) {
    ASSERT_LT(reservation.held_blocks, static_cast<int32_t>(all.size()));
    const std::vector<int32_t> from(all.begin() + reservation.held_blocks, all.end());
    const std::vector<int32_t>& to = reservation.blocks;
    ASSERT_EQ(from.size(), to.size());
    const size_t bytes = source.cache().shape().BlockBytes(DType::kF32);
    for (int layer = 0; layer < source.cache().shape().num_layers; ++layer) {
      for (size_t b = 0; b < to.size(); ++b) {
        for (int kv = 0; kv < 2; ++kv) {
          void* d = kv == 0 ? dest.cache().k(layer) : dest.cache().v(layer);
          const void* s = kv == 0 ? source.cache().k(layer) : source.cache().v(layer);
          std::memcpy(static_cast<char*>(d) + to[b] * bytes,
                      static_cast<const char*>(s) + from[b] * bytes, bytes);
        }
      }
    }
  }
  void RunningImportStepsBehindABlockedPreemptedSequence(int32_t budget);
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
    const std::vector<TokenOutput> outs = StepUntilOutput(*prefill);
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
    EXPECT_EQ(reserved->held_blocks, 0);
    ASSERT_EQ(reserved->blocks.size(), held->blocks.size());
    EXPECT_FALSE(decode->HasRunnable());
    CopyKv(*prefill, held->blocks, *decode, *reserved);
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

// A decode engine with prefix caching shares the whole blocks of an import's prompt that an
// earlier import left in its cache: it names them as held, reserves and is sent only the
// blocks after them, so the later sequences hold only their own blocks, and the tokens are
// those of one engine doing everything. A prompt that is all cached still has its last block
// sent. Without the cache every import holds and is sent all its blocks.
TEST_F(GenerationTest, DecodeSharesThePrefixBlocksOfEarlierImports) {
  SamplingParams p{.max_tokens = 10, .ignore_eos = true};
  std::vector<int32_t> system;
  for (int j = 0; j < 32; ++j) system.push_back(5 + (j * 37) % 200);  // 4 blocks of 8
  std::vector<GenerateRequest> requests;
  for (int i = 0; i < 3; ++i) {
    GenerateRequest r = Request(p, system);
    for (int j = 0; j <= 2 * i; ++j) r.prompt.push_back(9 + (i * 41 + j * 7) % 200);
    r.id = "r" + std::to_string(i);
    requests.push_back(r);
  }
  GenerateRequest whole_blocks = Request(p, system);  // r3: exactly the 4 cached blocks
  whole_blocks.id = "r3";
  requests.push_back(whole_blocks);
  for (bool caching : {true, false}) {
    SCOPED_TRACE(caching ? "caching" : "no caching");
    auto prefill = NewEngine();
    auto decode = NewEngine({.block_size = 8, .num_blocks = 64, .prefix_caching = caching});
    std::vector<std::vector<int32_t>> tokens(requests.size());
    std::vector<int> used_after_activation, held_blocks, sent_blocks;
    for (size_t i = 0; i < requests.size(); ++i) {
      GenerateRequest r = requests[i];
      r.hold_kv_after_prefill = true;
      ASSERT_TRUE(prefill->AddRequest(r).ok());
      const std::vector<TokenOutput> outs = StepUntilOutput(*prefill);
      ASSERT_FALSE(outs.empty());
      auto held = prefill->GetHeld(r.id);
      ASSERT_TRUE(held.ok()) << held.status();
      r.hold_kv_after_prefill = false;
      auto reserved = decode->ReserveImport(r, held->num_tokens);
      ASSERT_TRUE(reserved.ok()) << reserved.status();
      held_blocks.push_back(reserved->held_blocks);
      sent_blocks.push_back(static_cast<int>(reserved->blocks.size()));
      CopyKv(*prefill, held->blocks, *decode, *reserved);
      ASSERT_TRUE(prefill->Cancel(r.id).ok());
      ASSERT_TRUE(decode->ActivateImport(r.id, outs[0].token).ok());
      used_after_activation.push_back(64 - decode->num_free_blocks());
      tokens[i].push_back(outs[0].token);
    }
    while (decode->HasWork()) {
      auto step = decode->Step();
      ASSERT_TRUE(step.ok()) << step.status();
      for (const TokenOutput& o : *step) tokens[o.request_id[1] - '0'].push_back(o.token);
    }
    for (size_t i = 0; i < requests.size(); ++i) {
      EXPECT_EQ(tokens[i], Run(requests[i]).token_ids) << requests[i].id;
    }
    // r0: 33 tokens = 5 blocks; r1 (35) and r2 (37) add 1 block each when sharing 4; r3 (32)
    // shares 3 and is sent its last block, which equals the cached fourth (no new block).
    EXPECT_EQ(held_blocks, caching ? std::vector<int>({0, 4, 4, 3}) : std::vector<int>(4, 0));
    EXPECT_EQ(sent_blocks,
              caching ? std::vector<int>({5, 1, 1, 1}) : std::vector<int>({5, 5, 5, 4}));
    EXPECT_EQ(used_after_activation,
              caching ? std::vector<int>({5, 6, 7, 8}) : std::vector<int>({5, 10, 15, 19}));
    EXPECT_EQ(decode->num_prefix_hit_tokens(), caching ? 2 * 32 + 24 : 0);
    EXPECT_EQ(decode->num_free_blocks(), 64);
  }
}

// The forward's K/V hook runs after each layer's writes and before the next layer's: at the
// hook for layer l, layer l holds the step's K/V and layer l + 1 still the old contents.
TEST_F(GenerationTest, KvLayerHookRunsAfterEachLayersWrites) {
  const int32_t block_size = 8;
  const KvCacheShape shape = model_->CacheShape(4, block_size);
  auto cache = KvCache::Create(*backend_, shape);
  ASSERT_TRUE(cache.ok()) << cache.status();
  BlockAllocator& alloc = cache->allocator();
  BlockTable table;
  const std::vector<int32_t> prompt = {3, 14, 15, 92, 65, 35, 89, 79, 32, 38, 46};
  ASSERT_TRUE(table.Reserve(static_cast<int32_t>(prompt.size()), block_size, alloc).ok());
  const size_t pool_floats = shape.BlockBytes(DType::kF32) * shape.num_blocks / sizeof(float);
  for (int32_t l = 0; l < shape.num_layers; ++l) {
    std::fill_n(static_cast<float*>(cache->k(l)), pool_floats, 0.0f);
    std::fill_n(static_cast<float*>(cache->v(l)), pool_floats, 0.0f);
  }
  const auto written = [&](int32_t layer) {  // the first position's K is no longer all zeros
    const float* k = static_cast<const float*>(cache->k(layer)) +
                     table.blocks()[0] * shape.BlockBytes(DType::kF32) / sizeof(float);
    return std::any_of(k, k + shape.head_dim, [](float x) { return x != 0.0f; });
  };
  std::vector<int32_t> seen;
  const Transformer::KvLayerHook hook = [&](int32_t layer) -> absl::Status {
    seen.push_back(layer);
    EXPECT_TRUE(written(layer)) << layer;
    if (layer + 1 < shape.num_layers) {
      EXPECT_FALSE(written(layer + 1)) << layer;
    }
    return absl::OkStatus();
  };
  SequenceInput in{prompt, 0, &table};
  std::vector<float> logits;
  std::vector<int32_t> tokens;
  ASSERT_TRUE(
      model_->Forward({&in, 1}, *cache, logits, {kernels::RowSampling{}}, {0}, tokens, hook).ok());
  std::vector<int32_t> want(static_cast<size_t>(shape.num_layers));
  for (int32_t l = 0; l < shape.num_layers; ++l) want[l] = l;
  EXPECT_EQ(seen, want);
  // A hook's error fails the forward.
  const Transformer::KvLayerHook failing = [](int32_t layer) {
    return layer == 1 ? absl::InternalError("hook failed") : absl::OkStatus();
  };
  EXPECT_EQ(
      model_->Forward({&in, 1}, *cache, logits, {kernels::RowSampling{}}, {0}, tokens, failing)
          .code(),
      absl::StatusCode::kInternal);
  ASSERT_TRUE(table.Release(alloc).ok());
}

// Layer-by-layer hand-off: the hook gets the sequences whose prompts complete in the step
// before their forward; the step's end completes every layer and resolves the token; a decode
// engine given those blocks continues exactly as a single engine would.
TEST_F(GenerationTest, HandoffDuringThePrefillStepContinuesIdentically) {
  SamplingParams p{.temperature = 0.9f, .seed = 5, .max_tokens = 10, .ignore_eos = true};
  const std::vector<int32_t> prompt = {3, 14, 15, 92, 65, 35, 89, 79, 32, 38, 46, 7, 7};
  const GenerateResult whole = Run(Request(p, prompt));
  ASSERT_EQ(whole.token_ids.size(), 10u);

  // A budget of 8 tokens per step: the prompt is prefilled in two chunks, and only the second
  // step hands it off.
  auto prefill = NewEngine({.block_size = 8, .num_blocks = 64, .max_batch_tokens = 8});
  std::vector<std::shared_ptr<KvHandoff>> handed;
  int hook_calls = 0;
  prefill->set_handoff_hook([&](std::vector<std::shared_ptr<KvHandoff>> handoffs) {
    ++hook_calls;
    for (auto& h : handoffs) {
      // Nothing of the step is written yet.
      absl::StatusOr<bool> ready = h->layers().Ready(0);
      ASSERT_TRUE(ready.ok());
      EXPECT_FALSE(*ready);
      EXPECT_EQ(h->WaitNextToken(absl::Now(), nullptr).status().code(),
                absl::StatusCode::kDeadlineExceeded);
      handed.push_back(h);
    }
  });
  GenerateRequest r = Request(p, prompt);
  r.id = "x";
  r.hold_kv_after_prefill = true;
  ASSERT_TRUE(prefill->AddRequest(r).ok());
  GenerateRequest one = Request({.max_tokens = 1}, {1, 2, 3});  // ends with its first token
  one.id = "one";
  one.hold_kv_after_prefill = true;
  ASSERT_TRUE(prefill->AddRequest(one).ok());
  auto first = prefill->Step();  // "x"'s first chunk, nothing handed off
  ASSERT_TRUE(first.ok()) << first.status();
  EXPECT_EQ(hook_calls, 0);
  std::vector<TokenOutput> outs;
  while (outs.size() < 2) {
    auto step = prefill->Step();
    ASSERT_TRUE(step.ok()) << step.status();
    for (TokenOutput& o : *step) outs.push_back(std::move(o));
  }
  ASSERT_EQ(handed.size(), 1u);  // not "one"
  KvHandoff& h = *handed[0];
  EXPECT_EQ(h.request_id(), "x");
  EXPECT_EQ(h.num_tokens(), static_cast<int32_t>(prompt.size()));
  auto held = prefill->GetHeld("x");
  ASSERT_TRUE(held.ok()) << held.status();
  EXPECT_EQ(h.blocks(), held->blocks);
  const KvCacheShape& shape = prefill->cache().shape();
  for (int32_t l = 0; l < shape.num_layers; ++l) {
    EXPECT_TRUE(h.layers().Wait(l, absl::Now() + absl::Seconds(1), nullptr).ok()) << l;
  }
  auto token = h.WaitNextToken(absl::Now() + absl::Seconds(1), nullptr);
  ASSERT_TRUE(token.ok()) << token.status();
  EXPECT_EQ(*token, whole.token_ids[0]);

  auto decode = NewEngine();
  r.hold_kv_after_prefill = false;
  auto reserved = decode->ReserveImport(r, h.num_tokens());
  ASSERT_TRUE(reserved.ok()) << reserved.status();
  CopyKv(*prefill, h.blocks(), *decode, *reserved);
  ASSERT_TRUE(prefill->Cancel("x").ok());
  EXPECT_EQ(prefill->num_free_blocks(), 64);
  ASSERT_TRUE(decode->ActivateImport("x", *token).ok());
  std::vector<int32_t> tokens = {*token};
  while (decode->HasWork()) {
    auto step = decode->Step();
    ASSERT_TRUE(step.ok()) << step.status();
    for (const TokenOutput& o : *step) tokens.push_back(o.token);
  }
  EXPECT_EQ(tokens, whole.token_ids);
}

// A sequence handed off during its step that then ends with its first token (a stop token):
// its hand-off fails with the reason, and its blocks stay until Cancel (the transfer reading
// them ends first).
TEST_F(GenerationTest, HandoffOfASequenceEndingWithItsFirstTokenFailsAndKeepsTheBlocks) {
  const std::vector<int32_t> prompt = {9, 8, 7, 6, 5};
  const GenerateResult greedy = Run(Request({.max_tokens = 1}, prompt));
  ASSERT_EQ(greedy.token_ids.size(), 1u);
  auto prefill = NewEngine();
  std::shared_ptr<KvHandoff> handed;
  prefill->set_handoff_hook(
      [&](std::vector<std::shared_ptr<KvHandoff>> handoffs) { handed = handoffs.at(0); });
  GenerateRequest r = Request({.max_tokens = 8, .stop_token_ids = {greedy.token_ids[0]}}, prompt);
  r.id = "stops";
  r.hold_kv_after_prefill = true;
  ASSERT_TRUE(prefill->AddRequest(r).ok());
  auto step = prefill->Step();
  ASSERT_TRUE(step.ok()) << step.status();
  ASSERT_EQ(step->size(), 1u);
  EXPECT_EQ((*step)[0].finish, FinishReason::kStop);
  EXPECT_TRUE((*step)[0].kv_held);
  ASSERT_NE(handed, nullptr);
  auto token = handed->WaitNextToken(absl::Now() + absl::Seconds(1), nullptr);
  EXPECT_EQ(token.status().code(), absl::StatusCode::kCancelled);
  EXPECT_NE(token.status().message().find("ended with its first token"), std::string::npos);
  EXPECT_LT(prefill->num_free_blocks(), 64);
  EXPECT_FALSE(prefill->HasRunnable());
  ASSERT_TRUE(prefill->Cancel("stops").ok());
  EXPECT_EQ(prefill->num_free_blocks(), 64);
  EXPECT_FALSE(prefill->HasWork());
}

TEST(LayerProgressTest, WaitsForIssuedMarksAndFailsWithTheStep) {
  class Gate : public Backend::Mark {
   public:
    absl::StatusOr<bool> Reached() override { return open.load(); }
    std::atomic<bool> open{false};
  };
  LayerProgress progress(3);
  EXPECT_EQ(progress.Ready(3).status().code(), absl::StatusCode::kOutOfRange);
  EXPECT_FALSE(*progress.Ready(0));
  EXPECT_EQ(progress.Wait(0, absl::Now() + absl::Milliseconds(20), nullptr).code(),
            absl::StatusCode::kDeadlineExceeded);
  EXPECT_EQ(progress.Wait(0, absl::Now() + absl::Seconds(5), [] { return true; }).code(),
            absl::StatusCode::kCancelled);
  auto gate = std::make_shared<Gate>();
  progress.Issued(0, gate);
  EXPECT_FALSE(*progress.Ready(0));  // issued, not complete
  std::thread opener([&] {
    absl::SleepFor(absl::Milliseconds(20));
    gate->open = true;
  });
  EXPECT_TRUE(progress.Wait(0, absl::Now() + absl::Seconds(5), nullptr).ok());
  opener.join();
  EXPECT_TRUE(*progress.Ready(0));
  EXPECT_FALSE(*progress.Ready(1));
  // Layer 1 is waited for on another thread while the step fails.
  absl::Status waited;
  std::thread waiter([&] { waited = progress.Wait(1, absl::Now() + absl::Seconds(5), nullptr); });
  absl::SleepFor(absl::Milliseconds(10));
  progress.End(absl::InternalError("device lost"));
  waiter.join();
  EXPECT_EQ(waited.code(), absl::StatusCode::kInternal);
  EXPECT_EQ(progress.Ready(0).status().code(), absl::StatusCode::kInternal);

  LayerProgress done(2);
  done.End(absl::OkStatus());  // a step that ended well: every layer is complete
  EXPECT_TRUE(*done.Ready(1));
  EXPECT_TRUE(done.Wait(1, absl::Now(), nullptr).ok());
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

// A decode engine preempts a sequence (v) for an older one's growth; an import reserved before
// (r) is activated after it, so r is younger than v. v cannot get its blocks back yet: r still
// runs (it used to stop behind v, and with the older sequence gone nothing would ever free
// v's blocks), new imports wait until v runs again, and everything finishes. Also with a token
// budget that v's chunk would use up (25 = a's 1 + v's 24): r still gets its place.
TEST_F(GenerationTest, RunningImportsStepWhileAPreemptedSequenceWaitsForBlocks) {
  for (int32_t budget : {2048, 25}) {
    SCOPED_TRACE(budget);
    RunningImportStepsBehindABlockedPreemptedSequence(budget);
  }
}

void GenerationTest::RunningImportStepsBehindABlockedPreemptedSequence(int32_t budget) {
  auto decode = NewEngine(
      {.block_size = 8, .num_blocks = 6, .max_batch_tokens = budget, .prefix_caching = false});
  const auto import = [&](const std::string& id, int32_t len, int32_t first_token) {
    GenerateRequest r = Request({.max_tokens = 40, .ignore_eos = true});
    r.id = id;
    r.prompt.clear();
    for (int32_t j = 0; j < len; ++j) r.prompt.push_back(first_token + j);
    return decode->ReserveImport(r, len);
  };
  ASSERT_TRUE(import("a", 8, 10).ok());  // 1 block
  ASSERT_TRUE(decode->ActivateImport("a", 3).ok());
  ASSERT_TRUE(import("v", 16, 30).ok());  // 2 blocks
  ASSERT_TRUE(decode->ActivateImport("v", 3).ok());
  ASSERT_TRUE(import("r", 8, 60).ok());  // 1 block, arriving
  // a and v grow into the last free blocks; a's next block preempts v.
  for (int i = 0; i < 20 && decode->num_preemptions() == 0; ++i) {
    ASSERT_TRUE(decode->Step().ok()) << i;
  }
  ASSERT_EQ(decode->num_preemptions(), 1);
  EXPECT_EQ(decode->num_waiting(), 1u);
  auto refused = import("late", 8, 80);
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kResourceExhausted) << refused.status();
  ASSERT_TRUE(decode->ActivateImport("r", 3).ok());
  auto step = decode->Step();
  ASSERT_TRUE(step.ok()) << step.status();
  std::vector<std::string> ran;
  for (const auto& [id, tokens] : decode->last_batch()) ran.push_back(id);
  EXPECT_EQ(ran, (std::vector<std::string>{"a", "r"})) << "v waits, r runs";
  int steps = 0;
  while (decode->HasWork() && steps < 400) {
    ASSERT_TRUE(decode->Step().ok());
    ++steps;
  }
  EXPECT_FALSE(decode->HasWork()) << "stuck";
  EXPECT_EQ(decode->num_free_blocks(), 6);
}

// A decode worker also runs whole the requests the front-end prefills there (conditional
// disaggregation): one waiting to start does not hold imports back (only a preempted one whose
// stream started does), and both finish with the tokens of a plain engine.
TEST_F(GenerationTest, AWaitingLocalRequestDoesNotHoldImportsBack) {
  auto decode = NewEngine({.block_size = 8, .num_blocks = 16});
  GenerateRequest local = Request({.max_tokens = 6, .ignore_eos = true}, {5, 6, 7, 8, 9});
  local.id = "local";
  ASSERT_TRUE(decode->AddRequest(local).ok());
  EXPECT_EQ(decode->num_waiting(), 1u);
  GenerateRequest imported = Request({.max_tokens = 6, .ignore_eos = true}, {11, 12, 13});
  imported.id = "imported";
  auto reserved = decode->ReserveImport(imported, 3);
  ASSERT_TRUE(reserved.ok()) << reserved.status();
  ASSERT_TRUE(decode->ActivateImport("imported", 20).ok());
  std::map<std::string, std::vector<int32_t>> tokens;
  for (int i = 0; i < 20 && decode->HasWork(); ++i) {
    auto step = decode->Step();
    ASSERT_TRUE(step.ok()) << step.status();
    for (const TokenOutput& out : *step) tokens[out.request_id].push_back(out.token);
  }
  EXPECT_FALSE(decode->HasWork());
  EXPECT_EQ(tokens["local"].size(), 6u);
  EXPECT_EQ(tokens["imported"].size(), 5u);  // its first token came with the import
  auto plain = NewEngine({.block_size = 8, .num_blocks = 16});
  auto expected = plain->Generate({local});
  ASSERT_TRUE(expected.ok()) << expected.status();
  EXPECT_EQ(tokens["local"], (*expected)[0].token_ids);
}

// A request waiting to start on a decode worker keeps the blocks its prompt needs: an import
// may take only what is left beyond them (so a stream of imports cannot starve it).
TEST_F(GenerationTest, ImportsLeaveTheBlocksAWaitingRequestNeeds) {
  auto decode = NewEngine({.block_size = 8, .num_blocks = 5, .prefix_caching = false});
  GenerateRequest local =
      Request({.max_tokens = 4, .ignore_eos = true}, std::vector<int32_t>(20, 7));
  local.id = "local";  // 3 blocks
  ASSERT_TRUE(decode->AddRequest(local).ok());
  const auto import = [&](const std::string& id) {
    GenerateRequest r = Request({.max_tokens = 4, .ignore_eos = true}, std::vector<int32_t>(8, 9));
    r.id = id;  // 1 block
    return decode->ReserveImport(r, 8);
  };
  ASSERT_TRUE(import("i1").ok());  // 1 + 3 kept <= 5 free
  ASSERT_TRUE(decode->ActivateImport("i1", 12).ok());
  auto refused = import("i2");  // 1 + 1 growth + 3 kept > 4 free
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kResourceExhausted) << refused.status();
  EXPECT_NE(refused.status().message().find("3 for requests waiting to start"), std::string::npos)
      << refused.status();
  // It runs (the import beside it), both finish, and imports take what is free again.
  ASSERT_TRUE(decode->Step().ok());
  EXPECT_EQ(decode->num_waiting(), 0u);
  for (int i = 0; i < 50 && decode->HasWork(); ++i) ASSERT_TRUE(decode->Step().ok());
  EXPECT_FALSE(decode->HasWork());
  EXPECT_TRUE(import("i2").ok());
}

// A decode engine whose free blocks went to an import in flight: the running sequence that
// needs a block waits for it (no error, nothing else disturbed) and goes on once the import
// is cancelled.
TEST_F(GenerationTest, RunningSequenceWaitsForBlocksAnImportHolds) {
  auto decode = NewEngine({.block_size = 8, .num_blocks = 4});
  GenerateRequest x = Request({.max_tokens = 30, .ignore_eos = true}, std::vector<int32_t>(7, 3));
  x.id = "x";
  ASSERT_TRUE(decode->ReserveImport(x, 7).ok());
  ASSERT_TRUE(decode->ActivateImport("x", 11).ok());
  GenerateRequest y = Request({.max_tokens = 4}, std::vector<int32_t>(16, 4));
  y.id = "y";
  ASSERT_TRUE(decode->ReserveImport(y, 16).ok());  // 2 blocks + 1 kept for x's growth
  EXPECT_EQ(decode->num_free_blocks(), 1);
  int tokens = 0, waits = 0;
  for (int i = 0; i < 12; ++i) {
    auto step = decode->Step();
    ASSERT_TRUE(step.ok()) << "step " << i << ": " << step.status();
    tokens += static_cast<int>(step->size());
    waits += step->empty();
  }
  // x took the last free block at position 8 and needs a third at position 16.
  EXPECT_EQ(tokens, 9);
  EXPECT_EQ(waits, 3);
  EXPECT_EQ(decode->num_block_waits(), 3);
  ASSERT_TRUE(decode->Cancel("y").ok());
  FinishReason finish = FinishReason::kNone;
  for (int i = 0; i < 40 && finish == FinishReason::kNone; ++i) {
    auto step = decode->Step();
    ASSERT_TRUE(step.ok()) << step.status();
    ASSERT_EQ(step->size(), 1u);
    finish = (*step)[0].finish;
  }
  EXPECT_EQ(finish, FinishReason::kLength);  // the cache (4 x 8 positions) bounds it
  EXPECT_EQ(decode->num_free_blocks(), 4);
}

// A prefill engine whose blocks are held by a prompt waiting for its hand-off: a partly
// prefilled prompt that needs another block waits for them instead of failing the step.
TEST_F(GenerationTest, ChunkedPrefillWaitsForBlocksHeldForAHandoff) {
  auto prefill = NewEngine({.block_size = 8, .num_blocks = 8, .max_batch_tokens = 16});
  GenerateRequest a = Request({.max_tokens = 10, .ignore_eos = true}, std::vector<int32_t>(40, 5));
  a.id = "a";
  a.hold_kv_after_prefill = true;
  GenerateRequest b = Request({.max_tokens = 10, .ignore_eos = true}, std::vector<int32_t>(30, 6));
  b.id = "b";
  b.hold_kv_after_prefill = true;
  ASSERT_TRUE(prefill->AddRequest(a).ok());
  ASSERT_TRUE(prefill->AddRequest(b).ok());
  int held = 0, waits = 0;
  for (int i = 0; i < 8; ++i) {
    auto step = prefill->Step();
    ASSERT_TRUE(step.ok()) << "step " << i << ": " << step.status();
    for (const TokenOutput& out : *step) held += out.kv_held;
    waits += step->empty();
  }
  EXPECT_EQ(held, 1);  // a (5 blocks held); b has 24 of its 30 positions in the 3 blocks left
  EXPECT_GT(waits, 0);
  EXPECT_GT(prefill->num_block_waits(), 0);
  ASSERT_TRUE(prefill->Cancel("a").ok());  // a's KV has left
  auto step = prefill->Step();
  ASSERT_TRUE(step.ok()) << step.status();
  ASSERT_EQ(step->size(), 1u);
  EXPECT_EQ((*step)[0].request_id, "b");
  EXPECT_TRUE((*step)[0].kv_held);
  ASSERT_TRUE(prefill->Cancel("b").ok());
  EXPECT_EQ(prefill->num_free_blocks(), 8);
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

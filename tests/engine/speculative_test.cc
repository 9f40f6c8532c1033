// Speculative decoding by prompt lookup: the draft proposer, and an engine with drafts gives
// the tokens of one without them (greedy and seeded sampling), under small token budgets,
// small caches and preemption, at the context's end, and next to requests that cannot
// speculate.
#include "engine/runtime/speculative.h"

#include <algorithm>
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

using Ids = std::vector<int32_t>;

TEST(ProposeNgramDraftsTest, FollowsTheLatestOccurrenceOfTheLongestSuffix) {
  // "7 8" occurs twice before the end; the latest one is followed by 5 6.
  const std::vector<int32_t> t = {7, 8, 1, 2, 9, 7, 8, 5, 6, 4, 7, 8};
  EXPECT_EQ(ProposeNgramDrafts(t, 2, 4, 2), (Ids{5, 6}));
  // A longer match wins over a later shorter one: "3 7 8" occurs only at the start.
  const std::vector<int32_t> u = {3, 7, 8, 1, 2, 7, 8, 5, 3, 7, 8};
  EXPECT_EQ(ProposeNgramDrafts(u, 2, 4, 3), (Ids{1, 2, 7}));
  EXPECT_EQ(ProposeNgramDrafts(u, 2, 2, 3), (Ids{5, 3, 7})) << "n-grams of 2 only";
}

TEST(ProposeNgramDraftsTest, NothingWithoutAMatchOfTheShortestLength) {
  const std::vector<int32_t> t = {1, 2, 3, 4, 5, 3};
  EXPECT_EQ(ProposeNgramDrafts(t, 2, 4, 4), Ids{});
  EXPECT_EQ(ProposeNgramDrafts(t, 1, 4, 2), (Ids{4, 5}));
  EXPECT_EQ(ProposeNgramDrafts(t, 1, 4, 0), Ids{});
  EXPECT_EQ(ProposeNgramDrafts(std::vector<int32_t>{5}, 1, 4, 3), Ids{});
  EXPECT_EQ(ProposeNgramDrafts(std::vector<int32_t>{}, 1, 4, 3), Ids{});
}

TEST(ProposeNgramDraftsTest, ARepeatingPatternIsDraftedPastTheEnd) {
  const std::vector<int32_t> t = {9, 1, 2, 3, 1, 2, 3, 1, 2};
  EXPECT_EQ(ProposeNgramDrafts(t, 2, 4, 7), (Ids{3, 1, 2, 3, 1, 2, 3}));
  const std::vector<int32_t> run = {4, 4, 4};
  EXPECT_EQ(ProposeNgramDrafts(run, 2, 4, 3), (Ids{4, 4, 4}));
}

TEST(ProposeNgramDraftsTest, TheIndexProposesWhatTheScanDoes) {
  // Sequences over a few token ids (many partial matches), grown a token at a time.
  std::mt19937_64 rng(9);
  int proposed = 0;
  for (int trial = 0; trial < 20; ++trial) {
    const int32_t ids = 2 + trial % 6;
    std::vector<int32_t> tokens;
    NgramIndex index;
    for (int t = 0; t < 300; ++t) {
      tokens.push_back(static_cast<int32_t>(rng() % ids));
      index.Extend(tokens);
      const int32_t lo = 1 + t % 3, hi = lo + t % 4, k = t % 6;
      const std::vector<int32_t> want = ProposeNgramDrafts(tokens, lo, hi, k);
      ASSERT_EQ(index.Propose(tokens, lo, hi, k), want) << trial << " " << t;
      proposed += !want.empty();
    }
  }
  EXPECT_GT(proposed, 1000);
}

TEST(ChooseDraftsTest, FreeRowsTakeEveryDraftLikelierThanTheFloor) {
  const std::vector<DraftCandidate> c = {{3, 0.9}, {4, 0.5}, {4, 0.3}};
  // 0.5^4 = 1/16 stays; 0.3^3 = 0.027 is under 1/32.
  EXPECT_EQ(ChooseDrafts(FreeRows(), {3, 60, false}, 3, c), (Ids{3, 4, 2}));
  // No more draft rows than the budget leaves: the likeliest.
  EXPECT_EQ(ChooseDrafts(FreeRows(), {3, 60, false}, 3, c, {.rows = 4}), (Ids{3, 1, 0}));
}

TEST(ChooseDraftsTest, DraftsGoInWhileTheyRaiseTokensPerSecond) {
  // 10 + 1 per row: four decodes make 4 tokens in 14. The likely candidate's three drafts
  // raise the rate (to 6.44 in 17); the unlikely one's first lowers it (6.64 in 18).
  const auto cost = [](const StepShape& s) { return 10.0 + s.rows; };
  const std::vector<DraftCandidate> c = {{3, 0.2}, {3, 0.9}};
  EXPECT_EQ(ChooseDrafts(cost, {4, 80, false}, 4, c), (Ids{0, 3}));
  // Rows as dear as whole steps: none pays.
  const auto dear = [](const StepShape& s) { return 1.0 * s.rows; };
  EXPECT_EQ(ChooseDrafts(dear, {4, 80, false}, 4, c), (Ids{0, 0}));
  // Nor next to a prefill chunk, whose rows send no token: drafts are weighed against the
  // decodes' own rate.
  EXPECT_EQ(ChooseDrafts(dear, {4, 80, false}, 4, c, {.others = {60, 60, false}}), (Ids{0, 0}));
}

TEST(ChooseDraftsTest, TheDraftingOverheadIsPaidOnce) {
  // 12 more for any step with drafts: one draft does not pay (1.95 in 24 against 1 in 11),
  // four do (4.52 in 27).
  const auto cost = [](const StepShape& s) { return 10.0 + s.rows + (s.drafts ? 12.0 : 0.0); };
  const std::vector<DraftCandidate> one = {{1, 0.95}};
  EXPECT_EQ(ChooseDrafts(cost, {1, 5, false}, 1, one), (Ids{0}));
  const std::vector<DraftCandidate> four = {{4, 0.95}};
  EXPECT_EQ(ChooseDrafts(cost, {1, 5, false}, 1, four), (Ids{4}));
}

TEST(ChooseDraftsTest, TheCapBoundsThePredictedStepWithItsOtherRows) {
  const auto cost = [](const StepShape& s) { return 10.0 + s.rows; };
  const std::vector<DraftCandidate> c = {{4, 0.9}};
  EXPECT_EQ(ChooseDrafts(cost, {1, 5, false}, 1, c), (Ids{4}));
  EXPECT_EQ(ChooseDrafts(cost, {1, 5, false}, 1, c, {.max_seconds = 12.5}), (Ids{1}));
  // Rows free for the choice, the cap priced apart (the engine's exploration steps).
  EXPECT_EQ(ChooseDrafts(FreeRows(), {1, 5, false}, 1, c, {.max_seconds = 12.5, .cap_cost = cost}),
            (Ids{1}));
  EXPECT_EQ(ChooseDrafts(cost, {1, 5, false}, 1, c, {.max_seconds = 10.5}), (Ids{0}))
      << "over the cap already";
  // 20 prefill rows: the step is 31 without drafts, 32 with one.
  EXPECT_EQ(
      ChooseDrafts(cost, {1, 5, false}, 1, c, {.max_seconds = 32.5, .others = {20, 20, false}}),
      (Ids{1}));
}

TEST(DraftAcceptanceTest, FollowsKeptDraftsAndFadesBackToOneHalf) {
  DraftAcceptance a;
  EXPECT_DOUBLE_EQ(a.estimate(), 0.5);
  a.Update(4, 4);
  EXPECT_DOUBLE_EQ(a.estimate(), 5.0 / 6);
  for (int i = 0; i < 10; ++i) a.Update(4, 0);
  EXPECT_LT(a.estimate(), 0.35);
  for (int i = 0; i < 400; ++i) a.Update(0, 0);  // decode steps without drafts
  EXPECT_NEAR(a.estimate(), 0.5, 0.01);
}

TEST(StepTimeModelTest, RecoversTheCostOfRowsPositionsAndDrafting) {
  const auto truth = [](const StepShape& s) {
    return 0.010 + (s.drafts ? 0.002 : 0.0) + 0.0005 * s.rows + 1e-6 * s.kv;
  };
  StepTimeModel m;
  std::mt19937_64 rng(5);
  // Steps of 4 sequences without drafts, contexts growing: the rows never vary.
  for (int i = 0; i < 40; ++i) {
    const StepShape s{4, 4 * (100 + 3 * i), false};
    m.Observe(s, truth(s));
  }
  EXPECT_FALSE(m.Predict({4, 400, false}).has_value()) << "a row's cost is not determined";
  for (int i = 0; i < 200; ++i) {
    const int32_t batch = 1 + static_cast<int32_t>(rng() % 8);
    const int32_t drafts = static_cast<int32_t>(rng() % 3) * static_cast<int32_t>(rng() % 5);
    const int64_t context = 50 + static_cast<int64_t>(rng() % 500);
    const StepShape s{batch + drafts, batch * context + drafts, drafts > 0};
    m.Observe(s, truth(s));
  }
  for (const StepShape& s : {StepShape{1, 60, false}, StepShape{37, 9000, true}}) {
    ASSERT_TRUE(m.Predict(s).has_value());
    EXPECT_NEAR(*m.Predict(s), truth(s), 1e-9 + 1e-6 * truth(s));
  }
  // A window of steps that all lack drafts keeps the drafting cost it learnt, and does not
  // fold it into the rest.
  for (int i = 0; i < 200; ++i) {
    const StepShape s{1 + static_cast<int32_t>(rng() % 8), static_cast<int64_t>(rng() % 4000),
                      false};
    m.Observe(s, truth(s));
  }
  EXPECT_NEAR(m.coefficients()[0], 0.010, 1e-9);
  EXPECT_NEAR(m.coefficients()[1], 0.002, 1e-9);
}

TEST(StepTimeModelTest, ACostBelowZeroIsZero) {
  // Times that fall with the positions read (noise, say): that cost is zero, not negative,
  // and the rows' cost is fitted without it.
  StepTimeModel m;
  std::mt19937_64 rng(6);
  for (int i = 0; i < 128; ++i) {
    const int32_t rows = 1 + static_cast<int32_t>(rng() % 16);
    const int64_t kv = static_cast<int64_t>(rng() % 1000);
    m.Observe({rows, kv, false}, 0.01 + 0.001 * rows - 1e-7 * kv);
  }
  EXPECT_EQ(m.coefficients()[3], 0.0);
  EXPECT_GT(m.coefficients()[2], 0.0009);
  EXPECT_LT(m.coefficients()[2], 0.0011);
}

TEST(StepTimeModelTest, AFewSamplesDoNotSettleACost) {
  // One drafted step among 127 without (a slow one: a graph capture, say) does not make the
  // drafting overhead; the model asks for more steps with drafts.
  StepTimeModel m;
  std::mt19937_64 rng(7);
  for (int i = 0; i < 128; ++i) {
    const StepShape s{1 + static_cast<int32_t>(rng() % 8), 100 + i, i == 60};
    m.Observe(s, i == 60 ? 0.5 : 0.01 + 0.001 * s.rows);
  }
  EXPECT_EQ(m.coefficients()[1], 0.0);
  EXPECT_NEAR(m.coefficients()[2], 0.001, 1e-6);
  EXPECT_EQ(m.Lacks(), std::optional<bool>(true));
}

TEST(StepTimeModelTest, StepsWithDraftsOneInThirtyTwoKeepTheirCostMeasured) {
  // The engine's exploration once drafts stop paying: one step in 32 with drafts. They are
  // kept apart from the many without, so after 8 of them the drafting cost is fitted, and it
  // follows a change as new ones replace the old.
  StepTimeModel m;
  std::mt19937_64 rng(9);
  double g = 0.005;
  auto feed = [&](int steps) {
    for (int i = 0; i < steps; ++i) {
      const bool drafted = i % 32 == 31;
      const int32_t batch = 8 + static_cast<int32_t>(rng() % 3);
      const StepShape s{batch + (drafted ? 4 : 0), 800 + i % 100, drafted};
      m.Observe(s, 0.012 + (drafted ? g : 0.0) + 0.0002 * s.rows + 1e-6 * s.kv);
    }
  };
  feed(32 * 7);
  EXPECT_EQ(m.Lacks(), std::optional<bool>(true)) << "7 steps with drafts";
  feed(32 * 2);
  EXPECT_EQ(m.Lacks(), std::nullopt);
  EXPECT_NEAR(m.coefficients()[1], 0.005, 1e-6);
  g = 0.001;
  feed(32 * 40);  // 40 new ones replace the 32 kept
  EXPECT_NEAR(m.coefficients()[1], 0.001, 1e-6);
  // Steps without drafts only: after kStale of them the kind is measured again.
  for (int i = 0; i < StepTimeModel::kStale; ++i) m.Observe({9, 900, false}, 0.02);
  EXPECT_EQ(m.Lacks(), std::optional<bool>(true));
}

TEST(StepTimeModelTest, AStepFarOffTheFitDoesNotMoveIt) {
  StepTimeModel m;
  std::mt19937_64 rng(8);
  for (int i = 0; i < 128; ++i) {
    const StepShape s{1 + static_cast<int32_t>(rng() % 8), 100 + i, (i % 3) == 0};
    const double t = 0.01 + (s.drafts ? 0.002 : 0.0) + 0.001 * s.rows;
    m.Observe(s, i == 77 ? 10 * t : t);  // a stall
  }
  ASSERT_TRUE(m.Predict({4, 100, true}).has_value());
  EXPECT_NEAR(*m.Predict({4, 100, true}), 0.016, 1e-6);
  EXPECT_EQ(m.Lacks(), std::nullopt);
}

TEST(StepTimeModelTest, OneDraftAtATimeFoldsTheOverheadIntoTheRow) {
  // One sequence, one draft at a time: rows = 1 + [drafts], so only their sum is measured; the
  // row carries it, which predicts these steps exactly.
  StepTimeModel m;
  for (int i = 0; i < 128; ++i) {
    const bool drafted = i % 2 == 0;
    const StepShape s{drafted ? 2 : 1, 100 + i + (drafted ? 1 : 0), drafted};
    m.Observe(s, 0.01 + (drafted ? 0.003 : 0.0) + 0.001 * s.rows + 1e-6 * s.kv);
  }
  for (const StepShape& s : {StepShape{1, 150, false}, StepShape{2, 151, true}}) {
    ASSERT_TRUE(m.Predict(s).has_value());
    const double truth = 0.01 + (s.drafts ? 0.003 : 0.0) + 0.001 * s.rows + 1e-6 * s.kv;
    EXPECT_NEAR(*m.Predict(s), truth, 1e-6);
  }
}

class SpeculativeEngineTest : public ::testing::Test {
 protected:
  void SetUp() override {
    config_ = testing::SmallTestConfig();
    config_.num_layers = 2;
    config_.max_position_embeddings = 160;
    auto dir = testing::MakeModelDir(config_, "speculative", 5);
    ASSERT_TRUE(dir.ok()) << dir.status();
    backend_ = std::make_unique<CpuBackend>(1);
    auto model = Transformer::Load(*dir, *backend_);
    ASSERT_TRUE(model.ok()) << model.status();
    model_ = std::move(*model);
  }

  // Prompts that repeat themselves (so that drafts are found from the first decode step) and
  // random ones; greedy and seeded sampling; some end on a stop token.
  std::vector<GenerateRequest> Requests(int n, int max_tokens) const {
    std::mt19937_64 rng(3);
    std::vector<GenerateRequest> out;
    for (int i = 0; i < n; ++i) {
      GenerateRequest r;
      r.id = "r" + std::to_string(i);
      const int period = 2 + i % 5;
      std::vector<int32_t> pattern;
      for (int t = 0; t < period; ++t) pattern.push_back(static_cast<int32_t>(rng() % 300));
      const int len = 5 + static_cast<int>(rng() % 30);
      for (int t = 0; t < len; ++t) {
        r.prompt.push_back(i % 3 == 2 ? static_cast<int32_t>(rng() % 300) : pattern[t % period]);
      }
      r.params.max_tokens = max_tokens - i % 4;
      r.params.ignore_eos = true;
      if (i % 2 == 1) {
        r.params.temperature = 0.7f;
        r.params.top_p = 0.95f;
        r.params.seed = 100 + i;
      }
      out.push_back(r);
    }
    return out;
  }

  // Runs the requests, the i-th joining at step 2 i; results by id. Checks that every block
  // comes back.
  std::map<std::string, GenerateResult> Run(const EngineOptions& options,
                                            const std::vector<GenerateRequest>& requests,
                                            LlmEngine** keep = nullptr) {
    auto engine = LlmEngine::Create(*model_, options);
    EXPECT_TRUE(engine.ok()) << engine.status();
    if (!engine.ok()) return {};
    std::map<std::string, GenerateResult> results;
    for (int step = 0; step < 5000; ++step) {
      if (step % 2 == 0 && static_cast<size_t>(step / 2) < requests.size()) {
        EXPECT_TRUE((*engine)->AddRequest(requests[step / 2]).ok());
      }
      if (!(*engine)->HasWork() && static_cast<size_t>(step / 2) >= requests.size()) break;
      if (!(*engine)->HasWork()) continue;
      auto outputs = (*engine)->Step();
      EXPECT_TRUE(outputs.ok()) << outputs.status();
      if (!outputs.ok()) break;
      for (TokenOutput& out : *outputs) {
        GenerateResult& r = results[out.request_id];
        EXPECT_EQ(r.finish, FinishReason::kNone) << out.request_id << ": a token after its last";
        r.token_ids.push_back(out.token);
        if (out.finish != FinishReason::kNone) r.finish = out.finish;
      }
    }
    EXPECT_FALSE((*engine)->HasWork());
    EXPECT_EQ((*engine)->num_free_blocks(), (*engine)->cache().allocator().num_blocks());
    drafts_ = (*engine)->num_draft_tokens();
    accepted_ = (*engine)->num_accepted_draft_tokens();
    proposed_ = (*engine)->num_proposed_draft_tokens();
    preemptions_ = (*engine)->num_preemptions();
    step_model_ = (*engine)->step_time_model();
    return results;
  }

  void ExpectSameTokens(const std::map<std::string, GenerateResult>& got,
                        const std::map<std::string, GenerateResult>& want) {
    ASSERT_EQ(got.size(), want.size());
    for (const auto& [id, w] : want) {
      ASSERT_TRUE(got.count(id)) << id;
      EXPECT_EQ(got.at(id).token_ids, w.token_ids) << id;
      EXPECT_EQ(got.at(id).finish, w.finish) << id;
    }
  }

  static EngineOptions Options(int32_t drafts, int32_t block_size, int32_t num_blocks,
                               int32_t budget, int32_t running) {
    EngineOptions o;
    o.block_size = block_size;
    o.num_blocks = num_blocks;
    o.max_batch_tokens = budget;
    o.max_running = running;
    o.speculative.num_tokens = drafts;
    // Rows cost nothing: every proposed draft likelier than kMinDraftKeepChance goes in, the
    // same in every run (the engine's own step timings would make the drafts vary).
    o.speculative.choice = DraftChoice::kAll;
    return o;
  }

  ModelConfig config_;
  std::unique_ptr<CpuBackend> backend_;
  std::unique_ptr<Transformer> model_;
  int64_t drafts_ = 0, accepted_ = 0, proposed_ = 0, preemptions_ = 0;
  StepTimeModel step_model_;  // the last run's engine's
};

// Forward's extra rows (one pass over the lm_head for the last rows and the draft rows) draw
// what SampleRows after the forward draws, and leave the last rows' tokens and logits alone.
TEST_F(SpeculativeEngineTest, ExtraRowsDrawAsSampleRowsDoes) {
  const int32_t bs = 4;
  auto cache = KvCache::Create(*backend_, model_->CacheShape(16, bs));
  ASSERT_TRUE(cache.ok()) << cache.status();
  std::mt19937_64 rng(11);
  std::vector<std::vector<int32_t>> chunks = {{}, {}};
  for (int t = 0; t < 5; ++t) chunks[0].push_back(static_cast<int32_t>(rng() % 300));
  for (int t = 0; t < 7; ++t) chunks[1].push_back(static_cast<int32_t>(rng() % 300));
  const std::vector<kernels::RowSampling> last = {{}, {0.8f, 0, 0.9f, 0.37}};
  const std::vector<uint8_t> host_rows = {1, 0};
  const std::vector<int64_t> extra = {0, 2, 5, 6, 9};
  std::vector<kernels::RowSampling> rules;
  for (size_t i = 0; i < extra.size(); ++i) {
    rules.push_back(i % 2 ? kernels::RowSampling{0.7f, 20, 0.95f, 0.1 + 0.2 * i}
                          : kernels::RowSampling{});
  }
  std::vector<int32_t> tokens[2], drawn;
  std::vector<float> logits[2], scratch;
  for (int fused = 0; fused < 2; ++fused) {
    std::vector<BlockTable> tables(2);
    std::vector<SequenceInput> in;
    for (int s = 0; s < 2; ++s) {
      ASSERT_TRUE(
          tables[s].Reserve(static_cast<int32_t>(chunks[s].size()), bs, cache->allocator()).ok());
      in.push_back({chunks[s], 0, &tables[s]});
    }
    if (fused == 1) {
      ASSERT_TRUE(
          model_->Forward(in, *cache, logits[1], last, host_rows, tokens[1], nullptr, extra, rules)
              .ok());
    } else {
      ASSERT_TRUE(model_->Forward(in, *cache, logits[0], last, host_rows, tokens[0]).ok());
      ASSERT_TRUE(model_->SampleRows(extra, rules, scratch, drawn).ok());
      tokens[0].insert(tokens[0].end(), drawn.begin(), drawn.end());
    }
    for (BlockTable& t : tables) ASSERT_TRUE(t.Release(cache->allocator()).ok());
  }
  EXPECT_EQ(tokens[1], tokens[0]);
  const size_t vocab = static_cast<size_t>(config_.vocab_size);
  ASSERT_GE(logits[1].size(), vocab);
  EXPECT_TRUE(std::equal(logits[0].begin(), logits[0].begin() + vocab, logits[1].begin()))
      << "the first sequence's host row";
  // More rows than the batch's tokens are refused, not written past the scratch.
  std::vector<BlockTable> tables(1);
  ASSERT_TRUE(tables[0].Reserve(2, bs, cache->allocator()).ok());
  const std::vector<SequenceInput> one = {
      {std::span<const int32_t>(chunks[0]).first(2), 0, &tables[0]}};
  const std::vector<int64_t> too_many = {0, 1};
  EXPECT_EQ(model_
                ->Forward(one, *cache, logits[0], {kernels::RowSampling{}}, {0}, tokens[0], nullptr,
                          too_many, {kernels::RowSampling{}, kernels::RowSampling{}})
                .code(),
            absl::StatusCode::kInvalidArgument);
  ASSERT_TRUE(tables[0].Release(cache->allocator()).ok());
}

TEST_F(SpeculativeEngineTest, DraftsChangeNoTokenGreedyOrSeeded) {
  const std::vector<GenerateRequest> requests = Requests(8, 40);
  const auto want = Run(Options(0, 4, 256, 256, 8), requests);
  EXPECT_EQ(drafts_, 0);
  for (int32_t k : {1, 3, 5}) {
    const auto got = Run(Options(k, 4, 256, 256, 8), requests);
    ExpectSameTokens(got, want);
    std::printf("k %d: %lld drafts, %lld kept\n", k, static_cast<long long>(drafts_),
                static_cast<long long>(accepted_));
    EXPECT_GT(drafts_, 0) << "k " << k;
    EXPECT_GT(accepted_, 0) << "k " << k;
    EXPECT_LE(accepted_, drafts_);
  }
  // Draft rows drawn a few at a time after the forward (more than one projection may hold
  // with the last rows), not in the forward's own pass over the lm_head.
  EngineOptions sliced = Options(4, 4, 256, 256, 8);
  sliced.max_logits_per_call = 3 * config_.vocab_size;
  ExpectSameTokens(Run(sliced, requests), want);
  EXPECT_GT(accepted_, 0);
  // Drafts chosen by the engine's own timings of its steps: whatever they are, the tokens are.
  EngineOptions measured = Options(4, 4, 256, 256, 8);
  measured.speculative.choice = DraftChoice::kPaying;
  ExpectSameTokens(Run(measured, requests), want);
  EXPECT_GT(drafts_, 0) << "drafts go in until the engine has timed enough steps";
  EXPECT_TRUE(step_model_.Predict({8, 8 * 40, false}).has_value())
      << "decode steps of 1 to 8 sequences determine the cost of a row";
}

TEST_F(SpeculativeEngineTest, DraftsThatDoNotPayStayOut) {
  const std::vector<GenerateRequest> requests = Requests(6, 30);
  const auto want = Run(Options(0, 4, 256, 256, 6), requests);
  // Every row costs as much as a whole step: no draft is kept often enough to pay for one.
  EngineOptions costly = Options(4, 4, 256, 256, 6);
  costly.speculative.choice = DraftChoice::kPaying;
  costly.speculative.step_cost = [](const StepShape& s) { return 1.0 * s.rows; };
  ExpectSameTokens(Run(costly, requests), want);
  EXPECT_EQ(drafts_, 0);
  EXPECT_GT(proposed_, 0) << "the lookup proposed drafts; none went in";
  // A row costs a hundredth of a step: likely drafts pay.
  EngineOptions cheap = Options(4, 4, 256, 256, 6);
  cheap.speculative.choice = DraftChoice::kPaying;
  cheap.speculative.step_cost = [](const StepShape& s) { return 1.0 + 0.01 * s.rows; };
  ExpectSameTokens(Run(cheap, requests), want);
  EXPECT_GT(accepted_, 0);
}

TEST_F(SpeculativeEngineTest, NoDraftPushesAStepPastTheCap) {
  // A row costs 1% of a one-sequence step; a cap of 1.015 leaves no room for a draft's row,
  // one of 1.035 room for two.
  GenerateRequest r = Requests(1, 30)[0];
  EngineOptions o = Options(4, 4, 256, 256, 4);
  o.speculative.choice = DraftChoice::kPaying;
  o.speculative.step_cost = [](const StepShape& s) { return 1.0 + 0.01 * s.rows; };
  auto engine = LlmEngine::Create(*model_, o);
  ASSERT_TRUE(engine.ok());
  (*engine)->set_draft_step_cap(1.015);
  auto capped = (*engine)->Generate({r});
  ASSERT_TRUE(capped.ok()) << capped.status();
  EXPECT_EQ((*engine)->num_draft_tokens(), 0);
  (*engine)->set_draft_step_cap(1.035);
  ASSERT_TRUE((*engine)->AddRequest(r).ok());
  std::vector<int32_t> tokens;
  for (int step = 0; (*engine)->HasWork() && step < 100; ++step) {
    auto outputs = (*engine)->Step();
    ASSERT_TRUE(outputs.ok()) << outputs.status();
    for (const TokenOutput& out : *outputs) tokens.push_back(out.token);
    if (step > 0) EXPECT_LE((*engine)->last_batch()[0].second, 3) << "step " << step;
  }
  EXPECT_GT((*engine)->num_draft_tokens(), 0);
  EXPECT_EQ(tokens, (*capped)[0].token_ids);
  // A request's own TPOT target caps the steps it decodes in the same way.
  (*engine)->set_draft_step_cap(0);
  GenerateRequest own = r;
  own.id = "own";
  own.tpot_target_s = 1.015;
  const int64_t before = (*engine)->num_draft_tokens();
  auto targeted = (*engine)->Generate({own});
  ASSERT_TRUE(targeted.ok()) << targeted.status();
  EXPECT_EQ((*engine)->num_draft_tokens(), before);
  EXPECT_EQ((*targeted)[0].token_ids, (*capped)[0].token_ids);
  // A target with room for two draft rows: drafts, two at most.
  own.id = "roomy";
  own.tpot_target_s = 1.035;
  ASSERT_TRUE((*engine)->AddRequest(own).ok());
  for (int step = 0; (*engine)->HasWork() && step < 100; ++step) {
    ASSERT_TRUE((*engine)->Step().ok());
    if (step > 0) EXPECT_LE((*engine)->last_batch()[0].second, 3) << "step " << step;
  }
  EXPECT_GT((*engine)->num_draft_tokens(), before);
  // Every draft (DraftChoice::kAll) is not held to a cap in seconds.
  o.speculative.choice = DraftChoice::kAll;
  auto all = LlmEngine::Create(*model_, o);
  ASSERT_TRUE(all.ok());
  (*all)->set_draft_step_cap(0.001);
  ASSERT_TRUE((*all)->Generate({r}).ok());
  EXPECT_GT((*all)->num_draft_tokens(), 0);
}

TEST_F(SpeculativeEngineTest, SeededSamplingKeepsDrafts) {
  // Only the seeded requests: their drafts are kept by the sampled draws, not by argmax.
  std::vector<GenerateRequest> requests;
  for (GenerateRequest& r : Requests(12, 40)) {
    if (r.params.seed.has_value()) requests.push_back(std::move(r));
  }
  ASSERT_EQ(requests.size(), 6u);
  const auto want = Run(Options(0, 4, 256, 256, 8), requests);
  ExpectSameTokens(Run(Options(4, 4, 256, 256, 8), requests), want);
  EXPECT_GT(accepted_, 0);
}

TEST_F(SpeculativeEngineTest, PrefixCacheHitsAfterDraftsAreTheComputedTokens) {
  // A reply whose drafts were kept (and whose blocks drafts wrote past) is the prefix of the
  // next turn: its cached blocks must hold the K/V of the tokens it kept.
  std::vector<GenerateRequest> first = Requests(2, 40);
  auto turn = [&](const EngineOptions& options) {
    auto engine = LlmEngine::Create(*model_, options);
    EXPECT_TRUE(engine.ok());
    auto one = (*engine)->Generate({first[0]});
    EXPECT_TRUE(one.ok());
    GenerateRequest next = first[0];
    next.id = "next";
    next.prompt.insert(next.prompt.end(), (*one)[0].token_ids.begin(), (*one)[0].token_ids.end());
    next.prompt.push_back(7);
    next.params.max_tokens = 12;
    next.return_logits = true;  // no drafts: the logits compare the cached K/V alone
    auto two = (*engine)->Generate({next});
    EXPECT_TRUE(two.ok());
    const int64_t hits = (*engine)->num_prefix_hit_tokens();
    drafts_ = (*engine)->num_draft_tokens();
    accepted_ = (*engine)->num_accepted_draft_tokens();
    return std::make_pair((*two)[0], hits);
  };
  EngineOptions cached = Options(4, 4, 256, 256, 4);
  auto [with, hits] = turn(cached);
  EXPECT_GT(accepted_, 0);
  // The first turn's prompt and most of its reply (drafted steps wrote the reply's blocks).
  EXPECT_GE(hits, static_cast<int64_t>(first[0].prompt.size()) + 32)
      << "the second turn starts from the first's blocks";
  cached.prefix_caching = false;
  cached.speculative.num_tokens = 0;
  auto [want, no_hits] = turn(cached);
  EXPECT_EQ(no_hits, 0);
  EXPECT_EQ(with.token_ids, want.token_ids);
  ASSERT_EQ(with.logits.size(), want.logits.size());
  for (size_t t = 0; t < want.logits.size(); ++t) {
    EXPECT_TRUE(testing::AllClose(with.logits[t], want.logits[t], 1e-4, 1e-4)) << t;
  }
}

TEST_F(SpeculativeEngineTest, DraftsStillFindBlocksWhenEveryFreeBlockCachesAPrefix) {
  // Earlier requests leave every free block holding cached K/V (33 + 4 tokens: 9 whole blocks
  // computed): drafts then take (evict) the least recently used ones, and draft as much as on
  // a cold cache.
  GenerateRequest r = Requests(1, 40)[0];
  auto cold = LlmEngine::Create(*model_, Options(4, 4, 48, 256, 4));
  ASSERT_TRUE(cold.ok());
  auto want = (*cold)->Generate({r});
  ASSERT_TRUE(want.ok());
  ASSERT_GT((*cold)->num_draft_tokens(), 0);
  auto engine = LlmEngine::Create(*model_, Options(4, 4, 48, 256, 4));
  ASSERT_TRUE(engine.ok());
  std::mt19937_64 rng(17);
  for (int i = 0; i < 8; ++i) {
    GenerateRequest w;
    w.id = "warm" + std::to_string(i);
    for (int t = 0; t < 33; ++t) w.prompt.push_back(static_cast<int32_t>(rng() % 300));
    w.params.max_tokens = 4;
    w.params.ignore_eos = true;
    ASSERT_TRUE((*engine)->Generate({w}).ok());
  }
  EXPECT_EQ((*engine)->cache().allocator().num_uncached_free(), 0);
  auto got = (*engine)->Generate({r});
  ASSERT_TRUE(got.ok()) << got.status();
  EXPECT_EQ((*got)[0].token_ids, (*want)[0].token_ids);
  EXPECT_EQ((*engine)->num_draft_tokens(), (*cold)->num_draft_tokens());
  EXPECT_EQ((*engine)->num_free_blocks(), 48);
}

TEST_F(SpeculativeEngineTest, SmallBudgetSmallCacheAndPreemption) {
  const std::vector<GenerateRequest> requests = Requests(6, 30);
  const auto want = Run(Options(0, 4, 256, 256, 6), requests);
  // A budget that barely covers the decodes: drafts take only what they leave.
  ExpectSameTokens(Run(Options(4, 4, 256, 7, 6), requests), want);
  EXPECT_GT(drafts_, 0);
  // Blocks for about two sequences: drafts get blocks only when free ones are left, and
  // sequences are preempted as without drafts.
  ExpectSameTokens(Run(Options(4, 4, 22, 64, 6), requests), want);
  EXPECT_GT(preemptions_, 0);
  EXPECT_GT(drafts_, 0);
}

TEST_F(SpeculativeEngineTest, BlocksOnlyRejectedDraftsReachedGoBack) {
  // One sequence, 8 drafts a step in blocks of 4: after every step it holds the blocks of its
  // computed tokens (all but the last) and no more, as without drafts.
  GenerateRequest r = Requests(1, 60)[0];
  EngineOptions o = Options(8, 4, 256, 256, 4);
  o.prefix_caching = false;
  auto engine = LlmEngine::Create(*model_, o);
  ASSERT_TRUE(engine.ok());
  const int32_t prompt = static_cast<int32_t>(r.prompt.size());
  ASSERT_TRUE((*engine)->AddRequest(r).ok());
  int32_t generated = 0;
  while ((*engine)->HasWork()) {
    auto outputs = (*engine)->Step();
    ASSERT_TRUE(outputs.ok()) << outputs.status();
    generated += static_cast<int32_t>(outputs->size());
    if ((*engine)->HasWork()) {
      EXPECT_EQ((*engine)->cache().allocator().num_used(),
                BlockTable::BlocksFor(prompt + generated - 1, 4))
          << generated << " tokens";
    }
  }
  EXPECT_GT((*engine)->num_draft_tokens(), (*engine)->num_accepted_draft_tokens())
      << "some drafts were rejected";
  EXPECT_EQ((*engine)->num_free_blocks(), 256);
}

TEST_F(SpeculativeEngineTest, DraftsNeverDisplaceADecode) {
  // A budget of one token more than the sequences: every decoding sequence is in every step.
  std::vector<GenerateRequest> requests = Requests(4, 24);
  auto engine = LlmEngine::Create(*model_, Options(4, 4, 256, 5, 4));
  ASSERT_TRUE(engine.ok());
  for (const GenerateRequest& r : requests) ASSERT_TRUE((*engine)->AddRequest(r).ok());
  std::set<std::string> decoding;  // have their first token, not finished
  for (int n = 0; n < 1000 && (*engine)->HasWork(); ++n) {
    auto outputs = (*engine)->Step();
    ASSERT_TRUE(outputs.ok()) << outputs.status();
    std::set<std::string> in_batch;
    for (const auto& [id, tokens] : (*engine)->last_batch()) in_batch.insert(id);
    for (const std::string& id : decoding) EXPECT_TRUE(in_batch.count(id)) << id << " step " << n;
    for (const TokenOutput& out : *outputs) {
      if (out.finish == FinishReason::kNone) {
        decoding.insert(out.request_id);
      } else {
        decoding.erase(out.request_id);
      }
    }
  }
  EXPECT_GT((*engine)->num_draft_tokens(), 0);
}

TEST_F(SpeculativeEngineTest, StopsAtTheContextMaxTokensAndStopTokens) {
  std::vector<GenerateRequest> requests = Requests(6, 50);
  // One runs into the model's context, one ends on a stop token it is likely to repeat.
  requests[0].prompt.resize(std::min<size_t>(requests[0].prompt.size(), 20));
  requests[0].params.max_tokens = 1000;
  const auto plain = Run(Options(0, 4, 512, 256, 8), requests);
  requests[1].params.stop_token_ids = {plain.at("r1").token_ids.at(7)};
  requests[2].params.max_tokens = 1;
  const int64_t context = config_.max_context();
  const auto want = Run(Options(0, 4, 512, 256, 8), requests);
  EXPECT_EQ(want.at("r0").finish, FinishReason::kLength);
  EXPECT_EQ(static_cast<int64_t>(want.at("r0").token_ids.size() + requests[0].prompt.size()),
            context);
  EXPECT_EQ(want.at("r1").finish, FinishReason::kStop);
  ExpectSameTokens(Run(Options(5, 4, 512, 256, 8), requests), want);
  EXPECT_GT(accepted_, 0);
}

TEST_F(SpeculativeEngineTest, LogprobsComeFromTheRowsOfTheSentTokens) {
  std::vector<GenerateRequest> requests = Requests(6, 30);
  for (GenerateRequest& r : requests) r.params.logprobs = 3;
  auto run = [&](int32_t drafts) {
    auto engine = LlmEngine::Create(*model_, Options(drafts, 4, 256, 256, 8));
    EXPECT_TRUE(engine.ok());
    auto results = (*engine)->Generate(requests);
    EXPECT_TRUE(results.ok()) << results.status();
    drafts_ = (*engine)->num_draft_tokens();
    accepted_ = (*engine)->num_accepted_draft_tokens();
    return *results;
  };
  const std::vector<GenerateResult> want = run(0);
  const std::vector<GenerateResult> got = run(4);
  EXPECT_GT(accepted_, 0);
  ASSERT_EQ(got.size(), want.size());
  for (size_t i = 0; i < want.size(); ++i) {
    ASSERT_EQ(got[i].token_ids, want[i].token_ids) << i;
    ASSERT_EQ(got[i].logprobs.size(), want[i].logprobs.size()) << i;
    for (size_t t = 0; t < want[i].logprobs.size(); ++t) {
      const TokenLogprobs& a = got[i].logprobs[t];
      const TokenLogprobs& b = want[i].logprobs[t];
      EXPECT_NEAR(a.logprob, b.logprob, 1e-4) << i << " token " << t;
      ASSERT_EQ(a.top.size(), 3u);
      ASSERT_EQ(b.top.size(), 3u);
      for (size_t k = 0; k < 3; ++k) {
        EXPECT_NEAR(a.top[k].second, b.top[k].second, 1e-4) << i << " token " << t;
        // The ids, unless two candidates tie within what the two step shapes change.
        const bool tied = (k > 0 && b.top[k - 1].second - b.top[k].second < 1e-4) ||
                          (k + 1 < 3 && b.top[k].second - b.top[k + 1].second < 1e-4);
        if (!tied) EXPECT_EQ(a.top[k].first, b.top[k].first) << i << " token " << t;
      }
    }
  }
}

TEST_F(SpeculativeEngineTest, LogitsProcessingDraftsAsIfTheDraftsWereTokens) {
  // Each row after j drafts is processed with those drafts counted as reply tokens (penalties,
  // min_tokens), then drawn on the host: the tokens and logprobs of plain decoding. Each kind
  // of processing alone, on prompts that repeat themselves, keeps some drafts.
  std::mt19937_64 rng(23);
  for (int kind = 0; kind < 6; ++kind) {
    std::vector<GenerateRequest> requests;
    for (int i = 0; i < 4; ++i) {
      GenerateRequest r;
      r.id = "p" + std::to_string(i);
      std::vector<int32_t> pattern;
      for (int t = 0; t < 2 + i; ++t) pattern.push_back(static_cast<int32_t>(rng() % 300));
      for (int t = 0; t < 24 + 5 * i; ++t) r.prompt.push_back(pattern[t % pattern.size()]);
      SamplingParams& p = r.params;
      p.max_tokens = 40;
      p.ignore_eos = true;
      p.logprobs = i % 2 == 1 ? 2 : -1;
      switch (kind) {
        case 0:
          p.repetition_penalty = 1.3f;
          break;
        case 1:
          p.frequency_penalty = 0.6f;
          p.presence_penalty = 0.4f;
          break;
        case 2:
          p.logit_bias = {{pattern[0], 3.0f}, {pattern[1], -2.0f}};
          break;
        case 3:
          p.min_tokens = 20;
          break;  // the stop token is set below
        case 4:
          p.min_p = 0.05f;
          p.temperature = 0.9f;
          p.seed = 5 + i;
          break;
        case 5:
          p.allowed_token_ids = pattern;
          break;
      }
      requests.push_back(std::move(r));
    }
    auto run = [&](int32_t drafts) {
      EngineOptions o = Options(drafts, 4, 256, 256, 4);
      o.speculative.ngram_min = 1;
      auto engine = LlmEngine::Create(*model_, o);
      EXPECT_TRUE(engine.ok());
      auto results = (*engine)->Generate(requests);
      EXPECT_TRUE(results.ok()) << results.status();
      drafts_ = (*engine)->num_draft_tokens();
      accepted_ = (*engine)->num_accepted_draft_tokens();
      EXPECT_EQ((*engine)->num_free_blocks(), 256);
      return *results;
    };
    if (kind == 3) {  // a stop token the plain reply has early, held back by min_tokens
      for (GenerateRequest& r : requests) r.params.min_tokens = 0;
      const std::vector<GenerateResult> free = run(0);
      for (size_t i = 0; i < requests.size(); ++i) {
        requests[i].params.stop_token_ids = {free[i].token_ids.at(4)};
        requests[i].params.min_tokens = 20;
      }
    }
    const std::vector<GenerateResult> want = run(0);
    const std::vector<GenerateResult> got = run(4);
    std::printf("kind %d: %lld drafts, %lld kept\n", kind, static_cast<long long>(drafts_),
                static_cast<long long>(accepted_));
    EXPECT_GT(accepted_, 0) << "kind " << kind;
    for (size_t i = 0; i < want.size(); ++i) {
      EXPECT_EQ(got[i].token_ids, want[i].token_ids) << "kind " << kind << " request " << i;
      EXPECT_EQ(got[i].finish, want[i].finish) << "kind " << kind << " request " << i;
      if (kind == 3) EXPECT_GE(got[i].token_ids.size(), 20u) << i;
      ASSERT_EQ(got[i].logprobs.size(), want[i].logprobs.size()) << i;
      for (size_t t = 0; t < want[i].logprobs.size(); ++t) {
        const TokenLogprobs& a = got[i].logprobs[t];
        const TokenLogprobs& b = want[i].logprobs[t];
        EXPECT_NEAR(a.logprob, b.logprob, 1e-4) << "kind " << kind << " " << i << " " << t;
        ASSERT_EQ(a.top.size(), b.top.size()) << "kind " << kind << " " << i << " " << t;
        for (size_t k = 0; k < b.top.size(); ++k) {
          const bool tied = (k > 0 && b.top[k - 1].second - b.top[k].second < 1e-4) ||
                            (k + 1 < b.top.size() && b.top[k].second - b.top[k + 1].second < 1e-4);
          if (!tied) EXPECT_EQ(a.top[k].first, b.top[k].first) << kind << " " << i << " " << t;
        }
      }
    }
  }
}

TEST_F(SpeculativeEngineTest, ReturnLogitsDecodesWithoutDrafts) {
  std::vector<GenerateRequest> requests = Requests(4, 30);
  for (GenerateRequest& r : requests) r.return_logits = true;
  const auto want = Run(Options(0, 4, 256, 256, 4), requests);
  ExpectSameTokens(Run(Options(4, 4, 256, 256, 4), requests), want);
  EXPECT_EQ(drafts_, 0);
}

TEST_F(SpeculativeEngineTest, RefusesBadOptions) {
  for (auto [k, lo, hi] : {std::tuple{-1, 2, 4}, {65, 2, 4}, {4, 0, 4}, {4, 3, 2}, {4, 2, 65}}) {
    EngineOptions o = Options(k, 4, 64, 64, 4);
    o.speculative.ngram_min = lo;
    o.speculative.ngram_max = hi;
    auto engine = LlmEngine::Create(*model_, o);
    EXPECT_EQ(engine.status().code(), absl::StatusCode::kInvalidArgument) << k << lo << hi;
  }
}

}  // namespace
}  // namespace pds::engine

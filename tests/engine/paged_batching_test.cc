// Paged, batched, chunked generation gives the tokens and logits of single-sequence unpaged
// generation, whatever the block size, batch composition or preemption.
#include <map>
#include <memory>

#include "engine/backend/cpu_backend.h"
#include "engine/model/transformer.h"
#include "engine/runtime/llm_engine.h"
#include "gtest/gtest.h"
#include "tests/testing/test_util.h"

namespace pds::engine {
namespace {

struct Case {
  int prompt_len;
  int max_tokens;
  int join_step;  // engine step at which the request is added
};

const std::vector<Case>& Cases() {
  static const std::vector<Case> cases = {
      {1, 6, 0}, {37, 9, 0}, {7, 3, 1}, {3, 12, 2}, {20, 5, 2}, {16, 7, 5}, {33, 4, 9},
  };
  return cases;
}

class PagedBatchingTest : public ::testing::Test {
 protected:
  void SetUp() override {
    ModelConfig config = testing::SmallTestConfig();
    config.num_layers = 3;
    auto dir = testing::MakeModelDir(config, "paged_batching", 3);
    ASSERT_TRUE(dir.ok()) << dir.status();
    backend_ = std::make_unique<CpuBackend>(1);
    auto model = Transformer::Load(*dir, *backend_);
    ASSERT_TRUE(model.ok()) << model.status();
    model_ = std::move(*model);
    std::mt19937_64 rng(11);
    for (size_t i = 0; i < Cases().size(); ++i) {
      GenerateRequest r;
      r.id = "r" + std::to_string(i);
      for (int t = 0; t < Cases()[i].prompt_len; ++t) {
        r.prompt.push_back(static_cast<int32_t>(rng() % config.vocab_size));
      }
      r.params.max_tokens = Cases()[i].max_tokens;
      r.params.ignore_eos = true;
      r.return_logits = true;
      requests_.push_back(r);
    }
    // Baseline: each request alone, in one block that holds the whole sequence.
    for (const auto& r : requests_) {
      auto engine = LlmEngine::Create(
          *model_,
          {.block_size = 128, .num_blocks = 1, .max_batch_tokens = 4096, .max_running = 1});
      ASSERT_TRUE(engine.ok()) << engine.status();
      auto result = (*engine)->Generate({r});
      ASSERT_TRUE(result.ok()) << result.status();
      baseline_[r.id] = (*result)[0];
      ASSERT_EQ((*result)[0].token_ids.size(), static_cast<size_t>(r.params.max_tokens));
    }
  }

  // Runs the requests joining at their steps; returns results by id.
  std::map<std::string, GenerateResult> RunStaggered(const EngineOptions& options,
                                                     int64_t* preemptions = nullptr) {
    auto engine = LlmEngine::Create(*model_, options);
    EXPECT_TRUE(engine.ok()) << engine.status();
    std::map<std::string, GenerateResult> results;
    for (int step = 0; step < 500; ++step) {
      for (size_t i = 0; i < requests_.size(); ++i) {
        if (Cases()[i].join_step == step) {
          EXPECT_TRUE((*engine)->AddRequest(requests_[i]).ok());
        }
      }
      if (!(*engine)->HasWork() && step > 10) break;
      auto outputs = (*engine)->Step();
      EXPECT_TRUE(outputs.ok()) << outputs.status();
      if (!outputs.ok()) break;
      for (auto& out : *outputs) {
        GenerateResult& r = results[out.request_id];
        r.token_ids.push_back(out.token);
        r.logits.push_back(out.logits);
        if (out.finish != FinishReason::kNone) r.finish = out.finish;
      }
    }
    EXPECT_FALSE((*engine)->HasWork());
    EXPECT_EQ((*engine)->num_free_blocks(), (*engine)->cache().allocator().num_blocks())
        << "every block is returned";
    if (preemptions) *preemptions = (*engine)->num_preemptions();
    return results;
  }

  void ExpectMatchesBaseline(const std::map<std::string, GenerateResult>& results) {
    ASSERT_EQ(results.size(), requests_.size());
    for (const auto& [id, expected] : baseline_) {
      const GenerateResult& got = results.at(id);
      EXPECT_EQ(got.token_ids, expected.token_ids) << id;
      EXPECT_EQ(got.finish, FinishReason::kLength) << id;
      ASSERT_EQ(got.logits.size(), expected.logits.size()) << id;
      for (size_t t = 0; t < got.logits.size(); ++t) {
        double scale = 0;
        for (float v : expected.logits[t]) scale = std::max<double>(scale, std::abs(v));
        EXPECT_TRUE(testing::AllClose(got.logits[t], expected.logits[t], 1e-5, 1e-5 * scale))
            << id << " token " << t;
      }
    }
  }

  std::unique_ptr<CpuBackend> backend_;
  std::unique_ptr<Transformer> model_;
  std::vector<GenerateRequest> requests_;
  std::map<std::string, GenerateResult> baseline_;
};

TEST_F(PagedBatchingTest, BlockSize1) {
  ExpectMatchesBaseline(RunStaggered({.block_size = 1, .num_blocks = 512}));
}

TEST_F(PagedBatchingTest, BlockSize7) {
  ExpectMatchesBaseline(RunStaggered({.block_size = 7, .num_blocks = 64}));
}

TEST_F(PagedBatchingTest, BlockSize16) {
  ExpectMatchesBaseline(RunStaggered({.block_size = 16, .num_blocks = 32}));
}

TEST_F(PagedBatchingTest, ChunkedPrefillUnderSmallTokenBudget) {
  // Prompts longer than the budget are prefilled in chunks that extend the cached prefix.
  ExpectMatchesBaseline(
      RunStaggered({.block_size = 7, .num_blocks = 64, .max_batch_tokens = 10, .max_running = 3}));
}

TEST_F(PagedBatchingTest, PreemptionWhenBlocksRunOut) {
  int64_t preemptions = 0;
  auto results =
      RunStaggered({.block_size = 4, .num_blocks = 14, .max_batch_tokens = 64}, &preemptions);
  EXPECT_GT(preemptions, 0) << "the cache is small enough to force preemption";
  ExpectMatchesBaseline(results);
}

TEST_F(PagedBatchingTest, AllAtOnceMatchesToo) {
  auto engine = LlmEngine::Create(*model_, {.block_size = 16, .num_blocks = 64});
  ASSERT_TRUE(engine.ok());
  auto results = (*engine)->Generate(requests_);
  ASSERT_TRUE(results.ok()) << results.status();
  std::map<std::string, GenerateResult> by_id;
  for (auto& r : *results) by_id[r.request_id] = r;
  ExpectMatchesBaseline(by_id);
}

}  // namespace
}  // namespace pds::engine

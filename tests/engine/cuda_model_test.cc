// Whole-model parity: the CUDA backend (bf16 and fp16) against the CPU backend (fp32) on
// generated tiny and small models, teacher-forced through a ragged prefill and decode steps;
// and the engine on CUDA end to end (mixed prefill/decode batches, preemption-free, every
// block returned). Skips without a CUDA device.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <random>
#include <thread>

#include "engine/backend/backend.h"
#include "engine/kv_cache/kv_cache.h"
#include "engine/model/presets.h"
#include "engine/model/transformer.h"
#include "engine/runtime/kv_handoff.h"
#include "engine/runtime/llm_engine.h"
#include "gtest/gtest.h"
#include "kernels/sampling.h"
#include "tests/testing/test_util.h"
#if PDS_HAVE_CUDA
#include "engine/backend/cuda_backend.h"
#include "kernels/cuda/ops.h"
#endif

namespace pds::engine {
namespace {

struct ModelParam {
  const char* preset;
  DType dtype;
};

// Largest |a - e| of a row over the row's largest |e|.
double RowError(const float* a, const float* e, int64_t n) {
  double err = 0, scale = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (!std::isfinite(a[i])) return INFINITY;
    err = std::max(err, std::fabs(static_cast<double>(a[i]) - e[i]));
    scale = std::max(scale, std::fabs(static_cast<double>(e[i])));
  }
  return err / std::max(scale, 1e-30);
}

// Difference between the two largest entries over the largest magnitude.
double Top2Margin(const float* e, int64_t n) {
  float a = -INFINITY, b = -INFINITY, scale = 0;
  for (int64_t i = 0; i < n; ++i) {
    scale = std::max(scale, std::fabs(e[i]));
    if (e[i] > a) {
      b = a;
      a = e[i];
    } else if (e[i] > b) {
      b = e[i];
    }
  }
  return (a - b) / std::max(scale, 1e-30f);
}

class CudaModelTest : public ::testing::TestWithParam<ModelParam> {
 protected:
  void SetUp() override {
    if (!testing::HasCudaDevice()) GTEST_SKIP() << "no CUDA device";
  }
  // bf16 carries 8 significant bits, fp16 11: the tolerance on logits relative to the row's
  // largest logit after the whole model (measured on the H100 2026-11-27: worst 1.4e-2 bf16,
  // 1.7e-3 fp16 over 101 rows of tiny and small).
  double Tolerance() const { return GetParam().dtype == DType::kBF16 ? 2.5e-2 : 4e-3; }

  struct Engine {
    ModelConfig config;
    std::unique_ptr<Backend> backend;
    std::unique_ptr<Transformer> model;
    std::unique_ptr<LlmEngine> engine;
  };
  // The preset's model with seeded random weights on a CUDA backend of the parameter's dtype.
  // Without prefix caching unless `caching`: several tests compare runs of one prompt on one
  // engine as the same computation, which a cache hit would change.
  void MakeEngine(uint64_t seed, EngineOptions eo, bool graphs, Engine& e, bool caching = false) {
    eo.prefix_caching = caching;
    auto config = PresetConfig(GetParam().preset);
    ASSERT_TRUE(config.ok());
    e.config = *config;
    BackendOptions o;
    o.kind = "cuda";
    o.dtype = GetParam().dtype;
    o.cuda_graphs = graphs;
    auto backend = CreateBackend(o);
    ASSERT_TRUE(backend.ok()) << backend.status();
    e.backend = std::move(*backend);
    auto model = Transformer::CreateRandom(e.config, *e.backend, seed);
    ASSERT_TRUE(model.ok()) << model.status();
    e.model = std::move(*model);
    auto engine = LlmEngine::Create(*e.model, eo);
    ASSERT_TRUE(engine.ok()) << engine.status();
    e.engine = std::move(*engine);
  }
  // The tokens of the same requests with the kernel setting `name` unset and set to `value`:
  // equal where the setting fuses launches that compute the same values (prefill in chunks and
  // graph-replayed decode steps alike).
  void ExpectTheSameTokensWith(const char* name, const char* value);
};

// The CUDA model's logits against the CPU fp32 backend's, teacher-forced (see below).
void CheckTeacherForcedLogits(const ModelParam& p, double tolerance);

TEST_P(CudaModelTest, TeacherForcedLogitsMatchCpu) {
  CheckTeacherForcedLogits(GetParam(), Tolerance());
}

// The same with the tensor-core decode attention kernel (PDS_ATTN_DECODE=mma).
TEST_P(CudaModelTest, TeacherForcedLogitsMatchCpuWithMmaDecode) {
#if PDS_HAVE_CUDA
  setenv("PDS_ATTN_DECODE", "mma", 1);
  kernels::cuda::ReloadKernelSettings();
  // Restored however the check ends (its assertions return early), or later tests in this
  // binary would run the mma kernel unawares.
  struct Restore {
    ~Restore() {
      unsetenv("PDS_ATTN_DECODE");
      kernels::cuda::ReloadKernelSettings();
    }
  } restore;
  CheckTeacherForcedLogits(GetParam(), Tolerance());
#endif
}

// Ragged prompts (one prefilled in two chunks) and then 24 decode steps of all of them, each
// step's input the CPU's greedy tokens: every logit row within `tolerance` of the row's largest
// logit, and the greedy token equal wherever the CPU's top-2 margin exceeds twice that.
void CheckTeacherForcedLogits(const ModelParam& p, double tolerance) {
  auto config = PresetConfig(p.preset);
  ASSERT_TRUE(config.ok());
  auto dir = testing::MakeModelDir(*config, std::string("cuda_") + p.preset, 5);
  ASSERT_TRUE(dir.ok()) << dir.status();
  auto cpu = CreateBackend({.kind = "cpu", .num_threads = 0});
  ASSERT_TRUE(cpu.ok());
  BackendOptions o;
  o.kind = "cuda";
  o.dtype = p.dtype;
  auto gpu = CreateBackend(o);
  ASSERT_TRUE(gpu.ok()) << gpu.status();
  auto mc = Transformer::Load(*dir, **cpu);
  auto mg = Transformer::Load(*dir, **gpu);
  ASSERT_TRUE(mc.ok()) << mc.status();
  ASSERT_TRUE(mg.ok()) << mg.status();
  const int32_t bs = 16, blocks = 256;
  auto cc = KvCache::Create(**cpu, (*mc)->CacheShape(blocks, bs));
  auto cg = KvCache::Create(**gpu, (*mg)->CacheShape(blocks, bs));
  ASSERT_TRUE(cc.ok() && cg.ok());

  // Ragged prompts; the second is prefilled in two chunks (a cached prefix).
  const int64_t vocab = config->vocab_size;
  std::mt19937 rng(11);
  const std::vector<int> lengths = {5, 37, 100, 1};
  std::vector<std::vector<int32_t>> tokens(lengths.size());
  std::vector<BlockTable> tables(lengths.size());
  for (size_t s = 0; s < lengths.size(); ++s) {
    for (int i = 0; i < lengths[s]; ++i) tokens[s].push_back(rng() % vocab);
    // Same block ids on both caches (allocated from the CPU cache's allocator).
    ASSERT_TRUE(tables[s].Reserve(lengths[s] + 40, bs, cc->allocator()).ok());
  }
  double worst = 0;
  int compared = 0, argmax_checked = 0;
  auto step = [&](std::vector<SequenceInput> in) {
    std::vector<float> lc, lg;
    ASSERT_TRUE((*mc)->Forward(in, *cc, lc).ok());
    const absl::Status s = (*mg)->Forward(in, *cg, lg);
    ASSERT_TRUE(s.ok()) << s;
    ASSERT_EQ(lc.size(), lg.size());
    for (size_t r = 0; r < in.size(); ++r) {
      const float* e = lc.data() + r * vocab;
      const float* a = lg.data() + r * vocab;
      const double err = RowError(a, e, vocab);
      worst = std::max(worst, err);
      ++compared;
      EXPECT_LE(err, tolerance) << "sequence " << r;
      if (Top2Margin(e, vocab) > 2 * tolerance) {
        ++argmax_checked;
        EXPECT_EQ(kernels::cpu::Argmax(a, vocab), kernels::cpu::Argmax(e, vocab));
      }
    }
    // Teacher forcing: every sequence continues with the CPU's greedy token.
    for (size_t r = 0; r < in.size(); ++r) {
      for (size_t s = 0; s < tokens.size(); ++s) {
        if (in[r].table == &tables[s]) {
          tokens[s].push_back(kernels::cpu::Argmax(lc.data() + r * vocab, vocab));
        }
      }
    }
  };
  // Prefill: seq 1 in two chunks (20 then 17 tokens), the others whole.
  std::vector<std::vector<int32_t>> firsts = {
      tokens[0], {tokens[1].begin(), tokens[1].begin() + 20}, tokens[2], tokens[3]};
  {
    std::vector<SequenceInput> in;
    for (size_t s = 0; s < 4; ++s) in.push_back({firsts[s], 0, &tables[s]});
    // The chunked sequence's sampled token is not used: drop it afterwards.
    step(in);
    tokens[1].resize(37);
  }
  {
    std::vector<int32_t> rest(tokens[1].begin() + 20, tokens[1].begin() + 37);
    std::vector<SequenceInput> in = {{rest, 20, &tables[1]}};
    step(in);
  }
  // Decode steps for all four together.
  for (int t = 0; t < 24; ++t) {
    std::vector<SequenceInput> in;
    for (size_t s = 0; s < 4; ++s) {
      const int32_t pos = static_cast<int32_t>(tokens[s].size()) - 1;
      in.push_back({std::span<const int32_t>(tokens[s]).subspan(pos, 1), pos, &tables[s]});
    }
    step(in);
  }
  std::printf(
      "%s %s: %d logit rows, worst error %.4g of the row's largest logit (tolerance %.3g), "
      "%d greedy tokens checked\n",
      p.preset, std::string(DTypeName(p.dtype)).c_str(), compared, worst, tolerance,
      argmax_checked);
  EXPECT_GE(argmax_checked, 10);  // the greedy check is not vacuous
}

TEST_P(CudaModelTest, EngineServesMixedBatchesAndReturnsEveryBlock) {
  EngineOptions eo;
  eo.num_blocks = 128;
  eo.max_batch_tokens = 256;  // forces chunked prefills mixed with decodes
  Engine e;
  ASSERT_NO_FATAL_FAILURE(MakeEngine(3, eo, /*graphs=*/true, e));
  std::vector<GenerateRequest> requests;
  std::mt19937 rng(3);
  for (int i = 0; i < 12; ++i) {
    GenerateRequest r;
    r.id = "r" + std::to_string(i);
    const int len = 1 + static_cast<int>(rng() % 300);
    for (int j = 0; j < len; ++j) r.prompt.push_back(rng() % e.config.vocab_size);
    r.params.max_tokens = 8 + i;
    r.params.ignore_eos = true;
    if (i % 2 == 1) {
      r.params.temperature = 0.8f;
      r.params.top_k = 40;
      r.params.seed = 100 + i;
    }
    requests.push_back(std::move(r));
  }
  auto results = e.engine->Generate(requests);
  ASSERT_TRUE(results.ok()) << results.status();
  ASSERT_EQ(results->size(), requests.size());
  for (size_t i = 0; i < results->size(); ++i) {
    EXPECT_EQ((*results)[i].token_ids.size(), static_cast<size_t>(8 + i));
  }
  EXPECT_EQ(e.engine->num_free_blocks(), 128);
}

// Prefix caching on the GPU: prompts that share a 100-token prefix, the later ones started from
// the first one's cached blocks (the prefill attention reading them through the block table),
// give the logits of an engine without the cache, within the dtype's tolerance: the first row
// (the prompt's) always, later rows while both runs chose the same tokens (a near tie may go
// either way in bf16, and then the contexts differ).
TEST_P(CudaModelTest, CachedPrefixGivesTheUncachedLogits) {
  EngineOptions eo;
  eo.num_blocks = 64;
  Engine cached, plain;
  ASSERT_NO_FATAL_FAILURE(MakeEngine(14, eo, /*graphs=*/true, cached, /*caching=*/true));
  ASSERT_NO_FATAL_FAILURE(MakeEngine(14, eo, /*graphs=*/true, plain));
  std::vector<int32_t> prefix;
  for (int j = 0; j < 100; ++j) prefix.push_back((j * 7919 + 11) % cached.config.vocab_size);
  std::vector<std::vector<GenerateRequest>> waves(3);
  for (int i = 0; i < 4; ++i) {
    GenerateRequest r;
    r.id = "s" + std::to_string(i);
    r.prompt = prefix;
    for (int j = 0; j <= 5 * i; ++j)
      r.prompt.push_back((i * 31 + j * 13 + 5) % cached.config.vocab_size);
    r.params.max_tokens = 6;
    r.params.ignore_eos = true;
    r.return_logits = true;
    waves[i == 0 ? 0 : (i < 3 ? 1 : 2)].push_back(r);
  }
  for (const auto& wave : waves) {
    auto got = cached.engine->Generate(wave);
    auto want = plain.engine->Generate(wave);
    ASSERT_TRUE(got.ok() && want.ok());
    for (size_t k = 0; k < wave.size(); ++k) {
      ASSERT_EQ((*got)[k].logits.size(), (*want)[k].logits.size());
      for (size_t t = 0; t < (*got)[k].logits.size(); ++t) {
        if (t > 0 && (*got)[k].token_ids[t - 1] != (*want)[k].token_ids[t - 1]) break;
        const std::vector<float>& a = (*got)[k].logits[t];
        const std::vector<float>& b = (*want)[k].logits[t];
        double scale = 0, worst = 0;
        for (float v : b) scale = std::max<double>(scale, std::abs(v));
        for (size_t v = 0; v < a.size(); ++v)
          worst = std::max<double>(worst, std::abs(a[v] - b[v]));
        EXPECT_LE(worst, Tolerance() * scale) << wave[k].id << " token " << t;
      }
    }
  }
  EXPECT_EQ(cached.engine->num_prefix_hit_tokens(), 3 * 96) << "6 blocks of 16 each, 3 times";
  EXPECT_EQ(cached.engine->num_free_blocks(), 64);
}

// Prompt logprobs on the GPU (Transformer::RowLogits over the prefill's rows): entry p equals
// the log-softmax at prompt token p + 1 of the last-row logits after prompt[0, p], within the
// dtype's tolerance (the two go through different GEMM shapes); prefilled whole and in chunks.
TEST_P(CudaModelTest, PromptLogprobsMatchTheLastRowLogits) {
  for (const int32_t budget : {2048, 24}) {
    EngineOptions eo;
    eo.num_blocks = 64;
    eo.max_batch_tokens = budget;
    Engine e;
    ASSERT_NO_FATAL_FAILURE(MakeEngine(21, eo, /*graphs=*/false, e));
    std::vector<int32_t> prompt;
    for (int j = 0; j < 53; ++j) prompt.push_back((j * 7919 + 3) % e.config.vocab_size);
    GenerateRequest r;
    r.id = "p";
    r.prompt = prompt;
    r.params.max_tokens = 2;
    r.params.ignore_eos = true;
    r.params.prompt_logprobs = 2;
    auto got = e.engine->Generate({r});
    ASSERT_TRUE(got.ok()) << got.status();
    const std::vector<TokenLogprobs>& lps = (*got)[0].prompt_logprobs;
    ASSERT_EQ(lps.size(), prompt.size() - 1);
    const int64_t vocab = e.config.vocab_size;
    for (size_t p = 1; p < prompt.size(); p += 13) {
      GenerateRequest q;
      q.id = "q" + std::to_string(p);
      q.prompt.assign(prompt.begin(), prompt.begin() + p);
      q.params.max_tokens = 1;
      q.params.ignore_eos = true;
      q.return_logits = true;
      auto row = e.engine->Generate({q});
      ASSERT_TRUE(row.ok()) << row.status();
      const std::vector<float>& logits = (*row)[0].logits.at(0);
      double scale = 0;
      for (float v : logits) scale = std::max<double>(scale, std::abs(v));
      const float want = kernels::cpu::LogProb(logits.data(), vocab, prompt[p]);
      EXPECT_NEAR(lps[p - 1].logprob, want, 4 * Tolerance() * std::max(1.0, scale))
          << "budget " << budget << " position " << p;
      ASSERT_EQ(lps[p - 1].top.size(), 2u);
      EXPECT_GE(lps[p - 1].top[0].second, lps[p - 1].top[1].second);
    }
    EXPECT_EQ(e.engine->num_free_blocks(), 64);
  }
}

// Layer-by-layer hand-off on the GPU: each layer's mark is reached only once its K/V are in
// the cache. A thread waits for every layer in turn during the prefill step and copies it out
// at once (on the backend's copy stream, ordered after compute only by that wait); every copy
// must equal the layer after the step, and the resolved token the step's.
TEST_P(CudaModelTest, HandoffMarksEachLayerOnceItsKvIsWritten) {
  EngineOptions eo;
  eo.num_blocks = 64;
  eo.max_batch_tokens = 512;
  Engine e;
  ASSERT_NO_FATAL_FAILURE(MakeEngine(11, eo, /*graphs=*/true, e));
  const KvCache& cache = e.engine->cache();
  const size_t block_bytes = cache.shape().BlockBytes(GetParam().dtype);
  const int32_t layers = cache.shape().num_layers;
  // K then V of every block of `layer`, copied to the host.
  auto snapshot = [&](int32_t layer, const std::vector<int32_t>& blocks) {
    std::vector<uint8_t> out(2 * blocks.size() * block_bytes);
    uint8_t* dst = out.data();
    for (int kv = 0; kv < 2; ++kv) {
      const auto* pool = static_cast<const uint8_t*>(kv == 0 ? cache.k(layer) : cache.v(layer));
      for (int32_t b : blocks) {
        EXPECT_TRUE(e.backend->CopyToHost(dst, pool + b * block_bytes, block_bytes).ok());
        dst += block_bytes;
      }
    }
    return out;
  };
  GenerateRequest r;
  r.id = "handed";
  for (int j = 0; j < 300; ++j) r.prompt.push_back((j * 104729 + 7) % e.config.vocab_size);
  r.params.max_tokens = 4;
  r.params.ignore_eos = true;
  r.hold_kv_after_prefill = true;
  ASSERT_TRUE(e.engine->AddRequest(r).ok());
  std::vector<std::vector<uint8_t>> early(static_cast<size_t>(layers));
  absl::StatusOr<int32_t> token = absl::UnknownError("not resolved");
  std::vector<int32_t> blocks;
  std::thread reader;
  e.engine->set_handoff_hook([&](std::vector<std::shared_ptr<KvHandoff>> handoffs) {
    ASSERT_EQ(handoffs.size(), 1u);
    std::shared_ptr<KvHandoff> h = handoffs[0];
    blocks = h->blocks();
    reader = std::thread([&, h] {
      const absl::Time deadline = absl::Now() + absl::Seconds(30);
      for (int32_t l = 0; l < layers; ++l) {
        ASSERT_TRUE(h->layers().Wait(l, deadline, nullptr).ok()) << l;
        early[l] = snapshot(l, h->blocks());
      }
      token = h->WaitNextToken(deadline, nullptr);
    });
  });
  auto step = e.engine->Step();
  if (reader.joinable()) reader.join();
  ASSERT_TRUE(step.ok()) << step.status();
  ASSERT_EQ(step->size(), 1u);
  EXPECT_TRUE((*step)[0].kv_held);
  ASSERT_TRUE(token.ok()) << token.status();
  EXPECT_EQ(*token, (*step)[0].token);
  ASSERT_EQ(blocks.size(), (r.prompt.size() + eo.block_size - 1) / eo.block_size);
  for (int32_t l = 0; l < layers; ++l) {
    EXPECT_TRUE(early[l] == snapshot(l, blocks)) << "layer " << l << " was copied before written";
  }
  ASSERT_TRUE(e.engine->Cancel("handed").ok());
  EXPECT_EQ(e.engine->num_free_blocks(), 64);
}

TEST_P(CudaModelTest, DeviceGreedyEqualsHostGreedy) {
  // Greedy requests take their token from the device argmax (no logits copied); asking for
  // logprobs sends the logits to the host sampler. Same batch, same compute: same tokens.
  EngineOptions eo;
  eo.num_blocks = 64;
  Engine e;
  ASSERT_NO_FATAL_FAILURE(MakeEngine(9, eo, /*graphs=*/true, e));
  GenerateRequest r;
  for (int j = 0; j < 50; ++j) r.prompt.push_back((j * 7919) % e.config.vocab_size);
  r.params.max_tokens = 24;
  r.params.ignore_eos = true;
  r.id = "device";
  auto a = e.engine->Generate({r});
  r.id = "host";
  r.params.logprobs = 0;
  auto b = e.engine->Generate({r});
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_EQ((*a)[0].token_ids, (*b)[0].token_ids);
  EXPECT_EQ((*b)[0].logprobs.size(), 24u);
}

TEST_P(CudaModelTest, SeededSamplingIsReproducibleAndMatchesHostRule) {
  // A seeded sampled request gives the same tokens when run again, and the same tokens when
  // its logits also go to the host (logprobs).
  EngineOptions eo;
  eo.num_blocks = 64;
  Engine e;
  ASSERT_NO_FATAL_FAILURE(MakeEngine(10, eo, /*graphs=*/true, e));
  GenerateRequest r;
  for (int j = 0; j < 30; ++j) r.prompt.push_back((j * 104729) % e.config.vocab_size);
  r.params.max_tokens = 20;
  r.params.ignore_eos = true;
  r.params.temperature = 0.9f;
  r.params.top_k = 50;
  r.params.top_p = 0.9f;
  r.params.seed = 1234;
  r.id = "a";
  auto a = e.engine->Generate({r});
  r.id = "b";
  auto b = e.engine->Generate({r});
  ASSERT_TRUE(a.ok() && b.ok());
  // (Not compared across batch compositions: cuBLAS may pick other kernels for other batch
  // sizes, so bf16 logits are not bitwise batch-invariant on the GPU.)
  EXPECT_EQ((*a)[0].token_ids, (*b)[0].token_ids);
  // With logprobs the logits also go to the host; the device still picks the same token.
  r.id = "c";
  r.params.logprobs = 1;
  auto c = e.engine->Generate({r});
  ASSERT_TRUE(c.ok());
  EXPECT_EQ((*a)[0].token_ids, (*c)[0].token_ids);
}

TEST_P(CudaModelTest, GraphReplayEqualsEagerDecode) {
  // The same requests on two backends, decode steps recorded and replayed as CUDA graphs on
  // one and run op by op on the other: identical tokens (same kernels, same shapes). Contexts
  // cross a block-table bucket (32 blocks of 16) and the batch shrinks as requests finish.
  std::vector<std::vector<int32_t>> tokens[2];
  size_t graphs = 0;
  for (int with_graphs = 0; with_graphs < 2; ++with_graphs) {
    EngineOptions eo;
    eo.num_blocks = 256;
    Engine e;
    ASSERT_NO_FATAL_FAILURE(MakeEngine(12, eo, with_graphs == 1, e));
    std::vector<GenerateRequest> requests;
    for (int i = 0; i < 5; ++i) {
      GenerateRequest r;
      r.id = "g" + std::to_string(i);
      for (int j = 0; j < 470 + 7 * i; ++j) r.prompt.push_back((j * 31 + i) % e.config.vocab_size);
      r.params.max_tokens = 30 + 10 * i;
      r.params.ignore_eos = true;
      requests.push_back(std::move(r));
    }
    auto results = e.engine->Generate(requests);
    ASSERT_TRUE(results.ok()) << results.status();
    for (const auto& r : *results) tokens[with_graphs].push_back(r.token_ids);
#if PDS_HAVE_CUDA
    if (with_graphs == 1) graphs = dynamic_cast<CudaBackend&>(*e.backend).num_graphs();
#endif
  }
  EXPECT_EQ(tokens[0], tokens[1]);
  EXPECT_GT(graphs, 3u) << "decode steps were not replayed from graphs";
}

// Speculative decoding on the GPU: drafts verified in multi-row steps (prefill attention over
// the cached prefix, no graph) and drawn at their rows on the device give plain decoding's
// greedy tokens wherever plain decoding's top-2 margin exceeds the dtype's tolerance (past a
// near tie the two runs may part, as any two kernel paths may).
TEST_P(CudaModelTest, SpeculativeDecodingKeepsTheGreedyTokens) {
  std::vector<GenerateResult> results[3];
  int64_t drafts = 0, kept = 0;
  // 0: plain; 1: every draft (the same in every run); 2: the drafts that pay by the engine's
  // timings of its steps on this GPU (its fitted model printed).
  for (int spec = 0; spec < 3; ++spec) {
    EngineOptions eo;
    eo.num_blocks = 256;
    eo.speculative.num_tokens = spec > 0 ? 4 : 0;
    eo.speculative.ngram_min = 1;
    eo.speculative.choice = spec == 1 ? DraftChoice::kAll : DraftChoice::kPaying;
    Engine e;
    ASSERT_NO_FATAL_FAILURE(MakeEngine(14, eo, /*graphs=*/true, e));
    std::vector<GenerateRequest> requests;
    for (int i = 0; i < 6; ++i) {
      GenerateRequest r;
      r.id = "s" + std::to_string(i);
      const int period = 3 + i;
      for (int j = 0; j < 40 + 9 * i; ++j) {
        r.prompt.push_back(((j % period) * 7919 + i) % e.config.vocab_size);
      }
      r.params.max_tokens = 48;
      r.params.ignore_eos = true;
      r.return_logits = spec == 0;  // the reference's margins (a request with them never drafts)
      requests.push_back(std::move(r));
    }
    auto got = e.engine->Generate(requests);
    ASSERT_TRUE(got.ok()) << got.status();
    results[spec] = std::move(*got);
    EXPECT_EQ(e.engine->num_free_blocks(), 256);
    if (spec == 1) {
      drafts = e.engine->num_draft_tokens();
      kept = e.engine->num_accepted_draft_tokens();
    }
    if (spec == 2) {
      const auto& c = e.engine->step_time_model().coefficients();
      std::printf(
          "paying drafts: %lld, kept %lld; step model (us): a %.1f, drafts %.1f, row %.2f, "
          "kv position %.5f\n",
          static_cast<long long>(e.engine->num_draft_tokens()),
          static_cast<long long>(e.engine->num_accepted_draft_tokens()), c[0] * 1e6, c[1] * 1e6,
          c[2] * 1e6, c[3] * 1e6);
    }
  }
  EXPECT_GT(drafts, 0);
  EXPECT_GT(kept, 0);
  std::printf("drafts %lld, kept %lld\n", static_cast<long long>(drafts),
              static_cast<long long>(kept));
  const int64_t vocab = results[0][0].logits.empty() ? 0 : results[0][0].logits[0].size();
  for (int spec = 1; spec < 3; ++spec) {
    for (size_t i = 0; i < results[0].size(); ++i) {
      const GenerateResult& want = results[0][i];
      const GenerateResult& got = results[spec][i];
      ASSERT_EQ(got.token_ids.size(), want.token_ids.size()) << want.request_id;
      for (size_t t = 0; t < want.token_ids.size(); ++t) {
        if (Top2Margin(want.logits[t].data(), vocab) <= 2 * Tolerance()) break;
        ASSERT_EQ(got.token_ids[t], want.token_ids[t])
            << want.request_id << " token " << t << " run " << spec;
      }
    }
  }
}

void CudaModelTest::ExpectTheSameTokensWith(const char* name, const char* value) {
#if PDS_HAVE_CUDA
  std::vector<std::vector<int32_t>> tokens[2];
  for (int fused = 0; fused < 2; ++fused) {
    if (fused == 1) {
      setenv(name, value, 1);
    } else {
      unsetenv(name);
    }
    kernels::cuda::ReloadKernelSettings();
    EngineOptions eo;
    eo.num_blocks = 128;
    eo.max_batch_tokens = 96;  // prompts of 150-170 tokens take two steps
    Engine e;
    ASSERT_NO_FATAL_FAILURE(MakeEngine(13, eo, /*graphs=*/true, e));
    std::vector<GenerateRequest> requests;
    for (int i = 0; i < 3; ++i) {
      GenerateRequest r;
      r.id = "f" + std::to_string(i);
      for (int j = 0; j < 150 + 10 * i; ++j) r.prompt.push_back((j * 17 + i) % e.config.vocab_size);
      r.params.max_tokens = 20;
      r.params.ignore_eos = true;
      requests.push_back(std::move(r));
    }
    auto results = e.engine->Generate(requests);
    ASSERT_TRUE(results.ok()) << results.status();
    for (const auto& r : *results) tokens[fused].push_back(r.token_ids);
  }
  unsetenv(name);
  kernels::cuda::ReloadKernelSettings();
  EXPECT_EQ(tokens[0], tokens[1]);
#endif
}

// PDS_FUSE_ROPE_KV=1: RoPE and the KV write in one launch.
TEST_P(CudaModelTest, FusedRopeKvWriteGivesTheSameTokens) {
  ExpectTheSameTokensWith("PDS_FUSE_ROPE_KV", "1");
}

// PDS_ATTN_COMBINE=fused: decode splits merged without a second launch (decode contexts of
// 150-190 positions in 3 sequences: several splits each), graph replays included.
TEST_P(CudaModelTest, FusedSplitCombineGivesTheSameTokens) {
  ExpectTheSameTokensWith("PDS_ATTN_COMBINE", "fused");
}

INSTANTIATE_TEST_SUITE_P(Models, CudaModelTest,
                         ::testing::Values(ModelParam{"tiny", DType::kBF16},
                                           ModelParam{"small", DType::kBF16},
                                           ModelParam{"small", DType::kF16}),
                         [](const ::testing::TestParamInfo<ModelParam>& info) {
                           return std::string(info.param.preset == std::string("tiny") ? "tiny"
                                                                                       : "small") +
                                  "_" + std::string(DTypeName(info.param.dtype));
                         });

}  // namespace
}  // namespace pds::engine

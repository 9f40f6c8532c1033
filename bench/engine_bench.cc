// End-to-end forward-pass benchmarks of the `small` preset on the CPU backend: a decode step
// (one token for each of `batch` sequences at a given context) and a prefill. Decode reports
// the fraction of the memory floor (weights + KV read once per step at the measured read
// bandwidth) and of the roofline (the larger of that and the compute floor at the measured
// sgemm rate); prefill reports the fraction of the measured sgemm rate for 2 * params * tokens.
#include <benchmark/benchmark.h>

#include <array>
#include <filesystem>
#include <memory>
#include <random>

#include "absl/strings/str_cat.h"
#include "bench/ceilings.h"
#include "engine/backend/cpu_backend.h"
#include "engine/common/status_macros.h"
#include "engine/model/model_writer.h"
#include "engine/model/presets.h"
#include "engine/model/transformer.h"
#include "engine/runtime/llm_engine.h"
#include "kernels/threads.h"

namespace pds::bench {
namespace {

using namespace pds::engine;

struct Fixture {
  std::unique_ptr<CpuBackend> backend;
  std::unique_ptr<Transformer> model;
};

Fixture& Small() {
  static Fixture* f = [] {
    const char* env = std::getenv("PDS_BENCH_MODEL");
    const std::string dir =
        env ? env : (std::filesystem::temp_directory_path() / "pds_bench_small").string();
    if (!std::filesystem::exists(std::filesystem::path(dir) / "config.json")) {
      MakeModelOptions options;
      options.out_dir = dir;
      options.seed = 1;
      auto status = WriteRandomModel(*PresetConfig("small"), options);
      if (!status.ok()) {
        std::fprintf(stderr, "cannot write the bench model: %s\n", status.ToString().c_str());
        std::exit(1);
      }
    }
    auto* fixture = new Fixture;
    fixture->backend = std::make_unique<CpuBackend>(kernels::cpu::NumThreads());
    auto model = Transformer::Load(dir, *fixture->backend);
    if (!model.ok()) {
      std::fprintf(stderr, "cannot load the bench model: %s\n", model.status().ToString().c_str());
      std::exit(1);
    }
    fixture->model = std::move(*model);
    return fixture;
  }();
  return *f;
}

std::vector<int32_t> Tokens(int n, int64_t vocab, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<int32_t> t(n);
  for (auto& x : t) x = static_cast<int32_t>(rng() % vocab);
  return t;
}

// Args: batch, context, and rows per sequence (1: a plain decode step; 1 + k: a speculative
// step verifying k drafts, whose cost against the plain step's is what speculation pays).
void BM_DecodeStep(benchmark::State& state) {
  Fixture& f = Small();
  const ModelConfig& c = f.model->config();
  const int batch = state.range(0), ctx = state.range(1), rows = state.range(2), bs = 16;
  const int blocks_per_seq = (ctx + rows + bs - 1) / bs;
  auto cache = KvCache::Create(*f.backend, f.model->CacheShape(batch * blocks_per_seq, bs));
  if (!cache.ok()) return state.SkipWithError(cache.status().ToString().c_str());
  std::vector<BlockTable> tables(batch);
  std::vector<std::vector<int32_t>> prompts;
  std::vector<float> logits;
  for (int s = 0; s < batch; ++s) {
    if (!tables[s].Reserve(ctx + rows, bs, cache->allocator()).ok())
      return state.SkipWithError("blocks");
    prompts.push_back(Tokens(ctx + rows, c.vocab_size, s));
    SequenceInput in{std::span<const int32_t>(prompts[s].data(), ctx), 0, &tables[s]};
    if (!f.model->Forward({&in, 1}, *cache, logits).ok()) return state.SkipWithError("prefill");
  }
  std::vector<SequenceInput> step(batch);
  for (int s = 0; s < batch; ++s) {
    step[s] = {std::span<const int32_t>(prompts[s].data() + ctx, rows), ctx, &tables[s]};
  }
  for (auto _ : state) {
    auto status = f.model->Forward(step, *cache, logits);
    if (!status.ok()) return state.SkipWithError(status.ToString().c_str());
    benchmark::DoNotOptimize(logits.data());
  }
  const double kv_bytes = 2.0 * 4.0 * batch * (ctx + rows) * c.num_layers * c.kv_size();
  const double floor_s = (f.model->weight_bytes() + kv_bytes) / MeasuredReadBandwidth();
  // Compute floor: linear layers for every row and the logits of each sequence's last, plus
  // attention (QK and PV).
  const double flops =
      2.0 * batch * rows * (c.num_parameters() - 2 * c.vocab_size * c.hidden_size) +
      2.0 * batch * c.vocab_size * c.hidden_size +
      4.0 * batch * rows * (ctx + rows) * c.num_layers * c.q_size();
  const double roofline_s = std::max(floor_s, flops / MeasuredGemmRate());
  state.counters["tokens/s"] = benchmark::Counter(static_cast<double>(batch) * state.iterations(),
                                                  benchmark::Counter::kIsRate);
  state.counters["frac_mem_floor"] =
      benchmark::Counter(floor_s * state.iterations(), benchmark::Counter::kIsRate);
  state.counters["frac_roofline"] =
      benchmark::Counter(roofline_s * state.iterations(), benchmark::Counter::kIsRate);
}
BENCHMARK(BM_DecodeStep)
    ->Args({1, 128, 1})
    ->Args({8, 512, 1})
    ->Args({32, 512, 1})
    ->Args({1, 512, 1})
    ->Args({1, 512, 5})
    ->Args({8, 512, 5})
    ->Args({32, 512, 5})
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();

void BM_Prefill(benchmark::State& state) {
  Fixture& f = Small();
  const ModelConfig& c = f.model->config();
  const int tokens = state.range(0), bs = 16;
  auto cache = KvCache::Create(*f.backend, f.model->CacheShape((tokens + bs - 1) / bs, bs));
  if (!cache.ok()) return state.SkipWithError(cache.status().ToString().c_str());
  BlockTable table;
  if (!table.Reserve(tokens, bs, cache->allocator()).ok()) return state.SkipWithError("blocks");
  const auto prompt = Tokens(tokens, c.vocab_size, 9);
  std::vector<float> logits;
  SequenceInput in{prompt, 0, &table};
  for (auto _ : state) {
    auto status = f.model->Forward({&in, 1}, *cache, logits);
    if (!status.ok()) return state.SkipWithError(status.ToString().c_str());
    benchmark::DoNotOptimize(logits.data());
  }
  // Linear layers (embedding lookup excluded, lm_head on the last token only).
  const double linear_params =
      static_cast<double>(c.num_parameters() - 2 * c.vocab_size * c.hidden_size);
  const double flops = 2.0 * linear_params * tokens;
  state.counters["tokens/s"] = benchmark::Counter(static_cast<double>(tokens) * state.iterations(),
                                                  benchmark::Counter::kIsRate);
  state.counters["frac_gemm_peak"] = benchmark::Counter(
      flops * state.iterations() / MeasuredGemmRate(), benchmark::Counter::kIsRate);
}
BENCHMARK(BM_Prefill)->Arg(128)->Arg(512)->Unit(benchmark::kMillisecond)->UseRealTime();

// The `tiny` preset (2 layers, hidden 64) with Llama 3's vocabulary, 128256 tokens: a model
// whose steps are mostly the lm_head and the work on its logits (made once).
Transformer* WideVocabModel() {
  static CpuBackend* backend = new CpuBackend(kernels::cpu::NumThreads());
  static Transformer* model = [] {
    ModelConfig c = *PresetConfig("tiny");
    c.vocab_size = 128256;
    c.max_position_embeddings = 4096;
    auto m = Transformer::CreateRandom(c, *backend, 3);
    if (!m.ok()) std::exit(1);
    return m->release();
  }();
  return model;
}

// Logits processing's host cost per decode step (LlmEngine::Step on `batch` sequences of a
// narrow model with Llama 3's vocabulary, 128256: the step is mostly the lm_head and the
// draw). Modes: 0 greedy, 1 greedy with repetition/frequency/presence penalties, 2 sampling
// (temperature 0.8, top_p 0.95), 3 sampling with the penalties and min_p 0.05, 4 greedy with
// allowed_token_ids (1024 ids). The cost of processing is a mode's time less its plain twin's
// (1 - 0, 3 - 2, 4 - 0), per row: divided by batch.
void BM_LogitsProcessing(benchmark::State& state) {
  const int batch = static_cast<int>(state.range(0)), mode = static_cast<int>(state.range(1));
  Transformer* model = WideVocabModel();
  auto engine = LlmEngine::Create(*model, {.block_size = 16, .num_blocks = 4096});
  if (!engine.ok()) return state.SkipWithError(engine.status().ToString().c_str());
  for (int s = 0; s < batch; ++s) {
    GenerateRequest r;
    r.id = absl::StrCat("r", s);
    r.prompt = Tokens(64, 128256, s);
    r.params.max_tokens = 2000;
    r.params.ignore_eos = true;
    if (mode >= 2) {
      r.params.temperature = 0.8f;
      r.params.top_p = 0.95f;
      r.params.seed = s;
    }
    if (mode == 1 || mode == 3) {
      r.params.repetition_penalty = 1.1f;
      r.params.frequency_penalty = 0.5f;
      r.params.presence_penalty = 0.5f;
    }
    if (mode == 3) r.params.min_p = 0.05f;
    if (mode == 4) {
      for (int32_t t = 0; t < 1024; ++t) r.params.allowed_token_ids.push_back(t * 125 + s);
    }
    if (!(*engine)->AddRequest(std::move(r)).ok()) return state.SkipWithError("add");
  }
  for (int warm = 0; warm < 3; ++warm) {  // past the prefills
    if (!(*engine)->Step().ok()) return state.SkipWithError("step");
  }
  for (auto _ : state) {
    auto step = (*engine)->Step();
    if (!step.ok()) return state.SkipWithError(step.status().ToString().c_str());
    benchmark::DoNotOptimize(step->data());
  }
  state.counters["rows/s"] = benchmark::Counter(static_cast<double>(batch) * state.iterations(),
                                                benchmark::Counter::kIsRate);
}
// Prompt logprobs' cost: the prefill of one 512-token prompt (LlmEngine::Step in one chunk, the
// first token drawn greedily) on the narrow model with Llama 3's 128256-token vocabulary,
// without (k = -1) and with prompt_logprobs k (each prompt row projected to the vocabulary, its
// log-softmax, the prompt token's logprob and the top k). The difference over 511 rows is the
// cost per prompt token.
void BM_PromptLogprobs(benchmark::State& state) {
  const int k = static_cast<int>(state.range(0));
  Transformer* model = WideVocabModel();
  auto engine = LlmEngine::Create(*model, {.block_size = 16, .num_blocks = 256});
  if (!engine.ok()) return state.SkipWithError(engine.status().ToString().c_str());
  int n = 0;
  for (auto _ : state) {
    GenerateRequest r;
    r.id = absl::StrCat("p", n++);
    r.prompt = Tokens(512, 128256, n);
    r.params.max_tokens = 1;
    r.params.ignore_eos = true;
    r.params.prompt_logprobs = k;
    if (!(*engine)->AddRequest(std::move(r)).ok()) return state.SkipWithError("add");
    auto step = (*engine)->Step();
    if (!step.ok() || step->size() != 1) return state.SkipWithError("step");
    benchmark::DoNotOptimize(step->data());
  }
  state.counters["prompt tokens/s"] =
      benchmark::Counter(512.0 * state.iterations(), benchmark::Counter::kIsRate);
}
// Speculative decoding end to end: `batch` greedy sequences of the small preset decode 96
// tokens each after 64-token prompts that repeat a 7-token pattern, with k drafts per
// sequence and step (prompt lookup, n-grams of 2 to 4; k = 0: off). Reports tokens/s, tokens
// per sequence and step (the ceiling of the speed-up if drafts cost nothing), and the drafts'
// acceptance rate. The random model's text is not real text: acceptance here is that of its
// own repetitions, not a prediction for a real model's. Arg 3: which drafts go in, (0) every
// proposed one likelier than kMinDraftKeepChance (rows counted free) or (1) those that pay by
// the engine's own timings of its steps (the default; each run's engine learns them anew).
void BM_SpeculativeDecode(benchmark::State& state) {
  const int batch = static_cast<int>(state.range(0)), k = static_cast<int>(state.range(1));
  Fixture& f = Small();
  EngineOptions o{.block_size = 16, .num_blocks = 1024};
  o.speculative.num_tokens = k;
  if (state.range(2) == 0) o.speculative.choice = DraftChoice::kAll;
  // One engine for the whole run, as a server's: its timings of its steps carry over from one
  // round of sequences to the next (the first round, untimed, is its warm-up).
  auto engine = LlmEngine::Create(*f.model, o);
  if (!engine.ok()) return state.SkipWithError(engine.status().ToString().c_str());
  int64_t tokens = 0, seq_steps = 0;
  int n = 0;
  // One round: `batch` sequences prefilled (untimed unless `timed`), then decoded to the end.
  auto round = [&](bool timed) -> absl::Status {
    for (int s = 0; s < batch; ++s) {
      GenerateRequest r;
      r.id = absl::StrCat("s", n++);
      const std::vector<int32_t> pattern = Tokens(7, f.model->config().vocab_size, n);
      for (int t = 0; t < 64; ++t) r.prompt.push_back(pattern[t % 7]);
      r.params.max_tokens = 96;
      r.params.ignore_eos = true;
      PDS_RETURN_IF_ERROR((*engine)->AddRequest(std::move(r)));
    }
    PDS_RETURN_IF_ERROR((*engine)->Step().status());  // the prefill
    if (timed) state.ResumeTiming();
    while ((*engine)->HasWork()) {
      auto step = (*engine)->Step();
      if (!step.ok()) return step.status();
      if (!timed) continue;
      tokens += static_cast<int64_t>(step->size());
      seq_steps += static_cast<int64_t>((*engine)->last_batch().size());
    }
    return absl::OkStatus();
  };
  if (absl::Status warm = round(false); !warm.ok()) {
    return state.SkipWithError(warm.ToString().c_str());
  }
  const int64_t drafts0 = (*engine)->num_draft_tokens();
  const int64_t accepted0 = (*engine)->num_accepted_draft_tokens();
  for (auto _ : state) {
    state.PauseTiming();
    if (absl::Status done = round(true); !done.ok()) {
      return state.SkipWithError(done.ToString().c_str());
    }
  }
  const int64_t drafts = (*engine)->num_draft_tokens() - drafts0;
  const int64_t accepted = (*engine)->num_accepted_draft_tokens() - accepted0;
  state.counters["tokens/s"] =
      benchmark::Counter(static_cast<double>(tokens), benchmark::Counter::kIsRate);
  state.counters["tokens_per_seq_step"] =
      static_cast<double>(tokens) / static_cast<double>(std::max<int64_t>(seq_steps, 1));
  state.counters["acceptance"] =
      static_cast<double>(accepted) / static_cast<double>(std::max<int64_t>(drafts, 1));
  state.counters["drafts_per_seq_step"] =
      static_cast<double>(drafts) / static_cast<double>(std::max<int64_t>(seq_steps, 1));
  // The engine's model of its steps (microseconds): a + g [drafts] + b rows + c kv.
  const std::array<double, 4>& c = (*engine)->step_time_model().coefficients();
  state.counters["model_a_us"] = c[0] * 1e6;
  state.counters["model_drafts_us"] = c[1] * 1e6;
  state.counters["model_row_us"] = c[2] * 1e6;
  state.counters["model_kv_us"] = c[3] * 1e6;
}
// The draft proposer's host cost per sequence and step: the scan (ProposeNgramDrafts; arg 3 =
// 0) or the engine's index (NgramIndex; 1) over a sequence of `len` tokens, (0) random over Llama
// 3's vocabulary (the last token rarely occurs before: one pass of compares) or (1) over 16 token
// ids (every 16th position starts a partial match: the worst case of the scan, no 4-token match).
void BM_ProposeNgramDrafts(benchmark::State& state) {
  const int len = static_cast<int>(state.range(0));
  std::vector<int32_t> tokens = Tokens(len, state.range(1) == 0 ? 128256 : 16, 5);
  tokens.back() = tokens[len / 2];  // the suffix occurs, at most 3 tokens of it in a row
  NgramIndex index;                 // what the engine keeps per sequence
  index.Extend(tokens);
  for (auto _ : state) {
    benchmark::DoNotOptimize(state.range(2) == 0 ? ProposeNgramDrafts(tokens, 2, 4, 4)
                                                 : index.Propose(tokens, 2, 4, 4));
  }
  state.counters["tokens/s"] = benchmark::Counter(static_cast<double>(len) * state.iterations(),
                                                  benchmark::Counter::kIsRate);
}
BENCHMARK(BM_ProposeNgramDrafts)
    ->ArgsProduct({{4096, 32768}, {0, 1}, {0, 1}})
    ->Unit(benchmark::kMicrosecond);

BENCHMARK(BM_SpeculativeDecode)
    ->Args({1, 0, 1})
    ->ArgsProduct({{1}, {2, 4}, {0, 1}})
    ->Args({8, 0, 1})
    ->ArgsProduct({{8}, {2, 4}, {0, 1}})
    ->Args({32, 0, 1})
    ->ArgsProduct({{32}, {4}, {0, 1}})
    ->Iterations(2)
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();

BENCHMARK(BM_PromptLogprobs)
    ->Arg(-1)
    ->Arg(0)
    ->Arg(5)
    ->Iterations(5)
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();

BENCHMARK(BM_LogitsProcessing)
    ->ArgsProduct({{1, 16}, {0, 1, 2, 3, 4}})
    ->Iterations(100)
    ->Unit(benchmark::kMicrosecond)
    ->UseRealTime();

}  // namespace
}  // namespace pds::bench

int main(int argc, char** argv) {
  return pds::bench::RunBenchmarks(
      argc, argv, {{"model", "small preset (33.6M params, fp32, 8 layers, hidden 512)"}});
}

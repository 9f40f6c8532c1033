#include "client/workload.h"

#include <algorithm>
#include <cmath>
#include <fstream>
#include <numeric>
#include <sstream>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "nlohmann/json.hpp"

namespace pds::client {
namespace {

using json = nlohmann::json;

int64_t Clip(double v, int64_t lo, int64_t hi) {
  if (!std::isfinite(v)) v = static_cast<double>(hi);
  int64_t r = static_cast<int64_t>(std::llround(std::clamp(v, -1e15, 1e15)));
  return std::clamp<int64_t>(r, std::max<int64_t>(lo, 1), std::max<int64_t>(hi, 1));
}

absl::StatusOr<std::string> ReadFile(const std::string& path, const char* what) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot open ", what, " file '", path, "'"));
  std::stringstream ss;
  ss << in.rdbuf();
  if (in.bad())
    return absl::DataLossError(absl::StrCat("cannot read ", what, " file '", path, "'"));
  return ss.str();
}

// Caps prompt + output at max_model_len, shortening the prompt first.
void CapLengths(int64_t max_model_len, int64_t* prompt, int64_t* output) {
  if (max_model_len <= 1 || *prompt + *output <= max_model_len) return;
  *prompt = std::max<int64_t>(1, max_model_len - *output);
  if (*prompt + *output > max_model_len) *output = std::max<int64_t>(1, max_model_len - *prompt);
}

constexpr const char* kWords[] = {"the", "of",   "and", "to",   "in",   "is",   "that", "for",
                                  "it",  "as",   "was", "with", "be",   "by",   "on",   "not",
                                  "he",  "this", "are", "or",   "his",  "from", "at",   "which",
                                  "but", "have", "an",  "had",  "they", "you",  "were", "their"};

}  // namespace

LengthDist LengthDist::Fixed(int64_t value) {
  LengthDist d;
  d.kind = Kind::kFixed;
  d.a = static_cast<double>(value);
  d.min = 1;
  d.max = std::max<int64_t>(value, 1);
  return d;
}

LengthDist LengthDist::Uniform(int64_t lo, int64_t hi) {
  LengthDist d;
  d.kind = Kind::kUniform;
  d.a = static_cast<double>(std::max<int64_t>(lo, 1));
  d.b = static_cast<double>(std::max<int64_t>(hi, lo));
  d.min = static_cast<int64_t>(d.a);
  d.max = static_cast<int64_t>(d.b);
  return d;
}

LengthDist LengthDist::LogNormal(double median, double sigma, int64_t min, int64_t max) {
  LengthDist d;
  d.kind = Kind::kLogNormal;
  d.a = median;
  d.b = sigma;
  d.min = min;
  d.max = max;
  return d;
}

int64_t LengthDist::Sample(Rng& rng) const {
  switch (kind) {
    case Kind::kFixed:
      return Clip(a, 1, std::max<int64_t>(1, static_cast<int64_t>(a)));
    case Kind::kUniform: {
      std::uniform_int_distribution<int64_t> u(static_cast<int64_t>(a), static_cast<int64_t>(b));
      return Clip(static_cast<double>(u(rng)), min, max);
    }
    case Kind::kLogNormal: {
      std::normal_distribution<double> n(std::log(a), b);
      return Clip(std::exp(n(rng)), min, max);
    }
  }
  return 1;
}

double LengthDist::UnclippedMean() const {
  switch (kind) {
    case Kind::kFixed:
      return a;
    case Kind::kUniform:
      return (a + b) / 2;
    case Kind::kLogNormal:
      return a * std::exp(b * b / 2);
  }
  return 0;
}

absl::StatusOr<DatasetKind> ParseDatasetKind(absl::string_view name) {
  if (name == "random") return DatasetKind::kRandom;
  if (name == "chatbot") return DatasetKind::kChatbot;
  if (name == "code") return DatasetKind::kCode;
  if (name == "summarization") return DatasetKind::kSummarization;
  if (name == "sharegpt") return DatasetKind::kShareGpt;
  if (name == "trace") return DatasetKind::kTrace;
  return absl::InvalidArgumentError(
      absl::StrCat("unknown dataset '", name,
                   "' (expected random, chatbot, code, summarization, sharegpt or trace)"));
}

const char* DatasetKindName(DatasetKind kind) {
  switch (kind) {
    case DatasetKind::kRandom:
      return "random";
    case DatasetKind::kChatbot:
      return "chatbot";
    case DatasetKind::kCode:
      return "code";
    case DatasetKind::kSummarization:
      return "summarization";
    case DatasetKind::kShareGpt:
      return "sharegpt";
    case DatasetKind::kTrace:
      return "trace";
  }
  return "?";
}

absl::StatusOr<SyntheticShape> SyntheticWorkloadShape(DatasetKind kind, double length_scale) {
  if (!(length_scale > 0) || !std::isfinite(length_scale)) {
    return absl::InvalidArgumentError(
        absl::StrCat("length scale must be a positive number, got ", length_scale));
  }
  auto scaled = [&](double median, double sigma, int64_t lo, int64_t hi) {
    return LengthDist::LogNormal(median * length_scale, sigma,
                                 std::max<int64_t>(1, std::llround(lo * length_scale)),
                                 std::max<int64_t>(1, std::llround(hi * length_scale)));
  };
  switch (kind) {
    case DatasetKind::kChatbot:
      return SyntheticShape{scaled(256, 1.0, 8, 2048), scaled(160, 0.9, 8, 1024)};
    case DatasetKind::kCode:
      return SyntheticShape{scaled(150, 0.4, 32, 512), scaled(90, 0.6, 16, 384)};
    case DatasetKind::kSummarization:
      return SyntheticShape{scaled(1600, 0.5, 512, 4096), scaled(80, 0.5, 16, 256)};
    default:
      return absl::InvalidArgumentError(
          absl::StrCat("dataset '", DatasetKindName(kind), "' is not a synthetic workload"));
  }
}

void MakePrompt(int64_t len, const DatasetOptions& options, Rng& rng, RequestSpec* spec) {
  len = std::max<int64_t>(len, 1);
  spec->prompt_len = len;
  if (options.text_prompts) {
    spec->use_text = true;
    std::uniform_int_distribution<size_t> pick(0, std::size(kWords) - 1);
    std::string text;
    for (int64_t i = 0; i < len; ++i) {
      if (i > 0) text.push_back(' ');
      text += kWords[pick(rng)];
    }
    spec->prompt_text = std::move(text);
    return;
  }
  spec->use_text = false;
  std::uniform_int_distribution<int32_t> id(options.vocab_lo, options.vocab_hi - 1);
  spec->prompt_token_ids.resize(len);
  for (auto& t : spec->prompt_token_ids) t = id(rng);
}

absl::StatusOr<std::vector<RequestSpec>> ParseShareGpt(absl::string_view text, int64_t num_requests,
                                                       int64_t output_len_override, uint64_t seed) {
  json doc = json::parse(text.begin(), text.end(), nullptr, /*allow_exceptions=*/false);
  if (doc.is_discarded()) return absl::InvalidArgumentError("not valid JSON");
  if (!doc.is_array()) {
    return absl::InvalidArgumentError(
        "expected a JSON array of {\"conversations\": [{\"from\", \"value\"}, ...]} objects");
  }
  std::vector<RequestSpec> pool;
  for (size_t i = 0; i < doc.size(); ++i) {
    const json& entry = doc[i];
    if (!entry.is_object() || !entry.contains("conversations")) continue;
    const json& conv = entry["conversations"];
    if (!conv.is_array() || conv.size() < 2) continue;
    if (!conv[0].is_object() || !conv[1].is_object()) continue;
    auto value = [](const json& turn) -> const json* {
      auto it = turn.find("value");
      return it != turn.end() && it->is_string() ? &*it : nullptr;
    };
    const json* prompt = value(conv[0]);
    const json* completion = value(conv[1]);
    if (prompt == nullptr || completion == nullptr) {
      return absl::InvalidArgumentError(
          absl::StrCat("entry ", i, ": the first two turns need a string \"value\""));
    }
    RequestSpec spec;
    spec.use_text = true;
    spec.prompt_text = prompt->get<std::string>();
    if (spec.prompt_text.empty()) continue;
    spec.prompt_len = std::max<int64_t>(1, static_cast<int64_t>(spec.prompt_text.size()) / 4);
    spec.output_len =
        output_len_override > 0
            ? output_len_override
            : std::max<int64_t>(1, static_cast<int64_t>(completion->get<std::string>().size()) / 4);
    pool.push_back(std::move(spec));
  }
  if (pool.empty()) {
    return absl::InvalidArgumentError(
        "no usable conversations (each needs \"conversations\" with at least two turns)");
  }
  Rng rng(seed);
  std::vector<size_t> order(pool.size());
  std::iota(order.begin(), order.end(), 0);
  std::shuffle(order.begin(), order.end(), rng);
  std::vector<RequestSpec> out;
  out.reserve(num_requests);
  for (int64_t i = 0; i < num_requests; ++i) out.push_back(pool[order[i % order.size()]]);
  return out;
}

absl::StatusOr<std::vector<RequestSpec>> LoadShareGpt(const std::string& path, int64_t num_requests,
                                                      int64_t output_len_override, uint64_t seed) {
  auto text = ReadFile(path, "ShareGPT");
  if (!text.ok()) return text.status();
  auto specs = ParseShareGpt(*text, num_requests, output_len_override, seed);
  if (!specs.ok()) {
    return absl::Status(specs.status().code(),
                        absl::StrCat("ShareGPT file '", path, "': ", specs.status().message()));
  }
  return specs;
}

absl::StatusOr<std::vector<RequestSpec>> ParseTrace(absl::string_view jsonl,
                                                    const DatasetOptions& options) {
  Rng rng(options.seed);
  std::vector<RequestSpec> out;
  int line_no = 0;
  for (absl::string_view line : absl::StrSplit(jsonl, '\n')) {
    ++line_no;
    line = absl::StripAsciiWhitespace(line);
    if (line.empty() || line[0] == '#') continue;
    auto err = [&](absl::string_view what) {
      return absl::InvalidArgumentError(absl::StrCat("line ", line_no, ": ", what));
    };
    json obj = json::parse(line.begin(), line.end(), nullptr, /*allow_exceptions=*/false);
    if (obj.is_discarded()) return err("not valid JSON");
    if (!obj.is_object()) return err("expected a JSON object");
    RequestSpec spec;
    auto at = obj.find("arrival_time");
    if (at == obj.end() || !at->is_number()) return err("needs a numeric \"arrival_time\"");
    spec.arrival_s = at->get<double>();
    if (!std::isfinite(spec.arrival_s) || spec.arrival_s < 0) {
      return err("\"arrival_time\" must be a finite number of seconds >= 0");
    }
    auto ol = obj.find("output_len");
    if (ol == obj.end() || !ol->is_number_integer() || ol->get<int64_t>() < 1) {
      return err("needs an integer \"output_len\" >= 1");
    }
    spec.output_len = ol->get<int64_t>();
    int prompt_fields =
        obj.contains("prompt") + obj.contains("prompt_len") + obj.contains("prompt_token_ids");
    if (prompt_fields != 1) {
      return err("needs exactly one of \"prompt\", \"prompt_len\" and \"prompt_token_ids\"");
    }
    if (auto p = obj.find("prompt"); p != obj.end()) {
      if (!p->is_string() || p->get<std::string>().empty()) {
        return err("\"prompt\" must be a non-empty string");
      }
      spec.use_text = true;
      spec.prompt_text = p->get<std::string>();
      spec.prompt_len = std::max<int64_t>(1, static_cast<int64_t>(spec.prompt_text.size()) / 4);
    } else if (auto p = obj.find("prompt_len"); p != obj.end()) {
      if (!p->is_number_integer() || p->get<int64_t>() < 1) {
        return err("\"prompt_len\" must be an integer >= 1");
      }
      int64_t len = p->get<int64_t>();
      CapLengths(options.max_model_len, &len, &spec.output_len);
      MakePrompt(len, options, rng, &spec);
    } else {
      const json& ids = obj["prompt_token_ids"];
      if (!ids.is_array() || ids.empty())
        return err("\"prompt_token_ids\" must be a non-empty array");
      for (const json& id : ids) {
        if (!id.is_number_integer() || id.get<int64_t>() < 0 || id.get<int64_t>() > INT32_MAX) {
          return err("\"prompt_token_ids\" must hold non-negative 32-bit integers");
        }
        spec.prompt_token_ids.push_back(static_cast<int32_t>(id.get<int64_t>()));
      }
      spec.prompt_len = static_cast<int64_t>(spec.prompt_token_ids.size());
    }
    out.push_back(std::move(spec));
    if (options.num_requests > 0 && static_cast<int64_t>(out.size()) >= options.num_requests) {
      break;
    }
  }
  if (out.empty()) return absl::InvalidArgumentError("the trace has no requests");
  std::stable_sort(out.begin(), out.end(), [](const RequestSpec& x, const RequestSpec& y) {
    return x.arrival_s < y.arrival_s;
  });
  return out;
}

absl::StatusOr<std::vector<RequestSpec>> LoadTrace(const std::string& path,
                                                   const DatasetOptions& options) {
  auto text = ReadFile(path, "trace");
  if (!text.ok()) return text.status();
  auto specs = ParseTrace(*text, options);
  if (!specs.ok()) {
    return absl::Status(specs.status().code(),
                        absl::StrCat("trace file '", path, "' ", specs.status().message()));
  }
  return specs;
}

absl::StatusOr<std::vector<RequestSpec>> BuildDataset(const DatasetOptions& options) {
  if (options.vocab_lo < 0 || options.vocab_hi <= options.vocab_lo) {
    return absl::InvalidArgumentError(
        absl::StrCat("empty token id range [", options.vocab_lo, ", ", options.vocab_hi, ")"));
  }
  const bool needs_path =
      options.kind == DatasetKind::kShareGpt || options.kind == DatasetKind::kTrace;
  if (needs_path && options.path.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat("dataset '", DatasetKindName(options.kind), "' needs --dataset-path"));
  }
  if (options.kind == DatasetKind::kShareGpt) {
    return LoadShareGpt(options.path, options.num_requests,
                        options.output_len_set ? options.output_len : 0, options.seed);
  }
  if (options.kind == DatasetKind::kTrace) return LoadTrace(options.path, options);
  if (options.num_requests < 0) {
    return absl::InvalidArgumentError("the number of requests must be >= 0");
  }

  LengthDist prompt_dist, output_dist;
  if (options.kind == DatasetKind::kRandom) {
    if (options.input_len < 1 || options.output_len < 1) {
      return absl::InvalidArgumentError("--input-len and --output-len must be >= 1");
    }
    if (options.range_ratio < 0 || options.range_ratio >= 1) {
      return absl::InvalidArgumentError("the range ratio must be in [0, 1)");
    }
    auto dist = [&](int64_t len) {
      if (options.range_ratio == 0) return LengthDist::Fixed(len);
      return LengthDist::Uniform(std::llround(len * (1 - options.range_ratio)),
                                 std::llround(len * (1 + options.range_ratio)));
    };
    prompt_dist = dist(options.input_len);
    output_dist = dist(options.output_len);
  } else {
    auto shape = SyntheticWorkloadShape(options.kind, options.length_scale);
    if (!shape.ok()) return shape.status();
    prompt_dist = shape->prompt;
    output_dist = shape->output;
  }
  const int64_t prefix_len = options.shared_prefix_len;
  if (prefix_len < 0 || options.num_shared_prefixes < 1 || options.num_shared_prefixes > 100000) {
    return absl::InvalidArgumentError(
        "the shared prefix length must be >= 0 and the number of prefixes in [1, 100000]");
  }
  if (prefix_len > 0 && options.max_model_len > 0 && prefix_len + 2 > options.max_model_len) {
    return absl::InvalidArgumentError(absl::StrCat("a shared prefix of ", prefix_len,
                                                   " tokens leaves no room under the model "
                                                   "length of ",
                                                   options.max_model_len));
  }
  // Separate streams for lengths, token ids and prefixes, so that ids never shift the lengths
  // and a shared prefix changes no request's own part.
  Rng len_rng(options.seed);
  Rng id_rng(options.seed ^ 0x9e3779b97f4a7c15ULL);
  Rng prefix_rng(options.seed ^ 0x5851f42d4c957f2dULL);
  std::vector<RequestSpec> prefixes;
  for (int64_t g = 0; prefix_len > 0 && g < options.num_shared_prefixes; ++g) {
    MakePrompt(prefix_len, options, prefix_rng, &prefixes.emplace_back());
  }
  std::uniform_int_distribution<size_t> group(0, prefixes.empty() ? 0 : prefixes.size() - 1);
  std::vector<RequestSpec> out(options.num_requests);
  for (auto& spec : out) {
    int64_t prompt = prompt_dist.Sample(len_rng);
    int64_t output = output_dist.Sample(len_rng);
    if (options.kind != DatasetKind::kRandom && options.output_len_set) {
      output = options.output_len;
    }
    if (prefixes.empty()) {
      CapLengths(options.max_model_len, &prompt, &output);
      spec.output_len = output;
      MakePrompt(prompt, options, id_rng, &spec);
      continue;
    }
    const int64_t room = options.max_model_len > 0 ? options.max_model_len - prefix_len : 0;
    CapLengths(room, &prompt, &output);
    spec.output_len = output;
    MakePrompt(prompt, options, id_rng, &spec);
    spec.prefix_group = static_cast<int32_t>(group(prefix_rng));
    const RequestSpec& prefix = prefixes[spec.prefix_group];
    spec.prompt_len += prefix_len;
    if (spec.use_text) {
      spec.prompt_text = absl::StrCat(prefix.prompt_text, " ", spec.prompt_text);
    } else {
      spec.prompt_token_ids.insert(spec.prompt_token_ids.begin(), prefix.prompt_token_ids.begin(),
                                   prefix.prompt_token_ids.end());
    }
  }
  return out;
}

absl::StatusOr<ArrivalKind> ParseArrivalKind(absl::string_view name) {
  if (name == "poisson") return ArrivalKind::kPoisson;
  if (name == "gamma") return ArrivalKind::kGamma;
  if (name == "constant") return ArrivalKind::kConstant;
  return absl::InvalidArgumentError(
      absl::StrCat("unknown arrival process '", name, "' (expected poisson, gamma or constant)"));
}

const char* ArrivalKindName(ArrivalKind kind) {
  switch (kind) {
    case ArrivalKind::kPoisson:
      return "poisson";
    case ArrivalKind::kGamma:
      return "gamma";
    case ArrivalKind::kConstant:
      return "constant";
  }
  return "?";
}

absl::StatusOr<std::vector<double>> ArrivalTimes(const ArrivalOptions& options, int64_t count,
                                                 double duration_s, int64_t max_count) {
  if (!(options.rate > 0) || !std::isfinite(options.rate)) {
    return absl::InvalidArgumentError(
        absl::StrCat("the request rate must be a positive number, got ", options.rate));
  }
  if (!(options.burstiness > 0) || !std::isfinite(options.burstiness)) {
    return absl::InvalidArgumentError(
        absl::StrCat("the burstiness must be a positive number, got ", options.burstiness));
  }
  if (count < 0 && !(duration_s > 0)) {
    return absl::InvalidArgumentError("arrivals need a count or a positive duration");
  }
  const int64_t limit = count >= 0 ? std::min(count, max_count) : max_count;
  Rng rng(options.seed);
  std::exponential_distribution<double> exp_gap(options.rate);
  std::gamma_distribution<double> gamma_gap(options.burstiness,
                                            1.0 / (options.rate * options.burstiness));
  std::vector<double> times;
  double t = 0;
  for (int64_t i = 0; i < limit; ++i) {
    if (i > 0) {
      switch (options.kind) {
        case ArrivalKind::kPoisson:
          t += exp_gap(rng);
          break;
        case ArrivalKind::kGamma:
          t += gamma_gap(rng);
          break;
        case ArrivalKind::kConstant:
          t = static_cast<double>(i) / options.rate;
          break;
      }
    }
    if (count < 0 && t >= duration_s) break;
    times.push_back(t);
  }
  return times;
}

}  // namespace pds::client

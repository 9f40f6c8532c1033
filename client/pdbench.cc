#include "client/pdbench.h"

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <limits>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_replace.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "client/bench_metrics.h"
#include "client/bench_runner.h"
#include "client/multi_client.h"
#include "client/openai_client.h"
#include "client/rate_search.h"
#include "client/serving_client.h"
#include "client/workload.h"
#include "engine/common/status_macros.h"

namespace pds::client {
namespace {

constexpr char kUsage[] =
    "usage: pdbench --target HOST:PORT [--rate R | --concurrency C] [--num-requests N]\n"
    "               [--duration S] [--arrival poisson|gamma|constant] [--burstiness B]\n"
    "               [--dataset random|chatbot|code|summarization|sharegpt|trace]\n"
    "               [--dataset-path F] [--input-len L] [--output-len O] [--seed S]\n"
    "               [--goodput ttft:MS tpot:MS] [--percentile-metrics ttft,tpot,itl,e2el]\n"
    "               [--search] [--json-out F] [--csv-out F] [--plot-out F.svg] ...\n"
    "\n"
    "Load-tests a pdserve cluster (or, with --api openai, any OpenAI-compatible server) and\n"
    "reports TTFT, TPOT, ITL, E2EL, throughput, SLO attainment and goodput with vLLM `bench\n"
    "serve` field names. Sends only to --target.\n";

// Flag table: kMulti takes every following argument up to the next --flag (vLLM's --goodput).
enum class FlagType { kBool, kValue, kMulti };
struct FlagDef {
  const char* name;
  FlagType type;
  const char* help;
};

const FlagDef kFlags[] = {
    {"target", FlagType::kValue,
     "HOST:PORT of the pdserve front-end, or of the HTTP server with --api openai (required); "
     "several, comma-separated: requests go to each in turn, and one a target refuses before "
     "answering (UNAVAILABLE: draining, gone) goes to the next"},
    {"api", FlagType::kValue,
     "grpc (pdserve's Serving API, the default), openai: streamed POST /v1/completions on "
     "an OpenAI-compatible HTTP server (pdserve --http-port, vLLM, SGLang, ...), or "
     "openai-chat: streamed POST /v1/chat/completions with the prompt as one user message "
     "(text prompts: implies --text-prompts; the server's chat template adds its tokens); no "
     "server timeline, and tokens counted per chunk, made up to the usage at the end"},
    {"model", FlagType::kValue,
     "--api openai(-chat): the model field (default: GET /v1/models' first)"},
    {"rate", FlagType::kValue,
     "open loop: requests per second, or inf to send all at once (default inf)"},
    {"concurrency", FlagType::kValue, "closed loop: this many requests always in flight"},
    {"num-requests", FlagType::kValue,
     "requests to send (default 200, or as many as --duration allows)"},
    {"duration", FlagType::kValue, "stop sending after S seconds"},
    {"arrival", FlagType::kValue, "poisson (default), gamma or constant"},
    {"burstiness", FlagType::kValue,
     "gamma shape: 1 = Poisson, < 1 burstier, > 1 smoother (default 1; sets --arrival gamma "
     "when not 1)"},
    {"dataset", FlagType::kValue,
     "random (default), chatbot, code, summarization, sharegpt or trace"},
    {"dataset-path", FlagType::kValue, "the ShareGPT JSON or trace JSONL file"},
    {"input-len", FlagType::kValue, "random: prompt tokens (default 128)"},
    {"output-len", FlagType::kValue,
     "random: output tokens (default 128); other datasets: force every output to O"},
    {"random-range-ratio", FlagType::kValue,
     "random: lengths uniform in [L*(1-r), L*(1+r)] (default 0: fixed)"},
    {"length-scale", FlagType::kValue,
     "chatbot/code/summarization: multiply every length (default 1)"},
    {"max-model-len", FlagType::kValue, "cap prompt + output tokens (shortening the prompt)"},
    {"shared-prefix-len", FlagType::kValue,
     "generated datasets: start every prompt with one of --num-shared-prefixes fixed prefixes "
     "of this many tokens (a system prompt; default 0: none)"},
    {"num-shared-prefixes", FlagType::kValue,
     "how many distinct shared prefixes, one drawn per request (default 1)"},
    {"turns", FlagType::kValue,
     "multi-turn conversations of up to T requests (default 1): --rate and --num-requests then "
     "count conversations; each later turn sends the previous prompt, the answer's tokens and "
     "a new message drawn like a prompt (generated datasets, token ids, finite --rate, "
     "--max-model-len)"},
    {"think-time", FlagType::kValue,
     "multi-turn: seconds between an answer's end and the next turn (default 1)"},
    {"vocab-range", FlagType::kValue,
     "LO,HI: token ids of generated prompts in [LO, HI) (default 100,500: ordinary tokens of every "
     "preset)"},
    {"text-prompts", FlagType::kBool, "send generated prompts as text instead of token ids"},
    {"seed", FlagType::kValue, "seed of lengths, prompts and arrivals (default 0)"},
    {"temperature", FlagType::kValue, "sampling temperature (default: server's, greedy)"},
    {"json-schema", FlagType::kValue,
     "structured output: every request's reply is JSON of this schema (a file, or its text "
     "starting with '{'; OpenAI APIs send it as response_format)"},
    {"regex", FlagType::kValue,
     "structured output: every request's reply matches this regular expression (OpenAI APIs "
     "send it as guided_regex)"},
    {"goodput", FlagType::kMulti,
     "SLO targets, e.g. ttft:250 tpot:100 (ms); also sent to the server per request"},
    {"no-slo-hints", FlagType::kBool, "do not send the SLO targets with the requests"},
    {"percentile-metrics", FlagType::kValue,
     "metrics to report: any of ttft,tpot,itl,e2el (default all)"},
    {"max-concurrency", FlagType::kValue,
     "open loop: at most this many calls in flight; later sends wait, and at a finite "
     "--rate their wait counts in TTFT and E2E latency (default 512)"},
    {"request-timeout", FlagType::kValue, "deadline of each request in seconds (default 300)"},
    {"connect-timeout", FlagType::kValue, "seconds to wait for the target (default 10)"},
    {"wait-ready", FlagType::kValue,
     "seconds to wait, once connected, for the cluster to be able to serve (healthy prefill "
     "and decode workers or a colocated one; default 0: do not wait)"},
    {"search", FlagType::kBool,
     "find the highest rate with attainment >= --attainment-target (needs --goodput)"},
    {"search-min-rate", FlagType::kValue, "lowest rate swept (default 0.5)"},
    {"search-max-rate", FlagType::kValue, "highest rate swept (default 8)"},
    {"search-steps", FlagType::kValue, "rates in the sweep (default 6)"},
    {"search-bisect", FlagType::kValue, "bisection steps after the sweep (default 3)"},
    {"attainment-target", FlagType::kValue, "SLO attainment to reach, 0..1 (default 0.9)"},
    {"num-gpus", FlagType::kValue, "report rates per GPU as well (default 1)"},
    {"json-out", FlagType::kValue, "write the results as JSON"},
    {"csv-out", FlagType::kValue, "write per-request rows (or per-rate rows with --search)"},
    {"plot-out", FlagType::kValue, "write an SVG of attainment and latency against rate"},
    {"report-out", FlagType::kValue, "write the summary table to this file too"},
    {"quiet", FlagType::kBool, "no progress output"},
    {"help", FlagType::kBool, "this help"},
};

class Flags {
 public:
  static absl::StatusOr<Flags> Parse(int argc, char** argv) {
    Flags flags;
    for (int i = 1; i < argc; ++i) {
      std::string arg = argv[i];
      if (arg.rfind("--", 0) != 0) {
        return absl::InvalidArgumentError(absl::StrCat("unexpected argument '", arg, "'"));
      }
      arg = arg.substr(2);
      std::optional<std::string> value;
      if (auto eq = arg.find('='); eq != std::string::npos) {
        value = arg.substr(eq + 1);
        arg = arg.substr(0, eq);
      }
      const FlagDef* def = nullptr;
      for (const FlagDef& f : kFlags) {
        if (arg == f.name) def = &f;
      }
      if (def == nullptr) {
        return absl::InvalidArgumentError(absl::StrCat("unknown flag --", arg, " (see --help)"));
      }
      std::vector<std::string>& out = flags.values_[arg];
      out.clear();
      switch (def->type) {
        case FlagType::kBool:
          if (value && *value != "true" && *value != "1") {
            flags.values_.erase(arg);
          } else {
            out.push_back("true");
          }
          break;
        case FlagType::kValue:
          if (!value) {
            if (i + 1 >= argc) {
              return absl::InvalidArgumentError(absl::StrCat("--", arg, " needs a value"));
            }
            value = argv[++i];
          }
          out.push_back(*value);
          break;
        case FlagType::kMulti:
          if (value) out.push_back(*value);
          while (i + 1 < argc && std::string(argv[i + 1]).rfind("--", 0) != 0) {
            out.push_back(argv[++i]);
          }
          if (out.empty()) {
            return absl::InvalidArgumentError(absl::StrCat("--", arg, " needs a value"));
          }
          break;
      }
    }
    return flags;
  }

  bool Has(const std::string& name) const { return values_.count(name) > 0; }
  std::string String(const std::string& name, const std::string& fallback = "") const {
    auto it = values_.find(name);
    return it == values_.end() || it->second.empty() ? fallback : it->second.front();
  }
  std::vector<std::string> Multi(const std::string& name) const {
    auto it = values_.find(name);
    return it == values_.end() ? std::vector<std::string>() : it->second;
  }
  absl::StatusOr<int64_t> Int(const std::string& name, int64_t fallback) const {
    if (!Has(name)) return fallback;
    int64_t v;
    if (!absl::SimpleAtoi(String(name), &v)) {
      return absl::InvalidArgumentError(
          absl::StrCat("--", name, " expects an integer, got '", String(name), "'"));
    }
    return v;
  }
  absl::StatusOr<double> Double(const std::string& name, double fallback) const {
    if (!Has(name)) return fallback;
    double v;
    if (!absl::SimpleAtod(String(name), &v) || std::isnan(v)) {
      return absl::InvalidArgumentError(
          absl::StrCat("--", name, " expects a number, got '", String(name), "'"));
    }
    return v;
  }

 private:
  std::map<std::string, std::vector<std::string>> values_;
};

std::string Help() {
  std::string out = kUsage;
  absl::StrAppend(&out, "\nflags:\n");
  for (const FlagDef& f : kFlags) {
    std::string left = absl::StrCat("  --", f.name, f.type == FlagType::kBool ? "" : " V");
    if (left.size() < 26) left.resize(26, ' ');
    absl::StrAppend(&out, left, " ", f.help, "\n");
  }
  absl::StrAppend(&out,
                  "\nexit status: 0 ok, 1 target unreachable / no request completed / output "
                  "error, 2 bad arguments\n");
  return out;
}

struct Config {
  std::string target;
  bool openai = false;  // --api openai or openai-chat
  bool chat = false;    // --api openai-chat
  std::string model;
  double rate = std::numeric_limits<double>::infinity();
  bool rate_set = false;
  int concurrency = 0;
  int64_t num_requests = -1;  // unset
  double duration_s = 0;
  ArrivalKind arrival = ArrivalKind::kPoisson;
  double burstiness = 1.0;
  DatasetOptions dataset;
  int turns = 1;
  double think_time_s = 1.0;
  SloTargets slo;
  bool send_slo = true;
  std::optional<float> temperature;
  std::string json_schema;
  std::string regex;
  std::vector<std::string> percentile_metrics = AllPercentileMetrics();
  int max_concurrency = 512;
  double request_timeout_s = 300;
  double connect_timeout_s = 10;
  double wait_ready_s = 0;
  bool search = false;
  SearchOptions search_options;
  int num_gpus = 1;
  std::string json_out, csv_out, plot_out, report_out;
  bool quiet = false;
};

absl::StatusOr<Config> MakeConfig(const Flags& f) {
  Config c;
  c.target = f.String("target");
  if (absl::StripAsciiWhitespace(absl::StrReplaceAll(c.target, {{",", ""}})).empty()) {
    return absl::InvalidArgumentError("--target HOST:PORT is required");
  }
  const std::string api = f.Has("api") ? f.String("api") : "grpc";
  if (api != "grpc" && api != "openai" && api != "openai-chat") {
    return absl::InvalidArgumentError("--api must be grpc, openai or openai-chat");
  }
  c.openai = api != "grpc";
  c.chat = api == "openai-chat";
  c.model = f.String("model");
  if (!c.model.empty() && !c.openai) {
    return absl::InvalidArgumentError("--model names the model of --api openai");
  }
  if (f.Has("rate")) {
    c.rate_set = true;
    std::string r = f.String("rate");
    if (r == "inf") {
      c.rate = std::numeric_limits<double>::infinity();
    } else {
      PDS_ASSIGN_OR_RETURN(c.rate, f.Double("rate", 0));
      if (!(c.rate > 0)) return absl::InvalidArgumentError("--rate must be > 0 (or inf)");
    }
  }
  int64_t concurrency;
  PDS_ASSIGN_OR_RETURN(concurrency, f.Int("concurrency", 0));
  if (f.Has("concurrency") && (concurrency < 1 || concurrency > 100000)) {
    return absl::InvalidArgumentError("--concurrency must be in [1, 100000]");
  }
  c.concurrency = static_cast<int>(concurrency);
  if (c.rate_set && c.concurrency > 0) {
    return absl::InvalidArgumentError("give either --rate (open loop) or --concurrency (closed)");
  }
  PDS_ASSIGN_OR_RETURN(c.num_requests, f.Int("num-requests", -1));
  if (f.Has("num-requests") && c.num_requests < 1) {
    return absl::InvalidArgumentError("--num-requests must be >= 1");
  }
  PDS_ASSIGN_OR_RETURN(c.duration_s, f.Double("duration", 0));
  if (f.Has("duration") && !(c.duration_s > 0)) {
    return absl::InvalidArgumentError("--duration must be > 0 seconds");
  }
  PDS_ASSIGN_OR_RETURN(c.arrival, ParseArrivalKind(f.String("arrival", "poisson")));
  PDS_ASSIGN_OR_RETURN(c.burstiness, f.Double("burstiness", 1.0));
  if (!(c.burstiness > 0)) return absl::InvalidArgumentError("--burstiness must be > 0");
  if (c.burstiness != 1.0 && !f.Has("arrival")) c.arrival = ArrivalKind::kGamma;
  if (c.burstiness != 1.0 && c.arrival != ArrivalKind::kGamma) {
    return absl::InvalidArgumentError("--burstiness applies to --arrival gamma only");
  }

  DatasetOptions& d = c.dataset;
  PDS_ASSIGN_OR_RETURN(d.kind, ParseDatasetKind(f.String("dataset", "random")));
  d.path = f.String("dataset-path");
  PDS_ASSIGN_OR_RETURN(d.input_len, f.Int("input-len", 128));
  PDS_ASSIGN_OR_RETURN(d.output_len, f.Int("output-len", 128));
  d.output_len_set = f.Has("output-len");
  if (d.input_len < 1 || d.output_len < 1) {
    return absl::InvalidArgumentError("--input-len and --output-len must be >= 1");
  }
  PDS_ASSIGN_OR_RETURN(d.range_ratio, f.Double("random-range-ratio", 0));
  PDS_ASSIGN_OR_RETURN(d.length_scale, f.Double("length-scale", 1.0));
  PDS_ASSIGN_OR_RETURN(d.max_model_len, f.Int("max-model-len", 0));
  PDS_ASSIGN_OR_RETURN(d.shared_prefix_len, f.Int("shared-prefix-len", 0));
  PDS_ASSIGN_OR_RETURN(d.num_shared_prefixes, f.Int("num-shared-prefixes", 1));
  if (d.shared_prefix_len > 0 &&
      (d.kind == DatasetKind::kShareGpt || d.kind == DatasetKind::kTrace)) {
    return absl::InvalidArgumentError(
        "--shared-prefix-len applies to generated datasets (random, chatbot, code, "
        "summarization)");
  }
  if (f.Has("vocab-range")) {
    std::vector<std::string> parts = absl::StrSplit(f.String("vocab-range"), absl::ByAnyChar(",:"));
    int lo, hi;
    if (parts.size() != 2 || !absl::SimpleAtoi(parts[0], &lo) || !absl::SimpleAtoi(parts[1], &hi) ||
        lo < 0 || hi <= lo) {
      return absl::InvalidArgumentError("--vocab-range expects LO,HI with 0 <= LO < HI");
    }
    d.vocab_lo = lo;
    d.vocab_hi = hi;
  }
  d.text_prompts = f.Has("text-prompts") || c.chat;  // a chat message is text
  int64_t seed;
  PDS_ASSIGN_OR_RETURN(seed, f.Int("seed", 0));
  d.seed = static_cast<uint64_t>(seed);
  if (f.Has("temperature")) {
    double t;
    PDS_ASSIGN_OR_RETURN(t, f.Double("temperature", 0));
    if (t < 0) return absl::InvalidArgumentError("--temperature must be >= 0");
    c.temperature = static_cast<float>(t);
  }
  if (f.Has("json-schema")) {
    c.json_schema = f.String("json-schema");
    if (!absl::StartsWith(c.json_schema, "{")) {
      std::ifstream in(c.json_schema);
      if (!in) {
        return absl::InvalidArgumentError(
            absl::StrCat("--json-schema: cannot read ", c.json_schema));
      }
      c.json_schema.assign(std::istreambuf_iterator<char>(in), {});
    }
  }
  if (f.Has("regex")) c.regex = f.String("regex");
  if (!c.json_schema.empty() && !c.regex.empty()) {
    return absl::InvalidArgumentError("--json-schema and --regex: one only");
  }

  for (const std::string& item : f.Multi("goodput")) {
    for (absl::string_view part : absl::StrSplit(item, ',', absl::SkipEmpty())) {
      std::vector<std::string> kv = absl::StrSplit(part, ':');
      double ms;
      if (kv.size() != 2 || !absl::SimpleAtod(kv[1], &ms) || !(ms >= 0)) {
        return absl::InvalidArgumentError(absl::StrCat(
            "--goodput expects NAME:MILLISECONDS items such as ttft:250 tpot:100, got '", part,
            "'"));
      }
      if (kv[0] == "ttft") {
        c.slo.ttft_ms = ms;
      } else if (kv[0] == "tpot") {
        c.slo.tpot_ms = ms;
      } else {
        return absl::InvalidArgumentError(absl::StrCat("--goodput: unsupported SLO metric '", kv[0],
                                                       "' (pdbench supports ttft and tpot)"));
      }
    }
  }
  c.send_slo = !f.Has("no-slo-hints");
  if (f.Has("percentile-metrics")) {
    c.percentile_metrics.clear();
    for (absl::string_view m :
         absl::StrSplit(f.String("percentile-metrics"), ',', absl::SkipEmpty())) {
      const auto& all = AllPercentileMetrics();
      if (std::find(all.begin(), all.end(), std::string(m)) == all.end()) {
        return absl::InvalidArgumentError(absl::StrCat("--percentile-metrics: unknown metric '", m,
                                                       "' (expected ttft, tpot, itl, e2el)"));
      }
      c.percentile_metrics.emplace_back(m);
    }
  }
  int64_t max_conc;
  PDS_ASSIGN_OR_RETURN(max_conc, f.Int("max-concurrency", 512));
  if (max_conc < 1 || max_conc > 100000) {
    return absl::InvalidArgumentError("--max-concurrency must be in [1, 100000]");
  }
  c.max_concurrency = static_cast<int>(max_conc);
  PDS_ASSIGN_OR_RETURN(c.request_timeout_s, f.Double("request-timeout", 300));
  PDS_ASSIGN_OR_RETURN(c.connect_timeout_s, f.Double("connect-timeout", 10));
  if (!(c.request_timeout_s > 0) || !(c.connect_timeout_s > 0)) {
    return absl::InvalidArgumentError("--request-timeout and --connect-timeout must be > 0");
  }
  PDS_ASSIGN_OR_RETURN(c.wait_ready_s, f.Double("wait-ready", 0));
  if (!(c.wait_ready_s >= 0) || c.wait_ready_s > 86400) {
    return absl::InvalidArgumentError("--wait-ready must be in [0, 86400] seconds");
  }
  c.search = f.Has("search");
  SearchOptions& s = c.search_options;
  PDS_ASSIGN_OR_RETURN(s.min_rate, f.Double("search-min-rate", 0.5));
  PDS_ASSIGN_OR_RETURN(s.max_rate, f.Double("search-max-rate", 8));
  int64_t steps, bisect;
  PDS_ASSIGN_OR_RETURN(steps, f.Int("search-steps", 6));
  PDS_ASSIGN_OR_RETURN(bisect, f.Int("search-bisect", 3));
  if (steps < 1 || steps > 100 || bisect < 0 || bisect > 20) {
    return absl::InvalidArgumentError(
        "--search-steps must be in [1, 100], --search-bisect in "
        "[0, 20]");
  }
  s.steps = static_cast<int>(steps);
  s.bisect_steps = static_cast<int>(bisect);
  PDS_ASSIGN_OR_RETURN(s.attainment_target, f.Double("attainment-target", 0.9));
  if (!(s.attainment_target > 0 && s.attainment_target <= 1)) {
    return absl::InvalidArgumentError("--attainment-target must be in (0, 1]");
  }
  int64_t gpus;
  PDS_ASSIGN_OR_RETURN(gpus, f.Int("num-gpus", 1));
  if (gpus < 1 || gpus > 100000) return absl::InvalidArgumentError("--num-gpus must be >= 1");
  c.num_gpus = static_cast<int>(gpus);
  if (c.search) {
    if (!c.slo.Any()) {
      return absl::InvalidArgumentError("--search needs SLO targets: --goodput ttft:MS tpot:MS");
    }
    if (c.concurrency > 0 || c.rate_set) {
      return absl::InvalidArgumentError(
          "--search sweeps the rate itself; drop --rate/--concurrency (use --search-min-rate "
          "and --search-max-rate)");
    }
    if (!(s.min_rate > 0) || s.max_rate < s.min_rate) {
      return absl::InvalidArgumentError(
          "--search needs 0 < --search-min-rate <= --search-max-rate");
    }
    if (d.kind == DatasetKind::kTrace) {
      return absl::InvalidArgumentError("--search cannot replay a trace's own arrival times");
    }
  }
  int64_t turns;
  PDS_ASSIGN_OR_RETURN(turns, f.Int("turns", 1));
  PDS_ASSIGN_OR_RETURN(c.think_time_s, f.Double("think-time", 1.0));
  if (turns < 1 || turns > 1000 || !(c.think_time_s >= 0 && c.think_time_s <= 3600)) {
    return absl::InvalidArgumentError(
        "--turns must be in [1, 1000] and --think-time in [0, 3600] seconds");
  }
  c.turns = static_cast<int>(turns);
  if (c.turns > 1 && c.openai) {
    return absl::InvalidArgumentError(
        "--turns resends each answer's token ids, which --api openai does not return");
  }
  if (c.turns > 1 &&
      (c.search || c.concurrency > 0 || std::isinf(c.rate) || d.text_prompts ||
       d.kind == DatasetKind::kShareGpt || d.kind == DatasetKind::kTrace || d.max_model_len <= 0)) {
    return absl::InvalidArgumentError(
        "--turns needs a finite --rate (conversations per second), a generated dataset "
        "(random, chatbot, code, summarization) sent as token ids, --max-model-len (a "
        "conversation ends before its context would pass it) and no --search");
  }
  if (d.kind == DatasetKind::kTrace && (c.rate_set || c.concurrency > 0)) {
    return absl::InvalidArgumentError(
        "--dataset trace replays the trace's arrival times; drop --rate/--concurrency");
  }
  if (!c.search && c.concurrency == 0 && std::isinf(c.rate) && c.duration_s > 0 &&
      c.num_requests < 0) {
    return absl::InvalidArgumentError("--duration with --rate inf needs --num-requests");
  }
  c.json_out = f.String("json-out");
  c.csv_out = f.String("csv-out");
  c.plot_out = f.String("plot-out");
  c.report_out = f.String("report-out");
  c.quiet = f.Has("quiet");
  return c;
}

absl::Status WriteFile(const std::string& path, const std::string& content) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  if (!out) return absl::PermissionDeniedError(absl::StrCat("cannot write '", path, "'"));
  out << content;
  out.close();
  if (!out) return absl::DataLossError(absl::StrCat("error writing '", path, "'"));
  return absl::OkStatus();
}

// Progress on stderr: a bar redrawn in place on a terminal, a line every 5 s otherwise.
class ProgressPrinter {
 public:
  ProgressPrinter(bool quiet, std::string label)
      : quiet_(quiet), tty_(isatty(STDERR_FILENO) == 1), label_(std::move(label)) {}

  double interval() const { return tty_ ? 0.25 : 5.0; }

  void operator()(const RunProgress& p) {
    if (quiet_) return;
    const int64_t total = std::max<int64_t>(p.total, 1);
    const std::string counts =
        absl::StrFormat("%d/%d done, %d failed, %d in flight, %.1fs", p.finished, p.total, p.failed,
                        p.inflight, p.elapsed_s);
    if (tty_) {
      const int width = 30;
      int filled = static_cast<int>(width * std::min<int64_t>(p.finished, total) / total);
      std::fprintf(stderr, "\r%s [%s%s] %s\033[K", label_.c_str(), std::string(filled, '#').c_str(),
                   std::string(width - filled, '.').c_str(), counts.c_str());
      drawn_ = true;
    } else {
      std::fprintf(stderr, "pdbench: %s %s\n", label_.c_str(), counts.c_str());
    }
    std::fflush(stderr);
  }

  void Finish() {
    if (drawn_) std::fprintf(stderr, "\n");
    drawn_ = false;
  }

 private:
  bool quiet_;
  bool tty_;
  std::string label_;
  bool drawn_ = false;
};

std::string Date() { return absl::FormatTime("%Y%m%d-%H%M%S", absl::Now(), absl::UTCTimeZone()); }

nlohmann::json ConfigJson(const Config& c, const std::string& model) {
  nlohmann::json j;
  j["date"] = Date();
  j["backend"] = c.chat ? "openai-chat" : c.openai ? "openai" : "pdserve";
  j["target"] = c.target;
  j["model_id"] = model;
  j["dataset"] = DatasetKindName(c.dataset.kind);
  if (!c.dataset.path.empty()) j["dataset_path"] = c.dataset.path;
  j["seed"] = c.dataset.seed;
  j["arrival"] = ArrivalKindName(c.arrival);
  j["burstiness"] = c.burstiness;
  if (c.concurrency > 0) {
    j["max_concurrency"] = c.concurrency;
    j["request_rate"] = "inf";
  } else {
    j["max_concurrency"] = c.max_concurrency;
    if (std::isinf(c.rate)) {
      j["request_rate"] = "inf";
    } else {
      j["request_rate"] = c.rate;
    }
  }
  if (c.duration_s > 0) j["duration_limit"] = c.duration_s;
  if (c.turns > 1) {
    j["turns"] = c.turns;  // request_rate then counts conversations
    j["think_time"] = c.think_time_s;
  }
  return j;
}

class Pdbench {
 public:
  explicit Pdbench(Config config) : c_(std::move(config)) {
    std::vector<std::unique_ptr<GenerateClient>> clients;
    for (absl::string_view t : absl::StrSplit(c_.target, ',', absl::SkipWhitespace())) {
      const std::string target(absl::StripAsciiWhitespace(t));
      if (c_.openai) {
        clients.push_back(std::make_unique<OpenAiClient>(target, c_.model, c_.chat));
      } else {
        clients.push_back(std::make_unique<ServingClient>(target));
      }
    }
    first_ = clients.front().get();
    if (clients.size() == 1) {
      client_ = std::move(clients.front());
    } else {
      auto multi = std::make_unique<MultiClient>(std::move(clients));
      multi_ = multi.get();
      client_ = std::move(multi);
    }
  }

  absl::StatusOr<int> Run() {
    absl::Status connected = client_->WaitForConnected(absl::Seconds(c_.connect_timeout_s));
    if (!connected.ok()) {
      return absl::UnavailableError(absl::StrCat("target not reachable: ", connected.message()));
    }
    if (c_.wait_ready_s > 0) PDS_RETURN_IF_ERROR(WaitReady());
    if (c_.openai) model_ = static_cast<OpenAiClient&>(*first_).model();
    auto status = client_->GetClusterStatus(absl::Seconds(std::min(c_.connect_timeout_s, 10.0)));
    if (status.ok()) {
      model_ = status->model();
    } else if (status.status().code() != absl::StatusCode::kUnimplemented && !c_.quiet) {
      std::fprintf(stderr, "pdbench: warning: %s\n", status.status().ToString().c_str());
    }
    return c_.search ? RunSearch() : RunSingle();
  }

 private:
  // Polls the cluster's status until it could serve a request (--wait-ready).
  absl::Status WaitReady() {
    const absl::Time end = absl::Now() + absl::Seconds(c_.wait_ready_s);
    std::string last = "no answer yet";
    while (true) {
      auto status = client_->GetClusterStatus(absl::Seconds(2));
      if (absl::IsUnimplemented(status.status())) {
        // Not a pdserve front-end: nothing to wait for.
        if (!c_.quiet) std::fprintf(stderr, "pdbench: the target has no cluster status\n");
        return absl::OkStatus();
      }
      if (status.ok()) {
        if (status->ready()) return absl::OkStatus();  // the front-end's own readiness
        last = absl::StrCat(status->instances_size(), " workers registered, not a servable set");
      } else {
        last = status.status().ToString();
      }
      if (absl::Now() >= end) {
        return absl::UnavailableError(
            absl::StrCat("the cluster was not ready in ", c_.wait_ready_s, " s (", last, ")"));
      }
      absl::SleepFor(absl::Milliseconds(200));
    }
  }

  // The requests of a run at `rate` (inf: all at once), their arrivals and run options.
  struct Plan {
    std::vector<RequestSpec> specs;
    RunOptions options;
  };

  absl::StatusOr<Plan> MakePlan(double rate, const std::string& label, ProgressPrinter* printer) {
    Plan plan;
    RunOptions& o = plan.options;
    o.duration_s = c_.duration_s;
    o.max_inflight = c_.max_concurrency;
    o.request_timeout_s = c_.request_timeout_s;
    o.slo = c_.slo;
    o.send_slo = c_.send_slo;
    o.temperature = c_.temperature;
    o.json_schema = c_.json_schema;
    o.regex = c_.regex;
    o.request_id_prefix = absl::StrCat("pdbench-", getpid(), "-", ++runs_);
    o.progress_interval_s = printer->interval();
    o.progress = [printer](const RunProgress& p) { (*printer)(p); };
    DatasetOptions d = c_.dataset;
    if (d.kind == DatasetKind::kTrace) {
      d.num_requests = c_.num_requests;  // < 0: the whole trace
      PDS_ASSIGN_OR_RETURN(plan.specs, BuildDataset(d));
      for (const RequestSpec& s : plan.specs) o.arrivals.push_back(s.arrival_s);
      return plan;
    }
    constexpr int64_t kClosedLoopCap = 1'000'000;
    constexpr int64_t kCycledSpecs = 4096;
    if (c_.concurrency > 0) {
      o.concurrency = c_.concurrency;
      if (c_.num_requests > 0) {
        o.max_requests = c_.num_requests;
      } else if (c_.duration_s > 0) {
        o.max_requests = kClosedLoopCap;
      } else {
        o.max_requests = 200;
      }
      d.num_requests = std::min(o.max_requests, kCycledSpecs);
      PDS_ASSIGN_OR_RETURN(plan.specs, BuildDataset(d));
      return plan;
    }
    int64_t n = c_.num_requests > 0 ? c_.num_requests : (c_.duration_s > 0 ? -1 : 200);
    if (std::isinf(rate)) {
      o.arrivals.assign(n, 0.0);
      o.burst = true;  // (a trace keeps its arrival times, whatever --rate says)
    } else {
      ArrivalOptions a;
      a.kind = c_.arrival;
      a.rate = rate;
      a.burstiness = c_.burstiness;
      a.seed = c_.dataset.seed;
      PDS_ASSIGN_OR_RETURN(o.arrivals, ArrivalTimes(a, n, c_.duration_s));
    }
    if (o.arrivals.empty()) return absl::InvalidArgumentError("no arrivals fall in --duration");
    d.num_requests = static_cast<int64_t>(o.arrivals.size());
    if (c_.turns > 1) {  // the arrivals start conversations of up to `turns` requests
      o.turns = c_.turns;
      o.think_time_s = c_.think_time_s;
      o.follow_up_skip = d.shared_prefix_len;
      o.max_model_len = d.max_model_len;
      d.num_requests *= c_.turns;
    }
    PDS_ASSIGN_OR_RETURN(plan.specs, BuildDataset(d));
    return plan;
  }

  absl::StatusOr<RunResult> Execute(double rate, const std::string& label) {
    ProgressPrinter printer(c_.quiet, label);
    auto plan = MakePlan(rate, label, &printer);
    if (!plan.ok()) return plan.status();
    auto result = RunBenchmark(*client_, plan->specs, plan->options);
    printer.Finish();
    if (!result.ok()) return result.status();
    if (result->late_sends > 0 && !c_.quiet) {
      std::fprintf(stderr,
                   "pdbench: %s: %lld requests sent more than 10 ms late (max %.1f ms): the "
                   "in-flight bound (--max-concurrency %d) or this machine limited the rate; their "
                   "wait counts in TTFT and E2E latency\n",
                   label.c_str(), static_cast<long long>(result->late_sends),
                   1000 * result->max_send_lag_s, c_.max_concurrency);
    }
    return result;
  }

  absl::Status WriteOutputs(const std::string& json, const std::string& csv, const std::string& svg,
                            const std::string& report) {
    if (!c_.json_out.empty()) PDS_RETURN_IF_ERROR(WriteFile(c_.json_out, json));
    if (!c_.csv_out.empty()) PDS_RETURN_IF_ERROR(WriteFile(c_.csv_out, csv));
    if (!c_.plot_out.empty()) PDS_RETURN_IF_ERROR(WriteFile(c_.plot_out, svg));
    if (!c_.report_out.empty()) PDS_RETURN_IF_ERROR(WriteFile(c_.report_out, report));
    return absl::OkStatus();
  }

  absl::StatusOr<int> RunSingle() {
    const bool closed = c_.concurrency > 0;
    std::string label = closed ? absl::StrCat("concurrency ", c_.concurrency)
                        : c_.dataset.kind == DatasetKind::kTrace
                            ? std::string("trace")
                            : absl::StrCat("rate ", std::isinf(c_.rate) ? std::string("inf")
                                                                        : absl::StrCat(c_.rate));
    auto result = Execute(c_.rate, label);
    if (!result.ok()) return result.status();
    BenchMetrics m = ComputeMetrics(result->records, result->duration_s, c_.slo);
    std::string table = SummaryTable(m, c_.percentile_metrics);
    if (c_.turns > 1) {
      // How far the conversations went (a failed turn, or one past --max-model-len, ends one).
      std::map<int64_t, int32_t> turns_sent;
      for (const RequestRecord& r : result->records) {
        if (r.error_code == "NOT_SENT") continue;
        turns_sent[r.conversation] = std::max(turns_sent[r.conversation], r.turn + 1);
      }
      int64_t complete = 0;
      for (const auto& [conversation, turns] : turns_sent) complete += turns == c_.turns;
      absl::StrAppendFormat(&table, "Conversations: %d started, %d reached turn %d of %d\n",
                            turns_sent.size(), complete, c_.turns, c_.turns);
      table += TurnsTable(result->records, c_.slo);
    }
    if (multi_ != nullptr) {
      absl::StrAppendFormat(&table, "Targets: %d (requests sent again after a refusal: %d)\n",
                            multi_->size(), multi_->failovers());
    }
    std::printf("%s", table.c_str());
    std::fflush(stdout);
    nlohmann::json j = ConfigJson(c_, model_);
    j.update(MetricsToJson(m, c_.percentile_metrics));
    j["late_sends"] = result->late_sends;
    if (multi_ != nullptr) j["failovers"] = multi_->failovers();
    double rate = std::isinf(c_.rate) ? 0 : c_.rate;
    std::string svg = SearchSvg({{rate, m}}, c_.num_gpus, c_.search_options.attainment_target,
                                c_.slo, absl::StrCat("pdbench ", label));
    PDS_RETURN_IF_ERROR(
        WriteOutputs(j.dump(2) + "\n", RequestsCsv(result->records, c_.slo), svg, table));
    return Verdict(*result, m);
  }

  int Verdict(const RunResult& result, const BenchMetrics& m) {
    if (!result.contacted) {
      std::fprintf(stderr,
                   "pdbench: the target %s was never contacted (every call failed "
                   "before reaching it)\n",
                   c_.target.c_str());
      return 1;
    }
    if (m.completed == 0) {
      std::fprintf(stderr, "pdbench: no request completed\n");
      return 1;
    }
    return 0;
  }

  absl::StatusOr<int> RunSearch() {
    bool contacted = false;
    int64_t completed = 0;
    RunAtRate run = [&](double rate) -> absl::StatusOr<BenchMetrics> {
      auto result = Execute(rate, absl::StrFormat("rate %.3f", rate));
      if (!result.ok()) return result.status();
      contacted = contacted || result->contacted;
      if (!result->contacted) {
        return absl::UnavailableError(
            absl::StrCat("the target ", c_.target, " was never contacted at rate ", rate));
      }
      BenchMetrics m = ComputeMetrics(result->records, result->duration_s, c_.slo);
      completed += m.completed;
      if (!c_.quiet) {
        std::fprintf(stderr,
                     "pdbench: rate %.3f req/s: attainment %.1f%%, goodput %.3f req/s, "
                     "%lld failed\n",
                     rate, 100 * m.slo_attainment, m.request_goodput,
                     static_cast<long long>(m.failed));
      }
      return m;
    };
    auto search = SearchMaxRate(c_.search_options, run);
    if (!search.ok()) return search.status();
    const SearchResult& s = *search;
    std::vector<SearchPoint> sorted = s.points;
    std::sort(sorted.begin(), sorted.end(),
              [](const SearchPoint& a, const SearchPoint& b) { return a.rate < b.rate; });
    std::string report =
        absl::StrCat("============ SLO attainment vs rate =============\n",
                     SearchTable(sorted, c_.num_gpus, c_.search_options.attainment_target));
    std::string slo =
        absl::StrCat(c_.slo.ttft_ms >= 0 ? absl::StrCat("ttft<=", c_.slo.ttft_ms, "ms ") : "",
                     c_.slo.tpot_ms >= 0 ? absl::StrCat("tpot<=", c_.slo.tpot_ms, "ms") : "");
    if (s.found) {
      absl::StrAppend(&report,
                      absl::StrFormat("Max rate with attainment >= %.0f%% (%s): %.3f req/s",
                                      100 * c_.search_options.attainment_target, slo, s.best_rate));
      if (c_.num_gpus > 1) {
        absl::StrAppend(&report, absl::StrFormat(" = %.3f req/s per GPU (%d GPUs)",
                                                 s.best_rate / c_.num_gpus, c_.num_gpus));
      }
      absl::StrAppend(&report, s.hit_max ? "\n(the highest rate swept passed: raise "
                                           "--search-max-rate)\n"
                                         : "\n");
    } else {
      absl::StrAppend(&report, absl::StrFormat("No rate reached attainment %.0f%% (%s); lower "
                                               "--search-min-rate\n",
                                               100 * c_.search_options.attainment_target, slo));
    }
    std::printf("%s", report.c_str());
    std::fflush(stdout);

    nlohmann::json j = ConfigJson(c_, model_);
    j.erase("request_rate");
    j["attainment_target"] = c_.search_options.attainment_target;
    j["num_gpus"] = c_.num_gpus;
    j["found"] = s.found;
    j["hit_max_rate"] = s.hit_max;
    j["max_rate"] = s.best_rate;
    j["max_rate_per_gpu"] = s.best_rate / c_.num_gpus;
    j["points"] = nlohmann::json::array();
    for (const SearchPoint& p : sorted) {
      nlohmann::json pj = MetricsToJson(p.metrics, c_.percentile_metrics);
      pj["request_rate"] = p.rate;
      pj["request_rate_per_gpu"] = p.rate / c_.num_gpus;
      j["points"].push_back(pj);
    }
    std::string svg = SearchSvg(sorted, c_.num_gpus, c_.search_options.attainment_target, c_.slo,
                                absl::StrCat("pdbench --search: ", c_.target, " ", model_));
    PDS_RETURN_IF_ERROR(
        WriteOutputs(j.dump(2) + "\n", SearchCsv(sorted, c_.num_gpus), svg, report));
    if (!contacted || completed == 0) {
      std::fprintf(stderr, "pdbench: no request completed against %s\n", c_.target.c_str());
      return 1;
    }
    return 0;
  }

  Config c_;
  std::unique_ptr<GenerateClient> client_;
  GenerateClient* first_ = nullptr;  // the first target's client (client_ or in multi_)
  MultiClient* multi_ = nullptr;     // client_, with several targets
  std::string model_;
  int runs_ = 0;
};

}  // namespace

int PdbenchMain(int argc, char** argv) {
  auto flags = Flags::Parse(argc, argv);
  if (!flags.ok()) {
    std::fprintf(stderr, "pdbench: %s\n%s", std::string(flags.status().message()).c_str(), kUsage);
    return 2;
  }
  if (flags->Has("help")) {
    std::printf("%s", Help().c_str());
    return 0;
  }
  auto config = MakeConfig(*flags);
  if (!config.ok()) {
    std::fprintf(stderr, "pdbench: %s\n", std::string(config.status().message()).c_str());
    return 2;
  }
  Pdbench bench(std::move(*config));
  auto rc = bench.Run();
  if (!rc.ok()) {
    std::fprintf(stderr, "pdbench: %s\n", rc.status().ToString().c_str());
    return rc.status().code() == absl::StatusCode::kInvalidArgument ? 2 : 1;
  }
  return *rc;
}

}  // namespace pds::client

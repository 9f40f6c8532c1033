// pdserve plan --profile FILE --workload NAME --slo-ttft T --slo-tpot T [flags]
// Searches prefill/decode instance counts (and colocated ones for comparison) in the
// simulator for the highest goodput per GPU at the SLO attainment target, and prints the
// plan (a table, or with --json the plan file of scheduler/planner.h; --out writes it).
//
// SLO values are milliseconds, as pdbench's --goodput ttft:MS: "250" and "250ms" are 250 ms,
// "0.25s" is 250 ms too.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "engine/common/status_macros.h"
#include "nlohmann/json.hpp"
#include "scheduler/calibration.h"
#include "scheduler/latency_model.h"
#include "scheduler/planner.h"
#include "server/cli_args.h"
#include "server/commands.h"

namespace pds::server {
namespace {

const std::vector<FlagSpec>& Specs() {
  static const std::vector<FlagSpec> specs = {
      {"profile", false, "latency-model profile written by `pdserve profile` (required)"},
      {"workload", false,
       "chatbot (default), code, summarization, random, sharegpt or trace (client/workload.h)"},
      {"dataset-path", false, "the ShareGPT JSON or JSONL trace file (sharegpt, trace)"},
      {"input-len", false, "random: prompt tokens (default 128)"},
      {"output-len", false, "random: output tokens (default 128); sharegpt: override"},
      {"range-ratio", false, "random: lengths uniform in len * [1 - r, 1 + r] (default 0)"},
      {"length-scale", false, "multiply the synthetic workloads' lengths (default 1)"},
      {"max-model-len", false, "cap prompt + output tokens (default: none)"},
      {"shared-prefix-len", false,
       "synthetic workloads: every prompt starts with one of --num-shared-prefixes prefixes of "
       "this many tokens, as pdbench's (default 0)"},
      {"num-shared-prefixes", false, "distinct shared prefixes (default 1)"},
      {"prefix-caching", false,
       "on (default, as the workers) or off: simulate the workers' prefix cache"},
      {"num-requests", false,
       "requests (with --turns: conversations) per simulation (default 300)"},
      {"turns", false,
       "multi-turn conversations of up to this many turns, as pdbench --turns: each turn sends "
       "the previous prompt and answer and a new message; rates count conversations (default "
       "1; needs --max-model-len)"},
      {"think-time", false, "seconds between an answer and the next turn (default 1)"},
      {"seed", false, "seed of lengths and arrivals, as pdbench's --seed (default 0)"},
      {"arrival", false, "poisson (default), gamma or constant"},
      {"burstiness", false, "gamma shape (default 1)"},
      {"slo-ttft", false, "TTFT target: milliseconds (250, 250ms) or seconds (0.25s)"},
      {"slo-tpot", false, "TPOT target: milliseconds (100, 100ms) or seconds (0.1s)"},
      {"attainment", false, "SLO attainment target in (0, 1] (default 0.9)"},
      {"rate", false, "total request rate to cover by replicating the best unit (req/s)"},
      {"gpus", false, "GPU (instance) budget: units and replicas must fit (default: none)"},
      {"max-instances", false, "most instances in one unit (default 4)"},
      {"bisect-steps", false, "bisections of the per-GPU rate per unit (default 10)"},
      {"at-rates", false, "also predict the chosen units at these total rates, e.g. 6,8,10"},
      {"step-time-scale", false,
       "multiply every predicted step time (live steps slower than profiled, e.g. instances "
       "sharing cores with the front-end; default 1)"},
      {"step-time-sigma", false,
       "step-to-step spread of live step times: each simulated step is multiplied by "
       "exp(sigma * z), z standard normal (default 0)"},
      {"noise-seed", false, "seed of the step-time draws (default: --seed)"},
      {"noise-draws", false,
       "with a step-time sigma: simulations averaged per predicted point (default 8)"},
      {"dispatch-latency-ms", false,
       "front-end delay from a request's arrival to its prefill queue (default 0)"},
      {"relay-latency-ms", false,
       "front-end delay from a worker's token to the client (default 0)"},
      {"calibrate", false,
       "pdbench per-request CSVs (--csv-out) of live runs, comma-separated: measure the step "
       "time scale and spread and the front-end delays from them (each flag above overrides "
       "its figure)"},
      {"no-colocated", true, "skip the colocated comparison"},
      {"kv-cache-mb", false, "KV cache per instance in MiB, as the workers (default 256)"},
      {"num-blocks", false, "KV cache per instance in blocks (overrides --kv-cache-mb)"},
      {"block-size", false, "KV block size in tokens (default 16)"},
      {"max-batch-tokens", false, "token budget of one engine step (default 2048)"},
      {"max-batch-size", false, "sequences in one engine step (default 64)"},
      {"num-layers", false, "model layers (default: the profile's)"},
      {"kv-heads", false, "KV heads (default: the profile's, or the model's config.json)"},
      {"head-dim", false, "head dimension (default: the profile's, or config.json)"},
      {"dtype-bytes", false, "bytes per KV element (default: from the profile's dtype)"},
      {"kv-bandwidth-gbps", false, "KV hand-off bandwidth in GB/s (default 5)"},
      {"kv-latency-ms", false, "fixed cost of one KV hand-off in ms (default 1)"},
      {"kv-handoff", false,
       "layered (default: the KV moves during the prefill step, as the workers do) or after"},
      {"policy", false, "dispatch policy: least-loaded (default) or slo-aware"},
      {"local-prefill-max-tokens", false,
       "conditional disaggregation, as the front-end's flag: a request with at most this many "
       "prompt tokens uncached on its decode instance runs there whole (default 0: off)"},
      {"batch-policy", false, "batch formation: fcfs (default) or edf"},
      {"json", true, "print the plan as one JSON object (the plan file)"},
      {"out", false, "write the plan file (JSON) here"},
      {"help", true, "show this help"},
  };
  return specs;
}

// "250", "250ms", "0.25s" -> 250 (milliseconds).
absl::StatusOr<double> ParseSloMs(const std::string& flag, const std::string& text) {
  std::string s = absl::AsciiStrToLower(absl::StripAsciiWhitespace(text));
  double scale = 1;
  if (absl::EndsWith(s, "ms")) {
    s.resize(s.size() - 2);
  } else if (absl::EndsWith(s, "s")) {
    s.resize(s.size() - 1);
    scale = 1000;
  }
  double v = 0;
  if (!absl::SimpleAtod(s, &v) || !(v > 0) || !std::isfinite(v)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--", flag, " expects a positive time such as 250, 250ms or 0.25s, got '", text, "'"));
  }
  return v * scale;
}

absl::StatusOr<int32_t> PositiveInt(const CliArgs& args, const std::string& name,
                                    int64_t fallback) {
  PDS_ASSIGN_OR_RETURN(int64_t v, args.GetInt(name, fallback));
  if (v <= 0 || v > (int64_t{1} << 30)) {
    return absl::InvalidArgumentError(absl::StrCat("--", name, " must be positive, got ", v));
  }
  return static_cast<int32_t>(v);
}

int32_t DtypeBytes(const std::string& dtype) {
  const std::string d = absl::AsciiStrToUpper(dtype);
  if (d == "F32" || d == "FLOAT32") return 4;
  if (d == "F16" || d == "BF16" || d == "FLOAT16" || d == "BFLOAT16") return 2;
  if (d == "F8" || d == "FP8" || d == "INT8") return 1;
  return 0;
}

// The KV shape: flags, else the profile's model metadata, else the model's config.json.
absl::StatusOr<scheduler::KvShape> KvShapeFrom(const CliArgs& args, const nlohmann::json& profile,
                                               const std::string& profile_path) {
  const nlohmann::json model = profile.contains("model") && profile["model"].is_object()
                                   ? profile["model"]
                                   : nlohmann::json::object();
  nlohmann::json config = nlohmann::json::object();
  if (model.contains("dir") && model["dir"].is_string()) {
    std::ifstream in(std::filesystem::path(model["dir"].get<std::string>()) / "config.json");
    if (in) {
      nlohmann::json c = nlohmann::json::parse(in, nullptr, /*allow_exceptions=*/false);
      if (c.is_object()) config = c;
    }
  }
  auto number = [](const nlohmann::json& j, const char* key) -> int64_t {
    return j.contains(key) && j[key].is_number_integer() ? j[key].get<int64_t>() : 0;
  };
  int64_t layers = number(model, "num_layers");
  if (layers == 0) layers = number(config, "num_hidden_layers");
  int64_t kv_heads = number(model, "num_kv_heads");
  if (kv_heads == 0) kv_heads = number(config, "num_key_value_heads");
  int64_t head_dim = number(model, "head_dim");
  if (head_dim == 0) head_dim = number(config, "head_dim");
  if (head_dim == 0 && number(config, "num_attention_heads") > 0) {
    head_dim = number(config, "hidden_size") / number(config, "num_attention_heads");
  }
  if ((kv_heads == 0 || head_dim == 0) && !(args.Has("kv-heads") && args.Has("head-dim"))) {
    // Without the shape, assume full multi-head attention: kv_heads * head_dim = hidden.
    const int64_t hidden = number(model, "hidden_size");
    if (hidden > 0) {
      std::fprintf(stderr,
                   "pdserve plan: %s has no KV head shape (and its model directory is gone); "
                   "assuming kv_heads * head_dim = hidden_size = %lld (an upper bound; pass "
                   "--kv-heads and --head-dim)\n",
                   profile_path.c_str(), static_cast<long long>(hidden));
      kv_heads = 1;
      head_dim = hidden;
    }
  }
  int32_t dtype = model.contains("dtype") && model["dtype"].is_string()
                      ? DtypeBytes(model["dtype"].get<std::string>())
                      : 0;
  scheduler::KvShape shape;
  PDS_ASSIGN_OR_RETURN(shape.num_layers, PositiveInt(args, "num-layers", layers));
  PDS_ASSIGN_OR_RETURN(shape.num_kv_heads, PositiveInt(args, "kv-heads", kv_heads));
  PDS_ASSIGN_OR_RETURN(shape.head_dim, PositiveInt(args, "head-dim", head_dim));
  PDS_ASSIGN_OR_RETURN(shape.dtype_bytes, PositiveInt(args, "dtype-bytes", dtype > 0 ? dtype : 2));
  return shape;
}

// How live steps and the front-end differ from the profile: measured from pdbench CSVs by
// --calibrate (scheduler/calibration.h), each figure overridable by its own flag. Sets the
// simulator's noise and latencies in o.base and records every figure in o.live (the caller
// scales the model by o.live["step_time_scale"]).
absl::Status ApplyLiveAdjustments(const CliArgs& args, int32_t max_batch_tokens, uint64_t seed,
                                  const scheduler::LatencyModel& model,
                                  scheduler::PlannerOptions& o) {
  scheduler::LiveCalibration cal;
  if (args.Has("calibrate")) {
    std::vector<scheduler::RunRow> rows;
    std::vector<std::string> sources = absl::StrSplit(args.GetString("calibrate"), ',');
    for (size_t i = 0; i < sources.size(); ++i) {
      PDS_ASSIGN_OR_RETURN(std::vector<scheduler::RunRow> run,
                           scheduler::ReadRunCsv(sources[i], static_cast<int32_t>(i)));
      rows.insert(rows.end(), run.begin(), run.end());
    }
    PDS_ASSIGN_OR_RETURN(cal, scheduler::Calibrate(model, rows, max_batch_tokens));
    cal.sources = std::move(sources);
    o.live["calibration"] = cal.ToJson();
  }
  PDS_ASSIGN_OR_RETURN(const double scale, args.GetDouble("step-time-scale", cal.step_time_scale));
  if (!(scale > 0) || scale > 100) {
    return absl::InvalidArgumentError("--step-time-scale must be in (0, 100]");
  }
  PDS_ASSIGN_OR_RETURN(const double sigma, args.GetDouble("step-time-sigma", cal.step_time_sigma));
  if (!(sigma >= 0) || sigma > 2) {
    return absl::InvalidArgumentError("--step-time-sigma must be in [0, 2]");
  }
  PDS_ASSIGN_OR_RETURN(const double dispatch_ms,
                       args.GetDouble("dispatch-latency-ms", cal.dispatch_latency_s * 1000));
  PDS_ASSIGN_OR_RETURN(const double relay_ms,
                       args.GetDouble("relay-latency-ms", cal.relay_latency_s * 1000));
  if (!(dispatch_ms >= 0 && dispatch_ms < 60000) || !(relay_ms >= 0 && relay_ms < 60000)) {
    return absl::InvalidArgumentError(
        "--dispatch-latency-ms and --relay-latency-ms must be in [0, 60000)");
  }
  o.base.step_time_sigma = sigma;
  PDS_ASSIGN_OR_RETURN(const int64_t noise_seed,
                       args.GetInt("noise-seed", static_cast<int64_t>(seed)));
  o.base.noise_seed = static_cast<uint64_t>(noise_seed);
  PDS_ASSIGN_OR_RETURN(const int64_t draws, args.GetInt("noise-draws", o.noise_draws));
  if (draws < 1 || draws > 1000) return absl::InvalidArgumentError("--noise-draws in [1, 1000]");
  o.noise_draws = static_cast<int32_t>(draws);
  o.base.dispatch_latency_s = dispatch_ms / 1000;
  o.base.relay_latency_s = relay_ms / 1000;
  if (scale != 1 || sigma != 0 || dispatch_ms != 0 || relay_ms != 0) {
    o.live["step_time_scale"] = scale;
    o.live["step_time_sigma"] = sigma;
    o.live["dispatch_latency_s"] = o.base.dispatch_latency_s;
    o.live["relay_latency_s"] = o.base.relay_latency_s;
  }
  return absl::OkStatus();
}

absl::Status Run(const CliArgs& args) {
  PDS_ASSIGN_OR_RETURN(std::string profile_path, args.Required("profile"));
  std::ifstream in(profile_path);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot read --profile ", profile_path));
  const nlohmann::json profile = nlohmann::json::parse(in, nullptr, /*allow_exceptions=*/false);
  if (profile.is_discarded() || !profile.is_object() || !profile.contains("latency_model")) {
    return absl::InvalidArgumentError(
        absl::StrCat(profile_path, " is not a pdserve profile (no latency_model object)"));
  }
  auto model = scheduler::LatencyModel::FromJson(profile["latency_model"]);
  if (!model.ok()) {
    return absl::InvalidArgumentError(absl::StrCat(profile_path, ": ", model.status().message()));
  }

  // The workload, as pdbench builds it.
  client::DatasetOptions d;
  PDS_ASSIGN_OR_RETURN(d.kind, client::ParseDatasetKind(args.GetString("workload", "chatbot")));
  d.path = args.GetString("dataset-path");
  if ((d.kind == client::DatasetKind::kShareGpt || d.kind == client::DatasetKind::kTrace) &&
      d.path.empty()) {
    return absl::InvalidArgumentError("--workload sharegpt and trace need --dataset-path");
  }
  PDS_ASSIGN_OR_RETURN(d.num_requests, args.GetInt("num-requests", 300));
  if (d.num_requests < 10 || d.num_requests > 1'000'000) {
    return absl::InvalidArgumentError("--num-requests must be in [10, 1000000]");
  }
  PDS_ASSIGN_OR_RETURN(d.input_len, args.GetInt("input-len", 128));
  PDS_ASSIGN_OR_RETURN(d.output_len, args.GetInt("output-len", 128));
  d.output_len_set = args.Has("output-len");
  PDS_ASSIGN_OR_RETURN(d.range_ratio, args.GetDouble("range-ratio", 0));
  PDS_ASSIGN_OR_RETURN(d.length_scale, args.GetDouble("length-scale", 1.0));
  PDS_ASSIGN_OR_RETURN(d.max_model_len, args.GetInt("max-model-len", 0));
  PDS_ASSIGN_OR_RETURN(d.shared_prefix_len, args.GetInt("shared-prefix-len", 0));
  PDS_ASSIGN_OR_RETURN(d.num_shared_prefixes, args.GetInt("num-shared-prefixes", 1));
  PDS_ASSIGN_OR_RETURN(int64_t seed, args.GetInt("seed", 0));
  d.seed = static_cast<uint64_t>(seed);

  scheduler::PlannerOptions o;
  PDS_ASSIGN_OR_RETURN(int64_t turns, args.GetInt("turns", 1));
  PDS_ASSIGN_OR_RETURN(double think_s, args.GetDouble("think-time", 1.0));
  if (turns < 1 || turns > 1000 || !(think_s >= 0 && think_s <= 3600)) {
    return absl::InvalidArgumentError(
        "--turns must be in [1, 1000] and --think-time in [0, 3600] seconds");
  }
  if (turns > 1) {
    if (d.kind == client::DatasetKind::kShareGpt || d.kind == client::DatasetKind::kTrace ||
        d.max_model_len <= 0) {
      return absl::InvalidArgumentError(
          "--turns needs a generated workload (random, chatbot, code, summarization) and "
          "--max-model-len (a conversation ends before its context would pass it), as pdbench");
    }
    PDS_ASSIGN_OR_RETURN(o.lengths,
                         scheduler::MakeSimConversations(d, static_cast<int32_t>(turns), think_s));
  } else {
    PDS_ASSIGN_OR_RETURN(o.lengths, scheduler::MakeSimLengths(d));
  }
  PDS_ASSIGN_OR_RETURN(o.arrival.kind,
                       client::ParseArrivalKind(args.GetString("arrival", "poisson")));
  PDS_ASSIGN_OR_RETURN(o.arrival.burstiness, args.GetDouble("burstiness", 1.0));
  if (!(o.arrival.burstiness > 0)) return absl::InvalidArgumentError("--burstiness must be > 0");
  o.arrival.seed = d.seed;

  if (!args.Has("slo-ttft") && !args.Has("slo-tpot")) {
    return absl::InvalidArgumentError("give at least one of --slo-ttft and --slo-tpot");
  }
  if (args.Has("slo-ttft")) {
    PDS_ASSIGN_OR_RETURN(o.base.slo.ttft_ms, ParseSloMs("slo-ttft", args.GetString("slo-ttft")));
  }
  if (args.Has("slo-tpot")) {
    PDS_ASSIGN_OR_RETURN(o.base.slo.tpot_ms, ParseSloMs("slo-tpot", args.GetString("slo-tpot")));
  }
  PDS_ASSIGN_OR_RETURN(o.attainment_target, args.GetDouble("attainment", 0.9));
  if (!(o.attainment_target > 0 && o.attainment_target <= 1)) {
    return absl::InvalidArgumentError("--attainment must be in (0, 1]");
  }
  PDS_ASSIGN_OR_RETURN(o.target_rate, args.GetDouble("rate", 0));
  if (o.target_rate < 0 || (args.Has("rate") && !(o.target_rate > 0))) {
    return absl::InvalidArgumentError("--rate must be positive");
  }
  PDS_ASSIGN_OR_RETURN(int64_t gpus, args.GetInt("gpus", 0));
  if (args.Has("gpus") && (gpus < 2 || gpus > 4096)) {
    return absl::InvalidArgumentError("--gpus must be in [2, 4096] (one prefill + one decode)");
  }
  o.gpus = static_cast<int32_t>(gpus);
  PDS_ASSIGN_OR_RETURN(int64_t max_instances, args.GetInt("max-instances", 4));
  if (max_instances < 2 || max_instances > 64) {
    return absl::InvalidArgumentError("--max-instances must be in [2, 64]");
  }
  o.max_instances = static_cast<int32_t>(max_instances);
  PDS_ASSIGN_OR_RETURN(int64_t bisect, args.GetInt("bisect-steps", 10));
  if (bisect < 0 || bisect > 40) return absl::InvalidArgumentError("--bisect-steps in [0, 40]");
  o.bisect_steps = static_cast<int32_t>(bisect);
  if (args.Has("at-rates")) {
    for (absl::string_view item : absl::StrSplit(args.GetString("at-rates"), ',')) {
      double rate = 0;
      if (!absl::SimpleAtod(item, &rate) || !(rate > 0)) {
        return absl::InvalidArgumentError(
            absl::StrCat("--at-rates: '", item, "' is not a positive rate (req/s)"));
      }
      o.at_rates.push_back(rate);
    }
  }
  o.search_colocated = !args.GetBool("no-colocated");

  // Instances, as `pdserve prefill|decode|colocated` would run them.
  PDS_ASSIGN_OR_RETURN(o.base.kv_shape, KvShapeFrom(args, profile, profile_path));
  scheduler::SimInstanceConfig inst;
  PDS_ASSIGN_OR_RETURN(inst.block_size, PositiveInt(args, "block-size", 16));
  PDS_ASSIGN_OR_RETURN(inst.max_batch_tokens, PositiveInt(args, "max-batch-tokens", 2048));
  PDS_ASSIGN_OR_RETURN(inst.max_running, PositiveInt(args, "max-batch-size", 64));
  PDS_ASSIGN_OR_RETURN(int32_t mb, PositiveInt(args, "kv-cache-mb", 256));
  const int64_t block_bytes = o.base.kv_shape.BytesPerToken() * inst.block_size;
  const int64_t blocks = (int64_t{mb} << 20) / block_bytes;
  PDS_ASSIGN_OR_RETURN(inst.kv_blocks,
                       PositiveInt(args, "num-blocks", std::min<int64_t>(blocks, 1 << 30)));
  o.base.prefill = o.base.decode = o.base.colocated = inst;
  PDS_ASSIGN_OR_RETURN(double gbps, args.GetDouble("kv-bandwidth-gbps", 5));
  PDS_ASSIGN_OR_RETURN(double latency_ms, args.GetDouble("kv-latency-ms", 1));
  if (!(gbps > 0) || !(latency_ms >= 0)) {
    return absl::InvalidArgumentError("--kv-bandwidth-gbps must be > 0, --kv-latency-ms >= 0");
  }
  o.base.transfer_bandwidth = gbps * 1e9;
  o.base.transfer_latency_s = latency_ms / 1000;
  const std::string handoff = args.GetString("kv-handoff", "layered");
  if (handoff != "layered" && handoff != "after") {
    return absl::InvalidArgumentError(
        absl::StrCat("--kv-handoff '", handoff, "': expected layered or after"));
  }
  o.base.layered_handoff = handoff == "layered";
  const std::string caching = args.GetString("prefix-caching", "on");
  if (caching != "on" && caching != "off") {
    return absl::InvalidArgumentError(
        absl::StrCat("--prefix-caching '", caching, "': expected on or off"));
  }
  o.base.prefix_caching = caching == "on";
  PDS_ASSIGN_OR_RETURN(const int64_t local_prefill, args.GetInt("local-prefill-max-tokens", 0));
  if (local_prefill < 0 || local_prefill > scheduler::kMaxLocalPrefillTokens) {
    return absl::InvalidArgumentError(absl::StrCat("--local-prefill-max-tokens must be in [0, ",
                                                   scheduler::kMaxLocalPrefillTokens, "]"));
  }
  o.base.local_prefill_max_tokens = static_cast<int32_t>(local_prefill);
  o.base.dispatch_policy = args.GetString("policy", "least-loaded");
  o.base.batch_policy = args.GetString("batch-policy", "fcfs");
  o.base.dispatch_slo.default_ttft_slo_ms = std::max(0.0, o.base.slo.ttft_ms);
  o.base.dispatch_slo.default_tpot_slo_ms = std::max(0.0, o.base.slo.tpot_ms);

  PDS_RETURN_IF_ERROR(ApplyLiveAdjustments(args, inst.max_batch_tokens, d.seed, *model, o));
  if (o.live.contains("step_time_scale")) {
    model = model->Scaled(o.live["step_time_scale"].get<double>());
  }

  o.profile_path = profile_path;
  o.workload = {{"name", client::DatasetKindName(d.kind)},
                {"num_requests", static_cast<int64_t>(o.lengths.size())},
                {"seed", d.seed},
                {"length_scale", d.length_scale},
                {"max_model_len", d.max_model_len}};
  if (d.kind == client::DatasetKind::kRandom) {
    o.workload["input_len"] = d.input_len;
    o.workload["output_len"] = d.output_len;
    o.workload["range_ratio"] = d.range_ratio;
  }
  if (!d.path.empty()) o.workload["dataset_path"] = d.path;
  if (turns > 1) {
    o.workload["turns"] = turns;
    o.workload["think_time"] = think_s;
    o.workload["num_conversations"] = d.num_requests;
  }
  if (d.shared_prefix_len > 0) {
    o.workload["shared_prefix_len"] = d.shared_prefix_len;
    o.workload["num_shared_prefixes"] = d.num_shared_prefixes;
  }
  double prompt = 0, output = 0;
  for (const scheduler::SimRequest& r : o.lengths) {
    prompt += r.prompt_len;
    output += r.output_len;
  }
  o.workload["mean_prompt_tokens"] = prompt / o.lengths.size();
  o.workload["mean_output_tokens"] = output / o.lengths.size();

  PDS_ASSIGN_OR_RETURN(scheduler::Plan plan, scheduler::MakePlan(o, *model));
  const nlohmann::json j = scheduler::PlanToJson(plan);
  if (args.Has("out")) {
    const std::string out = args.GetString("out");
    std::ofstream f(out);
    if (!f) return absl::PermissionDeniedError(absl::StrCat("cannot write --out ", out));
    f << j.dump(2) << "\n";
    if (!f) return absl::InternalError(absl::StrCat("writing ", out, " failed"));
  }
  if (args.GetBool("json")) {
    std::printf("%s\n", j.dump(2).c_str());
  } else {
    std::printf("%s", scheduler::PlanSummary(plan).c_str());
  }
  return absl::OkStatus();
}

}  // namespace

int PlanMain(int argc, char** argv) {
  return SubcommandMain(argc, argv, "plan",
                        "--profile FILE --workload NAME --slo-ttft MS --slo-tpot MS [flags]",
                        Specs(), Run);
}

}  // namespace pds::server

// The placement planner: how many prefill and decode instances a workload needs to meet its
// TTFT/TPOT SLOs at the highest goodput per GPU, searched with the simulator
// (scheduler/simulator.h), the way DistServe places (../shared/docs/distserve-notes.md).
//
// Search. A "unit" is p prefill + d decode instances (p, d >= 1, p + d <= max_instances and
// <= the GPU budget), one instance per GPU; colocated units of K = 1..max_instances
// instances are searched the same way for comparison. For each unit the planner bisects on
// the per-GPU rate: it simulates the workload (the same lengths every time, arrivals from
// the arrival process at that rate and seed) and keeps the highest rate whose SLO
// attainment reaches the target (doubling from an estimate until a rate fails, halving
// until one passes, then `bisect_steps` bisections). That rate is the unit's goodput per
// GPU; units are ranked by it (ties: fewer GPUs, then fewer prefill instances). With a
// target total rate, every disaggregated unit is replicated ceil(rate / its max rate) times
// and the one needing the fewest GPUs wins (ties: the better goodput per GPU), which is the
// best unit replicated whenever rounding does not favour another; if even that needs more
// GPUs than the budget the plan says it cannot (feasible = false, with the reason). The
// replicated cluster, driven by one front-end, is then simulated at the target rate for the
// predicted attainment. Attainment is measured over a finite run (`num_requests`
// requests), like pdbench's --search.
//
// The plan file (PlanToJson; `pdserve plan --json` prints it and `--out` writes it;
// `pdserve up --plan FILE` reads it, see ParsePlanFile). One JSON object:
//   "version": 1,
//   "mode": "disaggregated",
//   "prefill_instances": P, "decode_instances": D      (the whole cluster: unit x replicas)
//   "replicas": k, "unit": {"prefill": p, "decode": d, "gpus": p + d},
//   "gpus": P + D (used), "gpu_budget": G (0: none given),
//   "goodput_per_gpu": requests/s (rate_unit) per GPU of the unit at the attainment target,
//   "max_rate": requests/s (rate_unit) of the whole cluster at the target (k x unit),
//   "colocated_goodput_per_gpu": the best colocated unit's, "colocated_instances": its K,
//   "disaggregated_vs_colocated": goodput_per_gpu / colocated_goodput_per_gpu (0 if none),
//   "target_rate": R (0: none), "feasible": bool, "reason": why not (or ""),
//   "rate_unit": "requests/s", or "conversations/s" for multi-turn workloads: then
//                goodput_per_gpu, max_rate, target_rate, predicted_at_rate and the curves'
//                rate_per_gpu and rate count conversations (their first turns' arrivals);
//                request_goodput always counts requests (turns) meeting the SLO per second,
//   "predicted_attainment": attainment simulated at target_rate (the cluster) or, without
//                           one, at the unit's goodput rate,
//   "predicted_at_rate": the rate that prediction is at,
//   "slo": {"ttft_ms", "tpot_ms", "attainment_target"},
//   "curve": [{"rate_per_gpu", "rate", "slo_attainment", "request_goodput",
//              "mean_ttft_ms", "p90_ttft_ms", "p99_ttft_ms", "mean_tpot_ms", "p90_tpot_ms",
//              "p99_tpot_ms"}...]                      (the unit's, by increasing rate),
//   "colocated_curve": [...],                         (the same for the colocated unit)
//   "candidates": [{"prefill", "decode", "colocated", "gpus", "goodput_per_gpu",
//                   "simulations"}...]                (every unit searched, ranked),
//   "instance": {"prefill": {"max_batch_tokens", "max_running", "kv_blocks",
//                "block_size"}, "decode": {...}, "colocated": {...}},
//   "kv_transfer": {"bandwidth_bytes_per_s", "latency_s", "bytes_per_token"},
//   "policies": {"dispatch", "batch", "prefix_caching", "local_prefill_max_tokens"},
//   "simulation": {"num_requests", "arrival", "burstiness", "seed", "bisect_steps"},
//   "workload": {...as given by the caller (name, lengths, seed)},
//   "profile": the profile path, "latency_model": {"prefill": {"coef"}, "decode": {"coef"}}.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "client/workload.h"
#include "nlohmann/json.hpp"
#include "scheduler/latency_model.h"
#include "scheduler/simulator.h"

namespace pds::scheduler {

struct PlannerOptions {
  // Instance configs, KV shape, transfer, policies and the SLO targets (base.slo); the
  // instance counts are what the planner sets.
  SimConfig base;
  // The workload's lengths (their arrival times are ignored), e.g. from MakeSimLengths. With
  // conversations (MakeSimConversations) the arrivals start first turns, and every rate (the
  // goodput per GPU, target_rate, at_rates, the curves' rates) counts conversations per second
  // (RatePoint::request_goodput still counts requests: turns).
  std::vector<SimRequest> lengths;
  // The arrival process (its rate is set per simulation; kind, burstiness and seed kept).
  client::ArrivalOptions arrival;
  double attainment_target = 0.9;
  int32_t max_instances = 4;  // per unit, >= 2
  int32_t gpus = 0;           // GPU budget (0: no budget; units up to max_instances)
  double target_rate = 0;     // > 0: replicate to cover this total rate (requests/s)
  bool search_colocated = true;
  int32_t bisect_steps = 10;
  // Simulations averaged per point when base.step_time_sigma > 0 (noise seeds
  // base.noise_seed, + 1, ...).
  int32_t noise_draws = 8;
  // Total rates at which to report the chosen unit's and the colocated unit's predicted
  // attainment (Plan::at_rates), e.g. the rates a pdbench run measured.
  std::vector<double> at_rates;
  // Recorded in the plan file: how live steps and the front-end were modelled beyond the
  // profile (step_time_scale, step_time_sigma, dispatch/relay latencies, and the calibration
  // they were measured by), empty when not at all.
  nlohmann::json live = nlohmann::json::object();
  std::string profile_path;
  nlohmann::json workload = nlohmann::json::object();
};

struct RatePoint {
  double rate_per_gpu = 0;
  double rate = 0;
  double slo_attainment = 0;
  double request_goodput = 0;
  double mean_ttft_ms = 0, p90_ttft_ms = 0, p99_ttft_ms = 0;
  double mean_tpot_ms = 0, p90_tpot_ms = 0, p99_tpot_ms = 0;
};

struct UnitResult {
  int32_t prefill = 0;
  int32_t decode = 0;
  int32_t colocated = 0;
  double goodput_per_gpu = 0;  // 0: not even the lowest rate tried met the target
  double attainment_at_goodput = 0;
  int32_t simulations = 0;
  int32_t gpus() const { return colocated > 0 ? colocated : prefill + decode; }
  double max_rate() const { return goodput_per_gpu * gpus(); }
};

struct Plan {
  UnitResult unit;                     // the chosen disaggregated unit
  UnitResult colocated;                // the best colocated unit (zero when not searched)
  std::vector<UnitResult> candidates;  // every unit, ranked
  int32_t replicas = 1;
  int32_t prefill_instances = 0;  // unit x replicas
  int32_t decode_instances = 0;
  int32_t gpus_used = 0;
  bool feasible = true;
  std::string reason;
  double predicted_attainment = 0;
  double predicted_at_rate = 0;
  std::vector<RatePoint> curve;               // the unit's attainment vs rate
  std::vector<RatePoint> colocated_curve;     // the colocated unit's
  std::vector<RatePoint> at_rates;            // the unit at options.at_rates
  std::vector<RatePoint> colocated_at_rates;  // the colocated unit at options.at_rates
  PlannerOptions options;                     // what it was planned for (lengths dropped)
  bool conversations = false;  // the workload has later turns: rates are conversations/s
  nlohmann::json latency_model;
};

// INVALID_ARGUMENT for bad options (no lengths, no SLO target, max_instances < 2, ...).
absl::StatusOr<Plan> MakePlan(const PlannerOptions& options, const LatencyModel& model);

// The plan file (format above).
nlohmann::json PlanToJson(const Plan& plan);
// A human-readable summary: the plan, the candidates and the curve.
std::string PlanSummary(const Plan& plan);

// What `pdserve up --plan FILE` needs from a plan file. INVALID_ARGUMENT names the field.
struct PlanFile {
  int32_t prefill_instances = 0;
  int32_t decode_instances = 0;
  SimInstanceConfig prefill;
  SimInstanceConfig decode;
  double ttft_slo_ms = -1;
  double tpot_slo_ms = -1;
  std::string profile_path;
  std::string dispatch_policy;
  std::string batch_policy;
  bool prefix_caching = true;            // as simulated: the workers get the same
  int32_t local_prefill_max_tokens = 0;  // as simulated: the front-end gets the same
  double step_time_scale = 1;            // "live": the calibrated live/profiled step ratio
};
absl::StatusOr<PlanFile> ParsePlanFile(const nlohmann::json& j);

}  // namespace pds::scheduler

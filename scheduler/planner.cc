#include "scheduler/planner.h"

#include <algorithm>
#include <cmath>
#include <tuple>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "engine/common/status_macros.h"

namespace pds::scheduler {

namespace {

constexpr double kMinRatePerGpu = 1e-4;
constexpr double kMaxRatePerGpu = 1e6;
// The largest cluster a plan lays out (pdserve plan's --gpus limit).
constexpr int64_t kMaxPlannedGpus = 4096;

class Searcher {
 public:
  Searcher(const PlannerOptions& options, const LatencyModel& model)
      : options_(options), model_(model) {}

  // Simulates `unit` (its counts in a SimConfig) at a total rate.
  absl::StatusOr<RatePoint> Run(const SimConfig& unit, int32_t gpus, double rate,
                                int32_t repeat = 1) {
    client::ArrivalOptions a = options_.arrival;
    a.rate = rate;
    // The arrivals start requests or, with conversations, their first turns (the later ones
    // follow their answers): the rate counts those.
    PDS_ASSIGN_OR_RETURN(std::vector<double> times, client::ArrivalTimes(a, Starts() * repeat));
    const std::vector<SimRequest> requests = TileWorkload(options_.lengths, times, repeat);
    // With step-time noise, each figure is the mean over noise_draws simulations of the same
    // arrivals with different draws (one draw is one possible run, as one pdbench run is).
    const int32_t draws = unit.step_time_sigma > 0 ? std::max(1, options_.noise_draws) : 1;
    RatePoint p;
    p.rate = rate;
    p.rate_per_gpu = rate / gpus;
    for (int32_t k = 0; k < draws; ++k) {
      SimConfig config = unit;
      config.noise_seed = unit.noise_seed + static_cast<uint64_t>(k);
      PDS_ASSIGN_OR_RETURN(SimResult sim, Simulate(config, model_, requests));
      const client::BenchMetrics& m = sim.metrics;
      p.slo_attainment += m.slo_attainment / draws;
      p.request_goodput += m.request_goodput / draws;
      p.mean_ttft_ms += m.ttft_ms.mean / draws;
      p.p90_ttft_ms += m.ttft_ms.p90 / draws;
      p.p99_ttft_ms += m.ttft_ms.p99 / draws;
      p.mean_tpot_ms += m.tpot_ms.mean / draws;
      p.p90_tpot_ms += m.tpot_ms.p90 / draws;
      p.p99_tpot_ms += m.tpot_ms.p99 / draws;
    }
    return p;
  }

  // Requests (or conversations) the arrivals start.
  int64_t Starts() const {
    return std::count_if(options_.lengths.begin(), options_.lengths.end(),
                         [](const SimRequest& r) { return r.after < 0; });
  }

  // A starting per-GPU rate: one mean request (or conversation) served alone, start to end.
  double Guess() const {
    double prompt = 0, output = 0;
    for (const SimRequest& r : options_.lengths) {
      prompt += r.prompt_len;
      output += r.output_len;
    }
    prompt /= options_.lengths.size();
    output /= options_.lengths.size();
    const double per_start =
        static_cast<double>(options_.lengths.size()) / std::max<int64_t>(1, Starts());
    const double t =
        per_start * (model_.PredictPrefill({static_cast<int32_t>(std::lround(prompt))}) +
                     output * model_.PredictDecode(1, std::llround(prompt + output / 2)));
    return std::clamp(t > 0 ? 1.0 / t : 1.0, kMinRatePerGpu, kMaxRatePerGpu);
  }

  absl::StatusOr<UnitResult> Search(UnitResult unit) {
    const SimConfig config = ConfigFor(unit, 1);
    const int32_t gpus = unit.gpus();
    const double target = options_.attainment_target;
    auto passes = [&](double per_gpu, RatePoint* point) -> absl::StatusOr<bool> {
      PDS_ASSIGN_OR_RETURN(*point, Run(config, gpus, per_gpu * gpus));
      ++unit.simulations;
      return point->slo_attainment >= target;
    };
    double lo = 0, hi = 0, lo_attainment = 0;
    double r = Guess();
    RatePoint point;
    PDS_ASSIGN_OR_RETURN(bool ok, passes(r, &point));
    if (ok) {
      lo = r;
      lo_attainment = point.slo_attainment;
      while (true) {
        r *= 2;
        if (r > kMaxRatePerGpu) {
          hi = lo;  // passes everywhere we can tell: report the bound
          break;
        }
        PDS_ASSIGN_OR_RETURN(ok, passes(r, &point));
        if (!ok) {
          hi = r;
          break;
        }
        lo = r;
        lo_attainment = point.slo_attainment;
      }
    } else {
      hi = r;
      while (true) {
        r /= 2;
        if (r < kMinRatePerGpu) break;  // the SLO is out of reach even when nearly idle
        PDS_ASSIGN_OR_RETURN(ok, passes(r, &point));
        if (ok) {
          lo = r;
          lo_attainment = point.slo_attainment;
          break;
        }
        hi = r;
      }
    }
    if (lo > 0 && hi > lo) {
      for (int i = 0; i < options_.bisect_steps; ++i) {
        const double mid = 0.5 * (lo + hi);
        PDS_ASSIGN_OR_RETURN(ok, passes(mid, &point));
        if (ok) {
          lo = mid;
          lo_attainment = point.slo_attainment;
        } else {
          hi = mid;
        }
      }
    }
    unit.goodput_per_gpu = lo;
    unit.attainment_at_goodput = lo_attainment;
    return unit;
  }

  // The attainment-vs-rate curve around a unit's goodput.
  absl::StatusOr<std::vector<RatePoint>> Curve(const UnitResult& unit) {
    const SimConfig config = ConfigFor(unit, 1);
    const double center = unit.goodput_per_gpu > 0 ? unit.goodput_per_gpu : Guess();
    std::vector<RatePoint> curve;
    for (double f : {0.25, 0.5, 0.75, 0.9, 1.0, 1.1, 1.25, 1.5, 2.0}) {
      PDS_ASSIGN_OR_RETURN(RatePoint p, Run(config, unit.gpus(), f * center * unit.gpus()));
      curve.push_back(p);
    }
    return curve;
  }

  SimConfig ConfigFor(const UnitResult& unit, int32_t replicas) const {
    SimConfig c = options_.base;
    c.num_colocated = unit.colocated * replicas;
    c.num_prefill = std::max(1, unit.prefill * replicas);
    c.num_decode = std::max(1, unit.decode * replicas);
    return c;
  }

 private:
  const PlannerOptions& options_;
  const LatencyModel& model_;
};

bool RankBefore(const UnitResult& a, const UnitResult& b) {
  return std::make_tuple(-a.goodput_per_gpu, a.gpus(), a.prefill, a.colocated) <
         std::make_tuple(-b.goodput_per_gpu, b.gpus(), b.prefill, b.colocated);
}

nlohmann::json PointJson(const RatePoint& p) {
  return {{"rate_per_gpu", p.rate_per_gpu},     {"rate", p.rate},
          {"slo_attainment", p.slo_attainment}, {"request_goodput", p.request_goodput},
          {"mean_ttft_ms", p.mean_ttft_ms},     {"p90_ttft_ms", p.p90_ttft_ms},
          {"p99_ttft_ms", p.p99_ttft_ms},       {"mean_tpot_ms", p.mean_tpot_ms},
          {"p90_tpot_ms", p.p90_tpot_ms},       {"p99_tpot_ms", p.p99_tpot_ms}};
}

nlohmann::json InstanceJson(const SimInstanceConfig& c) {
  return {{"max_batch_tokens", c.max_batch_tokens},
          {"max_running", c.max_running},
          {"kv_blocks", c.kv_blocks},
          {"block_size", c.block_size}};
}

// How the plan's rates count: requests, or with conversations conversations (first turns).
const char* RateUnit(bool conversations) { return conversations ? "conv/s" : "req/s"; }

std::string UnitName(const UnitResult& u) {
  if (u.colocated > 0) return absl::StrCat(u.colocated, " colocated");
  return absl::StrCat(u.prefill, "P+", u.decode, "D");
}

}  // namespace

absl::StatusOr<Plan> MakePlan(const PlannerOptions& options, const LatencyModel& model) {
  if (options.lengths.empty()) {
    return absl::InvalidArgumentError("planner: the workload has no requests");
  }
  if (!options.base.slo.Any()) {
    return absl::InvalidArgumentError("planner: at least one SLO target (TTFT or TPOT) is needed");
  }
  if (!(options.attainment_target > 0 && options.attainment_target <= 1)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "planner: the attainment target must be in (0, 1], got ", options.attainment_target));
  }
  if (options.max_instances < 2) {
    return absl::InvalidArgumentError(
        absl::StrCat("planner: max_instances must be >= 2 (one prefill + one decode), got ",
                     options.max_instances));
  }
  if (options.gpus < 0 || options.gpus == 1) {
    return absl::InvalidArgumentError(absl::StrCat(
        "planner: the GPU budget must be >= 2 (one prefill + one decode), got ", options.gpus));
  }
  if (options.target_rate < 0 || options.bisect_steps < 0) {
    return absl::InvalidArgumentError("planner: target_rate and bisect_steps must be >= 0");
  }
  for (double rate : options.at_rates) {
    if (!(rate > 0) || rate > 1e6) {
      return absl::InvalidArgumentError(
          absl::StrCat("planner: every rate to report at must be in (0, 1e6], not ", rate));
    }
  }
  Searcher searcher(options, model);
  Plan plan;
  plan.conversations = std::any_of(options.lengths.begin(), options.lengths.end(),
                                   [](const SimRequest& r) { return r.after >= 0; });
  const char* unit = RateUnit(plan.conversations);
  plan.options = options;
  plan.options.lengths.clear();
  plan.latency_model = model.ToJson();
  const int32_t limit =
      options.gpus > 0 ? std::min(options.max_instances, options.gpus) : options.max_instances;

  std::vector<UnitResult> disaggregated, colocated;
  for (int32_t total = 2; total <= limit; ++total) {
    for (int32_t p = 1; p < total; ++p) {
      UnitResult u;
      u.prefill = p;
      u.decode = total - p;
      PDS_ASSIGN_OR_RETURN(u, searcher.Search(u));
      disaggregated.push_back(u);
    }
  }
  if (options.search_colocated) {
    for (int32_t k = 1; k <= limit; ++k) {
      UnitResult u;
      u.colocated = k;
      PDS_ASSIGN_OR_RETURN(u, searcher.Search(u));
      colocated.push_back(u);
    }
  }
  std::sort(disaggregated.begin(), disaggregated.end(), RankBefore);
  std::sort(colocated.begin(), colocated.end(), RankBefore);
  plan.candidates = disaggregated;
  plan.candidates.insert(plan.candidates.end(), colocated.begin(), colocated.end());
  std::stable_sort(plan.candidates.begin(), plan.candidates.end(), RankBefore);
  plan.unit = disaggregated.front();
  if (!colocated.empty()) plan.colocated = colocated.front();

  if (plan.unit.max_rate() <= 0) {
    // Without a rate to cover, a unit that meets the SLO at no rate tried is no plan either.
    plan.feasible = false;
    plan.reason =
        absl::StrCat("no unit of up to ", limit, " instances meets the SLO at any rate tried");
  }
  if (options.target_rate > 0) {
    // The unit that covers the rate with the fewest GPUs.
    // Replica counts are worked out in double and capped just past kMaxPlannedGpus before any
    // integer conversion: a huge rate is refused below, never overflowed into a small count.
    const UnitResult* chosen = nullptr;
    double chosen_gpus = 0, chosen_replicas = 0;
    for (const UnitResult& u : disaggregated) {
      if (u.max_rate() <= 0) continue;
      const double replicas =
          std::min(std::max(1.0, std::ceil(options.target_rate / u.max_rate() - 1e-9)),
                   static_cast<double>(kMaxPlannedGpus + 1));
      const double gpus = replicas * u.gpus();
      if (chosen == nullptr || gpus < chosen_gpus) {
        chosen = &u;
        chosen_gpus = gpus;
        chosen_replicas = replicas;
      }
    }
    if (chosen == nullptr) {
      plan.feasible = false;
      plan.reason =
          absl::StrCat("no unit of up to ", limit, " instances meets the SLO at any rate tried");
    } else {
      plan.unit = *chosen;
      // "more than" once the count hit the cap.
      const bool capped = chosen_replicas > kMaxPlannedGpus;
      const std::string need =
          capped ? absl::StrFormat("more than %d x %s", kMaxPlannedGpus, UnitName(*chosen))
                 : absl::StrFormat("%.0f x %s = %.0f GPUs", chosen_replicas, UnitName(*chosen),
                                   chosen_gpus);
      if (options.gpus > 0 && chosen_gpus > options.gpus) {
        plan.feasible = false;
        plan.reason = absl::StrFormat(
            "cannot serve %.4g %s within %d GPUs: it needs %s (%.4g %s per GPU); %d GPUs "
            "reach %.4g %s",
            options.target_rate, unit, options.gpus, need, chosen->goodput_per_gpu, unit,
            options.gpus, (options.gpus / chosen->gpus()) * chosen->max_rate(), unit);
      } else if (chosen_gpus > kMaxPlannedGpus) {
        // Without a GPU budget the rate alone bounds the cluster: refuse what would take
        // longer to simulate than to question (the simulation grows with the square of it).
        plan.feasible = false;
        plan.reason = absl::StrFormat(
            "%.4g %s needs %s (%.4g %s per GPU), more than the %d GPUs this planner lays out",
            options.target_rate, unit, need, chosen->goodput_per_gpu, unit, kMaxPlannedGpus);
      } else {
        plan.replicas = static_cast<int32_t>(chosen_replicas);
      }
    }
  }
  plan.prefill_instances = plan.unit.prefill * plan.replicas;
  plan.decode_instances = plan.unit.decode * plan.replicas;
  plan.gpus_used = plan.prefill_instances + plan.decode_instances;

  if (options.target_rate > 0 && plan.feasible) {
    PDS_ASSIGN_OR_RETURN(RatePoint p,
                         searcher.Run(searcher.ConfigFor(plan.unit, plan.replicas), plan.gpus_used,
                                      options.target_rate, plan.replicas));
    plan.predicted_attainment = p.slo_attainment;
    plan.predicted_at_rate = options.target_rate;
  } else {
    plan.predicted_attainment = plan.unit.attainment_at_goodput;
    plan.predicted_at_rate = plan.unit.max_rate();
  }
  PDS_ASSIGN_OR_RETURN(plan.curve, searcher.Curve(plan.unit));
  if (!colocated.empty()) {
    PDS_ASSIGN_OR_RETURN(plan.colocated_curve, searcher.Curve(plan.colocated));
  }
  for (double rate : options.at_rates) {
    PDS_ASSIGN_OR_RETURN(RatePoint p,
                         searcher.Run(searcher.ConfigFor(plan.unit, 1), plan.unit.gpus(), rate));
    plan.at_rates.push_back(p);
    if (!colocated.empty()) {
      PDS_ASSIGN_OR_RETURN(RatePoint c, searcher.Run(searcher.ConfigFor(plan.colocated, 1),
                                                     plan.colocated.gpus(), rate));
      plan.colocated_at_rates.push_back(c);
    }
  }
  return plan;
}

nlohmann::json PlanToJson(const Plan& plan) {
  const PlannerOptions& o = plan.options;
  nlohmann::json j;
  j["version"] = 1;
  j["mode"] = "disaggregated";
  j["prefill_instances"] = plan.prefill_instances;
  j["decode_instances"] = plan.decode_instances;
  j["replicas"] = plan.replicas;
  j["unit"] = {
      {"prefill", plan.unit.prefill}, {"decode", plan.unit.decode}, {"gpus", plan.unit.gpus()}};
  j["gpus"] = plan.gpus_used;
  j["gpu_budget"] = o.gpus;
  j["goodput_per_gpu"] = plan.unit.goodput_per_gpu;
  j["max_rate"] = plan.unit.max_rate() * plan.replicas;
  j["colocated_goodput_per_gpu"] = plan.colocated.goodput_per_gpu;
  j["colocated_instances"] = plan.colocated.colocated;
  j["disaggregated_vs_colocated"] = plan.colocated.goodput_per_gpu > 0
                                        ? plan.unit.goodput_per_gpu / plan.colocated.goodput_per_gpu
                                        : 0.0;
  j["target_rate"] = o.target_rate;
  j["rate_unit"] = plan.conversations ? "conversations/s" : "requests/s";
  j["feasible"] = plan.feasible;
  j["reason"] = plan.reason;
  j["predicted_attainment"] = plan.predicted_attainment;
  j["predicted_at_rate"] = plan.predicted_at_rate;
  j["slo"] = {{"ttft_ms", o.base.slo.ttft_ms},
              {"tpot_ms", o.base.slo.tpot_ms},
              {"attainment_target", o.attainment_target}};
  nlohmann::json curve = nlohmann::json::array(), colocated_curve = nlohmann::json::array();
  for (const RatePoint& p : plan.curve) curve.push_back(PointJson(p));
  for (const RatePoint& p : plan.colocated_curve) colocated_curve.push_back(PointJson(p));
  j["curve"] = curve;
  j["colocated_curve"] = colocated_curve;
  nlohmann::json at = nlohmann::json::array(), colocated_at = nlohmann::json::array();
  for (const RatePoint& p : plan.at_rates) at.push_back(PointJson(p));
  for (const RatePoint& p : plan.colocated_at_rates) colocated_at.push_back(PointJson(p));
  j["at_rates"] = at;
  j["colocated_at_rates"] = colocated_at;
  nlohmann::json candidates = nlohmann::json::array();
  for (const UnitResult& u : plan.candidates) {
    candidates.push_back({{"prefill", u.prefill},
                          {"decode", u.decode},
                          {"colocated", u.colocated},
                          {"gpus", u.gpus()},
                          {"goodput_per_gpu", u.goodput_per_gpu},
                          {"simulations", u.simulations}});
  }
  j["candidates"] = candidates;
  j["instance"] = {{"prefill", InstanceJson(o.base.prefill)},
                   {"decode", InstanceJson(o.base.decode)},
                   {"colocated", InstanceJson(o.base.colocated)}};
  j["kv_transfer"] = {{"bandwidth_bytes_per_s", o.base.transfer_bandwidth},
                      {"latency_s", o.base.transfer_latency_s},
                      {"layered", o.base.layered_handoff},
                      {"bytes_per_token", o.base.kv_shape.BytesPerToken()}};
  j["policies"] = {{"dispatch", o.base.dispatch_policy},
                   {"batch", o.base.batch_policy},
                   {"prefix_caching", o.base.prefix_caching},
                   {"local_prefill_max_tokens", o.base.local_prefill_max_tokens}};
  j["simulation"] = {{"arrival", client::ArrivalKindName(o.arrival.kind)},
                     {"burstiness", o.arrival.burstiness},
                     {"seed", o.arrival.seed},
                     {"bisect_steps", o.bisect_steps},
                     {"noise_draws", o.noise_draws}};
  j["workload"] = o.workload;
  if (!o.live.empty()) j["live"] = o.live;
  j["profile"] = o.profile_path;
  j["latency_model"] = plan.latency_model;
  return j;
}

std::string PlanSummary(const Plan& plan) {
  const PlannerOptions& o = plan.options;
  std::string s;
  absl::StrAppendFormat(&s, "SLO: TTFT %s, TPOT %s, attainment >= %.0f%%\n",
                        o.base.slo.ttft_ms >= 0 ? absl::StrFormat("%.4g ms", o.base.slo.ttft_ms)
                                                : std::string("none"),
                        o.base.slo.tpot_ms >= 0 ? absl::StrFormat("%.4g ms", o.base.slo.tpot_ms)
                                                : std::string("none"),
                        100 * o.attainment_target);
  absl::StrAppendFormat(&s, "Plan: %d prefill + %d decode instances (%d x %s), %d GPUs\n",
                        plan.prefill_instances, plan.decode_instances, plan.replicas,
                        UnitName(plan.unit), plan.gpus_used);
  const char* unit = RateUnit(plan.conversations);
  absl::StrAppendFormat(&s, "  goodput per GPU: %.4g %s (unit max rate %.4g %s)\n",
                        plan.unit.goodput_per_gpu, unit, plan.unit.max_rate(), unit);
  if (plan.colocated.colocated > 0) {
    absl::StrAppendFormat(&s, "  colocated alternative: %s, %.4g %s per GPU (x%.2f)\n",
                          UnitName(plan.colocated), plan.colocated.goodput_per_gpu, unit,
                          plan.colocated.goodput_per_gpu > 0
                              ? plan.unit.goodput_per_gpu / plan.colocated.goodput_per_gpu
                              : 0.0);
  }
  absl::StrAppendFormat(&s, "  predicted attainment: %.1f%% at %.4g %s\n",
                        100 * plan.predicted_attainment, plan.predicted_at_rate, unit);
  if (!plan.feasible) absl::StrAppendFormat(&s, "  NOT FEASIBLE: %s\n", plan.reason);
  if (o.live.contains("step_time_scale")) {
    absl::StrAppendFormat(
        &s, "  live adjustments: step time x%.3f (sigma %.3f), dispatch %.2f ms, relay %.2f ms%s\n",
        o.live["step_time_scale"].get<double>(), o.live["step_time_sigma"].get<double>(),
        1000 * o.live["dispatch_latency_s"].get<double>(),
        1000 * o.live["relay_latency_s"].get<double>(),
        o.live.contains("calibration")
            ? absl::StrCat(" (calibrated from ", o.live["calibration"]["steps"].get<int>(),
                           " live prefill steps)")
            : std::string());
  }
  absl::StrAppendFormat(&s, "Candidates (goodput per GPU, %s):\n", unit);
  for (const UnitResult& u : plan.candidates) {
    absl::StrAppendFormat(&s, "  %-14s %2d GPUs  %10.4g\n", UnitName(u), u.gpus(),
                          u.goodput_per_gpu);
  }
  auto table = [&](const std::string& title, const std::vector<RatePoint>& curve) {
    absl::StrAppendFormat(&s, "%s:\n  %12s %10s %10s %12s %12s\n", title,
                          absl::StrCat(unit, "/GPU"), unit, "attain %", "p90 TTFT ms",
                          "p90 TPOT ms");
    for (const RatePoint& p : curve) {
      absl::StrAppendFormat(&s, "  %12.4g %10.4g %10.1f %12.1f %12.1f\n", p.rate_per_gpu, p.rate,
                            100 * p.slo_attainment, p.p90_ttft_ms, p.p90_tpot_ms);
    }
  };
  table(absl::StrCat("Predicted attainment vs rate (", UnitName(plan.unit), ")"), plan.curve);
  if (!plan.colocated_curve.empty()) {
    table(absl::StrCat("Colocated (", UnitName(plan.colocated), ")"), plan.colocated_curve);
  }
  if (!plan.at_rates.empty()) {
    table(absl::StrCat("At the requested rates (", UnitName(plan.unit), ")"), plan.at_rates);
  }
  if (!plan.colocated_at_rates.empty()) {
    table(absl::StrCat("At the requested rates (", UnitName(plan.colocated), ")"),
          plan.colocated_at_rates);
  }
  return s;
}

absl::StatusOr<PlanFile> ParsePlanFile(const nlohmann::json& j) {
  if (!j.is_object()) return absl::InvalidArgumentError("plan: not a JSON object");
  PlanFile f;
  auto count = [&](const char* key, int32_t* out) -> absl::Status {
    if (!j.contains(key) || !j[key].is_number_integer() || j[key].get<int64_t>() < 1 ||
        j[key].get<int64_t>() > 1024) {
      return absl::InvalidArgumentError(
          absl::StrCat("plan: '", key, "' must be an integer in [1, 1024]"));
    }
    *out = j[key].get<int32_t>();
    return absl::OkStatus();
  };
  if (j.contains("feasible") && j["feasible"].is_boolean() && !j["feasible"].get<bool>()) {
    const std::string reason =
        j.contains("reason") && j["reason"].is_string() ? j["reason"].get<std::string>() : "";
    return absl::InvalidArgumentError(
        absl::StrCat("plan: not feasible (", reason.empty() ? "no reason given" : reason, ")"));
  }
  PDS_RETURN_IF_ERROR(count("prefill_instances", &f.prefill_instances));
  PDS_RETURN_IF_ERROR(count("decode_instances", &f.decode_instances));
  auto instance = [&](const char* role, SimInstanceConfig* c) -> absl::Status {
    if (!j.contains("instance") || !j["instance"].is_object() || !j["instance"].contains(role)) {
      return absl::OkStatus();  // defaults
    }
    const nlohmann::json& i = j["instance"][role];
    for (auto [key, field] :
         {std::pair{"max_batch_tokens", &c->max_batch_tokens},
          std::pair{"max_running", &c->max_running}, std::pair{"kv_blocks", &c->kv_blocks},
          std::pair{"block_size", &c->block_size}}) {
      if (!i.contains(key)) continue;
      if (!i[key].is_number_integer() || i[key].get<int64_t>() < 1 ||
          i[key].get<int64_t>() > INT32_MAX) {
        return absl::InvalidArgumentError(
            absl::StrCat("plan: 'instance.", role, ".", key, "' must be a positive integer"));
      }
      *field = i[key].get<int32_t>();
    }
    return absl::OkStatus();
  };
  PDS_RETURN_IF_ERROR(instance("prefill", &f.prefill));
  PDS_RETURN_IF_ERROR(instance("decode", &f.decode));
  if (j.contains("slo") && j["slo"].is_object()) {
    const nlohmann::json& slo = j["slo"];
    if (slo.contains("ttft_ms") && slo["ttft_ms"].is_number()) f.ttft_slo_ms = slo["ttft_ms"];
    if (slo.contains("tpot_ms") && slo["tpot_ms"].is_number()) f.tpot_slo_ms = slo["tpot_ms"];
  }
  if (j.contains("profile") && j["profile"].is_string()) f.profile_path = j["profile"];
  if (j.contains("policies") && j["policies"].is_object()) {
    const nlohmann::json& p = j["policies"];
    if (p.contains("dispatch") && p["dispatch"].is_string()) f.dispatch_policy = p["dispatch"];
    if (p.contains("batch") && p["batch"].is_string()) f.batch_policy = p["batch"];
    if (p.contains("prefix_caching") && p["prefix_caching"].is_boolean()) {
      f.prefix_caching = p["prefix_caching"];
    }
    if (p.contains("local_prefill_max_tokens")) {
      const nlohmann::json& v = p["local_prefill_max_tokens"];
      if (!v.is_number_integer() || v.get<int64_t>() < 0 ||
          v.get<int64_t>() > kMaxLocalPrefillTokens) {
        return absl::InvalidArgumentError(
            absl::StrCat("plan: 'policies.local_prefill_max_tokens' must be an integer in [0, ",
                         kMaxLocalPrefillTokens, "]"));
      }
      f.local_prefill_max_tokens = v.get<int32_t>();
    }
  }
  if (j.contains("live") && j["live"].is_object() && j["live"].contains("step_time_scale")) {
    const nlohmann::json& s = j["live"]["step_time_scale"];
    if (!s.is_number() || !(s.get<double>() > 0) || s.get<double>() > 100) {
      return absl::InvalidArgumentError("plan: 'live.step_time_scale' must be in (0, 100]");
    }
    f.step_time_scale = s.get<double>();
  }
  return f;
}

}  // namespace pds::scheduler

#include "scheduler/planner.h"

#include "gtest/gtest.h"

namespace pds::scheduler {
namespace {

LatencyModel Model(std::array<double, 3> prefill, std::array<double, 3> decode) {
  nlohmann::json j = {{"prefill", {{"coef", prefill}}}, {"decode", {{"coef", decode}}}};
  auto model = LatencyModel::FromJson(j);
  EXPECT_TRUE(model.ok()) << model.status();
  return *model;
}

PlannerOptions Options(int32_t prompt, int32_t output, double ttft_ms, double tpot_ms) {
  PlannerOptions o;
  o.lengths.assign(150, SimRequest{0, prompt, output});
  o.arrival.kind = client::ArrivalKind::kPoisson;
  o.arrival.seed = 3;
  o.base.slo.ttft_ms = ttft_ms;
  o.base.slo.tpot_ms = tpot_ms;
  o.base.transfer_bandwidth = 1e10;
  o.max_instances = 3;
  o.bisect_steps = 6;
  o.search_colocated = false;
  return o;
}

// Prefill 0.21 s for a 200-token prompt, decode steps of about 1 ms: the prefill instances
// are the bottleneck, so 2 prefill + 1 decode serve about twice what 1 + 2 do.
TEST(PlannerTest, PrefillBoundWorkloadGetsMorePrefillInstances) {
  const LatencyModel m = Model({0.01, 1e-3, 0}, {1e-3, 0, 1e-4});
  auto plan = MakePlan(Options(200, 20, 1500, 100), m);
  ASSERT_TRUE(plan.ok()) << plan.status();
  EXPECT_EQ(plan->unit.prefill, 2);
  EXPECT_EQ(plan->unit.decode, 1);
  EXPECT_GT(plan->unit.goodput_per_gpu, 0);
  EXPECT_GE(plan->predicted_attainment, 0.9);
  EXPECT_EQ(plan->candidates.size(), 3u);
  // Ranked by goodput per GPU.
  for (size_t i = 1; i < plan->candidates.size(); ++i) {
    EXPECT_GE(plan->candidates[i - 1].goodput_per_gpu, plan->candidates[i].goodput_per_gpu);
  }
}

// Cheap prefill, decode steps of 0.02 + 0.01 per sequence: a 100 ms TPOT allows about 7
// sequences per decode instance, so the decode instances are the bottleneck.
TEST(PlannerTest, DecodeBoundWorkloadGetsMoreDecodeInstances) {
  const LatencyModel m = Model({1e-3, 1e-5, 0}, {0.02, 0, 0.01});
  auto plan = MakePlan(Options(64, 100, 1000, 100), m);
  ASSERT_TRUE(plan.ok()) << plan.status();
  EXPECT_EQ(plan->unit.prefill, 1);
  EXPECT_EQ(plan->unit.decode, 2);
  EXPECT_EQ(plan->prefill_instances, 1);
  EXPECT_EQ(plan->decode_instances, 2);
  // The curve passes at low rates and fails at twice the goodput.
  ASSERT_FALSE(plan->curve.empty());
  EXPECT_GE(plan->curve.front().slo_attainment, 0.9);
  EXPECT_LT(plan->curve.back().slo_attainment, 0.9);
}

// Conversations of three turns: the arrivals start conversations, so every rate counts them;
// each is three requests (the later ones longer, though mostly cached), so a GPU serves
// fewer conversations than single requests of the first turn's lengths, and more than a third.
TEST(PlannerTest, ConversationRatesCountConversations) {
  const LatencyModel m = Model({0.01, 1e-3, 0}, {1e-3, 0, 1e-4});
  PlannerOptions single = Options(200, 20, 1500, 100);
  PlannerOptions chat = single;
  chat.lengths.clear();
  for (int64_t c = 0; c < 150; ++c) {
    for (int32_t t = 0; t < 3; ++t) {
      SimRequest r{0, 200 + t * (20 + 50), 20};
      r.stream = c;
      r.after = t == 0 ? -1 : static_cast<int64_t>(chat.lengths.size()) - 1;
      r.think_s = 0.5;
      chat.lengths.push_back(r);
    }
  }
  auto one = MakePlan(single, m);
  auto conv = MakePlan(chat, m);
  ASSERT_TRUE(one.ok()) << one.status();
  ASSERT_TRUE(conv.ok()) << conv.status();
  EXPECT_FALSE(one->conversations);
  EXPECT_TRUE(conv->conversations);
  EXPECT_LT(conv->unit.max_rate(), one->unit.max_rate());
  EXPECT_GT(conv->unit.max_rate(), one->unit.max_rate() / 3);
  const std::string summary = PlanSummary(*conv);
  EXPECT_NE(summary.find("conv/s"), std::string::npos) << summary;
  EXPECT_EQ(summary.find("req/s"), std::string::npos) << summary;
  EXPECT_EQ(PlanToJson(*conv)["rate_unit"], "conversations/s");
  // Replicated to cover 2.2 units' worth (3 units at 73% of their rate): each copy of the
  // workload keeps its own turns and tokens (TileWorkload). Nearer each unit's limit the
  // replicated cluster does worse than one unit (2.5: 54%; 3 units under one front-end whose
  // prefix affinity keeps each conversation's turns on the instances holding its history),
  // which is what the plan's predicted attainment is for.
  chat.gpus = 12;
  chat.target_rate = 2.2 * conv->unit.max_rate();
  auto replicated = MakePlan(chat, m);
  ASSERT_TRUE(replicated.ok()) << replicated.status();
  EXPECT_TRUE(replicated->feasible) << replicated->reason;
  EXPECT_EQ(replicated->replicas, 3);
  EXPECT_GE(replicated->predicted_attainment, 0.85);
}

TEST(PlannerTest, ReplicatesToCoverARateOrSaysItCannot) {
  const LatencyModel m = Model({0.01, 1e-3, 0}, {1e-3, 0, 1e-4});
  PlannerOptions o = Options(200, 20, 1500, 100);
  o.max_instances = 3;
  o.gpus = 3;
  o.target_rate = 1000;
  auto no = MakePlan(o, m);
  ASSERT_TRUE(no.ok()) << no.status();
  EXPECT_FALSE(no->feasible);
  EXPECT_NE(no->reason.find("cannot serve"), std::string::npos) << no->reason;
  EXPECT_FALSE(PlanToJson(*no)["feasible"].get<bool>());

  o.gpus = 12;
  auto unit = MakePlan(Options(200, 20, 1500, 100), m);
  ASSERT_TRUE(unit.ok());
  o.target_rate = 2.5 * unit->unit.max_rate();
  auto yes = MakePlan(o, m);
  ASSERT_TRUE(yes.ok()) << yes.status();
  EXPECT_TRUE(yes->feasible) << yes->reason;
  EXPECT_EQ(yes->replicas, 3);
  EXPECT_EQ(yes->prefill_instances, 6);
  EXPECT_EQ(yes->decode_instances, 3);
  EXPECT_EQ(yes->gpus_used, 9);
  EXPECT_DOUBLE_EQ(yes->predicted_at_rate, o.target_rate);
  EXPECT_GE(yes->predicted_attainment, 0.8);

  // Without a GPU budget, a rate that would need more GPUs than a plan lays out is refused
  // (it used to be simulated: minutes, and memory without bound).
  o.gpus = 0;
  o.target_rate = 1e9;
  auto huge = MakePlan(o, m);
  ASSERT_TRUE(huge.ok()) << huge.status();
  EXPECT_FALSE(huge->feasible);
  EXPECT_NE(huge->reason.find("more than the 4096"), std::string::npos) << huge->reason;
  // Rates whose replica count would overflow an integer are refused the same way (1e300 once
  // wrapped around to one replica and a feasible plan), with a budget or without.
  for (int gpus : {0, 16}) {
    o.gpus = gpus;
    o.target_rate = 1e300;
    auto absurd = MakePlan(o, m);
    ASSERT_TRUE(absurd.ok()) << absurd.status();
    EXPECT_FALSE(absurd->feasible) << gpus;
    EXPECT_NE(absurd->reason.find("more than 4096 x"), std::string::npos) << absurd->reason;
  }
}

// An SLO that no unit meets at any rate is no plan, with or without a target rate, and a plan
// file that says so is refused by ParsePlanFile (so `pdserve up --plan` does not start it).
TEST(PlannerTest, AnSloNothingMeetsIsNotFeasible) {
  const LatencyModel m = Model({0.01, 1e-3, 0}, {1e-3, 0, 1e-4});
  PlannerOptions o = Options(200, 20, 1e-6, 100);  // TTFT target far below one prefill step
  auto plan = MakePlan(o, m);
  ASSERT_TRUE(plan.ok()) << plan.status();
  EXPECT_FALSE(plan->feasible);
  EXPECT_NE(plan->reason.find("meets the SLO"), std::string::npos) << plan->reason;
  const nlohmann::json j = PlanToJson(*plan);
  EXPECT_FALSE(j["feasible"].get<bool>());
  auto file = ParsePlanFile(j);
  EXPECT_EQ(file.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(file.status().message().find("not feasible"), std::string::npos) << file.status();
}

TEST(PlannerTest, PlanFileRoundTripAndColocatedComparison) {
  const LatencyModel m = Model({0.01, 1e-3, 0}, {1e-3, 0, 1e-4});
  PlannerOptions o = Options(200, 20, 1500, 100);
  o.max_instances = 2;
  o.search_colocated = true;
  o.profile_path = "profile.json";
  o.workload = {{"name", "fixed"}};
  auto plan = MakePlan(o, m);
  ASSERT_TRUE(plan.ok()) << plan.status();
  EXPECT_GT(plan->colocated.colocated, 0);
  EXPECT_GT(plan->colocated.goodput_per_gpu, 0);
  const nlohmann::json j = PlanToJson(*plan);
  for (const char* key : {"prefill_instances", "decode_instances", "goodput_per_gpu",
                          "colocated_goodput_per_gpu", "predicted_attainment", "curve",
                          "colocated_curve", "workload", "slo", "profile", "latency_model"}) {
    EXPECT_TRUE(j.contains(key)) << key;
  }
  EXPECT_EQ(j["profile"], "profile.json");
  EXPECT_EQ(j["slo"]["ttft_ms"], 1500);
  auto file = ParsePlanFile(nlohmann::json::parse(j.dump()));
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_EQ(file->prefill_instances, 1);
  EXPECT_EQ(file->decode_instances, 1);
  EXPECT_EQ(file->prefill.max_batch_tokens, 2048);
  EXPECT_EQ(file->tpot_slo_ms, 100);
  EXPECT_EQ(file->dispatch_policy, "least-loaded");
  EXPECT_FALSE(PlanSummary(*plan).empty());
  EXPECT_EQ(file->step_time_scale, 1);  // no live section
  EXPECT_TRUE(file->prefix_caching);
  // Planned without the cache: the workers are started without it; a plan file from before
  // the setting existed means the default (on).
  nlohmann::json off = j;
  off["policies"]["prefix_caching"] = false;
  EXPECT_FALSE(ParsePlanFile(off)->prefix_caching);
  off["policies"].erase("prefix_caching");
  EXPECT_TRUE(ParsePlanFile(off)->prefix_caching);
  // Local prefill as planned (0 in files from before the setting); a bad value is refused.
  EXPECT_EQ(file->local_prefill_max_tokens, 0);
  Plan local = *plan;
  local.options.base.local_prefill_max_tokens = 128;
  EXPECT_EQ(ParsePlanFile(PlanToJson(local))->local_prefill_max_tokens, 128);
  off["policies"].erase("local_prefill_max_tokens");
  EXPECT_EQ(ParsePlanFile(off)->local_prefill_max_tokens, 0);
  off["policies"]["local_prefill_max_tokens"] = 256;
  EXPECT_EQ(ParsePlanFile(off)->local_prefill_max_tokens, 256);
  off["policies"]["local_prefill_max_tokens"] = -3;
  EXPECT_EQ(ParsePlanFile(off).status().code(), absl::StatusCode::kInvalidArgument);
  off["policies"]["local_prefill_max_tokens"] = "many";
  EXPECT_EQ(ParsePlanFile(off).status().code(), absl::StatusCode::kInvalidArgument);
  nlohmann::json bad = j;
  bad["decode_instances"] = 0;
  EXPECT_EQ(ParsePlanFile(bad).status().code(), absl::StatusCode::kInvalidArgument);
  nlohmann::json live = j;
  live["live"] = {{"step_time_scale", 1.25}, {"step_time_sigma", 0.1}};
  auto calibrated = ParsePlanFile(live);
  ASSERT_TRUE(calibrated.ok()) << calibrated.status();
  EXPECT_EQ(calibrated->step_time_scale, 1.25);
  live["live"]["step_time_scale"] = -1;
  EXPECT_EQ(ParsePlanFile(live).status().code(), absl::StatusCode::kInvalidArgument);
}

// --at-rates: the chosen unit simulated at given total rates; slower steps (a scaled model)
// lower the attainment at a rate near the goodput.
TEST(PlannerTest, PredictsAtRequestedRatesAndScaledStepsLowerAttainment) {
  const LatencyModel m = Model({0.01, 1e-3, 0}, {1e-3, 0, 1e-4});
  PlannerOptions o = Options(200, 20, 1500, 100);
  auto plan = MakePlan(o, m);
  ASSERT_TRUE(plan.ok()) << plan.status();
  EXPECT_TRUE(plan->at_rates.empty());
  const double knee = plan->unit.max_rate();
  o.at_rates = {0.25 * knee, knee, 2 * knee};
  plan = MakePlan(o, m);
  ASSERT_TRUE(plan.ok()) << plan.status();
  ASSERT_EQ(plan->at_rates.size(), 3u);
  EXPECT_DOUBLE_EQ(plan->at_rates[1].rate, knee);
  EXPECT_GE(plan->at_rates[0].slo_attainment, 0.9);
  EXPECT_LT(plan->at_rates[2].slo_attainment, 0.9);
  EXPECT_TRUE(PlanToJson(*plan)["at_rates"].is_array());
  auto slower = MakePlan(o, m.Scaled(1.5));
  ASSERT_TRUE(slower.ok()) << slower.status();
  ASSERT_EQ(slower->at_rates.size(), 3u);
  EXPECT_LT(slower->at_rates[1].slo_attainment, plan->at_rates[1].slo_attainment);
  o.at_rates = {-1};
  EXPECT_EQ(MakePlan(o, m).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(PlannerTest, RejectsBadOptions) {
  const LatencyModel m = Model({0.01, 1e-3, 0}, {1e-3, 0, 1e-4});
  PlannerOptions o = Options(200, 20, 1500, 100);
  o.lengths.clear();
  EXPECT_EQ(MakePlan(o, m).status().code(), absl::StatusCode::kInvalidArgument);
  o = Options(200, 20, -1, -1);
  EXPECT_EQ(MakePlan(o, m).status().code(), absl::StatusCode::kInvalidArgument);
  o = Options(200, 20, 1500, 100);
  o.max_instances = 1;
  EXPECT_EQ(MakePlan(o, m).status().code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace pds::scheduler

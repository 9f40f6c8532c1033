// The front-end's dispatch policies: least-loaded choices, SLO-aware predictions, placement
// and admission control.
#include "scheduler/dispatch_policy.h"

#include "gtest/gtest.h"
#include "scheduler/latency_model.h"
#include "scheduler/prefix_index.h"

namespace pds::scheduler {
namespace {

InstanceLoad Inst(const std::string& id, InstanceRole role) {
  InstanceLoad l;
  l.id = id;
  l.role = role;
  l.healthy = true;
  l.kv_blocks_total = 100;
  l.kv_blocks_free = 100;
  l.max_batch_tokens = 512;
  return l;
}

// A model with exactly known coefficients: prefill 10 ms + 0.1 ms/token, decode 5 ms +
// 0.01 ms per context token + 1 ms per sequence.
LatencyModel KnownModel() {
  std::vector<PrefillSample> prefill;
  std::vector<DecodeSample> decode;
  for (int i = 1; i <= 12; ++i) {
    std::vector<int32_t> lens(static_cast<size_t>(i % 4 + 1), 37 * i);
    double sum = 0;
    for (int32_t l : lens) sum += l;
    prefill.push_back({lens, 0.010 + 0.0001 * sum});
    const int32_t batch = i * 3;
    const int64_t ctx = 150LL * i * i;
    decode.push_back({batch, ctx, 0.005 + 0.00001 * ctx + 0.001 * batch});
  }
  auto model = LatencyModel::Fit(prefill, decode);
  EXPECT_TRUE(model.ok()) << model.status();
  return *model;
}

TEST(DispatchPolicyTest, LeastLoadedPicksFewestQueuedTokensAndMostFreeBlocks) {
  auto policy = MakeLeastLoadedPolicy();
  std::vector<InstanceLoad> loads = {
      Inst("p0", InstanceRole::kPrefill), Inst("p1", InstanceRole::kPrefill),
      Inst("d0", InstanceRole::kDecode), Inst("d1", InstanceRole::kDecode)};
  loads[0].queued_prompt_tokens = 500;
  loads[1].queued_prompt_tokens = 20;
  loads[2].kv_blocks_free = 10;
  loads[3].kv_blocks_free = 90;
  auto placed = policy->Place({.prompt_tokens = 8, .max_tokens = 8}, loads);
  ASSERT_TRUE(placed.ok());
  EXPECT_EQ(placed->prefill, "p1");
  EXPECT_EQ(placed->decode, "d1");
  loads[1].healthy = false;
  placed = policy->Place({.prompt_tokens = 8, .max_tokens = 8}, loads);
  ASSERT_TRUE(placed.ok());
  EXPECT_EQ(placed->prefill, "p0");
  loads[0].healthy = false;
  EXPECT_EQ(policy->Place({.prompt_tokens = 8}, loads).status().code(),
            absl::StatusCode::kUnavailable);
  // Colocated instances serve when there are no pairs.
  std::vector<InstanceLoad> colocated = {Inst("c0", InstanceRole::kColocated),
                                         Inst("c1", InstanceRole::kColocated)};
  colocated[0].running_requests = 9;
  placed = policy->Place({.prompt_tokens = 8}, colocated);
  ASSERT_TRUE(placed.ok());
  EXPECT_EQ(placed->prefill, "c1");
  EXPECT_TRUE(placed->decode.empty());
}

TEST(DispatchPolicyTest, PredictionsFollowTheModelAndTheQueue) {
  const LatencyModel model = KnownModel();
  InstanceLoad p = Inst("p", InstanceRole::kPrefill);
  // Empty queue: one batch of 100 tokens = 10 + 10 ms.
  EXPECT_NEAR(PredictTtftMs(model, p, 100), 20.0, 0.01);
  // Queue of 300 + 300 under a 512 budget: batches [300, 212], [88, 100] -> 10 + 51.2 +
  // 10 + 18.8 = 90 ms.
  p.queued_prompt_lens = {300, 300};
  EXPECT_NEAR(PredictTtftMs(model, p, 100), 90.0, 0.01);
  InstanceLoad d = Inst("d", InstanceRole::kDecode);
  d.running_requests = 3;
  d.decode_context_tokens = 1000;
  // 4 sequences, 1500 context: 5 + 15 + 4 = 24 ms.
  EXPECT_NEAR(PredictTpotMs(model, d, 500), 24.0, 0.01);
}

TEST(DispatchPolicyTest, SloAwarePlacesByPredictionAndRefusesWhatCannotMeetTtft) {
  const LatencyModel model = KnownModel();
  auto policy = MakeSloAwarePolicy(model, {.default_ttft_slo_ms = 100});
  std::vector<InstanceLoad> loads = {
      Inst("p0", InstanceRole::kPrefill), Inst("p1", InstanceRole::kPrefill),
      Inst("d0", InstanceRole::kDecode), Inst("d1", InstanceRole::kDecode)};
  // p0 has fewer queued tokens but in more requests (more batches' fixed cost is not the
  // point here: the prediction is); p1's queue is longer in tokens.
  loads[0].queued_prompt_lens = {200};
  loads[1].queued_prompt_lens = {400};
  loads[2].running_requests = 30;
  loads[2].decode_context_tokens = 20000;
  loads[3].running_requests = 2;
  auto placed = policy->Place({.prompt_tokens = 50, .max_tokens = 20}, loads);
  ASSERT_TRUE(placed.ok()) << placed.status();
  EXPECT_EQ(placed->prefill, "p0");
  EXPECT_NEAR(placed->predicted_ttft_ms, 10 + 25, 0.01);
  EXPECT_EQ(placed->decode, "d1");
  EXPECT_FALSE(placed->best_effort);
  EXPECT_NE(placed->note.find("predicted TTFT"), std::string::npos);

  // Both queues long: the best prediction exceeds the 100 ms target.
  loads[0].queued_prompt_lens = {512, 512, 512};
  loads[1].queued_prompt_lens = {512, 512, 512};
  auto refused = policy->Place({.prompt_tokens = 50, .max_tokens = 20}, loads);
  EXPECT_EQ(refused.status().code(), absl::StatusCode::kResourceExhausted);
  EXPECT_NE(refused.status().message().find("TTFT"), std::string::npos);
  // A looser per-request target is admitted.
  EXPECT_TRUE(
      policy->Place({.prompt_tokens = 50, .max_tokens = 20, .ttft_slo_ms = 500}, loads).ok());
  // Best-effort mode places it and says so.
  auto lenient = MakeSloAwarePolicy(model, {.default_ttft_slo_ms = 100, .best_effort = true});
  auto best_effort = lenient->Place({.prompt_tokens = 50, .max_tokens = 20}, loads);
  ASSERT_TRUE(best_effort.ok());
  EXPECT_TRUE(best_effort->best_effort);

  // A decode instance without room for the request is avoided even if faster.
  loads[3].kv_blocks_free = 0;
  placed = policy->Place({.prompt_tokens = 50, .max_tokens = 20, .ttft_slo_ms = 1000}, loads);
  ASSERT_TRUE(placed.ok());
  EXPECT_EQ(placed->decode, "d0");
}

TEST(DispatchPolicyTest, DecodeBatchCappedByPredictedTpot) {
  const LatencyModel model = KnownModel();
  // Step = 5 + 0.01 * 100 * b + 1 * b = 5 + 2b ms with 100 context tokens each.
  EXPECT_EQ(MaxBatchForTpot(model, 100, 25.0, 64), 10);
  EXPECT_EQ(MaxBatchForTpot(model, 100, 25.0, 4), 4);
  EXPECT_EQ(MaxBatchForTpot(model, 100, 1.0, 64), 1);  // never below one
}

TEST(DispatchPolicyTest, CachedPrefixDrawsARequestUnlessTheCacheHolderIsBusierThanItSaves) {
  auto policy = MakeLeastLoadedPolicy();
  std::vector<InstanceLoad> loads = {Inst("p0", InstanceRole::kPrefill),
                                     Inst("p1", InstanceRole::kPrefill),
                                     Inst("d0", InstanceRole::kDecode)};
  loads[1].cached_prefix_tokens = 96;
  const DispatchRequest r{.prompt_tokens = 100, .max_tokens = 8};
  EXPECT_EQ(UncachedPromptTokens(r, loads[1]), 4);
  EXPECT_EQ(UncachedPromptTokens(r, loads[0]), 100);
  auto placed = policy->Place(r, loads);
  ASSERT_TRUE(placed.ok());
  EXPECT_EQ(placed->prefill, "p1") << "idle both: the one holding the prefix";
  EXPECT_NE(placed->note.find("96 of its prompt tokens cached"), std::string::npos) << placed->note;
  loads[1].queued_prompt_tokens = 90;  // 90 + 4 < 0 + 100
  EXPECT_EQ(policy->Place(r, loads)->prefill, "p1");
  loads[1].queued_prompt_tokens = 97;  // 97 + 4 > 100: the cache does not pay for the wait
  EXPECT_EQ(policy->Place(r, loads)->prefill, "p0");
  // Never less than one token to compute, whatever the estimate says.
  loads[1].cached_prefix_tokens = 500;
  EXPECT_EQ(UncachedPromptTokens(r, loads[1]), 1);
  EXPECT_EQ(UncachedPromptTokens({.prompt_tokens = 0}, loads[1]), 1);

  // SLO-aware: the TTFT predicted for the uncached part.
  const LatencyModel model = KnownModel();
  auto slo = MakeSloAwarePolicy(model, {.default_ttft_slo_ms = 1000});
  loads[1].cached_prefix_tokens = 96;
  loads[1].queued_prompt_tokens = 0;
  loads[1].queued_prompt_lens.clear();
  auto s = slo->Place(r, loads);
  ASSERT_TRUE(s.ok()) << s.status();
  EXPECT_EQ(s->prefill, "p1");
  EXPECT_NEAR(s->predicted_ttft_ms, PredictTtftMs(model, loads[1], 4), 1e-9);
  EXPECT_LT(s->predicted_ttft_ms, PredictTtftMs(model, loads[0], 100));
  // Colocated instances weigh it the same way.
  std::vector<InstanceLoad> colocated = {Inst("c0", InstanceRole::kColocated),
                                         Inst("c1", InstanceRole::kColocated)};
  colocated[1].cached_prefix_tokens = 64;
  EXPECT_EQ(policy->Place(r, colocated)->prefill, "c1");
}

// Conditional disaggregation: a placement whose decode instance holds all but a few prompt
// tokens becomes one request on that instance; otherwise (or off, or colocated) it stays.
TEST(DispatchPolicyTest, LocalPrefillWhenTheDecodeInstanceHoldsNearlyAllThePrompt) {
  std::vector<InstanceLoad> loads = {Inst("p0", InstanceRole::kPrefill),
                                     Inst("d0", InstanceRole::kDecode)};
  const DispatchRequest r{.prompt_tokens = 100, .max_tokens = 20};
  loads[1].cached_prefix_tokens = 80;  // 20 uncached there
  const Placement disaggregated{.prefill = "p0", .decode = "d0", .note = "least loaded"};
  Placement p = disaggregated;
  EXPECT_TRUE(PreferLocalPrefill(r, loads, 20, p));
  EXPECT_EQ(p.prefill, "d0");
  EXPECT_EQ(p.decode, "");
  EXPECT_TRUE(p.local_prefill);
  EXPECT_EQ(p.note, "least loaded; prefilled on d0 (20 of 100 prompt tokens uncached there)");
  for (int32_t max : {0, 19}) {
    p = disaggregated;
    EXPECT_FALSE(PreferLocalPrefill(r, loads, max, p)) << max;
    EXPECT_EQ(p.prefill, "p0");
    EXPECT_EQ(p.decode, "d0");
    EXPECT_FALSE(p.local_prefill);
  }
  // Other local prefills queued there: at most max_tokens of them wait at a time.
  loads[1].queued_prompt_tokens = 10;
  p = disaggregated;
  EXPECT_FALSE(PreferLocalPrefill(r, loads, 29, p));
  EXPECT_TRUE(PreferLocalPrefill(r, loads, 30, p));
  loads[1].queued_prompt_tokens = 0;
  // The whole prompt cached: its last token is still computed there.
  loads[1].cached_prefix_tokens = 112;
  p = disaggregated;
  EXPECT_TRUE(PreferLocalPrefill(r, loads, 1, p));
  EXPECT_NE(p.note.find("(1 of 100 prompt tokens"), std::string::npos) << p.note;
  // With the slo-aware policy's model: the step running the prefill (about 12 ms of prefill
  // and a 7 ms decode step here) must be predicted within the TPOT target.
  const LatencyModel model = KnownModel();
  loads[1].cached_prefix_tokens = 80;
  DispatchRequest slo = r;
  slo.tpot_slo_ms = 1000;
  const auto local = [&](const DispatchRequest& request, int32_t max) {
    Placement q = disaggregated;
    return PreferLocalPrefill(request, loads, max, q, &model) ? q.note : std::string("no");
  };
  {  // the predictions go on the placement; a best-effort admission within target is cleared
    Placement q = disaggregated;
    q.best_effort = true;
    q.predicted_ttft_ms = 9999;
    DispatchRequest both = slo;
    both.ttft_slo_ms = 500;
    ASSERT_TRUE(PreferLocalPrefill(both, loads, 20, q, &model));
    EXPECT_GT(q.predicted_ttft_ms, 0);
    EXPECT_LT(q.predicted_ttft_ms, 500);
    EXPECT_GT(q.predicted_tpot_ms, 0);
    EXPECT_FALSE(q.best_effort);
  }
  const std::string note = local(slo, 20);
  const size_t at = note.find("a step of ");
  ASSERT_NE(at, std::string::npos) << note;
  const double step_ms = std::stod(note.substr(at + 10));
  EXPECT_GT(step_ms, 15);  // the decode step alone is about 7 ms: the prefill counts
  EXPECT_LT(step_ms, 25);
  slo.tpot_slo_ms = step_ms + 0.5;
  EXPECT_NE(local(slo, 30), "no");
  loads[1].queued_prompt_tokens = 10;  // queued local prefills run in that step too: +1 ms
  EXPECT_EQ(local(slo, 30), "no");
  loads[1].queued_prompt_tokens = 0;
  slo.tpot_slo_ms = step_ms - 5;
  EXPECT_EQ(local(slo, 20), "no");
  slo.tpot_slo_ms = 0;  // no target: no gate
  EXPECT_NE(local(slo, 20), "no");
  slo.tpot_slo_ms = 100;
  loads[1].running_requests = 60;  // a busy decode instance: its step alone is ~0.6 s
  loads[1].decode_context_tokens = 60'000;
  EXPECT_EQ(local(slo, 20), "no");
  EXPECT_NE(local(r, 20), "no") << "no TPOT target: no gate";
  loads[1].running_requests = 0;
  loads[1].decode_context_tokens = 0;
  // A request the policy refused (an empty placement) is admitted on the decode instance
  // holding its prompt when its TTFT there is predicted within target; only with a model.
  DispatchRequest late = r;
  late.ttft_slo_ms = 100;
  Placement none;
  EXPECT_FALSE(PreferLocalPrefill(late, loads, 20, none)) << "no model";
  EXPECT_TRUE(PreferLocalPrefill(late, loads, 20, none, &model));
  EXPECT_EQ(none.prefill, "d0");
  EXPECT_TRUE(none.local_prefill);
  EXPECT_NE(none.note.find("the prefill side was predicted over the TTFT target; prefilled on d0"),
            std::string::npos)
      << none.note;
  EXPECT_NE(none.note.find("TTFT"), std::string::npos) << none.note;
  none = {};
  late.ttft_slo_ms = 10;  // under the step alone
  EXPECT_FALSE(PreferLocalPrefill(late, loads, 20, none, &model));
  EXPECT_EQ(none.prefill, "");
  late.ttft_slo_ms.reset();
  EXPECT_FALSE(PreferLocalPrefill(late, loads, 20, none, &model)) << "no TTFT target";
  // Another decode instance with room that holds more of the prompt runs it (a policy may
  // have placed the decode phase by other keys); one without room, or unhealthy, does not.
  loads.push_back(Inst("d1", InstanceRole::kDecode));
  loads[2].cached_prefix_tokens = 96;
  p = disaggregated;
  EXPECT_TRUE(PreferLocalPrefill(r, loads, 20, p));
  EXPECT_EQ(p.prefill, "d1");
  EXPECT_NE(p.note.find("(4 of 100"), std::string::npos) << p.note;
  loads[2].queued_prompt_tokens = 20;  // over the bound there: the placed one runs it
  p = disaggregated;
  EXPECT_TRUE(PreferLocalPrefill(r, loads, 20, p));
  EXPECT_EQ(p.prefill, "d0");
  loads[2].queued_prompt_tokens = 0;
  loads[2].kv_blocks_free = 0;  // 6 blocks held, 7 needed
  p = disaggregated;
  EXPECT_TRUE(PreferLocalPrefill(r, loads, 20, p));
  EXPECT_EQ(p.prefill, "d0");
  loads[2].kv_blocks_free = 100;
  loads[2].healthy = false;
  p = disaggregated;
  EXPECT_TRUE(PreferLocalPrefill(r, loads, 20, p));
  EXPECT_EQ(p.prefill, "d0");
  loads.pop_back();
  // A colocated placement, or an unknown decode id, is left alone.
  Placement colocated{.prefill = "c0"};
  EXPECT_FALSE(PreferLocalPrefill(r, loads, 100, colocated));
  Placement unknown{.prefill = "p0", .decode = "d9"};
  EXPECT_FALSE(PreferLocalPrefill(r, loads, 100, unknown));
  EXPECT_EQ(unknown.decode, "d9");
}

// A decode instance that holds the prompt's first blocks is sent fewer (and shares them while
// they are in use): least-loaded counts them as free, slo-aware breaks ties with them (its
// room check counts the whole request: the held blocks may be among the free ones).
TEST(DispatchPolicyTest, DecodeInstanceHoldingThePrefixCountsItsBlocksAsFree) {
  std::vector<InstanceLoad> loads = {Inst("p0", InstanceRole::kPrefill),
                                     Inst("d0", InstanceRole::kDecode),
                                     Inst("d1", InstanceRole::kDecode)};
  const DispatchRequest r{.prompt_tokens = 100, .max_tokens = 20};  // 7 prompt blocks of 16
  loads[2].cached_prefix_tokens = 96;
  EXPECT_EQ(HeldPromptBlocks(r, loads[2]), 6);
  loads[2].cached_prefix_tokens = 112;  // the whole prompt: its last block still moves
  EXPECT_EQ(HeldPromptBlocks(r, loads[2]), 6);
  EXPECT_EQ(HeldPromptBlocks(r, loads[1]), 0);
  EXPECT_EQ(HeldPromptBlocks({.prompt_tokens = 0}, loads[2]), 0);

  auto policy = MakeLeastLoadedPolicy();
  auto placed = policy->Place(r, loads);
  ASSERT_TRUE(placed.ok());
  EXPECT_EQ(placed->decode, "d1") << "idle both: the one holding the prefix";
  EXPECT_NE(placed->note.find("6 prompt blocks held"), std::string::npos) << placed->note;
  loads[2].kv_blocks_free = 95;  // 95 + 6 > 100
  EXPECT_EQ(policy->Place(r, loads)->decode, "d1");
  loads[2].kv_blocks_free = 93;  // 93 + 6 < 100: the free blocks elsewhere outweigh it
  EXPECT_EQ(policy->Place(r, loads)->decode, "d0");

  // SLO-aware: equal predictions go to the holder; room is for the whole request.
  const LatencyModel model = KnownModel();
  auto slo = MakeSloAwarePolicy(model, {.default_ttft_slo_ms = 1000});
  loads[2].kv_blocks_free = 100;
  auto s = slo->Place(r, loads);
  ASSERT_TRUE(s.ok()) << s.status();
  EXPECT_EQ(s->decode, "d1");
  EXPECT_NE(s->note.find("6 prompt blocks held"), std::string::npos) << s->note;
  loads[1].kv_blocks_free = 7;  // needs 8 (120 tokens): no room
  loads[2].kv_blocks_free = 8;
  loads[2].running_requests = 20;  // and is slower
  loads[2].decode_context_tokens = 5000;
  EXPECT_EQ(slo->Place(r, loads)->decode, "d1");
  loads[2].kv_blocks_free = 7;  // the 6 it holds do not make room
  EXPECT_EQ(slo->Place(r, loads)->decode, "d0") << "neither has room: the faster one";
}

TEST(PrefixIndexTest, MatchesLeadingHashesAndForgetsTheLeastRecentlySent) {
  PrefixIndex index;
  index.set_capacity(5);
  const std::vector<uint64_t> a = {1, 2, 3}, b = {1, 2, 7, 8};
  EXPECT_EQ(index.Match(a), 0);
  index.Insert(a);
  EXPECT_EQ(index.Match(a), 3);
  EXPECT_EQ(index.Match(b), 2) << "a shared first two blocks";
  EXPECT_EQ(index.Match(std::vector<uint64_t>{5, 2, 3}), 0) << "from the first block on";
  index.Insert(b);  // 1 and 2 refreshed, 7 and 8 added; 3 is now the least recent
  EXPECT_EQ(index.size(), 5u);
  EXPECT_EQ(index.Match(b), 4);
  EXPECT_EQ(index.Match(a), 3);
  index.Insert(std::vector<uint64_t>{9});  // full: 3 leaves
  EXPECT_EQ(index.Match(a), 2);
  index.Insert(std::vector<uint64_t>{10});  // then b's tail, less recent than its prefix
  EXPECT_EQ(index.Match(b), 3);
  index.set_capacity(3);  // the most recent stay: 10, 9 and 1
  EXPECT_EQ(index.Match(b), 1);
  index.Clear();
  EXPECT_EQ(index.Match(a), 0);
}

TEST(DispatchPolicyTest, ByName) {
  const LatencyModel model = KnownModel();
  EXPECT_TRUE(MakeDispatchPolicy("least-loaded").ok());
  EXPECT_EQ(MakeDispatchPolicy("slo-aware").status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(MakeDispatchPolicy("slo-aware", &model).ok());
  EXPECT_EQ(MakeDispatchPolicy("random").status().code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace pds::scheduler

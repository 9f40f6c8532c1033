#include "scheduler/simulator.h"

#include <algorithm>
#include <cmath>
#include <map>
#include <random>
#include <vector>

#include "gtest/gtest.h"

namespace pds::scheduler {
namespace {

LatencyModel Model(std::array<double, 3> prefill, std::array<double, 3> decode) {
  nlohmann::json j = {{"prefill", {{"coef", prefill}}}, {"decode", {{"coef", decode}}}};
  auto model = LatencyModel::FromJson(j);
  EXPECT_TRUE(model.ok()) << model.status();
  return *model;
}

// Prefill 0.01 + 0.001 per token (100 tokens: 0.11 s); decode 0.02 + 0.005 per sequence
// (one sequence: 0.025 s per step).
LatencyModel SimpleModel() { return Model({0.01, 0.001, 0}, {0.02, 0, 0.005}); }

// 2 bytes per token (1 layer, 1 head, head_dim 1, 1 byte), 200 bytes/s, 0.5 s latency: a
// 100-token hand-off takes 1.5 s.
SimConfig SimpleConfig() {
  SimConfig c;
  c.kv_shape = {1, 1, 1, 1};
  c.transfer_bandwidth = 200;
  c.transfer_latency_s = 0.5;
  c.layered_handoff = false;  // the whole move after the step (LayeredHandoff... below)
  c.slo.ttft_ms = 200;
  c.slo.tpot_ms = 500;
  return c;
}

std::vector<SimRequest> Constant(int n, double gap, int32_t prompt, int32_t output) {
  std::vector<SimRequest> r(n);
  for (int i = 0; i < n; ++i) r[i] = {i * gap, prompt, output};
  return r;
}

TEST(SimulatorTest, HandComputedDisaggregatedTimes) {
  auto result = Simulate(SimpleConfig(), SimpleModel(), Constant(3, 10.0, 100, 5));
  ASSERT_TRUE(result.ok()) << result.status();
  ASSERT_EQ(result->records.size(), 3u);
  for (int i = 0; i < 3; ++i) {
    const client::RequestRecord& r = result->records[i];
    ASSERT_TRUE(r.ok) << r.error_code << " " << r.error_message;
    EXPECT_DOUBLE_EQ(r.send_s, 10.0 * i);
    EXPECT_NEAR(r.TtftS(), 0.11, 1e-12);
    // 1.5 s hand-off, then 4 decode steps of 0.025 s.
    EXPECT_NEAR(r.E2elS(), 0.11 + 1.5 + 4 * 0.025, 1e-12);
    EXPECT_NEAR(r.TpotS(), (1.5 + 0.1) / 4, 1e-12);
    EXPECT_EQ(r.OutputTokens(), 5);
    EXPECT_EQ(r.timeline.prefill_instance, "prefill-0");
    EXPECT_EQ(r.timeline.decode_instance, "decode-0");
    EXPECT_EQ(r.timeline.kv_transfer_end_us - r.timeline.kv_transfer_start_us, 1'500'000);
  }
  EXPECT_EQ(result->metrics.completed, 3);
  EXPECT_DOUBLE_EQ(result->metrics.slo_attainment, 1.0);
  EXPECT_NEAR(result->metrics.ttft_ms.mean, 110, 1e-9);
  EXPECT_NEAR(result->metrics.tpot_ms.p99, 400, 1e-9);
  EXPECT_NEAR(result->metrics.transfer_ms.mean, 1500, 1e-6);
  EXPECT_NEAR(result->duration_s, 20 + 1.71, 1e-9);
  EXPECT_EQ(result->offers_refused, 0);
  // A tighter TPOT target is missed by every request.
  SimConfig tight = SimpleConfig();
  tight.slo.tpot_ms = 300;
  auto missed = Simulate(tight, SimpleModel(), Constant(3, 10.0, 100, 5));
  ASSERT_TRUE(missed.ok());
  EXPECT_DOUBLE_EQ(missed->metrics.slo_attainment, 0.0);
}

// Layer by layer: 4 layers, 100 tokens of 8 bytes at 8000 B/s = a 0.1 s move, done during
// the 0.11 s prefill step except the last layer's quarter; at 800 B/s (1 s) the move outlasts
// the step by 0.89 s.
TEST(SimulatorTest, LayeredHandoffLeavesOnlyWhatThePrefillStepDidNotHide) {
  for (const auto& [bandwidth, left_s] : {std::pair{8000.0, 0.025}, std::pair{800.0, 0.89}}) {
    SimConfig c = SimpleConfig();
    c.kv_shape = {4, 1, 1, 1};
    c.transfer_bandwidth = bandwidth;
    c.layered_handoff = true;
    auto result = Simulate(c, SimpleModel(), Constant(1, 0.0, 100, 3));
    ASSERT_TRUE(result.ok()) << result.status();
    const client::ServerTimeline& t = result->records[0].timeline;
    EXPECT_EQ(t.kv_transfer_start_us, t.prefill_start_us) << bandwidth;
    EXPECT_NEAR((t.kv_transfer_end_us - t.prefill_end_us) * 1e-6, 0.5 + left_s, 1e-6) << bandwidth;
    c.layered_handoff = false;
    auto after = Simulate(c, SimpleModel(), Constant(1, 0.0, 100, 3));
    ASSERT_TRUE(after.ok());
    const client::ServerTimeline& a = after->records[0].timeline;
    EXPECT_NEAR((a.kv_transfer_end_us - a.prefill_end_us) * 1e-6, 0.5 + 800 / bandwidth, 1e-6);
  }
}

TEST(SimulatorTest, QueueingWhenArrivalsOutpaceThePrefill) {
  SimConfig c = SimpleConfig();
  c.prefill.max_batch_tokens = 100;  // one prompt per step
  auto result = Simulate(c, SimpleModel(), Constant(10, 0.05, 100, 2));
  ASSERT_TRUE(result.ok()) << result.status();
  for (int k = 0; k < 10; ++k) {
    // The prefill instance is never idle: request k's first token at 0.11 (k + 1).
    EXPECT_NEAR(result->records[k].TtftS(), 0.11 * (k + 1) - 0.05 * k, 1e-9) << k;
  }
  EXPECT_LT(result->metrics.slo_attainment, 0.5);  // TTFT 200 ms is missed from k = 2 on
}

TEST(SimulatorTest, BackPressureWhenDecodeKvIsTiny) {
  SimConfig c = SimpleConfig();
  c.transfer_bandwidth = 1e12;
  c.transfer_latency_s = 0;
  c.prefill.kv_blocks = 8;  // one held 100-token prompt (7 blocks of 16) at a time
  c.decode.kv_blocks = 12;  // one decoding request; a second needs 7 + 1 free
  auto result = Simulate(c, SimpleModel(), Constant(3, 0.0, 100, 40));
  ASSERT_TRUE(result.ok()) << result.status();
  const auto& r = result->records;
  for (const auto& rec : r) ASSERT_TRUE(rec.ok) << rec.error_code << " " << rec.error_message;
  EXPECT_GE(result->offers_refused, 1);
  // The second request's KV moves only once the first finished decoding...
  EXPECT_GE(r[1].timeline.kv_transfer_end_us, r[0].timeline.finish_us);
  EXPECT_GT(r[1].timeline.kv_transfer_end_us - r[1].timeline.kv_transfer_start_us, 500'000);
  // ...and the prefill instance, full of its held KV, starts the third only after that.
  EXPECT_GE(r[2].timeline.prefill_start_us, r[1].timeline.kv_transfer_end_us);
}

TEST(SimulatorTest, DecodingWaitsForBlocksAnImportHolds) {
  // As LlmEngine: a decoding request that needs a block while a slow import holds the free
  // ones waits for them (it used to fail the whole simulation with INTERNAL).
  SimConfig c = SimpleConfig();  // a 100-token hand-off takes 1.5 s
  c.decode.kv_blocks = 16;       // a (7 blocks) + b's reservation (7 + 1 for a's growth)
  const std::vector<SimRequest> requests = {{0.0, 100, 100}, {1.7, 100, 100}};
  auto result = Simulate(c, SimpleModel(), requests);
  ASSERT_TRUE(result.ok()) << result.status();
  for (const auto& rec : result->records) {
    EXPECT_TRUE(rec.ok) << rec.error_code << " " << rec.error_message;
  }
  // a's decode stalled while b's KV was arriving: it ends after b's import.
  const auto& r = result->records;
  EXPECT_GT(r[0].timeline.finish_us, r[1].timeline.kv_transfer_end_us);
}

TEST(SimulatorTest, ColocatedStepsSumPrefillAndDecode) {
  SimConfig c = SimpleConfig();
  c.num_colocated = 1;
  // A alone: prefill 0.11, then decode steps of 0.025. B arrives during A's first decode
  // step (0.11 - 0.135); the next step mixes A's decode and B's prefill: 0.025 + 0.11.
  std::vector<SimRequest> reqs = {{0.0, 100, 5}, {0.12, 100, 2}};
  auto result = Simulate(c, SimpleModel(), reqs);
  ASSERT_TRUE(result.ok()) << result.status();
  const auto& a = result->records[0];
  const auto& b = result->records[1];
  ASSERT_TRUE(a.ok && b.ok);
  EXPECT_EQ(a.timeline.prefill_instance, "colocated-0");
  EXPECT_TRUE(a.timeline.decode_instance.empty());
  EXPECT_NEAR(a.TtftS(), 0.11, 1e-12);
  EXPECT_NEAR(b.TtftS(), 0.135 + 0.135 - 0.12, 1e-12);
  EXPECT_NEAR(a.chunk_times_s[1] - a.chunk_times_s[0], 0.025, 1e-12);
  EXPECT_NEAR(a.chunk_times_s[2] - a.chunk_times_s[1], 0.135, 1e-12);
  // Then A and B decode together: 0.02 + 2 * 0.005.
  EXPECT_NEAR(b.chunk_times_s[1] - b.chunk_times_s[0], 0.03, 1e-12);
  EXPECT_EQ(result->metrics.transfer_ms.count, 0);
}

TEST(SimulatorTest, DeterministicForASeed) {
  client::DatasetOptions d;
  d.kind = client::DatasetKind::kChatbot;
  d.num_requests = 200;
  d.seed = 7;
  client::ArrivalOptions a;
  a.rate = 4;
  a.seed = 7;
  auto reqs = MakeSimWorkload(d, a);
  ASSERT_TRUE(reqs.ok()) << reqs.status();
  ASSERT_EQ(reqs->size(), 200u);
  SimConfig c = SimpleConfig();
  c.transfer_bandwidth = 1e9;
  c.num_prefill = 2;
  c.num_decode = 2;
  const LatencyModel m = Model({0.005, 2e-4, 1e-8}, {0.003, 1e-6, 5e-4});
  auto first = Simulate(c, m, *reqs);
  auto second = Simulate(c, m, *reqs);
  ASSERT_TRUE(first.ok() && second.ok());
  ASSERT_EQ(first->records.size(), second->records.size());
  for (size_t i = 0; i < first->records.size(); ++i) {
    EXPECT_EQ(first->records[i].chunk_times_s, second->records[i].chunk_times_s) << i;
    EXPECT_EQ(first->records[i].timeline.prefill_instance,
              second->records[i].timeline.prefill_instance);
  }
  EXPECT_EQ(first->metrics.slo_attainment, second->metrics.slo_attainment);
  // The same generators as pdbench: another seed gives another workload and other times.
  d.seed = 8;
  a.seed = 8;
  auto other = MakeSimWorkload(d, a);
  ASSERT_TRUE(other.ok());
  auto third = Simulate(c, m, *other);
  ASSERT_TRUE(third.ok());
  EXPECT_NE(third->metrics.ttft_ms.mean, first->metrics.ttft_ms.mean);
}

TEST(SimulatorTest, DispatchSpreadsLoadOverTwoInstances) {
  for (bool colocated : {false, true}) {
    SimConfig c = SimpleConfig();
    c.transfer_bandwidth = 1e9;
    if (colocated) {
      c.num_colocated = 2;
    } else {
      c.num_prefill = 2;
      c.num_decode = 2;
    }
    auto result = Simulate(c, SimpleModel(), Constant(40, 0.02, 100, 10));
    ASSERT_TRUE(result.ok()) << result.status();
    std::map<std::string, int> prefill, decode;
    for (const auto& r : result->records) {
      ASSERT_TRUE(r.ok);
      ++prefill[r.timeline.prefill_instance];
      if (!colocated) ++decode[r.timeline.decode_instance];
    }
    ASSERT_EQ(prefill.size(), 2u) << colocated;
    for (const auto& [id, n] : prefill) EXPECT_GE(n, 15) << id;
    if (!colocated) {
      ASSERT_EQ(decode.size(), 2u);
      for (const auto& [id, n] : decode) EXPECT_GE(n, 10) << id;
    }
    for (const SimInstanceStats& s : result->instances) EXPECT_GT(s.steps, 0) << s.id;
  }
}

TEST(SimulatorTest, TooLongPromptsFailAndCount) {
  SimConfig c = SimpleConfig();
  c.decode.kv_blocks = 4;  // 64 tokens
  auto result = Simulate(c, SimpleModel(), {{0, 100, 5}, {1, 30, 5}});
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_FALSE(result->records[0].ok);
  EXPECT_EQ(result->records[0].error_code, "RESOURCE_EXHAUSTED");
  EXPECT_TRUE(result->records[1].ok);
  EXPECT_EQ(result->metrics.failed, 1);
  EXPECT_DOUBLE_EQ(result->metrics.slo_attainment, 0.5);
}

TEST(SimulatorTest, DispatchAndRelayLatenciesAddToTtftOnly) {
  SimConfig c = SimpleConfig();
  c.dispatch_latency_s = 0.004;
  c.relay_latency_s = 0.001;
  auto result = Simulate(c, SimpleModel(), Constant(3, 10.0, 100, 5));
  ASSERT_TRUE(result.ok()) << result.status();
  for (const client::RequestRecord& r : result->records) {
    ASSERT_TRUE(r.ok);
    // Queued 4 ms after arrival, 0.11 s of prefill, the client sees it 1 ms later.
    EXPECT_NEAR(r.TtftS(), 0.004 + 0.11 + 0.001, 1e-12);
    EXPECT_NEAR(r.TpotS(), (1.5 + 0.1) / 4, 1e-12);
    EXPECT_NEAR(r.E2elS(), 0.004 + 0.11 + 1.5 + 4 * 0.025 + 0.001, 1e-12);
    EXPECT_EQ(r.timeline.queued_us - r.timeline.arrival_us, 4'000);
    EXPECT_EQ(r.timeline.first_token_us - r.timeline.prefill_end_us, 1'000);
  }
  // The TTFT deadline of the EDF policy still counts from the arrival: two requests 1 ms
  // apart are served in arrival order although both are queued later.
  c.batch_policy = "edf";
  auto edf = Simulate(c, SimpleModel(), {{0, 100, 2}, {0.001, 100, 2}});
  ASSERT_TRUE(edf.ok()) << edf.status();
  EXPECT_LT(edf->records[0].chunk_times_s[0], edf->records[1].chunk_times_s[0]);
}

TEST(SimulatorTest, StepTimeNoiseIsSeededAndKeepsTheMedian) {
  SimConfig c = SimpleConfig();
  c.step_time_sigma = 0.2;
  c.noise_seed = 11;
  // Requests far apart: every prefill step runs alone, so TTFT = the step's time.
  const std::vector<SimRequest> reqs = Constant(401, 10.0, 100, 2);
  auto first = Simulate(c, SimpleModel(), reqs);
  auto again = Simulate(c, SimpleModel(), reqs);
  ASSERT_TRUE(first.ok() && again.ok());
  std::vector<double> log_ratio;
  for (size_t i = 0; i < reqs.size(); ++i) {
    ASSERT_EQ(first->records[i].chunk_times_s, again->records[i].chunk_times_s) << i;
    log_ratio.push_back(std::log(first->records[i].TtftS() / 0.11));
  }
  std::sort(log_ratio.begin(), log_ratio.end());
  // Median about 0 (the model's time), spread about sigma: the 16th-84th percentile range
  // of a normal is 2 sigma. 401 draws: the tolerances are several standard errors.
  EXPECT_NEAR(log_ratio[200], 0, 0.04);
  EXPECT_NEAR((log_ratio[336] - log_ratio[64]) / 2, 0.2, 0.04);
  // Another seed gives other draws; sigma 0 gives the model's times exactly.
  c.noise_seed = 12;
  auto other = Simulate(c, SimpleModel(), reqs);
  ASSERT_TRUE(other.ok());
  EXPECT_NE(other->records[0].chunk_times_s, first->records[0].chunk_times_s);
  c.step_time_sigma = 0;
  auto exact = Simulate(c, SimpleModel(), reqs);
  ASSERT_TRUE(exact.ok());
  for (const client::RequestRecord& r : exact->records) EXPECT_NEAR(r.TtftS(), 0.11, 1e-12);
}

// Requests sharing a 96-token prefix (6 blocks of 16): the first computes all 116 tokens, a
// later one of its group only its own 20 (attending to the cached 96); another group's
// request, or any with caching off, computes everything.
TEST(SimulatorTest, SharedPrefixIsComputedOncePerInstance) {
  std::vector<SimRequest> reqs = Constant(4, 10.0, 116, 5);
  for (SimRequest& r : reqs) {
    r.prefix_group = 0;
    r.prefix_len = 96;
  }
  reqs[2].prefix_group = 1;
  const LatencyModel model = SimpleModel();
  const double full = PrefillChunkSeconds(model, {{0, 116}});
  const double rest = PrefillChunkSeconds(model, {{96, 20}});
  ASSERT_LT(rest, full);
  SimConfig c = SimpleConfig();
  auto on = Simulate(c, model, reqs);
  ASSERT_TRUE(on.ok()) << on.status();
  const double want[] = {full, rest, full, rest};
  for (int i = 0; i < 4; ++i) EXPECT_NEAR(on->records[i].TtftS(), want[i], 1e-12) << i;
  c.prefix_caching = false;
  auto off = Simulate(c, model, reqs);
  ASSERT_TRUE(off.ok());
  for (int i = 0; i < 4; ++i) EXPECT_NEAR(off->records[i].TtftS(), full, 1e-12) << i;
  // A cache of 12 blocks, as the engine's allocator evicts: before request 2 (the other
  // group, 8 blocks) 8 blocks are cached (the prefix's 6 and the 7th of requests 0 and 1) and
  // 4 are plain free; it takes those 4 and the 4 least recently released cached ones (each
  // release lists a sequence's blocks last first): the two 7th blocks, then the prefix's 6th
  // and 5th. The group's next request finds 4 of its 6 prefix blocks.
  c.prefix_caching = true;
  c.prefill.kv_blocks = 12;
  reqs[3].prefix_group = 0;
  auto small = Simulate(c, model, reqs);
  ASSERT_TRUE(small.ok()) << small.status();
  EXPECT_NEAR(small->records[1].TtftS(), rest, 1e-12);
  EXPECT_NEAR(small->records[3].TtftS(), PrefillChunkSeconds(model, {{64, 52}}), 1e-12)
      << "2 prefix blocks evicted by request 2";
}

// The dispatch sees where each prefix went: two prefill instances, two groups arriving
// together; each group's later requests go where its first went, even when the other instance
// is as idle.
TEST(SimulatorTest, DispatchFollowsThePrefixCache) {
  std::vector<SimRequest> reqs;
  for (int i = 0; i < 6; ++i) {
    SimRequest r{i < 2 ? 0.0 : 10.0 * i, 116, 3};
    r.prefix_group = i % 2;
    r.prefix_len = 96;
    reqs.push_back(r);
  }
  SimConfig c = SimpleConfig();
  c.num_prefill = 2;
  auto result = Simulate(c, SimpleModel(), reqs);
  ASSERT_TRUE(result.ok()) << result.status();
  const std::string first0 = result->records[0].timeline.prefill_instance;
  const std::string first1 = result->records[1].timeline.prefill_instance;
  ASSERT_NE(first0, first1) << "the two arrive together: one each";
  for (int i = 2; i < 6; ++i) {
    EXPECT_EQ(result->records[i].timeline.prefill_instance, i % 2 == 0 ? first0 : first1) << i;
  }
}

// A decode instance shares the cached prefix of its imports: a request whose group's prefix it
// holds reserves only its own blocks and is sent only the rest of its prompt. Six requests of
// 272 tokens (a 256-token shared prefix, 16 blocks) and 100 output tokens (24 blocks at the
// end) on a decode instance of 64 blocks: with the cache most of them decode at once (8 blocks
// each besides the shared 16); without it at most three, the others waiting for room.
TEST(SimulatorTest, DecodeSharesThePrefixAndIsSentOnlyTheRest) {
  std::vector<SimRequest> reqs = Constant(6, 0.6, 272, 100);
  for (SimRequest& r : reqs) {
    r.prefix_group = 0;
    r.prefix_len = 256;
  }
  SimConfig c = SimpleConfig();
  c.transfer_bandwidth = 1000;  // the whole prompt: 0.544 s; its last block: 0.032 s
  c.transfer_latency_s = 0;
  c.slo.ttft_ms = -1;
  c.slo.tpot_ms = -1;
  c.decode.kv_blocks = 64;
  auto on = Simulate(c, SimpleModel(), reqs);
  ASSERT_TRUE(on.ok()) << on.status();
  c.prefix_caching = false;
  auto off = Simulate(c, SimpleModel(), reqs);
  ASSERT_TRUE(off.ok()) << off.status();
  for (const auto* result : {&*on, &*off}) {
    for (const auto& rec : result->records) ASSERT_TRUE(rec.ok) << rec.error_message;
  }
  const auto transfer_us = [](const client::RequestRecord& r) {
    return r.timeline.kv_transfer_end_us - r.timeline.kv_transfer_start_us;
  };
  // Requests 0 and 1 move everything (1, its prefill cut short by the prefill instance's
  // cache, is offered while 0's import is still arriving); the others only their last block.
  EXPECT_NEAR(transfer_us(on->records[0]), 544'000, 1);
  EXPECT_NEAR(transfer_us(on->records[1]), 544'000, 1);
  for (int i = 2; i < 6; ++i) EXPECT_NEAR(transfer_us(on->records[i]), 32'000, 1) << i;
  for (int i = 0; i < 6; ++i) EXPECT_GE(transfer_us(off->records[i]), 544'000 - 1) << i;
  const SimInstanceStats& decode_on = on->instances[1];
  const SimInstanceStats& decode_off = off->instances[1];
  ASSERT_EQ(decode_on.id, "decode-0");
  EXPECT_GE(decode_on.max_running, 5);
  EXPECT_LE(decode_off.max_running, 3);
  EXPECT_EQ(on->offers_refused, 0);
  EXPECT_GT(off->offers_refused, 0);
}

// A conversation of three turns on 1 prefill + 1 decode instance (16-token blocks). Each turn
// arrives its think time after the previous one ended; its prompt is the previous prompt and
// answer and a new message. The prefill instance holds the previous prompt's whole blocks and
// computes the rest; the decode instance holds the previous prompt and answer (all but its
// last token) and is sent only what follows their whole blocks.
std::vector<SimRequest> ThreeTurns() {
  std::vector<SimRequest> reqs(3);
  reqs[0] = {0.0, 40, 25};
  reqs[1] = {0.0, 40 + 25 + 20, 10};
  reqs[2] = {0.0, 85 + 10 + 7, 5};
  for (int i = 0; i < 3; ++i) {
    reqs[i].stream = 7;
    reqs[i].after = i - 1;
    reqs[i].think_s = i > 0 ? 0.5 : 0;
  }
  return reqs;
}

TEST(SimulatorTest, ConversationTurnsStartFromTheirHistory) {
  SimConfig c = SimpleConfig();
  c.transfer_bandwidth = 1000;  // 2 bytes per token: 2 ms per token moved
  c.transfer_latency_s = 0;
  c.slo = {};
  const LatencyModel model = SimpleModel();
  auto on = Simulate(c, model, ThreeTurns());
  ASSERT_TRUE(on.ok()) << on.status();
  ASSERT_EQ(on->records.size(), 3u);
  const auto transfer_s = [](const client::RequestRecord& r) {
    return (r.timeline.kv_transfer_end_us - r.timeline.kv_transfer_start_us) / 1e6;
  };
  const auto& r = on->records;
  for (int i = 0; i < 3; ++i) ASSERT_TRUE(r[i].ok) << r[i].error_message;
  EXPECT_NEAR(r[1].send_s, r[0].end_s + 0.5, 1e-9);
  EXPECT_NEAR(r[2].send_s, r[1].end_s + 0.5, 1e-9);
  for (int i = 0; i < 3; ++i) {
    EXPECT_EQ(r[i].conversation, 7);
    EXPECT_EQ(r[i].turn, i);
  }
  // Prefill: nothing, then turn 0's 2 whole prompt blocks, then turn 1's 5.
  EXPECT_EQ(r[0].cached_prompt_tokens, 0);
  EXPECT_EQ(r[1].cached_prompt_tokens, 32);
  EXPECT_EQ(r[2].cached_prompt_tokens, 80);
  EXPECT_NEAR(r[1].TtftS(), PrefillChunkSeconds(model, {{32, 53}}), 1e-9);
  EXPECT_NEAR(r[2].TtftS(), PrefillChunkSeconds(model, {{80, 22}}), 1e-9);
  // Decode: turn 0's 64 = 40 + 25 - 1 tokens are 4 whole blocks (85 - 64 = 21 moved); turn
  // 1's 94 tokens hold 5 (102 - 80 = 22 moved).
  EXPECT_NEAR(transfer_s(r[0]), 0.080, 1e-6);
  EXPECT_NEAR(transfer_s(r[1]), 0.042, 1e-6);
  EXPECT_NEAR(transfer_s(r[2]), 0.044, 1e-6);
  c.prefix_caching = false;
  auto off = Simulate(c, model, ThreeTurns());
  ASSERT_TRUE(off.ok()) << off.status();
  EXPECT_NEAR(off->records[1].TtftS(), PrefillChunkSeconds(model, {{0, 85}}), 1e-9);
  EXPECT_NEAR(transfer_s(off->records[2]), 0.204, 1e-6);
}

// Colocated, the instance that decoded a turn holds its answer too: the next turn computes
// only what follows the whole blocks of the previous prompt and answer.
TEST(SimulatorTest, ColocatedConversationReusesTheAnswer) {
  SimConfig c = SimpleConfig();
  c.num_colocated = 1;
  c.slo = {};
  const LatencyModel model = SimpleModel();
  auto on = Simulate(c, model, ThreeTurns());
  ASSERT_TRUE(on.ok()) << on.status();
  ASSERT_EQ(on->records.size(), 3u);
  EXPECT_EQ(on->records[1].cached_prompt_tokens, 64);
  EXPECT_EQ(on->records[2].cached_prompt_tokens, 80);  // 94 tokens computed: 5 whole blocks
  EXPECT_NEAR(on->records[1].TtftS(), PrefillChunkSeconds(model, {{64, 21}}), 1e-9);
}

// Conditional disaggregation: a turn with at most 32 prompt tokens its decode instance does not
// hold runs there whole (no hand-off, nothing recomputed on the prefill side); the first turn,
// which it holds none of, is disaggregated.
TEST(SimulatorTest, ShortUncachedTurnsArePrefilledOnTheDecodeInstance) {
  SimConfig c = SimpleConfig();
  c.transfer_bandwidth = 1000;
  c.transfer_latency_s = 0;
  c.slo = {};
  c.local_prefill_max_tokens = 32;
  const LatencyModel model = SimpleModel();
  auto sim = Simulate(c, model, ThreeTurns());
  ASSERT_TRUE(sim.ok()) << sim.status();
  const auto& r = sim->records;
  ASSERT_EQ(r.size(), 3u);
  EXPECT_EQ(r[0].timeline.prefill_instance, "prefill-0");
  EXPECT_EQ(r[0].timeline.decode_instance, "decode-0");
  for (int i = 1; i < 3; ++i) {
    ASSERT_TRUE(r[i].ok) << r[i].error_message;
    EXPECT_EQ(r[i].timeline.prefill_instance, "decode-0") << i;
    EXPECT_EQ(r[i].timeline.decode_instance, "") << i;
    EXPECT_EQ(r[i].timeline.kv_transfer_end_us, 0) << i;
  }
  // 64 = 40 + 25 - 1 tokens held (21 uncached), then 94 = 85 + 10 - 1 (80 in whole blocks).
  EXPECT_EQ(r[1].cached_prompt_tokens, 64);
  EXPECT_EQ(r[2].cached_prompt_tokens, 80);
  EXPECT_NEAR(r[1].TtftS(), PrefillChunkSeconds(model, {{64, 21}}), 1e-9);
  c.local_prefill_max_tokens = 20;  // 21 uncached: disaggregated
  auto off = Simulate(c, model, ThreeTurns());
  ASSERT_TRUE(off.ok()) << off.status();
  EXPECT_EQ(off->records[1].timeline.prefill_instance, "prefill-0");
  c.local_prefill_max_tokens = -1;
  EXPECT_EQ(Simulate(c, model, ThreeTurns()).status().code(), absl::StatusCode::kInvalidArgument);
}

// Under the slo-aware policy's admission control: a turn refused because the prefill side is
// predicted to miss its TTFT (a 150-token prompt there just before it) is admitted on the decode
// instance that holds all but 21 of its tokens, where its TTFT is predicted within target.
TEST(SimulatorTest, ATurnTheSloPolicyRefusesIsAdmittedOnTheDecodeInstance) {
  SimConfig c = SimpleConfig();  // TTFT 200 ms, TPOT 500 ms on every request
  c.transfer_bandwidth = 1000;
  c.transfer_latency_s = 0;
  c.dispatch_policy = "slo-aware";
  const LatencyModel model = SimpleModel();
  auto plain = Simulate(c, model, ThreeTurns());
  ASSERT_TRUE(plain.ok()) << plain.status();
  std::vector<SimRequest> reqs = ThreeTurns();
  reqs.push_back({plain->records[1].send_s - 0.001, 150, 2});  // busies the prefill instance
  auto refused = Simulate(c, model, reqs);
  ASSERT_TRUE(refused.ok()) << refused.status();
  ASSERT_EQ(refused->records.size(), 3u);  // turn 2 never sent
  EXPECT_EQ(refused->records[1].error_code, "RESOURCE_EXHAUSTED");
  c.local_prefill_max_tokens = 32;
  auto rescued = Simulate(c, model, reqs);
  ASSERT_TRUE(rescued.ok()) << rescued.status();
  ASSERT_EQ(rescued->records.size(), 4u);
  const client::RequestRecord& turn = rescued->records[1];
  ASSERT_TRUE(turn.ok) << turn.error_message;
  EXPECT_EQ(turn.timeline.prefill_instance, "decode-0");
  EXPECT_EQ(turn.cached_prompt_tokens, 64);
  EXPECT_LE(turn.TtftS(), 0.2);
}

// A request prefilled on a decode instance is booked there like a hand-off: the next placement
// sees the blocks it will take before the instance allocates them.
TEST(SimulatorTest, ALocalPrefillBooksItsBlocksOnTheDecodeInstance) {
  SimConfig c = SimpleConfig();
  c.slo = {};
  c.num_decode = 2;
  c.decode.kv_blocks = 8;
  c.local_prefill_max_tokens = 64;
  c.dispatch_latency_s = 0.001;  // booked at arrival, allocated a moment later
  // Both at 0: 40 tokens run on decode-0 (least-loaded's tie), 3 blocks booked there; 100
  // tokens (over the local limit) are disaggregated, to decode-1 (8 free blocks against 5).
  auto sim = Simulate(c, SimpleModel(), {{0.0, 40, 4}, {0.0, 100, 4}});
  ASSERT_TRUE(sim.ok()) << sim.status();
  const auto& r = sim->records;
  ASSERT_EQ(r.size(), 2u);
  ASSERT_TRUE(r[0].ok && r[1].ok) << r[0].error_message << r[1].error_message;
  EXPECT_EQ(r[0].timeline.prefill_instance, "decode-0");
  EXPECT_EQ(r[0].timeline.decode_instance, "");
  EXPECT_EQ(r[1].timeline.prefill_instance, "prefill-0");
  EXPECT_EQ(r[1].timeline.decode_instance, "decode-1");
}

// A failed turn ends its conversation: the later turns are never sent and leave no record.
TEST(SimulatorTest, AFailedTurnEndsItsConversation) {
  SimConfig c = SimpleConfig();
  c.slo = {};
  c.decode.kv_blocks = 5;  // turn 0 fits (41 tokens: 3 blocks), turn 1 (86: 6 blocks) not
  std::vector<SimRequest> reqs = ThreeTurns();
  reqs.push_back({1.0, 30, 4});  // another conversation, unaffected
  auto sim = Simulate(c, SimpleModel(), reqs);
  ASSERT_TRUE(sim.ok()) << sim.status();
  ASSERT_EQ(sim->records.size(), 3u);
  EXPECT_TRUE(sim->records[0].ok);
  EXPECT_FALSE(sim->records[1].ok);
  EXPECT_EQ(sim->records[1].error_code, "RESOURCE_EXHAUSTED");
  EXPECT_TRUE(sim->records[2].ok);
  EXPECT_EQ(sim->records[2].index, 3);
  EXPECT_EQ(sim->requests_not_sent, 1);
  EXPECT_EQ(sim->metrics.failed, 1);
}

// Two decode instances: a conversation's next turn goes to the one that decoded (and holds)
// its previous turn, although the tie-break between idle instances names the other; the
// front-end knows it holds the answer (the previous prompt fills no whole block).
TEST(SimulatorTest, NextTurnGoesToTheDecodeInstanceHoldingTheAnswer) {
  SimConfig c = SimpleConfig();
  c.num_decode = 2;
  c.transfer_bandwidth = 1000;
  c.transfer_latency_s = 0;
  c.slo = {};
  std::vector<SimRequest> reqs(3);
  reqs[0] = {0.0, 40, 200};   // conversation A: a long answer keeps decode-0 busy
  reqs[1] = {0.001, 10, 60};  // conversation B: to decode-1 (a prompt of no whole block)
  reqs[2] = {0.0, 85, 10};    // B's second turn, after A ended
  reqs[0].stream = 1;
  reqs[1].stream = 2;
  reqs[2].stream = 2;
  reqs[2].after = 1;
  reqs[2].think_s = 10;
  auto sim = Simulate(c, SimpleModel(), reqs);
  ASSERT_TRUE(sim.ok()) << sim.status();
  const auto& r = sim->records;
  ASSERT_EQ(r.size(), 3u);
  ASSERT_EQ(r[0].timeline.decode_instance, "decode-0");
  ASSERT_EQ(r[1].timeline.decode_instance, "decode-1");
  ASSERT_GT(r[2].send_s, r[0].end_s);
  EXPECT_EQ(r[2].timeline.decode_instance, "decode-1");
  EXPECT_NEAR((r[2].timeline.kv_transfer_end_us - r[2].timeline.kv_transfer_start_us) / 1e6, 0.042,
              1e-6);
}

// The planner's cluster of several units runs the workload once per unit: each copy's later
// turns follow its own, and its conversations have tokens of their own (no cache hits on
// another copy's history).
TEST(SimulatorTest, TiledWorkloadsKeepTheirConversationsApart) {
  std::vector<SimRequest> lengths = ThreeTurns();
  lengths.push_back({0.0, 30, 4});  // a single request
  const std::vector<SimRequest> two = TileWorkload(lengths, {0, 1, 20, 21}, 2);
  ASSERT_EQ(two.size(), 8u);
  EXPECT_EQ(two[0].arrival_s, 0);
  EXPECT_EQ(two[3].arrival_s, 1);
  EXPECT_EQ(two[4].arrival_s, 20);
  EXPECT_EQ(two[7].arrival_s, 21);
  EXPECT_EQ(two[4].stream, 15);  // 7 + 8
  EXPECT_EQ(two[5].after, 4);
  EXPECT_EQ(two[6].after, 5);
  EXPECT_EQ(two[7].stream, -1);
  EXPECT_EQ(TileWorkload(lengths, {0, 1, 20}, 2).size(), 7u) << "no start time for the last";
  SimConfig c = SimpleConfig();
  c.transfer_bandwidth = 1000;
  c.transfer_latency_s = 0;
  c.slo = {};
  auto sim = Simulate(c, SimpleModel(), two);
  ASSERT_TRUE(sim.ok()) << sim.status();
  ASSERT_EQ(sim->records.size(), 8u);
  ASSERT_GT(sim->records[4].send_s, sim->records[2].end_s) << "copy 1 starts after copy 0";
  EXPECT_EQ(sim->records[4].cached_prompt_tokens, 0);
  EXPECT_EQ(sim->records[5].cached_prompt_tokens, 32);
  EXPECT_EQ(sim->records[5].conversation, 15);
  EXPECT_EQ(sim->records[6].turn, 2);
}

TEST(SimulatorTest, ConversationsAsPdbenchSendsThem) {
  client::DatasetOptions d;
  d.kind = client::DatasetKind::kChatbot;
  d.num_requests = 6;
  d.length_scale = 0.125;
  d.shared_prefix_len = 64;
  d.num_shared_prefixes = 2;
  d.max_model_len = 700;
  d.seed = 3;
  auto conv = MakeSimConversations(d, 4, 0.25);
  ASSERT_TRUE(conv.ok()) << conv.status();
  client::DatasetOptions all = d;
  all.num_requests = 24;
  auto draws = MakeSimLengths(all);
  ASSERT_TRUE(draws.ok());
  // Walk the conversations: turn t of conversation c takes draw c * 4 + t.
  size_t i = 0;
  int ended_early = 0;
  for (int64_t conversation = 0; conversation < 6; ++conversation) {
    ASSERT_LT(i, conv->size());
    const size_t first = i;
    for (int t = 0; t < 4 && i < conv->size() && (*conv)[i].stream == conversation; ++t, ++i) {
      const SimRequest& r = (*conv)[i];
      const SimRequest& draw = (*draws)[conversation * 4 + t];
      EXPECT_EQ(r.output_len, draw.output_len);
      EXPECT_EQ(r.prefix_group, (*draws)[conversation * 4].prefix_group);
      EXPECT_EQ(r.prefix_len, 64);
      EXPECT_LE(r.prompt_len + r.output_len, 700);
      if (t == 0) {
        EXPECT_EQ(r.after, -1);
        EXPECT_EQ(r.prompt_len, draw.prompt_len);
      } else {
        const SimRequest& last = (*conv)[i - 1];
        EXPECT_EQ(r.after, static_cast<int64_t>(i - 1));
        EXPECT_DOUBLE_EQ(r.think_s, 0.25);
        EXPECT_EQ(r.prompt_len, last.prompt_len + last.output_len + draw.prompt_len - 64);
      }
    }
    const size_t turns = i - first;
    if (turns < 4) {
      // It ended before the turn that would pass max_model_len.
      ++ended_early;
      const SimRequest& last = (*conv)[i - 1];
      const SimRequest& next = (*draws)[conversation * 4 + turns];
      EXPECT_GT(last.prompt_len + last.output_len + next.prompt_len - 64 + next.output_len, 700);
    }
  }
  EXPECT_EQ(i, conv->size());
  EXPECT_GT(ended_early, 0) << "pick a max_model_len that ends some conversations";
  EXPECT_LT(ended_early, 6);
  d.max_model_len = 0;
  EXPECT_EQ(MakeSimConversations(d, 4, 0.25).status().code(), absl::StatusCode::kInvalidArgument);
  d.max_model_len = 700;
  EXPECT_FALSE(MakeSimConversations(d, 1, 0.25).ok());
  EXPECT_FALSE(MakeSimConversations(d, 4, -1).ok());
  d.num_requests = kMaxConversationTurns / 4 + 1;
  EXPECT_EQ(MakeSimConversations(d, 4, 0.25).status().code(), absl::StatusCode::kInvalidArgument);
  std::vector<SimRequest> bad = ThreeTurns();
  bad[1].after = 1;
  EXPECT_EQ(Simulate(SimpleConfig(), SimpleModel(), bad).status().code(),
            absl::StatusCode::kInvalidArgument);
}

// The block accounting of shared prefixes holds under pressure: random workloads of a few
// prefix groups on small caches with chunked prefills, preemptions and back-pressure, colocated
// and disaggregated, every one simulated to its end without an INTERNAL error (which a leaked
// or doubly freed block, or a sequence that could never get its blocks, would raise).
TEST(SimulatorTest, SharedPrefixAccountingSurvivesRandomPressure) {
  std::mt19937_64 rng(7);
  for (int round = 0; round < 60; ++round) {
    SimConfig c = SimpleConfig();
    c.transfer_bandwidth = 1e4;
    c.transfer_latency_s = 0;
    c.layered_handoff = round % 2 == 0;
    c.slo.ttft_ms = -1;
    c.slo.tpot_ms = -1;
    if (round % 3 == 0) {
      c.num_colocated = 1 + static_cast<int>(rng() % 2);
      c.colocated.kv_blocks = 24 + static_cast<int>(rng() % 24);
      c.colocated.max_batch_tokens = 32 + static_cast<int>(rng() % 64);
    } else {
      c.num_prefill = 1 + static_cast<int>(rng() % 2);
      c.num_decode = 1 + static_cast<int>(rng() % 2);
      c.prefill.kv_blocks = 20 + static_cast<int>(rng() % 20);
      c.prefill.max_batch_tokens = 32 + static_cast<int>(rng() % 64);
      c.decode.kv_blocks = 20 + static_cast<int>(rng() % 20);
      c.decode.max_batch_tokens = 16 + static_cast<int>(rng() % 64);
    }
    std::vector<SimRequest> reqs;
    double t = 0;
    for (int i = 0; i < 40; ++i) {
      t += 0.02 * static_cast<double>(rng() % 10);
      SimRequest r{t, 8 + static_cast<int32_t>(rng() % 200), 1 + static_cast<int32_t>(rng() % 40)};
      if (rng() % 4 != 0) {
        r.prefix_group = static_cast<int32_t>(rng() % 3);
        r.prefix_len = std::min<int32_t>(r.prompt_len, 16 * (1 + r.prefix_group * 3));
      }
      reqs.push_back(r);
    }
    auto result = Simulate(c, SimpleModel(), reqs);
    ASSERT_TRUE(result.ok()) << "round " << round << ": " << result.status();
    for (const auto& rec : result->records) {
      EXPECT_TRUE(rec.ok || rec.error_code == "RESOURCE_EXHAUSTED")
          << "round " << round << ": " << rec.error_code << " " << rec.error_message;
    }
  }
}

TEST(SimulatorTest, RejectsBadConfigs) {
  SimConfig c = SimpleConfig();
  c.num_prefill = 0;
  auto r = Simulate(c, SimpleModel(), Constant(1, 1, 10, 2));
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  c = SimpleConfig();
  c.batch_policy = "nope";
  EXPECT_EQ(Simulate(c, SimpleModel(), Constant(1, 1, 10, 2)).status().code(),
            absl::StatusCode::kInvalidArgument);
  c = SimpleConfig();
  c.dispatch_policy = "nope";
  EXPECT_EQ(Simulate(c, SimpleModel(), Constant(1, 1, 10, 2)).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(Simulate(SimpleConfig(), SimpleModel(), {{0, 0, 2}}).status().code(),
            absl::StatusCode::kInvalidArgument);
  for (auto bad : {+[](SimConfig& x) { x.step_time_sigma = -0.1; },
                   +[](SimConfig& x) { x.step_time_sigma = 3; },
                   +[](SimConfig& x) { x.dispatch_latency_s = -1; },
                   +[](SimConfig& x) { x.relay_latency_s = std::nan(""); }}) {
    c = SimpleConfig();
    bad(c);
    EXPECT_EQ(Simulate(c, SimpleModel(), Constant(1, 1, 10, 2)).status().code(),
              absl::StatusCode::kInvalidArgument);
  }
}

TEST(SimulatorTest, EdfBatchPolicyRuns) {
  SimConfig c = SimpleConfig();
  c.batch_policy = "edf";
  c.transfer_bandwidth = 1e9;
  auto result = Simulate(c, SimpleModel(), Constant(20, 0.05, 100, 4));
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_EQ(result->metrics.completed, 20);
}

}  // namespace
}  // namespace pds::scheduler

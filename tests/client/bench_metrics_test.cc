// pdbench metrics on hand-made records (exact values), percentiles, outputs, and the rate
// search on a synthetic attainment curve.
#include "client/bench_metrics.h"

#include "absl/strings/str_split.h"
#include "client/rate_search.h"
#include "gtest/gtest.h"

namespace pds::client {
namespace {

RequestRecord Ok(int64_t index, double send, std::vector<double> chunks,
                 std::vector<int32_t> tokens, int64_t prompt) {
  RequestRecord r;
  r.index = index;
  r.ok = true;
  r.scheduled_s = r.send_s = send;  // sent on time
  r.chunk_times_s = std::move(chunks);
  r.chunk_tokens = std::move(tokens);
  r.end_s = r.chunk_times_s.back();
  r.prompt_tokens = prompt;
  return r;
}

RequestRecord Failed(int64_t index, const std::string& code) {
  RequestRecord r;
  r.index = index;
  r.ok = false;
  r.error_code = code;
  r.scheduled_s = r.send_s = index;
  r.end_s = index + 0.01;
  return r;
}

std::vector<RequestRecord> HandMade() {
  return {
      // TTFT 100, E2EL 400, 4 tokens: TPOT 300 / 3 = 100; ITL 100, 100, 100.
      Ok(0, 0.0, {0.1, 0.2, 0.3, 0.4}, {1, 1, 1, 1}, 10),
      // TTFT 50, E2EL 250, 3 tokens in two messages: TPOT 200 / 2 = 100; ITL 200.
      Ok(1, 1.0, {1.05, 1.25}, {1, 2}, 20),
      // TTFT 300, E2EL 300, one token: no TPOT.
      Ok(2, 2.0, {2.3}, {1}, 30),
      Failed(3, "UNAVAILABLE"),
      Failed(4, "RESOURCE_EXHAUSTED"),
      Failed(5, "UNAVAILABLE"),
  };
}

TEST(PdbenchPercentileTest, LinearInterpolationLikeNumpy) {
  EXPECT_EQ(PercentileSorted({}, 50), 0);
  EXPECT_EQ(PercentileSorted({7}, 99), 7);
  EXPECT_DOUBLE_EQ(PercentileSorted({1, 2, 3, 4}, 90), 3.7);  // np.percentile(.., 90)
  EXPECT_DOUBLE_EQ(PercentileSorted({1, 2, 3, 4}, 50), 2.5);
  EXPECT_DOUBLE_EQ(PercentileSorted({15, 20, 35, 40, 50}, 40), 29.0);
  EXPECT_DOUBLE_EQ(PercentileSorted({15, 20, 35, 40, 50}, 0), 15);
  EXPECT_DOUBLE_EQ(PercentileSorted({15, 20, 35, 40, 50}, 100), 50);
  Stats s = ComputeStats({4, 1, 3, 2});
  EXPECT_EQ(s.count, 4);
  EXPECT_DOUBLE_EQ(s.mean, 2.5);
  EXPECT_DOUBLE_EQ(s.median, 2.5);
  EXPECT_DOUBLE_EQ(s.p90, 3.7);
  EXPECT_DOUBLE_EQ(s.p99, 3.97);
  EXPECT_DOUBLE_EQ(s.std, std::sqrt(1.25));
  EXPECT_EQ(s.min, 1);
  EXPECT_EQ(s.max, 4);
  EXPECT_EQ(ComputeStats({}).count, 0);
}

TEST(PdbenchMetricsTest, HandMadeRecordsGiveExactValues) {
  SloTargets slo{200, 150};
  BenchMetrics m = ComputeMetrics(HandMade(), 4.0, slo);
  EXPECT_EQ(m.completed, 3);
  EXPECT_EQ(m.failed, 3);
  EXPECT_EQ(m.errors,
            (std::map<std::string, int64_t>{{"RESOURCE_EXHAUSTED", 1}, {"UNAVAILABLE", 2}}));
  EXPECT_EQ(m.total_input_tokens, 60);
  EXPECT_EQ(m.total_output_tokens, 8);
  EXPECT_DOUBLE_EQ(m.duration, 4.0);
  EXPECT_DOUBLE_EQ(m.request_throughput, 0.75);
  EXPECT_DOUBLE_EQ(m.output_throughput, 2.0);
  EXPECT_DOUBLE_EQ(m.total_token_throughput, 17.0);
  // Requests 0 and 1 meet the SLO; 2 misses TTFT; failures never meet it.
  EXPECT_EQ(m.good, 2);
  EXPECT_DOUBLE_EQ(m.slo_attainment, 2.0 / 6.0);
  EXPECT_DOUBLE_EQ(m.request_goodput, 0.5);

  const double eps = 1e-9;
  EXPECT_EQ(m.ttft_ms.count, 3);
  EXPECT_NEAR(m.ttft_ms.mean, 150, eps);
  EXPECT_NEAR(m.ttft_ms.median, 100, eps);
  EXPECT_NEAR(m.ttft_ms.p90, 260, eps);
  EXPECT_NEAR(m.ttft_ms.p99, 296, eps);
  EXPECT_NEAR(m.ttft_ms.std, std::sqrt(35000.0 / 3), 1e-6);
  EXPECT_EQ(m.tpot_ms.count, 2);
  EXPECT_NEAR(m.tpot_ms.mean, 100, eps);
  EXPECT_NEAR(m.tpot_ms.p99, 100, eps);
  EXPECT_EQ(m.itl_ms.count, 4);
  EXPECT_NEAR(m.itl_ms.mean, 125, eps);
  EXPECT_NEAR(m.itl_ms.median, 100, eps);
  EXPECT_NEAR(m.itl_ms.p90, 170, eps);
  EXPECT_NEAR(m.itl_ms.p99, 197, eps);
  EXPECT_EQ(m.e2el_ms.count, 3);
  EXPECT_NEAR(m.e2el_ms.mean, 950.0 / 3, eps);
  EXPECT_NEAR(m.e2el_ms.median, 300, eps);
  EXPECT_NEAR(m.e2el_ms.p90, 380, eps);
  EXPECT_NEAR(m.e2el_ms.p99, 398, eps);
}

TEST(PdbenchMetricsTest, LatenciesCountFromTheScheduledArrival) {
  // Due at 1.0 s, held by the in-flight bound until 1.3 s, first token 50 ms after the send:
  // its user waited 350 ms for the first token; TPOT is the same either way.
  RequestRecord r = Ok(0, 1.3, {1.35, 1.45, 1.55}, {1, 1, 1}, 10);
  r.scheduled_s = 1.0;
  EXPECT_NEAR(r.SendLagS(), 0.3, 1e-12);
  EXPECT_NEAR(r.TtftS(), 0.35, 1e-12);
  EXPECT_NEAR(r.E2elS(), 0.55, 1e-12);
  EXPECT_NEAR(r.TpotS(), 0.1, 1e-12);
  EXPECT_FALSE(MeetsSlo(r, SloTargets{200, -1}));
  EXPECT_TRUE(MeetsSlo(r, SloTargets{400, 100.001}));
}

TEST(PdbenchMetricsTest, SloRules) {
  auto records = HandMade();
  // A TPOT target alone: request 2 (one token, no TPOT) meets it vacuously.
  EXPECT_EQ(ComputeMetrics(records, 1, SloTargets{-1, 150}).good, 3);
  // A TPOT target below 100 ms fails requests 0 and 1.
  EXPECT_EQ(ComputeMetrics(records, 1, SloTargets{-1, 99}).good, 1);
  // No targets: every completed request meets the SLO.
  BenchMetrics none = ComputeMetrics(records, 2, SloTargets{});
  EXPECT_EQ(none.good, 3);
  EXPECT_DOUBLE_EQ(none.slo_attainment, 0.5);
  EXPECT_DOUBLE_EQ(none.request_goodput, 1.5);
  EXPECT_FALSE(MeetsSlo(records[3], SloTargets{}));
  // Empty runs report zeros, not NaN.
  BenchMetrics empty = ComputeMetrics({}, 0, SloTargets{100, 100});
  EXPECT_EQ(empty.slo_attainment, 0);
  EXPECT_EQ(empty.request_throughput, 0);
}

// Multi-turn records: the CSV names each row's conversation and turn, and the per-turn table
// counts each turn's requests, attainment, TTFT and cached share.
TEST(PdbenchMetricsTest, TurnsTableAndColumns) {
  auto records = HandMade();
  ASSERT_GE(records.size(), 2u);
  EXPECT_EQ(TurnsTable(records, SloTargets{}), "") << "not a multi-turn run";
  records[0].conversation = 0;
  records[0].turn = 0;
  records[1].conversation = 0;
  records[1].turn = 1;
  records[1].ok = true;
  records[1].cached_prompt_tokens = records[1].prompt_tokens / 2;
  const std::string csv = RequestsCsv(records, SloTargets{});
  EXPECT_NE(csv.find(",0,0\n"), std::string::npos) << csv;
  EXPECT_NE(csv.find(",0,1\n"), std::string::npos) << csv;
  const std::string table = TurnsTable(records, SloTargets{});
  EXPECT_NE(table.find("Turn"), std::string::npos) << table;
  EXPECT_NE(table.find("\n1 "), std::string::npos) << table;
  EXPECT_NE(table.find("\n2 "), std::string::npos) << table;
  // Turn 2: 10 of its 20 prompt tokens cached, TTFT 50 ms.
  EXPECT_NE(table.find("50.0      50.0\n"), std::string::npos) << table;
}

TEST(PdbenchMetricsTest, ServerTimelineStages) {
  auto records = HandMade();
  ServerTimeline& t = records[0].timeline;
  records[0].has_timeline = true;
  t.arrival_us = 1'000'000;
  t.queued_us = 1'001'000;
  t.prefill_start_us = 1'003'000;  // queue 2 ms
  t.prefill_end_us = 1'008'000;    // prefill 5 ms
  t.kv_transfer_start_us = 1'008'000;
  t.kv_transfer_end_us = 1'009'500;  // transfer 1.5 ms
  t.decode_start_us = 1'010'000;
  t.finish_us = 1'030'000;       // decode 20 ms
  t.first_token_us = 1'008'400;  // relay 0.4 ms (arrival -> queued: dispatch 1 ms)
  records[1].has_timeline = true;
  records[1].timeline = t;
  records[1].timeline.kv_transfer_start_us = 0;  // colocated: no transfer
  records[1].timeline.kv_transfer_end_us = 0;
  records[1].timeline.prefill_end_us = 1'010'000;  // prefill 7 ms
  BenchMetrics m = ComputeMetrics(records, 4.0, SloTargets{});
  EXPECT_EQ(m.queue_ms.count, 2);
  EXPECT_DOUBLE_EQ(m.queue_ms.mean, 2.0);
  EXPECT_DOUBLE_EQ(m.prefill_ms.mean, 6.0);
  EXPECT_EQ(m.transfer_ms.count, 1);
  EXPECT_DOUBLE_EQ(m.transfer_ms.mean, 1.5);
  EXPECT_DOUBLE_EQ(m.decode_ms.mean, 20.0);
  EXPECT_EQ(m.dispatch_ms.count, 2);
  EXPECT_DOUBLE_EQ(m.dispatch_ms.mean, 1.0);
  EXPECT_EQ(m.relay_ms.count, 1);  // the second's first token precedes its prefill end
  EXPECT_DOUBLE_EQ(m.relay_ms.mean, 0.4);
  // KV after prefill: 1.5 ms for the first (its transfer began at the step's end).
  EXPECT_EQ(m.handoff_ms.count, 1);
  EXPECT_DOUBLE_EQ(m.handoff_ms.mean, 1.5);
  const std::string csv = RequestsCsv(records, SloTargets{});
  EXPECT_NE(csv.find("dispatch_ms,relay_ms,handoff_ms,cached_prompt_tokens,conversation,turn\n"),
            std::string::npos)
      << csv;
  EXPECT_NE(csv.find(",1.000,0.400,1.500,0,,\n"), std::string::npos) << csv;
  const nlohmann::json j = MetricsToJson(m, AllPercentileMetrics());
  EXPECT_DOUBLE_EQ(j["server_timeline"]["relay_ms"]["mean"].get<double>(), 0.4);
  EXPECT_DOUBLE_EQ(j["server_timeline"]["handoff_ms"]["mean"].get<double>(), 1.5);
  EXPECT_NE(SummaryTable(m, AllPercentileMetrics()).find("Relay:"), std::string::npos);
  EXPECT_NE(SummaryTable(m, AllPercentileMetrics()).find("KV after prefill:"), std::string::npos);
  // A layer-by-layer hand-off complete before the step's end exposes nothing.
  records[0].timeline.kv_transfer_start_us = 1'004'000;
  records[0].timeline.kv_transfer_end_us = 1'007'900;
  EXPECT_DOUBLE_EQ(ComputeMetrics(records, 4.0, SloTargets{}).handoff_ms.mean, 0.0);
}

TEST(PdbenchMetricsTest, JsonUsesVllmFieldNames) {
  BenchMetrics m = ComputeMetrics(HandMade(), 4.0, SloTargets{200, 150});
  nlohmann::json j = MetricsToJson(m, AllPercentileMetrics());
  for (const char* key :
       {"completed", "failed", "duration", "request_throughput", "output_throughput",
        "request_goodput", "slo_attainment", "total_input_tokens", "total_output_tokens"}) {
    EXPECT_TRUE(j.contains(key)) << key;
  }
  for (const char* metric : {"ttft", "tpot", "itl", "e2el"}) {
    for (const char* stat : {"mean", "median", "p90", "p99", "std"}) {
      std::string key = std::string(stat) + "_" + metric + "_ms";
      EXPECT_TRUE(j.contains(key)) << key;
    }
  }
  EXPECT_EQ(j["completed"], 3);
  EXPECT_EQ(j["failed"], 3);
  EXPECT_DOUBLE_EQ(j["p90_ttft_ms"].get<double>(), 260);
  EXPECT_DOUBLE_EQ(j["request_goodput"].get<double>(), 0.5);
  EXPECT_EQ(j["errors"]["UNAVAILABLE"], 2);
  EXPECT_EQ(j["goodput_slo"]["ttft_ms"], 200);

  nlohmann::json only = MetricsToJson(m, {"ttft", "e2el"});
  EXPECT_TRUE(only.contains("mean_ttft_ms"));
  EXPECT_TRUE(only.contains("p99_e2el_ms"));
  EXPECT_FALSE(only.contains("mean_tpot_ms"));
  EXPECT_FALSE(only.contains("mean_itl_ms"));
}

TEST(PdbenchMetricsTest, TableCsvAndSvg) {
  auto records = HandMade();
  SloTargets slo{200, 150};
  BenchMetrics m = ComputeMetrics(records, 4.0, slo);
  std::string table = SummaryTable(m, {"ttft", "tpot"});
  EXPECT_NE(table.find("Successful requests:"), std::string::npos);
  EXPECT_NE(table.find("UNAVAILABLE:"), std::string::npos);
  EXPECT_NE(table.find("SLO attainment (%):"), std::string::npos);
  EXPECT_NE(table.find("P90 TTFT (ms):"), std::string::npos);
  EXPECT_EQ(table.find("ITL"), std::string::npos);

  std::string csv = RequestsCsv(records, slo);
  std::vector<std::string> lines = absl::StrSplit(csv, '\n', absl::SkipEmpty());
  ASSERT_EQ(lines.size(), records.size() + 1);
  EXPECT_EQ(lines[1].substr(0, 5), "0,1,,");
  EXPECT_NE(lines[1].find(",100.000,100.000,400.000,10,4,1,"), std::string::npos) << lines[1];
  EXPECT_EQ(lines[4].substr(0, 16), "3,0,UNAVAILABLE,");

  std::vector<SearchPoint> points = {{2.0, m}, {1.0, m}};
  std::string search_csv = SearchCsv(points, 2);
  std::vector<std::string> rows = absl::StrSplit(search_csv, '\n', absl::SkipEmpty());
  ASSERT_EQ(rows.size(), 3u);
  EXPECT_EQ(rows[1].substr(0, 14), "2.0000,1.0000,");
  EXPECT_NE(SearchTable(points, 2, 0.9).find("rate/gpu"), std::string::npos);
  std::string svg = SearchSvg(points, 2, 0.9, slo, "a <title>");
  EXPECT_EQ(svg.rfind("<svg", 0), 0u);
  EXPECT_NE(svg.find("</svg>"), std::string::npos);
  EXPECT_NE(svg.find("a &lt;title&gt;"), std::string::npos);
  EXPECT_NE(svg.find("<polyline"), std::string::npos);
  EXPECT_NE(svg.find("SLO attainment"), std::string::npos);
  EXPECT_NE(svg.find("TTFT p99"), std::string::npos);
}

BenchMetrics WithAttainment(double a) {
  BenchMetrics m;
  m.slo_attainment = a;
  return m;
}

TEST(PdbenchRateSearchTest, SweepsThenBisects) {
  SearchOptions o;
  o.min_rate = 1;
  o.max_rate = 6;
  o.steps = 6;
  o.bisect_steps = 3;
  o.attainment_target = 0.9;
  std::vector<double> asked;
  auto run = [&](double rate) -> absl::StatusOr<BenchMetrics> {
    asked.push_back(rate);
    return WithAttainment(rate <= 3.3 ? 0.95 : 0.5);
  };
  auto r = SearchMaxRate(o, run);
  ASSERT_TRUE(r.ok()) << r.status();
  // Sweep 1, 2, 3, 4 (fails: stop); bisect 3.5 (fail), 3.25 (pass), 3.375 (fail).
  EXPECT_EQ(asked, (std::vector<double>{1, 2, 3, 4, 3.5, 3.25, 3.375}));
  EXPECT_TRUE(r->found);
  EXPECT_FALSE(r->hit_max);
  EXPECT_DOUBLE_EQ(r->best_rate, 3.25);
  EXPECT_EQ(r->points.size(), 7u);
}

TEST(PdbenchRateSearchTest, EdgeCases) {
  SearchOptions o;
  o.min_rate = 1;
  o.max_rate = 4;
  o.steps = 4;
  auto none =
      SearchMaxRate(o, [](double) -> absl::StatusOr<BenchMetrics> { return WithAttainment(0.1); });
  ASSERT_TRUE(none.ok());
  EXPECT_FALSE(none->found);
  EXPECT_EQ(none->best_rate, 0);
  EXPECT_EQ(none->points.size(), 1u);

  auto all =
      SearchMaxRate(o, [](double) -> absl::StatusOr<BenchMetrics> { return WithAttainment(1.0); });
  ASSERT_TRUE(all.ok());
  EXPECT_TRUE(all->found);
  EXPECT_TRUE(all->hit_max);
  EXPECT_EQ(all->best_rate, 4);
  EXPECT_EQ(all->points.size(), 4u);

  auto err = SearchMaxRate(
      o, [](double) -> absl::StatusOr<BenchMetrics> { return absl::UnavailableError("down"); });
  EXPECT_EQ(err.status().code(), absl::StatusCode::kUnavailable);

  // One step cannot sweep a range (it would claim the untried highest rate passed); with
  // min == max it measures that one rate.
  o.steps = 1;
  EXPECT_EQ(SearchMaxRate(o, nullptr).status().code(), absl::StatusCode::kInvalidArgument);
  o.min_rate = 4;
  std::vector<double> asked;
  auto one = SearchMaxRate(o, [&](double rate) -> absl::StatusOr<BenchMetrics> {
    asked.push_back(rate);
    return WithAttainment(1.0);
  });
  ASSERT_TRUE(one.ok());
  EXPECT_EQ(asked, std::vector<double>{4});
  EXPECT_TRUE(one->hit_max);
  o.steps = 4;

  o.min_rate = 0;
  EXPECT_EQ(SearchMaxRate(o, nullptr).status().code(), absl::StatusCode::kInvalidArgument);
  o.min_rate = 5;
  EXPECT_EQ(SearchMaxRate(o, nullptr).status().code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace pds::client

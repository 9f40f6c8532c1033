// The front-end's Prometheus metrics: the text format of histograms and counters, SLO
// attainment as goodput counts it, and a scrape of a live front-end over HTTP.

#include "server/metrics.h"

#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "grpcpp/grpcpp.h"
#include "gtest/gtest.h"
#include "httplib.h"
#include "pdserve/v1/serving.grpc.pb.h"
#include "server/frontend.h"
#include "tests/server/test_worker.h"
#include "tests/testing/test_util.h"

namespace pds::server {
namespace {

namespace api = ::pdserve::v1;

// Sample lines ("name{labels} value") of an exposition, by their name and labels; a malformed
// line fails the test.
std::map<std::string, double> Samples(const std::string& text) {
  std::map<std::string, double> out;
  for (absl::string_view line : absl::StrSplit(text, '\n', absl::SkipEmpty())) {
    if (line.front() == '#') {
      EXPECT_TRUE(absl::StartsWith(line, "# HELP ") || absl::StartsWith(line, "# TYPE ")) << line;
      continue;
    }
    const size_t space = line.rfind(' ');
    double value = 0;
    EXPECT_TRUE(space != absl::string_view::npos &&
                absl::SimpleAtod(line.substr(space + 1), &value))
        << line;
    out[std::string(line.substr(0, space))] = value;
  }
  return out;
}

TEST(MetricsTest, HistogramBucketsAreCumulativeWithSumAndCount) {
  Histogram h({0.1, 1});
  for (double v : {0.05, 0.1, 0.5, 2.0}) h.Observe(v);
  std::string out;
  h.Render(out, "x");
  EXPECT_EQ(out,
            "x_bucket{le=\"0.1\"} 2\nx_bucket{le=\"1\"} 3\nx_bucket{le=\"+Inf\"} 4\n"
            "x_sum 2.65\nx_count 4\n");
}

TEST(MetricsTest, SloAttainmentCountsFinishedRequestsThatMetEveryTarget) {
  FrontendMetrics m;
  RequestOutcome met{.code = "OK",
                     .ttft_s = 0.1,
                     .tpot_s = 0.01,
                     .e2e_s = 1,
                     .prompt_tokens = 5,
                     .completion_tokens = 7,
                     .ttft_slo_s = 0.2,
                     .tpot_slo_s = 0.05};
  RequestOutcome slow_first = met;
  slow_first.ttft_s = 0.3;
  RequestOutcome slow_rest = met;
  slow_rest.tpot_s = 0.06;
  RequestOutcome no_targets = met;
  no_targets.ttft_slo_s = no_targets.tpot_slo_s = 0;
  no_targets.ttft_s = 100;
  RequestOutcome refused{.code = "RESOURCE_EXHAUSTED"};
  for (const auto& o : {met, slow_first, slow_rest, no_targets, refused}) m.Record(o);
  const auto s = Samples(m.Render("pdserve_extra 1\n"));
  EXPECT_EQ(s.at("pdserve_requests_total{code=\"OK\"}"), 4);
  EXPECT_EQ(s.at("pdserve_requests_total{code=\"RESOURCE_EXHAUSTED\"}"), 1);
  EXPECT_EQ(s.at("pdserve_slo_attained_total"), 2);
  EXPECT_EQ(s.at("pdserve_slo_missed_total{slo=\"ttft\"}"), 1);
  EXPECT_EQ(s.at("pdserve_slo_missed_total{slo=\"tpot\"}"), 1);
  EXPECT_EQ(s.at("pdserve_completion_tokens_total"), 28);
  EXPECT_EQ(s.at("pdserve_ttft_seconds_count"), 4);  // the refused one reached no token
  EXPECT_EQ(s.at("pdserve_ttft_seconds_bucket{le=\"0.1\"}"), 2);  // met, slow_rest
  EXPECT_EQ(s.at("pdserve_extra"), 1);
  EXPECT_EQ(PromLabel("a\"b\\c\nd"), "\"a\\\"b\\\\c\\nd\"");
}

// A front-end with --metrics-port serves its figures over HTTP: requests by code, latency
// histograms from the timelines, and a gauge per worker.
TEST(MetricsTest, FrontendServesPrometheusMetricsOverHttp) {
  auto dir = testing::MakeModelDir(testing::SmallTestConfig(), "metrics", 5);
  ASSERT_TRUE(dir.ok()) << dir.status();
  FrontendOptions fo;
  fo.model_dir = *dir;
  fo.health_period = absl::Milliseconds(50);
  fo.metrics_port = 0;
  fo.default_ttft_slo_ms = 60'000;
  auto frontend = Frontend::Start(fo);
  ASSERT_TRUE(frontend.ok()) << frontend.status();
  ASSERT_GT((*frontend)->metrics_port(), 0);
  WorkerOptions wo;
  wo.id = "p";
  wo.frontend = (*frontend)->address();
  auto prefill = StartWorker(scheduler::InstanceRole::kPrefill, wo);
  wo.id = "d";
  auto decode = StartWorker(scheduler::InstanceRole::kDecode, wo);
  ASSERT_TRUE(prefill && decode);
  auto api = api::Serving::NewStub(
      grpc::CreateChannel((*frontend)->address(), grpc::InsecureChannelCredentials()));
  httplib::Client http("127.0.0.1", (*frontend)->metrics_port());
  auto scrape = [&]() -> std::map<std::string, double> {
    auto res = http.Get("/metrics");
    if (!res || res->status != 200) return {};
    EXPECT_TRUE(absl::StartsWith(res->get_header_value("Content-Type"), "text/plain"));
    return Samples(res->body);
  };
  const absl::Time deadline = absl::Now() + absl::Seconds(20);
  while (scrape()["pdserve_ready"] != 1 && absl::Now() < deadline) {
    absl::SleepFor(absl::Milliseconds(20));
  }
  for (int i = 0; i < 3; ++i) {
    api::GenerateRequest r;
    for (int j = 0; j < 6; ++j) r.add_prompt_token_ids(4 + i + j);
    r.set_max_tokens(5);
    r.set_ignore_eos(true);
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
    auto reader = api->Generate(&ctx, r);
    api::GenerateResponse m;
    while (reader->Read(&m)) {
    }
    ASSERT_TRUE(reader->Finish().ok());
  }
  {
    api::GenerateRequest bad;  // no prompt: INVALID_ARGUMENT
    bad.set_max_tokens(3);
    grpc::ClientContext ctx;
    auto reader = api->Generate(&ctx, bad);
    api::GenerateResponse m;
    while (reader->Read(&m)) {
    }
    EXPECT_EQ(reader->Finish().error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  }
  const auto s = scrape();
  ASSERT_FALSE(s.empty()) << "no scrape";
  EXPECT_EQ(s.at("pdserve_requests_total{code=\"OK\"}"), 3);
  EXPECT_EQ(s.at("pdserve_requests_total{code=\"INVALID_ARGUMENT\"}"), 1);
  EXPECT_EQ(s.at("pdserve_slo_attained_total"), 3);
  EXPECT_EQ(s.at("pdserve_completion_tokens_total"), 15);
  EXPECT_EQ(s.at("pdserve_prompt_tokens_total"), 18);
  EXPECT_EQ(s.at("pdserve_ttft_seconds_count"), 3);
  EXPECT_EQ(s.at("pdserve_tpot_seconds_count"), 3);
  EXPECT_EQ(s.at("pdserve_kv_transfer_seconds_count"), 3);
  EXPECT_GT(s.at("pdserve_e2e_latency_seconds_sum"), 0);
  EXPECT_EQ(s.at("pdserve_requests_in_flight"), 0);
  EXPECT_EQ(s.at("pdserve_instance_healthy{worker=\"p\",role=\"prefill\"}"), 1);
  EXPECT_EQ(s.at("pdserve_instance_healthy{worker=\"d\",role=\"decode\"}"), 1);
  EXPECT_EQ(s.count("pdserve_instance_kv_blocks_total{worker=\"d\",role=\"decode\"}"), 1u);
  EXPECT_EQ(s.at("pdserve_ready"), 1);
  // Prometheus gives `instance` and `job` to the scrape target: no series may carry them.
  for (const auto& [series, value] : s) {
    EXPECT_EQ(series.find("instance="), std::string::npos) << series;
    EXPECT_EQ(series.find("job="), std::string::npos) << series;
  }
  // A scraper keeping its connection alive does not hold the shutdown up.
  httplib::Client kept("127.0.0.1", (*frontend)->metrics_port());
  kept.set_keep_alive(true);
  ASSERT_TRUE(kept.Get("/metrics"));
  const absl::Time stop = absl::Now();
  (*frontend)->Shutdown();
  EXPECT_LT(absl::Now() - stop, absl::Seconds(2));
  EXPECT_FALSE(http.Get("/metrics")) << "still serving after Shutdown";
}

}  // namespace
}  // namespace pds::server

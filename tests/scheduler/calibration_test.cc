#include "scheduler/calibration.h"

#include <unistd.h>

#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "client/bench_metrics.h"
#include "gtest/gtest.h"
#include "scheduler/simulator.h"

namespace pds::scheduler {
namespace {

LatencyModel PrefillModel() {
  // Prefill 10 ms + 0.5 ms per token; decode 5 ms + 0.4 ms per sequence.
  nlohmann::json j = {{"prefill", {{"coef", {0.01, 0.0005, 0}}}},
                      {"decode", {{"coef", {0.005, 0, 0.0004}}}}};
  auto model = LatencyModel::FromJson(j);
  EXPECT_TRUE(model.ok()) << model.status();
  return *model;
}

class CalibrationTest : public ::testing::Test {
 protected:
  std::string Write(const std::string& name, const std::string& text) {
    const std::string path = dir_ / name;
    std::ofstream(path) << text;
    return path;
  }
  void SetUp() override {
    dir_ = std::filesystem::temp_directory_path() /
           ("pds_calibration_test_" + std::to_string(::getpid()));
    std::filesystem::create_directories(dir_);
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }
  std::filesystem::path dir_;
};

// A "live run" made by the simulator with known slowdowns, written as pdbench writes its
// CSV: the calibration must recover them from the CSV alone.
TEST_F(CalibrationTest, RecoversTheSlowdownsOfASimulatedRun) {
  client::DatasetOptions d;
  d.kind = client::DatasetKind::kChatbot;
  d.length_scale = 0.125;
  d.num_requests = 400;
  d.seed = 3;
  client::ArrivalOptions a;
  a.rate = 8;  // busy enough that some steps batch several prompts
  a.seed = 3;
  auto reqs = MakeSimWorkload(d, a);
  ASSERT_TRUE(reqs.ok()) << reqs.status();
  SimConfig c;
  c.kv_shape = {2, 2, 16, 4};
  c.transfer_latency_s = 0.002;
  c.step_time_sigma = 0.1;
  c.noise_seed = 5;
  c.dispatch_latency_s = 0.005;
  c.relay_latency_s = 0.001;
  c.slo.ttft_ms = 250;
  const LatencyModel model = PrefillModel();
  auto run = Simulate(c, model.Scaled(1.3), *reqs);
  ASSERT_TRUE(run.ok()) << run.status();
  int batched = 0;
  for (const auto& r : run->records) {
    ASSERT_TRUE(r.ok) << r.error_message;
    batched += r.timeline.prefill_start_us > r.timeline.queued_us ? 1 : 0;
  }
  EXPECT_GT(batched, 20);  // requests that waited for a step, so steps of several prompts
  const std::string path = Write("run.csv", client::RequestsCsv(run->records, c.slo));

  auto rows = ReadRunCsv(path);
  ASSERT_TRUE(rows.ok()) << rows.status();
  ASSERT_EQ(rows->size(), 400u);
  auto cal = Calibrate(model, *rows, 2048);
  ASSERT_TRUE(cal.ok()) << cal.status();
  EXPECT_EQ(cal->requests, 400);
  EXPECT_GT(cal->steps, 250);
  EXPECT_LT(cal->steps, 400);  // some steps carried several prompts and were found as one
  EXPECT_NEAR(cal->step_time_scale, 1.3, 0.02);
  EXPECT_NEAR(cal->step_time_sigma, 0.1, 0.02);
  EXPECT_NEAR(cal->dispatch_latency_s, 0.005, 1e-6);
  EXPECT_NEAR(cal->relay_latency_s, 0.001, 1e-6);
  const nlohmann::json j = cal->ToJson();
  EXPECT_EQ(j["steps"], cal->steps);
  EXPECT_DOUBLE_EQ(j["step_time_scale"].get<double>(), cal->step_time_scale);

  // A step whose prompts exceed the step budget was chunked: its prefill_ms spans several
  // steps and is skipped.
  int32_t short_steps = 0;
  auto small_budget = Calibrate(model, *rows, 40);
  ASSERT_TRUE(small_budget.ok()) << small_budget.status();
  EXPECT_LT(small_budget->steps, cal->steps);
  for (const auto& r : run->records) short_steps += r.prompt_tokens <= 40 ? 1 : 0;
  EXPECT_LE(small_budget->steps, short_steps);
  EXPECT_NEAR(small_budget->step_time_scale, 1.3, 0.03);
}

// The same with a shared-prefix workload served from the prefix cache: each request's cached
// tokens are in the CSV, so its shorter prefill is predicted as such and the slowdown is still
// recovered; without that column the cache hits read as faster steps.
TEST_F(CalibrationTest, CachedPromptTokensAreNotReadAsFasterSteps) {
  client::DatasetOptions d;
  d.kind = client::DatasetKind::kChatbot;
  d.length_scale = 0.125;
  d.num_requests = 300;
  d.seed = 4;
  d.shared_prefix_len = 256;
  d.num_shared_prefixes = 3;
  client::ArrivalOptions a;
  a.rate = 8;
  a.seed = 4;
  auto reqs = MakeSimWorkload(d, a);
  ASSERT_TRUE(reqs.ok()) << reqs.status();
  SimConfig c;
  c.kv_shape = {2, 2, 16, 4};
  c.slo.ttft_ms = 250;
  const LatencyModel model = PrefillModel();
  auto run = Simulate(c, model.Scaled(1.3), *reqs);
  ASSERT_TRUE(run.ok()) << run.status();
  int64_t cached = 0;
  for (const auto& r : run->records) cached += r.cached_prompt_tokens;
  EXPECT_GT(cached, 250 * 256) << "most requests start after their cached prefix";
  const std::string csv = client::RequestsCsv(run->records, c.slo);
  auto rows = ReadRunCsv(Write("cached.csv", csv));
  ASSERT_TRUE(rows.ok()) << rows.status();
  auto cal = Calibrate(model, *rows, 2048);
  ASSERT_TRUE(cal.ok()) << cal.status();
  EXPECT_NEAR(cal->step_time_scale, 1.3, 0.02);
  // Without the column (a CSV from before it existed, which ended with it; the conversation
  // and turn columns came later): the hits look like fast steps.
  std::string old_csv;
  for (absl::string_view line : absl::StrSplit(csv, '\n')) {
    if (line.empty()) continue;
    for (int column = 0; column < 3; ++column) line = line.substr(0, line.rfind(','));
    absl::StrAppend(&old_csv, line, "\n");
  }
  auto old_rows = ReadRunCsv(Write("old.csv", old_csv));
  ASSERT_TRUE(old_rows.ok()) << old_rows.status();
  auto old_cal = Calibrate(model, *old_rows, 2048);
  ASSERT_TRUE(old_cal.ok()) << old_cal.status();
  EXPECT_LT(old_cal->step_time_scale, 0.8);
}

TEST_F(CalibrationTest, ReadsColumnsByNameAndFailsClearly) {
  // Columns in another order, an absent relay column, a failed request.
  const std::string csv =
      "prefill_ms,prompt_tokens,send_s,ok,dispatch_ms\n"
      "20.000,20,0.0,1,3.0\n"
      "30.000,40,1.0,1,\n"
      ",10,2.0,0,\n";
  auto rows = ReadRunCsv(Write("a.csv", csv), 4);
  ASSERT_TRUE(rows.ok()) << rows.status();
  ASSERT_EQ(rows->size(), 3u);
  EXPECT_EQ((*rows)[0].source, 4);
  EXPECT_DOUBLE_EQ((*rows)[0].prefill_ms, 20);
  EXPECT_EQ((*rows)[1].prompt_tokens, 40);
  EXPECT_DOUBLE_EQ((*rows)[0].dispatch_ms, 3);
  EXPECT_DOUBLE_EQ((*rows)[1].dispatch_ms, -1);
  EXPECT_DOUBLE_EQ((*rows)[0].relay_ms, -1);
  EXPECT_FALSE((*rows)[2].ok);
  EXPECT_TRUE((*rows)[1].ok);

  // Too few steps to calibrate.
  auto cal = Calibrate(PrefillModel(), *rows, 2048);
  ASSERT_FALSE(cal.ok());
  EXPECT_EQ(cal.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_NE(cal.status().message().find("2 completed requests"), std::string::npos) << cal.status();

  auto missing = ReadRunCsv((dir_ / "nope.csv").string());
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kNotFound);
  auto no_column = ReadRunCsv(Write("b.csv", "send_s,prompt_tokens\n0,1\n"));
  EXPECT_EQ(no_column.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(no_column.status().message().find("prefill_ms"), std::string::npos);
  auto bad_number = ReadRunCsv(Write("c.csv", "send_s,prompt_tokens,prefill_ms\n0,1,x\n"));
  EXPECT_EQ(bad_number.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(bad_number.status().message().find("c.csv:2"), std::string::npos)
      << bad_number.status();
  auto ragged = ReadRunCsv(Write("d.csv", "send_s,prompt_tokens,prefill_ms\n0,1\n"));
  EXPECT_EQ(ragged.status().code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace pds::scheduler

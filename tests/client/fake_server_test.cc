// pdbench against a fake pdserve.v1.Serving server on 127.0.0.1 whose latencies and failures
// are scripted per request: the run loop pdbench uses must measure the scripted TTFT and TPOT
// (within timer resolution), count errors by code exactly, and compute attainment and goodput
// from them; open loop must send on schedule regardless of completions, closed loop must hold
// its concurrency, deadlines must cancel, and the pdbench command line must write its reports.
#include <algorithm>
#include <atomic>
#include <chrono>
#include <fstream>
#include <map>
#include <mutex>
#include <thread>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "client/bench_runner.h"
#include "client/multi_client.h"
#include "client/pdbench.h"
#include "client/serving_client.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "pdserve/v1/serving.grpc.pb.h"
#include "tests/testing/test_util.h"

namespace pds::client {
namespace {

using pdserve::v1::GenerateRequest;
using pdserve::v1::GenerateResponse;

// Timer tolerance: this machine is shared and slow, so measured latencies may exceed the
// script by scheduling delays (never fall short of it by more than clock granularity).
constexpr double kTolMs = 10;

// What the fake server does with request `index` (the number after the last '-' of its id).
struct Script {
  double ttft_ms = 40;
  double itl_ms = 10;
  // Fail before any token with this code (OK: no failure).
  grpc::StatusCode fail_code = grpc::StatusCode::OK;
  // Fail with `fail_code` after this many tokens (-1: before any).
  int fail_after_tokens = -1;
  std::string finish_reason = "length";
  double hang_ms = 0;  // > 0: sleep this long (cancellable) before the first token
};

class FakeServing final : public pdserve::v1::Serving::Service {
 public:
  std::function<Script(int64_t index)> script = [](int64_t) { return Script(); };
  std::atomic<bool> status_unimplemented{false};  // a server without GetClusterStatus
  std::atomic<bool> ready{false};                 // ClusterStatus.ready

  int max_inflight() const { return max_inflight_.load(); }
  int cancelled() const { return cancelled_.load(); }
  int64_t received() const { return received_.load(); }
  std::vector<GenerateRequest> requests() {
    std::lock_guard<std::mutex> lock(mu_);
    return requests_;
  }

  grpc::Status GetClusterStatus(grpc::ServerContext*, const pdserve::v1::ClusterStatusRequest*,
                                pdserve::v1::ClusterStatus* out) override {
    if (status_unimplemented) return grpc::Status(grpc::StatusCode::UNIMPLEMENTED, "no status");
    out->set_model("fake-model");
    out->set_ready(ready);
    return grpc::Status::OK;
  }

  grpc::Status Generate(grpc::ServerContext* ctx, const GenerateRequest* req,
                        grpc::ServerWriter<GenerateResponse>* writer) override {
    const auto start = std::chrono::steady_clock::now();
    ++received_;
    {
      std::lock_guard<std::mutex> lock(mu_);
      requests_.push_back(*req);
    }
    int now_inflight = ++inflight_;
    int prev = max_inflight_.load();
    while (now_inflight > prev && !max_inflight_.compare_exchange_weak(prev, now_inflight)) {
    }
    grpc::Status status = Serve(ctx, *req, writer, start);
    --inflight_;
    return status;
  }

 private:
  // Sleeps until `start + ms`, waking early (false) when the call is cancelled.
  bool SleepUntil(grpc::ServerContext* ctx, std::chrono::steady_clock::time_point start,
                  double ms) {
    auto until = start + std::chrono::microseconds(static_cast<int64_t>(ms * 1000));
    while (std::chrono::steady_clock::now() < until) {
      if (ctx->IsCancelled()) {
        ++cancelled_;
        return false;
      }
      auto next = std::min(until, std::chrono::steady_clock::now() + std::chrono::milliseconds(5));
      std::this_thread::sleep_until(next);
    }
    return true;
  }

  grpc::Status Serve(grpc::ServerContext* ctx, const GenerateRequest& req,
                     grpc::ServerWriter<GenerateResponse>* writer,
                     std::chrono::steady_clock::time_point start) {
    int64_t index = -1;
    std::vector<std::string> parts = absl::StrSplit(req.request_id(), '-');
    if (parts.empty() || !absl::SimpleAtoi(parts.back(), &index)) {
      return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "request id without an index");
    }
    const Script s = script(index);
    if (s.hang_ms > 0 && !SleepUntil(ctx, start, s.hang_ms)) {
      return grpc::Status(grpc::StatusCode::CANCELLED, "cancelled");
    }
    if (s.fail_code != grpc::StatusCode::OK && s.fail_after_tokens < 0) {
      return grpc::Status(s.fail_code, "scripted failure");
    }
    const int n = req.max_tokens();
    const int64_t base_us = 1'700'000'000'000'000;
    for (int k = 0; k < n; ++k) {
      if (s.fail_code != grpc::StatusCode::OK && k == s.fail_after_tokens) {
        return grpc::Status(s.fail_code, "scripted failure mid-stream");
      }
      if (!SleepUntil(ctx, start, s.ttft_ms + k * s.itl_ms)) {
        return grpc::Status(grpc::StatusCode::CANCELLED, "cancelled");
      }
      GenerateResponse msg;
      msg.set_request_id(req.request_id());
      msg.add_token_ids(100 + k);
      msg.set_text("x");
      if (k == n - 1) {
        auto* done = msg.mutable_done();
        done->set_finish_reason(s.finish_reason);
        done->set_prompt_tokens(req.prompt_token_ids_size());
        done->set_completion_tokens(n);
        auto* t = done->mutable_timeline();
        t->set_arrival_us(base_us);
        t->set_queued_us(base_us + 1000);
        t->set_prefill_start_us(base_us + 3000);  // queue 2 ms
        t->set_prefill_end_us(base_us + 8000);    // prefill 5 ms
        t->set_first_token_us(base_us + 9000);
        t->set_decode_start_us(base_us + 10000);
        t->set_finish_us(base_us + 30000);  // decode 20 ms
      }
      if (!writer->Write(msg)) return grpc::Status(grpc::StatusCode::CANCELLED, "gone");
    }
    return grpc::Status::OK;
  }

  std::atomic<int> inflight_{0};
  std::atomic<int> max_inflight_{0};
  std::atomic<int> cancelled_{0};
  std::atomic<int64_t> received_{0};
  std::mutex mu_;
  std::vector<GenerateRequest> requests_;
};

class PdbenchFakeServerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    grpc::ServerBuilder builder;
    builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &port_);
    builder.RegisterService(&service_);
    server_ = builder.BuildAndStart();
    ASSERT_NE(server_, nullptr);
    ASSERT_GT(port_, 0);
    target_ = absl::StrCat("127.0.0.1:", port_);
  }
  void TearDown() override {
    if (server_) server_->Shutdown(std::chrono::system_clock::now() + std::chrono::seconds(2));
  }

  std::vector<RequestSpec> Specs(int n, int prompt_len, int output_len) {
    DatasetOptions d;
    d.num_requests = n;
    d.input_len = prompt_len;
    d.output_len = output_len;
    auto specs = BuildDataset(d);
    EXPECT_TRUE(specs.ok());
    return *specs;
  }

  // Every request: first token after `ttft_ms`, then one every `itl_ms`.
  void ScriptFixed(int ttft_ms, int itl_ms) {
    service_.script = [ttft_ms, itl_ms](int64_t) {
      Script s;
      s.ttft_ms = ttft_ms;
      s.itl_ms = itl_ms;
      return s;
    };
  }
  // `n` arrivals at a constant `rate` (requests/s) from 0.
  static std::vector<double> ConstantArrivals(double rate, int n) {
    ArrivalOptions a;
    a.kind = ArrivalKind::kConstant;
    a.rate = rate;
    auto times = ArrivalTimes(a, n);
    EXPECT_TRUE(times.ok());
    return *times;
  }

  FakeServing service_;
  std::unique_ptr<grpc::Server> server_;
  int port_ = 0;
  std::string target_;
};

TEST_F(PdbenchFakeServerTest, ScriptedLatenciesFailuresAttainmentAndGoodput) {
  // 20 requests of 8 tokens, constant 40 req/s. Per index:
  //   i % 5 == 1: TTFT 120 ms (misses the 80 ms TTFT SLO)
  //   i % 5 == 2: ITL 30 ms (misses the 20 ms TPOT SLO)
  //   i == 3, 13: RESOURCE_EXHAUSTED before any token; i == 8: INTERNAL after 2 tokens
  //   i == 9: finish_reason "error" (OK status); others: TTFT 40 ms, ITL 10 ms.
  service_.script = [](int64_t i) {
    Script s;
    if (i % 5 == 1) s.ttft_ms = 120;
    if (i % 5 == 2) s.itl_ms = 30;
    if (i == 3 || i == 13) s.fail_code = grpc::StatusCode::RESOURCE_EXHAUSTED;
    if (i == 8) {
      s.fail_code = grpc::StatusCode::INTERNAL;
      s.fail_after_tokens = 2;
    }
    if (i == 9) s.finish_reason = "error";
    return s;
  };
  const int n = 20, tokens = 8;
  ServingClient client(target_);
  ASSERT_TRUE(client.WaitForConnected(absl::Seconds(5)).ok());
  RunOptions o;
  o.arrivals = ConstantArrivals(40, n);
  o.slo = SloTargets{80, 20};
  o.request_id_prefix = "test";
  o.request_timeout_s = 10;
  int progress_calls = 0;
  o.progress = [&](const RunProgress&) { ++progress_calls; };
  o.progress_interval_s = 0.1;
  auto result = RunBenchmark(client, Specs(n, 16, tokens), o);
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_TRUE(result->contacted);
  EXPECT_GT(progress_calls, 0);
  ASSERT_EQ(result->records.size(), static_cast<size_t>(n));

  // The requests carried the forced length and the SLO hints.
  for (const GenerateRequest& req : service_.requests()) {
    EXPECT_EQ(req.max_tokens(), tokens);
    EXPECT_TRUE(req.ignore_eos());
    EXPECT_EQ(req.prompt_token_ids_size(), 16);
    // What is left of the TTFT target when sent (at most 30 ms late, see below).
    EXPECT_LE(req.ttft_slo_ms(), 80);
    EXPECT_GE(req.ttft_slo_ms(), 50);
    EXPECT_DOUBLE_EQ(req.tpot_slo_ms(), 20);
  }

  int expected_good = 0;
  for (const RequestRecord& r : result->records) {
    SCOPED_TRACE(r.index);
    const int64_t i = r.index;
    // Open loop: on schedule, never early; late only by the machine's scheduling (30 ms is
    // generous on a loaded CI machine yet far below what waiting for replies would add).
    EXPECT_GE(r.send_s, i / 40.0 - 0.002);
    EXPECT_LE(r.send_s, i / 40.0 + 0.030);
    if (i == 3 || i == 13) {
      EXPECT_FALSE(r.ok);
      EXPECT_EQ(r.error_code, "RESOURCE_EXHAUSTED");
      continue;
    }
    if (i == 8) {
      EXPECT_FALSE(r.ok);
      EXPECT_EQ(r.error_code, "INTERNAL");
      EXPECT_EQ(r.OutputTokens(), 2);
      continue;
    }
    if (i == 9) {
      EXPECT_FALSE(r.ok);
      EXPECT_EQ(r.error_code, "FINISH_ERROR");
      continue;
    }
    ASSERT_TRUE(r.ok) << r.error_code << " " << r.error_message;
    const double ttft = i % 5 == 1 ? 120 : 40;
    const double itl = i % 5 == 2 ? 30 : 10;
    EXPECT_EQ(r.OutputTokens(), tokens);
    EXPECT_GE(r.TtftS() * 1000, ttft - 1);
    EXPECT_LE(r.TtftS() * 1000, ttft + 3 * kTolMs);
    EXPECT_NEAR(r.TpotS() * 1000, itl, kTolMs / 2);
    EXPECT_NEAR(r.E2elS() * 1000, ttft + (tokens - 1) * itl, 3 * kTolMs);
    EXPECT_EQ(r.prompt_tokens, 16);
    EXPECT_TRUE(r.has_timeline);
    const bool good = ttft <= 80 && itl <= 20;
    EXPECT_EQ(MeetsSlo(r, o.slo), good);
    expected_good += good;
  }
  // 20 - 4 failed = 16 completed; of those i%5==1 (1, 6, 11, 16) and i%5==2 (2, 7, 12, 17)
  // miss: 8 good.
  EXPECT_EQ(expected_good, 8);

  BenchMetrics m = ComputeMetrics(result->records, result->duration_s, o.slo);
  EXPECT_EQ(m.completed, 16);
  EXPECT_EQ(m.failed, 4);
  EXPECT_EQ(m.errors, (std::map<std::string, int64_t>{
                          {"FINISH_ERROR", 1}, {"INTERNAL", 1}, {"RESOURCE_EXHAUSTED", 2}}));
  EXPECT_EQ(m.good, 8);
  EXPECT_DOUBLE_EQ(m.slo_attainment, 8.0 / 20.0);
  EXPECT_DOUBLE_EQ(m.request_goodput, 8.0 / result->duration_s);
  // The run ends with the last stream: request 17 (ITL 30 ms: 40 + 7 * 30 ms) sent at 17/40 s.
  EXPECT_NEAR(result->duration_s, 17 / 40.0 + 0.250, 3 * kTolMs / 1000);
  // TTFT: 4 of 16 completed at 120 ms, 12 at 40 ms -> median 40, mean 60.
  EXPECT_NEAR(m.ttft_ms.median, 40, kTolMs);
  EXPECT_NEAR(m.ttft_ms.mean, 60, kTolMs);
  // TPOT: 4 at 30 ms, 12 at 10 ms -> mean 15, p90 30.
  EXPECT_NEAR(m.tpot_ms.mean, 15, kTolMs / 2);
  EXPECT_NEAR(m.tpot_ms.p90, 30, kTolMs / 2);
  // Server timeline: exact from the scripted Done.
  EXPECT_DOUBLE_EQ(m.queue_ms.mean, 2);
  EXPECT_DOUBLE_EQ(m.prefill_ms.mean, 5);
  EXPECT_DOUBLE_EQ(m.decode_ms.mean, 20);
  EXPECT_EQ(m.transfer_ms.count, 0);
}

TEST_F(PdbenchFakeServerTest, OpenLoopSendsOnScheduleAndBoundsInflight) {
  // Requests last ~300 ms but arrive every 50 ms: an open loop overlaps them.
  ScriptFixed(100, 100);
  ServingClient client(target_);
  RunOptions o;
  o.arrivals = ConstantArrivals(20, 6);
  o.request_id_prefix = "open";
  auto result = RunBenchmark(client, Specs(6, 4, 3), o);
  ASSERT_TRUE(result.ok()) << result.status();
  int64_t late = 0;
  for (const RequestRecord& r : result->records) {
    EXPECT_TRUE(r.ok);
    // On schedule, never early; late only by the machine's scheduling (a closed loop would
    // be 250 ms late).
    EXPECT_GE(r.send_s, r.index * 0.05 - 0.002);
    EXPECT_LE(r.send_s, r.index * 0.05 + 0.030);
    if (r.send_s - r.index * 0.05 > 0.010) ++late;
  }
  EXPECT_GE(service_.max_inflight(), 5);
  EXPECT_EQ(result->late_sends, late);  // counted as sent more than 10 ms after their time
}

// Multi-turn conversations: a later turn goes out a think time after the previous turn's
// answer ended, with the previous prompt, the answer's tokens and its own message (less the
// shared prefix every spec starts with); a failed turn ends its conversation, and so does a
// turn whose context would pass max_model_len.
TEST_F(PdbenchFakeServerTest, ConversationsCarryTheAnswersIntoTheNextTurn) {
  ScriptFixed(20, 5);  // 3 tokens (100, 101, 102) in about 30 ms
  // Send order: conversation 0's three turns (done by ~0.2 s), then conversation 1's (from
  // 1 s), whose second turn (request 4) fails.
  service_.script = [](int64_t index) {
    Script s;
    s.ttft_ms = 20;
    s.itl_ms = 5;
    if (index == 4) s.fail_code = grpc::StatusCode::INTERNAL;
    return s;
  };
  DatasetOptions d;
  d.num_requests = 6;
  d.input_len = 8;
  d.output_len = 3;
  d.shared_prefix_len = 4;
  auto specs = BuildDataset(d);
  ASSERT_TRUE(specs.ok()) << specs.status();
  ServingClient client(target_);
  RunOptions o;
  o.arrivals = {0.0, 1.0};
  o.turns = 3;
  o.think_time_s = 0.05;
  o.follow_up_skip = 4;
  o.request_id_prefix = "chat";
  auto result = RunBenchmark(client, *specs, o);
  ASSERT_TRUE(result.ok()) << result.status();
  ASSERT_EQ(result->records.size(), 5u) << "the failed turn ends its conversation";
  const std::vector<int32_t> answer = {100, 101, 102};
  const auto own = [&](int k) {  // spec k's message after the shared prefix
    return std::vector<int32_t>((*specs)[k].prompt_token_ids.begin() + 4,
                                (*specs)[k].prompt_token_ids.end());
  };
  std::vector<std::vector<int32_t>> want(5);
  want[0] = (*specs)[0].prompt_token_ids;
  want[3] = (*specs)[3].prompt_token_ids;
  for (int i : {1, 2, 4}) {
    want[i] = want[i - 1];
    want[i].insert(want[i].end(), answer.begin(), answer.end());
    const std::vector<int32_t> message = own(i);  // spec c * 3 + k is turn k of c
    want[i].insert(want[i].end(), message.begin(), message.end());
  }
  const std::vector<GenerateRequest> got = service_.requests();
  ASSERT_EQ(got.size(), 5u);
  for (int i = 0; i < 5; ++i) {
    const GenerateRequest& r = got[i];
    EXPECT_EQ(r.request_id(), absl::StrCat("chat-", i));
    EXPECT_EQ(std::vector<int32_t>(r.prompt_token_ids().begin(), r.prompt_token_ids().end()),
              want[i])
        << i;
    const RequestRecord& rec = result->records[i];
    EXPECT_EQ(rec.conversation, i < 3 ? 0 : 1) << i;
    EXPECT_EQ(rec.turn, i % 3) << i;
    EXPECT_EQ(rec.ok, i != 4) << i;
    if (rec.turn > 0) {
      const RequestRecord& before = result->records[i - 1];
      EXPECT_NEAR(rec.scheduled_s, before.end_s + 0.05, 1e-9) << i;
      EXPECT_GE(rec.send_s, rec.scheduled_s - 1e-6) << i;
    }
  }
  EXPECT_NEAR(result->records[3].scheduled_s, 1.0, 1e-9);

  // Two conversations at once: their turns interleave, each carrying its own history.
  RunOptions overlapping = o;
  overlapping.arrivals = {0.0, 0.01};
  overlapping.request_id_prefix = "both";
  service_.script = [](int64_t) { return Script(); };
  const size_t before = service_.requests().size();
  auto both = RunBenchmark(client, *specs, overlapping);
  ASSERT_TRUE(both.ok()) << both.status();
  ASSERT_EQ(both->records.size(), 6u);
  const std::vector<GenerateRequest> sent = service_.requests();
  std::map<std::pair<int64_t, int32_t>, std::vector<int32_t>> prompts;  // (conversation, turn)
  for (const RequestRecord& rec : both->records) {
    ASSERT_TRUE(rec.ok);
    const GenerateRequest& r = sent[before + rec.index];
    ASSERT_EQ(r.request_id(), absl::StrCat("both-", rec.index));
    prompts[{rec.conversation, rec.turn}] = {r.prompt_token_ids().begin(),
                                             r.prompt_token_ids().end()};
  }
  for (int64_t c : {0, 1}) {
    std::vector<int32_t> history = (*specs)[c * 3].prompt_token_ids;
    EXPECT_EQ(prompts[std::make_pair(c, 0)], history);
    for (int32_t turn : {1, 2}) {
      history.insert(history.end(), answer.begin(), answer.end());
      const std::vector<int32_t> message = own(static_cast<int>(c * 3 + turn));
      history.insert(history.end(), message.begin(), message.end());
      EXPECT_EQ(prompts[std::make_pair(c, turn)], history) << c << " " << turn;
    }
  }

  // A context cap of 26 tokens: turn 1 (12 + 3 + 8 prompt tokens, 3 out) fits, turn 2 not.
  RunOptions capped = o;
  capped.arrivals = {0.0};
  capped.max_model_len = 26;
  capped.request_id_prefix = "capped";
  service_.script = [](int64_t) { return Script(); };
  auto short_run = RunBenchmark(client, *specs, capped);
  ASSERT_TRUE(short_run.ok()) << short_run.status();
  ASSERT_EQ(short_run->records.size(), 2u);
  EXPECT_EQ(short_run->records[1].prompt_tokens, 23);
  // Multi-turn runs are open loop at a finite rate.
  RunOptions closed = o;
  closed.concurrency = 2;
  EXPECT_EQ(RunBenchmark(client, *specs, closed).status().code(),
            absl::StatusCode::kInvalidArgument);
}

// A multi-turn run that ends (duration) while turns are due but held back by the in-flight
// bound records them as NOT_SENT: every conversation shows up, each with its turns sent and
// then at most the one that was due.
TEST_F(PdbenchFakeServerTest, MultiTurnTurnsDueButNeverSentCountAsFailed) {
  ScriptFixed(100, 10);  // 2 tokens: ~110 ms a turn, one at a time
  ServingClient client(target_);
  RunOptions o;
  o.arrivals = {0.0, 0.02, 0.04};
  o.turns = 3;
  o.max_inflight = 1;
  o.duration_s = 0.3;
  o.request_id_prefix = "held";
  auto result = RunBenchmark(client, Specs(9, 4, 2), o);
  ASSERT_TRUE(result.ok()) << result.status();
  std::map<int64_t, std::vector<const RequestRecord*>> by_conversation;
  int not_sent = 0;
  for (const RequestRecord& r : result->records) {
    by_conversation[r.conversation].push_back(&r);
    if (r.error_code == "NOT_SENT") {
      ++not_sent;
      EXPECT_LT(r.scheduled_s, 0.3);
    } else {
      EXPECT_TRUE(r.ok) << r.error_code;
    }
  }
  EXPECT_GE(not_sent, 1) << "9 turns of ~110 ms, one at a time, do not fit in 0.3 s";
  ASSERT_EQ(by_conversation.size(), 3u);
  for (const auto& [c, records] : by_conversation) {
    int32_t sent = 0, unsent = 0;
    for (const RequestRecord* r : records) {
      if (r->error_code == "NOT_SENT") {
        EXPECT_EQ(r->turn, sent) << "the turn after those sent";
        ++unsent;
      } else {
        EXPECT_EQ(r->turn, sent);
        ++sent;
      }
    }
    EXPECT_LE(unsent, 1) << c;
  }
}

TEST_F(PdbenchFakeServerTest, OpenLoopBoundsCallsInFlight) {
  // The same schedule with at most 2 calls in flight: later sends wait for a slot.
  ScriptFixed(100, 100);
  ServingClient client(target_);
  RunOptions o;
  o.arrivals = ConstantArrivals(20, 6);
  o.request_id_prefix = "bounded";
  o.max_inflight = 2;
  o.slo = SloTargets{400, -1};
  auto bounded = RunBenchmark(client, Specs(6, 4, 3), o);
  ASSERT_TRUE(bounded.ok());
  EXPECT_EQ(service_.max_inflight(), 2);
  EXPECT_GT(bounded->late_sends, 0);
  // A call held back by the bound counts its wait: TTFT and E2E latency run from the arrival
  // (request 2, due at 100 ms, goes out when request 0 ends near 300 ms: TTFT about 300 ms,
  // not the server's 100 ms).
  double max_lag = 0;
  for (const RequestRecord& r : bounded->records) {
    EXPECT_TRUE(r.ok);
    EXPECT_DOUBLE_EQ(r.scheduled_s, r.index * 0.05);
    EXPECT_NEAR(r.TtftS() * 1000, r.SendLagS() * 1000 + 100, 3 * kTolMs);
    EXPECT_NEAR(r.E2elS() * 1000, r.SendLagS() * 1000 + 300, 3 * kTolMs);
    max_lag = std::max(max_lag, r.SendLagS());
  }
  EXPECT_GT(max_lag, 0.150);
  // The TTFT hint each carried was what its wait had left of the 400 ms target (1 us for
  // those it had used up).
  for (const GenerateRequest& req : service_.requests()) {
    for (const RequestRecord& r : bounded->records) {
      if (req.request_id() == absl::StrCat("bounded-", r.index)) {
        EXPECT_NEAR(req.ttft_slo_ms(), std::max(400 - 1000 * r.SendLagS(), 1e-3), 1e-6) << r.index;
      }
    }
  }
  BenchMetrics m = ComputeMetrics(bounded->records, bounded->duration_s, SloTargets{200, -1});
  EXPECT_LT(m.slo_attainment, 0.7);          // the late ones miss a 200 ms TTFT target
  EXPECT_NEAR(m.tpot_ms.mean, 100, kTolMs);  // the wait is not spread over the tokens
  const std::string csv = RequestsCsv(bounded->records, SloTargets{});
  EXPECT_EQ(csv.rfind("index,ok,error_code,send_s,scheduled_s,ttft_ms,", 0), 0u) << csv;
}

// --rate inf (every request due at once, the in-flight bound the only pacing) measures from
// each send, as vLLM does: no late sends, TTFT the server's.
TEST_F(PdbenchFakeServerTest, BurstLatenciesCountFromTheSend) {
  ScriptFixed(100, 100);
  ServingClient client(target_);
  RunOptions o;
  o.arrivals = std::vector<double>(6, 0.0);
  o.burst = true;
  o.max_inflight = 2;
  o.slo = SloTargets{150, -1};
  o.request_id_prefix = "burst";
  auto result = RunBenchmark(client, Specs(6, 4, 3), o);
  ASSERT_TRUE(result.ok()) << result.status();
  EXPECT_EQ(result->late_sends, 0);
  double last_send = 0;
  for (const RequestRecord& r : result->records) {
    EXPECT_TRUE(r.ok);
    EXPECT_DOUBLE_EQ(r.scheduled_s, r.send_s);
    EXPECT_NEAR(r.TtftS() * 1000, 100, 3 * kTolMs);
    last_send = std::max(last_send, r.send_s);
  }
  EXPECT_GT(last_send, 0.5);  // the last pair waited for two earlier ones
  for (const GenerateRequest& req : service_.requests()) EXPECT_DOUBLE_EQ(req.ttft_slo_ms(), 150);
  EXPECT_EQ(ComputeMetrics(result->records, result->duration_s, o.slo).good, 6);
}

TEST_F(PdbenchFakeServerTest, RequestsDueButNeverSentBeforeTheDurationCountAsFailed) {
  // One call at a time, each about 400 ms, arrivals every 50 ms for 0.5 s: most of the 10
  // requests due in that time cannot be sent. They are failures (NOT_SENT), not left out: the
  // attainment counts what the schedule offered, not just what the client managed to send.
  ScriptFixed(100, 100);
  ServingClient client(target_);
  RunOptions o;
  o.arrivals = ConstantArrivals(20, 20);  // 50 ms apart, 1 s of arrivals
  o.duration_s = 0.5;
  o.max_inflight = 1;
  o.request_id_prefix = "unsent";
  auto result = RunBenchmark(client, Specs(4, 4, 4), o);
  ASSERT_TRUE(result.ok()) << result.status();
  ASSERT_EQ(result->records.size(), 10u);  // due at 0, 0.05, ..., 0.45
  int64_t unsent = 0;
  for (const RequestRecord& r : result->records) unsent += r.error_code == "NOT_SENT";
  EXPECT_GE(unsent, 7);
  BenchMetrics m = ComputeMetrics(result->records, result->duration_s, SloTargets{});
  EXPECT_LT(m.slo_attainment, 0.5);
  EXPECT_EQ(m.errors.at("NOT_SENT"), unsent);
}

TEST_F(PdbenchFakeServerTest, ClosedLoopHoldsConcurrency) {
  ScriptFixed(30, 10);
  ServingClient client(target_);
  RunOptions o;
  o.concurrency = 3;
  o.max_requests = 12;
  o.request_id_prefix = "closed";
  auto result = RunBenchmark(client, Specs(5, 4, 4), o);  // 5 specs, cycled
  ASSERT_TRUE(result.ok()) << result.status();
  ASSERT_EQ(result->records.size(), 12u);
  for (const RequestRecord& r : result->records) EXPECT_TRUE(r.ok) << r.error_code;
  EXPECT_EQ(service_.max_inflight(), 3);
  EXPECT_EQ(service_.received(), 12);
  // 12 requests of ~60 ms, 3 at a time: about 4 rounds.
  EXPECT_GT(result->duration_s, 0.2);
  EXPECT_LT(result->duration_s, 1.5);
}

TEST_F(PdbenchFakeServerTest, DeadlineCancelsAndDurationStopsSending) {
  service_.script = [](int64_t i) {
    Script s;
    s.ttft_ms = 20;
    s.itl_ms = 5;
    if (i == 1) s.hang_ms = 5000;
    return s;
  };
  ServingClient client(target_);
  RunOptions o;
  o.arrivals = ConstantArrivals(10, 100);  // 10 s of arrivals, but...
  o.duration_s = 0.45;                     // ...only those before 0.45 s are sent
  o.request_timeout_s = 0.3;
  o.request_id_prefix = "deadline";
  const auto t0 = std::chrono::steady_clock::now();
  auto result = RunBenchmark(client, Specs(4, 4, 2), o);
  const double wall = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  ASSERT_TRUE(result.ok()) << result.status();
  ASSERT_EQ(result->records.size(), 5u);  // 0, 0.1, 0.2, 0.3, 0.4
  EXPECT_LT(wall, 2.0);
  BenchMetrics m = ComputeMetrics(result->records, result->duration_s, SloTargets{});
  EXPECT_EQ(m.completed, 4);
  EXPECT_EQ(m.errors, (std::map<std::string, int64_t>{{"DEADLINE_EXCEEDED", 1}}));
  EXPECT_NEAR(result->records[1].end_s - result->records[1].send_s, 0.3, 0.05);
  // The server saw the cancellation.
  for (int i = 0; i < 100 && service_.cancelled() == 0; ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
  }
  EXPECT_EQ(service_.cancelled(), 1);
}

TEST_F(PdbenchFakeServerTest, ClientCancelAndBlockingGenerate) {
  ScriptFixed(10, 10);
  ServingClient client(target_);
  auto cluster = client.GetClusterStatus(absl::Seconds(5));
  ASSERT_TRUE(cluster.ok()) << cluster.status();
  EXPECT_EQ(cluster->model(), "fake-model");

  GenerateRequest req;
  req.set_request_id("blocking-0");
  req.add_prompt_token_ids(5);
  req.set_max_tokens(3);
  auto stream = client.Generate(req, absl::Seconds(5));
  EXPECT_TRUE(stream.status.ok()) << stream.status.error_message();
  ASSERT_EQ(stream.messages.size(), 3u);
  EXPECT_TRUE(stream.messages.back().has_done());
  EXPECT_LE(stream.times[0], stream.times[1]);

  req.set_request_id("cancel-1");
  req.set_max_tokens(1000);  // 10 s of tokens
  std::atomic<int> messages{0};
  grpc::StatusCode code = grpc::StatusCode::OK;
  GenerateCallbacks cb;
  cb.on_message = [&](const GenerateResponse&, Clock::time_point) { ++messages; };
  cb.on_done = [&](const grpc::Status& s, Clock::time_point) { code = s.error_code(); };
  auto call = client.StartGenerate(req, absl::Seconds(30), cb);
  while (messages.load() < 2) std::this_thread::sleep_for(std::chrono::milliseconds(5));
  call->Cancel();
  ASSERT_TRUE(call->WaitFor(absl::Seconds(5)));
  EXPECT_EQ(code, grpc::StatusCode::CANCELLED);
  EXPECT_LT(messages.load(), 100);
}

// An infinite timeout means no deadline (it used to overflow into one already past), and the
// client talks to its target only, whatever http_proxy says.
TEST_F(PdbenchFakeServerTest, ClientInfiniteTimeoutsAndNoProxy) {
  ScriptFixed(10, 10);
  setenv("http_proxy", "http://127.0.0.1:1", 1);  // a proxy that refuses every connection
  setenv("grpc_proxy", "http://127.0.0.1:1", 1);
  {
    ServingClient client(target_);
    EXPECT_TRUE(client.WaitForConnected(absl::InfiniteDuration()).ok());
    GenerateRequest req;
    req.set_request_id("infinite-0");
    req.add_prompt_token_ids(5);
    req.set_max_tokens(3);
    auto stream = client.Generate(req, absl::InfiniteDuration());
    EXPECT_TRUE(stream.status.ok()) << stream.status.error_message();
    EXPECT_EQ(stream.messages.size(), 3u);
    req.set_request_id("infinite-1");
    auto call = client.StartGenerate(req, absl::InfiniteDuration(), GenerateCallbacks{});
    EXPECT_TRUE(call->WaitFor(absl::InfiniteDuration()));
    // So is a huge finite one (--request-timeout 1e10), which overflowed the same way.
    req.set_request_id("huge-0");
    auto huge = client.Generate(req, absl::Seconds(1e10));
    EXPECT_TRUE(huge.status.ok()) << huge.status.error_message();
    EXPECT_EQ(huge.messages.size(), 3u);
    req.set_request_id("huge-1");
    auto huge_call = client.StartGenerate(req, absl::Seconds(1e10), GenerateCallbacks{});
    EXPECT_TRUE(huge_call->WaitFor(absl::Seconds(1e10)));
  }
  unsetenv("http_proxy");
  unsetenv("grpc_proxy");
}

// A stream that ends OK without its final Done message was cut short: a failure (NO_DONE),
// not a completed request with fewer tokens.
TEST_F(PdbenchFakeServerTest, StreamWithoutDoneIsAFailure) {
  service_.script = [](int64_t) {
    Script s;
    s.ttft_ms = 5;
    s.itl_ms = 5;
    s.finish_reason = "";
    return s;
  };
  ServingClient client(target_);
  RunOptions o;
  o.arrivals = ConstantArrivals(100, 2);
  o.request_id_prefix = "nodone";
  auto result = RunBenchmark(client, Specs(2, 4, 3), o);
  ASSERT_TRUE(result.ok()) << result.status();
  ASSERT_EQ(result->records.size(), 2u);
  for (const RequestRecord& r : result->records) {
    EXPECT_FALSE(r.ok);
    EXPECT_EQ(r.error_code, "NO_DONE");
  }
}

std::string ReadAll(const std::string& path) {
  std::ifstream in(path);
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

int RunPdbench(std::vector<std::string> args) {
  args.insert(args.begin(), "pdbench");
  std::vector<char*> argv;
  for (auto& a : args) argv.push_back(a.data());
  return PdbenchMain(static_cast<int>(argv.size()), argv.data());
}

TEST_F(PdbenchFakeServerTest, PdbenchCommandLineWritesReports) {
  service_.script = [](int64_t i) {
    Script s;
    s.ttft_ms = 30;
    s.itl_ms = 5;
    if (i == 2) s.fail_code = grpc::StatusCode::UNAVAILABLE;
    return s;
  };
  const std::string dir = pds::testing::ScratchDir();
  const std::string json = dir + "/run.json", csv = dir + "/run.csv", report = dir + "/run.txt";
  int rc = RunPdbench(
      {"--target",       target_,   "--rate",       "50",      "--arrival",    "constant",
       "--num-requests", "6",       "--input-len",  "8",       "--output-len", "4",
       "--goodput",      "ttft:80", "tpot:20",      "--quiet", "--json-out",   json,
       "--csv-out",      csv,       "--report-out", report});
  ASSERT_EQ(rc, 0);
  nlohmann::json j = nlohmann::json::parse(ReadAll(json));
  EXPECT_EQ(j["completed"], 5);
  EXPECT_EQ(j["failed"], 1);
  EXPECT_EQ(j["errors"]["UNAVAILABLE"], 1);
  EXPECT_EQ(j["model_id"], "fake-model");
  EXPECT_EQ(j["request_rate"], 50.0);
  EXPECT_DOUBLE_EQ(j["slo_attainment"].get<double>(), 5.0 / 6.0);
  EXPECT_NEAR(j["median_ttft_ms"].get<double>(), 30, kTolMs);
  EXPECT_NEAR(j["mean_tpot_ms"].get<double>(), 5, kTolMs / 2);
  for (const char* key : {"duration", "request_throughput", "output_throughput", "request_goodput",
                          "p99_itl_ms", "p90_e2el_ms"}) {
    EXPECT_TRUE(j.contains(key)) << key;
  }
  std::vector<std::string> rows = absl::StrSplit(ReadAll(csv), '\n', absl::SkipEmpty());
  EXPECT_EQ(rows.size(), 7u);
  EXPECT_NE(ReadAll(report).find("SLO attainment (%):"), std::string::npos);

  // --search over a server with fixed latencies: every rate passes.
  const std::string sjson = dir + "/search.json", scsv = dir + "/search.csv",
                    svg = dir + "/search.svg";
  ScriptFixed(10, 5);
  rc = RunPdbench({"--target",   target_,
                   "--search",   "--search-min-rate",
                   "20",         "--search-max-rate",
                   "40",         "--search-steps",
                   "2",          "--num-requests",
                   "5",          "--output-len",
                   "3",          "--goodput",
                   "ttft:200",   "tpot:100",
                   "--num-gpus", "2",
                   "--quiet",    "--json-out",
                   sjson,        "--csv-out",
                   scsv,         "--plot-out",
                   svg});
  ASSERT_EQ(rc, 0);
  nlohmann::json s = nlohmann::json::parse(ReadAll(sjson));
  EXPECT_TRUE(s["found"].get<bool>());
  EXPECT_TRUE(s["hit_max_rate"].get<bool>());
  EXPECT_DOUBLE_EQ(s["max_rate"].get<double>(), 40);
  EXPECT_DOUBLE_EQ(s["max_rate_per_gpu"].get<double>(), 20);
  ASSERT_EQ(s["points"].size(), 2u);
  EXPECT_EQ(s["points"][0]["completed"], 5);
  rows = absl::StrSplit(ReadAll(scsv), '\n', absl::SkipEmpty());
  EXPECT_EQ(rows.size(), 3u);
  EXPECT_EQ(ReadAll(svg).rfind("<svg", 0), 0u);
}

// A trace replays its own arrival times (pdbench refuses --rate with it): a request the
// in-flight bound held back counts its wait in TTFT, as at any finite rate.
TEST_F(PdbenchFakeServerTest, TraceReplayCountsTheWaitOfHeldBackRequests) {
  ScriptFixed(100, 100);  // 300 ms per request
  const std::string dir = pds::testing::ScratchDir();
  const std::string trace = dir + "/held.jsonl", csv = dir + "/held.csv";
  {
    std::ofstream out(trace);
    for (int i = 0; i < 4; ++i) {
      out << "{\"arrival_time\": " << 0.05 * i
          << ", \"prompt_token_ids\": [5, 6, 7], \"output_len\": 3}\n";
    }
  }
  ASSERT_EQ(RunPdbench({"--target", target_, "--dataset", "trace", "--dataset-path", trace,
                        "--max-concurrency", "1", "--quiet", "--csv-out", csv}),
            0);
  std::vector<std::string> rows = absl::StrSplit(ReadAll(csv), '\n', absl::SkipEmpty());
  ASSERT_EQ(rows.size(), 5u);
  std::vector<std::string> header = absl::StrSplit(rows[0], ',');
  auto column = [&](const std::string& name) {
    return std::find(header.begin(), header.end(), name) - header.begin();
  };
  for (size_t r = 1; r < rows.size(); ++r) {
    std::vector<std::string> f = absl::StrSplit(rows[r], ',');
    double send = 0, scheduled = 0, ttft = 0;
    ASSERT_TRUE(absl::SimpleAtod(f[column("send_s")], &send));
    ASSERT_TRUE(absl::SimpleAtod(f[column("scheduled_s")], &scheduled));
    ASSERT_TRUE(absl::SimpleAtod(f[column("ttft_ms")], &ttft));
    EXPECT_NEAR(scheduled, 0.05 * (std::stoi(f[column("index")])), 1e-9) << rows[r];
    EXPECT_NEAR(ttft, 1000 * (send - scheduled) + 100, 3 * kTolMs) << rows[r];
    if (r == rows.size() - 1) EXPECT_GT(send - scheduled, 0.5) << rows[r];
  }
}

// --wait-ready holds the load back until the cluster status shows a servable set of workers
// (the front-end's ClusterStatus.ready), and fails without sending anything when it does not come
// in time.
TEST_F(PdbenchFakeServerTest, WaitReadyHoldsTheLoadUntilTheClusterCanServe) {
  ScriptFixed(1, 1);
  const std::vector<std::string> base = {"--target",    target_, "--num-requests", "2",
                                         "--input-len", "4",     "--output-len",   "2",
                                         "--quiet"};
  auto with = [&](const char* wait) {
    std::vector<std::string> args = base;
    args.insert(args.end(), {"--wait-ready", wait});
    return args;
  };
  const absl::Time start = absl::Now();
  EXPECT_NE(RunPdbench(with("0.5")), 0);
  EXPECT_GE(absl::Now() - start, absl::Milliseconds(500));
  EXPECT_EQ(service_.received(), 0);
  std::thread ready([&] {
    absl::SleepFor(absl::Milliseconds(400));
    service_.ready = true;
  });
  const absl::Time again = absl::Now();
  EXPECT_EQ(RunPdbench(with("20")), 0);
  ready.join();
  EXPECT_GE(absl::Now() - again, absl::Milliseconds(400));
  EXPECT_EQ(service_.received(), 2);
  EXPECT_EQ(RunPdbench(with("-1")), 2) << "a negative wait is refused";
  // A target without cluster status: nothing to wait for, the load goes at once.
  service_.status_unimplemented = true;
  const absl::Time third = absl::Now();
  EXPECT_EQ(RunPdbench(with("20")), 0);
  EXPECT_LT(absl::Now() - third, absl::Seconds(10));
  EXPECT_EQ(service_.received(), 4);
}

// Several targets: requests go to each in turn; one a target refuses before any token
// (UNAVAILABLE: draining) goes to the next, once per target, and the caller sees one call; a
// failure after a token, or another code, is never sent again.
TEST_F(PdbenchFakeServerTest, SeveralTargetsTakeTurnsAndARefusalGoesToTheNext) {
  ScriptFixed(5, 2);
  FakeServing draining;  // refuses everything, as a front-end that drains
  draining.script = [](int64_t) {
    Script s;
    s.fail_code = grpc::StatusCode::UNAVAILABLE;
    return s;
  };
  int other_port = 0;
  grpc::ServerBuilder builder;
  builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &other_port);
  builder.RegisterService(&draining);
  std::unique_ptr<grpc::Server> other = builder.BuildAndStart();
  ASSERT_NE(other, nullptr);
  const std::string other_target = absl::StrCat("127.0.0.1:", other_port);
  auto both = [&] {
    std::vector<std::unique_ptr<GenerateClient>> clients;
    clients.push_back(std::make_unique<ServingClient>(other_target));
    clients.push_back(std::make_unique<ServingClient>(target_));
    return std::make_unique<MultiClient>(std::move(clients));
  };
  {
    auto client = both();
    EXPECT_EQ(client->target(), absl::StrCat(other_target, ",", target_));
    ASSERT_TRUE(client->WaitForConnected(absl::Seconds(5)).ok());
    RunOptions o;
    o.concurrency = 2;
    o.max_requests = 10;
    o.request_id_prefix = "multi";
    auto result = RunBenchmark(*client, Specs(10, 4, 3), o);
    ASSERT_TRUE(result.ok()) << result.status();
    ASSERT_EQ(result->records.size(), 10u);
    for (const RequestRecord& r : result->records) EXPECT_TRUE(r.ok) << r.error_code;
    EXPECT_EQ(draining.received(), 5);  // every other request went there first
    EXPECT_EQ(service_.received(), 10);
    EXPECT_EQ(client->failovers(), 5);
  }
  // Failures after a token, and other codes, stay failures.
  service_.script = [](int64_t i) {
    Script s;
    s.ttft_ms = 5;
    s.itl_ms = 2;
    s.fail_code = i % 2 ? grpc::StatusCode::UNAVAILABLE : grpc::StatusCode::RESOURCE_EXHAUSTED;
    s.fail_after_tokens = i % 2 ? 1 : -1;
    return s;
  };
  draining.script = service_.script;
  {
    auto client = both();
    RunOptions o;
    o.concurrency = 1;
    o.max_requests = 4;
    o.request_id_prefix = "fail";
    auto result = RunBenchmark(*client, Specs(4, 4, 3), o);
    ASSERT_TRUE(result.ok()) << result.status();
    for (const RequestRecord& r : result->records) EXPECT_FALSE(r.ok);
    EXPECT_EQ(client->failovers(), 0);
  }
  // Every target refusing: the call ends UNAVAILABLE after one try on each.
  service_.script = draining.script = [](int64_t) {
    Script s;
    s.fail_code = grpc::StatusCode::UNAVAILABLE;
    return s;
  };
  {
    auto client = both();
    const int64_t before = draining.received() + service_.received();
    pdserve::v1::GenerateRequest r;
    r.set_request_id("none-1");
    r.add_prompt_token_ids(3);
    r.set_max_tokens(2);
    grpc::Status status;
    auto call = client->StartGenerate(
        r, absl::Seconds(5),
        {nullptr, [&](const grpc::Status& s, Clock::time_point) { status = s; }});
    call->Wait();
    EXPECT_EQ(status.error_code(), grpc::StatusCode::UNAVAILABLE);
    EXPECT_EQ(draining.received() + service_.received() - before, 2);
    EXPECT_EQ(client->failovers(), 1);
  }
  other->Shutdown();
}

TEST(PdbenchCliTest, UnreachableTargetAndBadArguments) {
  // Nothing listens on port 1 of the loopback address.
  EXPECT_EQ(RunPdbench({"--target", "127.0.0.1:1", "--connect-timeout", "0.5", "--quiet"}), 1);
  EXPECT_EQ(RunPdbench({"--rate", "1"}), 2);  // no --target
  EXPECT_EQ(RunPdbench({"--target", "x:1", "--rate", "1", "--concurrency", "2"}), 2);
  EXPECT_EQ(RunPdbench({"--target", "x:1", "--goodput", "e2el:5"}), 2);
  EXPECT_EQ(RunPdbench({"--target", "x:1", "--search"}), 2);  // needs --goodput
  EXPECT_EQ(RunPdbench({"--target", "x:1", "--percentile-metrics", "ttft,foo"}), 2);
  EXPECT_EQ(RunPdbench({"--target", "x:1", "--bogus"}), 2);
  EXPECT_EQ(RunPdbench({"--target", "x:1", "--api", "rest"}), 2);
  EXPECT_EQ(RunPdbench({"--target", "x:1", "--model", "m"}), 2);  // --model is --api openai's
  EXPECT_EQ(RunPdbench({"--target", "x:1", "--api", "openai", "--turns", "3", "--rate", "1",
                        "--max-model-len", "512"}),
            2);  // the answers' token ids are not returned
  EXPECT_EQ(RunPdbench({"--target", "127.0.0.1:1", "--api", "openai", "--connect-timeout", "0.5",
                        "--quiet"}),
            1);  // nothing listens there
  // Multi-turn: open loop at a finite rate, generated token-id prompts.
  EXPECT_EQ(RunPdbench({"--target", "x:1", "--turns", "3"}), 2);                 // --rate inf
  EXPECT_EQ(RunPdbench({"--target", "x:1", "--turns", "3", "--rate", "1"}), 2);  // no cap
  const std::vector<std::string> cap = {"--max-model-len", "512"};
  const auto with_cap = [&](std::vector<std::string> args) {
    args.insert(args.end(), cap.begin(), cap.end());
    return RunPdbench(args);
  };
  EXPECT_EQ(with_cap({"--target", "x:1", "--turns", "3", "--concurrency", "2"}), 2);
  EXPECT_EQ(with_cap({"--target", "x:1", "--turns", "3", "--rate", "1", "--text-prompts"}), 2);
  EXPECT_EQ(with_cap({"--target", "x:1", "--turns", "0", "--rate", "1"}), 2);
  EXPECT_EQ(with_cap({"--target", "x:1", "--turns", "2", "--rate", "1", "--think-time", "-1"}), 2);
  EXPECT_EQ(RunPdbench({"--help"}), 0);
}

}  // namespace
}  // namespace pds::client

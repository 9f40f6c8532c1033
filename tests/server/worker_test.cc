// In-process tests of a worker's request life cycle (server/worker.h): its engine loop, its KV
// sink and their failure paths, driven through its gRPC service and a host KV sender, on a
// CPU backend that can be told to fail mid-step.

#include "server/worker.h"

#include <atomic>
#include <chrono>
#include <cstring>
#include <future>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "engine/backend/cpu_backend.h"
#include "engine/model/transformer.h"
#include "engine/runtime/kv_handoff.h"
#include "engine/runtime/llm_engine.h"
#include "engine/transfer/kv_transport.h"
#include "engine/transfer/tcp_transport.h"
#include "grpcpp/grpcpp.h"
#include "gtest/gtest.h"
#include "pdserve/internal/control.grpc.pb.h"
#include "pdserve/v1/serving.grpc.pb.h"
#include "server/frontend.h"
#include "tests/server/test_worker.h"
#include "tests/testing/test_util.h"

namespace pds::server {
namespace {

namespace pb = ::pdserve::internal;
using scheduler::InstanceRole;

// A decode registration: the call, its stream and the events read so far.
struct Call {
  grpc::ClientContext ctx;
  std::unique_ptr<grpc::ClientReader<pb::WorkEvent>> reader;
  // Reads every event to the end; the final status.
  grpc::Status Drain(int* tokens = nullptr) {
    pb::WorkEvent event;
    while (reader->Read(&event)) {
      if (tokens != nullptr) *tokens += event.token_ids_size();
    }
    return reader->Finish();
  }
};

std::unique_ptr<Call> RegisterDecode(TestWorker& w, const pb::WorkRequest& work) {
  auto call = std::make_unique<Call>();
  call->ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
  call->reader = w.stub->Decode(&call->ctx, work);
  pb::WorkEvent event;
  EXPECT_TRUE(call->reader->Read(&event));
  EXPECT_EQ(event.kind(), pb::WorkEvent::ACCEPTED);
  return call;
}

// Layers of zeros; from layer `gate_layer` on, each waits until the gate opens (bounded).
class GatedSource : public engine::KvSource {
 public:
  explicit GatedSource(int gate_layer = 1 << 30) : gate_layer_(gate_layer) {}
  absl::Status ReadLayer(int32_t layer, int32_t, uint8_t* dst, size_t bytes) override {
    std::memset(dst, 0, bytes);
    if (layer < gate_layer_) return absl::OkStatus();
    waiting_.store(true);
    if (gate_.wait_for(std::chrono::seconds(30)) != std::future_status::ready) {
      return absl::DeadlineExceededError("gate never opened");
    }
    return absl::OkStatus();
  }
  bool waiting() const { return waiting_.load(); }
  void Open() { open_.set_value(); }

 private:
  int gate_layer_;
  std::atomic<bool> waiting_{false};
  std::promise<void> open_;
  std::shared_future<void> gate_ = open_.get_future().share();
};

// A step that fails on the decode worker ends every request it holds, but the blocks an
// import is still writing into stay reserved until that transfer has ended: none is handed to
// another request under the transfer's feet. The worker serves on afterwards.
TEST(WorkerTest, FailedStepKeepsTheBlocksOfATransferInFlightUntilItEnds) {
  auto w = StartWorker(InstanceRole::kDecode, {});
  ASSERT_NE(w, nullptr);
  auto sender = engine::CreateTcpKvSender();
  const absl::Time deadline = absl::Now() + absl::Seconds(60);

  // y's KV stops after its first layer: its 3 blocks stay reserved.
  auto y = RegisterDecode(*w, Work("y", 40, 4));
  GatedSource y_source(/*gate_layer=*/1);
  auto y_sent = std::async(std::launch::async, [&] {
    return sender->Send(w->worker->kv_address(), w->Header("y", 40), y_source, deadline);
  });
  const absl::Time wait_until = absl::Now() + absl::Seconds(20);
  while (!y_source.waiting() && absl::Now() < wait_until) absl::SleepFor(absl::Milliseconds(5));
  ASSERT_TRUE(y_source.waiting());

  // x decodes (for far longer than this test takes to make its next step fail).
  auto x = RegisterDecode(*w, Work("x", 8, 900));
  GatedSource x_source;
  ASSERT_TRUE(sender->Send(w->worker->kv_address(), w->Header("x", 8), x_source, deadline).ok());

  w->backend.fail = true;  // x's next step fails
  const grpc::Status x_status = x->Drain();
  EXPECT_EQ(x_status.error_code(), grpc::StatusCode::INTERNAL) << x_status.error_message();
  EXPECT_NE(x_status.error_message().find("injected device fault"), std::string::npos);
  const grpc::Status y_status = y->Drain();
  EXPECT_EQ(y_status.error_code(), grpc::StatusCode::INTERNAL) << y_status.error_message();
  w->backend.fail = false;

  // x's blocks are free; y's 3 stay while its transfer may still write them.
  EXPECT_TRUE(w->WaitFor([](const pb::WorkerStatus& s) { return s.running_requests() == 0; }));
  for (int i = 0; i < 5; ++i) {
    EXPECT_EQ(w->Status().kv_blocks_used(), 3) << "y's blocks were freed under its transfer";
    absl::SleepFor(absl::Milliseconds(30));
  }
  y_source.Open();
  y_sent.get().IgnoreError();  // broken off or completed: either way the blocks come back
  EXPECT_TRUE(w->WaitFor([](const pb::WorkerStatus& s) { return s.kv_blocks_used() == 0; }))
      << w->Status().DebugString();

  // The worker still serves.
  int tokens = 0;
  auto z = RegisterDecode(*w, Work("z", 20, 5));
  GatedSource z_source;
  ASSERT_TRUE(sender->Send(w->worker->kv_address(), w->Header("z", 20), z_source, deadline).ok());
  const grpc::Status z_status = z->Drain(&tokens);
  EXPECT_TRUE(z_status.ok()) << z_status.error_message();
  EXPECT_EQ(tokens, 4);  // the first of the 5 came with the KV
  EXPECT_TRUE(w->WaitFor([](const pb::WorkerStatus& s) { return s.kv_blocks_used() == 0; }));
}

// The engine under a worker: a step that fails while a prompt's KV leaves layer by layer holds
// that sequence (its transfer may still read the blocks) and never runs it again; its hand-off
// gets the step's error; Cancel() then frees everything.
TEST(WorkerTest, EngineHoldsTheHandedOffSequencesOfAFailedStep) {
  FaultyBackend backend;
  const engine::ModelConfig config = testing::SmallTestConfig();
  auto model = engine::Transformer::CreateRandom(config, backend, 5);
  ASSERT_TRUE(model.ok()) << model.status();
  engine::EngineOptions eo;
  eo.block_size = kBlockSize;
  eo.num_blocks = 64;
  auto engine = engine::LlmEngine::Create(**model, eo);
  ASSERT_TRUE(engine.ok()) << engine.status();
  std::vector<std::shared_ptr<engine::KvHandoff>> handed;
  (*engine)->set_handoff_hook([&](std::vector<std::shared_ptr<engine::KvHandoff>> h) {
    handed.insert(handed.end(), h.begin(), h.end());
  });
  engine::GenerateRequest r;
  r.id = "p";
  for (int j = 0; j < 30; ++j) r.prompt.push_back(3 + j);
  r.params.max_tokens = 4;
  r.params.ignore_eos = true;
  r.hold_kv_after_prefill = true;
  ASSERT_TRUE((*engine)->AddRequest(r).ok());
  backend.fail = true;
  EXPECT_EQ((*engine)->Step().status().code(), absl::StatusCode::kInternal);
  ASSERT_EQ(handed.size(), 1u);
  EXPECT_EQ(handed[0]->WaitNextToken(absl::Now() + absl::Seconds(1), nullptr).status().code(),
            absl::StatusCode::kInternal);
  EXPECT_FALSE((*engine)->HasRunnable()) << "the failed prompt would be prefilled again";
  EXPECT_EQ((*engine)->num_held(), 1u);
  EXPECT_LT((*engine)->num_free_blocks(), 64) << "its blocks left under its transfer";
  backend.fail = false;
  auto next = (*engine)->Step();
  ASSERT_TRUE(next.ok()) << next.status();
  EXPECT_TRUE(next->empty());
  ASSERT_TRUE((*engine)->Cancel("p").ok());
  EXPECT_EQ((*engine)->num_free_blocks(), 64);
  EXPECT_FALSE((*engine)->HasWork());
}

// The same through a prefill worker: its request fails with the step, the prompt is not run
// again while the transfer that was sending its KV winds down (held up here by the decode
// worker's busy loop, which answers the transfer's offer only after its current step), and
// every block comes back.
TEST(WorkerTest, FailedPrefillStepDoesNotRunItsHandedOffPromptsAgain) {
  auto decode = StartWorker(InstanceRole::kDecode, {});
  auto prefill = StartWorker(InstanceRole::kPrefill, {});
  ASSERT_NE(decode, nullptr);
  ASSERT_NE(prefill, nullptr);
  // q keeps the decode loop in 600 ms steps.
  auto q = RegisterDecode(*decode, Work("q", 8, 40));
  GatedSource q_source;
  ASSERT_TRUE(decode->SendKv("q", 8, q_source).ok());
  decode->backend.delay_ms = 300;
  absl::SleepFor(absl::Milliseconds(50));
  auto p_decode = RegisterDecode(*decode, Work("p", 30, 4));
  pb::WorkRequest work = Work("p", 30, 4);
  work.set_decode_instance(decode->worker->id());
  work.set_decode_kv_address(decode->worker->kv_address());
  prefill->backend.fail = true;
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
  auto p = prefill->stub->Prefill(&ctx, work);
  pb::WorkEvent event;
  while (p->Read(&event)) {
  }
  const grpc::Status status = p->Finish();
  EXPECT_EQ(status.error_code(), grpc::StatusCode::INTERNAL) << status.error_message();
  absl::SleepFor(absl::Milliseconds(300));  // the fault lasts: a re-run would fail again
  prefill->backend.fail = false;
  decode->backend.delay_ms = 0;
  EXPECT_TRUE(prefill->WaitFor([](const pb::WorkerStatus& s) { return s.kv_blocks_used() == 0; }))
      << prefill->Status().DebugString();
  const pb::WorkerStatus after = prefill->Status();
  EXPECT_EQ(after.engine_steps(), 1) << after.DebugString();
  EXPECT_EQ(after.engine_step_tokens(), 30) << after.DebugString();
  EXPECT_EQ(after.running_requests() + after.queued_requests() + after.held_requests(), 0);
  p_decode->ctx.TryCancel();  // its KV never comes (the front-end cancels it so)
  EXPECT_FALSE(p_decode->Drain().ok());
  const grpc::Status q_status = q->Drain();
  EXPECT_TRUE(q_status.ok()) << q_status.error_message();
  EXPECT_TRUE(decode->WaitFor([](const pb::WorkerStatus& s) { return s.kv_blocks_used() == 0; }));
}

// A prefill worker ends a request's stream as soon as its KV is in the decode worker, even
// while its loop runs the next prompt's step: the front-end reads the decode worker's tokens
// only after the prefill stream has ended, so waiting for the loop would hold back every
// decode token of the request by up to a prefill step.
TEST(WorkerTest, PrefillStreamEndsOnceTheKvIsInNotAfterTheNextStep) {
  auto decode = StartWorker(InstanceRole::kDecode, {});
  auto prefill = StartWorker(InstanceRole::kPrefill, {});
  ASSERT_NE(decode, nullptr);
  ASSERT_NE(prefill, nullptr);
  prefill->backend.delay_ms = 250;  // 2 layers: every prefill step takes 500 ms or more
  auto prefill_work = [&](const std::string& id) {
    pb::WorkRequest work = Work(id, 30, 3);
    work.set_decode_instance(decode->worker->id());
    work.set_decode_kv_address(decode->worker->kv_address());
    return work;
  };
  auto a_decode = RegisterDecode(*decode, Work("a", 30, 3));
  auto b_decode = RegisterDecode(*decode, Work("b", 30, 3));
  grpc::ClientContext a_ctx, b_ctx;
  a_ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
  b_ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
  auto a = prefill->stub->Prefill(&a_ctx, prefill_work("a"));
  absl::SleepFor(absl::Milliseconds(150));  // a's step runs; b waits for the next one
  auto b = prefill->stub->Prefill(&b_ctx, prefill_work("b"));
  pb::WorkEvent event;
  ASSERT_TRUE(a->Read(&event));
  ASSERT_EQ(event.token_ids_size(), 1);
  const absl::Time first_token = absl::Now();
  bool kv_sent = false;
  while (a->Read(&event)) kv_sent = kv_sent || event.kind() == pb::WorkEvent::KV_SENT;
  const absl::Duration tail = absl::Now() - first_token;
  const grpc::Status a_status = a->Finish();
  EXPECT_TRUE(a_status.ok()) << a_status.error_message();
  EXPECT_TRUE(kv_sent);
  EXPECT_LT(tail, absl::Milliseconds(250)) << "a's stream waited for b's step";
  prefill->backend.delay_ms = 0;
  int a_tokens = 0, b_tokens = 0;
  EXPECT_TRUE(a_decode->Drain(&a_tokens).ok());
  EXPECT_EQ(a_tokens, 2);
  while (b->Read(&event)) {
  }
  EXPECT_TRUE(b->Finish().ok());
  EXPECT_TRUE(b_decode->Drain(&b_tokens).ok());
  EXPECT_EQ(b_tokens, 2);
  EXPECT_TRUE(prefill->WaitFor([](const pb::WorkerStatus& s) { return s.kv_blocks_used() == 0; }));
  EXPECT_TRUE(decode->WaitFor([](const pb::WorkerStatus& s) { return s.kv_blocks_used() == 0; }));
}

// A worker whose engine step does not end (a hung device) still answers the front-end's
// health checks, from figures its loop no longer refreshes: the front-end takes it for
// unhealthy (no new requests go to it) once those figures are older than the stall timeout,
// and for healthy again once the loop moves.
TEST(WorkerTest, FrontendTakesAWorkerWhoseLoopStalledForUnhealthy) {
  auto dir = testing::MakeModelDir(testing::SmallTestConfig(), "worker_stall", 5);
  ASSERT_TRUE(dir.ok()) << dir.status();
  FrontendOptions fo;
  fo.model_dir = *dir;
  fo.health_period = absl::Milliseconds(50);
  fo.worker_stall_timeout = absl::Milliseconds(400);
  auto frontend = Frontend::Start(fo);
  ASSERT_TRUE(frontend.ok()) << frontend.status();
  WorkerOptions o;
  o.frontend = (*frontend)->address();
  auto w = StartWorker(InstanceRole::kColocated, o);
  ASSERT_NE(w, nullptr);
  auto api = ::pdserve::v1::Serving::NewStub(
      grpc::CreateChannel((*frontend)->address(), grpc::InsecureChannelCredentials()));
  auto healthy = [&]() -> std::optional<bool> {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
    ::pdserve::v1::ClusterStatus status;
    if (!api->GetClusterStatus(&ctx, ::pdserve::v1::ClusterStatusRequest(), &status).ok() ||
        status.instances_size() != 1) {
      return std::nullopt;
    }
    return status.instances(0).healthy();
  };
  auto wait_for = [&](bool want, absl::Duration timeout) {
    const absl::Time deadline = absl::Now() + timeout;
    while (absl::Now() < deadline) {
      if (healthy() == want) return true;
      absl::SleepFor(absl::Milliseconds(20));
    }
    return false;
  };
  ASSERT_TRUE(wait_for(true, absl::Seconds(20)));
  w->backend.delay_ms = 1000;  // the next step takes 2 s or more
  auto generated = std::async(std::launch::async, [&] {
    ::pdserve::v1::GenerateRequest r;
    for (int j = 0; j < 8; ++j) r.add_prompt_token_ids(3 + j);
    r.set_max_tokens(2);
    r.set_ignore_eos(true);
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
    auto reader = api->Generate(&ctx, r);
    ::pdserve::v1::GenerateResponse m;
    int tokens = 0;
    while (reader->Read(&m)) tokens += m.token_ids_size();
    const grpc::Status status = reader->Finish();
    return status.ok() ? tokens : -1;
  });
  EXPECT_TRUE(wait_for(false, absl::Milliseconds(1800))) << "a stalled loop looked healthy";
  // The worker reports the loop's silence on its own clock (no comparison of two hosts' clocks).
  EXPECT_GT(w->Status().loop_heartbeat_age_us(), 400'000);
  w->backend.delay_ms = 0;
  EXPECT_TRUE(wait_for(true, absl::Seconds(20))) << "healthy again once the loop moved";
  EXPECT_EQ(generated.get(), 2);
  EXPECT_TRUE(w->WaitFor([](const pb::WorkerStatus& s) {
    return s.running_requests() == 0 && s.loop_heartbeat_age_us() < 200'000;  // idle: 50 ms
  }));
  (*frontend)->Shutdown();
}

// A decode worker refuses, before ACCEPTED, a request whose prompt can never fit its cache
// (the prefill side may have a larger one): RESOURCE_EXHAUSTED naming the sizes, at once.
TEST(WorkerTest, DecodeRefusesAPromptItsCacheCanNeverHold) {
  WorkerOptions o;
  o.engine.num_blocks = 4;  // 64 positions
  auto w = StartWorker(InstanceRole::kDecode, o);
  ASSERT_NE(w, nullptr);
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
  auto reader = w->stub->Decode(&ctx, Work("big", 64, 4));  // 64 + 1 positions: 5 blocks
  pb::WorkEvent event;
  EXPECT_FALSE(reader->Read(&event));
  const grpc::Status refused = reader->Finish();
  EXPECT_EQ(refused.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED) << refused.error_message();
  EXPECT_NE(refused.error_message().find("more KV blocks than the cache holds"), std::string::npos)
      << refused.error_message();
  // One that fits is accepted and served.
  auto fits = RegisterDecode(*w, Work("fits", 40, 3));
  GatedSource source;
  ASSERT_TRUE(w->SendKv("fits", 40, source).ok());
  EXPECT_TRUE(fits->Drain().ok());
}

// An RPC that gives up waiting for the engine loop gets RESOURCE_EXHAUSTED and its request is
// never run afterwards (nor does it keep its admission): with a wait of a nanosecond while a
// long request keeps the loop stepping, most requests are refused that way, every other one is
// served, and the worker ends idle having served exactly the requests that got their tokens.
TEST(WorkerTest, RequestsTheLoopDidNotTakeInTimeNeverRun) {
  WorkerOptions o;
  o.loop_wait = absl::Nanoseconds(1);
  o.max_queued = 1;
  o.engine.max_running = 2;
  auto w = StartWorker(InstanceRole::kColocated, o);
  ASSERT_NE(w, nullptr);
  // Generate on the worker; the status and the tokens streamed.
  auto generate = [&](const pb::WorkRequest& work, int* tokens) {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
    auto reader = w->stub->Generate(&ctx, work);
    pb::WorkEvent event;
    while (reader->Read(&event)) *tokens += event.token_ids_size();
    return reader->Finish();
  };
  // The long request is admitted however long the loop takes (retried until it is).
  std::atomic<int> long_tokens{0};
  auto long_done = std::async(std::launch::async, [&] {
    for (int attempt = 0; attempt < 1000; ++attempt) {
      int tokens = 0;
      const grpc::Status status = generate(Work("long", 8, 1000), &tokens);
      long_tokens = tokens;
      if (status.error_code() != grpc::StatusCode::RESOURCE_EXHAUSTED) return status;
    }
    return grpc::Status(grpc::StatusCode::INTERNAL, "never admitted");
  });
  ASSERT_TRUE(w->WaitFor([](const pb::WorkerStatus& s) { return s.running_requests() == 1; }));
  int served = 0, abandoned = 0;
  for (int i = 0; i < 20; ++i) {
    int tokens = 0;
    const grpc::Status status = generate(Work(absl::StrCat("r", i), 12, 3), &tokens);
    if (status.ok()) {
      EXPECT_EQ(tokens, 3);
      ++served;
    } else {
      ASSERT_EQ(status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED)
          << i << ": " << status.error_message();
      EXPECT_NE(status.error_message().find("engine loop busy"), std::string::npos);
      ++abandoned;
    }
  }
  EXPECT_GT(abandoned, 0);
  const grpc::Status long_status = long_done.get();
  EXPECT_TRUE(long_status.ok()) << long_status.error_message();
  EXPECT_EQ(long_tokens.load(), 1000);
  // Nothing refused runs later.
  absl::SleepFor(absl::Milliseconds(300));
  const pb::WorkerStatus status = w->Status();
  EXPECT_EQ(status.requests_served(), served + 1);
  EXPECT_EQ(status.running_requests(), 0);
  EXPECT_EQ(status.queued_requests(), 0);
  EXPECT_EQ(status.kv_blocks_used(), 0);
}

}  // namespace
}  // namespace pds::server

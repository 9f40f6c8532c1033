// Graceful stops, cluster churn and placement, in-process (front-ends and workers on
// 127.0.0.1): a draining worker or front-end finishes what it holds and takes nothing new, a
// request a worker refuses before starting it goes to another, workers gone for good are
// forgotten, workers listening on every address register the address they were told to
// advertise, a request goes to the prefill worker that holds its prefix, and several
// front-ends share the workers.

#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <future>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "client/bench_runner.h"
#include "client/multi_client.h"
#include "grpcpp/grpcpp.h"
#include "gtest/gtest.h"
#include "pdserve/internal/control.grpc.pb.h"
#include "pdserve/v1/serving.grpc.pb.h"
#include "server/frontend.h"
#include "server/grpc_util.h"
#include "tests/server/test_worker.h"
#include "tests/testing/test_util.h"

namespace pds::server {
namespace {

namespace api = ::pdserve::v1;
using scheduler::InstanceRole;

const std::string& ModelDir() {
  static const std::string* dir = [] {
    auto made = testing::MakeModelDir(testing::SmallTestConfig(), "drain", 5);
    EXPECT_TRUE(made.ok()) << made.status();
    return new std::string(made.ok() ? *made : "");
  }();
  return *dir;
}

// A front-end and a stub of its public API.
struct Cluster {
  std::unique_ptr<Frontend> frontend;
  std::unique_ptr<api::Serving::Stub> api;

  api::ClusterStatus Status() {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
    api::ClusterStatus status;
    EXPECT_TRUE(api->GetClusterStatus(&ctx, api::ClusterStatusRequest(), &status).ok());
    return status;
  }
  const api::InstanceStatus* Find(const api::ClusterStatus& status, const std::string& id) {
    for (const auto& i : status.instances()) {
      if (i.id() == id) return &i;
    }
    return nullptr;
  }
  // Polls the cluster status until `done` holds (bounded).
  template <typename F>
  bool WaitFor(F done, absl::Duration timeout = absl::Seconds(20)) {
    return PollUntil([this] { return Status(); }, done, timeout);
  }
  // Waits until each of `ids` is registered and healthy.
  bool WaitHealthy(const std::vector<std::string>& ids) {
    return WaitFor([&](const api::ClusterStatus& s) {
      for (const std::string& id : ids) {
        const api::InstanceStatus* i = Find(s, id);
        if (i == nullptr || !i->healthy()) return false;
      }
      return true;
    });
  }
  // A worker registering with this front-end.
  std::unique_ptr<TestWorker> Worker(InstanceRole role, const std::string& id,
                                     WorkerOptions o = {}) {
    o.id = id;
    o.frontend = frontend->address();
    return StartWorker(role, std::move(o));
  }
};

std::unique_ptr<Cluster> StartFrontend(FrontendOptions o = {}) {
  o.model_dir = ModelDir();
  if (o.health_period == FrontendOptions().health_period) o.health_period = absl::Milliseconds(50);
  auto frontend = Frontend::Start(o);
  EXPECT_TRUE(frontend.ok()) << frontend.status();
  if (!frontend.ok()) return nullptr;
  auto c = std::make_unique<Cluster>();
  c->frontend = std::move(*frontend);
  c->api = api::Serving::NewStub(
      grpc::CreateChannel(c->frontend->address(), grpc::InsecureChannelCredentials()));
  return c;
}

// One Generate call read on its own thread; `first` is set when a token arrived.
struct Stream {
  std::promise<void> first_token;
  std::future<void> first = first_token.get_future();
  grpc::Status status;
  int tokens = 0;
  api::Done done;
};

std::unique_ptr<Stream> StartGenerate(Cluster& c, int max_tokens, std::thread* reader,
                                      int first_id = 3) {
  auto s = std::make_unique<Stream>();
  *reader = std::thread([&c, max_tokens, first_id, s = s.get()] {
    api::GenerateRequest r;
    for (int j = 0; j < 8; ++j) r.add_prompt_token_ids(first_id + j);
    r.set_max_tokens(max_tokens);
    r.set_ignore_eos(true);
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
    auto call = c.api->Generate(&ctx, r);
    api::GenerateResponse m;
    bool told = false;
    while (call->Read(&m)) {
      s->tokens += m.token_ids_size();
      if (m.has_done()) s->done = m.done();
      if (!told && s->tokens > 0) {
        s->first_token.set_value();
        told = true;
      }
    }
    s->status = call->Finish();
    if (!told) s->first_token.set_value();
  });
  return s;
}

// Runs one request to its end.
std::unique_ptr<Stream> Generate(Cluster& c, int max_tokens, int first_id = 3) {
  std::thread reader;
  auto s = StartGenerate(c, max_tokens, &reader, first_id);
  reader.join();
  return s;
}

// A decode call straight to `w`; the status it ends with before any event (OK if it was
// accepted: then it is cancelled).
grpc::Status DecodeRefusal(TestWorker& w, const ::pdserve::internal::WorkRequest& work) {
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
  auto reader = w.stub->Decode(&ctx, work);
  ::pdserve::internal::WorkEvent event;
  if (reader->Read(&event)) {
    ctx.TryCancel();
    reader->Finish().IgnoreError();
    return grpc::Status::OK;
  }
  return reader->Finish();
}

// A decode worker told to drain while it streams a request: that request gets every token,
// the front-end stops placing requests on it (the next goes to the other decode worker, one
// listening on every address and registered at its advertised one), the draining worker
// refuses new work with UNAVAILABLE, and Drain returns once its last request has ended.
TEST(DrainTest, DrainingWorkerFinishesItsRequestsAndGetsNoNewOnes) {
  auto c = StartFrontend();
  ASSERT_NE(c, nullptr);
  WorkerOptions larger;  // more free blocks: the least-loaded policy places the first request here
  larger.engine.num_blocks = 128;
  WorkerOptions everywhere;
  everywhere.host = "0.0.0.0";
  everywhere.advertise_host = "127.0.0.1";
  auto prefill = c->Worker(InstanceRole::kPrefill, "p");
  auto d1 = c->Worker(InstanceRole::kDecode, "d1", larger);
  auto d2 = c->Worker(InstanceRole::kDecode, "d2", everywhere);
  ASSERT_TRUE(prefill && d1 && d2);
  EXPECT_TRUE(absl::StartsWith(d2->worker->address(), "127.0.0.1:")) << d2->worker->address();
  EXPECT_TRUE(absl::StartsWith(d2->worker->kv_address(), "127.0.0.1:")) << d2->worker->kv_address();
  ASSERT_TRUE(c->WaitHealthy({"p", "d1", "d2"}));
  EXPECT_EQ(c->Find(c->Status(), "d2")->address(), d2->worker->address());

  d1->backend.delay_ms = 5;  // decode steps of tens of ms: the drain starts mid-request
  std::thread reader;
  auto held = StartGenerate(*c, 40, &reader);
  ASSERT_EQ(held->first.wait_for(std::chrono::seconds(30)), std::future_status::ready);
  auto drained =
      std::async(std::launch::async, [&] { return d1->worker->Drain(absl::Seconds(30)); });
  ASSERT_TRUE(c->WaitFor([&](const api::ClusterStatus& s) {
    const api::InstanceStatus* i = c->Find(s, "d1");
    return i != nullptr && i->draining();
  }));
  EXPECT_TRUE(d1->Status().draining());
  EXPECT_EQ(held->first.wait_for(std::chrono::seconds(0)), std::future_status::ready);

  const auto next = Generate(*c, 4, 50);
  ASSERT_TRUE(next->status.ok()) << next->status.error_message();
  EXPECT_EQ(next->done.timeline().decode_instance(), "d2");
  const grpc::Status late = DecodeRefusal(*d1, Work("late", 8, 4));
  EXPECT_EQ(late.error_code(), grpc::StatusCode::UNAVAILABLE) << late.error_message();
  EXPECT_TRUE(absl::StrContains(late.error_message(), "draining")) << late.error_message();

  reader.join();
  ASSERT_TRUE(held->status.ok()) << held->status.error_message();
  EXPECT_EQ(held->tokens, 40);
  EXPECT_EQ(held->done.timeline().decode_instance(), "d1");
  EXPECT_TRUE(drained.get());
  EXPECT_EQ(c->Status().requests_failed(), 0);
  c->frontend->Shutdown();
}

// The front-end's health poll never runs out of patience here, so it still takes a worker that
// is gone for healthy: the request placed on it is refused before it starts (UNAVAILABLE, no
// event) and goes to the other worker; the client sees nothing of it. Both for a decode worker
// and for a colocated one.
TEST(DrainTest, RequestRefusedBeforeStartIsPlacedOnAnotherWorker) {
  for (const InstanceRole role : {InstanceRole::kDecode, InstanceRole::kColocated}) {
    SCOPED_TRACE(std::string(scheduler::InstanceRoleName(role)));
    FrontendOptions fo;
    fo.unhealthy_after_failures = 1 << 30;
    auto c = StartFrontend(fo);
    ASSERT_NE(c, nullptr);
    WorkerOptions larger;  // preferred by the least-loaded policy while it looks healthy
    larger.engine.num_blocks = 128;
    std::unique_ptr<TestWorker> prefill;
    if (role == InstanceRole::kDecode) prefill = c->Worker(InstanceRole::kPrefill, "p");
    auto gone = c->Worker(role, "gone", larger);
    auto kept = c->Worker(role, "kept");
    ASSERT_TRUE(gone && kept);
    std::vector<std::string> ids = {"gone", "kept"};
    if (prefill) ids.push_back("p");
    ASSERT_TRUE(c->WaitHealthy(ids));
    gone->worker->Shutdown();
    for (int i = 0; i < 3; ++i) {
      const auto s = Generate(*c, 3, 10 + i);
      ASSERT_TRUE(s->status.ok()) << i << ": " << s->status.error_message();
      EXPECT_EQ(s->tokens, 3);
      const auto& t = s->done.timeline();
      EXPECT_EQ(role == InstanceRole::kDecode ? t.decode_instance() : t.prefill_instance(), "kept");
    }
    const api::ClusterStatus status = c->Status();
    EXPECT_EQ(status.requests_redispatched(), 1) << status.DebugString();
    EXPECT_EQ(status.requests_failed(), 0);
    EXPECT_FALSE(c->Find(status, "gone")->healthy());
    c->frontend->Shutdown();
  }
}

// The front-end is ready (ClusterStatus.ready, the readiness probe) only with a servable set of
// workers: a prefill worker alone is not one, nor a prefill with a draining decode worker.
TEST(DrainTest, ReadyNeedsAPrefillAndADecodeWorkerNotDraining) {
  auto c = StartFrontend();
  ASSERT_NE(c, nullptr);
  auto prefill = c->Worker(InstanceRole::kPrefill, "p");
  ASSERT_NE(prefill, nullptr);
  ASSERT_TRUE(c->WaitHealthy({"p"}));
  EXPECT_FALSE(c->Status().ready());
  auto decode = c->Worker(InstanceRole::kDecode, "d");
  ASSERT_NE(decode, nullptr);
  EXPECT_TRUE(c->WaitFor([](const api::ClusterStatus& s) { return s.ready(); }));
  EXPECT_TRUE(decode->worker->Drain(absl::ZeroDuration()));  // nothing held
  EXPECT_TRUE(c->WaitFor([](const api::ClusterStatus& s) { return !s.ready(); }));
  c->frontend->Shutdown();
}

// A draining front-end refuses new requests with UNAVAILABLE and finishes those in flight;
// Drain says whether they all ended in time.
TEST(DrainTest, DrainingFrontendFinishesRequestsInFlightAndRefusesNewOnes) {
  auto c = StartFrontend();
  ASSERT_NE(c, nullptr);
  auto w = c->Worker(InstanceRole::kColocated, "c");
  ASSERT_NE(w, nullptr);
  ASSERT_TRUE(c->WaitHealthy({"c"}));
  w->backend.delay_ms = 5;
  std::thread reader;
  auto held = StartGenerate(*c, 30, &reader);
  ASSERT_EQ(held->first.wait_for(std::chrono::seconds(30)), std::future_status::ready);
  EXPECT_FALSE(c->frontend->Drain(absl::Milliseconds(1))) << "drained with a request in flight";
  EXPECT_FALSE(c->Status().ready()) << "ready while draining";
  const auto refused = Generate(*c, 2);
  EXPECT_EQ(refused->status.error_code(), grpc::StatusCode::UNAVAILABLE)
      << refused->status.error_message();
  EXPECT_EQ(refused->tokens, 0);
  EXPECT_TRUE(c->frontend->Drain(absl::Seconds(30)));
  reader.join();
  ASSERT_TRUE(held->status.ok()) << held->status.error_message();
  EXPECT_EQ(held->tokens, 30);
  c->frontend->Shutdown();
}

// A worker unreachable for forget_worker_after, with nothing of its own in flight, leaves the
// cluster status; the others stay.
TEST(DrainTest, WorkersGoneForGoodAreForgotten) {
  FrontendOptions fo;
  fo.forget_worker_after = absl::Milliseconds(500);
  auto c = StartFrontend(fo);
  ASSERT_NE(c, nullptr);
  auto stays = c->Worker(InstanceRole::kColocated, "stays");
  auto goes = c->Worker(InstanceRole::kColocated, "goes");
  ASSERT_TRUE(stays && goes);
  ASSERT_TRUE(c->WaitHealthy({"stays", "goes"}));
  goes->worker->Shutdown();
  EXPECT_TRUE(c->WaitFor([&](const api::ClusterStatus& s) {
    return s.instances_size() == 1 && s.instances(0).id() == "stays";
  })) << c->Status().DebugString();
  const auto s = Generate(*c, 2);
  EXPECT_TRUE(s->status.ok()) << s->status.error_message();
  c->frontend->Shutdown();
}

// A worker listening on every address must be told the address to register.
TEST(DrainTest, WildcardHostNeedsAnAdvertisedOne) {
  auto config = testing::SmallTestConfig();
  engine::CpuBackend backend(1);
  auto model = engine::Transformer::CreateRandom(config, backend, 5);
  ASSERT_TRUE(model.ok()) << model.status();
  WorkerOptions o;
  o.role = InstanceRole::kColocated;
  o.host = "0.0.0.0";
  o.frontend = "127.0.0.1:1";
  o.vocab_size = static_cast<int32_t>(config.vocab_size);
  o.engine.block_size = kBlockSize;
  o.engine.num_blocks = 16;
  auto worker = Worker::Start(**model, o);
  ASSERT_FALSE(worker.ok());
  EXPECT_EQ(worker.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(absl::StrContains(worker.status().message(), "advertise")) << worker.status();
}

// DrainUntil: true once drained; false at the timeout, or at once on a second signal.
TEST(DrainTest, DrainUntilStopsAtTheTimeoutOrASecondSignal) {
  BlockTerminationSignals();
  int calls = 0;
  EXPECT_TRUE(DrainUntil([&](absl::Duration) { return ++calls == 3; }, absl::Seconds(10)));
  EXPECT_EQ(calls, 3);
  const absl::Time start = absl::Now();
  EXPECT_FALSE(DrainUntil(
      [](absl::Duration slice) {
        absl::SleepFor(slice);
        return false;
      },
      absl::Milliseconds(300)));
  EXPECT_GE(absl::Now() - start, absl::Milliseconds(300));
  calls = 0;
  const absl::Time again = absl::Now();
  EXPECT_FALSE(DrainUntil(
      [&](absl::Duration slice) {
        if (++calls == 2) raise(SIGTERM);  // pending: the signals are blocked in this thread
        absl::SleepFor(slice);
        return false;
      },
      absl::Seconds(30)));
  EXPECT_EQ(calls, 2);
  EXPECT_LT(absl::Now() - again, absl::Seconds(5));
}

// A child forked by a process whose signals pass on to its waiting thread, with a signal
// pending, dies of it once ResetSignalsForExec unblocks it (the pass-on handler, inherited,
// would re-raise it on the child's thread forever).
TEST(DrainTest, AForkedChildDiesOfAPendingSignalOnceReset) {
  BlockTerminationSignals();
  const pid_t pid = fork();
  ASSERT_GE(pid, 0);
  if (pid == 0) {
    raise(SIGTERM);  // pending: blocked in this thread
    ResetSignalsForExec();
    _exit(0);
  }
  int status = 0;
  pid_t r = 0;
  for (int i = 0; i < 200 && (r = waitpid(pid, &status, WNOHANG)) == 0; ++i) {
    absl::SleepFor(absl::Milliseconds(10));
  }
  if (r == 0) {
    kill(pid, SIGKILL);
    waitpid(pid, &status, 0);
    FAIL() << "the child spun on its pending signal";
  }
  EXPECT_TRUE(WIFSIGNALED(status) && WTERMSIG(status) == SIGTERM) << status;
}

// Registers `id` as `role` at `address` straight with the front-end's registry, once.
void RegisterOnce(Cluster& c, const std::string& id, const std::string& role,
                  const std::string& address) {
  auto registry = ::pdserve::internal::Registry::NewStub(
      grpc::CreateChannel(c.frontend->address(), grpc::InsecureChannelCredentials()));
  ::pdserve::internal::RegisterRequest r;
  r.set_id(id);
  r.set_role(role);
  r.set_address(address);
  r.set_kv_address(address);
  r.set_vocab_size(static_cast<int32_t>(testing::SmallTestConfig().vocab_size));
  ::pdserve::internal::RegisterResponse response;
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
  ASSERT_TRUE(c.frontend != nullptr);
  ASSERT_TRUE(registry->Register(&ctx, r, &response).ok());
  ASSERT_TRUE(response.accepted()) << response.message();
}

// An entry whose address now answers as another worker (a pod that took a departed one's IP)
// is not healthy and is forgotten in time; the worker really there stays.
TEST(DrainTest, AnotherWorkerAtAGoneWorkersAddressIsNoAnswer) {
  FrontendOptions fo;
  fo.forget_worker_after = absl::Milliseconds(500);
  auto c = StartFrontend(fo);
  ASSERT_NE(c, nullptr);
  auto w = c->Worker(InstanceRole::kColocated, "here");
  ASSERT_NE(w, nullptr);
  RegisterOnce(*c, "ghost", "decode", w->worker->address());
  ASSERT_TRUE(c->WaitFor([&](const api::ClusterStatus& s) {
    return c->Find(s, "ghost") == nullptr && c->Find(s, "here") != nullptr &&
           c->Find(s, "here")->healthy();
  })) << c->Status().DebugString();
  for (int i = 0; i < 5; ++i) {  // never healthy on the way
    EXPECT_FALSE(c->Find(c->Status(), "ghost")) << "ghost came back";
    absl::SleepFor(absl::Milliseconds(50));
  }
  c->frontend->Shutdown();
}

// Workers that accept connections but never answer (a black-holed pod) cost the health poll
// one deadline per round, not one each: a worker that goes away is still noticed at once.
TEST(DrainTest, UnansweringWorkersDoNotSlowTheHealthPoll) {
  const int sink = socket(AF_INET, SOCK_STREAM, 0);
  ASSERT_GE(sink, 0);
  sockaddr_in addr = {};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ASSERT_EQ(bind(sink, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)), 0);
  ASSERT_EQ(listen(sink, 64), 0);  // the kernel completes handshakes; nothing ever answers
  socklen_t len = sizeof(addr);
  ASSERT_EQ(getsockname(sink, reinterpret_cast<sockaddr*>(&addr), &len), 0);
  const std::string silent = absl::StrCat("127.0.0.1:", ntohs(addr.sin_port));
  FrontendOptions fo;
  fo.unhealthy_after_failures = 1;
  auto c = StartFrontend(fo);
  ASSERT_NE(c, nullptr);
  auto live = c->Worker(InstanceRole::kColocated, "live");
  auto victim = c->Worker(InstanceRole::kColocated, "victim");
  ASSERT_TRUE(live && victim);
  ASSERT_TRUE(c->WaitHealthy({"live", "victim"}));
  for (int i = 0; i < 10; ++i) RegisterOnce(*c, absl::StrCat("silent-", i), "colocated", silent);
  absl::SleepFor(absl::Seconds(1));  // rounds with ten silent workers in them
  victim->worker->Shutdown();
  const absl::Time gone = absl::Now();
  ASSERT_TRUE(
      c->WaitFor([&](const api::ClusterStatus& s) { return !c->Find(s, "victim")->healthy(); }));
  // One round: the 500 ms deadline plus the 50 ms period (one poll after another: over 5 s).
  EXPECT_LT(absl::Now() - gone, absl::Milliseconds(2500));
  EXPECT_TRUE(c->Find(c->Status(), "live")->healthy());
  c->frontend->Shutdown();
  close(sink);
}

// Runs a request of a 3-block prefix from `prefix_first_id` and 5 tokens from
// `suffix_first_id` to the end; its timeline.
api::Timeline RunPrefixed(Cluster& c, int prefix_first_id, int suffix_first_id,
                          int max_tokens = 2) {
  api::GenerateRequest r;
  for (int j = 0; j < 3 * kBlockSize; ++j) r.add_prompt_token_ids(prefix_first_id + j);
  for (int j = 0; j < 5; ++j) r.add_prompt_token_ids(suffix_first_id + j);
  r.set_max_tokens(max_tokens);
  r.set_ignore_eos(true);
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
  auto call = c.api->Generate(&ctx, r);
  api::GenerateResponse m;
  api::Done done;
  while (call->Read(&m)) {
    if (m.has_done()) done = m.done();
  }
  EXPECT_TRUE(call->Finish().ok());
  return done.timeline();
}

// A request whose prefix a prefill worker computed earlier goes there (least-loaded counts the
// tokens each worker would compute), even where the tie-break would name the other.
TEST(DrainTest, RequestsGoToThePrefillWorkerHoldingTheirPrefix) {
  auto c = StartFrontend();
  ASSERT_NE(c, nullptr);
  auto p0 = c->Worker(InstanceRole::kPrefill, "p0");
  auto p1 = c->Worker(InstanceRole::kPrefill, "p1");
  auto d0 = c->Worker(InstanceRole::kDecode, "d0");
  ASSERT_TRUE(p0 && p1 && d0);
  ASSERT_TRUE(c->WaitHealthy({"p0", "p1", "d0"}));
  auto run = [&](int prefix_first_id, int suffix_first_id) {
    return RunPrefixed(*c, prefix_first_id, suffix_first_id);
  };
  // Prefix A on p0 (idle workers: the tie-break), slowed (2 layers of 300 ms) so that prefix B,
  // sent once A is admitted and placed (a moment after), goes to p1 (p0 has A's tokens queued
  // until A's first token).
  p0->backend.delay_ms = 300;
  std::promise<api::Timeline> a_done;
  std::thread a([&] { a_done.set_value(run(10, 200)); });
  EXPECT_TRUE(c->WaitFor([](const api::ClusterStatus& s) { return s.requests_in_flight() == 1; }));
  absl::SleepFor(absl::Milliseconds(100));
  EXPECT_EQ(run(80, 210).prefill_instance(), "p1");
  a.join();
  EXPECT_EQ(a_done.get_future().get().prefill_instance(), "p0");
  p0->backend.delay_ms = 0;
  // Both idle again: B's prefix is on p1, A's on p0.
  const api::Timeline b2 = run(80, 220);
  EXPECT_EQ(b2.prefill_instance(), "p1");
  EXPECT_TRUE(absl::StrContains(b2.scheduler_note(), "48 of its prompt tokens cached"))
      << b2.scheduler_note();
  EXPECT_EQ(run(10, 230).prefill_instance(), "p0");
  EXPECT_TRUE(p1->WaitFor([](const ::pdserve::internal::WorkerStatus& s) {
    return s.prefix_cache_hit_tokens() == 3 * kBlockSize && s.prefix_caching();
  }));
  EXPECT_TRUE(p0->WaitFor([](const ::pdserve::internal::WorkerStatus& s) {
    return s.prefix_cache_hit_tokens() == 3 * kBlockSize;
  }));
}

// The same on the decode side: a request goes to the decode worker that holds its prefix's
// blocks from an earlier request (least-loaded counts them as free there), which is sent only
// the blocks after them.
TEST(DrainTest, RequestsGoToTheDecodeWorkerHoldingTheirPrefix) {
  auto c = StartFrontend();
  ASSERT_NE(c, nullptr);
  auto p0 = c->Worker(InstanceRole::kPrefill, "p0");
  auto d0 = c->Worker(InstanceRole::kDecode, "d0");
  auto d1 = c->Worker(InstanceRole::kDecode, "d1");
  ASSERT_TRUE(p0 && d0 && d1);
  ASSERT_TRUE(c->WaitHealthy({"p0", "d0", "d1"}));
  // Prefix A decodes on d0 (idle workers: the tie-break), slowly (2 layers of 300 ms a step);
  // prefix B, sent while d0 holds A's blocks, goes to d1 (more free blocks).
  d0->backend.delay_ms = 300;
  std::promise<api::Timeline> a_done;
  std::thread a([&] { a_done.set_value(RunPrefixed(*c, 10, 200, /*max_tokens=*/3)); });
  EXPECT_TRUE(c->WaitFor(
      [&](const api::ClusterStatus& s) { return c->Find(s, "d0")->kv_blocks_used() > 0; }));
  EXPECT_EQ(RunPrefixed(*c, 80, 210).decode_instance(), "d1");
  a.join();
  EXPECT_EQ(a_done.get_future().get().decode_instance(), "d0");
  d0->backend.delay_ms = 0;
  // Both idle again (as the front-end's last poll sees them): B's prefix is on d1, which is
  // sent only its last block (the first three are held), though the tie-break names d0.
  const auto idle = [&](const api::ClusterStatus& s) {
    return c->Find(s, "d0")->kv_blocks_used() == 0 && c->Find(s, "d1")->kv_blocks_used() == 0;
  };
  ASSERT_TRUE(c->WaitFor(idle));
  const api::Timeline b2 = RunPrefixed(*c, 80, 220);
  EXPECT_EQ(b2.decode_instance(), "d1");
  EXPECT_TRUE(absl::StrContains(b2.scheduler_note(), "3 prompt blocks held"))
      << b2.scheduler_note();
  // An unrelated prompt goes to d0, the tie-break: B's placement above was the cache's doing.
  ASSERT_TRUE(c->WaitFor(idle));
  const api::Timeline other = RunPrefixed(*c, 140, 230);
  EXPECT_EQ(other.decode_instance(), "d0");
  EXPECT_FALSE(absl::StrContains(other.scheduler_note(), "held")) << other.scheduler_note();
  EXPECT_TRUE(d1->WaitFor([](const ::pdserve::internal::WorkerStatus& s) {
    return s.prefix_cache_hit_tokens() == 3 * kBlockSize;
  }));
  // p0 sent 4 blocks for each request but b2, which it sent 1 (3 held): 13 sent, 3 held.
  EXPECT_TRUE(p0->WaitFor([](const ::pdserve::internal::WorkerStatus& s) {
    return s.kv_bytes_sent() > 0 && s.kv_bytes_held() * 13 == s.kv_bytes_sent() * 3;
  })) << "sent/held bytes";
}

// A conversation's next turn starts with the previous prompt and its answer: the decode worker
// that decoded it caches both, and the front-end knows (it relayed the answer), so the next
// turn goes there and is sent only what follows.
TEST(DrainTest, NextTurnFindsTheAnswerOnTheDecodeWorker) {
  auto c = StartFrontend();
  ASSERT_NE(c, nullptr);
  auto p0 = c->Worker(InstanceRole::kPrefill, "p0");
  auto d0 = c->Worker(InstanceRole::kDecode, "d0");
  auto d1 = c->Worker(InstanceRole::kDecode, "d1");
  ASSERT_TRUE(p0 && d0 && d1);
  ASSERT_TRUE(c->WaitHealthy({"p0", "d0", "d1"}));
  const auto run = [&](const std::vector<int32_t>& prompt, int max_tokens,
                       std::vector<int32_t>* answer) {
    api::GenerateRequest r;
    *r.mutable_prompt_token_ids() = {prompt.begin(), prompt.end()};
    r.set_max_tokens(max_tokens);
    r.set_ignore_eos(true);
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
    auto call = c->api->Generate(&ctx, r);
    api::GenerateResponse m;
    api::Done done;
    while (call->Read(&m)) {
      if (answer != nullptr)
        answer->insert(answer->end(), m.token_ids().begin(), m.token_ids().end());
      if (m.has_done()) done = m.done();
    }
    EXPECT_TRUE(call->Finish().ok());
    return done.timeline();
  };
  // Turn 1: 40 prompt tokens and a 30-token answer; the decode worker then holds 69 positions
  // (4 whole blocks of 16), of which the prompt alone fills 2.
  std::vector<int32_t> history;
  for (int j = 0; j < 40; ++j) history.push_back(20 + j);
  std::vector<int32_t> answer;
  const api::Timeline first = run(history, 30, &answer);
  ASSERT_EQ(answer.size(), 30u);
  const std::string holder = first.decode_instance();
  history.insert(history.end(), answer.begin(), answer.end());
  for (int j = 0; j < 10; ++j) history.push_back(200 + j);  // turn 2: 80 tokens
  const auto idle = [&](const api::ClusterStatus& s) {
    return c->Find(s, "d0")->kv_blocks_used() == 0 && c->Find(s, "d1")->kv_blocks_used() == 0;
  };
  ASSERT_TRUE(c->WaitFor(idle));
  const api::Timeline second = run(history, 2, nullptr);
  EXPECT_EQ(second.decode_instance(), holder);
  EXPECT_TRUE(absl::StrContains(second.scheduler_note(), "4 prompt blocks held"))
      << second.scheduler_note();
  auto* d = holder == "d0" ? d0.get() : d1.get();
  EXPECT_TRUE(d->WaitFor([](const ::pdserve::internal::WorkerStatus& s) {
    return s.prefix_cache_hit_tokens() == 4 * kBlockSize;
  })) << "the worker shared the 4 blocks";
}

// A request prefilled on its decode worker (conditional disaggregation) is booked there like a
// hand-off, so that placements meanwhile count the blocks it will take: from its placement
// until its first token (after which the worker's own status counts them).
TEST(DrainTest, ALocalPrefillIsBookedOnItsDecodeWorkerUntilItsFirstToken) {
  FrontendOptions fo;
  fo.local_prefill_max_tokens = 32;
  auto c = StartFrontend(fo);
  ASSERT_NE(c, nullptr);
  auto p0 = c->Worker(InstanceRole::kPrefill, "p0");
  auto d0 = c->Worker(InstanceRole::kDecode, "d0");
  ASSERT_TRUE(p0 && d0);
  ASSERT_TRUE(c->WaitHealthy({"p0", "d0"}));
  d0->backend.delay_ms = 300;  // a prefill step of 2 layers x 300 ms
  const auto booked = [&](int blocks) {
    return [&, blocks](const api::ClusterStatus& s) {
      return c->Find(s, "d0")->kv_blocks_booked() == blocks;
    };
  };
  std::thread reader;
  auto s = StartGenerate(*c, 3, &reader);  // 8 prompt tokens (and one to grow): 1 block
  EXPECT_TRUE(c->WaitFor(booked(1)));
  EXPECT_EQ(c->Find(c->Status(), "p0")->kv_blocks_booked(), 0);
  s->first.wait();
  EXPECT_TRUE(c->WaitFor(booked(0)));
  reader.join();
  EXPECT_TRUE(s->status.ok()) << s->status.error_message();
  EXPECT_EQ(s->tokens, 3);
  EXPECT_EQ(s->done.timeline().prefill_instance(), "d0");
  EXPECT_EQ(s->done.timeline().decode_instance(), "");
  // A client that cancels during the prefill: the booking goes with the request.
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
  std::thread cancelled([&] {
    api::GenerateRequest r;
    for (int j = 0; j < 8; ++j) r.add_prompt_token_ids(40 + j);
    r.set_max_tokens(3);
    auto call = c->api->Generate(&ctx, r);
    api::GenerateResponse m;
    while (call->Read(&m)) {
    }
    EXPECT_EQ(call->Finish().error_code(), grpc::StatusCode::CANCELLED);
  });
  EXPECT_TRUE(c->WaitFor(booked(1)));
  ctx.TryCancel();
  cancelled.join();
  EXPECT_TRUE(c->WaitFor(
      [&](const api::ClusterStatus& st) { return booked(0)(st) && st.requests_in_flight() == 0; }));
  d0->backend.delay_ms = 0;
}

TEST(SharedWorkersTest, FrontendListsAreCheckedAndNamesResolved) {
  auto list = ParseFrontendList(" fe-0.peers:8000,127.0.0.1:8001 ,[::1]:8002,127.0.0.1:8001");
  ASSERT_TRUE(list.ok()) << list.status();
  EXPECT_EQ(*list, (std::vector<std::string>{"fe-0.peers:8000", "127.0.0.1:8001", "[::1]:8002"}));
  for (const char* bad : {"", "fe", "fe:", "fe:0", "fe:65536", "fe:8x", "::1:8000", "[::1]8000",
                          "a:1,,b:2", ":8000"}) {
    auto parsed = ParseFrontendList(bad);
    EXPECT_TRUE(absl::IsInvalidArgument(parsed.status())) << bad;
  }
  EXPECT_EQ(ResolveFrontend("127.0.0.1:8000"), std::vector<std::string>{"127.0.0.1:8000"});
  EXPECT_EQ(ResolveFrontend("[::1]:8000"), std::vector<std::string>{"[::1]:8000"});
  // A name: its IPv4 addresses (localhost's is in every /etc/hosts).
  EXPECT_EQ(ResolveFrontend("localhost:8000"), std::vector<std::string>{"127.0.0.1:8000"});
  // One that does not resolve stands for none (now).
  EXPECT_TRUE(ResolveFrontend("no-such-host.invalid:8000").empty());
  // A front-end's id goes into ids: plain characters only.
  FrontendOptions o;
  o.model_dir = ModelDir();
  o.id = "fe a";
  EXPECT_TRUE(absl::IsInvalidArgument(Frontend::Start(o).status()));
  o.id = std::string(65, 'f');
  EXPECT_TRUE(absl::IsInvalidArgument(Frontend::Start(o).status()));
  // A worker with a malformed list does not start.
  WorkerOptions w;
  w.frontend = "127.0.0.1:1,fe";
  engine::CpuBackend backend(1);
  auto model = engine::Transformer::CreateRandom(testing::SmallTestConfig(), backend, 5);
  ASSERT_TRUE(model.ok());
  EXPECT_TRUE(absl::IsInvalidArgument(Worker::Start(**model, w).status()));
}

// A request through `c` with `request_id` (empty: the front-end names it); greedy.
struct Named {
  grpc::Status status;
  std::string request_id;
  std::vector<int32_t> tokens;
  api::Timeline timeline;
};
Named GenerateNamed(Cluster& c, const std::string& request_id, int max_tokens, int first_id = 3) {
  api::GenerateRequest r;
  r.set_request_id(request_id);
  for (int j = 0; j < 8; ++j) r.add_prompt_token_ids(first_id + j);
  r.set_max_tokens(max_tokens);
  r.set_ignore_eos(true);
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
  auto call = c.api->Generate(&ctx, r);
  api::GenerateResponse m;
  Named out;
  while (call->Read(&m)) {
    out.request_id = m.request_id();
    out.tokens.insert(out.tokens.end(), m.token_ids().begin(), m.token_ids().end());
    if (m.has_done()) out.timeline = m.done().timeline();
  }
  out.status = call->Finish();
  return out;
}

// Front-ends fe-a and fe-b, and a prefill and a decode worker (p0, d0) registered with both.
struct Shared {
  std::unique_ptr<Cluster> a, b;
  std::unique_ptr<TestWorker> p0, d0;
};
void StartShared(Shared& s) {
  FrontendOptions oa, ob;
  oa.id = "fe-a";
  ob.id = "fe-b";
  s.a = StartFrontend(oa);
  s.b = StartFrontend(ob);
  ASSERT_TRUE(s.a && s.b);
  WorkerOptions o;
  o.frontend = absl::StrCat(s.a->frontend->address(), ",", s.b->frontend->address());
  o.id = "p0";
  s.p0 = StartWorker(InstanceRole::kPrefill, o);
  o.id = "d0";
  s.d0 = StartWorker(InstanceRole::kDecode, o);
  ASSERT_TRUE(s.p0 && s.d0);
  ASSERT_TRUE(s.a->WaitHealthy({"p0", "d0"}));
  ASSERT_TRUE(s.b->WaitHealthy({"p0", "d0"}));
}

// Two front-ends share the workers, which register with both: both serve, the same client
// request id at both at once does not clash at the workers (the calls' ids there carry the
// front-ends' ids), the ids a front-end makes up carry its id, and with one front-end gone
// the other goes on serving (the workers stay ready).
TEST(SharedWorkersTest, TwoFrontendsServeThroughTheSameWorkers) {
  Shared shared;
  ASSERT_NO_FATAL_FAILURE(StartShared(shared));
  auto& [a, b, p0, d0] = shared;
  p0->backend.delay_ms = 20;  // the two requests overlap at the workers
  d0->backend.delay_ms = 20;
  auto at_b = std::async(std::launch::async, [&] { return GenerateNamed(*b, "same-id", 6); });
  const Named via_a = GenerateNamed(*a, "same-id", 6);
  const Named via_b = at_b.get();
  ASSERT_TRUE(via_a.status.ok()) << via_a.status.error_message();
  ASSERT_TRUE(via_b.status.ok()) << via_b.status.error_message();
  EXPECT_EQ(via_a.request_id, "same-id");
  EXPECT_EQ(via_b.request_id, "same-id");
  EXPECT_EQ(via_a.tokens.size(), 6u);
  EXPECT_EQ(via_a.tokens, via_b.tokens);
  p0->backend.delay_ms = 0;
  const Named named = GenerateNamed(*b, "", 2);
  ASSERT_TRUE(named.status.ok()) << named.status.error_message();
  EXPECT_TRUE(absl::StartsWith(named.request_id, "req-fe-b-")) << named.request_id;
  // A stops while B streams a request: B's goes on to its end.
  std::thread reader;
  auto streaming = StartGenerate(*b, 40, &reader);
  streaming->first.wait();
  a->frontend->Shutdown();
  reader.join();
  EXPECT_TRUE(streaming->status.ok()) << streaming->status.error_message();
  EXPECT_EQ(streaming->tokens, 40);
  d0->backend.delay_ms = 0;
  const Named after = GenerateNamed(*b, "", 6);
  ASSERT_TRUE(after.status.ok()) << after.status.error_message();
  EXPECT_EQ(after.tokens, via_a.tokens);
  absl::SleepFor(absl::Seconds(2));  // heartbeats to the gone front-end fail meanwhile
  EXPECT_TRUE(b->WaitHealthy({"p0", "d0"}));
  EXPECT_TRUE(GenerateNamed(*b, "", 2).status.ok());
}

// A front-end counts the requests other front-ends queued at a worker (reported by the worker
// per sender) as its load: with p0 holding another front-end's queue, a request goes to p1,
// where both idle it would go to p0 (the tie-break).
TEST(SharedWorkersTest, OtherFrontendsQueuesCountAsLoad) {
  auto c = StartFrontend();
  ASSERT_NE(c, nullptr);
  WorkerOptions slow;
  slow.engine.max_running = 1;  // one prompt at a time: the rest wait in its queue
  auto p0 = c->Worker(InstanceRole::kPrefill, "p0", slow);
  auto p1 = c->Worker(InstanceRole::kPrefill, "p1");
  auto d0 = c->Worker(InstanceRole::kDecode, "d0");
  ASSERT_TRUE(p0 && p1 && d0);
  ASSERT_TRUE(c->WaitHealthy({"p0", "p1", "d0"}));
  EXPECT_EQ(RunPrefixed(*c, 10, 200).prefill_instance(), "p0");  // both idle: the tie-break
  // Another front-end's prompts at p0, slowed: one runs, three wait.
  p0->backend.delay_ms = 300;
  std::vector<std::thread> others;
  for (int i = 0; i < 4; ++i) {
    others.emplace_back([&, i] {
      ::pdserve::internal::WorkRequest work = Work(absl::StrCat("other-", i), 40, 1);
      work.set_prompt_token_ids(0, 210 + i);  // no prefix in common
      work.set_frontend_id("fe-other");
      work.set_decode_kv_address(d0->worker->kv_address());
      grpc::ClientContext ctx;
      ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
      auto reader = p0->stub->Prefill(&ctx, work);
      ::pdserve::internal::WorkEvent event;
      while (reader->Read(&event)) {
      }
      reader->Finish().IgnoreError();  // its KV has no decode side waiting: it fails there
    });
  }
  EXPECT_TRUE(p0->WaitFor([](const ::pdserve::internal::WorkerStatus& s) {
    return s.queued_by_frontend_size() == 1 &&
           s.queued_by_frontend(0).frontend_id() == "fe-other" &&
           s.queued_by_frontend(0).requests() >= 2 &&
           s.queued_by_frontend(0).prompt_tokens() == 40 * s.queued_by_frontend(0).requests();
  }));
  absl::SleepFor(absl::Milliseconds(150));  // the front-end's next poll of p0
  EXPECT_EQ(RunPrefixed(*c, 120, 180).prefill_instance(), "p1");
  p0->backend.delay_ms = 0;
  for (std::thread& t : others) t.join();
}

// A worker told of a front-end by a name registers with it once it is up, whenever that is
// (the name is looked up in the background; a front-end there is dialled again every second).
TEST(SharedWorkersTest, AFrontendThatComesLaterIsFound) {
  const int port = testing::FreeLoopbackPort();
  ASSERT_GT(port, 0);
  WorkerOptions o;
  o.frontend = absl::StrCat("localhost:", port);
  o.id = "p0";
  auto p0 = StartWorker(InstanceRole::kPrefill, o);
  o.id = "d0";
  auto d0 = StartWorker(InstanceRole::kDecode, o);
  ASSERT_TRUE(p0 && d0);
  absl::SleepFor(absl::Milliseconds(1500));  // registrations fail meanwhile
  FrontendOptions f;
  f.port = port;
  auto c = StartFrontend(f);
  ASSERT_NE(c, nullptr);
  ASSERT_TRUE(c->WaitHealthy({"p0", "d0"}));
  EXPECT_TRUE(GenerateNamed(*c, "", 3).status.ok());
}

// Rolling a front-end under load loses nothing: a client of both (pdbench's MultiClient) keeps
// 4 requests in flight while one front-end drains; it finishes those it holds, refuses new
// ones with UNAVAILABLE, and the client sends those to the other.
TEST(SharedWorkersTest, DrainingAFrontendUnderLoadLosesNoRequest) {
  Shared shared;
  ASSERT_NO_FATAL_FAILURE(StartShared(shared));
  auto& [a, b, p0, d0] = shared;
  d0->backend.delay_ms = 5;  // requests of about 100 ms
  std::vector<std::unique_ptr<client::GenerateClient>> clients;
  clients.push_back(std::make_unique<client::ServingClient>(a->frontend->address()));
  clients.push_back(std::make_unique<client::ServingClient>(b->frontend->address()));
  client::MultiClient both(std::move(clients));
  std::vector<client::RequestSpec> specs(4);
  for (size_t i = 0; i < specs.size(); ++i) {
    for (int j = 0; j < 8; ++j) specs[i].prompt_token_ids.push_back(3 + 10 * i + j);
    specs[i].prompt_len = 8;
    specs[i].output_len = 8;
  }
  client::RunOptions run;
  run.concurrency = 4;
  run.max_requests = 40;
  run.request_timeout_s = 60;
  std::thread drainer([&] {
    absl::SleepFor(absl::Milliseconds(600));
    EXPECT_TRUE(a->frontend->Drain(absl::Seconds(30)));
  });
  auto result = client::RunBenchmark(both, specs, run);
  drainer.join();
  ASSERT_TRUE(result.ok()) << result.status();
  ASSERT_EQ(result->records.size(), 40u);
  for (const client::RequestRecord& r : result->records) EXPECT_TRUE(r.ok) << r.error_code;
  EXPECT_GT(both.failovers(), 0);
  a->frontend->Shutdown();
}

// KV blocks another front-end's requests will need at a decode worker (accepted, their KV not
// in yet) count against its free blocks: a request goes to d1, where with both idle it would
// go to d0 (the tie-break).
TEST(SharedWorkersTest, OtherFrontendsPromisedBlocksCount) {
  auto c = StartFrontend();
  ASSERT_NE(c, nullptr);
  auto p0 = c->Worker(InstanceRole::kPrefill, "p0");
  auto d0 = c->Worker(InstanceRole::kDecode, "d0");
  auto d1 = c->Worker(InstanceRole::kDecode, "d1");
  ASSERT_TRUE(p0 && d0 && d1);
  ASSERT_TRUE(c->WaitHealthy({"p0", "d0", "d1"}));
  EXPECT_EQ(RunPrefixed(*c, 10, 200).decode_instance(), "d0");  // the tie-break
  // Two requests of another front-end accepted at d0, waiting for KV that never comes.
  std::vector<std::unique_ptr<grpc::ClientContext>> contexts;
  std::vector<std::unique_ptr<grpc::ClientReader<::pdserve::internal::WorkEvent>>> readers;
  for (int i = 0; i < 2; ++i) {
    ::pdserve::internal::WorkRequest work = Work(absl::StrCat("other-", i), 40, 4);
    work.set_frontend_id("fe-other");
    contexts.push_back(std::make_unique<grpc::ClientContext>());
    contexts.back()->set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(30));
    readers.push_back(d0->stub->Decode(contexts.back().get(), work));
    ::pdserve::internal::WorkEvent accepted;
    ASSERT_TRUE(readers.back()->Read(&accepted));
  }
  EXPECT_TRUE(d0->WaitFor([](const ::pdserve::internal::WorkerStatus& s) {
    return s.queued_by_frontend_size() == 1 && s.queued_by_frontend(0).kv_blocks_promised() == 6;
  }));                                      // 2 x 41 positions in blocks of 16
  absl::SleepFor(absl::Milliseconds(150));  // the front-end's next poll of d0
  EXPECT_EQ(RunPrefixed(*c, 120, 180).decode_instance(), "d1");
  for (auto& ctx : contexts) ctx->TryCancel();
  for (auto& r : readers) r->Finish().IgnoreError();
}

}  // namespace
}  // namespace pds::server

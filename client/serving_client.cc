#include "client/serving_client.h"

#include <utility>

#include "absl/strings/str_cat.h"

namespace pds::client {
namespace {

using pdserve::v1::GenerateRequest;
using pdserve::v1::GenerateResponse;

// Timeouts of a century or more (absl::InfiniteDuration() included) are no deadline: added to
// the clock's nanosecond ticks they would overflow into a deadline already past.
constexpr absl::Duration kNoDeadlineFrom = absl::Hours(24 * 365 * 100);

std::chrono::system_clock::time_point DeadlineAfter(absl::Duration timeout) {
  if (timeout >= kNoDeadlineFrom) return std::chrono::system_clock::time_point::max();
  return std::chrono::system_clock::now() + absl::ToChronoMicroseconds(timeout);
}

}  // namespace

// Counts a client's live calls, so the client (and its channel) outlives every call: gRPC
// must not destroy a channel from inside one of its callbacks, which the last call's OnDone
// would otherwise do when the client went first.
struct ServingClient::LiveCalls {
  std::mutex mu;
  std::condition_variable cv;
  int64_t count = 0;
};

namespace {

// Registers a call for its lifetime; the first member of a reactor, so destroyed last.
class LiveCallToken {
 public:
  explicit LiveCallToken(std::shared_ptr<ServingClient::LiveCalls> live) : live_(std::move(live)) {
    std::lock_guard<std::mutex> lock(live_->mu);
    ++live_->count;
  }
  ~LiveCallToken() {
    std::lock_guard<std::mutex> lock(live_->mu);
    if (--live_->count == 0) live_->cv.notify_all();
  }

 private:
  std::shared_ptr<ServingClient::LiveCalls> live_;
};

class GenerateReactor final : public grpc::ClientReadReactor<GenerateResponse>,
                              public GenerateCall {
 public:
  GenerateReactor(std::shared_ptr<ServingClient::LiveCalls> live, GenerateRequest request,
                  GenerateCallbacks callbacks)
      : token_(std::move(live)), request_(std::move(request)), callbacks_(std::move(callbacks)) {}

  // `self` keeps the reactor alive until OnDone.
  void Start(pdserve::v1::Serving::Stub* stub, absl::Duration timeout,
             std::shared_ptr<GenerateReactor> self) {
    self_ = std::move(self);
    if (timeout > absl::ZeroDuration()) context_.set_deadline(DeadlineAfter(timeout));
    stub->async()->Generate(&context_, &request_, this);
    StartRead(&response_);
    StartCall();
  }

  void Cancel() override { context_.TryCancel(); }

  void Wait() override {
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait(lock, [&] { return done_; });
  }

  bool WaitFor(absl::Duration timeout) override {
    std::unique_lock<std::mutex> lock(mu_);
    if (timeout >= kNoDeadlineFrom) {
      cv_.wait(lock, [&] { return done_; });
      return true;
    }
    return cv_.wait_for(lock, absl::ToChronoMicroseconds(timeout), [&] { return done_; });
  }

  void OnReadDone(bool ok) override {
    if (!ok) return;  // the stream ended; OnDone follows
    Clock::time_point now = Clock::now();
    if (callbacks_.on_message) callbacks_.on_message(response_, now);
    response_.Clear();
    StartRead(&response_);
  }

  void OnDone(const grpc::Status& status) override {
    Clock::time_point now = Clock::now();
    if (callbacks_.on_done) callbacks_.on_done(status, now);
    std::shared_ptr<GenerateReactor> self = std::move(self_);  // may be the last reference
    {
      std::lock_guard<std::mutex> lock(mu_);
      done_ = true;
    }
    cv_.notify_all();
  }

 private:
  LiveCallToken token_;
  grpc::ClientContext context_;
  GenerateRequest request_;
  GenerateResponse response_;
  GenerateCallbacks callbacks_;
  std::shared_ptr<GenerateReactor> self_;
  std::mutex mu_;
  std::condition_variable cv_;
  bool done_ = false;
};

}  // namespace

absl::Status FromGrpc(const grpc::Status& status) {
  return absl::Status(static_cast<absl::StatusCode>(status.error_code()), status.error_message());
}

ServingClient::ServingClient(const std::string& target)
    : live_(std::make_shared<LiveCalls>()), target_(target) {
  grpc::ChannelArguments args;
  // Reconnect quickly after a refused connection, so an early failure does not stall a run.
  args.SetInt(GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS, 100);
  args.SetInt(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS, 1000);
  // Only to `target`: gRPC would otherwise follow http_proxy/https_proxy/grpc_proxy from the
  // environment (no exemption for loopback).
  args.SetInt(GRPC_ARG_ENABLE_HTTP_PROXY, 0);
  channel_ = grpc::CreateCustomChannel(target, grpc::InsecureChannelCredentials(), args);
  stub_ = pdserve::v1::Serving::NewStub(channel_);
}

ServingClient::~ServingClient() {
  std::unique_lock<std::mutex> lock(live_->mu);
  // Bounded: a call that never ends (it has a deadline, or was cancelled) must not hang us.
  live_->cv.wait_for(lock, std::chrono::seconds(30), [&] { return live_->count == 0; });
}

absl::Status ServingClient::WaitForConnected(absl::Duration timeout) {
  if (channel_->WaitForConnected(DeadlineAfter(timeout))) return absl::OkStatus();
  return absl::UnavailableError(
      absl::StrCat("could not connect to ", target_, " within ", absl::FormatDuration(timeout)));
}

absl::StatusOr<pdserve::v1::ClusterStatus> ServingClient::GetClusterStatus(absl::Duration timeout) {
  grpc::ClientContext context;
  context.set_deadline(DeadlineAfter(timeout));
  pdserve::v1::ClusterStatus status;
  grpc::Status s = stub_->GetClusterStatus(&context, pdserve::v1::ClusterStatusRequest(), &status);
  if (!s.ok()) {
    absl::Status st = FromGrpc(s);
    return absl::Status(st.code(),
                        absl::StrCat("GetClusterStatus on ", target_, ": ", st.message()));
  }
  return status;
}

std::shared_ptr<GenerateCall> ServingClient::StartGenerate(const GenerateRequest& request,
                                                           absl::Duration timeout,
                                                           GenerateCallbacks callbacks) {
  auto reactor = std::make_shared<GenerateReactor>(live_, request, std::move(callbacks));
  reactor->Start(stub_.get(), timeout, reactor);
  return reactor;
}

ServingClient::StreamResult ServingClient::Generate(const GenerateRequest& request,
                                                    absl::Duration timeout) {
  StreamResult result;
  std::mutex mu;
  GenerateCallbacks callbacks;
  callbacks.on_message = [&](const GenerateResponse& msg, Clock::time_point t) {
    std::lock_guard<std::mutex> lock(mu);
    result.messages.push_back(msg);
    result.times.push_back(t);
  };
  callbacks.on_done = [&](const grpc::Status& s, Clock::time_point) {
    std::lock_guard<std::mutex> lock(mu);
    result.status = s;
  };
  StartGenerate(request, timeout, std::move(callbacks))->Wait();
  std::lock_guard<std::mutex> lock(mu);
  return result;
}

}  // namespace pds::client

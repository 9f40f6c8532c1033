#include "client/multi_client.h"

#include <condition_variable>
#include <mutex>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace pds::client {

// One request: the call on the current target, replaced by one on the next after a refusal.
class MultiClient::Call : public GenerateCall, public std::enable_shared_from_this<Call> {
 public:
  Call(MultiClient& owner, const pdserve::v1::GenerateRequest& request, absl::Duration timeout,
       GenerateCallbacks callbacks, size_t first)
      : owner_(owner),
        request_(request),
        deadline_(timeout > absl::ZeroDuration() ? absl::Now() + timeout : absl::InfiniteFuture()),
        callbacks_(std::move(callbacks)),
        target_(first) {}

  // Starts the call on target_ (not under mu_: a call refused at once may call back here).
  void Start() {
    const absl::Duration left =
        deadline_ == absl::InfiniteFuture() ? absl::ZeroDuration() : deadline_ - absl::Now();
    if (deadline_ != absl::InfiniteFuture() && left <= absl::ZeroDuration()) {
      Finish(grpc::Status(grpc::StatusCode::DEADLINE_EXCEEDED, "deadline passed before a retry"));
      return;
    }
    size_t attempt;
    {
      std::lock_guard<std::mutex> lock(mu_);
      attempt = tries_;
    }
    auto self = shared_from_this();
    GenerateCallbacks cb;
    cb.on_message = [self](const pdserve::v1::GenerateResponse& m, Clock::time_point t) {
      self->answered_ = true;
      if (self->callbacks_.on_message) self->callbacks_.on_message(m, t);
    };
    cb.on_done = [self](const grpc::Status& s, Clock::time_point t) { self->Done(s, t); };
    std::shared_ptr<GenerateCall> call =
        owner_.clients_[target_]->StartGenerate(request_, left, std::move(cb));
    std::lock_guard<std::mutex> lock(mu_);
    if (tries_ != attempt || done_) return;  // it ended already (refused at once)
    current_ = std::move(call);
    if (cancelled_) current_->Cancel();
  }

  void Cancel() override {
    std::shared_ptr<GenerateCall> call;
    {
      std::lock_guard<std::mutex> lock(mu_);
      cancelled_ = true;
      call = current_;
    }
    if (call) call->Cancel();
  }
  void Wait() override {
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait(lock, [&] { return done_; });
  }
  bool WaitFor(absl::Duration timeout) override {
    std::unique_lock<std::mutex> lock(mu_);
    return cv_.wait_for(lock, absl::ToChronoNanoseconds(timeout), [&] { return done_; });
  }

 private:
  void Done(const grpc::Status& s, Clock::time_point t) {
    bool again;
    {
      std::lock_guard<std::mutex> lock(mu_);
      again = s.error_code() == grpc::StatusCode::UNAVAILABLE && !answered_ && !cancelled_ &&
              ++tries_ < owner_.clients_.size();
      if (again) target_ = (target_ + 1) % owner_.clients_.size();
    }
    if (again) {
      ++owner_.failovers_;
      Start();
      return;
    }
    Finish(s, t);
  }
  void Finish(const grpc::Status& s, Clock::time_point t = Clock::now()) {
    if (callbacks_.on_done) callbacks_.on_done(s, t);
    std::lock_guard<std::mutex> lock(mu_);
    done_ = true;
    current_.reset();
    cv_.notify_all();
  }

  MultiClient& owner_;
  const pdserve::v1::GenerateRequest request_;
  const absl::Time deadline_;
  const GenerateCallbacks callbacks_;
  std::atomic<bool> answered_{false};  // a message came: no retry
  std::mutex mu_;
  std::condition_variable cv_;
  size_t target_;
  size_t tries_ = 0;
  bool cancelled_ = false;
  bool done_ = false;
  std::shared_ptr<GenerateCall> current_;
};

MultiClient::MultiClient(std::vector<std::unique_ptr<GenerateClient>> clients)
    : clients_(std::move(clients)) {
  std::vector<std::string> targets;
  for (const auto& c : clients_) targets.push_back(c->target());
  target_ = absl::StrJoin(targets, ",");
}

absl::Status MultiClient::WaitForConnected(absl::Duration timeout) {
  const absl::Time deadline = absl::Now() + timeout;
  std::vector<std::string> down;
  for (const auto& c : clients_) {
    absl::Status s = c->WaitForConnected(std::max(absl::ZeroDuration(), deadline - absl::Now()));
    if (!s.ok()) down.push_back(std::string(s.message()));
  }
  if (down.empty()) return absl::OkStatus();
  return absl::UnavailableError(absl::StrJoin(down, "; "));
}

absl::StatusOr<pdserve::v1::ClusterStatus> MultiClient::GetClusterStatus(absl::Duration timeout) {
  absl::Status last = absl::UnavailableError("no target");
  const absl::Time deadline = absl::Now() + timeout;
  for (const auto& c : clients_) {
    auto s = c->GetClusterStatus(std::max(absl::ZeroDuration(), deadline - absl::Now()));
    if (s.ok() || s.status().code() == absl::StatusCode::kUnimplemented) return s;
    last = s.status();
  }
  return last;
}

std::shared_ptr<GenerateCall> MultiClient::StartGenerate(
    const pdserve::v1::GenerateRequest& request, absl::Duration timeout,
    GenerateCallbacks callbacks) {
  auto call = std::make_shared<Call>(*this, request, timeout, std::move(callbacks),
                                     next_.fetch_add(1) % clients_.size());
  call->Start();
  return call;
}

}  // namespace pds::client

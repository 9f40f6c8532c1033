#include "engine/transfer/fake_communicator.h"

#include <atomic>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <map>
#include <mutex>
#include <utility>

#include "absl/strings/str_cat.h"

namespace pds::engine {

namespace {

// The operations enqueued on one stream, run in order by Communicator::Wait.
using Op = std::function<absl::Status(absl::Time deadline, const std::function<bool()>& stop)>;
struct FakeStream {
  std::mutex mu;
  std::deque<Op> ops;
};

void Enqueue(StreamHandle stream, Op op) {
  auto* s = static_cast<FakeStream*>(stream);
  std::lock_guard<std::mutex> lock(s->mu);
  s->ops.push_back(std::move(op));
}

}  // namespace

struct FakeCommWorld::State {
  struct Group {
    int nranks = 0;
    int joined = 0;
    bool aborted = false;
    std::map<std::pair<int, int>, std::deque<std::string>> mailbox;  // (from, to)
  };
  std::mutex mu;
  std::condition_variable cv;
  std::atomic<int> live{0};  // communicators joined and not destroyed
  uint64_t next_id = 0;
  std::map<std::string, std::shared_ptr<Group>> groups;
};

namespace {

class FakeCommunicator final : public Communicator {
 public:
  FakeCommunicator(std::shared_ptr<FakeCommWorld::State> state,
                   std::shared_ptr<FakeCommWorld::State::Group> group, int rank,
                   std::atomic<int>* fail_sends)
      : state_(std::move(state)), group_(std::move(group)), rank_(rank), fail_sends_(fail_sends) {
    state_->live.fetch_add(1);
  }
  ~FakeCommunicator() override { state_->live.fetch_sub(1); }

  int rank() const override { return rank_; }
  int size() const override { return group_->nranks; }
  absl::Status GroupStart() override {
    ++depth_;
    return absl::OkStatus();
  }
  absl::Status GroupEnd(absl::Time deadline) override {
    if (depth_ == 0) return absl::FailedPreconditionError("GroupEnd without GroupStart");
    --depth_;
    return absl::OkStatus();
  }

  absl::Status Send(const void* data, size_t bytes, int peer, StreamHandle stream) override {
    if (absl::Status bad = CheckPeer(peer); !bad.ok()) return bad;
    Enqueue(stream, [this, data, bytes, peer](absl::Time, const std::function<bool()>&) {
      int left = fail_sends_->load();
      while (left > 0 && !fail_sends_->compare_exchange_weak(left, left - 1)) {
      }
      if (left > 0) return absl::InternalError("injected send failure");
      std::lock_guard<std::mutex> lock(state_->mu);
      if (group_->aborted) return absl::AbortedError("communicator aborted");
      group_->mailbox[{rank_, peer}].emplace_back(static_cast<const char*>(data), bytes);
      state_->cv.notify_all();
      return absl::OkStatus();
    });
    return absl::OkStatus();
  }

  absl::Status Recv(void* data, size_t bytes, int peer, StreamHandle stream) override {
    if (absl::Status bad = CheckPeer(peer); !bad.ok()) return bad;
    Enqueue(
        stream, [this, data, bytes, peer](absl::Time deadline, const std::function<bool()>& stop) {
          std::unique_lock<std::mutex> lock(state_->mu);
          auto& queue = group_->mailbox[{peer, rank_}];
          while (queue.empty()) {
            if (group_->aborted) return absl::AbortedError("communicator aborted");
            if (absl::Now() >= deadline) {
              return absl::DeadlineExceededError(
                  absl::StrCat("rank ", rank_, " waited for rank ", peer, " past the deadline"));
            }
            if (stop && stop()) return absl::CancelledError("stopped while receiving");
            state_->cv.wait_for(lock, std::chrono::milliseconds(5));
          }
          std::string message = std::move(queue.front());
          queue.pop_front();
          if (message.size() != bytes) {
            return absl::InternalError(absl::StrCat("rank ", rank_, " expected ", bytes,
                                                    " bytes from rank ", peer, ", got ",
                                                    message.size()));
          }
          std::memcpy(data, message.data(), bytes);
          return absl::OkStatus();
        });
    return absl::OkStatus();
  }

  absl::Status Wait(StreamHandle stream, absl::Time deadline,
                    const std::function<bool()>& stop) override {
    auto* s = static_cast<FakeStream*>(stream);
    while (true) {
      Op op;
      {
        std::lock_guard<std::mutex> lock(s->mu);
        if (s->ops.empty()) return absl::OkStatus();
        op = std::move(s->ops.front());
        s->ops.pop_front();
      }
      absl::Status status = op(deadline, stop);
      if (!status.ok()) {
        std::lock_guard<std::mutex> lock(s->mu);
        s->ops.clear();
        return status;
      }
    }
  }

  void Abort() override {
    std::lock_guard<std::mutex> lock(state_->mu);
    group_->aborted = true;
    state_->cv.notify_all();
  }

 private:
  absl::Status CheckPeer(int peer) const {
    if (peer < 0 || peer >= group_->nranks || peer == rank_) {
      return absl::InvalidArgumentError(absl::StrCat("bad peer ", peer, " for rank ", rank_));
    }
    return absl::OkStatus();
  }

  const std::shared_ptr<FakeCommWorld::State> state_;
  const std::shared_ptr<FakeCommWorld::State::Group> group_;
  const int rank_;
  std::atomic<int>* const fail_sends_;
  int depth_ = 0;
};

}  // namespace

FakeCommWorld::FakeCommWorld() : state_(std::make_shared<State>()) {}
FakeCommWorld::~FakeCommWorld() = default;

absl::StatusOr<std::string> FakeCommWorld::NewUniqueId() {
  std::lock_guard<std::mutex> lock(state_->mu);
  return absl::StrCat("fake-comm-", state_->next_id++);
}

absl::StatusOr<std::unique_ptr<Communicator>> FakeCommWorld::Join(const std::string& unique_id,
                                                                  int nranks, int rank,
                                                                  absl::Time deadline) {
  if (nranks < 1 || rank < 0 || rank >= nranks) {
    return absl::InvalidArgumentError(absl::StrCat("rank ", rank, " of ", nranks));
  }
  std::unique_lock<std::mutex> lock(state_->mu);
  std::shared_ptr<State::Group>& slot = state_->groups[unique_id];
  if (!slot) {
    slot = std::make_shared<State::Group>();
    slot->nranks = nranks;
  }
  std::shared_ptr<State::Group> group = slot;
  if (group->nranks != nranks || group->joined >= nranks) {
    return absl::FailedPreconditionError(absl::StrCat("communicator '", unique_id, "' has ",
                                                      group->nranks, " ranks, ", group->joined,
                                                      " joined"));
  }
  ++group->joined;
  state_->cv.notify_all();
  while (group->joined < nranks) {
    if (state_->cv.wait_until(lock, absl::ToChronoTime(deadline)) == std::cv_status::timeout &&
        group->joined < nranks) {
      return absl::DeadlineExceededError(absl::StrCat("rank ", rank, " of communicator '",
                                                      unique_id,
                                                      "': the other ranks never "
                                                      "joined"));
    }
  }
  joins_.fetch_add(1);
  return std::unique_ptr<Communicator>(
      std::make_unique<FakeCommunicator>(state_, std::move(group), rank, &fail_sends_));
}

int FakeCommWorld::live() const { return state_->live.load(); }

absl::StatusOr<StreamHandle> FakeCommWorld::CreateStream() {
  if (delay_skip_.fetch_sub(1) == 0) absl::SleepFor(delay_);
  return static_cast<StreamHandle>(new FakeStream);
}

void FakeCommWorld::DestroyStream(StreamHandle stream) { delete static_cast<FakeStream*>(stream); }

absl::StatusOr<DeviceBuffer> FakeCommWorld::Allocate(size_t bytes) {
  auto* data = new uint8_t[bytes];
  return DeviceBuffer(data, bytes, [](void* p) { delete[] static_cast<uint8_t*>(p); });
}

absl::Status FakeCommWorld::CopyAsync(void* dst, const void* src, size_t bytes,
                                      StreamHandle stream) {
  Enqueue(stream, [dst, src, bytes](absl::Time, const std::function<bool()>&) {
    std::memcpy(dst, src, bytes);
    return absl::OkStatus();
  });
  return absl::OkStatus();
}

}  // namespace pds::engine

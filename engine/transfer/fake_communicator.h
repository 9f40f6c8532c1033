// An in-process CommDevice on host memory, for testing the NCCL transport's protocol without
// GPUs: every rank of a communicator lives in this process (each side of a test gets the same
// world). A stream is a queue of operations run in order when a Wait drains it; a send posts a
// copy of its bytes to the peer's mailbox, a receive takes the next message from that peer and
// fails on a size mismatch (where NCCL would hang or corrupt). Faults can be injected.
#pragma once

#include <atomic>
#include <memory>
#include <string>

#include "absl/time/time.h"
#include "engine/transfer/communicator.h"

namespace pds::engine {

class FakeCommWorld final : public CommDevice {
 public:
  FakeCommWorld();
  ~FakeCommWorld() override;

  std::string name() const override { return "fake communicator"; }
  absl::StatusOr<std::string> NewUniqueId() override;
  absl::StatusOr<std::unique_ptr<Communicator>> Join(const std::string& unique_id, int nranks,
                                                     int rank, absl::Time deadline) override;
  absl::StatusOr<StreamHandle> CreateStream() override;
  void DestroyStream(StreamHandle stream) override;
  absl::StatusOr<DeviceBuffer> Allocate(size_t bytes) override;
  absl::Status CopyAsync(void* dst, const void* src, size_t bytes, StreamHandle stream) override;

  // Fault injection: the next `n` sends fail when they run (an asynchronous error).
  void FailSends(int n) { fail_sends_.store(n); }
  // Communicators joined so far (each rank counts), and those not yet destroyed.
  int joins() const { return joins_.load(); }
  int live() const;
  // Fault injection: after `skip` more CreateStream calls, the next one takes `delay` (a slow
  // device on one side of a setup).
  void DelayCreateStream(int skip, absl::Duration delay) {
    delay_ = delay;
    delay_skip_.store(skip);
  }

  struct State;

 private:
  std::shared_ptr<State> state_;
  std::atomic<int> fail_sends_{0};
  std::atomic<int> joins_{0};
  std::atomic<int> delay_skip_{-1};
  absl::Duration delay_;
};

}  // namespace pds::engine

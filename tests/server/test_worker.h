// A worker in-process for server tests: its own model on a CPU backend that can be told to
// fail or slow down mid-step, and a stub of its control service.
#pragma once

#include <atomic>
#include <chrono>
#include <memory>
#include <string>

#include "absl/time/clock.h"
#include "engine/backend/cpu_backend.h"
#include "engine/model/transformer.h"
#include "engine/transfer/kv_transport.h"
#include "engine/transfer/tcp_transport.h"
#include "grpcpp/grpcpp.h"
#include "gtest/gtest.h"
#include "pdserve/internal/control.grpc.pb.h"
#include "server/worker.h"

namespace pds::server {

inline constexpr int kBlockSize = 16;

// Calls `get` every 20 ms until `done(get())` holds (true) or `timeout` has passed (false).
template <typename Get, typename Done>
bool PollUntil(Get get, Done done, absl::Duration timeout) {
  const absl::Time deadline = absl::Now() + timeout;
  while (absl::Now() < deadline) {
    if (done(get())) return true;
    absl::SleepFor(absl::Milliseconds(20));
  }
  return false;
}

// A CPU backend whose attention fails while `fail` is set (a device fault in the middle of an
// engine step), or takes `delay_ms` longer.
class FaultyBackend : public engine::CpuBackend {
 public:
  FaultyBackend() : CpuBackend(1) {}
  absl::Status Attention(const void* q, int64_t q_stride, const void* k_cache, const void* v_cache,
                         void* out, int64_t heads, int64_t kv_heads, int64_t head_dim,
                         float scale) override {
    if (fail.load()) return absl::InternalError("injected device fault");
    if (const int ms = delay_ms.load(); ms > 0) absl::SleepFor(absl::Milliseconds(ms));
    return CpuBackend::Attention(q, q_stride, k_cache, v_cache, out, heads, kv_heads, head_dim,
                                 scale);
  }
  std::atomic<bool> fail{false};
  std::atomic<int> delay_ms{0};  // added to every attention call (a slow step)
};

// One worker on its own model and backend, and a stub of its service.
struct TestWorker {
  FaultyBackend backend;
  engine::ModelConfig config;
  std::unique_ptr<engine::Transformer> model;
  std::unique_ptr<Worker> worker;
  std::unique_ptr<::pdserve::internal::Worker::Stub> stub;

  ::pdserve::internal::WorkerStatus Status() {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(10));
    ::pdserve::internal::WorkerStatus status;
    EXPECT_TRUE(stub->GetStatus(&ctx, ::pdserve::internal::WorkerStatusRequest(), &status).ok());
    return status;
  }
  // Polls the worker's status (refreshed by its loop at least every 50 ms) until `done`.
  template <typename F>
  bool WaitFor(F done, absl::Duration timeout = absl::Seconds(20)) {
    return PollUntil([this] { return Status(); }, done, timeout);
  }
  // Sends `source` as the KV of `num_tokens` positions of request `id` into this worker.
  absl::Status SendKv(const std::string& id, int32_t num_tokens, engine::KvSource& source) {
    return engine::CreateTcpKvSender()
        ->Send(worker->kv_address(), Header(id, num_tokens), source,
               absl::Now() + absl::Seconds(30))
        .status();
  }
  // A transfer header for `num_tokens` positions that fits this worker's cache.
  engine::KvTransferHeader Header(const std::string& id, int32_t num_tokens) const {
    engine::KvTransferHeader h;
    h.request_id = id;
    h.num_tokens = num_tokens;
    h.num_layers = static_cast<int32_t>(config.num_layers);
    h.num_blocks = (num_tokens + kBlockSize - 1) / kBlockSize;
    h.kv_heads = static_cast<int32_t>(config.num_kv_heads);
    h.block_size = kBlockSize;
    h.head_dim = static_cast<int32_t>(config.head_dim);
    h.dtype = engine::DType::kF32;
    h.next_token = 7;
    return h;
  }
};

// Starts a worker of `role` on 127.0.0.1 with the TCP KV transport, blocks of kBlockSize and
// (unless `options` says) 64 of them; null (with a test failure) when it does not start.
std::unique_ptr<TestWorker> StartWorker(scheduler::InstanceRole role, WorkerOptions options);

// A work request of `prompt_len` tokens for `max_tokens` tokens (EOS ignored), 60 s deadline.
::pdserve::internal::WorkRequest Work(const std::string& id, int prompt_len, int max_tokens);

}  // namespace pds::server

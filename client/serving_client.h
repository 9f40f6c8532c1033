// A small client for pdserve's public Serving API (proto/pdserve/v1/serving.proto): streaming
// Generate with a timestamp per message, cancellation, deadlines, and GetClusterStatus.
//
// Calls use gRPC's callback API, so any number can be in flight without a thread each; the
// caller bounds how many it starts. Callbacks run on gRPC's threads: keep them short.
#pragma once

#include <chrono>
#include <condition_variable>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "grpcpp/grpcpp.h"
#include "pdserve/v1/serving.grpc.pb.h"

namespace pds::client {

using Clock = std::chrono::steady_clock;

// gRPC status -> absl::Status (the codes are the same numbers).
absl::Status FromGrpc(const grpc::Status& status);

struct GenerateCallbacks {
  // Every message of the stream, with the time it arrived. Called in order, never concurrently
  // for one call.
  std::function<void(const pdserve::v1::GenerateResponse&, Clock::time_point)> on_message;
  // Once, last: the final status and when it arrived.
  std::function<void(const grpc::Status&, Clock::time_point)> on_done;
};

// One streaming Generate call in flight. Keep the handle to cancel or wait; dropping it does
// not cancel the call (it runs to completion and its callbacks still fire).
class GenerateCall {
 public:
  virtual ~GenerateCall() = default;
  // Cancels the call (ClientContext::TryCancel); it then ends with CANCELLED unless it has
  // already ended. The server cancels the request everywhere.
  virtual void Cancel() = 0;
  // Blocks until on_done has returned.
  virtual void Wait() = 0;
  // Waits at most `timeout`; true when the call has ended.
  virtual bool WaitFor(absl::Duration timeout) = 0;
};

// What pdbench drives: pdserve's gRPC API (ServingClient, below) or an OpenAI-compatible HTTP
// server (OpenAiClient, client/openai_client.h), behind the same calls.
class GenerateClient {
 public:
  virtual ~GenerateClient() = default;
  virtual const std::string& target() const = 0;
  // Waits up to `timeout` for the target to answer; UNAVAILABLE (naming it) if it does not.
  virtual absl::Status WaitForConnected(absl::Duration timeout) = 0;
  // UNIMPLEMENTED where the server has no cluster status.
  virtual absl::StatusOr<pdserve::v1::ClusterStatus> GetClusterStatus(absl::Duration timeout) = 0;
  // Starts a Generate call. `timeout` > 0 sets its deadline (it then ends with
  // DEADLINE_EXCEEDED).
  virtual std::shared_ptr<GenerateCall> StartGenerate(const pdserve::v1::GenerateRequest& request,
                                                      absl::Duration timeout,
                                                      GenerateCallbacks callbacks) = 0;
};

class ServingClient : public GenerateClient {
 public:
  // An insecure channel to `target` ("host:port"); it connects lazily. Nothing is ever sent
  // anywhere else.
  explicit ServingClient(const std::string& target);
  // Waits (at most 30 s) until every call started by this client has ended and its handle
  // has been released: drop GenerateCall handles before the client.
  ~ServingClient();
  ServingClient(const ServingClient&) = delete;
  ServingClient& operator=(const ServingClient&) = delete;

  const std::string& target() const override { return target_; }

  // Waits up to `timeout` for the channel to connect; UNAVAILABLE (naming the target) if not.
  absl::Status WaitForConnected(absl::Duration timeout) override;

  absl::StatusOr<pdserve::v1::ClusterStatus> GetClusterStatus(absl::Duration timeout) override;

  // Fails fast with UNAVAILABLE when the target cannot be reached.
  std::shared_ptr<GenerateCall> StartGenerate(const pdserve::v1::GenerateRequest& request,
                                              absl::Duration timeout,
                                              GenerateCallbacks callbacks) override;

  // A whole stream, blocking.
  struct StreamResult {
    grpc::Status status;
    std::vector<pdserve::v1::GenerateResponse> messages;
    std::vector<Clock::time_point> times;
  };
  StreamResult Generate(const pdserve::v1::GenerateRequest& request, absl::Duration timeout);

 public:
  struct LiveCalls;

 private:
  std::shared_ptr<LiveCalls> live_;
  std::string target_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<pdserve::v1::Serving::Stub> stub_;
};

}  // namespace pds::client

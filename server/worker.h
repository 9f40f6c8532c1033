// A pdserve worker process: one engine instance in the prefill, decode or colocated role,
// served over the internal control API (proto/pdserve/internal/control.proto).
//
// Threads: one engine loop owns the LlmEngine (every engine call runs there, posted as a
// task); gRPC handler threads stream each request's events from a per-request channel; the
// KV transport's threads move KV caches (prefill: a small pool of senders; decode: the
// receiver's connection threads write into blocks reserved through the loop); one thread
// registers with the front-ends, repeats it as a heartbeat and keeps the gRPC health service's
// statuses current.
//
// Health (grpc.health.v1, for orchestrators' probes): the server's overall status ("") is
// SERVING unless the engine loop has not moved for `stall_timeout` (a hung device: restart
// it); "pdserve.internal.Worker" is SERVING once the worker is registered with a front-end
// (or has none) and is not draining.
#pragma once

#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "engine/model/transformer.h"
#include "engine/runtime/llm_engine.h"
#include "scheduler/dispatch_policy.h"
#include "scheduler/latency_model.h"

namespace pds::server {

struct WorkerOptions {
  std::string id;  // unique in the cluster; default "<role>-<port>"
  scheduler::InstanceRole role = scheduler::InstanceRole::kColocated;
  std::string host = "127.0.0.1";  // listened on (gRPC and the KV receiver)
  // The host others reach this worker at (registered with the front-end: its gRPC and KV
  // addresses); empty: `host`, which must then not be a wildcard (0.0.0.0, ::).
  std::string advertise_host;
  int port = 0;     // gRPC (0: ephemeral)
  int kv_port = 0;  // decode: KV receiver (0: ephemeral)
  // The front-ends to register with, "host:port[,host:port...]" (server/grpc_util.h's
  // ParseFrontendList); a name with several addresses (a Kubernetes headless Service) means a
  // front-end at each. The worker is ready once one has it. Empty: none.
  std::string frontend;
  // KV hand-off: "tcp" (host buffers), "cuda-ipc" (device copies between processes on one
  // host) or "nccl"; empty: cuda-ipc on the CUDA backend, tcp otherwise. Both sides of a
  // hand-off must use the same one (a mismatch fails the transfer, naming both).
  std::string kv_transport;
  // Prefill: "layered" sends each layer's KV while the step that completes the prompt goes on
  // (the token follows at the end); "after" sends it once the step has ended.
  std::string kv_handoff = "layered";
  std::string model_name;
  int32_t vocab_size = 0;
  // The model's tokens as bytes, for requests with a json_schema (refused without it).
  std::shared_ptr<const engine::TokenVocabulary> token_vocabulary;
  engine::EngineOptions engine;
  int max_queued = 256;  // requests accepted and not finished beyond the running batch
  // Prefill: KV transfers in flight at once. A layer-by-layer hand-off holds its thread from
  // the start of the step that completes its prompt, so one step's prompts each need one.
  int transfer_threads = 16;
  absl::Duration kv_transfer_timeout = absl::Seconds(60);
  // How long an RPC waits for the engine loop to take up its request (then
  // DEADLINE_EXCEEDED, and the request is never run).
  absl::Duration loop_wait = absl::Seconds(30);
  // Decode and colocated workers: with a latency model and a TPOT target, each step's batch
  // is capped so that its predicted time stays within the target.
  std::shared_ptr<const scheduler::LatencyModel> latency_model;
  double tpot_slo_ms = 0;
  // The engine loop not moving for this long turns the overall health status NOT_SERVING.
  absl::Duration stall_timeout = absl::Seconds(60);
};

class Worker {
 public:
  // Starts serving. `model` must outlive the worker.
  static absl::StatusOr<std::unique_ptr<Worker>> Start(engine::Transformer& model,
                                                       WorkerOptions options);
  ~Worker();
  Worker(const Worker&) = delete;
  Worker& operator=(const Worker&) = delete;

  const std::string& id() const;
  std::string address() const;     // gRPC address others reach (advertised host:port)
  std::string kv_address() const;  // decode: the KV receiver's address; else empty
  // Graceful stop, first half: from now on new requests are refused with UNAVAILABLE (the
  // front-end, told at once, places them elsewhere) and the worker reports itself draining;
  // returns once every request it holds has finished (true) or `timeout` has passed (false).
  // Shutdown() does the rest.
  bool Drain(absl::Duration timeout);
  // Stops serving: requests in flight end with UNAVAILABLE, KV transfers break off, every
  // thread is joined. Idempotent.
  void Shutdown();

  class Impl;

 private:
  explicit Worker(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace pds::server

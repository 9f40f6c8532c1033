// The pdserve front-end: the public Serving API (proto/pdserve/v1/serving.proto) and the
// workers' Registry. It validates and tokenizes requests, tracks every request in flight,
// asks the dispatch policy (scheduler/) where to run each, relays the prefill and decode
// workers' streams to the client with text, and health-checks the workers.
//
// Its own health (grpc.health.v1, for orchestrators' probes): the overall status ("") is
// SERVING while the process runs; "pdserve.v1.Serving" is SERVING while it can serve a
// request (a healthy prefill and decode worker, or a colocated one, none of them draining)
// and does not drain: the readiness a load balancer routes by.
#pragma once

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "absl/time/time.h"

namespace pds::server {

struct FrontendOptions {
  std::string model_dir;  // config.json (limits, EOS) and tokenizer.json (text) are read
  // Names this front-end among those sharing the workers (letters, digits, '.', '_', '-'; at
  // most 64): it is in the ids of the calls to the workers and of the requests it names, and
  // the workers report their queues by it. Empty: 8 random hex digits.
  std::string id;
  std::string host = "127.0.0.1";
  int port = 0;                         // 0: ephemeral
  std::string policy = "least-loaded";  // or "slo-aware" (needs profile_path)
  std::string profile_path;             // `pdserve profile` output: the latency model
  double step_time_scale = 1;      // its predictions times this (live steps slower than profiled)
  double default_ttft_slo_ms = 0;  // targets of requests that set none (0: none)
  double default_tpot_slo_ms = 0;
  bool best_effort = false;  // serve requests predicted to miss their TTFT instead of refusing
  // Conditional disaggregation (scheduler::PreferLocalPrefill): a request with at most this
  // many prompt tokens uncached on its decode worker runs there whole. 0: always disaggregate.
  int32_t local_prefill_max_tokens = 0;
  int max_in_flight = 1024;  // requests beyond this get RESOURCE_EXHAUSTED
  absl::Duration request_timeout = absl::Minutes(10);  // when the client sets no deadline
  absl::Duration health_period = absl::Milliseconds(200);
  int unhealthy_after_failures = 3;
  // A worker whose engine loop has not refreshed its status for this long (a step that does
  // not end: a hung device) is unhealthy, although it still answers: no new requests go to it.
  absl::Duration worker_stall_timeout = absl::Seconds(60);
  // A worker unreachable (no registration, no status) for this long with no request of its
  // own in flight is dropped from the cluster (a pod that is gone for good).
  absl::Duration forget_worker_after = absl::Minutes(5);
  // Prometheus metrics over HTTP (GET /metrics) on `host`: -1 off, 0 any free port.
  int metrics_port = -1;
  // The OpenAI-compatible HTTP API (server/openai_http.h) on `host`: -1 off, 0 any free port.
  int http_port = -1;
  // The chat template of /v1/chat/completions: empty, the model's (chat_template.jinja or
  // tokenizer_config.json); a file replaces it (and must load).
  std::string chat_template;
  // How the model writes tool calls (server/tool_calls.h): "", "none", "hermes", "llama3_json",
  // "pythonic".
  std::string tool_call_parser;
  // How the model marks its reasoning: "", "none", "deepseek_r1", "qwen3".
  std::string reasoning_parser;
};

class Frontend {
 public:
  static absl::StatusOr<std::unique_ptr<Frontend>> Start(FrontendOptions options);
  ~Frontend();
  Frontend(const Frontend&) = delete;
  Frontend& operator=(const Frontend&) = delete;

  std::string address() const;
  int port() const;
  int metrics_port() const;  // -1: none
  int http_port() const;     // -1: none
  // Graceful stop, first half: new requests get UNAVAILABLE and the readiness status turns
  // NOT_SERVING; returns once every request in flight has ended (true) or after `timeout`
  // (false). Shutdown() does the rest (it cancels what is still in flight).
  bool Drain(absl::Duration timeout);
  void Shutdown();

  class Impl;

 private:
  explicit Frontend(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace pds::server

// The front-end's figures for Prometheus: what every request ended with (status codes,
// latencies, SLO attainment, tokens) and, rendered by the caller at each scrape, the cluster's
// gauges; served as text exposition format 0.0.4 at GET /metrics.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace pds::server {

// Cumulative-bucket histogram with fixed upper bounds.
class Histogram {
 public:
  explicit Histogram(std::vector<double> bounds);
  void Observe(double value);
  // Appends the _bucket, _sum and _count lines of `name`.
  void Render(std::string& out, absl::string_view name) const;

 private:
  std::vector<double> bounds_;
  std::vector<int64_t> counts_;  // per bound, then +Inf (not cumulative)
  double sum_ = 0;
  int64_t count_ = 0;
};

// What one request ended with. Times in seconds; negative: not reached (e.g. no first token).
struct RequestOutcome {
  std::string code;  // the gRPC status code's name: OK, INVALID_ARGUMENT, ...
  double ttft_s = -1;
  double tpot_s = -1;  // mean time per output token after the first (needs two tokens)
  double e2e_s = -1;
  double queue_s = -1;        // front-end placement to prefill start
  double kv_transfer_s = -1;  // KV hand-off start to end (disaggregated)
  int64_t prompt_tokens = 0;
  int64_t completion_tokens = 0;
  double ttft_slo_s = 0;  // the request's targets; 0: none
  double tpot_slo_s = 0;
};

class FrontendMetrics {
 public:
  FrontendMetrics();
  void Record(const RequestOutcome& outcome);
  // The exposition: the series recorded here, then `gauges` (complete lines, with their
  // # TYPE headers, rendered by the caller from the cluster's state at this scrape).
  std::string Render(const std::string& gauges) const;

 private:
  mutable std::mutex mu_;
  std::map<std::string, int64_t> by_code_;
  int64_t slo_attained_ = 0, ttft_missed_ = 0, tpot_missed_ = 0;
  int64_t prompt_tokens_ = 0, completion_tokens_ = 0;
  Histogram ttft_, tpot_, e2e_, queue_, kv_transfer_;
};

// Text-format helpers for the caller's gauges.
std::string PromLabel(absl::string_view value);  // "value" with \, " and newlines escaped
void PromType(std::string& out, absl::string_view name, absl::string_view type,
              absl::string_view help);

// GET /metrics over HTTP on host:port (0: ephemeral), answered by `render` per scrape.
class MetricsServer {
 public:
  static absl::StatusOr<std::unique_ptr<MetricsServer>> Start(const std::string& host, int port,
                                                              std::function<std::string()> render);
  ~MetricsServer();
  int port() const { return port_; }
  void Stop();

  class Impl;

 private:
  MetricsServer(std::unique_ptr<Impl> impl, int port);
  std::unique_ptr<Impl> impl_;
  int port_ = 0;
};

}  // namespace pds::server

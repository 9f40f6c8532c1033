#include "server/metrics.h"

#include <chrono>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "httplib.h"
#include "server/http_util.h"

namespace pds::server {

Histogram::Histogram(std::vector<double> bounds)
    : bounds_(std::move(bounds)), counts_(bounds_.size() + 1, 0) {}

void Histogram::Observe(double value) {
  size_t i = 0;
  while (i < bounds_.size() && value > bounds_[i]) ++i;
  ++counts_[i];
  sum_ += value;
  ++count_;
}

void Histogram::Render(std::string& out, absl::string_view name) const {
  int64_t cumulative = 0;
  for (size_t i = 0; i < bounds_.size(); ++i) {
    cumulative += counts_[i];
    absl::StrAppendFormat(&out, "%s_bucket{le=\"%g\"} %d\n", name, bounds_[i], cumulative);
  }
  absl::StrAppendFormat(&out, "%s_bucket{le=\"+Inf\"} %d\n", name, count_);
  absl::StrAppendFormat(&out, "%s_sum %.9g\n%s_count %d\n", name, sum_, name, count_);
}

FrontendMetrics::FrontendMetrics()
    : ttft_({0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30}),
      tpot_({0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.2, 0.5, 1}),
      e2e_({0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300}),
      queue_({0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10}),
      kv_transfer_({0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1}) {}

void FrontendMetrics::Record(const RequestOutcome& o) {
  std::lock_guard<std::mutex> lock(mu_);
  ++by_code_[o.code];
  prompt_tokens_ += o.prompt_tokens;
  completion_tokens_ += o.completion_tokens;
  if (o.ttft_s >= 0) ttft_.Observe(o.ttft_s);
  if (o.tpot_s >= 0) tpot_.Observe(o.tpot_s);
  if (o.e2e_s >= 0) e2e_.Observe(o.e2e_s);
  if (o.queue_s >= 0) queue_.Observe(o.queue_s);
  if (o.kv_transfer_s >= 0) kv_transfer_.Observe(o.kv_transfer_s);
  if (o.code != "OK") return;
  // A finished request attains its SLOs when it met every target it had (DistServe's goodput
  // counts these).
  const bool ttft_ok = o.ttft_slo_s <= 0 || (o.ttft_s >= 0 && o.ttft_s <= o.ttft_slo_s);
  const bool tpot_ok = o.tpot_slo_s <= 0 || o.tpot_s < 0 || o.tpot_s <= o.tpot_slo_s;
  if (!ttft_ok) ++ttft_missed_;
  if (!tpot_ok) ++tpot_missed_;
  if (ttft_ok && tpot_ok) ++slo_attained_;
}

std::string PromLabel(absl::string_view value) {
  std::string out = "\"";
  for (char c : value) {
    if (c == '\\' || c == '"') out += '\\';
    if (c == '\n') {
      out += "\\n";
      continue;
    }
    out += c;
  }
  return out + "\"";
}

void PromType(std::string& out, absl::string_view name, absl::string_view type,
              absl::string_view help) {
  absl::StrAppend(&out, "# HELP ", name, " ", help, "\n# TYPE ", name, " ", type, "\n");
}

std::string FrontendMetrics::Render(const std::string& gauges) const {
  std::string out;
  std::lock_guard<std::mutex> lock(mu_);
  PromType(out, "pdserve_requests_total", "counter",
           "Requests ended, by gRPC status code (OK: finished).");
  for (const auto& [code, n] : by_code_) {
    absl::StrAppend(&out, "pdserve_requests_total{code=", PromLabel(code), "} ", n, "\n");
  }
  PromType(out, "pdserve_slo_attained_total", "counter",
           "Finished requests that met every SLO target they had (goodput's numerator).");
  absl::StrAppend(&out, "pdserve_slo_attained_total ", slo_attained_, "\n");
  PromType(out, "pdserve_slo_missed_total", "counter", "Finished requests that missed a target.");
  absl::StrAppend(&out, "pdserve_slo_missed_total{slo=\"ttft\"} ", ttft_missed_, "\n");
  absl::StrAppend(&out, "pdserve_slo_missed_total{slo=\"tpot\"} ", tpot_missed_, "\n");
  PromType(out, "pdserve_prompt_tokens_total", "counter", "Prompt tokens of ended requests.");
  absl::StrAppend(&out, "pdserve_prompt_tokens_total ", prompt_tokens_, "\n");
  PromType(out, "pdserve_completion_tokens_total", "counter", "Tokens generated and streamed.");
  absl::StrAppend(&out, "pdserve_completion_tokens_total ", completion_tokens_, "\n");
  const struct {
    const char* name;
    const Histogram& histogram;
    const char* help;
  } histograms[] = {
      {"pdserve_ttft_seconds", ttft_, "Time to first token, from arrival at the front-end."},
      {"pdserve_tpot_seconds", tpot_, "Mean time per output token after the first, per request."},
      {"pdserve_e2e_latency_seconds", e2e_, "Arrival to the last token."},
      {"pdserve_queue_seconds", queue_,
       "Prefill worker's queue: arrival there to its prefill step's start."},
      {"pdserve_kv_transfer_seconds", kv_transfer_,
       "KV hand-off from prefill to decode worker, start to end."}};
  for (const auto& h : histograms) {
    PromType(out, h.name, "histogram", h.help);
    h.histogram.Render(out, h.name);
  }
  out += gauges;
  return out;
}

class MetricsServer::Impl {
 public:
  httplib::Server server;
  std::thread thread;
};

absl::StatusOr<std::unique_ptr<MetricsServer>> MetricsServer::Start(
    const std::string& host, int port, std::function<std::string()> render) {
  auto impl = std::make_unique<Impl>();
  impl->server.Get("/metrics", [render](const httplib::Request&, httplib::Response& res) {
    res.set_content(render(), "text/plain; version=0.0.4; charset=utf-8");
  });
  // One request per connection: a kept-alive idle connection holds stop() for its timeout.
  impl->server.set_keep_alive_max_count(1);
  impl->server.set_keep_alive_timeout(1);  // and a connection that sends nothing, for 1 s
  impl->server.set_read_timeout(5, 0);
  impl->server.set_write_timeout(5, 0);
  absl::StatusOr<int> bound = ListenInBackground(impl->server, host, port, impl->thread, "metrics");
  if (absl::IsInternal(bound.status())) (void)impl.release();  // its thread may use it
  if (!bound.ok()) return bound.status();
  return std::unique_ptr<MetricsServer>(new MetricsServer(std::move(impl), *bound));
}

MetricsServer::MetricsServer(std::unique_ptr<Impl> impl, int port)
    : impl_(std::move(impl)), port_(port) {}

MetricsServer::~MetricsServer() { Stop(); }

void MetricsServer::Stop() {
  if (!impl_) return;
  impl_->server.stop();
  if (impl_->thread.joinable()) impl_->thread.join();
  impl_.reset();
}

}  // namespace pds::server

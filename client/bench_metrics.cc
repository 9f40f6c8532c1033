#include "client/bench_metrics.h"

#include <algorithm>
#include <cmath>
#include <map>
#include <numeric>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"

namespace pds::client {
namespace {

bool Selected(const std::vector<std::string>& metrics, const std::string& name) {
  return std::find(metrics.begin(), metrics.end(), name) != metrics.end();
}

double Ms(int64_t from_us, int64_t to_us) { return (to_us - from_us) / 1000.0; }

// Stage durations of a timeline in ms; negative where the stage did not happen.
struct Stages {
  double queue = -1, prefill = -1, transfer = -1, decode = -1;
  // Front-end arrival to the worker's queue (dispatch and the RPC), and the end of the
  // prefill step to the front-end's first token (the relay back): the parts of TTFT that
  // are neither queueing nor compute.
  double dispatch = -1, relay = -1;
  // The end of the prefill step to the decode worker having the KV: the part of the KV
  // transfer that prefill did not hide (0 when it was complete by then).
  double handoff = -1;
};
Stages StagesOf(const RequestRecord& r) {
  Stages s;
  if (!r.has_timeline) return s;
  const ServerTimeline& t = r.timeline;
  int64_t queued = t.queued_us > 0 ? t.queued_us : t.arrival_us;
  if (queued > 0 && t.prefill_start_us >= queued) s.queue = Ms(queued, t.prefill_start_us);
  if (t.prefill_start_us > 0 && t.prefill_end_us >= t.prefill_start_us) {
    s.prefill = Ms(t.prefill_start_us, t.prefill_end_us);
  }
  if (t.kv_transfer_start_us > 0 && t.kv_transfer_end_us >= t.kv_transfer_start_us) {
    s.transfer = Ms(t.kv_transfer_start_us, t.kv_transfer_end_us);
  }
  if (t.decode_start_us > 0 && t.finish_us >= t.decode_start_us) {
    s.decode = Ms(t.decode_start_us, t.finish_us);
  }
  if (t.arrival_us > 0 && t.queued_us >= t.arrival_us) s.dispatch = Ms(t.arrival_us, t.queued_us);
  if (t.prefill_end_us > 0 && t.first_token_us >= t.prefill_end_us) {
    s.relay = Ms(t.prefill_end_us, t.first_token_us);
  }
  if (t.prefill_end_us > 0 && t.kv_transfer_end_us > 0) {
    s.handoff = std::max(0.0, Ms(t.prefill_end_us, t.kv_transfer_end_us));
  }
  return s;
}

void AddStats(nlohmann::json& j, const std::string& name, const Stats& s) {
  j["mean_" + name + "_ms"] = s.mean;
  j["median_" + name + "_ms"] = s.median;
  j["std_" + name + "_ms"] = s.std;
  j["p90_" + name + "_ms"] = s.p90;
  j["p99_" + name + "_ms"] = s.p99;
}

nlohmann::json StatsJson(const Stats& s) {
  return {{"count", s.count}, {"mean", s.mean}, {"median", s.median}, {"std", s.std},
          {"p90", s.p90},     {"p99", s.p99},   {"min", s.min},       {"max", s.max}};
}

std::string Fmt(double v) { return absl::StrFormat("%.2f", v); }

}  // namespace

int64_t RequestRecord::OutputTokens() const {
  return std::accumulate(chunk_tokens.begin(), chunk_tokens.end(), int64_t{0});
}

double RequestRecord::TpotS() const {
  int64_t n = OutputTokens();
  if (n <= 1) return 0;
  return (E2elS() - TtftS()) / static_cast<double>(n - 1);
}

bool MeetsSlo(const RequestRecord& r, const SloTargets& slo) {
  if (!r.ok) return false;
  if (slo.ttft_ms >= 0 && r.TtftS() * 1000.0 > slo.ttft_ms) return false;
  if (slo.tpot_ms >= 0 && r.HasTpot() && r.TpotS() * 1000.0 > slo.tpot_ms) return false;
  return true;
}

double PercentileSorted(const std::vector<double>& sorted, double p) {
  if (sorted.empty()) return 0;
  if (sorted.size() == 1) return sorted[0];
  double h = (static_cast<double>(sorted.size()) - 1) * std::clamp(p, 0.0, 100.0) / 100.0;
  size_t lo = static_cast<size_t>(std::floor(h));
  if (lo + 1 >= sorted.size()) return sorted.back();
  return sorted[lo] + (h - static_cast<double>(lo)) * (sorted[lo + 1] - sorted[lo]);
}

Stats ComputeStats(std::vector<double> values) {
  Stats s;
  s.count = static_cast<int64_t>(values.size());
  if (values.empty()) return s;
  std::sort(values.begin(), values.end());
  double sum = 0;
  for (double v : values) sum += v;
  s.mean = sum / static_cast<double>(values.size());
  double sq = 0;
  for (double v : values) sq += (v - s.mean) * (v - s.mean);
  s.std = std::sqrt(sq / static_cast<double>(values.size()));
  s.median = PercentileSorted(values, 50);
  s.p90 = PercentileSorted(values, 90);
  s.p99 = PercentileSorted(values, 99);
  s.min = values.front();
  s.max = values.back();
  return s;
}

BenchMetrics ComputeMetrics(const std::vector<RequestRecord>& records, double duration_s,
                            const SloTargets& slo) {
  BenchMetrics m;
  m.slo = slo;
  m.duration = duration_s;
  std::vector<double> ttft, tpot, itl, e2el, queue, prefill, transfer, decode, dispatch, relay,
      handoff;
  for (const RequestRecord& r : records) {
    if (!r.ok) {
      ++m.failed;
      ++m.errors[r.error_code.empty() ? "UNKNOWN" : r.error_code];
      continue;
    }
    ++m.completed;
    m.total_input_tokens += r.prompt_tokens;
    m.total_cached_input_tokens += r.cached_prompt_tokens;
    m.total_output_tokens += r.OutputTokens();
    if (MeetsSlo(r, slo)) ++m.good;
    ttft.push_back(r.TtftS() * 1000.0);
    e2el.push_back(r.E2elS() * 1000.0);
    if (r.HasTpot()) tpot.push_back(r.TpotS() * 1000.0);
    for (size_t i = 1; i < r.chunk_times_s.size(); ++i) {
      itl.push_back((r.chunk_times_s[i] - r.chunk_times_s[i - 1]) * 1000.0);
    }
    Stages st = StagesOf(r);
    if (st.queue >= 0) queue.push_back(st.queue);
    if (st.prefill >= 0) prefill.push_back(st.prefill);
    if (st.transfer >= 0) transfer.push_back(st.transfer);
    if (st.decode >= 0) decode.push_back(st.decode);
    if (st.dispatch >= 0) dispatch.push_back(st.dispatch);
    if (st.relay >= 0) relay.push_back(st.relay);
    if (st.handoff >= 0) handoff.push_back(st.handoff);
  }
  if (duration_s > 0) {
    m.request_throughput = m.completed / duration_s;
    m.output_throughput = m.total_output_tokens / duration_s;
    m.total_token_throughput = (m.total_input_tokens + m.total_output_tokens) / duration_s;
    m.request_goodput = m.good / duration_s;
  }
  int64_t issued = m.completed + m.failed;
  m.slo_attainment = issued > 0 ? static_cast<double>(m.good) / issued : 0;
  m.ttft_ms = ComputeStats(std::move(ttft));
  m.tpot_ms = ComputeStats(std::move(tpot));
  m.itl_ms = ComputeStats(std::move(itl));
  m.e2el_ms = ComputeStats(std::move(e2el));
  m.queue_ms = ComputeStats(std::move(queue));
  m.prefill_ms = ComputeStats(std::move(prefill));
  m.transfer_ms = ComputeStats(std::move(transfer));
  m.decode_ms = ComputeStats(std::move(decode));
  m.dispatch_ms = ComputeStats(std::move(dispatch));
  m.relay_ms = ComputeStats(std::move(relay));
  m.handoff_ms = ComputeStats(std::move(handoff));
  return m;
}

nlohmann::json MetricsToJson(const BenchMetrics& m, const std::vector<std::string>& metrics) {
  nlohmann::json j;
  j["completed"] = m.completed;
  j["failed"] = m.failed;
  j["duration"] = m.duration;
  j["total_input_tokens"] = m.total_input_tokens;
  j["total_cached_input_tokens"] = m.total_cached_input_tokens;
  j["total_output_tokens"] = m.total_output_tokens;
  j["request_throughput"] = m.request_throughput;
  j["output_throughput"] = m.output_throughput;
  j["total_token_throughput"] = m.total_token_throughput;
  j["request_goodput"] = m.request_goodput;
  j["slo_attainment"] = m.slo_attainment;
  nlohmann::json slo = nlohmann::json::object();
  if (m.slo.ttft_ms >= 0) slo["ttft_ms"] = m.slo.ttft_ms;
  if (m.slo.tpot_ms >= 0) slo["tpot_ms"] = m.slo.tpot_ms;
  j["goodput_slo"] = slo;
  if (Selected(metrics, "ttft")) AddStats(j, "ttft", m.ttft_ms);
  if (Selected(metrics, "tpot")) AddStats(j, "tpot", m.tpot_ms);
  if (Selected(metrics, "itl")) AddStats(j, "itl", m.itl_ms);
  if (Selected(metrics, "e2el")) AddStats(j, "e2el", m.e2el_ms);
  nlohmann::json errors = nlohmann::json::object();
  for (const auto& [code, n] : m.errors) errors[code] = n;
  j["errors"] = errors;
  j["server_timeline"] = {
      {"queue_ms", StatsJson(m.queue_ms)},       {"prefill_ms", StatsJson(m.prefill_ms)},
      {"transfer_ms", StatsJson(m.transfer_ms)}, {"decode_ms", StatsJson(m.decode_ms)},
      {"dispatch_ms", StatsJson(m.dispatch_ms)}, {"relay_ms", StatsJson(m.relay_ms)},
      {"handoff_ms", StatsJson(m.handoff_ms)}};
  return j;
}

std::string SummaryTable(const BenchMetrics& m, const std::vector<std::string>& metrics,
                         const std::string& title) {
  std::string out;
  auto rule = [&](char c) { absl::StrAppend(&out, std::string(50, c), "\n"); };
  auto header = [&](const std::string& text) {
    std::string t = " " + text + " ";
    size_t pad = t.size() < 50 ? (50 - t.size()) / 2 : 0;
    absl::StrAppend(&out, std::string(pad, '-'), t, std::string(50 - pad - t.size(), '-'), "\n");
  };
  auto row = [&](const std::string& name, const std::string& value) {
    absl::StrAppend(&out, absl::StrFormat("%-36s%14s\n", name, value));
  };
  std::string t = " " + title + " ";
  size_t pad = t.size() < 50 ? (50 - t.size()) / 2 : 0;
  absl::StrAppend(&out, std::string(pad, '='), t, std::string(50 - pad - t.size(), '='), "\n");
  row("Successful requests:", absl::StrCat(m.completed));
  row("Failed requests:", absl::StrCat(m.failed));
  for (const auto& [code, n] : m.errors) row(absl::StrCat("  ", code, ":"), absl::StrCat(n));
  row("Benchmark duration (s):", Fmt(m.duration));
  row("Total input tokens:", absl::StrCat(m.total_input_tokens));
  if (m.total_cached_input_tokens > 0) {
    row("  of them from the prefix cache:",
        absl::StrFormat(
            "%d (%.1f%%)", m.total_cached_input_tokens,
            100.0 * m.total_cached_input_tokens / std::max<int64_t>(1, m.total_input_tokens)));
  }
  row("Total generated tokens:", absl::StrCat(m.total_output_tokens));
  row("Request throughput (req/s):", Fmt(m.request_throughput));
  row("Output token throughput (tok/s):", Fmt(m.output_throughput));
  row("Total token throughput (tok/s):", Fmt(m.total_token_throughput));
  if (m.slo.ttft_ms >= 0) row("SLO TTFT (ms):", absl::StrCat(m.slo.ttft_ms));
  if (m.slo.tpot_ms >= 0) row("SLO TPOT (ms):", absl::StrCat(m.slo.tpot_ms));
  if (!m.slo.Any()) row("SLO:", "none");
  row("SLO attainment (%):", Fmt(100.0 * m.slo_attainment));
  row("Request goodput (req/s):", Fmt(m.request_goodput));
  struct Family {
    const char* key;
    const char* title;
    const char* label;
    const Stats* stats;
  };
  const Family families[] = {
      {"ttft", "Time to First Token", "TTFT", &m.ttft_ms},
      {"tpot", "Time per Output Token (excl. 1st token)", "TPOT", &m.tpot_ms},
      {"itl", "Inter-token Latency", "ITL", &m.itl_ms},
      {"e2el", "End-to-end Latency", "E2EL", &m.e2el_ms}};
  for (const Family& f : families) {
    if (!Selected(metrics, f.key)) continue;
    header(f.title);
    row(absl::StrCat("Mean ", f.label, " (ms):"), Fmt(f.stats->mean));
    row(absl::StrCat("Median ", f.label, " (ms):"), Fmt(f.stats->median));
    row(absl::StrCat("P90 ", f.label, " (ms):"), Fmt(f.stats->p90));
    row(absl::StrCat("P99 ", f.label, " (ms):"), Fmt(f.stats->p99));
  }
  if (m.queue_ms.count + m.prefill_ms.count + m.transfer_ms.count + m.decode_ms.count +
          m.dispatch_ms.count + m.relay_ms.count >
      0) {
    header("Server timeline (mean / p99 ms)");
    auto stage = [&](const char* name, const Stats& s) {
      if (s.count == 0) return;
      row(name, absl::StrCat(Fmt(s.mean), " / ", Fmt(s.p99)));
    };
    stage("Dispatch:", m.dispatch_ms);
    stage("Queue:", m.queue_ms);
    stage("Prefill:", m.prefill_ms);
    stage("Relay:", m.relay_ms);
    stage("KV transfer:", m.transfer_ms);
    stage("KV after prefill:", m.handoff_ms);
    stage("Decode:", m.decode_ms);
  }
  rule('=');
  return out;
}

std::string RequestsCsv(const std::vector<RequestRecord>& records, const SloTargets& slo) {
  std::string out =
      "index,ok,error_code,send_s,scheduled_s,ttft_ms,tpot_ms,e2el_ms,prompt_tokens,output_tokens,"
      "meets_slo,"
      "queue_ms,prefill_ms,transfer_ms,decode_ms,dispatch_ms,relay_ms,handoff_ms,"
      "cached_prompt_tokens,conversation,turn\n";
  auto opt = [](double v) { return v >= 0 ? absl::StrFormat("%.3f", v) : std::string(); };
  for (const RequestRecord& r : records) {
    Stages st = StagesOf(r);
    absl::StrAppend(&out, r.index, ",", r.ok ? 1 : 0, ",", r.error_code, ",",
                    absl::StrFormat("%.6f", r.send_s), ",", absl::StrFormat("%.6f", r.scheduled_s),
                    ",", r.ok && r.HasFirstToken() ? opt(r.TtftS() * 1000) : "", ",",
                    r.HasTpot() ? opt(r.TpotS() * 1000) : "", ",",
                    r.ok ? opt(r.E2elS() * 1000) : "", ",", r.prompt_tokens, ",", r.OutputTokens(),
                    ",", MeetsSlo(r, slo) ? 1 : 0, ",", opt(st.queue), ",", opt(st.prefill), ",",
                    opt(st.transfer), ",", opt(st.decode), ",", opt(st.dispatch), ",",
                    opt(st.relay), ",", opt(st.handoff), ",", r.cached_prompt_tokens, ",",
                    r.conversation >= 0 ? absl::StrCat(r.conversation) : "", ",",
                    r.conversation >= 0 ? absl::StrCat(r.turn) : "", "\n");
  }
  return out;
}

std::string TurnsTable(const std::vector<RequestRecord>& records, const SloTargets& slo) {
  std::map<int32_t, std::vector<RequestRecord>> by_turn;
  for (const RequestRecord& r : records) {
    if (r.conversation >= 0) by_turn[r.turn].push_back(r);
  }
  if (by_turn.empty()) return "";
  std::string out =
      absl::StrFormat("%-6s%10s%11s%11s%15s%16s%10s\n", "Turn", "requests", "completed", "attain %",
                      "TTFT mean ms", "TTFT median ms", "cached %");
  for (const auto& [turn, rs] : by_turn) {
    const BenchMetrics m = ComputeMetrics(rs, 1.0, slo);
    int64_t prompt = 0, cached = 0;
    for (const RequestRecord& r : rs) {
      if (!r.ok) continue;
      prompt += r.prompt_tokens;
      cached += r.cached_prompt_tokens;
    }
    absl::StrAppendFormat(&out, "%-6d%10d%11d%11.1f%15.1f%16.1f%10.1f\n", turn + 1, rs.size(),
                          m.completed, 100 * m.slo_attainment, m.ttft_ms.mean, m.ttft_ms.median,
                          prompt > 0 ? 100.0 * cached / prompt : 0.0);
  }
  return out;
}

std::string SearchCsv(const std::vector<SearchPoint>& points, int num_gpus) {
  std::string out =
      "rate,rate_per_gpu,slo_attainment,request_goodput,completed,failed,"
      "mean_ttft_ms,median_ttft_ms,p90_ttft_ms,p99_ttft_ms,"
      "mean_tpot_ms,median_tpot_ms,p90_tpot_ms,p99_tpot_ms,"
      "mean_e2el_ms,median_e2el_ms,p90_e2el_ms,p99_e2el_ms\n";
  for (const SearchPoint& p : points) {
    const BenchMetrics& m = p.metrics;
    absl::StrAppend(
        &out, absl::StrFormat("%.4f,%.4f,%.4f,%.4f,%d,%d", p.rate, p.rate / std::max(num_gpus, 1),
                              m.slo_attainment, m.request_goodput, m.completed, m.failed));
    for (const Stats* s : {&m.ttft_ms, &m.tpot_ms, &m.e2el_ms}) {
      absl::StrAppend(&out,
                      absl::StrFormat(",%.3f,%.3f,%.3f,%.3f", s->mean, s->median, s->p90, s->p99));
    }
    absl::StrAppend(&out, "\n");
  }
  return out;
}

std::string SearchTable(const std::vector<SearchPoint>& points, int num_gpus,
                        double attainment_target) {
  std::string out =
      absl::StrFormat("%10s %10s %11s %9s %11s %11s %11s %11s\n", "rate", "rate/gpu", "attainment",
                      "goodput", "p90 TTFT", "p99 TTFT", "p90 TPOT", "p99 TPOT");
  for (const SearchPoint& p : points) {
    const BenchMetrics& m = p.metrics;
    absl::StrAppend(
        &out, absl::StrFormat("%10.3f %10.3f %10.1f%% %9.3f %11.1f %11.1f %11.1f %11.1f %s\n",
                              p.rate, p.rate / std::max(num_gpus, 1), 100 * m.slo_attainment,
                              m.request_goodput, m.ttft_ms.p90, m.ttft_ms.p99, m.tpot_ms.p90,
                              m.tpot_ms.p99, m.slo_attainment >= attainment_target ? "ok" : ""));
  }
  return out;
}

namespace {

struct Series {
  std::string name;
  std::string color;
  std::vector<std::pair<double, double>> points;
  bool dashed = false;
};

std::string Escape(const std::string& s) {
  std::string out;
  for (char c : s) {
    switch (c) {
      case '<':
        out += "&lt;";
        break;
      case '>':
        out += "&gt;";
        break;
      case '&':
        out += "&amp;";
        break;
      case '"':
        out += "&quot;";
        break;
      default:
        out.push_back(c);
    }
  }
  return out;
}

// A "nice" upper bound for an axis.
double NiceMax(double v) {
  if (!(v > 0)) return 1;
  double mag = std::pow(10.0, std::floor(std::log10(v)));
  for (double m : {1.0, 2.0, 2.5, 5.0, 10.0}) {
    if (v <= m * mag * 1.0000001) return m * mag;
  }
  return 10 * mag;
}

// One chart panel at (ox, oy) of size w x h.
std::string Panel(double ox, double oy, double w, double h, const std::string& title,
                  const std::string& xlabel, const std::string& ylabel, double xmax, double ymax,
                  const std::vector<Series>& series) {
  const double left = 60, right = 10, top = 28, bottom = 42;
  const double pw = w - left - right, ph = h - top - bottom;
  xmax = NiceMax(xmax);
  ymax = NiceMax(ymax);
  auto X = [&](double x) { return ox + left + pw * x / xmax; };
  auto Y = [&](double y) { return oy + top + ph * (1 - std::clamp(y / ymax, 0.0, 1.05)); };
  std::string s;
  absl::StrAppend(&s, absl::StrFormat("<text x=\"%.1f\" y=\"%.1f\" text-anchor=\"middle\" "
                                      "font-size=\"14\" font-weight=\"bold\">%s</text>\n",
                                      ox + left + pw / 2, oy + 18, Escape(title)));
  absl::StrAppend(&s, absl::StrFormat("<rect x=\"%.1f\" y=\"%.1f\" width=\"%.1f\" height=\"%.1f\" "
                                      "fill=\"none\" stroke=\"#333\"/>\n",
                                      ox + left, oy + top, pw, ph));
  for (int i = 0; i <= 5; ++i) {
    double xv = xmax * i / 5, yv = ymax * i / 5;
    absl::StrAppend(&s, absl::StrFormat("<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" "
                                        "stroke=\"#ddd\"/>\n",
                                        ox + left, Y(yv), ox + left + pw, Y(yv)));
    absl::StrAppend(&s, absl::StrFormat("<text x=\"%.1f\" y=\"%.1f\" text-anchor=\"end\" "
                                        "font-size=\"11\">%g</text>\n",
                                        ox + left - 4, Y(yv) + 4, yv));
    absl::StrAppend(&s, absl::StrFormat("<text x=\"%.1f\" y=\"%.1f\" text-anchor=\"middle\" "
                                        "font-size=\"11\">%g</text>\n",
                                        X(xv), oy + top + ph + 14, xv));
  }
  absl::StrAppend(&s, absl::StrFormat("<text x=\"%.1f\" y=\"%.1f\" text-anchor=\"middle\" "
                                      "font-size=\"12\">%s</text>\n",
                                      ox + left + pw / 2, oy + h - 8, Escape(xlabel)));
  absl::StrAppend(
      &s, absl::StrFormat("<text x=\"%.1f\" y=\"%.1f\" text-anchor=\"middle\" "
                          "font-size=\"12\" transform=\"rotate(-90 %.1f %.1f)\">"
                          "%s</text>\n",
                          ox + 14, oy + top + ph / 2, ox + 14, oy + top + ph / 2, Escape(ylabel)));
  int legend = 0;
  for (const Series& ser : series) {
    if (ser.points.empty()) continue;
    std::string pts;
    for (const auto& [x, y] : ser.points) absl::StrAppend(&pts, Fmt(X(x)), ",", Fmt(Y(y)), " ");
    absl::StrAppend(&s,
                    absl::StrFormat("<polyline fill=\"none\" stroke=\"%s\" stroke-width=\"2\""
                                    "%s points=\"%s\"/>\n",
                                    ser.color, ser.dashed ? " stroke-dasharray=\"6,4\"" : "", pts));
    if (!ser.dashed) {
      for (const auto& [x, y] : ser.points) {
        absl::StrAppend(&s, absl::StrFormat("<circle cx=\"%.1f\" cy=\"%.1f\" r=\"3\" "
                                            "fill=\"%s\"/>\n",
                                            X(x), Y(y), ser.color));
      }
    }
    double ly = oy + top + 14 + 14 * legend++;
    absl::StrAppend(&s, absl::StrFormat("<line x1=\"%.1f\" y1=\"%.1f\" x2=\"%.1f\" y2=\"%.1f\" "
                                        "stroke=\"%s\" stroke-width=\"2\"%s/>\n",
                                        ox + left + 8, ly - 4, ox + left + 28, ly - 4, ser.color,
                                        ser.dashed ? " stroke-dasharray=\"6,4\"" : ""));
    absl::StrAppend(&s, absl::StrFormat("<text x=\"%.1f\" y=\"%.1f\" font-size=\"11\">%s</text>\n",
                                        ox + left + 32, ly, Escape(ser.name)));
  }
  return s;
}

}  // namespace

std::string SearchSvg(const std::vector<SearchPoint>& points, int num_gpus,
                      double attainment_target, const SloTargets& slo, const std::string& title) {
  std::vector<SearchPoint> sorted = points;
  std::sort(sorted.begin(), sorted.end(),
            [](const SearchPoint& a, const SearchPoint& b) { return a.rate < b.rate; });
  const double per_gpu = std::max(num_gpus, 1);
  double xmax = 0, ttft_max = 0, tpot_max = 0;
  Series attain{"SLO attainment", "#1f77b4", {}};
  Series ttft50{"TTFT p50", "#2ca02c", {}}, ttft90{"TTFT p90", "#ff7f0e", {}},
      ttft99{"TTFT p99", "#d62728", {}};
  Series tpot50{"TPOT p50", "#2ca02c", {}}, tpot90{"TPOT p90", "#ff7f0e", {}},
      tpot99{"TPOT p99", "#d62728", {}};
  for (const SearchPoint& p : sorted) {
    double x = p.rate / per_gpu;
    xmax = std::max(xmax, x);
    const BenchMetrics& m = p.metrics;
    attain.points.push_back({x, 100 * m.slo_attainment});
    ttft50.points.push_back({x, m.ttft_ms.median});
    ttft90.points.push_back({x, m.ttft_ms.p90});
    ttft99.points.push_back({x, m.ttft_ms.p99});
    tpot50.points.push_back({x, m.tpot_ms.median});
    tpot90.points.push_back({x, m.tpot_ms.p90});
    tpot99.points.push_back({x, m.tpot_ms.p99});
    ttft_max = std::max(ttft_max, m.ttft_ms.p99);
    tpot_max = std::max(tpot_max, m.tpot_ms.p99);
  }
  xmax = std::max(xmax, 1e-3);
  Series target{absl::StrCat("target ", Fmt(100 * attainment_target), "%"),
                "#777",
                {{0, 100 * attainment_target}, {NiceMax(xmax), 100 * attainment_target}},
                true};
  std::vector<Series> ttft_series = {ttft50, ttft90, ttft99};
  std::vector<Series> tpot_series = {tpot50, tpot90, tpot99};
  if (slo.ttft_ms >= 0) {
    ttft_series.push_back({absl::StrCat("SLO ", slo.ttft_ms, " ms"),
                           "#777",
                           {{0, slo.ttft_ms}, {NiceMax(xmax), slo.ttft_ms}},
                           true});
    ttft_max = std::max(ttft_max, slo.ttft_ms);
  }
  if (slo.tpot_ms >= 0) {
    tpot_series.push_back({absl::StrCat("SLO ", slo.tpot_ms, " ms"),
                           "#777",
                           {{0, slo.tpot_ms}, {NiceMax(xmax), slo.tpot_ms}},
                           true});
    tpot_max = std::max(tpot_max, slo.tpot_ms);
  }
  const std::string xlabel = num_gpus > 1 ? "rate per GPU (req/s)" : "rate (req/s)";
  const double w = 420, h = 320;
  std::string svg = absl::StrFormat(
      "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"%d\" height=\"%d\" "
      "font-family=\"sans-serif\">\n<rect width=\"100%%\" height=\"100%%\" fill=\"white\"/>\n"
      "<text x=\"%d\" y=\"20\" text-anchor=\"middle\" font-size=\"16\">%s</text>\n",
      static_cast<int>(3 * w), static_cast<int>(h + 30), static_cast<int>(3 * w / 2),
      Escape(title));
  absl::StrAppend(&svg, Panel(0, 30, w, h, "SLO attainment", xlabel, "attainment (%)", xmax, 100,
                              {attain, target}));
  absl::StrAppend(&svg, Panel(w, 30, w, h, "TTFT percentiles", xlabel, "TTFT (ms)", xmax, ttft_max,
                              ttft_series));
  absl::StrAppend(&svg, Panel(2 * w, 30, w, h, "TPOT percentiles", xlabel, "TPOT (ms)", xmax,
                              tpot_max, tpot_series));
  absl::StrAppend(&svg, "</svg>\n");
  return svg;
}

}  // namespace pds::client

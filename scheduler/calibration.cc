#include "scheduler/calibration.h"

#include <algorithm>
#include <cmath>
#include <fstream>
#include <map>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "client/bench_metrics.h"
#include "scheduler/simulator.h"

namespace pds::scheduler {
namespace {

constexpr int32_t kMinSteps = 20;

double Median(std::vector<double> v) { return client::ComputeStats(std::move(v)).median; }

}  // namespace

absl::StatusOr<std::vector<RunRow>> ReadRunCsv(const std::string& path, int32_t source) {
  std::ifstream in(path);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot read the run CSV ", path));
  std::string line;
  if (!std::getline(in, line)) {
    return absl::InvalidArgumentError(absl::StrCat(path, " is empty (no CSV header)"));
  }
  std::map<std::string, size_t> column;
  const std::vector<std::string> header = absl::StrSplit(absl::StripAsciiWhitespace(line), ',');
  for (size_t i = 0; i < header.size(); ++i) column[header[i]] = i;
  for (const char* needed : {"send_s", "prompt_tokens", "prefill_ms"}) {
    if (!column.count(needed)) {
      return absl::InvalidArgumentError(absl::StrCat(
          path, " has no '", needed, "' column: not a pdbench per-request CSV (--csv-out)"));
    }
  }
  std::vector<RunRow> rows;
  int64_t line_no = 1;
  while (std::getline(in, line)) {
    ++line_no;
    const absl::string_view text = absl::StripAsciiWhitespace(line);
    if (text.empty()) continue;
    const std::vector<absl::string_view> fields = absl::StrSplit(text, ',');
    if (fields.size() != header.size()) {
      return absl::InvalidArgumentError(absl::StrCat(path, ":", line_no, ": ", fields.size(),
                                                     " fields, the header has ", header.size()));
    }
    // An empty or absent optional column reads as -1; a malformed number is an error.
    auto number = [&](const char* name, double* out) -> absl::Status {
      auto it = column.find(name);
      *out = -1;
      if (it == column.end() || fields[it->second].empty()) return absl::OkStatus();
      if (!absl::SimpleAtod(fields[it->second], out)) {
        return absl::InvalidArgumentError(absl::StrCat(path, ":", line_no, ": ", name, " '",
                                                       fields[it->second], "' is not a number"));
      }
      return absl::OkStatus();
    };
    RunRow r;
    r.source = source;
    double prompt = 0, ok = 0, cached = 0;
    for (auto [name, out] : std::initializer_list<std::pair<const char*, double*>>{
             {"send_s", &r.send_s},
             {"prompt_tokens", &prompt},
             {"ok", &ok},
             {"ttft_ms", &r.ttft_ms},
             {"queue_ms", &r.queue_ms},
             {"prefill_ms", &r.prefill_ms},
             {"dispatch_ms", &r.dispatch_ms},
             {"relay_ms", &r.relay_ms},
             {"cached_prompt_tokens", &cached}}) {
      if (absl::Status s = number(name, out); !s.ok()) return s;
    }
    if (prompt < 0 || prompt > 1e9) {
      return absl::InvalidArgumentError(
          absl::StrCat(path, ":", line_no, ": prompt_tokens is missing or out of range"));
    }
    r.prompt_tokens = static_cast<int32_t>(prompt);
    r.cached_prompt_tokens = static_cast<int32_t>(std::clamp(cached, 0.0, prompt));
    r.ok = ok == 1 || !column.count("ok");
    rows.push_back(r);
  }
  return rows;
}

nlohmann::json LiveCalibration::ToJson() const {
  return {{"step_time_scale", step_time_scale},
          {"step_time_sigma", step_time_sigma},
          {"dispatch_latency_s", dispatch_latency_s},
          {"relay_latency_s", relay_latency_s},
          {"steps", steps},
          {"requests", requests},
          {"sources", sources}};
}

absl::StatusOr<LiveCalibration> Calibrate(const LatencyModel& model,
                                          const std::vector<RunRow>& rows,
                                          int32_t max_batch_tokens) {
  LiveCalibration cal;
  // Steps: requests grouped by (file, prefill duration to the microsecond), then split where
  // their estimated start times are apart (two steps never overlap, so their starts differ by
  // at least a step).
  struct Member {
    double start_ms;
    int32_t prompt;
    int32_t cached;  // the first `cached` tokens came from the prefix cache
  };
  std::map<std::pair<int32_t, int64_t>, std::vector<Member>> by_duration;
  std::vector<double> dispatch, relay;
  for (const RunRow& r : rows) {
    if (!r.ok) continue;
    ++cal.requests;
    if (r.dispatch_ms >= 0) dispatch.push_back(r.dispatch_ms);
    if (r.relay_ms >= 0) relay.push_back(r.relay_ms);
    if (r.prefill_ms <= 0 || r.prompt_tokens <= 0) continue;
    const double start_ms =
        r.send_s * 1000 + std::max(0.0, r.dispatch_ms) + std::max(0.0, r.queue_ms);
    by_duration[{r.source, std::llround(r.prefill_ms * 1000)}].push_back(
        {start_ms, r.prompt_tokens, std::min(r.cached_prompt_tokens, r.prompt_tokens - 1)});
  }
  std::vector<double> log_ratios;
  for (auto& [key, members] : by_duration) {
    const double seconds = key.second / 1e6;
    const double gap_ms = std::min(5.0, seconds * 1000 / 2);
    std::sort(members.begin(), members.end(),
              [](const Member& a, const Member& b) { return a.start_ms < b.start_ms; });
    size_t begin = 0;
    while (begin < members.size()) {
      size_t end = begin + 1;
      while (end < members.size() && members[end].start_ms - members[end - 1].start_ms <= gap_ms) {
        ++end;
      }
      std::vector<int32_t> lens;
      std::vector<std::pair<int32_t, int32_t>> chunks;  // (cached, computed) per prompt
      int64_t tokens = 0;
      bool any_cached = false;
      for (size_t i = begin; i < end; ++i) {
        const Member& m = members[i];
        lens.push_back(m.prompt);
        chunks.emplace_back(m.cached, m.prompt - m.cached);
        tokens += m.prompt - m.cached;
        any_cached = any_cached || m.cached > 0;
      }
      begin = end;
      if (tokens > max_batch_tokens) continue;  // chunked: prefill_ms spans several steps
      // A prompt partly from the prefix cache computes the rest, attending to all of it.
      const double predicted =
          any_cached ? PrefillChunkSeconds(model, chunks) : model.PredictPrefill(lens);
      if (!(predicted > 0)) continue;
      log_ratios.push_back(std::log(seconds / predicted));
    }
  }
  cal.steps = static_cast<int32_t>(log_ratios.size());
  if (cal.steps < kMinSteps) {
    return absl::FailedPreconditionError(absl::StrCat(
        "calibration needs at least ", kMinSteps, " prefill steps with the server timeline; ",
        "the run has ", cal.steps, " (", cal.requests, " completed requests)"));
  }
  const double center = Median(log_ratios);
  std::vector<double> deviation;
  deviation.reserve(log_ratios.size());
  for (double x : log_ratios) deviation.push_back(std::abs(x - center));
  cal.step_time_scale = std::exp(center);
  cal.step_time_sigma = 1.4826 * Median(std::move(deviation));
  cal.dispatch_latency_s = Median(std::move(dispatch)) / 1000;
  cal.relay_latency_s = Median(std::move(relay)) / 1000;
  return cal;
}

}  // namespace pds::scheduler

// pdbench metrics: per-request records in, the vLLM `bench serve` vocabulary out. Pure logic
// (no gRPC), so the scheduler's simulator can report its runs the same way.
//
// Definitions (times in seconds in records, milliseconds in reports):
//   TTFT  = arrival of the first message carrying tokens - arrival time
//   E2EL  = arrival of the last message of the stream - arrival time
// where the arrival time is when the request was due (open loop at a finite rate: a send the
// in-flight bound held back counts its wait, as its user would) and the send time otherwise
// (closed loop, and --rate inf, where every request is due at once; vLLM measures from the
// send everywhere).
//   TPOT  = (E2EL - TTFT) / (output tokens - 1); undefined (not in the statistics, and not
//           checked against the SLO) for a one-token output
//   ITL   = gaps between successive messages that carry tokens (per message, as vLLM does
//           per chunk; a message with several tokens contributes one gap)
// A request meets its SLO when it completed and TTFT <= ttft target and TPOT <= tpot target
// (an unset target always holds). Failed requests never meet it.
//   slo_attainment  = requests meeting the SLO / requests issued (completed + failed)
//   request_goodput = requests meeting the SLO / duration
//   duration        = first send (run start) to the end of the last request
// Percentiles use linear interpolation between closest ranks (numpy's default, "type 7"):
// for n sorted values x[0..n-1], h = (n - 1) * p / 100, P = x[floor(h)] + (h - floor(h)) *
// (x[floor(h) + 1] - x[floor(h)]); the median is P50. Empty sets report 0 with count 0. std is
// the population standard deviation (numpy's default).
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "nlohmann/json.hpp"

namespace pds::client {

// The server's timeline of a request (microseconds since the Unix epoch; 0 = did not happen).
struct ServerTimeline {
  int64_t arrival_us = 0;
  int64_t queued_us = 0;
  int64_t prefill_start_us = 0;
  int64_t prefill_end_us = 0;
  int64_t kv_transfer_start_us = 0;
  int64_t kv_transfer_end_us = 0;
  int64_t first_token_us = 0;
  int64_t decode_start_us = 0;
  int64_t finish_us = 0;
  std::string prefill_instance;
  std::string decode_instance;
};

struct RequestRecord {
  int64_t index = 0;
  bool ok = false;
  // On failure: the gRPC status code name ("UNAVAILABLE", ...) or a client-side reason
  // ("EMPTY_STREAM", "FINISH_ERROR", "FINISH_CANCELLED"), and the message.
  std::string error_code;
  std::string error_message;
  int64_t prompt_tokens = 0;         // the server's count when it sent one, else the client's
  int64_t cached_prompt_tokens = 0;  // of those, taken from the server's prefix cache
  int64_t expected_output_tokens = 0;
  // Seconds since the run start at which it was due (its arrival: in an open loop, the time a
  // call waited for the in-flight bound is the user's wait too), and when it was sent. A closed
  // loop's requests are due when they are sent.
  double scheduled_s = 0;
  double send_s = 0;
  std::vector<double> chunk_times_s;  // arrival of each message carrying tokens
  std::vector<int32_t> chunk_tokens;  // tokens in that message
  double end_s = 0;                   // arrival of the last message (or of the error)
  bool has_timeline = false;
  ServerTimeline timeline;
  // Multi-turn runs (RunOptions::turns > 1): the conversation and its turn (0 = the first).
  int64_t conversation = -1;
  int32_t turn = 0;

  int64_t OutputTokens() const;
  bool HasFirstToken() const { return !chunk_times_s.empty(); }
  // TTFT and E2E latency count from the arrival (scheduled_s), as a user sees them: a request
  // the client sent late (held by --max-concurrency or a busy client) counts its lag, or a
  // bound that throttles the offered rate would hide the queueing it causes.
  double TtftS() const { return chunk_times_s.empty() ? 0 : chunk_times_s.front() - scheduled_s; }
  double E2elS() const { return end_s - scheduled_s; }
  double SendLagS() const { return send_s - scheduled_s; }
  bool HasTpot() const { return ok && OutputTokens() > 1; }
  double TpotS() const;
};

struct SloTargets {
  double ttft_ms = -1;  // < 0: no target
  double tpot_ms = -1;
  bool Any() const { return ttft_ms >= 0 || tpot_ms >= 0; }
};
bool MeetsSlo(const RequestRecord& r, const SloTargets& slo);

struct Stats {
  int64_t count = 0;
  double mean = 0, std = 0, median = 0, p90 = 0, p99 = 0, min = 0, max = 0;
};
// Linear-interpolation percentile (see above) of sorted values; 0 when empty.
double PercentileSorted(const std::vector<double>& sorted, double p);
Stats ComputeStats(std::vector<double> values);

struct BenchMetrics {
  int64_t completed = 0;
  int64_t failed = 0;
  int64_t good = 0;  // requests meeting the SLO
  double duration = 0;
  int64_t total_input_tokens = 0;         // of completed requests
  int64_t total_cached_input_tokens = 0;  // of those, from the server's prefix cache
  int64_t total_output_tokens = 0;
  double request_throughput = 0;
  double output_throughput = 0;
  double total_token_throughput = 0;
  double request_goodput = 0;
  double slo_attainment = 0;
  SloTargets slo;
  Stats ttft_ms, tpot_ms, itl_ms, e2el_ms;
  // Server timeline stages of completed requests that reported them (ms): dispatch =
  // front-end arrival -> the prefill worker has it, queue = the worker has it -> prefill
  // start, prefill = prefill start -> end, relay = prefill end -> the front-end's first token,
  // transfer = KV transfer start -> end (disaggregated only), decode = decode start -> finish,
  // handoff = prefill end -> the decode worker has the KV (0 where it had it by then: the
  // transfer's part that prefill did not hide).
  Stats queue_ms, prefill_ms, transfer_ms, decode_ms, dispatch_ms, relay_ms, handoff_ms;
  std::map<std::string, int64_t> errors;  // failed requests by code
};

BenchMetrics ComputeMetrics(const std::vector<RequestRecord>& records, double duration_s,
                            const SloTargets& slo);

// The metric families of --percentile-metrics.
inline const std::vector<std::string>& AllPercentileMetrics() {
  static const std::vector<std::string> kAll = {"ttft", "tpot", "itl", "e2el"};
  return kAll;
}

// vLLM field names: completed, failed, duration, request_throughput, output_throughput,
// total_token_throughput, request_goodput, total_input_tokens, total_output_tokens,
// {mean,median,std,p90,p99}_{ttft,tpot,itl,e2el}_ms for the selected metrics, plus
// slo_attainment, goodput_slo {ttft_ms, tpot_ms}, errors {code: count} and server_timeline.
nlohmann::json MetricsToJson(const BenchMetrics& m, const std::vector<std::string>& metrics);

// A fixed-width summary table in the style of vLLM's.
std::string SummaryTable(const BenchMetrics& m, const std::vector<std::string>& metrics,
                         const std::string& title = "Serving Benchmark Result");

// One CSV row per request: index, ok, error_code, send_s, scheduled_s, ttft_ms, tpot_ms, e2el_ms,
// prompt_tokens, output_tokens, meets_slo, queue_ms, prefill_ms, transfer_ms, decode_ms,
// dispatch_ms, relay_ms, handoff_ms, cached_prompt_tokens, conversation, turn (the last two
// empty outside multi-turn runs). queue_ms .. handoff_ms come from the server
// timeline (empty without one): queue = the prefill worker has it -> its step starts, prefill =
// that step, dispatch = the front-end has it -> the prefill worker has it, relay = the step ends ->
// the front-end has the first token, handoff = the step ends -> the decode worker has the KV.
// `pdserve plan --calibrate` reads these files (scheduler/calibration.h).
std::string RequestsCsv(const std::vector<RequestRecord>& records, const SloTargets& slo);

// Multi-turn runs: one line per turn (1-based): requests, completed, SLO attainment, TTFT mean
// and median, and the share of the prompt tokens the server took from its prefix cache.
std::string TurnsTable(const std::vector<RequestRecord>& records, const SloTargets& slo);

// --search results.
struct SearchPoint {
  double rate = 0;  // requests per second offered
  BenchMetrics metrics;
};
// One row per rate: rate, rate_per_gpu, slo_attainment, request_goodput, completed, failed,
// and mean/median/p90/p99 of ttft, tpot, e2el in ms.
std::string SearchCsv(const std::vector<SearchPoint>& points, int num_gpus);
std::string SearchTable(const std::vector<SearchPoint>& points, int num_gpus,
                        double attainment_target);
// An SVG (hand-written) with three panels against rate: SLO attainment (with the target as a
// dashed line), TTFT p50/p90/p99 and TPOT p50/p90/p99 (with the SLO targets dashed).
std::string SearchSvg(const std::vector<SearchPoint>& points, int num_gpus,
                      double attainment_target, const SloTargets& slo, const std::string& title);

}  // namespace pds::client

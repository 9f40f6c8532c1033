// The pdbench run loop: sends requests to one target on a schedule and records each stream.
//
// Multi-turn conversations (`turns` > 1, open loop): the arrivals are conversation starts, and
// each conversation sends up to `turns` requests one after another. A later turn is due
// `think_time_s` after the previous turn's last message, and its prompt is the previous
// turn's prompt, the tokens the server answered, then its own user message (the spec's prompt
// after its first `follow_up_skip` tokens, e.g. the shared prefix every spec starts with). A
// turn that fails, or whose context would exceed `max_model_len`, ends its conversation.
//
// Open loop (arrival times given): each request is sent at its scheduled time regardless of
// completions; at most `max_inflight` calls are in flight (a request due while the limit is
// reached waits for a slot and is counted as late). Closed loop (`concurrency` > 0): exactly
// `concurrency` calls in flight, each completion starting the next request. Both stop issuing
// after `max_requests` requests or `duration_s`, then wait for the calls in flight (each
// bounded by its deadline), cancelling whatever is left after the drain bound.
#pragma once

#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "client/bench_metrics.h"
#include "client/serving_client.h"
#include "client/workload.h"

namespace pds::client {

struct RunProgress {
  int64_t total = 0;  // requests planned (an upper bound for duration-bound runs)
  int64_t sent = 0;
  int64_t finished = 0;  // completed or failed
  int64_t failed = 0;
  int64_t inflight = 0;
  double elapsed_s = 0;
};

struct RunOptions {
  // Open loop: one arrival time (seconds from the start) per request, nondecreasing.
  // Ignored in closed loop.
  std::vector<double> arrivals;
  int concurrency = 0;     // > 0: closed loop
  int max_inflight = 512;  // open loop bound on calls in flight, >= 1
  // Open loop with every arrival at once (pdbench --rate inf): the in-flight bound is the only
  // pacing, so latencies count from each send (as vLLM's do) and no send is late.
  bool burst = false;
  int64_t max_requests = -1;       // < 0: arrivals.size() (open) or the number of specs (closed)
  double duration_s = 0;           // > 0: stop issuing at this time
  double request_timeout_s = 300;  // each call's deadline
  double drain_timeout_s = -1;     // after the last send; < 0: request_timeout_s + 5
  SloTargets slo;                  // sent as the per-request ttft/tpot SLO when send_slo
  bool send_slo = true;
  std::optional<float> temperature;  // unset: the server's default (greedy)
  std::string json_schema;           // non-empty: structured output (GenerateRequest.json_schema)
  std::string regex;                 // non-empty: structured output (GenerateRequest.regex)
  std::string request_id_prefix;     // non-empty: request ids "<prefix>-<index>"
  // Multi-turn conversations (open loop only): specs [c * turns, (c + 1) * turns) are
  // conversation c's turns, and arrivals[c] its start; see above.
  int turns = 1;
  double think_time_s = 0;
  int64_t follow_up_skip = 0;
  int64_t max_model_len = 0;  // > 0: a turn's prompt + output must fit
  // Called from the run loop's thread about every `progress_interval_s` and once at the end.
  std::function<void(const RunProgress&)> progress;
  double progress_interval_s = 0.5;
};

struct RunResult {
  std::vector<RequestRecord> records;  // one per request sent, in send order
  double duration_s = 0;               // run start to the end of the last request
  int64_t late_sends = 0;              // open loop: sent > 10 ms after their time
  double max_send_lag_s = 0;
  bool contacted = false;  // some call got a message or a status from the server itself
};

// The request for a spec: prompt, max_tokens = output_len with ignore_eos, SLO hints. A request
// sent `lag_s` after its arrival has that much less of its TTFT target left (at least 1 us):
// the hint the server schedules by is the budget the benchmark grades it against.
pdserve::v1::GenerateRequest MakeGenerateRequest(const RequestSpec& spec, int64_t index,
                                                 const RunOptions& options, double lag_s = 0);

// Runs `specs` (cycled if more requests are needed than specs) against `client`.
absl::StatusOr<RunResult> RunBenchmark(GenerateClient& client,
                                       const std::vector<RequestSpec>& specs,
                                       const RunOptions& options);

}  // namespace pds::client

// Calibrating the simulator against a live run. A profile times the engine's steps alone; a
// live cluster's steps run slower and vary more (on shared CPU cores the front-end, the load
// generator and each worker's RPC threads take turns with the engine thread), and the
// front-end adds its own delay before a request reaches its prefill queue and after a token
// leaves the worker. Given pdbench's per-request CSV of a run (`pdbench --csv-out`, with the
// server timeline columns), this measures those effects so that `pdserve plan` can simulate
// them (SimConfig::step_time_sigma, dispatch_latency_s, relay_latency_s and
// LatencyModel::Scaled):
//   - prefill steps are recovered from the timeline: requests of one engine step share its
//     prefill start and end, so equal prefill_ms and the same start (within 2 ms, from the
//     client's send time plus the server's dispatch and queue times) mark one step; only
//     steps whose prompts all fit one step (no chunking) are used;
//   - step_time_scale = median over steps of measured / model-predicted prefill time;
//   - step_time_sigma = the robust spread of log(measured / predicted): 1.4826 x the median
//     absolute deviation, i.e. the standard deviation for a lognormal spread;
//   - dispatch and relay latencies = medians of the dispatch_ms and relay_ms columns.
// Decode steps are not in the CSV one by one; the planner applies the same scale to them.
// Pure logic plus a CSV reader; no engine, CUDA or gRPC types.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "nlohmann/json.hpp"
#include "scheduler/latency_model.h"

namespace pds::scheduler {

// One request of a pdbench per-request CSV; -1 where the column is empty or absent.
struct RunRow {
  int32_t source = 0;  // index of the file it came from (steps never span files)
  bool ok = false;
  double send_s = 0;
  int32_t prompt_tokens = 0;
  int32_t cached_prompt_tokens = 0;  // of them, from the prefix cache (0 when not recorded)
  double ttft_ms = -1, queue_ms = -1, prefill_ms = -1, dispatch_ms = -1, relay_ms = -1;
};

// Reads pdbench's --csv-out file (columns found by their header names). NOT_FOUND when it
// cannot be read; INVALID_ARGUMENT naming the file and line for a malformed one or when a
// needed column (send_s, prompt_tokens, prefill_ms) is missing.
absl::StatusOr<std::vector<RunRow>> ReadRunCsv(const std::string& path, int32_t source = 0);

struct LiveCalibration {
  double step_time_scale = 1;
  double step_time_sigma = 0;
  double dispatch_latency_s = 0;
  double relay_latency_s = 0;
  int32_t steps = 0;     // prefill steps measured
  int32_t requests = 0;  // completed requests read
  std::vector<std::string> sources;
  nlohmann::json ToJson() const;
};

// The calibration from the rows of one or more runs; steps with a prompt longer than
// max_batch_tokens (chunked) are skipped. FAILED_PRECONDITION when fewer than 20 steps are
// usable (e.g. a CSV without the server timeline, from a cluster that does not send one).
absl::StatusOr<LiveCalibration> Calibrate(const LatencyModel& model,
                                          const std::vector<RunRow>& rows,
                                          int32_t max_batch_tokens);

}  // namespace pds::scheduler

// A deterministic discrete-event simulator of a pdserve cluster: N prefill + M decode
// instances, or K colocated instances, behind one front-end. It runs the same policy code as
// the live system: the front-end's DispatchPolicy (scheduler/dispatch_policy.h), fed
// InstanceLoads built the way server/frontend.cc builds them, and each instance's engine
// step formed by the BatchPolicy (scheduler/batch_policy.h) with LlmEngine's block rules.
// Requests come from the same generators as pdbench (client/workload.h) and the results are
// pdbench's RequestRecords and BenchMetrics (client/bench_metrics.h), so simulated and
// measured runs are reported by the same code.
//
// The model of one instance mirrors engine/runtime/llm_engine.cc:
//   - sequences in admission order; a step asks the batch policy for (sequence, chunk)s
//     under max_batch_tokens / max_running, then reserves KV blocks in that order (a running
//     sequence preempts the youngest other admitted one by recompute when blocks run out; a
//     running sequence that cannot get its blocks ends the batch, a waiting one skips the
//     waiting ones after it);
//   - a prompt that needs more blocks than the instance holds fails at once
//     (RESOURCE_EXHAUSTED), as AddRequest does; a sequence ends when it has its forced
//     output length (or when its next step could not fit in the cache at all).
// Step time, from the LatencyModel (seconds):
//   - prefill chunks (k new tokens after s computed ones, k = the whole prompt when s = 0):
//     a + b * sum(k) + c * sum((s + k)^2 - s^2), which is the model's prefill form for
//     whole prompts and charges a chunk the attention it really does over its prefix;
//   - decodes (one token after a context of s computed): PredictDecode(n, sum(s + 1)), as
//     `pdserve profile` measured them;
//   - a step with both (colocated, chunked prefill, or a preempted sequence recomputing on
//     a decode instance) takes the SUM of the two: one forward pays both loads; the sum
//     counts the fixed cost twice, a slight overestimate that errs on the safe side.
// The disaggregated path mirrors the front-end and the workers:
//   - at arrival the dispatch policy places the request (a refusal is a failed record with
//     the status code, like a RESOURCE_EXHAUSTED from the front-end); the request joins the
//     prefill instance's queue dispatch_latency_s later (its TTFT deadline still counts from
//     the arrival); the front-end's
//     bookkeeping (queued prompt tokens and lengths, promised decode blocks = blocks for
//     prompt + 1, decoding count and its context estimate prompt + max_tokens / 2) is kept
//     exactly; worker status is read without the live system's 200 ms polling lag;
//   - the prefill instance streams the first token at the end of the step that samples it
//     (the client has it relay_latency_s later: that is the TTFT) and holds the KV blocks; the
//     hand-off is offered to the decode instance, which accepts when its free blocks cover the
//     prompt (less the prefix it holds) plus one block of growth per running sequence and no
//     preempted sequence waits to run again (LlmEngine::ReserveImport), else the
//     offer waits (back-pressure) and is retried, in offer order, whenever that decode instance
//     frees blocks (the live sender retries with a backoff; here the retry is immediate);
//   - the transfer takes transfer_latency_s + bytes / transfer_bandwidth, bytes = 2 (K, V)
//     * layers * kv_heads * head_dim * dtype_bytes * the prompt tokens after the blocks the
//     decode instance holds in its prefix cache (see prefix_caching); transfers do not share
//     bandwidth with each other; with layered_handoff (the workers' default) a hand-off the
//     decode instance accepts at once moved its layers during the prefill step, so only
//     max(the last layer's share, the whole move - the step) is left after the step (plus the
//     latency), while one that waited for room moves everything after its wait; at its end the
//     prefill blocks are freed and the sequence decodes on the decode instance (its first
//     decode step yields token 2);
//   - a one-token output finishes on the prefill instance and is never handed off.
// Conversations (SimRequest::after, as pdbench --turns): a later turn arrives its think time
// after the client has the previous turn's last token; a failed turn ends its conversation
// (the later turns get no records; SimResult::requests_not_sent counts them).
// Times in records are seconds from the run start (the first arrival is at its arrival
// time, 0 for generated arrivals); timeline stamps are simulated microseconds plus 1 s (so
// that 0 keeps meaning "did not happen"). Everything is a pure function of the inputs: the
// same config, model and requests give identical results (events at equal times run in the
// order they were scheduled).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "client/bench_metrics.h"
#include "client/workload.h"
#include "scheduler/dispatch_policy.h"
#include "scheduler/latency_model.h"

namespace pds::scheduler {

// What one token's K and V take: 2 * layers * kv_heads * head_dim * dtype_bytes.
struct KvShape {
  int32_t num_layers = 8;
  int32_t num_kv_heads = 4;
  int32_t head_dim = 64;
  int32_t dtype_bytes = 4;
  int64_t BytesPerToken() const {
    return int64_t{2} * num_layers * num_kv_heads * head_dim * dtype_bytes;
  }
};

// One engine, as `pdserve prefill|decode|colocated` configures it.
struct SimInstanceConfig {
  int32_t max_batch_tokens = 2048;
  int32_t max_running = 64;
  int32_t kv_blocks = 1024;
  int32_t block_size = 16;
};

struct SimConfig {
  // Disaggregated when num_colocated == 0: num_prefill and num_decode (both >= 1).
  int32_t num_prefill = 1;
  int32_t num_decode = 1;
  int32_t num_colocated = 0;  // > 0: this many colocated instances, no prefill/decode ones
  SimInstanceConfig prefill;
  SimInstanceConfig decode;
  SimInstanceConfig colocated;
  KvShape kv_shape;
  double transfer_bandwidth = 10e9;              // bytes per second, > 0
  double transfer_latency_s = 0;                 // per hand-off
  bool layered_handoff = true;                   // pdserve worker --kv-handoff layered
  std::string batch_policy = "fcfs";             // MakeBatchPolicy
  std::string dispatch_policy = "least-loaded";  // MakeDispatchPolicy (with the model)
  SloPolicyOptions dispatch_slo;                 // for "slo-aware"
  // The SLO the metrics count against; also the requests' targets for the dispatch policy
  // and the EDF batch policy's deadlines (arrival + TTFT target) when set.
  client::SloTargets slo;
  bool send_slo = true;  // put the SLO targets on every request (DispatchRequest)
  // Step-to-step variation of live step times: every step's predicted time is multiplied by
  // exp(step_time_sigma * z), z standard normal (the median step keeps the model's time).
  // 0 = every step takes exactly the model's time. Draws come from a counter-based generator
  // seeded with noise_seed, so a run stays a pure function of its inputs.
  double step_time_sigma = 0;
  uint64_t noise_seed = 0;
  // The front-end's own delays, measured in pdbench's CSV as dispatch_ms and relay_ms: from a
  // request's arrival to its place in the prefill instance's queue (the front-end books it at
  // arrival), and from a step's end to its tokens reaching the client (added to every token
  // time and the end, so TTFT and E2EL grow and TPOT does not).
  double dispatch_latency_s = 0;
  double relay_latency_s = 0;
  // Prefix caching (pdserve worker --prefix-caching, on by default). Each instance runs the
  // engine's own BlockAllocator with its prefix cache over synthetic token ids that say what
  // the requests share (SimRequest::prefix_group and stream), so hits, sharing, copies and
  // evictions are the engine's: a request on a prefill or colocated instance computes only what
  // follows the cached blocks of its prompt; on a decode instance it reserves, and is sent, only
  // that (all but the prompt's last block at most); decoding instances cache the answer too
  // (all but its last token), which a conversation's next turn starts with. The dispatch
  // policy sees, per instance, what the front-end's PrefixIndex would hold: the prompts sent
  // there, and on the instance that decoded it each answer.
  bool prefix_caching = true;
  // Conditional disaggregation (the front-end's --local-prefill-max-tokens, PreferLocalPrefill
  // in scheduler/dispatch_policy.h): a request with at most this many prompt tokens uncached on
  // its decode instance runs there whole, as on a colocated instance. 0: off.
  int32_t local_prefill_max_tokens = 0;
};

// One request: arrival (seconds from the start) and its lengths in tokens.
struct SimRequest {
  double arrival_s = 0;  // ignored for a later turn (after >= 0)
  int32_t prompt_len = 1;
  int32_t output_len = 1;
  // The prompt's first prefix_len tokens are those of every request of the same group >= 0.
  int32_t prefix_group = -1;
  int32_t prefix_len = 0;
  // The token stream the rest of its prompt and its output come from: requests of one stream
  // >= 0 agree on every position both have (a conversation's turns: each turn's prompt is the
  // previous turn's prompt and answer, then a new message). -1: its own tokens.
  int64_t stream = -1;
  // A later turn of a conversation: it arrives think_s after request `after` (an earlier one)
  // ends, and is never sent if that one fails (as pdbench --turns).
  int64_t after = -1;
  double think_s = 0;
};

struct SimInstanceStats {
  std::string id;
  int64_t steps = 0;
  double busy_s = 0;
  int64_t preemptions = 0;
  int32_t max_running = 0;
};

struct SimResult {
  std::vector<client::RequestRecord> records;  // in request order
  client::BenchMetrics metrics;                // client::ComputeMetrics over the records
  double duration_s = 0;                       // run start to the end of the last request
  std::vector<SimInstanceStats> instances;
  int64_t offers_refused = 0;     // hand-offs that had to wait for decode KV room
  int64_t requests_not_sent = 0;  // later turns of conversations that ended in a failure
};

// The requests pdbench would send: arrivals from `arrivals` (count = dataset.num_requests;
// for a trace, the trace's own times) and lengths from BuildDataset with the same options
// and seeds pdbench uses.
absl::StatusOr<std::vector<SimRequest>> MakeSimWorkload(const client::DatasetOptions& dataset,
                                                        const client::ArrivalOptions& arrivals);
// The lengths only (arrival_s = 0), to pair with ArrivalTimes at several rates.
absl::StatusOr<std::vector<SimRequest>> MakeSimLengths(const client::DatasetOptions& dataset);

// The conversations pdbench --turns T --think-time S sends: dataset.num_requests
// conversations (the arrivals start them), whose turn t takes the lengths of draw
// c * T + t of BuildDataset with num_requests * T draws. A later turn's prompt is the previous
// turn's prompt and answer, then the draw's prompt less its shared prefix (the system prompt
// is sent once, at the start); a conversation ends before a turn whose prompt and output
// would pass dataset.max_model_len (required, > 0). Each conversation is one stream; later
// turns have `after` and think_s set and arrival_s 0. The lengths assume every answer is
// whole (output_len tokens): a turn the simulator ends early (its context outgrew the cache)
// is still followed by the prompt built on the whole answer. Generated datasets only
// (INVALID_ARGUMENT for ShareGPT and traces, turns outside [2, 1000], a bad think time, more
// than kMaxConversationTurns turns in all).
inline constexpr int64_t kMaxConversationTurns = 1'000'000;
absl::StatusOr<std::vector<SimRequest>> MakeSimConversations(const client::DatasetOptions& dataset,
                                                             int32_t turns, double think_s);

// `lengths` `repeat` times over, for a cluster of `repeat` units: the requests that start
// (after < 0) take `start_times` in order (those left without one, and all after them, are
// dropped); each copy's later turns follow that copy's turns, and its conversations get
// streams of their own (distinct tokens, as pdbench's conversations have).
std::vector<SimRequest> TileWorkload(const std::vector<SimRequest>& lengths,
                                     const std::vector<double>& start_times, int32_t repeat);

// INVALID_ARGUMENT for a bad config. `policy` overrides config.dispatch_policy (not owned;
// used for this run only).
absl::StatusOr<SimResult> Simulate(const SimConfig& config, const LatencyModel& model,
                                   const std::vector<SimRequest>& requests,
                                   DispatchPolicy* policy = nullptr);
// (The step-time formulas above: PrefillChunkSeconds and DecodeStepSeconds in
// scheduler/latency_model.h.)

}  // namespace pds::scheduler

// Where the front-end sends a request: the dispatch policy interface and the first policy
// (least loaded). Pure logic: the front-end gathers the load figures and applies the answer.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace pds::scheduler {

enum class InstanceRole { kPrefill, kDecode, kColocated };
absl::string_view InstanceRoleName(InstanceRole role);  // "prefill", "decode", "colocated"
absl::StatusOr<InstanceRole> ParseInstanceRole(absl::string_view name);

// One instance as the front-end sees it now: the worker's last reported status plus the
// front-end's own bookkeeping of what it dispatched since.
struct InstanceLoad {
  std::string id;
  InstanceRole role = InstanceRole::kPrefill;
  bool healthy = false;
  int64_t queued_prompt_tokens = 0;  // dispatched, not yet prefilled
  int32_t queued_requests = 0;
  int32_t running_requests = 0;  // decoding (decode and colocated instances)
  int32_t kv_blocks_free = 0;    // after the hand-offs already promised to it
  int32_t kv_blocks_total = 0;
  int32_t block_size = 16;
  // For prediction (SLO-aware policies): prompt lengths queued for prefill in FCFS order,
  // and the context tokens of the requests decoding here (estimated by the front-end).
  std::vector<int32_t> queued_prompt_lens;
  int64_t decode_context_tokens = 0;
  int32_t max_batch_tokens = 2048;  // the instance's prefill token budget per step
  // Of the request being placed: the prompt tokens this instance probably holds in its prefix
  // cache (scheduler/prefix_index.h): a prefill or colocated instance need not compute them,
  // a decode instance need not be sent them (nor give them blocks of their own, unless they
  // are unused cached blocks, which kv_blocks_free counts already).
  int32_t cached_prefix_tokens = 0;
};

struct DispatchRequest {
  int32_t prompt_tokens = 0;
  int32_t max_tokens = 0;
  std::optional<double> ttft_slo_ms;
  std::optional<double> tpot_slo_ms;
};

// The prompt tokens `instance` would compute for `request`: all but its cached prefix, and at
// least one.
int32_t UncachedPromptTokens(const DispatchRequest& request, const InstanceLoad& instance);
// The leading blocks of the prompt a decode `instance` would share from its cache instead of
// reserving and receiving them: its cached whole blocks, all but the prompt's last block
// (LlmEngine::ReserveImport).
int32_t HeldPromptBlocks(const DispatchRequest& request, const InstanceLoad& instance);

struct Placement {
  std::string prefill;            // the prefill or colocated (local_prefill: decode) instance
  std::string decode;             // empty when `prefill` is colocated
  std::string note;               // why, for the request's timeline
  double predicted_ttft_ms = -1;  // SLO-aware policies: their predictions (-1: none)
  double predicted_tpot_ms = -1;
  bool best_effort = false;    // admitted although its SLO is predicted to be missed
  bool local_prefill = false;  // `prefill` is a decode instance that runs the whole request
};

// Conditional disaggregation: a request with at most `max_tokens` prompt tokens uncached on a
// decode instance (UncachedPromptTokens there: a conversation's next turn, whose history and
// previous answer that instance decoded; a shared system prompt with a short message; or any
// prompt that short) is prefilled there too. The short prefill joins that instance's batch;
// nothing is handed off, and the prefill side does not compute what the decode side already
// holds (it never holds an answer). The candidates: the healthy decode instance with room for
// the request that holds the most of the prompt (ties: the placed one, then the less loaded),
// then the placed one; the first that passes the gates runs it. Gates: at most
// max_tokens of such prefill work waits on a decode instance at a time (its
// queued_prompt_tokens, which the front-end books for these requests), so the sequences it
// decodes share a step with at most that much prefill; with a `model` (the slo-aware
// policy's) and a TPOT target > 0, the step that runs the prefill (with the local prefills
// queued before it), which decodes everything there too, must be predicted within it. A
// request the policy refused (its TTFT predicted over target on every prefill instance: pass
// an empty Placement) is offered too, given the model and a TTFT target > 0: its first token
// there, at the end of that step after the step in flight, must be predicted within the
// target. On success `placement` becomes one request on that decode instance (`prefill` = it,
// `decode` empty, local_prefill set, the note extended; with a model, the predictions set and
// best_effort cleared when its TTFT there is predicted within target) and it returns true; it
// returns false, leaving `placement` unchanged, when max_tokens <= 0, the placement is
// colocated, its decode instance is unknown, or no candidate passes.
class LatencyModel;
bool PreferLocalPrefill(const DispatchRequest& request, const std::vector<InstanceLoad>& instances,
                        int32_t max_tokens, Placement& placement,
                        const LatencyModel* model = nullptr);

// The largest --local-prefill-max-tokens the front-end, `pdserve plan` and plan files take.
inline constexpr int32_t kMaxLocalPrefillTokens = 1 << 20;

class DispatchPolicy;
struct SloPolicyOptions;
// The front-end's placement, which the simulator runs too: `policy`'s, then conditional
// disaggregation (PreferLocalPrefill with at most `local_prefill_max_tokens`, the request's
// SLO targets or `defaults`' where it has none, and `model` as the gate when the policy is
// slo-aware), which may also place a request the policy refused with RESOURCE_EXHAUSTED. The
// policy's status when neither places it.
absl::StatusOr<Placement> PlaceWithLocalPrefill(DispatchPolicy& policy,
                                                const DispatchRequest& request,
                                                const std::vector<InstanceLoad>& instances,
                                                int32_t local_prefill_max_tokens,
                                                const SloPolicyOptions& defaults,
                                                const LatencyModel* model);

class DispatchPolicy {
 public:
  virtual ~DispatchPolicy() = default;
  virtual std::string name() const = 0;
  // UNAVAILABLE when no healthy instance can take the request.
  virtual absl::StatusOr<Placement> Place(const DispatchRequest& request,
                                          const std::vector<InstanceLoad>& instances) = 0;
};

// Prefill: the healthy instance with the fewest queued prompt tokens, counting the ones this
// request would add there (its uncached tokens: a cached prefix draws it to the instance that
// holds it unless that one is busier by more than the prefix; then fewer queued requests,
// then id). Decode: the healthy instance with the most free KV blocks, plus the prompt blocks it
// holds already (not sent to it, and shared there while in use; counted even where they are
// unused cached blocks, which its free count includes), then fewer running requests, then id.
// Colocated instances (used when there are no prefill/decode pairs): the same, plus one block's
// worth per running request.
std::unique_ptr<DispatchPolicy> MakeLeastLoadedPolicy();

// Predicted time to first token of a new prompt of `prompt_len` tokens on a prefill (or
// colocated) instance: the queued prompts and then this one, formed into FCFS batches under
// the instance's token budget, each batch timed by the model; plus, for colocated
// instances, the decode steps interleaved meanwhile. Milliseconds.
double PredictTtftMs(const LatencyModel& model, const InstanceLoad& instance, int32_t prompt_len);
// Predicted time per output token on a decode (or colocated) instance once a request with
// `context` tokens joins its batch. Milliseconds.
double PredictTpotMs(const LatencyModel& model, const InstanceLoad& instance, int64_t context);

// The largest decode batch (1..max_batch) whose predicted step time, with every sequence at
// `mean_context` tokens, is within `tpot_slo_ms`; 1 when even one sequence is predicted over.
int32_t MaxBatchForTpot(const LatencyModel& model, int64_t mean_context, double tpot_slo_ms,
                        int32_t max_batch);

struct SloPolicyOptions {
  double default_ttft_slo_ms = 0;  // used when a request has no target (0: no target)
  double default_tpot_slo_ms = 0;
  // A request whose best predicted TTFT exceeds its target is refused (RESOURCE_EXHAUSTED
  // with the prediction), unless best_effort: then it is placed anyway and marked.
  bool best_effort = false;
  double admission_slack = 1.0;  // refuse only when predicted > target * slack
};

// SLO-aware dispatch: prefill (or colocated) instance with the lowest predicted TTFT (of the
// request's uncached tokens there); decode instance with room for the request that keeps the
// predicted TPOT within target with the most headroom (the lowest predicted TPOT when none can;
// equal ones: the one holding most of the prompt's blocks); admission control on the predicted
// TTFT.
std::unique_ptr<DispatchPolicy> MakeSloAwarePolicy(const LatencyModel& model,
                                                   SloPolicyOptions options);

// By name: "least-loaded", or "slo-aware" (needs `model`).
absl::StatusOr<std::unique_ptr<DispatchPolicy>> MakeDispatchPolicy(
    absl::string_view name, const LatencyModel* model = nullptr, SloPolicyOptions options = {});

}  // namespace pds::scheduler

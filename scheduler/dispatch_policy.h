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
};

struct DispatchRequest {
  int32_t prompt_tokens = 0;
  int32_t max_tokens = 0;
  std::optional<double> ttft_slo_ms;
  std::optional<double> tpot_slo_ms;
};

struct Placement {
  std::string prefill;  // the prefill or colocated instance
  std::string decode;   // empty when `prefill` is colocated
  std::string note;     // why, for the request's timeline
};

class DispatchPolicy {
 public:
  virtual ~DispatchPolicy() = default;
  virtual std::string name() const = 0;
  // UNAVAILABLE when no healthy instance can take the request.
  virtual absl::StatusOr<Placement> Place(const DispatchRequest& request,
                                          const std::vector<InstanceLoad>& instances) = 0;
};

// Prefill: the healthy instance with the fewest queued prompt tokens (then fewer queued
// requests, then id). Decode: the healthy instance with the most free KV blocks (then fewer
// running requests, then id). Colocated instances (used when there are no prefill/decode
// pairs): the fewest queued prompt tokens plus one block's worth per running request.
std::unique_ptr<DispatchPolicy> MakeLeastLoadedPolicy();

// By name: "least-loaded".
absl::StatusOr<std::unique_ptr<DispatchPolicy>> MakeDispatchPolicy(absl::string_view name);

}  // namespace pds::scheduler

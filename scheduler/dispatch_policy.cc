#include "scheduler/dispatch_policy.h"

#include <tuple>

#include "absl/strings/str_cat.h"

namespace pds::scheduler {

absl::string_view InstanceRoleName(InstanceRole role) {
  switch (role) {
    case InstanceRole::kPrefill:
      return "prefill";
    case InstanceRole::kDecode:
      return "decode";
    case InstanceRole::kColocated:
      return "colocated";
  }
  return "unknown";
}

absl::StatusOr<InstanceRole> ParseInstanceRole(absl::string_view name) {
  if (name == "prefill") return InstanceRole::kPrefill;
  if (name == "decode") return InstanceRole::kDecode;
  if (name == "colocated") return InstanceRole::kColocated;
  return absl::InvalidArgumentError(
      absl::StrCat("unknown role '", name, "' (prefill, decode or colocated)"));
}

namespace {

class LeastLoadedPolicy : public DispatchPolicy {
 public:
  std::string name() const override { return "least-loaded"; }

  absl::StatusOr<Placement> Place(const DispatchRequest& request,
                                  const std::vector<InstanceLoad>& instances) override {
    const InstanceLoad* prefill = nullptr;
    const InstanceLoad* decode = nullptr;
    const InstanceLoad* colocated = nullptr;
    auto prefill_key = [](const InstanceLoad& i) {
      return std::make_tuple(i.queued_prompt_tokens, i.queued_requests, i.id);
    };
    auto decode_key = [](const InstanceLoad& i) {
      return std::make_tuple(-static_cast<int64_t>(i.kv_blocks_free), i.running_requests, i.id);
    };
    auto colocated_key = [](const InstanceLoad& i) {
      return std::make_tuple(
          i.queued_prompt_tokens + static_cast<int64_t>(i.running_requests) * i.block_size,
          i.queued_requests, i.id);
    };
    for (const InstanceLoad& i : instances) {
      if (!i.healthy) continue;
      switch (i.role) {
        case InstanceRole::kPrefill:
          if (prefill == nullptr || prefill_key(i) < prefill_key(*prefill)) prefill = &i;
          break;
        case InstanceRole::kDecode:
          if (decode == nullptr || decode_key(i) < decode_key(*decode)) decode = &i;
          break;
        case InstanceRole::kColocated:
          if (colocated == nullptr || colocated_key(i) < colocated_key(*colocated)) {
            colocated = &i;
          }
          break;
      }
    }
    Placement placement;
    if (prefill != nullptr && decode != nullptr) {
      placement.prefill = prefill->id;
      placement.decode = decode->id;
      placement.note =
          absl::StrCat("least-loaded: prefill ", prefill->id, " (", prefill->queued_prompt_tokens,
                       " queued prompt tokens), decode ", decode->id, " (", decode->kv_blocks_free,
                       " free KV blocks)");
      return placement;
    }
    if (colocated != nullptr) {
      placement.prefill = colocated->id;
      placement.note = absl::StrCat("least-loaded: colocated ", colocated->id, " (",
                                    colocated->queued_prompt_tokens, " queued prompt tokens, ",
                                    colocated->running_requests, " running)");
      return placement;
    }
    return absl::UnavailableError(
        absl::StrCat("no healthy ", prefill == nullptr ? "prefill" : "decode",
                     " instance to serve the request (and no colocated instance)"));
  }
};

}  // namespace

std::unique_ptr<DispatchPolicy> MakeLeastLoadedPolicy() {
  return std::make_unique<LeastLoadedPolicy>();
}

absl::StatusOr<std::unique_ptr<DispatchPolicy>> MakeDispatchPolicy(absl::string_view name) {
  if (name == "least-loaded") return MakeLeastLoadedPolicy();
  return absl::InvalidArgumentError(absl::StrCat("unknown dispatch policy '", name, "'"));
}

}  // namespace pds::scheduler

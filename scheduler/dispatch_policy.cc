#include "scheduler/dispatch_policy.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <tuple>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "engine/kv_cache/block_allocator.h"
#include "scheduler/latency_model.h"

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

// ", 48 of its prompt tokens cached" when the instance holds some of the prompt.
std::string CachedNote(const InstanceLoad& i, const DispatchRequest& request) {
  const int32_t cached = request.prompt_tokens - UncachedPromptTokens(request, i);
  return cached > 0 ? absl::StrCat(", ", cached, " of its prompt tokens cached") : "";
}

// ", 4 prompt blocks held" when a decode instance holds some of the prompt.
std::string HeldNote(const InstanceLoad& i, const DispatchRequest& request) {
  const int32_t held = HeldPromptBlocks(request, i);
  return held > 0 ? absl::StrCat(", ", held, " prompt blocks held") : "";
}

class LeastLoadedPolicy : public DispatchPolicy {
 public:
  std::string name() const override { return "least-loaded"; }

  absl::StatusOr<Placement> Place(const DispatchRequest& request,
                                  const std::vector<InstanceLoad>& instances) override {
    const InstanceLoad* prefill = nullptr;
    const InstanceLoad* decode = nullptr;
    const InstanceLoad* colocated = nullptr;
    auto prefill_key = [&request](const InstanceLoad& i) {
      return std::make_tuple(i.queued_prompt_tokens + UncachedPromptTokens(request, i),
                             i.queued_requests, i.id);
    };
    auto decode_key = [&request](const InstanceLoad& i) {
      return std::make_tuple(-static_cast<int64_t>(i.kv_blocks_free) - HeldPromptBlocks(request, i),
                             i.running_requests, i.id);
    };
    auto colocated_key = [&request](const InstanceLoad& i) {
      return std::make_tuple(i.queued_prompt_tokens + UncachedPromptTokens(request, i) +
                                 static_cast<int64_t>(i.running_requests) * i.block_size,
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
      placement.note = absl::StrCat(
          "least-loaded: prefill ", prefill->id, " (", prefill->queued_prompt_tokens,
          " queued prompt tokens", CachedNote(*prefill, request), "), decode ", decode->id, " (",
          decode->kv_blocks_free, " free KV blocks", HeldNote(*decode, request), ")");
      return placement;
    }
    if (colocated != nullptr) {
      placement.prefill = colocated->id;
      placement.note = absl::StrCat("least-loaded: colocated ", colocated->id, " (",
                                    colocated->queued_prompt_tokens, " queued prompt tokens, ",
                                    colocated->running_requests, " running",
                                    CachedNote(*colocated, request), ")");
      return placement;
    }
    return absl::UnavailableError(
        absl::StrCat("no healthy ", prefill == nullptr ? "prefill" : "decode",
                     " instance to serve the request (and no colocated instance)"));
  }
};

class SloAwarePolicy : public DispatchPolicy {
 public:
  SloAwarePolicy(const LatencyModel& model, SloPolicyOptions options)
      : model_(model), options_(options) {}
  std::string name() const override { return "slo-aware"; }

  absl::StatusOr<Placement> Place(const DispatchRequest& request,
                                  const std::vector<InstanceLoad>& instances) override {
    const double ttft_slo = request.ttft_slo_ms.value_or(options_.default_ttft_slo_ms);
    const double tpot_slo = request.tpot_slo_ms.value_or(options_.default_tpot_slo_ms);
    const bool have_pairs =
        std::any_of(
            instances.begin(), instances.end(),
            [](const InstanceLoad& i) { return i.healthy && i.role == InstanceRole::kPrefill; }) &&
        std::any_of(instances.begin(), instances.end(), [](const InstanceLoad& i) {
          return i.healthy && i.role == InstanceRole::kDecode;
        });
    const InstanceRole first_role = have_pairs ? InstanceRole::kPrefill : InstanceRole::kColocated;
    const InstanceLoad* best = nullptr;
    double best_ttft = 0;
    for (const InstanceLoad& i : instances) {
      if (!i.healthy || i.role != first_role) continue;
      const double t = PredictTtftMs(model_, i, UncachedPromptTokens(request, i));
      if (best == nullptr || t < best_ttft || (t == best_ttft && i.id < best->id)) {
        best = &i;
        best_ttft = t;
      }
    }
    if (best == nullptr) {
      return absl::UnavailableError("no healthy instance to serve the request");
    }
    Placement p;
    p.prefill = best->id;
    p.predicted_ttft_ms = best_ttft;
    const int64_t context = request.prompt_tokens + request.max_tokens / 2;
    const InstanceLoad* decode = nullptr;
    if (have_pairs) {
      double decode_tpot = 0;
      // Prefer instances with room for the whole request (a held prefix counts: its blocks may
      // be among the free ones), then (within the target) the most headroom = the lowest
      // prediction, then the most prompt blocks held.
      auto key = [&](const InstanceLoad& x, double tpot) {
        const int32_t blocks_needed = engine::BlockTable::BlocksFor(
            request.prompt_tokens + request.max_tokens, std::max(1, x.block_size));
        return std::make_tuple(x.kv_blocks_free < blocks_needed, tpot,
                               -HeldPromptBlocks(request, x), x.id);
      };
      for (const InstanceLoad& i : instances) {
        if (!i.healthy || i.role != InstanceRole::kDecode) continue;
        const double t = PredictTpotMs(model_, i, context);
        if (decode == nullptr || key(i, t) < key(*decode, decode_tpot)) {
          decode = &i;
          decode_tpot = t;
        }
      }
      p.decode = decode->id;
      p.predicted_tpot_ms = decode_tpot;
    } else {
      p.predicted_tpot_ms = PredictTpotMs(model_, *best, context);
    }
    p.note = absl::StrFormat(
        "slo-aware: %s predicted TTFT %.1f ms (target %s%s)", p.prefill, best_ttft,
        ttft_slo > 0 ? absl::StrFormat("%.0f ms", ttft_slo) : "none", CachedNote(*best, request));
    if (decode != nullptr) {
      absl::StrAppendFormat(
          &p.note, ", %s predicted TPOT %.1f ms (target %s%s)", p.decode, p.predicted_tpot_ms,
          tpot_slo > 0 ? absl::StrFormat("%.0f ms", tpot_slo) : "none", HeldNote(*decode, request));
    }
    if (ttft_slo > 0 && best_ttft > ttft_slo * options_.admission_slack) {
      if (!options_.best_effort) {
        return absl::ResourceExhaustedError(absl::StrFormat(
            "cannot meet the TTFT target: the best instance (%s) is predicted at %.1f ms > %.1f "
            "ms; retry later or relax ttft_slo_ms",
            best->id, best_ttft, ttft_slo));
      }
      p.best_effort = true;
      p.note += "; best-effort: TTFT target predicted to be missed";
    }
    return p;
  }

 private:
  const LatencyModel& model_;
  SloPolicyOptions options_;
};

}  // namespace

int32_t UncachedPromptTokens(const DispatchRequest& request, const InstanceLoad& instance) {
  if (request.prompt_tokens <= 1) return 1;
  const int32_t cached = std::clamp(instance.cached_prefix_tokens, 0, request.prompt_tokens - 1);
  return request.prompt_tokens - cached;
}

int32_t HeldPromptBlocks(const DispatchRequest& request, const InstanceLoad& instance) {
  const int32_t bs = std::max(1, instance.block_size);
  const int32_t prompt_blocks =
      engine::BlockTable::BlocksFor(std::max(0, request.prompt_tokens), bs);
  return std::clamp(instance.cached_prefix_tokens / bs, 0, std::max(0, prompt_blocks - 1));
}

bool PreferLocalPrefill(const DispatchRequest& request, const std::vector<InstanceLoad>& instances,
                        int32_t max_tokens, Placement& placement, const LatencyModel* model) {
  // A placement the policy refused (nothing placed) is offered only with a model to predict
  // the local TTFT by.
  const bool refused = placement.prefill.empty() && placement.decode.empty();
  if (max_tokens <= 0 || (placement.decode.empty() && !refused)) return false;
  const bool ttft_target = request.ttft_slo_ms.has_value() && *request.ttft_slo_ms > 0;
  const bool tpot_target = request.tpot_slo_ms.has_value() && *request.tpot_slo_ms > 0;
  if (refused && (model == nullptr || !ttft_target)) return false;
  // The candidates: the healthy decode instance with room that holds the most of the prompt
  // (ties: the placed one, then the fewer running, queued, the id), then the placed one.
  // (Trying every instance in turn moved more prefills to the decode side than pays: the
  // planner predicted lower goodput for the units with several decode instances.)
  const InstanceLoad* placed = nullptr;
  const InstanceLoad* best = nullptr;
  const auto key = [&](const InstanceLoad& i) {
    return std::make_tuple(-i.cached_prefix_tokens, i.id != placement.decode, i.running_requests,
                           i.queued_prompt_tokens, i.id);
  };
  for (const InstanceLoad& i : instances) {
    if (i.role != InstanceRole::kDecode) continue;
    if (i.id == placement.decode) placed = &i;
    const int32_t needed =
        engine::BlockTable::BlocksFor(request.prompt_tokens + 1, std::max(1, i.block_size));
    const bool eligible =
        &i == placed || (i.healthy && i.kv_blocks_free + HeldPromptBlocks(request, i) >= needed);
    if (eligible && (best == nullptr || key(i) < key(*best))) best = &i;
  }
  if (!refused && placed == nullptr) return false;
  for (const InstanceLoad* decode : {best, placed != best ? placed : nullptr}) {
    if (decode == nullptr) continue;
    const int32_t uncached = UncachedPromptTokens(request, *decode);
    // At most max_tokens of prefill work waits on a decode instance at a time: its decoding
    // sequences share each step with at most that much prefill, and the rest is disaggregated.
    if (uncached > max_tokens || decode->queued_prompt_tokens + uncached > max_tokens) continue;
    std::string predicted;
    double step_ms = -1, ttft_ms = -1;
    if (model != nullptr) {
      // The step that runs the prefill (with the local prefills queued before it, charged
      // their per-token cost) also decodes everything there: it must stay within the TPOT
      // target. Its first token comes at the end of that step, after the step in flight.
      step_ms = PrefillChunkSeconds(*model, {{request.prompt_tokens - uncached, uncached}},
                                    decode->queued_prompt_tokens) *
                    1e3 +
                PredictTpotMs(*model, *decode,
                              int64_t{request.prompt_tokens} + std::max(0, request.max_tokens) / 2);
      const double in_flight_ms =
          decode->running_requests > 0
              ? model->PredictDecode(decode->running_requests, decode->decode_context_tokens) * 1e3
              : 0.0;
      ttft_ms = step_ms + in_flight_ms;
      if (tpot_target && step_ms > *request.tpot_slo_ms) continue;
      if (refused && ttft_ms > *request.ttft_slo_ms) continue;
      predicted =
          absl::StrFormat(", a step of %.1f ms and TTFT %.1f ms predicted", step_ms, ttft_ms);
    }
    if (refused) placement.note = "the prefill side was predicted over the TTFT target";
    absl::StrAppend(&placement.note, "; prefilled on ", decode->id, " (", uncached, " of ",
                    request.prompt_tokens, " prompt tokens uncached there", predicted, ")");
    placement.prefill = decode->id;
    placement.decode.clear();
    placement.local_prefill = true;
    if (model != nullptr) {
      placement.predicted_ttft_ms = ttft_ms;
      placement.predicted_tpot_ms = step_ms;
      // Admitted best-effort for the prefill side's TTFT; here it is predicted within target.
      if (placement.best_effort && ttft_target && ttft_ms <= *request.ttft_slo_ms) {
        placement.best_effort = false;
      }
    }
    return true;
  }
  return false;
}

absl::StatusOr<Placement> PlaceWithLocalPrefill(DispatchPolicy& policy,
                                                const DispatchRequest& request,
                                                const std::vector<InstanceLoad>& instances,
                                                int32_t local_prefill_max_tokens,
                                                const SloPolicyOptions& defaults,
                                                const LatencyModel* model) {
  absl::StatusOr<Placement> placed = policy.Place(request, instances);
  if (local_prefill_max_tokens <= 0) return placed;
  DispatchRequest local = request;
  if (!local.ttft_slo_ms && defaults.default_ttft_slo_ms > 0) {
    local.ttft_slo_ms = defaults.default_ttft_slo_ms;
  }
  if (!local.tpot_slo_ms && defaults.default_tpot_slo_ms > 0) {
    local.tpot_slo_ms = defaults.default_tpot_slo_ms;
  }
  const LatencyModel* gate = policy.name() == "slo-aware" ? model : nullptr;
  if (placed.ok()) {
    PreferLocalPrefill(local, instances, local_prefill_max_tokens, *placed, gate);
    return placed;
  }
  Placement rescued;
  if (absl::IsResourceExhausted(placed.status()) &&
      PreferLocalPrefill(local, instances, local_prefill_max_tokens, rescued, gate)) {
    return rescued;
  }
  return placed;
}

double PredictTtftMs(const LatencyModel& model, const InstanceLoad& instance, int32_t prompt_len) {
  // FCFS batches under the token budget (long prompts are chunked: a chunk of the budget
  // is timed like a prompt of that many tokens).
  const int32_t budget = std::max(1, instance.max_batch_tokens);
  std::vector<int32_t> lens = instance.queued_prompt_lens;
  lens.push_back(prompt_len);
  double total_s = 0;
  std::vector<int32_t> batch;
  int32_t room = budget;
  for (int32_t len : lens) {
    int32_t left = len;
    while (left > 0) {
      const int32_t chunk = std::min(left, room);
      batch.push_back(chunk);
      left -= chunk;
      room -= chunk;
      if (room == 0) {
        total_s += model.PredictPrefill(batch);
        batch.clear();
        room = budget;
      }
    }
  }
  if (!batch.empty()) total_s += model.PredictPrefill(batch);
  if (instance.role == InstanceRole::kColocated && instance.running_requests > 0) {
    // The running decodes ride along in each step: one decode step's cost per prefill batch.
    const int32_t batches = static_cast<int32_t>(std::ceil(
        static_cast<double>(std::accumulate(lens.begin(), lens.end(), int64_t{0})) / budget));
    total_s +=
        batches * model.PredictDecode(instance.running_requests, instance.decode_context_tokens);
  }
  return total_s * 1e3;
}

double PredictTpotMs(const LatencyModel& model, const InstanceLoad& instance, int64_t context) {
  return model.PredictDecode(instance.running_requests + 1,
                             instance.decode_context_tokens + context) *
         1e3;
}

int32_t MaxBatchForTpot(const LatencyModel& model, int64_t mean_context, double tpot_slo_ms,
                        int32_t max_batch) {
  int32_t best = 1;
  for (int32_t b = 1; b <= max_batch; ++b) {
    if (model.PredictDecode(b, mean_context * b) * 1e3 <= tpot_slo_ms) best = b;
  }
  return best;
}

std::unique_ptr<DispatchPolicy> MakeSloAwarePolicy(const LatencyModel& model,
                                                   SloPolicyOptions options) {
  return std::make_unique<SloAwarePolicy>(model, options);
}

std::unique_ptr<DispatchPolicy> MakeLeastLoadedPolicy() {
  return std::make_unique<LeastLoadedPolicy>();
}

absl::StatusOr<std::unique_ptr<DispatchPolicy>> MakeDispatchPolicy(absl::string_view name,
                                                                   const LatencyModel* model,
                                                                   SloPolicyOptions options) {
  if (name == "least-loaded") return MakeLeastLoadedPolicy();
  if (name == "slo-aware") {
    if (model == nullptr) {
      return absl::InvalidArgumentError(
          "the slo-aware policy needs a latency model (--profile FILE from pdserve profile)");
    }
    return MakeSloAwarePolicy(*model, options);
  }
  return absl::InvalidArgumentError(
      absl::StrCat("unknown dispatch policy '", name, "' (least-loaded or slo-aware)"));
}

}  // namespace pds::scheduler

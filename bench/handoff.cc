#include "bench/handoff.h"

#include <chrono>
#include <memory>
#include <thread>
#include <utility>

#include "absl/strings/str_cat.h"
#include "engine/runtime/kv_handoff.h"

namespace pds::bench {
namespace {

double MsSince(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
}

}  // namespace

const char* HandoffModeName(HandoffMode mode) {
  switch (mode) {
    case HandoffMode::kPrefillOnly:
      return "prefill";
    case HandoffMode::kAfter:
      return "after";
    case HandoffMode::kLayered:
      return "layered";
  }
  return "unknown";
}

absl::StatusOr<HandoffTiming> TimeHandoff(engine::LlmEngine& eng, engine::Backend& backend,
                                          engine::KvSender& sender, const std::string& address,
                                          const std::string& id, const std::vector<int32_t>& prompt,
                                          HandoffMode mode, absl::Duration timeout) {
  const auto fail = [&](const absl::Status& s, const char* stage) {
    eng.set_handoff_hook(nullptr);
    eng.Cancel(id).IgnoreError();
    return absl::Status(s.code(), absl::StrCat("hand-off '", id, "' (", HandoffModeName(mode),
                                               "), ", stage, ": ", s.message()));
  };
  engine::GenerateRequest r;
  r.id = id;
  r.prompt = prompt;
  r.params.max_tokens = 4;
  r.params.ignore_eos = true;
  r.hold_kv_after_prefill = true;
  if (eng.cache().allocator().prefix_cache_enabled()) {
    // The same prompt every time: a cache would make every prefill after the first a hit.
    return absl::FailedPreconditionError("hand-off timing needs an engine without prefix caching");
  }
  if (absl::Status added = eng.AddRequest(r); !added.ok()) return fail(added, "adding it");
  const absl::Time deadline = absl::Now() + timeout;
  std::thread layered;
  absl::StatusOr<engine::KvSendStats> layered_sent = absl::UnknownError("no hand-off");
  if (mode == HandoffMode::kLayered) {
    eng.set_handoff_hook([&](std::vector<std::shared_ptr<engine::KvHandoff>> handoffs) {
      if (handoffs.size() != 1) return;  // reported below: nothing was sent
      std::shared_ptr<engine::KvHandoff> h = handoffs[0];
      const engine::KvTransferHeader header =
          engine::KvHeaderFor(eng.cache(), backend.compute_dtype(), id, h->num_tokens(),
                              static_cast<int32_t>(h->blocks().size()), engine::kNextTokenAtEnd);
      layered = std::thread([&, h, header] {
        engine::CacheKvSource source(backend, eng.cache(), h, deadline, nullptr);
        layered_sent = sender.Send(address, header, source, deadline);
      });
    });
  } else {
    eng.set_handoff_hook(nullptr);
  }
  const auto t0 = std::chrono::steady_clock::now();
  absl::StatusOr<std::vector<engine::TokenOutput>> step = eng.Step();
  HandoffTiming timing;
  timing.step_ms = MsSince(t0);
  if (layered.joinable()) layered.join();
  if (!step.ok()) return fail(step.status(), "the prefill step");
  if (step->size() != 1 || !(*step)[0].kv_held) {
    return fail(absl::InternalError("no held first token"), "the prefill step");
  }
  if (mode == HandoffMode::kAfter) {
    absl::StatusOr<engine::HeldKv> held = eng.GetHeld(id);
    if (!held.ok()) return fail(held.status(), "the held blocks");
    engine::CacheKvSource source(backend, eng.cache(), held->blocks);
    const engine::KvTransferHeader header =
        engine::KvHeaderFor(eng.cache(), backend.compute_dtype(), id, held->num_tokens,
                            static_cast<int32_t>(held->blocks.size()), (*step)[0].token);
    absl::StatusOr<engine::KvSendStats> sent = sender.Send(address, header, source, deadline);
    if (!sent.ok()) return fail(sent.status(), "the transfer");
  } else if (mode == HandoffMode::kLayered && !layered_sent.ok()) {
    return fail(layered_sent.status(), "the transfer");
  }
  timing.ms = MsSince(t0);
  eng.set_handoff_hook(nullptr);
  if (absl::Status cancelled = eng.Cancel(id); !cancelled.ok()) {
    return fail(cancelled, "releasing it");
  }
  return timing;
}

}  // namespace pds::bench

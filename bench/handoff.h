// Timing one KV hand-off of a prefill, the way a prefill worker does it, for the benchmarks
// (bench_kv_transfer on the GPU, bench_handoff on the CPU): the engine prefills a prompt held
// for the hand-off and the KV goes to a receiver, after the step or layer by layer during it.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "engine/backend/backend.h"
#include "engine/runtime/llm_engine.h"
#include "engine/transfer/kv_transport.h"

namespace pds::bench {

enum class HandoffMode {
  kPrefillOnly,  // the step alone, no transfer
  kAfter,        // the step, then Send of the held blocks with the token
  kLayered,      // Send started by the engine's hand-off hook before the step's forward
};
const char* HandoffModeName(HandoffMode mode);

struct HandoffTiming {
  double ms = 0;       // until the receiver confirmed every layer and the token (or the step)
  double step_ms = 0;  // the prefill step itself
};

// Adds request `id` with `prompt` (held for the hand-off, 4 tokens to go) to `engine`, which
// must have nothing else to run, runs the step that prefills it in one go (the engine's token
// budget must cover the prompt) in `mode`, times it, and cancels the request. Errors name the
// request and the stage.
absl::StatusOr<HandoffTiming> TimeHandoff(engine::LlmEngine& engine, engine::Backend& backend,
                                          engine::KvSender& sender, const std::string& address,
                                          const std::string& id, const std::vector<int32_t>& prompt,
                                          HandoffMode mode,
                                          absl::Duration timeout = absl::Seconds(30));

}  // namespace pds::bench

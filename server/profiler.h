// Profiles the engine as it serves (the same Transformer::Forward the workers run, on the
// same backend and threads) over a grid of prefill batches and decode steps, for fitting the
// scheduler's latency model.
#pragma once

#include <vector>

#include "absl/status/statusor.h"
#include "engine/model/transformer.h"
#include "scheduler/latency_model.h"

namespace pds::server {

struct ProfileOptions {
  bool quick = false;  // a small grid that runs in seconds (tests, the demo)
  int32_t block_size = 16;
  int32_t rounds = 3;  // passes over the whole grid; each point keeps its median round
  int32_t reps = 3;    // timed repetitions per point (the median is kept), after one warm-up
};

struct Profile {
  std::vector<scheduler::PrefillSample> prefill;
  std::vector<scheduler::DecodeSample> decode;
};

absl::StatusOr<Profile> ProfileEngine(engine::Transformer& model, const ProfileOptions& options);

}  // namespace pds::server

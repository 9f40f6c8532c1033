// Profiles the engine as it serves (the same Transformer::Forward the workers run, on the
// same backend and threads) over a grid of prefill batches and decode steps, for fitting the
// scheduler's latency model.
#pragma once

#include <atomic>
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
  // When set, the phase being timed (ProfilePhase) is stored here before its points run, for
  // a neighbour load that imitates the other instance of a pair (cli_profile.cc).
  std::atomic<int>* phase = nullptr;
};

enum ProfilePhase : int { kProfileIdle = 0, kProfilePrefill = 1, kProfileDecode = 2 };

struct Profile {
  std::vector<scheduler::PrefillSample> prefill;
  std::vector<scheduler::DecodeSample> decode;
};

absl::StatusOr<Profile> ProfileEngine(engine::Transformer& model, const ProfileOptions& options);

// The other instance of a 1 prefill + 1 decode pair, for profiling under its interference (on
// a machine whose instances share memory bandwidth or cores, as CPU instances do): until
// `stop`, runs on `model` (a second copy, on its own CPUs) what that instance would be doing:
// decode steps of `decode_batch` sequences at context `decode_context` while `phase` says
// prefill is being timed, and prefills of one `prompt_len`-token prompt while decode is;
// nothing while idle.
struct NeighborLoad {
  int32_t decode_batch = 4;
  int32_t decode_context = 256;
  int32_t prompt_len = 64;
  int32_t block_size = 16;
};
absl::Status RunNeighbor(engine::Transformer& model, const NeighborLoad& load,
                         const std::atomic<int>& phase, const std::atomic<bool>& stop);

}  // namespace pds::server

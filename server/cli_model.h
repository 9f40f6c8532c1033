// The flags and loading shared by subcommands that run a model: --model (or
// --random-weights), --backend, --threads.
#pragma once

#include <memory>
#include <vector>

#include "absl/status/statusor.h"
#include "engine/backend/backend.h"
#include "engine/model/transformer.h"
#include "server/cli_args.h"

namespace pds::server {

// The flag specs for --model, --backend and --threads.
std::vector<FlagSpec> ModelFlagSpecs();

struct LoadedModel {
  std::string dir;
  int threads = 0;  // as given (0: all cores)
  std::unique_ptr<engine::Backend> backend;
  std::unique_ptr<engine::Transformer> model;
};

// Creates the backend from --backend/--threads and loads --model onto it, or makes
// --random-weights PRESET's model directly on it (dir is then "random-weights:PRESET").
// With --cpus (and `pin`), the calling thread is pinned first, so every thread created
// afterwards (the backend's, the server's) inherits the mask.
absl::StatusOr<LoadedModel> LoadModelFromArgs(const CliArgs& args, bool pin = true);

}  // namespace pds::server

#include "server/cli_model.h"

#include "engine/common/status_macros.h"
#include "engine/model/presets.h"
#include "server/cpu_affinity.h"

namespace pds::server {

std::vector<FlagSpec> ModelFlagSpecs() {
  return {
      {"model", false, "HF model directory"},
      {"random-weights", false,
       "instead of --model: a preset shape (llama3-8b, llama3.2-1b, qwen2.5-7b, tiny, small) "
       "with seeded random weights made on the backend (benchmarks)"},
      {"backend", false, "cpu (default) or cuda"},
      {"threads", false, "CPU threads (default: all cores)"},
      {"cpus", false, "pin every thread to these CPUs, e.g. 0 or 0-3,6 (default: no pinning)"},
  };
}

absl::StatusOr<LoadedModel> LoadModelFromArgs(const CliArgs& args, bool pin) {
  LoadedModel loaded;
  const bool random = args.Has("random-weights");
  if (random == args.Has("model")) {
    return absl::InvalidArgumentError("give exactly one of --model and --random-weights");
  }
  // Pinned before the backend and anything else starts threads: they inherit the mask.
  if (pin && args.Has("cpus")) PDS_RETURN_IF_ERROR(PinToCpus(args.GetString("cpus")));
  engine::BackendOptions options;
  options.kind = args.GetString("backend", "cpu");
  PDS_ASSIGN_OR_RETURN(int64_t threads, args.GetInt("threads", 0));
  loaded.threads = static_cast<int>(threads);
  options.num_threads = loaded.threads;
  PDS_ASSIGN_OR_RETURN(loaded.backend, engine::CreateBackend(options));
  if (random) {
    const std::string preset = args.GetString("random-weights", "");
    PDS_ASSIGN_OR_RETURN(engine::ModelConfig config, engine::PresetConfig(preset));
    loaded.dir = "random-weights:" + preset;
    PDS_ASSIGN_OR_RETURN(loaded.model,
                         engine::Transformer::CreateRandom(config, *loaded.backend, /*seed=*/1));
    return loaded;
  }
  PDS_ASSIGN_OR_RETURN(loaded.dir, args.Required("model"));
  PDS_ASSIGN_OR_RETURN(loaded.model, engine::Transformer::Load(loaded.dir, *loaded.backend));
  return loaded;
}

}  // namespace pds::server

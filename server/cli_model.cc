#include "server/cli_model.h"

#include "engine/common/status_macros.h"

namespace pds::server {

std::vector<FlagSpec> ModelFlagSpecs() {
  return {
      {"model", false, "HF model directory"},
      {"backend", false, "cpu (default) or cuda"},
      {"threads", false, "CPU threads (default: all cores)"},
  };
}

absl::StatusOr<LoadedModel> LoadModelFromArgs(const CliArgs& args) {
  LoadedModel loaded;
  PDS_ASSIGN_OR_RETURN(loaded.dir, args.Required("model"));
  engine::BackendOptions options;
  options.kind = args.GetString("backend", "cpu");
  PDS_ASSIGN_OR_RETURN(int64_t threads, args.GetInt("threads", 0));
  loaded.threads = static_cast<int>(threads);
  options.num_threads = loaded.threads;
  PDS_ASSIGN_OR_RETURN(loaded.backend, engine::CreateBackend(options));
  PDS_ASSIGN_OR_RETURN(loaded.model, engine::Transformer::Load(loaded.dir, *loaded.backend));
  return loaded;
}

}  // namespace pds::server

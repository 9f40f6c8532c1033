// pdserve make-model --preset NAME --out DIR [--seed N] [--dtype f32|f16|bf16] [--shard-mb N]
#include <cstdio>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "engine/common/status_macros.h"
#include "engine/model/model_writer.h"
#include "engine/model/presets.h"
#include "server/cli_args.h"
#include "server/commands.h"

namespace pds::server {
namespace {

const std::vector<FlagSpec>& Specs() {
  static const std::vector<FlagSpec> specs = {
      {"preset", false, absl::StrCat("model shape: ", absl::StrJoin(engine::PresetNames(), ", "))},
      {"out", false, "output directory"},
      {"seed", false, "random seed of the weights (default 0)"},
      {"dtype", false, "weight dtype in the files: f32 (default), f16, bf16"},
      {"shard-mb", false, "split weights into shards of at most this many MiB (default: one file)"},
      {"help", true, "show this help"},
  };
  return specs;
}

absl::Status Run(const CliArgs& args) {
  PDS_ASSIGN_OR_RETURN(std::string preset, args.Required("preset"));
  PDS_ASSIGN_OR_RETURN(std::string out, args.Required("out"));
  PDS_ASSIGN_OR_RETURN(engine::ModelConfig config, engine::PresetConfig(preset));
  engine::MakeModelOptions options;
  options.out_dir = out;
  PDS_ASSIGN_OR_RETURN(int64_t seed, args.GetInt("seed", 0));
  options.seed = static_cast<uint64_t>(seed);
  PDS_ASSIGN_OR_RETURN(options.dtype, engine::ParseDType(args.GetString("dtype", "f32")));
  PDS_ASSIGN_OR_RETURN(int64_t shard_mb, args.GetInt("shard-mb", 0));
  if (shard_mb < 0) return absl::InvalidArgumentError("--shard-mb must be >= 0");
  options.max_shard_bytes = shard_mb << 20;
  PDS_RETURN_IF_ERROR(engine::WriteRandomModel(config, options));
  std::printf("wrote %s: preset %s, %.1fM parameters, %s, vocab %lld\n", out.c_str(),
              preset.c_str(), config.num_parameters() / 1e6,
              std::string(engine::DTypeName(options.dtype)).c_str(),
              static_cast<long long>(config.vocab_size));
  return absl::OkStatus();
}

}  // namespace

int MakeModelMain(int argc, char** argv) {
  return SubcommandMain(argc, argv, "make-model", "--preset NAME --out DIR [flags]", Specs(), Run);
}

}  // namespace pds::server

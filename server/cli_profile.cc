// pdserve profile --model DIR --out FILE [--quick] [--backend cpu|cuda] [--threads N]
//                 [--cpus LIST] [--neighbor-cpus LIST]
// Times real prefill batches and decode steps, fits the latency model and writes the samples,
// coefficients, held-out fit error and machine/model metadata as JSON.
#include <atomic>
#include <chrono>
#include <cstdio>
#include <ctime>
#include <fstream>
#include <memory>
#include <thread>

#include "absl/strings/str_cat.h"
#include "engine/backend/backend.h"
#include "engine/common/status_macros.h"
#include "nlohmann/json.hpp"
#include "scheduler/latency_model.h"
#include "server/cli_args.h"
#include "server/cli_model.h"
#include "server/commands.h"
#include "server/cpu_affinity.h"
#include "server/profiler.h"

namespace pds::server {
namespace {

const std::vector<FlagSpec>& Specs() {
  static const std::vector<FlagSpec> specs = [] {
    std::vector<FlagSpec> own = {
        {"out", false, "profile JSON to write"},
        {"quick", true, "a small grid (seconds, for tests and the demo)"},
        {"block-size", false, "KV cache block size (default 16)"},
        {"reps", false, "timed repetitions per point, median kept (default 3)"},
        {"rounds", false, "passes over the grid, median round kept (default 3; 1 with --quick)"},
        {"neighbor-cpus", false,
         "profile under a neighbour: a second copy of the model pinned to these CPUs runs the "
         "other phase of a 1 prefill + 1 decode pair meanwhile (instances sharing a machine)"},
        {"help", true, "show this help"},
    };
    std::vector<FlagSpec> all = ModelFlagSpecs();
    all.insert(all.end(), own.begin(), own.end());
    return all;
  }();
  return specs;
}

std::string CpuModel() {
  std::ifstream in("/proc/cpuinfo");
  for (std::string line; std::getline(in, line);) {
    if (line.rfind("model name", 0) == 0) {
      const size_t colon = line.find(':');
      if (colon != std::string::npos) return line.substr(colon + 2);
    }
  }
  return "unknown";
}

std::string UtcNow() {
  const std::time_t now = std::time(nullptr);
  char buf[32];
  std::strftime(buf, sizeof(buf), "%Y-%m-%dT%H:%M:%SZ", std::gmtime(&now));
  return buf;
}

absl::Status Run(const CliArgs& args) {
  PDS_ASSIGN_OR_RETURN(std::string out_path, args.Required("out"));
  PDS_ASSIGN_OR_RETURN(LoadedModel loaded, LoadModelFromArgs(args));
  const std::string& model_dir = loaded.dir;
  const engine::Backend* backend = loaded.backend.get();
  engine::Transformer* model = loaded.model.get();
  const int threads = loaded.threads;
  ProfileOptions options;
  options.quick = args.GetBool("quick");
  PDS_ASSIGN_OR_RETURN(int64_t block_size, args.GetInt("block-size", 16));
  PDS_ASSIGN_OR_RETURN(int64_t reps, args.GetInt("reps", 3));
  PDS_ASSIGN_OR_RETURN(int64_t rounds, args.GetInt("rounds", options.quick ? 1 : 3));
  if (block_size <= 0 || reps <= 0 || rounds <= 0) {
    return absl::InvalidArgumentError("--block-size, --reps and --rounds must be positive");
  }
  options.block_size = static_cast<int32_t>(block_size);
  options.reps = static_cast<int32_t>(reps);
  options.rounds = static_cast<int32_t>(rounds);
  // The neighbour: its own thread, pinned to --neighbor-cpus, with its own backend and model.
  // Its state is shared (not on this stack), so a neighbour that never finishes loading can be
  // left behind when the wait for it times out.
  struct Neighbor {
    std::atomic<int> phase{kProfileIdle};
    std::atomic<bool> stop{false};
    std::atomic<int> state{0};  // 0: loading, 1: running, 2: finished (status set)
    absl::Status status;        // written before state becomes 2
  };
  auto neighbor = std::make_shared<Neighbor>();
  std::thread neighbor_thread;
  const std::string neighbor_cpus = args.GetString("neighbor-cpus");
  if (args.Has("neighbor-cpus")) {
    options.phase = &neighbor->phase;
    neighbor_thread = std::thread([neighbor, neighbor_cpus, args, block_size = options.block_size] {
      absl::Status status = PinToCpus(neighbor_cpus);
      if (status.ok()) {
        absl::StatusOr<LoadedModel> copy = LoadModelFromArgs(args, /*pin=*/false);
        if (copy.ok()) {
          neighbor->state = 1;
          status = RunNeighbor(*copy->model, NeighborLoad{.block_size = block_size},
                               neighbor->phase, neighbor->stop);
        } else {
          status = copy.status();
        }
      }
      neighbor->status = status;
      neighbor->state = 2;
    });
    // Profiling starts once the neighbour runs (or fails: then at once with its error).
    const auto limit = std::chrono::steady_clock::now() + std::chrono::minutes(10);
    while (neighbor->state.load() == 0) {
      if (std::chrono::steady_clock::now() > limit) {
        neighbor->stop = true;
        neighbor_thread.detach();
        return absl::DeadlineExceededError("the neighbour model did not load within 10 minutes");
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
  }
  auto neighbor_error = [&]() -> absl::Status {
    if (neighbor_thread.joinable()) neighbor_thread.join();
    if (neighbor->state.load() == 2 && !neighbor->status.ok()) {
      return absl::Status(neighbor->status.code(),
                          absl::StrCat("the neighbour load: ", neighbor->status.message()));
    }
    return absl::OkStatus();
  };
  if (neighbor->state.load() == 2) PDS_RETURN_IF_ERROR(neighbor_error());
  const auto start = std::chrono::steady_clock::now();
  absl::StatusOr<Profile> profiled = ProfileEngine(*model, options);
  neighbor->stop = true;
  PDS_RETURN_IF_ERROR(neighbor_error());
  PDS_ASSIGN_OR_RETURN(Profile profile, std::move(profiled));
  PDS_ASSIGN_OR_RETURN(scheduler::LatencyModel fit,
                       scheduler::LatencyModel::Fit(profile.prefill, profile.decode));
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();

  const engine::ModelConfig& c = model->config();
  nlohmann::ordered_json j;
  j["date"] = UtcNow();
  j["machine"] = {{"cpu_model", CpuModel()},
                  {"hardware_threads", std::thread::hardware_concurrency()},
                  {"backend", backend->name()},
                  {"threads", threads}};
  j["model"] = {{"dir", model_dir},
                {"architecture", c.architecture_name},
                {"num_parameters", c.num_parameters()},
                {"hidden_size", c.hidden_size},
                {"num_layers", c.num_layers},
                {"num_heads", c.num_heads},
                {"num_kv_heads", c.num_kv_heads},
                {"head_dim", c.head_dim},
                {"dtype", std::string(engine::DTypeName(backend->compute_dtype()))}};
  j["machine"]["cpus"] = args.GetString("cpus");
  j["machine"]["neighbor_cpus"] = neighbor_cpus;
  j["grid"] = {{"quick", options.quick},
               {"block_size", options.block_size},
               {"reps", options.reps},
               {"rounds", options.rounds},
               {"seconds", seconds}};
  nlohmann::ordered_json prefill = nlohmann::ordered_json::array();
  for (const auto& s : profile.prefill) {
    prefill.push_back({{"prompt_lens", s.prompt_lens},
                       {"seconds", s.seconds},
                       {"predicted", fit.PredictPrefill(s.prompt_lens)}});
  }
  nlohmann::ordered_json decode = nlohmann::ordered_json::array();
  for (const auto& s : profile.decode) {
    decode.push_back({{"batch", s.batch},
                      {"total_context", s.total_context},
                      {"seconds", s.seconds},
                      {"predicted", fit.PredictDecode(s.batch, s.total_context)}});
  }
  j["samples"] = {{"prefill", prefill}, {"decode", decode}};
  j["latency_model"] = fit.ToJson();
  std::ofstream out(out_path, std::ios::trunc);
  out << j.dump(2) << "\n";
  out.close();
  if (!out) return absl::InternalError(absl::StrCat("cannot write ", out_path));
  std::printf(
      "profiled %zu prefill batches and %zu decode steps in %.1f s -> %s\n"
      "prefill: a=%.3g s, b=%.3g s/token, c=%.3g s/token^2; held-out median error %.1f%% "
      "(max %.1f%%)\n"
      "decode:  a=%.3g s, b=%.3g s/context token, c=%.3g s/sequence, d=%.3g s/sequence beyond "
      "batch %d; held-out median error %.1f%% (max %.1f%%)\n",
      profile.prefill.size(), profile.decode.size(), seconds, out_path.c_str(),
      fit.prefill_coef()[0], fit.prefill_coef()[1], fit.prefill_coef()[2],
      100 * fit.prefill_quality().median_rel_error, 100 * fit.prefill_quality().max_rel_error,
      fit.decode_coef()[0], fit.decode_coef()[1], fit.decode_coef()[2], fit.decode_knee_coef(),
      fit.decode_knee(), 100 * fit.decode_quality().median_rel_error,
      100 * fit.decode_quality().max_rel_error);
  return absl::OkStatus();
}

}  // namespace

int ProfileMain(int argc, char** argv) {
  return SubcommandMain(argc, argv, "profile", "--model DIR --out FILE [flags]", Specs(), Run);
}

}  // namespace pds::server

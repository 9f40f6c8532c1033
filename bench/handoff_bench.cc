// bench_handoff: the KV hand-off of a prefill on the CPU backend against the prefill alone (the
// CUDA twin is bench_kv_transfer's hand-off section; the target: TTFT with the
// layer-by-layer hand-off within 5% of TTFT without any). An engine of a preset shape (random
// weights, --threads T) prefills prompts held for the hand-off, and the KV goes over the host
// TCP transport (127.0.0.1) to an in-process receiver whose sink stores each layer into a
// decode-side region on its own connection thread. Per prompt length, the modes interleaved,
// median of --iters each:
//   prefill   the prefill step alone, no transfer (the ceiling)
//   after     the step, then the transfer of the held blocks with the token
//   layered   the transfer started before the step's forward, each layer sent as it is written
// ms until the receiver confirmed every layer (and the token), and prefill / ms. Run it under
// `taskset -c 0` to share one core between compute and transfer, as a pinned worker does.
//
//   bench_handoff [--preset small] [--tokens 128,512,1024] [--iters 7] [--threads 1]
//                 [--json-out FILE]
#include <algorithm>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <map>
#include <memory>
#include <mutex>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "bench/handoff.h"
#include "engine/backend/backend.h"
#include "engine/model/presets.h"
#include "engine/model/transformer.h"
#include "engine/runtime/llm_engine.h"
#include "engine/transfer/tcp_transport.h"
#include "nlohmann/json.hpp"
#include "server/cli_args.h"

namespace pds::bench {
namespace {

// Stores every layer into a region as large as the biggest sequence (a decode worker's
// WriteLayer copies as much).
class RegionSink : public engine::KvSink {
 public:
  absl::StatusOr<int32_t> Reserve(const engine::KvTransferHeader& header) override {
    std::lock_guard<std::mutex> lock(mu_);
    layer_bytes_ = header.LayerBytes();
    region_.resize(layer_bytes_ * header.num_layers);
    return 0;
  }
  absl::Status WriteLayer(const std::string&, int32_t layer, const uint8_t* data,
                          size_t bytes) override {
    std::lock_guard<std::mutex> lock(mu_);
    if (bytes != layer_bytes_) return absl::InternalError("layer size changed");
    std::memcpy(region_.data() + layer * layer_bytes_, data, bytes);
    return absl::OkStatus();
  }
  void Complete(const std::string&, absl::Status status, int32_t next_token) override {
    std::lock_guard<std::mutex> lock(mu_);
    if (!status.ok() || next_token < 0) ++failures_;
  }
  int failures() {
    std::lock_guard<std::mutex> lock(mu_);
    return failures_;
  }

 private:
  std::mutex mu_;
  size_t layer_bytes_ = 0;
  std::vector<uint8_t> region_;
  int failures_ = 0;
};

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0 : v[v.size() / 2];
}

int Fail(const absl::Status& status) {
  std::fprintf(stderr, "bench_handoff: %s\n", status.ToString().c_str());
  return 1;
}

int Main(int argc, char** argv) {
  const std::vector<server::FlagSpec> specs = {
      {"preset", false, "model shape (default small)"},
      {"tokens", false, "prompt lengths, comma-separated (default 128,512,1024)"},
      {"iters", false, "timed runs per mode and length (default 7)"},
      {"threads", false, "CPU threads of the engine (default 1)"},
      {"json-out", false, "also write the results as JSON"},
      {"help", true, "show this help"}};
  absl::StatusOr<server::CliArgs> args = server::CliArgs::Parse(argc, argv, 1, specs);
  if (!args.ok()) return Fail(args.status());
  if (args->GetBool("help")) {
    std::printf("usage: bench_handoff [flags]\n%s", server::FlagHelp(specs).c_str());
    return 0;
  }
  std::vector<int32_t> token_counts;
  for (absl::string_view part : absl::StrSplit(args->GetString("tokens", "128,512,1024"), ',')) {
    int32_t n = 0;
    if (!absl::SimpleAtoi(part, &n) || n < 1) {
      return Fail(absl::InvalidArgumentError(absl::StrCat("--tokens: bad length '", part, "'")));
    }
    token_counts.push_back(n);
  }
  absl::StatusOr<int64_t> iters = args->GetInt("iters", 7);
  absl::StatusOr<int64_t> threads = args->GetInt("threads", 1);
  if (!iters.ok() || !threads.ok() || *iters < 1 || *threads < 1) {
    return Fail(absl::InvalidArgumentError("--iters and --threads must be positive integers"));
  }
  const std::string preset = args->GetString("preset", "small");
  absl::StatusOr<engine::ModelConfig> config = engine::PresetConfig(preset);
  if (!config.ok()) return Fail(config.status());
  absl::StatusOr<std::unique_ptr<engine::Backend>> backend =
      engine::CreateBackend({.kind = "cpu", .num_threads = static_cast<int>(*threads)});
  if (!backend.ok()) return Fail(backend.status());
  absl::StatusOr<std::unique_ptr<engine::Transformer>> model =
      engine::Transformer::CreateRandom(*config, **backend, 3);
  if (!model.ok()) return Fail(model.status());
  const int32_t max_tokens = *std::max_element(token_counts.begin(), token_counts.end());
  engine::EngineOptions eo;
  eo.block_size = 16;
  eo.num_blocks = (max_tokens + 15) / 16 + 8;
  eo.max_batch_tokens = max_tokens;
  eo.prefix_caching = false;  // every mode and iteration prefills the same prompt in full
  absl::StatusOr<std::unique_ptr<engine::LlmEngine>> eng = engine::LlmEngine::Create(**model, eo);
  if (!eng.ok()) return Fail(eng.status());
  RegionSink sink;
  absl::StatusOr<std::unique_ptr<engine::KvReceiver>> receiver =
      engine::StartTcpKvReceiver("127.0.0.1", 0, &sink);
  if (!receiver.ok()) return Fail(receiver.status());
  std::unique_ptr<engine::KvSender> sender = engine::CreateTcpKvSender();
  std::printf(
      "bench_handoff: %s (%d layers, random weights) on %s, %lld thread(s); KV %lld bytes per "
      "token over TCP 127.0.0.1\n",
      preset.c_str(), static_cast<int>(config->num_layers), (*backend)->name().c_str(),
      static_cast<long long>(*threads),
      static_cast<long long>((*eng)->cache().shape().BlockBytes((*backend)->compute_dtype()) * 2 *
                             config->num_layers / eo.block_size));

  const HandoffMode kModes[] = {HandoffMode::kPrefillOnly, HandoffMode::kAfter,
                                HandoffMode::kLayered};
  nlohmann::json rows = nlohmann::json::array();
  std::printf("\n%-8s %-8s %10s %10s %10s  %s\n", "tokens", "mode", "ms", "step ms", "prefill/ms",
              "note");
  int serial = 0;
  for (int32_t tokens : token_counts) {
    std::vector<int32_t> prompt(static_cast<size_t>(tokens));
    std::mt19937_64 rng(static_cast<uint64_t>(tokens));
    for (int32_t& t : prompt) t = static_cast<int32_t>(rng() % config->vocab_size);
    std::map<HandoffMode, std::vector<double>> ms, step_ms;
    for (int i = -1; i < *iters; ++i) {  // -1: warm-up
      for (HandoffMode mode : kModes) {
        absl::StatusOr<HandoffTiming> t =
            TimeHandoff(**eng, **backend, *sender, (*receiver)->address(),
                        absl::StrCat("h", serial++), prompt, mode);
        if (!t.ok()) return Fail(t.status());
        if (i < 0) continue;
        ms[mode].push_back(t->ms);
        step_ms[mode].push_back(t->step_ms);
      }
    }
    const double prefill = Median(ms[HandoffMode::kPrefillOnly]);
    for (HandoffMode mode : kModes) {
      const double value = Median(ms[mode]);
      const bool layered = mode == HandoffMode::kLayered;
      std::printf("%-8d %-8s %10.2f %10.2f %9.1f%%  %s\n", tokens, HandoffModeName(mode), value,
                  Median(step_ms[mode]), 100 * prefill / value,
                  layered ? (prefill / value >= 1 / 1.05 ? "within 5%" : "beyond 5%") : "");
      rows.push_back({{"tokens", tokens},
                      {"mode", HandoffModeName(mode)},
                      {"ms", value},
                      {"step_ms", Median(step_ms[mode])},
                      {"prefill_over_ms", prefill / value},
                      {"ms_all", ms[mode]}});
    }
  }
  (*receiver)->Shutdown();
  if (sink.failures() > 0) {
    return Fail(absl::InternalError(absl::StrCat(sink.failures(), " transfers failed")));
  }
  if (args->Has("json-out")) {
    nlohmann::json j = {
        {"tool", "bench_handoff"}, {"preset", preset}, {"backend", (*backend)->name()},
        {"threads", *threads},     {"iters", *iters},  {"rows", rows}};
    std::ofstream f(args->GetString("json-out"));
    f << j.dump(2) << "\n";
    if (!f) return Fail(absl::InternalError("cannot write the JSON file"));
  }
  return 0;
}

}  // namespace
}  // namespace pds::bench

int main(int argc, char** argv) { return pds::bench::Main(argc, argv); }

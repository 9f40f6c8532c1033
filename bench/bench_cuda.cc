// bench_cuda: the CUDA backend on a real model shape (llama3-8b by default, bf16, random
// weights), every number against a hardware ceiling measured in the same run:
//
//   ceilings   device-to-device copy bandwidth (cudaMemcpyAsync, bytes read + written, best
//              of N) and the cuBLAS bf16 GEMM rate (cublasGemmEx, fp32 accumulation, best of N)
//   decode     one Transformer::Forward step, one new token per sequence at context C, batch 1
//              and 64, once with fp32 logits copied to the host and once greedy (argmax on the
//              device, no logits copy); floor = (weight bytes read + KV bytes read) / copy
//              bandwidth
//   verify     a speculative decoding step at the same batches: 1 + 4 rows per sequence (the
//              last token and 4 drafts) and a greedy draw at every row on the device; floor as
//              decode's, and its time against the decode step's
//   prefill    2048 tokens (batch 1) and 8 x 512; FLOPs = matmul FLOPs + attention FLOPs over
//              the causal pairs; fraction of the GEMM rate
//   attention  the backend's Attention alone on layer 0's cache: decode batch 64 at context C
//              (KV bytes over the copy bandwidth) and a 4096-token causal prefill (FLOPs over
//              the GEMM rate)
//   gemv       each weight matrix of a decode step (qkv, o, gate_up, down, lm_head with fp32
//              output) at m = 1 and 8 activation rows: the GEMV kernel (kernels/cuda/gemv.cu)
//              and cuBLAS (the backend's cublasGemmEx) side by side, back-to-back calls replayed
//              from a CUDA graph, each call on another copy of the weight (never found in L2),
//              best of N; bytes read + written over the copy bandwidth. Then the linear layers
//              of a whole decode step from those times (layers x 4 matrices + lm_head)
//
// The copy bandwidth counts bytes read plus bytes written, and is used as the read bandwidth
// of the floors (a kernel that only reads streams at about that rate on HBM).
//
//   bench_cuda [--preset NAME] [--quick] [--json-out FILE] [--device N] [--iters N]
//              [--timeout-s S] [--gemv-only]
//
// Exits 1 with a message naming the stage on any CUDA, cuBLAS or backend error, 2 on bad
// flags or no usable GPU, 3 when the watchdog (--timeout-s, default 600) fires; never hangs.
#include <cublas_v2.h>
#include <cuda_runtime_api.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <random>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "bench/gpu_check.h"
#include "bench/report.h"
#include "engine/backend/backend.h"
#include "engine/backend/cuda_backend.h"
#include "engine/common/dtype.h"
#include "engine/kv_cache/block_allocator.h"
#include "engine/kv_cache/kv_cache.h"
#include "engine/model/presets.h"
#include "engine/model/transformer.h"
#include "kernels/cuda/ops.h"
#include "kernels/sampling.h"
#include "nlohmann/json.hpp"
#include "server/cli_args.h"

namespace pds::bench {
namespace {

using engine::Backend;
using engine::BatchMetadata;
using engine::BlockTable;
using engine::DeviceBuffer;
using engine::KvCache;
using engine::ModelConfig;
using engine::SequenceInput;
using engine::Transformer;
using engine::Weight;

void CheckCublas(cublasStatus_t st, const char* expr) {
  if (st != CUBLAS_STATUS_SUCCESS) {
    Fail(absl::StrCat("cuBLAS error ", cublasGetStatusName(st), " (", cublasGetStatusString(st),
                      ") from ", expr));
  }
}

#define CUBLAS_CHECK(expr) CheckCublas((expr), #expr)

struct Options {
  std::string preset = "llama3-8b";
  bool quick = false;
  std::string json_out;
  int device = 0;
  int iters = 0;  // 0: the mode's default
  double timeout_s = 600;
  bool gemv_only = false;     // the ceilings and the GEMV rows only (no model)
  bool kernels_only = false;  // the GEMV and attention rows only (no whole-step rows)
  // Development only: the same measurements on the CPU backend at toy shapes, the ceilings
  // through the backend (CopyDevice, Gemm) instead of CUDA; checks the bookkeeping without a GPU.
  bool cpu_smoke = false;
};

// The shapes and iteration counts of one run.
struct Plan {
  size_t copy_bytes = size_t{1} << 30;
  int gemm_n = 8192;
  int ceiling_iters = 10;
  int iters = 20;
  int warmup = 3;
  int context = 1024;
  std::vector<int> decode_batches = {1, 64};
  int prefill_tokens = 2048;
  int prefill_seqs = 8;
  int prefill_seq_len = 512;
  int attn_decode_batch = 64;
  int attn_prefill_tokens = 4096;
};

Plan MakePlan(const Options& o) {
  Plan p;
  if (o.quick) {
    p.copy_bytes = size_t{256} << 20;
    p.gemm_n = 4096;
    p.ceiling_iters = 3;
    p.iters = 3;
    p.warmup = 1;
    p.context = 256;
    p.decode_batches = {1, 8};
    p.prefill_tokens = 512;
    p.prefill_seqs = 4;
    p.prefill_seq_len = 128;
    p.attn_decode_batch = 8;
    p.attn_prefill_tokens = 1024;
  }
  if (o.cpu_smoke) {
    p.copy_bytes = size_t{16} << 20;
    p.gemm_n = 256;
    p.ceiling_iters = 2;
    p.iters = 2;
    p.warmup = 1;
    p.context = 64;
    p.decode_batches = {1, 4};
    p.prefill_tokens = 64;
    p.prefill_seqs = 2;
    p.prefill_seq_len = 32;
    p.attn_decode_batch = 4;
    p.attn_prefill_tokens = 128;
  }
  if (o.iters > 0) p.iters = o.iters;
  return p;
}

void Usage() {
  std::fprintf(stderr,
               "usage: bench_cuda [--preset NAME] [--quick] [--json-out FILE] [--device N]\n"
               "                  [--iters N] [--timeout-s S] [--gemv-only] [--kernels-only]\n"
               "  --preset     model shape (default llama3-8b; see pdserve make-model --help)\n"
               "  --quick      fewer iterations and smaller shapes (a smoke run)\n"
               "  --json-out   also write the results as JSON to FILE\n"
               "  --device     CUDA device ordinal (default 0)\n"
               "  --iters      timed iterations of each model measurement\n"
               "  --timeout-s  exit 3 if the run takes longer (default 600; 0: never)\n"
               "  --gemv-only  only the ceilings and the GEMV rows (no model is built)\n"
               "  --kernels-only  the GEMV and attention rows, no decode/prefill steps (for a\n"
               "               kernel profiler such as ncu)\n"
               "  --cpu-smoke  development: the same steps on the CPU backend at toy shapes\n"
               "               (preset tiny unless given; the numbers mean nothing)\n");
}

std::optional<Options> ParseArgs(int argc, char** argv) {
  const std::vector<server::FlagSpec> specs = {
      {"preset"},          {"quick", true},     {"json-out"},
      {"device"},          {"iters"},           {"timeout-s"},
      {"cpu-smoke", true}, {"gemv-only", true}, {"kernels-only", true},
      {"help", true}};
  const absl::StatusOr<server::CliArgs> args = server::CliArgs::Parse(argc, argv, 1, specs);
  if (!args.ok()) {
    std::fprintf(stderr, "bench_cuda: %s\n", std::string(args.status().message()).c_str());
    return std::nullopt;
  }
  if (args->Has("help")) {
    Usage();
    std::exit(0);
  }
  Options o;
  o.preset = args->GetString("preset", o.preset);
  o.json_out = args->GetString("json-out");
  o.quick = args->GetBool("quick");
  o.cpu_smoke = args->GetBool("cpu-smoke");
  o.gemv_only = args->GetBool("gemv-only");
  o.kernels_only = args->GetBool("kernels-only");
  const absl::StatusOr<int64_t> device = args->GetInt("device", o.device);
  const absl::StatusOr<int64_t> iters = args->GetInt("iters", o.iters);
  const absl::StatusOr<double> timeout = args->GetDouble("timeout-s", o.timeout_s);
  if (!device.ok() || *device < 0 || !iters.ok() || (args->Has("iters") && *iters <= 0) ||
      !timeout.ok() || *timeout < 0) {
    std::fprintf(stderr, "bench_cuda: bad value for --device, --iters or --timeout-s\n");
    return std::nullopt;
  }
  o.device = static_cast<int>(*device);
  o.iters = static_cast<int>(*iters);
  o.timeout_s = *timeout;
  return o;
}

// ---------------------------------------------------------------------------------------------
// Ceilings.

struct Ceilings {
  double copy_bytes_per_s = 0;  // bytes read + bytes written
  double copy_bytes = 0;
  double gemm_flops_per_s = 0;
  int gemm_n = 0;
};

// A non-blocking stream with a cuBLAS handle and a 32 MiB workspace bound to it, destroyed
// together.
struct CublasStream {
  explicit CublasStream(Backend& backend)
      : workspace(PDS_TAKE(backend.Allocate(size_t{32} << 20, "cublas workspace"))) {
    CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    CUBLAS_CHECK(cublasCreate(&handle));
    CUBLAS_CHECK(cublasSetStream(handle, stream));
    CUBLAS_CHECK(cublasSetWorkspace(handle, workspace.data(), workspace.bytes()));
  }
  ~CublasStream() {
    cublasDestroy(handle);
    cudaStreamDestroy(stream);
  }
  CublasStream(const CublasStream&) = delete;
  CublasStream& operator=(const CublasStream&) = delete;
  DeviceBuffer workspace;
  cudaStream_t stream = nullptr;
  cublasHandle_t handle = nullptr;
};

// The best GPU time in seconds of `samples` runs of enqueue() on `stream`, each between two
// events, after `warmups` untimed runs.
double BestEventSeconds(cudaStream_t stream, int warmups, int samples,
                        const std::function<void()>& enqueue) {
  const std::vector<double> ms = EventTimesMs(stream, warmups, samples, enqueue);
  return ms.empty() ? 1e27 : *std::min_element(ms.begin(), ms.end()) * 1e-3;
}

double MeasureCopyBandwidth(Backend& backend, size_t bytes, int iters) {
  SetStage("ceiling: device-to-device copy");
  DeviceBuffer src = PDS_TAKE(backend.Allocate(bytes, "copy src"));
  DeviceBuffer dst = PDS_TAKE(backend.Allocate(bytes, "copy dst"));
  const size_t esize = engine::DTypeSize(backend.compute_dtype());
  PDS_CHECK_OK(backend.FillRandom(src.data(), bytes / esize, 1.0f, 0.0f, 17));
  PDS_CHECK_OK(backend.FillRandom(dst.data(), bytes / esize, 1.0f, 0.0f, 18));
  PDS_CHECK_OK(backend.Synchronize());
  if (backend.name().find("cuda") == std::string::npos) {  // --cpu-smoke
    double best = 1e30;
    for (int i = -1; i < iters; ++i) {
      const auto t0 = std::chrono::steady_clock::now();
      PDS_CHECK_OK(backend.CopyDevice(dst.data(), src.data(), bytes));
      if (i >= 0) best = std::min(best, Seconds(t0));
    }
    return 2.0 * static_cast<double>(bytes) / best;
  }
  cudaStream_t stream;
  CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  const double best = BestEventSeconds(stream, 1, iters, [&] {
    CUDA_CHECK(cudaMemcpyAsync(dst.data(), src.data(), bytes, cudaMemcpyDeviceToDevice, stream));
  });
  CUDA_CHECK(cudaStreamDestroy(stream));
  return 2.0 * static_cast<double>(bytes) / best;
}

double MeasureGemmRate(Backend& backend, int n, int iters) {
  SetStage("ceiling: cuBLAS bf16 GEMM");
  const size_t elems = static_cast<size_t>(n) * n;
  const size_t bytes = elems * engine::DTypeSize(backend.compute_dtype());
  DeviceBuffer a = PDS_TAKE(backend.Allocate(bytes, "gemm A"));
  DeviceBuffer b = PDS_TAKE(backend.Allocate(bytes, "gemm B"));
  DeviceBuffer c = PDS_TAKE(backend.Allocate(bytes, "gemm C"));
  // The backend's compute dtype is bf16 here (checked in main), so these are bf16 values.
  PDS_CHECK_OK(backend.FillRandom(a.data(), elems, 1.0f, 0.0f, 21));
  PDS_CHECK_OK(backend.FillRandom(b.data(), elems, 1.0f, 0.0f, 22));
  PDS_CHECK_OK(backend.FillRandom(c.data(), elems, 1.0f, 0.0f, 23));
  PDS_CHECK_OK(backend.Synchronize());
  if (backend.name().find("cuda") == std::string::npos) {  // --cpu-smoke: through the backend
    Weight w;
    w.rows = w.cols = n;
    w.buffer = std::move(b);
    double best = 1e30;
    for (int i = -1; i < iters; ++i) {
      const auto t0 = std::chrono::steady_clock::now();
      PDS_CHECK_OK(backend.Gemm(a.data(), n, w, c.data(), n));
      if (i >= 0) best = std::min(best, Seconds(t0));
    }
    return 2.0 * n * static_cast<double>(n) * n / best;
  }
  const CublasStream blas(backend);
  cudaStream_t stream = blas.stream;
  cublasHandle_t handle = blas.handle;
  const float alpha = 1.0f, beta = 0.0f;
  // Two warm-up runs (heuristics, clocks).
  const double best = BestEventSeconds(stream, 2, iters, [&] {
    CUBLAS_CHECK(cublasGemmEx(handle, CUBLAS_OP_T, CUBLAS_OP_N, n, n, n, &alpha, a.data(),
                              CUDA_R_16BF, n, b.data(), CUDA_R_16BF, n, &beta, c.data(),
                              CUDA_R_16BF, n, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
  });
  return 2.0 * n * static_cast<double>(n) * n / best;
}

// ---------------------------------------------------------------------------------------------
// Model measurements.

std::vector<int32_t> RandomTokens(int n, int64_t vocab, std::mt19937_64& rng) {
  std::vector<int32_t> t(n);
  for (auto& x : t) x = static_cast<int32_t>(rng() % static_cast<uint64_t>(vocab));
  return t;
}

// Fails on any non-finite logit: random weights must still give finite numbers.
void CheckFinite(const std::vector<float>& v, const std::string& what) {
  const auto bad = std::count_if(v.begin(), v.end(), [](float x) { return !std::isfinite(x); });
  if (bad > 0) Fail(absl::StrCat(bad, " of ", v.size(), " logits are not finite after ", what));
}

// Wall time of each of `iters` calls of `step` (each followed by Synchronize), after warm-up.
template <typename F>
std::vector<double> TimeSteps(Backend& backend, int warmup, int iters, F&& step) {
  for (int i = 0; i < warmup; ++i) {
    step();
    PDS_CHECK_OK(backend.Synchronize());
  }
  std::vector<double> times;
  for (int i = 0; i < iters; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    step();
    PDS_CHECK_OK(backend.Synchronize());
    times.push_back(Seconds(t0));
  }
  return times;
}

struct Bench {
  Backend& backend;
  Transformer& model;
  KvCache& cache;
  const Plan& plan;
  const Ceilings& ceil;
  std::mt19937_64 rng{7};

  const ModelConfig& config() const { return model.config(); }
  size_t esize() const { return engine::DTypeSize(backend.compute_dtype()); }
  // K and V bytes of one token over all layers.
  double KvBytesPerToken() const {
    return 2.0 * config().num_layers * config().kv_size() * static_cast<double>(esize());
  }
  // Weight bytes one decode step reads: all but the embedding table (only `batch` rows of it).
  double DecodeWeightBytes(int batch) const {
    const ModelConfig& c = config();
    const double table = static_cast<double>(c.vocab_size) * c.hidden_size * esize();
    double bytes = static_cast<double>(model.weight_bytes());
    if (!c.tie_word_embeddings) bytes -= table;  // when tied, lm_head reads it all anyway
    return bytes + static_cast<double>(batch) * c.hidden_size * esize();
  }
  // Matmul FLOPs of a forward over `tokens` new tokens in `seqs` sequences (lm_head on the last
  // row of each sequence only, as the engine does; the embedding is a lookup).
  double LinearFlops(int64_t tokens, int64_t seqs) const {
    const ModelConfig& c = config();
    const double head = static_cast<double>(c.vocab_size) * c.hidden_size;
    double per_token = static_cast<double>(c.num_parameters()) - head;  // minus the embedding
    if (!c.tie_word_embeddings) per_token -= head;                      // lm_head counted below
    return 2.0 * per_token * tokens + 2.0 * head * seqs;
  }
  // QK^T and PV FLOPs over `pairs` (query, key) pairs in one layer.
  double AttentionFlopsPerLayer(double pairs) const {
    return 4.0 * config().num_heads * config().head_dim * pairs;
  }

  // Reserves `tokens` positions for each sequence (tables released by the caller).
  std::vector<BlockTable> Reserve(const std::vector<int>& lens) {
    std::vector<BlockTable> tables(lens.size());
    for (size_t s = 0; s < lens.size(); ++s) {
      PDS_CHECK_OK(tables[s].Reserve(lens[s], cache.block_size(), cache.allocator()));
    }
    return tables;
  }
  void Release(std::vector<BlockTable>& tables) {
    for (auto& t : tables) PDS_CHECK_OK(t.Release(cache.allocator()));
  }

  // `measure` run with the kernel setting `env`=`value` (kernels::cuda::KernelSettings, graphs
  // recorded again before and after), its metric named with " <label>" appended.
  template <typename F>
  Metric WithKnob(const char* env, const char* value, const char* label, F&& measure) {
    auto* cuda = dynamic_cast<engine::CudaBackend*>(&backend);
    const char* was = std::getenv(env);
    const std::string saved = was != nullptr ? was : "";
    setenv(env, value, 1);
    kernels::cuda::ReloadKernelSettings();
    if (cuda != nullptr) cuda->DropGraphs();
    Metric m = measure();
    if (was != nullptr) {
      setenv(env, saved.c_str(), 1);
    } else {
      unsetenv(env);
    }
    kernels::cuda::ReloadKernelSettings();
    if (cuda != nullptr) cuda->DropGraphs();
    m.name = absl::StrCat(m.name, " ", label);
    m.extra["knob"] = absl::StrCat(env, "=", value);
    return m;
  }

  // One decode step per sequence at context `plan.context`: the full step (fp32 logits of every
  // sequence copied to the host) and, with `greedy`, the step that copies only each
  // sequence's argmax token (Forward with greedy sampling rows and no host rows: the logits
  // stay on the device).
  // `pdl`: kernels launched with programmatic dependent launch (the default); off, for
  // comparison, every graph is recorded again without it.
  Metric Decode(int batch, bool greedy, bool eager = false, bool pdl = true) {
    const int ctx = plan.context;
    SetStage(greedy ? "decode (greedy)" : "decode");
    // `eager`: every op launched one by one instead of replaying the step's CUDA graph.
    auto* cuda = dynamic_cast<engine::CudaBackend*>(&backend);
    if (cuda != nullptr) cuda->SetGraphsEnabled(!eager);
    const bool pdl_was = cuda != nullptr && kernels::cuda::ProgrammaticLaunch();
    if (cuda != nullptr && !pdl) {
      kernels::cuda::SetProgrammaticLaunch(false);
      cuda->DropGraphs();
    }
    std::vector<BlockTable> tables = Reserve(std::vector<int>(batch, ctx));
    std::vector<std::vector<int32_t>> next(batch);
    std::vector<SequenceInput> inputs(batch);
    for (int s = 0; s < batch; ++s) {
      next[s] = RandomTokens(1, config().vocab_size, rng);
      inputs[s] = {next[s], ctx - 1, &tables[s]};
    }
    std::vector<float> logits;
    const std::vector<kernels::RowSampling> sampling(batch);  // temperature 0: greedy
    const std::vector<uint8_t> host_rows(batch, 0);
    std::vector<int32_t> tokens;
    const std::vector<double> times = TimeSteps(backend, plan.warmup, plan.iters, [&] {
      if (greedy) {
        PDS_CHECK_OK(model.Forward(inputs, cache, logits, sampling, host_rows, tokens));
      } else {
        PDS_CHECK_OK(model.Forward(inputs, cache, logits));
      }
    });
    if (greedy) {
      if (tokens.size() != static_cast<size_t>(batch)) Fail("greedy decode returned no tokens");
      for (int32_t t : tokens) {
        if (t < 0 || t >= config().vocab_size)
          Fail(absl::StrCat("greedy token ", t, " out of range"));
      }
    } else {
      CheckFinite(logits, absl::StrCat("decode batch ", batch));
    }
    Json breakdown;
    if (eager && cuda != nullptr) {
      breakdown = OpBreakdown(*cuda, [&] {
        PDS_CHECK_OK(model.Forward(inputs, cache, logits, sampling, host_rows, tokens));
      });
    }
    std::vector<double> times_ms;
    for (double t : times) times_ms.push_back(t * 1e3);
    Release(tables);
    if (cuda != nullptr) cuda->SetGraphsEnabled(true);
    if (cuda != nullptr && !pdl) {
      kernels::cuda::SetProgrammaticLaunch(pdl_was);
      cuda->DropGraphs();
    }
    const double step = Median(times);
    const double weight_bytes = DecodeWeightBytes(batch);
    const double kv_bytes = KvBytesPerToken() * batch * ctx;
    const double floor_s = (weight_bytes + kv_bytes) / ceil.copy_bytes_per_s;
    Metric m;
    m.name = absl::StrCat("decode b", batch, greedy ? " greedy" : "", eager ? " eager" : "",
                          pdl ? "" : " no-pdl");
    m.shape = absl::StrCat(
        "batch ", batch, ", context ", ctx,
        greedy ? ", argmax on the device (no logits copy)" : ", fp32 logits to the host",
        eager ? ", ops launched one by one" : ", replayed from a CUDA graph");
    m.value = step * 1e3;
    m.unit = "ms";
    m.ceiling = floor_s * 1e3;
    m.ceiling_unit = "ms floor";
    m.fraction = floor_s / step;
    m.target = batch == 1 ? 0.85 : 0.75;
    m.note = absl::StrFormat("%.0f tok/s", batch / step);
    m.extra = {{"batch", batch},
               {"context", ctx},
               {"logits_copied", !greedy},
               {"cuda_graph", !eager},
               {"step_ms_median", step * 1e3},
               {"step_ms_min", *std::min_element(times.begin(), times.end()) * 1e3},
               {"step_ms_all", times_ms},
               {"tokens_per_s", batch / step},
               {"weight_bytes_read", weight_bytes},
               {"kv_bytes_read", kv_bytes},
               {"floor_ms", floor_s * 1e3}};
    if (eager && cuda != nullptr) m.extra["op_breakdown_ms_per_step"] = breakdown;
    return m;
  }

  // A speculative decoding step: each of `batch` sequences at context `plan.context` computes
  // its last token and `drafts` draft tokens (1 + drafts rows, prefill attention over the
  // cached prefix, no graph), then a token is drawn greedily on the device at every row as
  // the engine draws them: the draft rows with the last rows in one pass over the lm_head
  // (Forward's extra rows) where EngineOptions::max_logits_per_call's default allows, else
  // after the forward (SampleRows, slices of that many rows). Floor: the decode floor
  // with the extra rows' KV; the note gives the step's cost against the plain decode step's
  // (`decode_ms`), which a draft acceptance must beat.
  Metric Verify(int batch, int drafts, double decode_ms) {
    const int ctx = plan.context;
    SetStage("speculative verify");
    const int rows = 1 + drafts;
    std::vector<BlockTable> tables = Reserve(std::vector<int>(batch, ctx + drafts));
    std::vector<std::vector<int32_t>> next(batch);
    std::vector<SequenceInput> inputs(batch);
    std::vector<int64_t> draft_rows;
    for (int s = 0; s < batch; ++s) {
      next[s] = RandomTokens(rows, config().vocab_size, rng);
      inputs[s] = {next[s], ctx - 1, &tables[s]};
      for (int j = 0; j < drafts; ++j) draft_rows.push_back(static_cast<int64_t>(s) * rows + j);
    }
    std::vector<float> logits, scratch;
    const std::vector<kernels::RowSampling> sampling(batch);
    const std::vector<uint8_t> host_rows(batch, 0);
    std::vector<int32_t> tokens, part;
    // EngineOptions::max_logits_per_call's default (16M logits) in rows.
    const size_t per_call =
        static_cast<size_t>(std::max<int64_t>(1, (int64_t{1} << 24) / config().vocab_size));
    const bool together = batch + draft_rows.size() <= per_call;
    const std::vector<double> times = TimeSteps(backend, plan.warmup, plan.iters, [&] {
      if (together) {
        PDS_CHECK_OK(model.Forward(inputs, cache, logits, sampling, host_rows, tokens, nullptr,
                                   draft_rows,
                                   std::vector<kernels::RowSampling>(draft_rows.size())));
        return;
      }
      PDS_CHECK_OK(model.Forward(inputs, cache, logits, sampling, host_rows, tokens));
      for (size_t at = 0; at < draft_rows.size(); at += per_call) {
        const size_t n = std::min(per_call, draft_rows.size() - at);
        PDS_CHECK_OK(model.SampleRows(std::span<const int64_t>(draft_rows).subspan(at, n),
                                      std::vector<kernels::RowSampling>(n), scratch, part));
        tokens.insert(tokens.end(), part.begin(), part.end());
      }
    });
    for (int32_t t : tokens) {
      if (t < 0 || t >= config().vocab_size) Fail(absl::StrCat("draft token ", t, " out of range"));
    }
    Release(tables);
    const double step = Median(times);
    const double weight_bytes = DecodeWeightBytes(batch * rows);
    const double kv_bytes = KvBytesPerToken() * batch * (ctx + drafts);
    const double floor_s = (weight_bytes + kv_bytes) / ceil.copy_bytes_per_s;
    Metric m;
    m.name = absl::StrCat("verify b", batch, " k", drafts);
    m.shape = absl::StrCat("batch ", batch, ", context ", ctx, ", ", rows,
                           " rows per sequence, greedy draws on the device");
    m.value = step * 1e3;
    m.unit = "ms";
    m.ceiling = floor_s * 1e3;
    m.ceiling_unit = "ms floor";
    m.fraction = floor_s / step;
    m.note = absl::StrFormat("%.2fx the decode step", decode_ms > 0 ? step * 1e3 / decode_ms : 0);
    m.extra = {{"batch", batch},
               {"context", ctx},
               {"drafts", drafts},
               {"step_ms_median", step * 1e3},
               {"decode_step_ms", decode_ms},
               {"floor_ms", floor_s * 1e3}};
    return m;
  }

  // GPU time per op name over a few eager steps (CUDA events around each op), per step;
  // printed and returned as JSON.
  template <typename Step>
  Json OpBreakdown(engine::CudaBackend& cuda, Step step) {
    constexpr int kSteps = 5;
    cuda.SetGraphsEnabled(false);
    cuda.SetOpProfiling(true);
    for (int i = 0; i < kSteps; ++i) step();
    const auto ops = cuda.TakeOpProfile();
    cuda.SetOpProfiling(false);
    cuda.SetGraphsEnabled(true);
    double total = 0;
    for (const auto& op : ops) total += op.ms;
    Json out = Json::object();
    std::printf("    op breakdown (GPU time per step, eager; sum %.3f ms):\n", total / kSteps);
    for (const auto& op : ops) {
      std::printf("      %-28s %8.3f ms %5.1f%%  (%lld calls)\n", op.name.c_str(), op.ms / kSteps,
                  100.0 * op.ms / total, static_cast<long long>(op.calls / kSteps));
      out[op.name] = op.ms / kSteps;
    }
    return out;
  }

  Metric Prefill(const std::vector<int>& lens) {
    SetStage("prefill");
    std::vector<BlockTable> tables = Reserve(lens);
    std::vector<std::vector<int32_t>> prompts;
    std::vector<SequenceInput> inputs;
    int64_t tokens = 0;
    double pairs = 0;
    for (size_t s = 0; s < lens.size(); ++s) {
      prompts.push_back(RandomTokens(lens[s], config().vocab_size, rng));
      tokens += lens[s];
      pairs += 0.5 * lens[s] * (lens[s] + 1.0);
    }
    for (size_t s = 0; s < lens.size(); ++s) inputs.push_back({prompts[s], 0, &tables[s]});
    std::vector<float> logits;
    const std::vector<double> times =
        TimeSteps(backend, std::max(1, plan.warmup - 1), std::max(3, plan.iters / 2),
                  [&] { PDS_CHECK_OK(model.Forward(inputs, cache, logits)); });
    CheckFinite(logits, "prefill");
    Release(tables);
    const double t = Median(times);
    const double linear = LinearFlops(tokens, lens.size());
    const double attention = config().num_layers * AttentionFlopsPerLayer(pairs);
    const double flops = linear + attention;
    Metric m;
    m.name = lens.size() == 1 ? absl::StrCat("prefill ", lens[0])
                              : absl::StrCat("prefill ", lens.size(), "x", lens[0]);
    m.shape = absl::StrCat(lens.size(), " seq(s), ", tokens, " tokens");
    m.value = flops / t / 1e12;
    m.unit = "TFLOP/s";
    m.ceiling = ceil.gemm_flops_per_s / 1e12;
    m.ceiling_unit = "TFLOP/s gemm";
    m.fraction = flops / t / ceil.gemm_flops_per_s;
    m.target = 0.80;
    m.note = absl::StrFormat("%.2f ms, %.0f tok/s", t * 1e3, tokens / t);
    m.extra = {
        {"seqs", lens.size()},    {"tokens", tokens},
        {"ms_median", t * 1e3},   {"tokens_per_s", tokens / t},
        {"linear_flops", linear}, {"attention_flops", attention},
        {"flops", flops},         {"ms_min", *std::min_element(times.begin(), times.end()) * 1e3}};
    return m;
  }

  // Backend::Attention alone on layer 0's cache; `q_len` new query rows per sequence ending
  // at `kv_len`.
  double TimeAttention(int batch, int q_len, int kv_len) {
    const ModelConfig& c = config();
    std::vector<BlockTable> tables = Reserve(std::vector<int>(batch, kv_len));
    BatchMetadata meta;
    meta.block_size = cache.block_size();
    meta.cu_q.push_back(0);
    for (int s = 0; s < batch; ++s) {
      for (int i = 0; i < q_len; ++i) {
        const int pos = kv_len - q_len + i;
        meta.token_ids.push_back(static_cast<int32_t>(rng() % c.vocab_size));
        meta.positions.push_back(pos);
        meta.slots.push_back(tables[s].Slot(pos, meta.block_size));
      }
      meta.cu_q.push_back(static_cast<int32_t>(meta.token_ids.size()));
      meta.kv_lens.push_back(kv_len);
      meta.last_rows.push_back(meta.cu_q.back() - 1);
      meta.max_blocks = std::max<int32_t>(meta.max_blocks, tables[s].blocks().size());
    }
    meta.block_tables.assign(static_cast<size_t>(batch) * meta.max_blocks, 0);
    for (int s = 0; s < batch; ++s) {
      std::copy(tables[s].blocks().begin(), tables[s].blocks().end(),
                meta.block_tables.begin() + static_cast<size_t>(s) * meta.max_blocks);
    }
    const int64_t rows = meta.num_tokens();
    DeviceBuffer q = PDS_TAKE(backend.Allocate(rows * c.q_size() * esize(), "bench q"));
    DeviceBuffer out = PDS_TAKE(backend.Allocate(rows * c.q_size() * esize(), "bench attn out"));
    PDS_CHECK_OK(backend.FillRandom(q.data(), rows * c.q_size(), 1.0f, 0.0f, 41));
    PDS_CHECK_OK(backend.FillRandom(out.data(), rows * c.q_size(), 1.0f, 0.0f, 42));
    PDS_CHECK_OK(backend.BeginBatch(meta));
    const float scale = 1.0f / std::sqrt(static_cast<float>(c.head_dim));
    auto launch = [&] {
      PDS_CHECK_OK(backend.Attention(q.data(), c.q_size(), cache.k(0), cache.v(0), out.data(),
                                     c.num_heads, c.num_kv_heads, c.head_dim, scale));
    };
    // Back-to-back launches timed together (a kernel of tens of microseconds), median of 5.
    const int per_sample = std::max(5, plan.iters);
    for (int i = 0; i < plan.warmup; ++i) launch();
    PDS_CHECK_OK(backend.Synchronize());
    std::vector<double> samples;
    for (int r = 0; r < 5; ++r) {
      const auto t0 = std::chrono::steady_clock::now();
      for (int i = 0; i < per_sample; ++i) launch();
      PDS_CHECK_OK(backend.Synchronize());
      samples.push_back(Seconds(t0) / per_sample);
    }
    std::vector<float> check(std::min<int64_t>(rows * c.q_size(), 1 << 20));
    if (backend.compute_dtype() == engine::DType::kBF16) {
      std::vector<uint16_t> raw(check.size());
      PDS_CHECK_OK(backend.CopyToHost(raw.data(), out.data(), raw.size() * 2));
      for (size_t i = 0; i < raw.size(); ++i) check[i] = engine::Bf16ToFloat(raw[i]);
      CheckFinite(check, "attention");
    } else if (backend.compute_dtype() == engine::DType::kF32) {
      PDS_CHECK_OK(backend.CopyToHost(check.data(), out.data(), check.size() * 4));
      CheckFinite(check, "attention");
    }
    Release(tables);
    return Median(samples);
  }

  // `legacy`: the register-loading decode kernel (PDS_ATTN_DECODE=legacy) instead of the
  // pipelined one, for comparison in the same run.
  Metric AttentionDecode(bool legacy = false) {
    SetStage("attention decode");
    const int batch = plan.attn_decode_batch, ctx = plan.context;
    if (legacy) setenv("PDS_ATTN_DECODE", "legacy", 1);
    kernels::cuda::ReloadKernelSettings();
    const double t = TimeAttention(batch, 1, ctx);
    if (legacy) unsetenv("PDS_ATTN_DECODE");
    kernels::cuda::ReloadKernelSettings();
    const double bytes = config().kv_size() * 2.0 * esize() * batch * ctx;  // one layer's K+V
    Metric m;
    m.name = absl::StrCat("attn decode b", batch, legacy ? " legacy" : "");
    m.shape = absl::StrCat("batch ", batch, ", context ", ctx, ", layer 0");
    m.value = bytes / t / 1e12;
    m.unit = "TB/s";
    m.ceiling = ceil.copy_bytes_per_s / 1e12;
    m.ceiling_unit = "TB/s copy";
    m.fraction = bytes / t / ceil.copy_bytes_per_s;
    m.target = legacy ? 0.0 : 0.80;
    m.note = absl::StrFormat("%.1f us per call", t * 1e6);
    m.extra = {{"us", t * 1e6}, {"kv_bytes_read", bytes}, {"batch", batch}, {"context", ctx}};
    return m;
  }

  // `warps`: the mma kernel's query tile through PDS_ATTN_PREFILL_WARPS (4: 4 warps of 16 rows;
  // 8: 8 warps of 16 rows); 0: its default (4 warps of 32 rows, a 128-row tile).
  Metric AttentionPrefill(int warps = 0) {
    SetStage("attention prefill");
    const int n = plan.attn_prefill_tokens;
    if (warps != 0) setenv("PDS_ATTN_PREFILL_WARPS", std::to_string(warps).c_str(), 1);
    kernels::cuda::ReloadKernelSettings();
    const double t = TimeAttention(1, n, n);
    unsetenv("PDS_ATTN_PREFILL_WARPS");
    kernels::cuda::ReloadKernelSettings();
    const double flops = AttentionFlopsPerLayer(0.5 * n * (n + 1.0));
    Metric m;
    m.name = absl::StrCat("attn prefill ", n, warps == 0 ? "" : absl::StrCat(" w", warps));
    m.shape =
        absl::StrCat(n, " tokens causal, layer 0, ",
                     warps == 0 ? "4 warps x 32 rows" : absl::StrCat(warps, " warps x 16 rows"),
                     " per query tile");
    m.value = flops / t / 1e12;
    m.unit = "TFLOP/s";
    m.ceiling = ceil.gemm_flops_per_s / 1e12;
    m.ceiling_unit = "TFLOP/s gemm";
    m.fraction = flops / t / ceil.gemm_flops_per_s;
    m.target = 0.50;
    m.note = absl::StrFormat("%.1f us per call", t * 1e6);
    m.extra = {{"us", t * 1e6}, {"flops", flops}, {"tokens", n}};
    return m;
  }
};

// ---------------------------------------------------------------------------------------------
// GEMV: the weight matrices of a decode step one at a time, the GEMV kernel against cuBLAS.

// One weight of a decode step: c[m, n] = a[m, k] w[n, k]^T (fp32 c for the logits).
struct GemvShape {
  std::string name;
  int64_t n = 0, k = 0;
  bool fp32_out = false;
};

std::vector<GemvShape> GemvShapes(const ModelConfig& c) {
  return {{"qkv", c.q_size() + 2 * c.kv_size(), c.hidden_size, false},
          {"o", c.hidden_size, c.q_size(), false},
          {"gate_up", 2 * c.intermediate_size, c.hidden_size, false},
          {"down", c.hidden_size, c.intermediate_size, false},
          {"lm_head", c.vocab_size, c.hidden_size, true}};
}

// GPU seconds per call: `calls` back-to-back calls of launch(i % copies) recorded in a CUDA
// graph (as a decode step replays them: no host launch gaps), timed between two events around
// a replay; best of `samples`.
template <typename F>
double TimeReplayed(cudaStream_t stream, int copies, int calls, int samples, F&& launch) {
  for (int i = 0; i < copies; ++i) launch(i);  // warm-up outside the graph (cuBLAS heuristics)
  CUDA_CHECK(cudaStreamSynchronize(stream));
  cudaGraph_t graph = nullptr;
  CUDA_CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
  for (int i = 0; i < calls; ++i) launch(i % copies);
  CUDA_CHECK(cudaStreamEndCapture(stream, &graph));
  cudaGraphExec_t exec = nullptr;
  CUDA_CHECK(cudaGraphInstantiate(&exec, graph, 0));
  const double best =
      BestEventSeconds(stream, 1, samples, [&] { CUDA_CHECK(cudaGraphLaunch(exec, stream)); });
  CUDA_CHECK(cudaGraphExecDestroy(exec));
  CUDA_CHECK(cudaGraphDestroy(graph));
  return best / calls;
}

// Fails unless the GEMV kernel's and cuBLAS's results (`count` values of `dtype`, or fp32)
// agree within the rounding of the output (same inputs; only the summation order differs).
void CheckGemvAgrees(const DeviceBuffer& gemv, const DeviceBuffer& blas, size_t count,
                     engine::DType dtype, const std::string& what) {
  std::vector<float> g(count), b(count);
  if (dtype == engine::DType::kF32) {
    CUDA_CHECK(cudaMemcpy(g.data(), gemv.data(), count * 4, cudaMemcpyDeviceToHost));
    CUDA_CHECK(cudaMemcpy(b.data(), blas.data(), count * 4, cudaMemcpyDeviceToHost));
  } else {
    std::vector<uint16_t> raw(count);
    CUDA_CHECK(cudaMemcpy(raw.data(), gemv.data(), count * 2, cudaMemcpyDeviceToHost));
    engine::ConvertToFloat(dtype, raw.data(), g.data(), count);
    CUDA_CHECK(cudaMemcpy(raw.data(), blas.data(), count * 2, cudaMemcpyDeviceToHost));
    engine::ConvertToFloat(dtype, raw.data(), b.data(), count);
  }
  CheckFinite(g, what);
  double sq = 0;
  for (float v : b) sq += static_cast<double>(v) * v;
  const double rms = std::sqrt(sq / static_cast<double>(count));
  const double tol = dtype == engine::DType::kF32 ? 1e-3 : 2e-2;
  for (size_t i = 0; i < count; ++i) {
    if (std::fabs(g[i] - b[i]) > tol * (std::fabs(b[i]) + rms)) {
      Fail(absl::StrFormat("%s: GEMV and cuBLAS differ at %d: %g vs %g (rms %g)", what, i, g[i],
                           b[i], rms));
    }
  }
}

// The GEMV rows (gemv/cublas <matrix> m<rows>), then the linear layers of one decode step
// summed from them (gemv/cublas linear m<rows>).
std::vector<Metric> MeasureGemv(Backend& backend, const ModelConfig& config, const Ceilings& ceil,
                                const Plan& plan) {
  namespace kc = ::pds::kernels::cuda;
  SetStage("gemv");
  const engine::DType dtype = backend.compute_dtype();
  const size_t esize = engine::DTypeSize(dtype);
  const kc::Half16 half = dtype == engine::DType::kBF16 ? kc::Half16::kBF16 : kc::Half16::kF16;
  const cudaDataType_t t16 = dtype == engine::DType::kBF16 ? CUDA_R_16BF : CUDA_R_16F;
  const std::string dtype_name(engine::DTypeName(dtype));
  int device = 0, l2_bytes = 0;
  CUDA_CHECK(cudaGetDevice(&device));
  CUDA_CHECK(cudaDeviceGetAttribute(&l2_bytes, cudaDevAttrL2CacheSize, device));
  const CublasStream blas(backend);
  cudaStream_t stream = blas.stream;
  cublasHandle_t handle = blas.handle;
  const int samples = plan.ceiling_iters;
  const int rows_list[] = {1, static_cast<int>(kc::kGemvMaxRows)};
  std::vector<Metric> out;
  // Per rows: seconds and bytes of the whole step's linear layers, GEMV and cuBLAS.
  std::map<int, std::array<double, 3>> step;  // rows -> {gemv s, cublas s, bytes}
  for (const GemvShape& s : GemvShapes(config)) {
    const size_t weight_bytes = static_cast<size_t>(s.n) * s.k * esize;
    // Copies cycled through: together 3x the L2 (at least 2), so that no call finds its
    // weight there, as in a decode step that streams every weight once.
    const int copies = static_cast<int>(
        std::max<double>(2.0, std::ceil(3.0 * l2_bytes / static_cast<double>(weight_bytes))));
    const int calls = std::max(8, 2 * copies);
    std::vector<DeviceBuffer> weights;
    for (int i = 0; i < copies; ++i) {
      weights.push_back(PDS_TAKE(backend.Allocate(weight_bytes, "gemv weight")));
      PDS_CHECK_OK(backend.FillRandom(weights.back().data(), weight_bytes / esize, 1.0f, 0.0f,
                                      60 + static_cast<uint64_t>(i)));
    }
    const size_t max_rows = rows_list[1];
    DeviceBuffer a = PDS_TAKE(backend.Allocate(max_rows * s.k * esize, "gemv activations"));
    PDS_CHECK_OK(backend.FillRandom(a.data(), max_rows * s.k, 1.0f, 0.0f, 59));
    const size_t out_esize = s.fp32_out ? 4 : esize;
    DeviceBuffer c_gemv = PDS_TAKE(backend.Allocate(max_rows * s.n * out_esize, "gemv out"));
    DeviceBuffer c_blas = PDS_TAKE(backend.Allocate(max_rows * s.n * out_esize, "gemv out"));
    PDS_CHECK_OK(backend.Synchronize());
    for (const int m : rows_list) {
      auto gemv = [&](int i) {
        CUDA_CHECK(kc::Gemv(half, a.data(), s.k, weights[i].data(), s.n, s.k, c_gemv.data(),
                            s.fp32_out, m, stream));
      };
      auto blas = [&](int i) {
        const float alpha = 1.0f, beta = 0.0f;
        CUBLAS_CHECK(cublasGemmEx(handle, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(s.n), m,
                                  static_cast<int>(s.k), &alpha, weights[i].data(), t16,
                                  static_cast<int>(s.k), a.data(), t16, static_cast<int>(s.k),
                                  &beta, c_blas.data(), s.fp32_out ? CUDA_R_32F : t16,
                                  static_cast<int>(s.n), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
      };
      const std::string label = absl::StrCat(s.name, " m", m);
      // Same inputs, same weight copy: the results agree before anything is timed.
      gemv(0);
      blas(0);
      CUDA_CHECK(cudaStreamSynchronize(stream));
      CheckGemvAgrees(c_gemv, c_blas, static_cast<size_t>(m) * s.n,
                      s.fp32_out ? engine::DType::kF32 : dtype, label);
      const double t_gemv = TimeReplayed(stream, copies, calls, samples, gemv);
      const double t_blas = TimeReplayed(stream, copies, calls, samples, blas);
      // The tensor-core kernel's measurement knobs (KernelSettings), each timed the same way
      // (for tuning its defaults); they do not touch the FMA kernel of m <= kGemvFmaRows.
      Json variants = {{"default", t_gemv * 1e6}};
      for (auto [name, value] :
           {std::pair{"PDS_GEMV_UNROLL", "8"}, std::pair{"PDS_GEMV_WARPS", "4"},
            std::pair{"PDS_GEMV_WARPS", "16"}}) {
        if (m <= kc::kGemvFmaRows) break;
        setenv(name, value, 1);
        kc::ReloadKernelSettings();
        variants[absl::StrCat(name, "=", value)] =
            TimeReplayed(stream, copies, calls, samples, gemv) * 1e6;
        unsetenv(name);
        kc::ReloadKernelSettings();
      }
      const double bytes = static_cast<double>(weight_bytes) + double{1} * m * s.k * esize +
                           double{1} * m * s.n * out_esize;
      auto metric = [&](const char* impl, double secs) {
        Metric x;
        x.name = absl::StrCat(impl, " ", label);
        x.shape =
            absl::StrCat(s.n, "x", s.k, " ", dtype_name, s.fp32_out ? " -> F32" : "", ", m ", m);
        x.value = bytes / secs / 1e12;
        x.unit = "TB/s";
        x.ceiling = ceil.copy_bytes_per_s / 1e12;
        x.ceiling_unit = "TB/s copy";
        x.fraction = bytes / secs / ceil.copy_bytes_per_s;
        x.note = absl::StrFormat("%.1f us", secs * 1e6);
        x.extra = {{"us", secs * 1e6},
                   {"bytes", bytes},
                   {"n", s.n},
                   {"k", s.k},
                   {"m", m},
                   {"output", s.fp32_out ? std::string("F32") : dtype_name},
                   {"weight_copies", copies},
                   {"calls_per_replay", calls}};
        return x;
      };
      Metric g = metric("gemv", t_gemv);
      g.target = 0.90;
      g.note += absl::StrFormat(", %.2fx cuBLAS", t_blas / t_gemv);
      g.extra["speedup_vs_cublas"] = t_blas / t_gemv;
      g.extra["variants_us"] = variants;
      Metric b = metric("cublas", t_blas);
      for (const Metric* x : {&g, &b}) {
        std::printf("  %-20s %10.3f %-8s (%.1f%% of ceiling)  %s\n", x->name.c_str(), x->value,
                    x->unit.c_str(), x->fraction * 100, x->note.c_str());
      }
      std::fflush(stdout);
      out.push_back(std::move(g));
      out.push_back(std::move(b));
      // A decode step reads each layer matrix once per layer and lm_head once.
      const double times = s.name == "lm_head" ? 1.0 : static_cast<double>(config.num_layers);
      std::array<double, 3>& acc = step[m];
      acc[0] += times * t_gemv;
      acc[1] += times * t_blas;
      acc[2] += times * bytes;
    }
  }
  for (const int m : rows_list) {
    const auto& [t_gemv, t_blas, bytes] = step[m];
    const double floor_s = bytes / ceil.copy_bytes_per_s;
    for (const char* impl : {"gemv", "cublas"}) {
      const double t = impl[0] == 'g' ? t_gemv : t_blas;
      Metric x;
      x.name = absl::StrCat(impl, " linear m", m);
      x.shape = absl::StrCat(config.num_layers, " x (qkv, o, gate_up, down) + lm_head, m ", m,
                             ", from the rows above");
      x.value = t * 1e3;
      x.unit = "ms";
      x.ceiling = floor_s * 1e3;
      x.ceiling_unit = "ms floor";
      x.fraction = floor_s / t;
      x.target = impl[0] == 'g' ? 0.90 : 0.0;
      x.note = impl[0] == 'g' ? absl::StrFormat("%.2fx cuBLAS", t_blas / t_gemv) : std::string();
      x.extra = {{"ms", t * 1e3}, {"bytes", bytes}, {"floor_ms", floor_s * 1e3}, {"m", m}};
      std::printf("  %-20s %10.3f %-8s (%.1f%% of floor)  %s\n", x.name.c_str(), x.value,
                  x.unit.c_str(), x.fraction * 100, x.note.c_str());
      out.push_back(std::move(x));
    }
  }
  std::fflush(stdout);
  return out;
}

int Main(int argc, char** argv) {
  SetTool("bench_cuda");
  std::optional<Options> parsed = ParseArgs(argc, argv);
  if (!parsed) {
    Usage();
    return 2;
  }
  const Options opt = *parsed;
  const Plan plan = MakePlan(opt);
  Watchdog watchdog(opt.timeout_s);
  const auto run_start = std::chrono::steady_clock::now();

  Json device = Json::object();
  if (opt.cpu_smoke) {
    std::printf("bench_cuda: --cpu-smoke: the CPU backend at toy shapes (numbers mean nothing)\n");
    device = {{"name", "cpu (--cpu-smoke)"}};
  } else {
    const std::optional<DeviceInfo> info = OpenDevice(opt.device);
    if (!info) return 2;
    const cudaDeviceProp& prop = info->prop;
    const int driver = info->driver, runtime = info->runtime;
    std::printf("bench_cuda: %s (sm_%d%d, %d SMs, %.1f GiB), driver API %d, runtime %d%s\n",
                prop.name, prop.major, prop.minor, prop.multiProcessorCount,
                prop.totalGlobalMem / double(1 << 30), driver, runtime,
                opt.quick ? ", --quick" : "");
    device = {{"name", prop.name},
              {"sm", prop.major * 10 + prop.minor},
              {"sms", prop.multiProcessorCount},
              {"memory_bytes", prop.totalGlobalMem},
              {"driver_api", driver},
              {"runtime", runtime}};
  }

  const std::string preset =
      opt.cpu_smoke && opt.preset == Options().preset ? std::string("tiny") : opt.preset;
  const ModelConfig config = PDS_TAKE(engine::PresetConfig(preset));
  SetStage("backend");
  engine::BackendOptions bo;
  bo.kind = opt.cpu_smoke ? "cpu" : "cuda";
  bo.num_threads = opt.cpu_smoke ? 2 : 0;
  bo.device = opt.device;
  bo.dtype = engine::DType::kBF16;
  std::unique_ptr<Backend> backend = PDS_TAKE(engine::CreateBackend(bo));
  if (!opt.cpu_smoke && backend->compute_dtype() != engine::DType::kBF16) {
    Fail("the CUDA backend is not bf16");
  }

  // Memory plan: weights, one KV cache sized for the largest measurement, scratch and slack.
  const int bs = 16;
  int64_t max_tokens_per_batch = 0;
  int32_t blocks = 0;
  for (int b : plan.decode_batches) {
    blocks = std::max(blocks, b * BlockTable::BlocksFor(plan.context, bs));
  }
  blocks = std::max(blocks, plan.attn_decode_batch * BlockTable::BlocksFor(plan.context, bs));
  blocks = std::max(blocks, plan.prefill_seqs * BlockTable::BlocksFor(plan.prefill_seq_len, bs));
  blocks = std::max(blocks, BlockTable::BlocksFor(plan.prefill_tokens, bs));
  blocks = std::max(blocks, BlockTable::BlocksFor(plan.attn_prefill_tokens, bs));
  max_tokens_per_batch =
      std::max<int64_t>({plan.prefill_tokens, int64_t{plan.prefill_seqs} * plan.prefill_seq_len,
                         plan.attn_prefill_tokens});
  const double esize = static_cast<double>(engine::DTypeSize(backend->compute_dtype()));
  const double weight_bytes = static_cast<double>(config.num_parameters()) * esize;
  const double kv_bytes = 2.0 * config.num_layers * config.kv_size() * esize * blocks * bs;
  const double scratch = max_tokens_per_batch * esize *
                         (4.0 * config.hidden_size + 2.0 * config.q_size() +
                          2.0 * config.kv_size() + 3.0 * config.intermediate_size);
  const double need = weight_bytes + kv_bytes + scratch + 2.0 * (1 << 30);
  size_t free_bytes = static_cast<size_t>(need) + 1, total_bytes = free_bytes;
  if (!opt.cpu_smoke) CUDA_CHECK(cudaMemGetInfo(&free_bytes, &total_bytes));
  std::printf(
      "bench_cuda: %s %s: weights %.2f GB, KV cache %.2f GB (%d blocks of %d), scratch %.2f "
      "GB; %.1f GB free of %.1f GB\n",
      preset.c_str(), std::string(engine::DTypeName(backend->compute_dtype())).c_str(),
      weight_bytes / 1e9, kv_bytes / 1e9, blocks, bs, scratch / 1e9, free_bytes / 1e9,
      total_bytes / 1e9);
  if (!opt.gemv_only && need > static_cast<double>(free_bytes)) {
    std::fprintf(stderr,
                 "bench_cuda: not enough GPU memory: need about %.1f GB, %.1f GB free (try "
                 "--quick or a smaller --preset)\n",
                 need / 1e9, free_bytes / 1e9);
    return 1;
  }

  // Ceilings first, their buffers freed before the model is built.
  Ceilings ceil;
  ceil.copy_bytes = static_cast<double>(plan.copy_bytes);
  ceil.copy_bytes_per_s = MeasureCopyBandwidth(*backend, plan.copy_bytes, plan.ceiling_iters);
  ceil.gemm_n = plan.gemm_n;
  ceil.gemm_flops_per_s = MeasureGemmRate(*backend, plan.gemm_n, plan.ceiling_iters);
  std::printf(
      "bench_cuda: ceilings: copy %.3f TB/s (read + write, %.0f MiB, best of %d); "
      "cuBLAS bf16 GEMM %d^3 %.1f TFLOP/s (best of %d)\n",
      ceil.copy_bytes_per_s / 1e12, ceil.copy_bytes / (1 << 20), plan.ceiling_iters, plan.gemm_n,
      ceil.gemm_flops_per_s / 1e12, plan.ceiling_iters);
  std::fflush(stdout);

  // The GEMV rows, before the model takes its memory (listed after the model's rows).
  std::vector<Metric> gemv_metrics;
  if (opt.cpu_smoke) {
    std::printf("bench_cuda: --cpu-smoke: no GEMV rows (CUDA kernels only)\n");
  } else {
    gemv_metrics = MeasureGemv(*backend, config, ceil, plan);
  }

  std::vector<Metric> metrics;
  auto model_weight_bytes = static_cast<size_t>(weight_bytes);  // --gemv-only: the config's
  if (!opt.gemv_only) {
    SetStage("random model");
    std::unique_ptr<Transformer> model = PDS_TAKE(Transformer::CreateRandom(config, *backend, 1));
    SetStage("KV cache");
    KvCache cache = PDS_TAKE(KvCache::Create(*backend, model->CacheShape(blocks, bs)));
    // Random K/V everywhere (never time attention over zeros).
    PDS_CHECK_OK(backend->FillRandom(cache.data(), cache.bytes() / static_cast<size_t>(esize), 1.0f,
                                     0.0f, 99));
    PDS_CHECK_OK(backend->Synchronize());
    model_weight_bytes = model->weight_bytes();
    std::printf("bench_cuda: model ready: %.2f GB of weights on %s (%.1f s since start)\n",
                model->weight_bytes() / 1e9, backend->name().c_str(), Seconds(run_start));
    std::fflush(stdout);

    Bench bench{*backend, *model, cache, plan, ceil};
    auto add = [&](Metric m) {
      std::printf("  %-20s %10.3f %-8s (%.1f%% of ceiling)  %s\n", m.name.c_str(), m.value,
                  m.unit.c_str(), m.fraction * 100, m.note.c_str());
      std::fflush(stdout);
      metrics.push_back(std::move(m));
    };
    for (int b : opt.kernels_only ? std::vector<int>{} : plan.decode_batches) {
      add(bench.Decode(b, /*greedy=*/false));
      add(bench.Decode(b, /*greedy=*/true));
      // Speculative decoding's verify step with 4 drafts, against the graph-replayed step.
      add(bench.Verify(b, 4, metrics.back().value));
      add(bench.Decode(b, /*greedy=*/true, /*eager=*/true));
      add(bench.Decode(b, /*greedy=*/true, /*eager=*/false, /*pdl=*/false));
      // RoPE and the KV write in one launch (PDS_FUSE_ROPE_KV=1; off by default until measured).
      add(bench.WithKnob("PDS_FUSE_ROPE_KV", "1", "fused",
                         [&] { return bench.Decode(b, /*greedy=*/true); }));
      // The tensor-core decode attention kernel (PDS_ATTN_DECODE=mma; off until measured).
      add(bench.WithKnob("PDS_ATTN_DECODE", "mma", "mma",
                         [&] { return bench.Decode(b, /*greedy=*/true); }));
      // Decode splits merged by their last block, no combine launch (PDS_ATTN_COMBINE=fused,
      // "fcomb"; off until measured), alone and with the fused RoPE + KV write ("fcomb fused").
      const auto fused_combine = [&] {
        return bench.WithKnob("PDS_ATTN_COMBINE", "fused", "fcomb",
                              [&] { return bench.Decode(b, /*greedy=*/true); });
      };
      add(fused_combine());
      add(bench.WithKnob("PDS_FUSE_ROPE_KV", "1", "fused", fused_combine));
    }
    if (!opt.kernels_only) {
      add(bench.Prefill({plan.prefill_tokens}));
      add(bench.WithKnob("PDS_FUSE_ROPE_KV", "1", "fused",
                         [&] { return bench.Prefill({plan.prefill_tokens}); }));
      add(bench.Prefill(std::vector<int>(plan.prefill_seqs, plan.prefill_seq_len)));
    }
    add(bench.AttentionDecode());
    add(bench.AttentionDecode(/*legacy=*/true));
    add(bench.WithKnob("PDS_ATTN_DECODE", "mma", "mma", [&] { return bench.AttentionDecode(); }));
    add(bench.WithKnob("PDS_ATTN_COMBINE", "fused", "fcomb",
                       [&] { return bench.AttentionDecode(); }));
    add(bench.AttentionPrefill());
    add(bench.AttentionPrefill(/*warps=*/4));
    add(bench.AttentionPrefill(/*warps=*/8));
  }
  for (Metric& m : gemv_metrics) metrics.push_back(std::move(m));
  SetStage("report");
  if (!opt.cpu_smoke) CUDA_CHECK(cudaGetLastError());

  PrintTable(metrics, 3);
  std::printf(
      "decode floor = (weight bytes read + KV bytes read) / copy bandwidth, the copy "
      "bandwidth (read + write) standing in for the read bandwidth\n");
  if (!gemv_metrics.empty() || opt.gemv_only) {
    std::printf(
        "gemv/cublas <matrix> m<rows>: (weight + activation bytes read + output bytes written) / "
        "time, back-to-back calls from a CUDA graph; <impl> linear m<rows>: the step's layers x "
        "(qkv, o, gate_up, down) + lm_head from those times, floor = their bytes / copy "
        "bandwidth\n");
  }

  if (!opt.json_out.empty()) {
    Json j;
    j["tool"] = "bench_cuda";
    j["device"] = device;
    j["preset"] = preset;
    j["quick"] = opt.quick;
    j["cpu_smoke"] = opt.cpu_smoke;
    j["gemv_only"] = opt.gemv_only;
    j["dtype"] = std::string(engine::DTypeName(backend->compute_dtype()));
    j["weight_bytes"] = model_weight_bytes;
    j["parameters"] = config.num_parameters();
    j["iters"] = plan.iters;
    j["ceilings"] = {{"copy_bytes_per_s", ceil.copy_bytes_per_s},
                     {"copy_counts", "bytes read + bytes written"},
                     {"copy_buffer_bytes", ceil.copy_bytes},
                     {"gemm_flops_per_s", ceil.gemm_flops_per_s},
                     {"gemm_shape", absl::StrCat(ceil.gemm_n, "^3 bf16, fp32 accumulate")}};
    j["metrics"] = Json::array();
    for (const Metric& m : metrics) j["metrics"].push_back(ToJson(m));
    j["seconds"] = Seconds(run_start);
    std::ofstream f(opt.json_out);
    f << j.dump(2) << "\n";
    if (!f) {
      std::fprintf(stderr, "bench_cuda: cannot write %s\n", opt.json_out.c_str());
      return 1;
    }
    std::printf("bench_cuda: wrote %s\n", opt.json_out.c_str());
  }
  std::printf("bench_cuda: done in %.1f s\n", Seconds(run_start));
  return 0;
}

}  // namespace
}  // namespace pds::bench

int main(int argc, char** argv) { return pds::bench::Main(argc, argv); }

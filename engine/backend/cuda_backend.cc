#include "engine/backend/cuda_backend.h"

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <map>
#include <unordered_map>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "engine/common/status_macros.h"
#include "kernels/cuda/ops.h"

namespace pds::engine {
namespace kc = ::pds::kernels::cuda;

namespace {

absl::Status CudaStatus(cudaError_t e, absl::string_view what) {
  if (e == cudaSuccess) return absl::OkStatus();
  const std::string msg = absl::StrCat("cuda backend: ", what, ": ", cudaGetErrorName(e), " (",
                                       cudaGetErrorString(e), ")");
  if (e == cudaErrorMemoryAllocation) return absl::ResourceExhaustedError(msg);
  if (e == cudaErrorInvalidValue) return absl::InvalidArgumentError(msg);
  return absl::InternalError(msg);
}

absl::Status CublasStatus(cublasStatus_t e, absl::string_view what) {
  if (e == CUBLAS_STATUS_SUCCESS) return absl::OkStatus();
  return absl::InternalError(absl::StrCat("cuda backend: cuBLAS ", what, ": ",
                                          cublasGetStatusName(e), " (", cublasGetStatusString(e),
                                          ")"));
}

#define PDS_CUDA(expr, what) PDS_RETURN_IF_ERROR(CudaStatus((expr), (what)))

// A device buffer that grows (never shrinks) to the bytes asked for.
struct Scratch {
  void* ptr = nullptr;
  size_t bytes = 0;
  absl::Status Reserve(size_t want, absl::string_view what) {
    if (want <= bytes) return absl::OkStatus();
    if (ptr != nullptr) cudaFree(ptr);
    ptr = nullptr;
    bytes = 0;
    want = std::max<size_t>(want, 256);
    PDS_CUDA(cudaMalloc(&ptr, want), absl::StrCat("allocating ", want, " bytes for ", what));
    bytes = want;
    return absl::OkStatus();
  }
  ~Scratch() {
    if (ptr != nullptr) cudaFree(ptr);
  }
};

// Pinned host memory that grows to the bytes asked for.
struct PinnedHost {
  void* ptr = nullptr;
  size_t bytes = 0;
  absl::Status Reserve(size_t want, absl::string_view what) {
    if (want <= bytes) return absl::OkStatus();
    if (ptr != nullptr) cudaFreeHost(ptr);
    ptr = nullptr;
    bytes = 0;
    PDS_CUDA(cudaMallocHost(&ptr, want), absl::StrCat("pinning ", want, " bytes for ", what));
    bytes = want;
    return absl::OkStatus();
  }
  ~PinnedHost() {
    if (ptr != nullptr) cudaFreeHost(ptr);
  }
};

}  // namespace

struct CudaBackend::State {
  cublasHandle_t cublas = nullptr;
  // Host copies from any thread (KV transfer threads among them) go on their own stream, so
  // that they never land in a graph being recorded on the compute stream.
  cudaStream_t copy_stream = nullptr;
  Scratch cublas_workspace;
  std::string device_name;
  int num_sms = 0;
  // Gemm and ProjectLogits with at most this many rows take the GEMV kernel (kernels/cuda
  // gemv.cu) when its alignment allows, cuBLAS otherwise; 0: always cuBLAS.
  int64_t gemv_max_rows = kc::kGemvDefaultRows;

  // Batch metadata on the device, uploaded in BeginBatch through pinned staging; the event
  // marks when the staging may be rewritten.
  Scratch meta;
  PinnedHost meta_host;
  cudaEvent_t meta_copied = nullptr;
  int32_t num_tokens = 0, num_seqs = 0, max_blocks = 0, block_size = 0;
  const int32_t* token_ids = nullptr;
  const int32_t* positions = nullptr;
  const int32_t* slots = nullptr;
  const int32_t* cu_q = nullptr;
  const int32_t* kv_lens = nullptr;
  const int32_t* block_tables = nullptr;
  const int32_t* last_rows = nullptr;
  kc::AttentionPlan plan;
  uint64_t generation = 0;

  // RoPE: inv_freq device copies by host pointer, with the values they hold (a pointer may be
  // reused by another model's frequencies); the batch's cos/sin tables.
  struct RopeFreqs {
    Scratch device;
    std::vector<float> host;
  };
  std::unordered_map<const float*, RopeFreqs> inv_freq;
  Scratch rope_cos, rope_sin;
  uint64_t rope_generation = 0;
  const float* rope_key = nullptr;

  Scratch attention_workspace;
  // The decode attention's split counters (kc::PagedAttention): allocated and zeroed once, at
  // creation, so that no forward pass (or graph recording) has to; the kernels leave them zero.
  Scratch split_counters;
  static constexpr int64_t kSplitCounterSlots = 1 << 16;  // sequences x heads

  // Op timing (SetOpProfiling): CUDA events around each op, summed by name on read.
  bool profiling = false;
  std::vector<std::pair<std::string, std::pair<cudaEvent_t, cudaEvent_t>>> timed;
  std::vector<cudaEvent_t> spare_events;
  cudaEvent_t TakeEvent() {
    if (!spare_events.empty()) {
      cudaEvent_t e = spare_events.back();
      spare_events.pop_back();
      return e;
    }
    cudaEvent_t e = nullptr;
    cudaEventCreate(&e);
    return e;
  }

  // Recorded decode graphs by key; a key is recorded on its second sighting (the first runs
  // as usual and sizes every buffer the ops use), and every graph is dropped when one of
  // those buffers moves (the signature of their addresses changes).
  bool graphs_enabled = true;
  std::unordered_map<uint64_t, cudaGraphExec_t> graphs;
  std::unordered_map<uint64_t, int> sightings;
  uint64_t graph_signature = 0;
  bool capturing = false;
  uint64_t capture_key = 0;
  cudaGraphExec_t replay = nullptr;
  uint64_t Signature() const {
    uint64_t h = 1469598103934665603ull;
    for (uint64_t v :
         {reinterpret_cast<uintptr_t>(meta.ptr), static_cast<uintptr_t>(meta.bytes),
          reinterpret_cast<uintptr_t>(rope_cos.ptr), reinterpret_cast<uintptr_t>(rope_sin.ptr),
          reinterpret_cast<uintptr_t>(attention_workspace.ptr),
          static_cast<uintptr_t>(inv_freq.size())}) {
      h = (h ^ v) * 1099511628211ull;
    }
    return h;
  }
  Scratch logits;
  Scratch tokens;
  Scratch sampling;
  PinnedHost sampling_host;
  PinnedHost logits_host;

  void Drop() {
    for (auto& [key, exec] : graphs) cudaGraphExecDestroy(exec);
    graphs.clear();
    sightings.clear();
  }
  ~State() {
    Drop();
    for (auto& [name, ev] : timed) spare_events.insert(spare_events.end(), {ev.first, ev.second});
    for (cudaEvent_t e : spare_events) cudaEventDestroy(e);
    if (copy_stream != nullptr) cudaStreamDestroy(copy_stream);
    if (meta_copied != nullptr) cudaEventDestroy(meta_copied);
    if (cublas != nullptr) cublasDestroy(cublas);
  }
};

namespace {

// Brackets one op with events on the compute stream while profiling (never while recording a
// graph: events recorded in a capture would become graph nodes).
class OpScope {
 public:
  OpScope(CudaBackend::State& st, cudaStream_t stream, const char* name, int64_t rows = 0,
          int64_t cols = 0)
      : st_(st), stream_(stream) {
    if (!st.profiling || st.capturing) return;
    name_ = rows > 0 ? absl::StrCat(name, " ", rows, "x", cols) : std::string(name);
    start_ = st.TakeEvent();
    cudaEventRecord(start_, stream);
  }
  ~OpScope() {
    if (start_ == nullptr) return;
    cudaEvent_t end = st_.TakeEvent();
    cudaEventRecord(end, stream_);
    st_.timed.push_back({std::move(name_), {start_, end}});
  }

 private:
  CudaBackend::State& st_;
  cudaStream_t stream_;
  std::string name_;
  cudaEvent_t start_ = nullptr;
};

}  // namespace

void CudaBackend::SetOpProfiling(bool enabled) { state_->profiling = enabled; }

std::vector<CudaBackend::OpTime> CudaBackend::TakeOpProfile() {
  State& st = *state_;
  std::vector<OpTime> out;
  if (cudaStreamSynchronize(stream_) != cudaSuccess) return out;
  std::map<std::string, OpTime> by_name;
  for (auto& [name, ev] : st.timed) {
    float ms = 0;
    cudaEventElapsedTime(&ms, ev.first, ev.second);
    OpTime& t = by_name[name];
    t.name = name;
    t.ms += ms;
    ++t.calls;
    st.spare_events.push_back(ev.first);
    st.spare_events.push_back(ev.second);
  }
  st.timed.clear();
  for (auto& [name, t] : by_name) out.push_back(t);
  std::sort(out.begin(), out.end(), [](const OpTime& a, const OpTime& b) { return a.ms > b.ms; });
  return out;
}

bool CudaDeviceAvailable() {
  int count = 0;
  return cudaGetDeviceCount(&count) == cudaSuccess && count > 0;
}

absl::StatusOr<std::unique_ptr<CudaBackend>> CudaBackend::Create(const BackendOptions& options) {
  if (options.dtype != DType::kBF16 && options.dtype != DType::kF16) {
    return absl::InvalidArgumentError(absl::StrCat(
        "cuda backend: compute dtype must be BF16 or F16, not ", DTypeName(options.dtype)));
  }
  int count = 0;
  const cudaError_t e = cudaGetDeviceCount(&count);
  if (e != cudaSuccess || count == 0) {
    return absl::FailedPreconditionError(absl::StrCat(
        "cuda backend: no usable CUDA device (",
        e == cudaSuccess ? std::string("0 devices") : std::string(cudaGetErrorString(e)), ")"));
  }
  if (options.device < 0 || options.device >= count) {
    return absl::InvalidArgumentError(absl::StrCat("cuda backend: device ", options.device,
                                                   " does not exist (", count, " device(s))"));
  }
  // PDS_GEMV_MAX_ROWS: the most rows a GEMM takes the GEMV kernel at (0 turns it off; unset
  // or empty: kGemvDefaultRows, see kernels/cuda/ops.h and bench/results/2026-11-27-h100.md).
  int64_t gemv_max_rows = kc::kGemvDefaultRows;
  if (const char* env = std::getenv("PDS_GEMV_MAX_ROWS"); env != nullptr && *env != '\0') {
    if (!absl::SimpleAtoi(env, &gemv_max_rows) || gemv_max_rows < 0 ||
        gemv_max_rows > kc::kGemvMaxRows) {
      return absl::InvalidArgumentError(
          absl::StrCat("cuda backend: PDS_GEMV_MAX_ROWS must be an integer from 0 (GEMV off) to ",
                       kc::kGemvMaxRows, ", not \"", env, "\""));
    }
  }
  std::unique_ptr<CudaBackend> b(new CudaBackend());
  b->device_ = options.device;
  b->dtype_ = options.dtype;
  b->state_ = std::make_unique<State>();
  State& st = *b->state_;
  PDS_CUDA(cudaSetDevice(b->device_), "selecting the device");
  cudaDeviceProp prop{};
  PDS_CUDA(cudaGetDeviceProperties(&prop, b->device_), "reading device properties");
  st.device_name = prop.name;
  st.num_sms = prop.multiProcessorCount;
  st.plan.num_sms = st.num_sms;
  st.graphs_enabled = options.cuda_graphs;
  st.gemv_max_rows = gemv_max_rows;
  PDS_CUDA(cudaStreamCreateWithFlags(&b->stream_, cudaStreamNonBlocking), "creating the stream");
  PDS_CUDA(cudaStreamCreateWithFlags(&st.copy_stream, cudaStreamNonBlocking),
           "creating the copy stream");
  PDS_CUDA(cudaEventCreateWithFlags(&st.meta_copied, cudaEventDisableTiming), "creating an event");
  PDS_RETURN_IF_ERROR(CublasStatus(cublasCreate(&st.cublas), "create"));
  PDS_RETURN_IF_ERROR(CublasStatus(cublasSetStream(st.cublas, b->stream_), "set stream"));
  // A fixed workspace: cuBLAS then never allocates during a forward pass (or graph capture).
  PDS_RETURN_IF_ERROR(st.cublas_workspace.Reserve(32 << 20, "the cuBLAS workspace"));
  PDS_RETURN_IF_ERROR(CublasStatus(
      cublasSetWorkspace(st.cublas, st.cublas_workspace.ptr, st.cublas_workspace.bytes),
      "set workspace"));
  PDS_RETURN_IF_ERROR(st.split_counters.Reserve(State::kSplitCounterSlots * sizeof(int32_t),
                                                "the attention split counters"));
  PDS_CUDA(cudaMemsetAsync(st.split_counters.ptr, 0, st.split_counters.bytes, b->stream_),
           "zeroing the attention split counters");
  return b;
}

CudaBackend::~CudaBackend() {
  if (stream_ != nullptr) {
    cudaStreamSynchronize(stream_);
    state_.reset();
    cudaStreamDestroy(stream_);
  }
}

std::string CudaBackend::name() const {
  return absl::StrCat("cuda:", device_, " (", state_->device_name, ", ",
                      dtype_ == DType::kBF16 ? "bf16" : "fp16", ")");
}

namespace {
kc::Half16 H(DType d) { return d == DType::kBF16 ? kc::Half16::kBF16 : kc::Half16::kF16; }
}  // namespace

absl::StatusOr<DeviceBuffer> CudaBackend::Allocate(size_t bytes, absl::string_view what) {
  PDS_CUDA(cudaSetDevice(device_), "selecting the device");
  void* p = nullptr;
  const cudaError_t e = cudaMalloc(&p, std::max<size_t>(bytes, 1));
  if (e != cudaSuccess) {
    cudaGetLastError();  // clear the sticky-free allocation error
    size_t free_bytes = 0, total = 0;
    cudaMemGetInfo(&free_bytes, &total);
    return absl::ResourceExhaustedError(absl::StrFormat(
        "cuda backend: cannot allocate %d bytes for %s on device %d (%d MiB free of %d MiB): %s",
        bytes, std::string(what), device_, free_bytes >> 20, total >> 20, cudaGetErrorString(e)));
  }
  return DeviceBuffer(p, bytes, [](void* q) { cudaFree(q); });
}

absl::StatusOr<DeviceBuffer> CudaBackend::Upload(const void* host, DType src_dtype, size_t count,
                                                 absl::string_view what) {
  const size_t esize = DTypeSize(dtype_);
  PDS_ASSIGN_OR_RETURN(DeviceBuffer buffer, Allocate(count * esize, what));
  if (src_dtype == dtype_) {
    PDS_RETURN_IF_ERROR(CopyFromHost(buffer.data(), host, count * esize));
    return buffer;
  }
  // Convert on the host in chunks (bounded memory), through pinned staging.
  constexpr size_t kChunk = size_t{1} << 22;
  std::vector<float> f32(std::min(count, kChunk));
  PinnedHost staging;
  PDS_RETURN_IF_ERROR(staging.Reserve(std::min(count, kChunk) * esize, what));
  const auto* src = static_cast<const uint8_t*>(host);
  for (size_t at = 0; at < count; at += kChunk) {
    const size_t n = std::min(kChunk, count - at);
    ConvertToFloat(src_dtype, src + at * DTypeSize(src_dtype), f32.data(), n);
    ConvertFromFloat(dtype_, f32.data(), staging.ptr, n);
    PDS_CUDA(cudaMemcpyAsync(buffer.as<uint8_t>() + at * esize, staging.ptr, n * esize,
                             cudaMemcpyHostToDevice, stream_),
             absl::StrCat("uploading ", what));
    PDS_CUDA(cudaStreamSynchronize(stream_), absl::StrCat("uploading ", what));
  }
  return buffer;
}

absl::Status CudaBackend::CopyToHost(void* host, const void* device, size_t bytes) {
  PDS_CUDA(cudaSetDevice(device_), "selecting the device");
  cudaStream_t copy = state_->copy_stream;
  PDS_CUDA(cudaMemcpyAsync(host, device, bytes, cudaMemcpyDeviceToHost, copy), "copy to host");
  PDS_CUDA(cudaStreamSynchronize(copy), "copy to host");
  return absl::OkStatus();
}

absl::Status CudaBackend::CopyFromHost(void* device, const void* host, size_t bytes) {
  PDS_CUDA(cudaSetDevice(device_), "selecting the device");
  cudaStream_t copy = state_->copy_stream;
  PDS_CUDA(cudaMemcpyAsync(device, host, bytes, cudaMemcpyHostToDevice, copy), "copy from host");
  PDS_CUDA(cudaStreamSynchronize(copy), "copy from host");
  return absl::OkStatus();
}

absl::Status CudaBackend::CopyDevice(void* dst, const void* src, size_t bytes) {
  PDS_CUDA(cudaSetDevice(device_), "selecting the device");
  PDS_CUDA(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, stream_), "device copy");
  return absl::OkStatus();
}

absl::Status CudaBackend::Zero(void* device, size_t bytes) {
  PDS_CUDA(cudaSetDevice(device_), "selecting the device");
  PDS_CUDA(cudaMemsetAsync(device, 0, bytes, stream_), "zeroing memory");
  return absl::OkStatus();
}

absl::Status CudaBackend::FillRandom(void* device, size_t count, float scale, float offset,
                                     uint64_t seed) {
  PDS_CUDA(cudaSetDevice(device_), "selecting the device");
  PDS_CUDA(
      kc::FillRandom(H(dtype_), device, static_cast<int64_t>(count), scale, offset, seed, stream_),
      "FillRandom");
  return absl::OkStatus();
}

absl::Status CudaBackend::Synchronize() {
  PDS_CUDA(cudaStreamSynchronize(stream_), "synchronizing the stream");
  return absl::OkStatus();
}

namespace {
// An event recorded on the compute stream; polled from transfer threads.
class EventMark final : public Backend::Mark {
 public:
  EventMark(int device, cudaEvent_t event) : device_(device), event_(event) {}
  ~EventMark() override { cudaEventDestroy(event_); }
  absl::StatusOr<bool> Reached() override {
    PDS_CUDA(cudaSetDevice(device_), "selecting the device");
    const cudaError_t e = cudaEventQuery(event_);
    if (e == cudaErrorNotReady) return false;
    PDS_CUDA(e, "polling a stream mark");
    return true;
  }

 private:
  const int device_;
  const cudaEvent_t event_;
};
}  // namespace

absl::StatusOr<std::shared_ptr<Backend::Mark>> CudaBackend::MarkIssued() {
  PDS_CUDA(cudaSetDevice(device_), "selecting the device");
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  PDS_CUDA(cudaStreamIsCapturing(stream_, &capture), "checking for a graph recording");
  if (capture != cudaStreamCaptureStatusNone) {
    return absl::FailedPreconditionError("a stream mark inside a graph recording");
  }
  cudaEvent_t event = nullptr;
  PDS_CUDA(cudaEventCreateWithFlags(&event, cudaEventDisableTiming), "creating a stream mark");
  auto mark = std::make_shared<EventMark>(device_, event);
  PDS_CUDA(cudaEventRecord(event, stream_), "recording a stream mark");
  return mark;
}

absl::Status CudaBackend::BeginBatch(const BatchMetadata& batch) {
  State& st = *state_;
  PDS_CUDA(cudaSetDevice(device_), "selecting the device");
  const std::vector<int32_t>* parts[] = {&batch.token_ids, &batch.positions, &batch.slots,
                                         &batch.cu_q,      &batch.kv_lens,   &batch.block_tables,
                                         &batch.last_rows};
  // Each part starts 16-byte aligned.
  size_t offsets[7], total = 0;
  for (int i = 0; i < 7; ++i) {
    offsets[i] = total;
    total += (parts[i]->size() * sizeof(int32_t) + 15) / 16 * 16;
  }
  // The previous batch's upload must have left the staging buffer before it is rewritten.
  PDS_CUDA(cudaEventSynchronize(st.meta_copied), "waiting for the previous metadata upload");
  PDS_RETURN_IF_ERROR(st.meta_host.Reserve(total, "batch metadata"));
  PDS_RETURN_IF_ERROR(st.meta.Reserve(total, "batch metadata"));
  auto* host = static_cast<uint8_t*>(st.meta_host.ptr);
  for (int i = 0; i < 7; ++i) {
    std::memcpy(host + offsets[i], parts[i]->data(), parts[i]->size() * sizeof(int32_t));
  }
  PDS_CUDA(cudaMemcpyAsync(st.meta.ptr, host, total, cudaMemcpyHostToDevice, stream_),
           "uploading batch metadata");
  PDS_CUDA(cudaEventRecord(st.meta_copied, stream_), "recording an event");
  auto* dev = static_cast<const uint8_t*>(st.meta.ptr);
  auto at = [&](int i) { return reinterpret_cast<const int32_t*>(dev + offsets[i]); };
  st.token_ids = at(0);
  st.positions = at(1);
  st.slots = at(2);
  st.cu_q = at(3);
  st.kv_lens = at(4);
  st.block_tables = at(5);
  st.last_rows = at(6);
  st.num_tokens = batch.num_tokens();
  st.num_seqs = batch.num_seqs();
  st.max_blocks = batch.max_blocks;
  st.block_size = batch.block_size;
  st.plan.has_decode_rows = st.plan.has_prefill_rows = false;
  st.plan.max_q_len = 0;
  for (int32_t s = 0; s < st.num_seqs; ++s) {
    const int32_t q_len = batch.cu_q[s + 1] - batch.cu_q[s];
    (q_len == 1 ? st.plan.has_decode_rows : st.plan.has_prefill_rows) = true;
    st.plan.max_q_len = std::max(st.plan.max_q_len, q_len);
  }
  // The decode split plan follows the block-table width (what a graph key fixes; it covers
  // every context), not the exact longest context: blocks past a context exit at once.
  st.plan.max_kv_len = batch.max_blocks * batch.block_size;
  ++st.generation;
  return absl::OkStatus();
}

// Padded whether or not graphs are on, so that both modes run the same shapes (and plans).
int32_t CudaBackend::graph_block_bucket() const { return 32; }

void CudaBackend::SetGraphsEnabled(bool enabled) {
  state_->graphs_enabled = enabled;
  if (!enabled) DropGraphs();
}

size_t CudaBackend::num_graphs() const { return state_->graphs.size(); }

void CudaBackend::DropGraphs() {
  if (!state_->capturing) state_->Drop();
}

absl::StatusOr<Backend::GraphMode> CudaBackend::BeginGraph(uint64_t key) {
  State& st = *state_;
  if (!st.graphs_enabled || st.capturing) return GraphMode::kNone;
  const uint64_t signature = st.Signature();
  if (signature != st.graph_signature) {
    st.Drop();
    st.graph_signature = signature;
  }
  if (auto it = st.graphs.find(key); it != st.graphs.end()) {
    st.replay = it->second;
    return GraphMode::kReplay;
  }
  if (++st.sightings[key] < 2) return GraphMode::kNone;
  if (st.graphs.size() >= 256) st.Drop();  // bounded: shapes seen long ago are recorded again
  PDS_CUDA(cudaStreamBeginCapture(stream_, cudaStreamCaptureModeRelaxed),
           "beginning a graph capture");
  st.capturing = true;
  st.capture_key = key;
  return GraphMode::kCapture;
}

absl::StatusOr<bool> CudaBackend::EndGraph() {
  State& st = *state_;
  if (st.capturing) {
    st.capturing = false;
    cudaGraph_t graph = nullptr;
    PDS_CUDA(cudaStreamEndCapture(stream_, &graph), "ending a graph capture");
    cudaGraphExec_t exec = nullptr;
    const cudaError_t e = cudaGraphInstantiateWithFlags(&exec, graph, 0);
    cudaGraphDestroy(graph);
    PDS_CUDA(e, "instantiating a graph");
    if (st.Signature() != st.graph_signature) {
      // A buffer moved while recording: this graph (and older ones) may hold a stale address.
      cudaGraphExecDestroy(exec);
      st.Drop();
      st.graph_signature = st.Signature();
      st.rope_key = nullptr;  // the recording computed no RoPE tables: the eager re-run must
      return false;
    }
    st.graphs[st.capture_key] = exec;
    st.replay = exec;
  }
  if (st.replay == nullptr) return false;
  PDS_CUDA(cudaGraphLaunch(st.replay, stream_), "launching a graph");
  st.replay = nullptr;
  return true;
}

void CudaBackend::AbortGraph() {
  State& st = *state_;
  if (!st.capturing) return;
  st.capturing = false;
  cudaGraph_t graph = nullptr;
  cudaStreamEndCapture(stream_, &graph);
  if (graph != nullptr) cudaGraphDestroy(graph);
  cudaGetLastError();
  st.rope_key = nullptr;  // tables "computed" in the abandoned recording were never computed
}

absl::Status CudaBackend::Embed(const Weight& table, void* out, int64_t hidden) {
  OpScope op_scope(*state_, stream_, "embed");
  const State& st = *state_;
  PDS_CUDA(kc::Embed(H(dtype_), table.data(), st.token_ids, out, st.num_tokens, hidden, stream_),
           "Embed");
  return absl::OkStatus();
}

absl::Status CudaBackend::Gemm(const void* a, int64_t lda, const Weight& w, void* c, int64_t m) {
  // Few rows: the GEMV kernel, bound by reading the weight once (named "gemv" in op profiles).
  const bool gemv = m <= state_->gemv_max_rows && kc::GemvSupported(a, lda, w.data(), w.cols, m);
  OpScope op_scope(*state_, stream_, gemv ? "gemv" : "gemm", w.rows, w.cols);
  if (m <= 0) return absl::OkStatus();
  if (gemv) {
    PDS_CUDA(kc::Gemv(H(dtype_), a, lda, w.data(), w.rows, w.cols, c, /*c_fp32=*/false, m, stream_),
             absl::StrCat("GEMV ", m, "x", w.rows, "x", w.cols));
    return absl::OkStatus();
  }
  // Row-major c[m, n] = a[m, k] w[n, k]^T is column-major c^T[n, m] = w^T[n, k] a^T[k, m].
  const cudaDataType_t t = dtype_ == DType::kBF16 ? CUDA_R_16BF : CUDA_R_16F;
  const float alpha = 1.0f, beta = 0.0f;
  return CublasStatus(
      cublasGemmEx(state_->cublas, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(w.rows),
                   static_cast<int>(m), static_cast<int>(w.cols), &alpha, w.data(), t,
                   static_cast<int>(w.cols), a, t, static_cast<int>(lda), &beta, c, t,
                   static_cast<int>(w.rows), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
      absl::StrCat("GEMM ", m, "x", w.rows, "x", w.cols));
}

absl::Status CudaBackend::AddBias(void* x, int64_t stride, const Weight& bias, int64_t rows) {
  OpScope op_scope(*state_, stream_, "bias");
  PDS_CUDA(kc::AddBias(H(dtype_), x, stride, bias.data(), rows, bias.rows, stream_), "AddBias");
  return absl::OkStatus();
}

absl::Status CudaBackend::RmsNorm(const void* x, const Weight& w, void* out, int64_t rows,
                                  float eps) {
  OpScope op_scope(*state_, stream_, "rmsnorm");
  PDS_CUDA(kc::RmsNorm(H(dtype_), x, w.rows, w.data(), out, w.rows, rows, w.rows, eps, stream_),
           "RmsNorm");
  return absl::OkStatus();
}

absl::Status CudaBackend::AddRmsNorm(void* residual, const void* delta, const Weight& w, void* out,
                                     int64_t rows, float eps) {
  OpScope op_scope(*state_, stream_, "add+rmsnorm");
  PDS_CUDA(kc::AddRmsNorm(H(dtype_), residual, delta, w.data(), out, rows, w.rows, eps, stream_),
           "AddRmsNorm");
  return absl::OkStatus();
}

absl::Status CudaBackend::HeadRmsNorm(void* x, int64_t token_stride, const Weight& w,
                                      int64_t tokens, int64_t heads, float eps) {
  OpScope op_scope(*state_, stream_, "head rmsnorm");
  PDS_CUDA(
      kc::HeadRmsNorm(H(dtype_), x, token_stride, w.data(), tokens, heads, w.rows, eps, stream_),
      "HeadRmsNorm");
  return absl::OkStatus();
}

absl::Status CudaBackend::EnsureRopeTables(int64_t half, const float* inv_freq_host) {
  State& st = *state_;
  // Once per batch (not per layer): the tables, and the frequencies they are made from.
  if (st.rope_generation == st.generation && st.rope_key == inv_freq_host) {
    return absl::OkStatus();
  }
  State::RopeFreqs& inv = st.inv_freq[inv_freq_host];
  if (inv.device.ptr == nullptr || static_cast<int64_t>(inv.host.size()) != half ||
      !std::equal(inv.host.begin(), inv.host.end(), inv_freq_host)) {
    if (inv.device.ptr != nullptr) st.Drop();  // recorded graphs read the old copy
    PDS_RETURN_IF_ERROR(inv.device.Reserve(half * sizeof(float), "RoPE frequencies"));
    inv.host.assign(inv_freq_host, inv_freq_host + half);
    // On the compute stream (a plain cudaMemcpy would run on the legacy stream, unordered
    // with this non-blocking one); the source stays alive in `inv.host`.
    PDS_CUDA(cudaMemcpyAsync(inv.device.ptr, inv.host.data(), half * sizeof(float),
                             cudaMemcpyHostToDevice, stream_),
             "uploading RoPE frequencies");
  }
  const size_t bytes = static_cast<size_t>(st.num_tokens) * half * sizeof(float);
  PDS_RETURN_IF_ERROR(st.rope_cos.Reserve(bytes, "RoPE cos"));
  PDS_RETURN_IF_ERROR(st.rope_sin.Reserve(bytes, "RoPE sin"));
  PDS_CUDA(kc::RopeCosSin(st.positions, static_cast<const float*>(inv.device.ptr),
                          static_cast<float*>(st.rope_cos.ptr),
                          static_cast<float*>(st.rope_sin.ptr), st.num_tokens, half, stream_),
           "RopeCosSin");
  st.rope_generation = st.generation;
  st.rope_key = inv_freq_host;
  return absl::OkStatus();
}

absl::Status CudaBackend::Rope(void* q, void* k, int64_t token_stride, int64_t q_heads,
                               int64_t kv_heads, int64_t head_dim, const float* inv_freq_host) {
  OpScope op_scope(*state_, stream_, "rope");
  const State& st = *state_;
  const int64_t half = head_dim / 2;
  PDS_RETURN_IF_ERROR(EnsureRopeTables(half, inv_freq_host));
  PDS_CUDA(kc::ApplyRope(H(dtype_), q, k, token_stride, static_cast<const float*>(st.rope_cos.ptr),
                         static_cast<const float*>(st.rope_sin.ptr), st.num_tokens, q_heads,
                         kv_heads, half, stream_),
           "ApplyRope");
  return absl::OkStatus();
}

absl::Status CudaBackend::WriteKv(const void* k, const void* v, int64_t token_stride, void* k_cache,
                                  void* v_cache, int64_t kv_heads, int64_t head_dim) {
  OpScope op_scope(*state_, stream_, "write kv");
  const State& st = *state_;
  PDS_CUDA(kc::WriteKv(H(dtype_), k, v, token_stride, st.slots, st.num_tokens, k_cache, v_cache,
                       kv_heads, st.block_size, head_dim, stream_),
           "WriteKv");
  return absl::OkStatus();
}

absl::Status CudaBackend::RopeWriteKv(void* q, void* k, const void* v, int64_t token_stride,
                                      int64_t q_heads, int64_t kv_heads, int64_t head_dim,
                                      const float* inv_freq_host, void* k_cache, void* v_cache) {
  if (!kc::Settings().fuse_rope_kv) {
    return Backend::RopeWriteKv(q, k, v, token_stride, q_heads, kv_heads, head_dim, inv_freq_host,
                                k_cache, v_cache);
  }
  OpScope op_scope(*state_, stream_, "rope+write kv");
  const State& st = *state_;
  const int64_t half = head_dim / 2;
  PDS_RETURN_IF_ERROR(EnsureRopeTables(half, inv_freq_host));
  PDS_CUDA(
      kc::RopeWriteKv(H(dtype_), q, k, v, token_stride, static_cast<const float*>(st.rope_cos.ptr),
                      static_cast<const float*>(st.rope_sin.ptr), st.slots, st.num_tokens, q_heads,
                      kv_heads, half, k_cache, v_cache, st.block_size, stream_),
      "RopeWriteKv");
  return absl::OkStatus();
}

absl::Status CudaBackend::Attention(const void* q, int64_t q_stride, const void* k_cache,
                                    const void* v_cache, void* out, int64_t heads, int64_t kv_heads,
                                    int64_t head_dim, float scale) {
  OpScope op_scope(*state_, stream_, "attention");
  State& st = *state_;
  if (!kc::AttentionHeadDimSupported(head_dim)) {
    return absl::UnimplementedError(absl::StrCat(
        "cuda backend: attention supports head_dim 16, 32, 64, 128 and 256, not ", head_dim));
  }
  const size_t workspace = kc::PlanAttention(st.plan, st.num_seqs, heads, kv_heads, head_dim);
  PDS_RETURN_IF_ERROR(st.attention_workspace.Reserve(workspace, "the attention workspace"));
  kernels::PagedBatch pb;
  pb.num_seqs = st.num_seqs;
  pb.cu_q = st.cu_q;
  pb.kv_lens = st.kv_lens;
  pb.block_tables = st.block_tables;
  pb.max_blocks = st.max_blocks;
  pb.block_size = st.block_size;
  PDS_CUDA(
      kc::PagedAttention(H(dtype_), q, q_stride, k_cache, v_cache, pb, st.plan, out, heads,
                         kv_heads, head_dim, scale, st.attention_workspace.ptr, stream_,
                         static_cast<int32_t*>(st.split_counters.ptr), State::kSplitCounterSlots),
      absl::StrCat("PagedAttention (", heads, " heads, ", kv_heads, " kv heads, head_dim ",
                   head_dim, ")"));
  return absl::OkStatus();
}

absl::Status CudaBackend::SiluGate(const void* gate_up, void* out, int64_t tokens, int64_t inter) {
  OpScope op_scope(*state_, stream_, "silu gate");
  PDS_CUDA(kc::SiluGate(H(dtype_), gate_up, out, tokens, inter, stream_), "SiluGate");
  return absl::OkStatus();
}

absl::Status CudaBackend::Add(void* x, const void* y, int64_t n) {
  OpScope op_scope(*state_, stream_, "add");
  PDS_CUDA(kc::Add(H(dtype_), x, y, n, stream_), "Add");
  return absl::OkStatus();
}

absl::Status CudaBackend::GatherLastRows(const void* x, void* out, int64_t cols) {
  OpScope op_scope(*state_, stream_, "gather");
  const State& st = *state_;
  PDS_CUDA(kc::GatherRows(H(dtype_), x, st.last_rows, out, st.num_seqs, cols, stream_),
           "GatherLastRows");
  return absl::OkStatus();
}

absl::Status CudaBackend::ProjectLogits(const void* x, const Weight& lm_head, int64_t rows) {
  State& st = *state_;
  const bool gemv = rows <= st.gemv_max_rows &&
                    kc::GemvSupported(x, lm_head.cols, lm_head.data(), lm_head.cols, rows);
  OpScope op_scope(st, stream_, gemv ? "lm_head gemv" : "lm_head gemm");
  const size_t bytes = static_cast<size_t>(rows) * lm_head.rows * sizeof(float);
  PDS_RETURN_IF_ERROR(st.logits.Reserve(bytes, "logits"));
  if (gemv) {
    PDS_CUDA(kc::Gemv(H(dtype_), x, lm_head.cols, lm_head.data(), lm_head.rows, lm_head.cols,
                      st.logits.ptr, /*c_fp32=*/true, rows, stream_),
             absl::StrCat("logits GEMV ", rows, "x", lm_head.rows, "x", lm_head.cols));
    return absl::OkStatus();
  }
  const cudaDataType_t t = dtype_ == DType::kBF16 ? CUDA_R_16BF : CUDA_R_16F;
  const float alpha = 1.0f, beta = 0.0f;
  return CublasStatus(
      cublasGemmEx(st.cublas, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(lm_head.rows),
                   static_cast<int>(rows), static_cast<int>(lm_head.cols), &alpha, lm_head.data(),
                   t, static_cast<int>(lm_head.cols), x, t, static_cast<int>(lm_head.cols), &beta,
                   st.logits.ptr, CUDA_R_32F, static_cast<int>(lm_head.rows), CUBLAS_COMPUTE_32F,
                   CUBLAS_GEMM_DEFAULT),
      "logits GEMM");
}

absl::Status CudaBackend::Logits(const void* x, const Weight& lm_head, int64_t rows,
                                 float* host_logits) {
  State& st = *state_;
  const size_t bytes = static_cast<size_t>(rows) * lm_head.rows * sizeof(float);
  PDS_RETURN_IF_ERROR(ProjectLogits(x, lm_head, rows));
  PDS_RETURN_IF_ERROR(st.logits_host.Reserve(bytes, "logits"));
  PDS_CUDA(
      cudaMemcpyAsync(st.logits_host.ptr, st.logits.ptr, bytes, cudaMemcpyDeviceToHost, stream_),
      "copying logits to the host");
  PDS_CUDA(cudaStreamSynchronize(stream_), "forward pass");
  std::memcpy(host_logits, st.logits_host.ptr, bytes);
  return absl::OkStatus();
}

absl::Status CudaBackend::SampleTokens(const void* x, const Weight& lm_head, int64_t rows,
                                       const std::vector<kernels::RowSampling>& sampling,
                                       const std::vector<uint8_t>& host_rows, float* host_logits,
                                       int32_t* tokens) {
  State& st = *state_;
  const int64_t vocab = lm_head.rows;
  const size_t row_bytes = static_cast<size_t>(vocab) * sizeof(float);
  PDS_RETURN_IF_ERROR(ProjectLogits(x, lm_head, rows));
  PDS_RETURN_IF_ERROR(st.tokens.Reserve(rows * sizeof(int32_t), "sampled tokens"));
  OpScope op_scope(st, stream_, "sampling + copies");
  const auto* logits = static_cast<const float*>(st.logits.ptr);
  auto* ids = static_cast<int32_t*>(st.tokens.ptr);
  const bool all_greedy = std::all_of(sampling.begin(), sampling.end(),
                                      [](const kernels::RowSampling& s) { return s.greedy(); });
  // Pinned staging for the sampling parameters (the previous step's copy is complete: every
  // step ends with a stream synchronization).
  const size_t params_bytes = rows * sizeof(kernels::RowSampling);
  if (!all_greedy) {
    PDS_RETURN_IF_ERROR(st.sampling_host.Reserve(params_bytes, "sampling parameters"));
    PDS_RETURN_IF_ERROR(st.sampling.Reserve(params_bytes, "sampling parameters"));
    std::memcpy(st.sampling_host.ptr, sampling.data(), params_bytes);
    PDS_CUDA(cudaMemcpyAsync(st.sampling.ptr, st.sampling_host.ptr, params_bytes,
                             cudaMemcpyHostToDevice, stream_),
             "uploading sampling parameters");
    PDS_CUDA(
        kc::SampleRows(logits, rows, vocab,
                       static_cast<const kernels::RowSampling*>(st.sampling.ptr), ids, stream_),
        "SampleRows");
  } else {
    PDS_CUDA(kc::ArgmaxRows(logits, rows, vocab, ids, stream_), "ArgmaxRows");
  }
  // Pinned staging: the tokens first, then the rows asked for, packed.
  int64_t wanted = 0;
  for (int64_t r = 0; r < rows; ++r) wanted += host_rows[r] ? 1 : 0;
  const size_t ids_bytes = (rows * sizeof(int32_t) + 15) / 16 * 16;
  PDS_RETURN_IF_ERROR(st.logits_host.Reserve(ids_bytes + wanted * row_bytes, "logits"));
  auto* staging = static_cast<uint8_t*>(st.logits_host.ptr);
  PDS_CUDA(cudaMemcpyAsync(staging, ids, rows * sizeof(int32_t), cudaMemcpyDeviceToHost, stream_),
           "copying sampled tokens to the host");
  int64_t packed = 0;
  for (int64_t r = 0; r < rows; ++r) {
    if (!host_rows[r]) continue;
    // Consecutive wanted rows go in one copy.
    int64_t run = 1;
    while (r + run < rows && host_rows[r + run]) ++run;
    PDS_CUDA(cudaMemcpyAsync(staging + ids_bytes + packed * row_bytes,
                             static_cast<const uint8_t*>(st.logits.ptr) + r * row_bytes,
                             run * row_bytes, cudaMemcpyDeviceToHost, stream_),
             "copying logits to the host");
    packed += run;
    r += run - 1;
  }
  PDS_CUDA(cudaStreamSynchronize(stream_), "forward pass");
  std::memcpy(tokens, staging, rows * sizeof(int32_t));
  packed = 0;
  for (int64_t r = 0; r < rows; ++r) {
    if (!host_rows[r]) continue;
    std::memcpy(host_logits + r * vocab, staging + ids_bytes + packed * row_bytes, row_bytes);
    ++packed;
  }
  return absl::OkStatus();
}

}  // namespace pds::engine

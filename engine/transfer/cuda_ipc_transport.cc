#include "engine/transfer/cuda_ipc_transport.h"

#include <cuda_runtime_api.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <thread>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "engine/common/logging.h"
#include "engine/common/status_macros.h"
#include "kernels/cuda/ops.h"

namespace pds::engine {
namespace {

using transfer_internal::BlockRun;
using transfer_internal::CoalesceRuns;
using transfer_internal::DeviceOfferReply;
using transfer_internal::DevicePlaneKind;
using transfer_internal::Io;
using transfer_internal::Put;
using transfer_internal::Reader;
using transfer_internal::WithContext;

// Copies enqueued before a failure are still waited for this long past the deadline, so that
// they never land in blocks the receiver has freed.
constexpr absl::Duration kDrainGrace = absl::Seconds(10);

std::shared_ptr<spdlog::logger> Log() {
  static auto logger = Logger("transfer");
  return logger;
}

absl::Status Cuda(cudaError_t err, absl::string_view what) {
  if (err == cudaSuccess) return absl::OkStatus();
  return absl::InternalError(
      absl::StrCat(what, ": ", cudaGetErrorName(err), " (", cudaGetErrorString(err), ")"));
}

std::string HostName() {
  char name[256] = {};
  if (::gethostname(name, sizeof(name) - 1) != 0) return "?";
  return name;
}

// Batches of at most this many cudaMemcpyAsync calls (one per run of blocks consecutive on
// both sides, K and V, per layer) are copied that way; larger ones by one CopyBlocks launch.
constexpr size_t kMaxMemcpyCalls = 2;

// The copy rate (bytes copied per second) the waits assume where the device does not report
// its memory bandwidth: faster than current GPUs, so that the waits wake early, not late.
constexpr double kFallbackCopyRate = 5e12;

// An upper bound of what a device-to-device copy achieves on `device` (bytes copied per
// second): half its peak memory bandwidth (each byte is read and written).
double CopyRateBound(int device) {
  int clock_khz = 0, bus_bits = 0;
  if (cudaDeviceGetAttribute(&clock_khz, cudaDevAttrMemoryClockRate, device) != cudaSuccess ||
      cudaDeviceGetAttribute(&bus_bits, cudaDevAttrGlobalMemoryBusWidth, device) != cudaSuccess ||
      clock_khz <= 0 || bus_bits <= 0) {
    cudaGetLastError();  // not sticky; clear it
    return kFallbackCopyRate;
  }
  // Double data rate: two transfers per clock.
  const double peak = 2.0 * clock_khz * 1e3 * (bus_bits / 8.0);
  return peak / 2;
}

// absl::SleepFor overshoots by the kernel's timer slack (50 us by default): the waits sleep
// only until this long before the copies are expected to end, then poll without sleeping.
constexpr absl::Duration kWakeEarly = absl::Microseconds(120);

// Waits for every copy on `stream` until `deadline`: asleep until shortly before the copies are
// expected to end (`expected`), then polling cudaStreamQuery with only a yield between polls
// until `spin_until`, then with short naps (the copies take longer than expected: the GPU is
// busy with other work).
absl::Status WaitStream(cudaStream_t stream, absl::Time expected, absl::Time spin_until,
                        absl::Time deadline, const std::function<bool()>* cancelled = nullptr) {
  absl::Duration nap = absl::Microseconds(20);
  while (true) {
    const cudaError_t err = cudaStreamQuery(stream);
    if (err == cudaSuccess) return absl::OkStatus();
    if (err != cudaErrorNotReady) return Cuda(err, "copy stream");
    if (cancelled != nullptr && *cancelled && (*cancelled)()) {
      return absl::CancelledError("cancelled while the copies were in flight");
    }
    const absl::Time now = absl::Now();
    if (now >= deadline) {
      return absl::DeadlineExceededError("deadline exceeded waiting for the copies");
    }
    if (expected - now > kWakeEarly + absl::Microseconds(30)) {
      absl::SleepFor(std::min(expected - now, deadline - now) - kWakeEarly);
    } else if (now < spin_until) {
      std::this_thread::yield();
    } else {
      absl::SleepFor(std::min(nap, deadline - now));
      nap = std::min(nap * 2, absl::Microseconds(100));
    }
  }
}

// The receiver's export, in its offer replies: the IPC handle and the pool's geometry.
struct PoolExport {
  cudaIpcMemHandle_t handle{};
  KvPoolLayout geometry;  // data is not meaningful across processes
  int32_t pid = 0;
};

std::string EncodeExport(const PoolExport& e) {
  std::string out(reinterpret_cast<const char*>(&e.handle), sizeof(e.handle));
  Put(out, static_cast<uint64_t>(e.geometry.bytes));
  Put(out, static_cast<uint64_t>(e.geometry.pool_bytes));
  Put(out, static_cast<uint64_t>(e.geometry.block_bytes));
  Put(out, e.geometry.num_layers);
  Put(out, e.geometry.num_blocks);
  Put(out, static_cast<int32_t>(e.geometry.device));
  Put(out, e.pid);
  return out;
}

absl::StatusOr<PoolExport> DecodeExport(const std::string& data) {
  Reader reader(reinterpret_cast<const uint8_t*>(data.data()), data.size());
  PoolExport e;
  std::string handle;
  uint64_t bytes = 0, pool_bytes = 0, block_bytes = 0;
  int32_t device = 0;
  if (!reader.GetBytes(sizeof(e.handle), &handle) || !reader.Get(&bytes) ||
      !reader.Get(&pool_bytes) || !reader.Get(&block_bytes) ||
      !reader.Get(&e.geometry.num_layers) || !reader.Get(&e.geometry.num_blocks) ||
      !reader.Get(&device) || !reader.Get(&e.pid) || reader.left() != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("malformed cuda-ipc export of ", data.size(), " bytes"));
  }
  std::memcpy(&e.handle, handle.data(), sizeof(e.handle));
  e.geometry.bytes = bytes;
  e.geometry.pool_bytes = pool_bytes;
  e.geometry.block_bytes = block_bytes;
  e.geometry.device = device;
  return e;
}

// DEVICE_DONE_PENDING's plane data: the sender's event (recorded after the copies) and its
// id, unique in the sender's process (an event handle's bytes may repeat once the event is
// destroyed).
struct PendingEvent {
  cudaIpcEventHandle_t handle{};
  uint64_t id = 0;
};

std::string EncodePendingEvent(const PendingEvent& e) {
  std::string out(reinterpret_cast<const char*>(&e.handle), sizeof(e.handle));
  Put(out, e.id);
  return out;
}

absl::StatusOr<PendingEvent> DecodePendingEvent(const std::string& data) {
  Reader reader(reinterpret_cast<const uint8_t*>(data.data()), data.size());
  PendingEvent e;
  std::string handle;
  if (!reader.GetBytes(sizeof(e.handle), &handle) || !reader.Get(&e.id) || reader.left() != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("malformed cuda-ipc pending event of ", data.size(), " bytes"));
  }
  std::memcpy(&e.handle, handle.data(), sizeof(e.handle));
  return e;
}

// ---------------------------------------------------------------------------------------------
// Receiver.

// The senders' events a connection has opened, by id; closed with the connection.
class OpenedEvents final : public transfer_internal::ReceiverPlane::ConnectionState {
 public:
  explicit OpenedEvents(int device) : device_(device) {}
  ~OpenedEvents() override {
    if (events_.empty()) return;
    cudaSetDevice(device_);
    for (auto& [id, event] : events_) cudaEventDestroy(event);
  }

  absl::StatusOr<cudaEvent_t> Open(const PendingEvent& e) {
    auto it = events_.find(e.id);
    if (it != events_.end()) return it->second;
    PDS_RETURN_IF_ERROR(Cuda(cudaSetDevice(device_), absl::StrCat("cudaSetDevice(", device_, ")")));
    if (events_.size() >= kMaxEvents) {  // the oldest (lowest id) goes: the sender retired it
      cudaEventDestroy(events_.begin()->second);
      events_.erase(events_.begin());
    }
    cudaEvent_t event = nullptr;
    PDS_RETURN_IF_ERROR(Cuda(cudaIpcOpenEventHandle(&event, e.handle),
                             "cudaIpcOpenEventHandle of the sender's copy event"));
    events_[e.id] = event;
    return event;
  }

 private:
  // More than a sender's copy contexts in use at once.
  static constexpr size_t kMaxEvents = 32;
  const int device_;
  std::map<uint64_t, cudaEvent_t> events_;
};

class IpcReceiverPlane final : public transfer_internal::ReceiverPlane {
 public:
  static absl::StatusOr<std::shared_ptr<IpcReceiverPlane>> Create(const KvPoolLayout& pool) {
    PDS_RETURN_IF_ERROR(pool.Validate());
    if (pool.device < 0) {
      return absl::InvalidArgumentError("cuda-ipc kv receiver: the pool is not device memory");
    }
    PoolExport e;
    e.geometry = pool;
    e.pid = static_cast<int32_t>(::getpid());
    PDS_RETURN_IF_ERROR(
        Cuda(cudaSetDevice(pool.device),
             absl::StrCat("cuda-ipc kv receiver: cudaSetDevice(", pool.device, ")")));
    PDS_RETURN_IF_ERROR(Cuda(cudaIpcGetMemHandle(&e.handle, pool.data),
                             "cuda-ipc kv receiver: cudaIpcGetMemHandle of the KV cache (it must "
                             "be one cudaMalloc allocation)"));
    return std::shared_ptr<IpcReceiverPlane>(new IpcReceiverPlane(pool, EncodeExport(e)));
  }

  DevicePlaneKind kind() const override { return DevicePlaneKind::kCudaIpc; }

  absl::StatusOr<std::string> Accept(const KvTransferHeader& header,
                                     const std::string& offer_plane_data,
                                     const std::vector<int32_t>& blocks) override {
    if (offer_plane_data != host_) {
      return absl::FailedPreconditionError(
          absl::StrCat("cuda-ipc needs both workers on one host: the sender is on '",
                       offer_plane_data, "', this receiver on '", host_, "' (use nccl)"));
    }
    PDS_RETURN_IF_ERROR(pool_.Check(header, blocks));
    return export_;
  }

  absl::Status Receive(const Io&, const KvTransferHeader&, const std::string&,
                       const std::vector<int32_t>&, DoneRead* done) override {
    done->read = false;  // the sender writes the blocks itself, then sends DONE(_PENDING)
    return absl::OkStatus();
  }

  std::unique_ptr<ConnectionState> NewConnectionState() override {
    return std::make_unique<OpenedEvents>(pool_.device);
  }

  // The sender's event, recorded on its copy stream after the copies: complete once they are
  // (the event never completes after a failed copy: a fault stops the sender's context).
  absl::StatusOr<CompletionProbe> WatchPending(const std::string& plane_data,
                                               ConnectionState* state) override {
    auto* events = dynamic_cast<OpenedEvents*>(state);
    if (events == nullptr) return absl::InternalError("no cuda-ipc connection state");
    PDS_ASSIGN_OR_RETURN(const PendingEvent e, DecodePendingEvent(plane_data));
    PDS_ASSIGN_OR_RETURN(cudaEvent_t event, events->Open(e));
    return CompletionProbe([event]() -> absl::StatusOr<bool> {
      const cudaError_t err = cudaEventQuery(event);
      if (err == cudaSuccess) return true;
      if (err == cudaErrorNotReady) return false;
      return Cuda(err, "cudaEventQuery of the sender's copy event");
    });
  }

 private:
  IpcReceiverPlane(KvPoolLayout pool, std::string export_data)
      : pool_(pool), export_(std::move(export_data)), host_(HostName()) {}

  const KvPoolLayout pool_;
  const std::string export_;
  const std::string host_;
};

// ---------------------------------------------------------------------------------------------
// Sender.

// A receiver's pool opened in this process; closed when the last user lets go.
struct Mapping {
  ~Mapping() {
    if (base == nullptr) return;
    cudaError_t err = cudaSetDevice(device);
    if (err == cudaSuccess) err = cudaIpcCloseMemHandle(base);
    if (err != cudaSuccess) {
      Log()->warn("cuda-ipc kv sender: closing the mapping of {}: {}", address,
                  cudaGetErrorString(err));
    }
  }
  std::string address;
  std::string handle;  // the handle's bytes
  int device = 0;
  uint8_t* base = nullptr;
};

// One transfer's CUDA resources, reused by later transfers (a transfer holds it alone): the
// copy stream and the block lists for CopyBlocks, on the device and in pinned host memory
// (both grow-only; the device copy is stream-ordered on the context's own stream).
class CopyContext {
 public:
  explicit CopyContext(int device) : device_(device) {}
  CopyContext(const CopyContext&) = delete;
  CopyContext& operator=(const CopyContext&) = delete;
  ~CopyContext() {
    if (stream_ == nullptr) return;
    cudaSetDevice(device_);
    if (host_ != nullptr) {
      if (cudaStreamQuery(stream_) == cudaSuccess) {
        cudaFreeHost(host_);
      } else {  // an upload may still read it (copies that outlived their drain): leak it
        Log()->warn("cuda-ipc kv sender: copy stream still busy at exit; leaking {} bytes",
                    capacity_ * sizeof(int32_t));
      }
    }
    if (lists_ != nullptr) cudaFreeAsync(lists_, stream_);  // after the stream's work
    // Only an event no receiver may watch any more is still here (see TakeEvent).
    if (event_ != nullptr) cudaEventDestroy(event_);
    cudaStreamDestroy(stream_);  // its resources go once it is done
  }

  // Records the context's interprocess event on the stream (created on first use) and returns
  // what a receiver needs to watch it. The caller makes sure no receiver still watches its
  // previous record.
  absl::StatusOr<PendingEvent> RecordEvent() {
    if (event_ == nullptr) {
      PDS_RETURN_IF_ERROR(
          Cuda(cudaEventCreateWithFlags(&event_, cudaEventInterprocess | cudaEventDisableTiming),
               "cuda-ipc kv sender: creating an interprocess event"));
      const cudaError_t err = cudaIpcGetEventHandle(&event_handle_.handle, event_);
      if (err != cudaSuccess) {
        cudaEventDestroy(event_);
        event_ = nullptr;
        return Cuda(err, "cuda-ipc kv sender: cudaIpcGetEventHandle");
      }
      static std::atomic<uint64_t> next_id{1};
      event_handle_.id = next_id.fetch_add(1);
    }
    PDS_RETURN_IF_ERROR(
        Cuda(cudaEventRecord(event_, stream_), "cuda-ipc kv sender: recording the copy event"));
    return event_handle_;
  }
  // The event, which a receiver may still watch: the context records a new one next time.
  cudaEvent_t TakeEvent() { return std::exchange(event_, nullptr); }

  // Creates the stream and room for `capacity` block ids (both lists together).
  absl::Status Init(size_t capacity) {
    PDS_RETURN_IF_ERROR(Cuda(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking),
                             "cuda-ipc kv sender: creating a copy stream"));
    return Reserve(capacity);
  }
  cudaStream_t stream() const { return stream_; }

  // Enqueues the upload of both lists on the stream; the kernels after it on the stream read
  // them at lists() and lists() + src.size(). Once per transfer: the host buffer is rewritten
  // (the previous transfer's upload is done: its stream was drained).
  absl::Status Upload(const std::vector<int32_t>& src, const std::vector<int32_t>& dst) {
    const size_t n = src.size() + dst.size();
    PDS_RETURN_IF_ERROR(Reserve(n));
    std::copy(src.begin(), src.end(), host_);
    std::copy(dst.begin(), dst.end(), host_ + src.size());
    return Cuda(
        cudaMemcpyAsync(lists_, host_, n * sizeof(int32_t), cudaMemcpyHostToDevice, stream_),
        "cuda-ipc kv sender: uploading the block lists");
  }
  const int32_t* lists() const { return lists_; }

 private:
  // Grows both buffers to at least `n` ids (no upload of this transfer is in flight).
  absl::Status Reserve(size_t n) {
    if (n <= capacity_) return absl::OkStatus();
    size_t capacity = std::max<size_t>(capacity_, 4096);
    while (capacity < n) capacity *= 2;
    if (host_ != nullptr) cudaFreeHost(host_);
    host_ = nullptr;
    if (lists_ != nullptr) cudaFreeAsync(lists_, stream_);
    lists_ = nullptr;
    capacity_ = 0;
    const size_t bytes = capacity * sizeof(int32_t);
    PDS_RETURN_IF_ERROR(Cuda(cudaMallocHost(reinterpret_cast<void**>(&host_), bytes),
                             "cuda-ipc kv sender: pinned block-list buffer"));
    PDS_RETURN_IF_ERROR(Cuda(cudaMallocAsync(reinterpret_cast<void**>(&lists_), bytes, stream_),
                             "cuda-ipc kv sender: device block-list buffer"));
    capacity_ = capacity;
    return absl::OkStatus();
  }

  const int device_;
  cudaStream_t stream_ = nullptr;
  int32_t* host_ = nullptr;      // pinned
  int32_t* lists_ = nullptr;     // device
  size_t capacity_ = 0;          // int32s, of each buffer
  cudaEvent_t event_ = nullptr;  // interprocess; recorded after each transfer's copies
  PendingEvent event_handle_;
};

class IpcSenderPlane;

// Copies in flight after an early DONE (transfer_internal::PendingMove): the context's stream
// and event, and the receiver's mapping they write into.
class IpcPendingMove final : public transfer_internal::PendingMove {
 public:
  IpcPendingMove(IpcSenderPlane* plane, std::unique_ptr<CopyContext> context,
                 std::shared_ptr<Mapping> mapping, absl::Time expected, absl::Time spin_until,
                 absl::Time deadline, std::string what)
      : plane_(plane),
        context_(std::move(context)),
        mapping_(std::move(mapping)),
        expected_(expected),
        spin_until_(spin_until),
        deadline_(deadline),
        what_(std::move(what)) {}
  ~IpcPendingMove() override { Finish(false, absl::InfiniteFuture()); }

  CopyContext& context() { return *context_; }
  void set_event(const PendingEvent& event) {
    event_ = event;
    has_event_ = true;
  }

  std::string plane_data() const override { return EncodePendingEvent(event_); }
  absl::Time expected() const override { return expected_; }
  absl::Status Wait(const Io& io) override;
  absl::Status Drain() override;
  void Finish(bool receiver_answered, absl::Time receiver_limit) override;

 private:
  IpcSenderPlane* const plane_;
  std::unique_ptr<CopyContext> context_;  // null once finished
  const std::shared_ptr<Mapping> mapping_;
  const absl::Time expected_, spin_until_, deadline_;
  const std::string what_;  // request and receiver, for logs
  PendingEvent event_;
  bool has_event_ = false;
  bool idle_ = false;  // the stream is known to have no work left
};

class IpcSenderPlane final : public transfer_internal::SenderPlane {
 public:
  IpcSenderPlane(KvPoolLayout pool, bool early_done, CudaIpcSenderTestHooks hooks)
      : pool_(pool), host_(HostName()), early_done_(early_done), hooks_(std::move(hooks)) {}
  ~IpcSenderPlane() override {
    if (retired_.empty()) return;
    cudaSetDevice(pool_.device);
    for (const auto& [event, until] : retired_) cudaEventDestroy(event);
  }

  DevicePlaneKind kind() const override { return DevicePlaneKind::kCudaIpc; }

  // Creates the first copy context, so that the first transfer does not pay for it. Leaves
  // the calling thread's current device as it was.
  absl::Status Warm() {
    int previous = -1;
    PDS_RETURN_IF_ERROR(Cuda(cudaGetDevice(&previous), "cudaGetDevice"));
    PDS_RETURN_IF_ERROR(
        Cuda(cudaSetDevice(pool_.device), absl::StrCat("cudaSetDevice(", pool_.device, ")")));
    copy_rate_ = CopyRateBound(pool_.device);
    absl::StatusOr<std::unique_ptr<CopyContext>> context = Acquire();
    if (context.ok()) Release(*std::move(context), nullptr);
    cudaSetDevice(previous);
    return context.status();
  }

  absl::StatusOr<std::string> Prepare(const Io&, const std::string&) override { return host_; }

  // Without early DONE: the copies, waited for.
  absl::Status Move(const Io& io, const std::string& address, const KvTransferHeader& header,
                    KvSource& source, const std::vector<int32_t>& src_blocks,
                    const DeviceOfferReply& reply, const std::string& plane_data) override {
    return Start(io, address, header, source, src_blocks, reply, /*early=*/false).status();
  }

  absl::StatusOr<std::unique_ptr<transfer_internal::PendingMove>> MoveAsync(
      const Io& io, const std::string& address, const KvTransferHeader& header, KvSource& source,
      const std::vector<int32_t>& src_blocks, const DeviceOfferReply& reply,
      const std::string& plane_data) override {
    PDS_ASSIGN_OR_RETURN(std::unique_ptr<IpcPendingMove> pending,
                         Start(io, address, header, source, src_blocks, reply, early_done_));
    return std::unique_ptr<transfer_internal::PendingMove>(std::move(pending));
  }

 private:
  friend class IpcPendingMove;

  // Enqueues the copies; with `early`, records the context's event after them and returns them
  // in flight; otherwise (or where the event fails) waits for them and returns null.
  absl::StatusOr<std::unique_ptr<IpcPendingMove>> Start(const Io& io, const std::string& address,
                                                        const KvTransferHeader& header,
                                                        KvSource& source,
                                                        const std::vector<int32_t>& src_blocks,
                                                        const DeviceOfferReply& reply, bool early) {
    PDS_RETURN_IF_ERROR(WithContext(pool_.Check(header, src_blocks), "the sender's pool"));
    PDS_ASSIGN_OR_RETURN(const PoolExport remote, DecodeExport(reply.plane_data));
    PDS_RETURN_IF_ERROR(
        WithContext(remote.geometry.Check(header, reply.blocks), "the receiver's pool"));
    PDS_RETURN_IF_ERROR(
        Cuda(cudaSetDevice(pool_.device), absl::StrCat("cudaSetDevice(", pool_.device, ")")));
    PDS_ASSIGN_OR_RETURN(std::shared_ptr<Mapping> mapping, Open(address, remote));
    KvPoolLayout mapped = remote.geometry;
    mapped.data = mapping->base;
    PDS_RETURN_IF_ERROR(WithContext(mapped.Validate(), "the receiver's export"));
    PDS_ASSIGN_OR_RETURN(std::unique_ptr<CopyContext> context, Acquire());

    Batches batches;
    absl::Status status =
        EnqueueLayers(io, header, source, src_blocks, reply.blocks, mapped, *context, &batches);
    if (!batches.enqueued) {
      Release(std::move(context), nullptr);
      if (status.ok()) return nullptr;  // nothing to copy
      return status;
    }
    // Copies in flight: waited for before reporting either way, past the deadline if need
    // be, so that they never land in blocks the receiver has freed after an error.
    const absl::Time expected = batches.expected;
    const absl::Time spin_until =
        expected + std::max(absl::Microseconds(300), expected - batches.first);
    auto pending = std::make_unique<IpcPendingMove>(
        this, std::move(context), std::move(mapping), expected, spin_until, io.deadline,
        absl::StrCat("request '", header.request_id, "' to ", address));
    if (status.ok() && early) {
      if (hooks_.before_record) hooks_.before_record(pending->context().stream());
      absl::StatusOr<PendingEvent> recorded = pending->context().RecordEvent();
      if (recorded.ok()) {
        pending->set_event(*recorded);
        return pending;
      }
      Log()->warn("cuda-ipc kv sender: {}: no early DONE: {}", address,
                  recorded.status().ToString());
    }
    if (status.ok()) {
      Io quiet = io;
      quiet.cancelled = nullptr;  // as before early DONE: enqueued copies are waited for
      status = pending->Wait(quiet);
    }
    if (!status.ok()) pending->Drain().IgnoreError();
    pending->Finish(/*receiver_answered=*/true, absl::Now());  // no event was shown to anyone
    if (!status.ok()) return status;
    return nullptr;
  }

  // Keeps an event a receiver may watch until `until` (then destroyed by Acquire).
  void Retire(cudaEvent_t event, absl::Time until) {
    if (event == nullptr) return;
    std::lock_guard<std::mutex> lock(contexts_mu_);
    retired_.emplace_back(event, until);
  }

  // What EnqueueLayers enqueued.
  struct Batches {
    bool enqueued = false;  // some copy is in flight
    int count = 0;          // batches (launch groups)
    absl::Time first;       // when the first batch was enqueued
    absl::Time expected;    // when the copies are expected to end at copy_rate_ (not before)
  };

  // After source.WaitLayer(l), extends the batch over the following layers the source has
  // ready and enqueues their copies at once: one CopyBlocks launch, or a cudaMemcpyAsync per
  // run where that takes at most kMaxMemcpyCalls calls.
  absl::Status EnqueueLayers(const Io& io, const KvTransferHeader& header, KvSource& source,
                             const std::vector<int32_t>& src_blocks,
                             const std::vector<int32_t>& dst_blocks, const KvPoolLayout& remote,
                             CopyContext& context, Batches* batches) {
    const int32_t layers = header.num_layers;
    const std::vector<BlockRun> runs = CoalesceRuns(src_blocks, dst_blocks);
    const auto* local = static_cast<const uint8_t*>(pool_.data);
    auto* base = static_cast<uint8_t*>(remote.data);
    const size_t bb = pool_.block_bytes;
    const size_t layer_bytes = 2 * src_blocks.size() * bb;
    const auto cancelled = [&] {
      return io.cancelled != nullptr && *io.cancelled && (*io.cancelled)();
    };
    bool uploaded = false;
    for (int32_t begin = 0; begin < layers;) {
      int32_t end = begin;
      while (end < layers) {
        const auto where = [&] { return absl::StrCat("layer ", end, " of ", layers); };
        if (cancelled()) return absl::CancelledError(absl::StrCat("cancelled before ", where()));
        if (absl::Now() >= io.deadline) {
          return absl::DeadlineExceededError(absl::StrCat("deadline exceeded before ", where()));
        }
        if (end > begin && !source.LayerReady(end)) break;
        PDS_RETURN_IF_ERROR(
            WithContext(source.WaitLayer(end), absl::StrCat("source failed to produce ", where())));
        ++end;
      }
      const size_t memcpy_calls = runs.size() * 2 * static_cast<size_t>(end - begin);
      if (memcpy_calls <= kMaxMemcpyCalls) {
        for (int32_t layer = begin; layer < end; ++layer) {
          for (int kv = 0; kv < 2; ++kv) {
            for (const BlockRun& run : runs) {
              PDS_RETURN_IF_ERROR(
                  Cuda(cudaMemcpyAsync(base + remote.Offset(layer, kv, run.dst),
                                       local + pool_.Offset(layer, kv, run.src),
                                       static_cast<size_t>(run.count) * bb,
                                       cudaMemcpyDeviceToDevice, context.stream()),
                       absl::StrCat("cudaMemcpyAsync of layer ", layer, " of ", layers)));
              batches->enqueued = true;
            }
          }
        }
      } else {
        if (!uploaded) {
          PDS_RETURN_IF_ERROR(context.Upload(src_blocks, dst_blocks));
          uploaded = true;
        }
        const auto count = static_cast<int32_t>(src_blocks.size());
        PDS_RETURN_IF_ERROR(
            Cuda(kernels::cuda::CopyBlocks(local, pool_.pool_bytes, base, remote.pool_bytes,
                                           context.lists(), context.lists() + count, count, begin,
                                           end, bb, context.stream()),
                 absl::StrCat("block copy kernel of layers [", begin, ", ", end, ") of ", layers)));
        batches->enqueued = true;
      }
      const absl::Time now = absl::Now();
      const size_t bytes = static_cast<size_t>(end - begin) * layer_bytes;
      if (batches->count++ == 0) batches->first = batches->expected = now;
      batches->expected =
          std::max(batches->expected, now) + absl::Seconds(static_cast<double>(bytes) / copy_rate_);
      begin = end;
    }
    return absl::OkStatus();
  }

  // An idle copy context (reused, or new).
  absl::StatusOr<std::unique_ptr<CopyContext>> Acquire() {
    std::vector<Draining> done;  // destroyed outside the lock
    {
      std::lock_guard<std::mutex> lock(contexts_mu_);
      // Retired events no receiver watches any more.
      const absl::Time now = absl::Now();
      for (auto it = retired_.begin(); it != retired_.end();) {
        if (now < it->second) {
          ++it;
          continue;
        }
        cudaEventDestroy(it->first);
        it = retired_.erase(it);
      }
      // Contexts whose copies outlived a failed transfer's drain return once their stream is
      // idle (or are destroyed when it failed).
      for (auto it = draining_.begin(); it != draining_.end();) {
        const cudaError_t err = cudaStreamQuery(it->context->stream());
        if (err == cudaErrorNotReady) {
          ++it;
          continue;
        }
        if (err == cudaSuccess && idle_.size() < kMaxIdleContexts) {
          idle_.push_back(std::move(it->context));
        }
        done.push_back(std::move(*it));
        it = draining_.erase(it);
      }
      if (!idle_.empty()) {
        std::unique_ptr<CopyContext> context = std::move(idle_.back());
        idle_.pop_back();
        return context;
      }
    }
    // Room for the lists of a transfer of every block of the pool: none grows later.
    auto context = std::make_unique<CopyContext>(pool_.device);
    PDS_RETURN_IF_ERROR(context->Init(2 * static_cast<size_t>(pool_.num_blocks)));
    return context;
  }

  // Returns a context. `in_use`: the mapping its stream may still be copying into (copies that
  // outlived their drain), kept open until the stream is idle; null: the stream is idle.
  void Release(std::unique_ptr<CopyContext> context, std::shared_ptr<Mapping> in_use) {
    std::unique_ptr<CopyContext> surplus;  // destroyed outside the lock
    std::lock_guard<std::mutex> lock(contexts_mu_);
    if (in_use != nullptr) {
      draining_.push_back(Draining{std::move(in_use), std::move(context)});
    } else if (idle_.size() < kMaxIdleContexts) {
      idle_.push_back(std::move(context));
    } else {
      surplus = std::move(context);
    }
  }

 private:
  absl::StatusOr<std::shared_ptr<Mapping>> Open(const std::string& address,
                                                const PoolExport& remote) {
    const std::string handle(reinterpret_cast<const char*>(&remote.handle), sizeof(remote.handle));
    std::lock_guard<std::mutex> lock(mu_);
    auto it = mappings_.find(address);
    if (it != mappings_.end() && it->second->handle == handle) return it->second;
    auto mapping = std::make_shared<Mapping>();
    mapping->address = address;
    mapping->handle = handle;
    mapping->device = pool_.device;
    void* base = nullptr;
    PDS_RETURN_IF_ERROR(
        Cuda(cudaIpcOpenMemHandle(&base, remote.handle, cudaIpcMemLazyEnablePeerAccess),
             absl::StrCat("cudaIpcOpenMemHandle of the KV cache of ", address, " (pid ", remote.pid,
                          ", device ", remote.geometry.device, ") on device ", pool_.device)));
    mapping->base = static_cast<uint8_t*>(base);
    // A new handle from the same address (a restarted receiver) replaces the old mapping; it is
    // closed once transfers still using it let go.
    mappings_[address] = mapping;
    Log()->info("cuda-ipc kv sender: mapped the KV cache of {} (pid {}, {} bytes)", address,
                remote.pid, remote.geometry.bytes);
    return mapping;
  }

  // Copy contexts kept for later transfers (more are created while transfers run at once).
  static constexpr size_t kMaxIdleContexts = 8;

  struct Draining {
    // The copies' destination, open until they are done (declared first: destroyed last).
    std::shared_ptr<Mapping> mapping;
    std::unique_ptr<CopyContext> context;
  };

  const KvPoolLayout pool_;
  const std::string host_;
  std::mutex mu_;
  std::map<std::string, std::shared_ptr<Mapping>> mappings_;  // by address; guarded by mu_
  std::mutex contexts_mu_;
  std::vector<std::unique_ptr<CopyContext>> idle_;  // guarded by contexts_mu_
  std::vector<Draining> draining_;                  // guarded by contexts_mu_
  // Events a receiver may still watch, with when it stops at the latest; guarded by
  // contexts_mu_.
  std::vector<std::pair<cudaEvent_t, absl::Time>> retired_;
  double copy_rate_ = kFallbackCopyRate;  // set by Warm: an upper bound, bytes copied per second
  const bool early_done_;
  const CudaIpcSenderTestHooks hooks_;
};

absl::Status IpcPendingMove::Wait(const Io& io) {
  if (plane_->hooks_.after_pending) {
    absl::Status injected = plane_->hooks_.after_pending();
    if (!injected.ok()) return WithContext(injected, "copy stream");
  }
  absl::Status status =
      WaitStream(context_->stream(), expected_, spin_until_, io.deadline, io.cancelled);
  idle_ = status.ok();
  return status;
}

absl::Status IpcPendingMove::Drain() {
  if (idle_) return absl::OkStatus();
  absl::Status drained = WaitStream(context_->stream(), expected_, spin_until_,
                                    std::max(deadline_, absl::Now()) + kDrainGrace);
  idle_ = drained.ok();
  if (!drained.ok()) {
    Log()->error("cuda-ipc kv sender: {}: copies still in flight after the failure: {}", what_,
                 drained.ToString());
  }
  return drained;
}

void IpcPendingMove::Finish(bool receiver_answered, absl::Time receiver_limit) {
  if (context_ == nullptr) return;
  // A receiver that may still watch the event: the event is not recorded again before then.
  if (has_event_ && !receiver_answered) plane_->Retire(context_->TakeEvent(), receiver_limit);
  plane_->Release(std::move(context_), idle_ ? nullptr : mapping_);
}

}  // namespace

absl::StatusOr<std::unique_ptr<KvSender>> CreateCudaIpcKvSender(KvPoolLayout pool,
                                                                DeviceKvTransportOptions options) {
  return CreateCudaIpcKvSenderForTest(pool, std::move(options), {});
}

absl::StatusOr<std::unique_ptr<KvSender>> CreateCudaIpcKvSenderForTest(
    KvPoolLayout pool, DeviceKvTransportOptions options, CudaIpcSenderTestHooks hooks) {
  PDS_RETURN_IF_ERROR(pool.Validate());
  if (pool.device < 0) {
    return absl::InvalidArgumentError("cuda-ipc kv sender: the pool is not device memory");
  }
  auto plane = std::make_shared<IpcSenderPlane>(pool, options.early_done, std::move(hooks));
  PDS_RETURN_IF_ERROR(WithContext(plane->Warm(), "cuda-ipc kv sender"));
  return transfer_internal::CreateDeviceKvSender(std::move(plane), std::move(options));
}

absl::StatusOr<std::unique_ptr<KvReceiver>> StartCudaIpcKvReceiver(
    const std::string& host, int port, KvSink* sink, KvPoolLayout pool,
    DeviceKvTransportOptions options) {
  PDS_ASSIGN_OR_RETURN(std::shared_ptr<IpcReceiverPlane> plane, IpcReceiverPlane::Create(pool));
  return transfer_internal::StartDeviceKvReceiver(host, port, sink, std::move(plane),
                                                  std::move(options));
}

}  // namespace pds::engine

#include "engine/transfer/cuda_ipc_transport.h"

#include <cuda_runtime_api.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <map>
#include <mutex>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "engine/common/logging.h"
#include "engine/common/status_macros.h"
#include "kernels/cuda/ops.h"

namespace pds::engine {
namespace {

// Above this many runs of consecutive blocks a transfer copies through the block-list kernel.
constexpr size_t kMaxCopyRuns = 8;

// Source and destination block ids in device memory for kernels::cuda::CopyBlocks; freed
// after the stream's work (stream-ordered allocation).
class DeviceBlockLists {
 public:
  ~DeviceBlockLists() {
    if (data_ != nullptr) cudaFreeAsync(data_, stream_);
  }
  absl::Status Upload(const std::vector<int32_t>& src, const std::vector<int32_t>& dst,
                      cudaStream_t stream) {
    stream_ = stream;
    n_ = src.size();
    host_.assign(src.begin(), src.end());
    host_.insert(host_.end(), dst.begin(), dst.end());
    const size_t bytes = host_.size() * sizeof(int32_t);
    cudaError_t e = cudaMallocAsync(reinterpret_cast<void**>(&data_), bytes, stream);
    if (e == cudaSuccess) {
      e = cudaMemcpyAsync(data_, host_.data(), bytes, cudaMemcpyHostToDevice, stream);
    }
    if (e != cudaSuccess) {
      return absl::InternalError(
          absl::StrCat("cuda-ipc kv sender: uploading block lists: ", cudaGetErrorString(e)));
    }
    return absl::OkStatus();
  }
  const int32_t* src() const { return data_; }
  const int32_t* dst() const { return data_ + n_; }

 private:
  std::vector<int32_t> host_;  // kept until the destructor: the copy reads it asynchronously
  int32_t* data_ = nullptr;
  size_t n_ = 0;
  cudaStream_t stream_ = nullptr;
};

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

// Waits for every copy on `stream`, polling so the wait has a deadline.
absl::Status WaitStream(cudaStream_t stream, absl::Time deadline) {
  absl::Duration nap = absl::Microseconds(20);
  while (true) {
    const cudaError_t err = cudaStreamQuery(stream);
    if (err == cudaSuccess) return absl::OkStatus();
    if (err != cudaErrorNotReady) return Cuda(err, "copy stream");
    if (absl::Now() >= deadline) {
      return absl::DeadlineExceededError("deadline exceeded waiting for the copies");
    }
    absl::SleepFor(nap);
    nap = std::min(nap * 2, absl::Microseconds(50));  // short: copies take ~0.1-2 ms
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

// ---------------------------------------------------------------------------------------------
// Receiver.

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
                       const std::vector<int32_t>&, bool* done_read) override {
    *done_read = false;  // the sender writes the blocks itself, then sends DONE
    return absl::OkStatus();
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

class CudaStream {
 public:
  ~CudaStream() {
    if (stream_ != nullptr) cudaStreamDestroy(stream_);  // resources go once its work is done
  }
  absl::Status Create() {
    return Cuda(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking),
                "creating the copy stream");
  }
  cudaStream_t get() const { return stream_; }

 private:
  cudaStream_t stream_ = nullptr;
};

class IpcSenderPlane final : public transfer_internal::SenderPlane {
 public:
  explicit IpcSenderPlane(KvPoolLayout pool) : pool_(pool), host_(HostName()) {}

  DevicePlaneKind kind() const override { return DevicePlaneKind::kCudaIpc; }

  absl::StatusOr<std::string> Prepare(const Io&, const std::string&) override { return host_; }

  absl::Status Move(const Io& io, const std::string& address, const KvTransferHeader& header,
                    KvSource& source, const std::vector<int32_t>& src_blocks,
                    const DeviceOfferReply& reply, const std::string&) override {
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
    CudaStream stream;
    PDS_RETURN_IF_ERROR(stream.Create());

    const std::vector<BlockRun> runs = CoalesceRuns(src_blocks, reply.blocks);
    const auto* local = static_cast<const uint8_t*>(pool_.data);
    const size_t bb = pool_.block_bytes;
    const auto cancelled = [&] {
      return io.cancelled != nullptr && *io.cancelled && (*io.cancelled)();
    };
    bool enqueued = false;
    absl::Status status;
    // Many runs (differently paged caches): the block lists go to the device and a kernel
    // copies each layer in one launch; few runs: one cudaMemcpyAsync per run.
    const bool gather = runs.size() > kMaxCopyRuns;
    DeviceBlockLists lists;
    if (gather) {
      PDS_RETURN_IF_ERROR(lists.Upload(src_blocks, reply.blocks, stream.get()));
    }
    for (int32_t layer = 0; layer < header.num_layers && status.ok(); ++layer) {
      const std::string where = absl::StrCat("layer ", layer, " of ", header.num_layers);
      if (cancelled()) {
        status = absl::CancelledError(absl::StrCat("cancelled before ", where));
        break;
      }
      if (absl::Now() >= io.deadline) {
        status = absl::DeadlineExceededError(absl::StrCat("deadline exceeded before ", where));
        break;
      }
      status =
          WithContext(source.WaitLayer(layer), absl::StrCat("source failed to produce ", where));
      if (status.ok() && gather) {
        // Scattered blocks: one kernel copies the layer's K and V blocks.
        status = Cuda(kernels::cuda::CopyBlocks(
                          local, pool_.pool_bytes, mapping->base, remote.geometry.pool_bytes,
                          lists.src(), lists.dst(), static_cast<int32_t>(src_blocks.size()), layer,
                          layer + 1, bb, stream.get()),
                      absl::StrCat("block copy kernel of ", where));
        enqueued = enqueued || status.ok();
        continue;
      }
      for (int kv = 0; kv < 2 && status.ok(); ++kv) {
        for (const BlockRun& run : runs) {
          status = Cuda(cudaMemcpyAsync(mapping->base + remote.geometry.Offset(layer, kv, run.dst),
                                        local + pool_.Offset(layer, kv, run.src),
                                        static_cast<size_t>(run.count) * bb,
                                        cudaMemcpyDeviceToDevice, stream.get()),
                        absl::StrCat("cudaMemcpyAsync of ", where));
          if (!status.ok()) break;
          enqueued = true;
        }
      }
    }
    if (!enqueued) return status;
    // Copies in flight: wait for them before reporting either way.
    const absl::Time limit =
        status.ok() ? io.deadline : std::max(io.deadline, absl::Now()) + kDrainGrace;
    absl::Status drained = WaitStream(stream.get(), limit);
    if (!drained.ok() && !status.ok()) {
      Log()->error(
          "cuda-ipc kv sender: request '{}' to {}: copies still in flight after the "
          "failure ({}): {}",
          header.request_id, address, status.ToString(), drained.ToString());
    }
    return status.ok() ? drained : status;
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

  const KvPoolLayout pool_;
  const std::string host_;
  std::mutex mu_;
  std::map<std::string, std::shared_ptr<Mapping>> mappings_;  // by address; guarded by mu_
};

}  // namespace

absl::StatusOr<std::unique_ptr<KvSender>> CreateCudaIpcKvSender(KvPoolLayout pool,
                                                                DeviceKvTransportOptions options) {
  PDS_RETURN_IF_ERROR(pool.Validate());
  if (pool.device < 0) {
    return absl::InvalidArgumentError("cuda-ipc kv sender: the pool is not device memory");
  }
  return transfer_internal::CreateDeviceKvSender(std::make_shared<IpcSenderPlane>(pool),
                                                 std::move(options));
}

absl::StatusOr<std::unique_ptr<KvReceiver>> StartCudaIpcKvReceiver(
    const std::string& host, int port, KvSink* sink, KvPoolLayout pool,
    DeviceKvTransportOptions options) {
  PDS_ASSIGN_OR_RETURN(std::shared_ptr<IpcReceiverPlane> plane, IpcReceiverPlane::Create(pool));
  return transfer_internal::StartDeviceKvReceiver(host, port, sink, std::move(plane),
                                                  std::move(options));
}

}  // namespace pds::engine

// CommDevice over NCCL on one CUDA device (nccl_transport.h). Communicators are nonblocking
// (ncclConfig_t::blocking = 0) so that every wait — joining, a group's launch, the stream — is
// polled against a deadline and can be abandoned with ncclCommAbort.
#include <cuda_runtime_api.h>
#include <nccl.h>

#include <algorithm>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "engine/common/status_macros.h"
#include "engine/transfer/nccl_transport.h"

namespace pds::engine {
namespace {

absl::Status Cuda(cudaError_t err, absl::string_view what) {
  if (err == cudaSuccess) return absl::OkStatus();
  return absl::InternalError(
      absl::StrCat(what, ": ", cudaGetErrorName(err), " (", cudaGetErrorString(err), ")"));
}

absl::Status Nccl(ncclResult_t result, absl::string_view what, ncclComm_t comm = nullptr) {
  if (result == ncclSuccess || result == ncclInProgress) return absl::OkStatus();
  std::string detail = ncclGetErrorString(result);
  if (comm != nullptr) {
    const char* last = ncclGetLastError(comm);
    if (last != nullptr && *last != '\0') absl::StrAppend(&detail, ": ", last);
  }
  const absl::StatusCode code = result == ncclRemoteError || result == ncclSystemError
                                    ? absl::StatusCode::kUnavailable
                                    : absl::StatusCode::kInternal;
  return absl::Status(code, absl::StrCat(what, ": ", detail));
}

// Polls the communicator until its pending operation (init, group end) is no longer in
// progress, or `deadline`.
absl::Status PollComm(ncclComm_t comm, absl::Time deadline, absl::string_view what) {
  absl::Duration nap = absl::Microseconds(20);
  while (true) {
    ncclResult_t state = ncclSuccess;
    PDS_RETURN_IF_ERROR(Nccl(ncclCommGetAsyncError(comm, &state), what, comm));
    if (state == ncclSuccess) return absl::OkStatus();
    if (state != ncclInProgress) return Nccl(state, what, comm);
    if (absl::Now() >= deadline) {
      return absl::DeadlineExceededError(absl::StrCat(what, ": deadline exceeded"));
    }
    absl::SleepFor(nap);
    nap = std::min(nap * 2, absl::Milliseconds(1));
  }
}

class NcclCommunicator final : public Communicator {
 public:
  NcclCommunicator(ncclComm_t comm, int device, int rank, int size)
      : comm_(comm), device_(device), rank_(rank), size_(size) {}
  ~NcclCommunicator() override {
    if (comm_ != nullptr) {
      cudaSetDevice(device_);
      ncclCommAbort(comm_);  // frees it; never blocks on a peer
    }
  }

  int rank() const override { return rank_; }
  int size() const override { return size_; }

  absl::Status GroupStart() override { return Nccl(ncclGroupStart(), "ncclGroupStart"); }

  absl::Status GroupEnd(absl::Time deadline) override {
    PDS_RETURN_IF_ERROR(Live());
    PDS_RETURN_IF_ERROR(Nccl(ncclGroupEnd(), "ncclGroupEnd", comm_));
    return PollComm(comm_, deadline, "ncclGroupEnd");
  }

  absl::Status Send(const void* data, size_t bytes, int peer, StreamHandle stream) override {
    PDS_RETURN_IF_ERROR(Live());
    PDS_RETURN_IF_ERROR(Cuda(cudaSetDevice(device_), "cudaSetDevice"));
    return Nccl(ncclSend(data, bytes, ncclUint8, peer, comm_, static_cast<cudaStream_t>(stream)),
                absl::StrCat("ncclSend of ", bytes, " bytes to rank ", peer), comm_);
  }

  absl::Status Recv(void* data, size_t bytes, int peer, StreamHandle stream) override {
    PDS_RETURN_IF_ERROR(Live());
    PDS_RETURN_IF_ERROR(Cuda(cudaSetDevice(device_), "cudaSetDevice"));
    return Nccl(ncclRecv(data, bytes, ncclUint8, peer, comm_, static_cast<cudaStream_t>(stream)),
                absl::StrCat("ncclRecv of ", bytes, " bytes from rank ", peer), comm_);
  }

  absl::Status Wait(StreamHandle stream, absl::Time deadline,
                    const std::function<bool()>& stop) override {
    PDS_RETURN_IF_ERROR(Live());
    absl::Duration nap = absl::Microseconds(20);
    while (true) {
      const cudaError_t err = cudaStreamQuery(static_cast<cudaStream_t>(stream));
      ncclResult_t state = ncclSuccess;
      PDS_RETURN_IF_ERROR(Nccl(ncclCommGetAsyncError(comm_, &state), "ncclCommGetAsyncError"));
      if (state != ncclSuccess && state != ncclInProgress) {
        return Nccl(state, "asynchronous NCCL error", comm_);
      }
      if (err == cudaSuccess) return absl::OkStatus();
      if (err != cudaErrorNotReady) return Cuda(err, "the communication stream");
      if (absl::Now() >= deadline) {
        return absl::DeadlineExceededError("deadline exceeded waiting for the peer");
      }
      if (stop && stop()) return absl::CancelledError("stopped waiting for the peer");
      absl::SleepFor(nap);
      nap = std::min(nap * 2, absl::Milliseconds(1));
    }
  }

  void Abort() override {
    if (comm_ == nullptr) return;
    cudaSetDevice(device_);
    ncclCommAbort(comm_);
    comm_ = nullptr;
  }

 private:
  absl::Status Live() const {
    if (comm_ == nullptr) return absl::FailedPreconditionError("the communicator was aborted");
    return absl::OkStatus();
  }

  ncclComm_t comm_;
  const int device_;
  const int rank_;
  const int size_;
};

class NcclCommDevice final : public CommDevice {
 public:
  explicit NcclCommDevice(int device) : device_(device) {}

  std::string name() const override { return absl::StrCat("NCCL on CUDA device ", device_); }

  absl::StatusOr<std::string> NewUniqueId() override {
    ncclUniqueId id;
    PDS_RETURN_IF_ERROR(Nccl(ncclGetUniqueId(&id), "ncclGetUniqueId"));
    return std::string(id.internal, sizeof(id.internal));
  }

  absl::StatusOr<std::unique_ptr<Communicator>> Join(const std::string& unique_id, int nranks,
                                                     int rank, absl::Time deadline) override {
    ncclUniqueId id;
    if (unique_id.size() != sizeof(id.internal)) {
      return absl::InvalidArgumentError(absl::StrCat("an NCCL unique id has ", sizeof(id.internal),
                                                     " bytes, got ", unique_id.size()));
    }
    std::memcpy(id.internal, unique_id.data(), sizeof(id.internal));
    PDS_RETURN_IF_ERROR(Cuda(cudaSetDevice(device_), absl::StrCat("cudaSetDevice(", device_, ")")));
    ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
    config.blocking = 0;
    ncclComm_t comm = nullptr;
    const std::string what = absl::StrCat("ncclCommInitRankConfig (rank ", rank, " of ", nranks,
                                          ", device ", device_, ")");
    absl::Status status = Nccl(ncclCommInitRankConfig(&comm, nranks, id, rank, &config), what);
    if (status.ok()) status = PollComm(comm, deadline, what);
    if (!status.ok()) {
      if (comm != nullptr) ncclCommAbort(comm);
      return status;
    }
    return std::unique_ptr<Communicator>(
        std::make_unique<NcclCommunicator>(comm, device_, rank, nranks));
  }

  absl::StatusOr<StreamHandle> CreateStream() override {
    PDS_RETURN_IF_ERROR(Cuda(cudaSetDevice(device_), "cudaSetDevice"));
    cudaStream_t stream = nullptr;
    PDS_RETURN_IF_ERROR(Cuda(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking),
                             "creating the communication stream"));
    return static_cast<StreamHandle>(stream);
  }

  void DestroyStream(StreamHandle stream) override {
    cudaSetDevice(device_);
    cudaStreamDestroy(static_cast<cudaStream_t>(stream));
  }

  absl::StatusOr<DeviceBuffer> Allocate(size_t bytes) override {
    PDS_RETURN_IF_ERROR(Cuda(cudaSetDevice(device_), "cudaSetDevice"));
    void* data = nullptr;
    PDS_RETURN_IF_ERROR(Cuda(cudaMalloc(&data, bytes),
                             absl::StrCat("cudaMalloc of a ", bytes, "-byte staging buffer")));
    const int device = device_;
    return DeviceBuffer(data, bytes, [device](void* p) {
      cudaSetDevice(device);
      cudaFree(p);
    });
  }

  absl::Status CopyAsync(void* dst, const void* src, size_t bytes, StreamHandle stream) override {
    PDS_RETURN_IF_ERROR(Cuda(cudaSetDevice(device_), "cudaSetDevice"));
    return Cuda(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice,
                                static_cast<cudaStream_t>(stream)),
                absl::StrCat("cudaMemcpyAsync of ", bytes, " bytes"));
  }

 private:
  const int device_;
};

}  // namespace

absl::StatusOr<std::shared_ptr<CommDevice>> CreateNcclCommDevice(int device) {
  int count = 0;
  PDS_RETURN_IF_ERROR(Cuda(cudaGetDeviceCount(&count), "cudaGetDeviceCount"));
  if (device < 0 || device >= count) {
    return absl::InvalidArgumentError(
        absl::StrCat("CUDA device ", device, " out of range (", count, " devices)"));
  }
  return std::shared_ptr<CommDevice>(std::make_shared<NcclCommDevice>(device));
}

}  // namespace pds::engine

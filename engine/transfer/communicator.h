// Point-to-point device communication for the NCCL KV transport (nccl_transport.h), behind a
// small interface so that its protocol runs without GPUs: NCCL implements it on a CUDA device
// (CreateNcclCommDevice, built with CUDA and NCCL), FakeCommWorld (fake_communicator.h) in one
// process on host memory.
#pragma once

#include <cstddef>
#include <functional>
#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "engine/backend/backend.h"

namespace pds::engine {

// An ordered queue of device work (a cudaStream_t for NCCL, opaque here).
using StreamHandle = void*;

// One member of a communicator. Operations are enqueued on a stream and run in its order; one
// thread at a time may use a communicator.
class Communicator {
 public:
  virtual ~Communicator() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;
  // Operations between GroupStart and GroupEnd are issued together (NCCL's group semantics:
  // sends and receives to one peer match in order).
  virtual absl::Status GroupStart() = 0;
  virtual absl::Status GroupEnd(absl::Time deadline) = 0;
  virtual absl::Status Send(const void* data, size_t bytes, int peer, StreamHandle stream) = 0;
  virtual absl::Status Recv(void* data, size_t bytes, int peer, StreamHandle stream) = 0;
  // Waits until everything enqueued on `stream` completed. Fails with the communicator's
  // asynchronous error, DEADLINE_EXCEEDED past `deadline`, CANCELLED once `stop` (polled, may
  // be empty) returns true; after a failure the communicator must be aborted.
  virtual absl::Status Wait(StreamHandle stream, absl::Time deadline,
                            const std::function<bool()>& stop) = 0;
  // Breaks off outstanding operations; the communicator is unusable afterwards.
  virtual void Abort() = 0;
};

// The device a communicator runs on: bootstrap, streams, memory and copies.
class CommDevice {
 public:
  virtual ~CommDevice() = default;
  virtual std::string name() const = 0;
  // A fresh communicator id for Join, to be passed to every rank (opaque bytes).
  virtual absl::StatusOr<std::string> NewUniqueId() = 0;
  // Joins communicator `unique_id` as `rank` of `nranks`; returns once every rank joined, fails
  // past `deadline`.
  virtual absl::StatusOr<std::unique_ptr<Communicator>> Join(const std::string& unique_id,
                                                             int nranks, int rank,
                                                             absl::Time deadline) = 0;
  virtual absl::StatusOr<StreamHandle> CreateStream() = 0;
  virtual void DestroyStream(StreamHandle stream) = 0;
  virtual absl::StatusOr<DeviceBuffer> Allocate(size_t bytes) = 0;
  // Enqueues a copy between two buffers of this device's memory on `stream`.
  virtual absl::Status CopyAsync(void* dst, const void* src, size_t bytes, StreamHandle stream) = 0;
};

}  // namespace pds::engine

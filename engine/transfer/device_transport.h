// Internal to engine/transfer: the control protocol the device KV transports share (CUDA IPC
// and NCCL), with the data movement left to a "plane". One TCP control connection per
// transfer, tcp_wire frames (socket_io.h), the KvSender/KvReceiver contract of kv_transport.h:
//
//   sender                                    receiver
//   [DEVICE_SETUP (plane)           ──►       plane (NCCL, once per peer):
//                                   ◄──       DEVICE_SETUP_REPLY (OK: joining)
//    both join the communicator; ◄──          DEVICE_SETUP_REPLY (status)]
//   DEVICE_OFFER (plane, plane data, header)  sink->Reserve, sink->ReservedBlocks
//                                   ◄──       DEVICE_OFFER_REPLY (status, block ids, plane data)
//   [RESOURCE_EXHAUSTED: back off 2 ms doubling to 50 ms, offer again on the same connection]
//   plane: moves every layer into the receiver's blocks and waits until they are complete
//   (IPC: copies into the mapped pool; NCCL: DEVICE_START / DEVICE_START_REPLY, then one send
//   per layer)
//   DEVICE_DONE (status)            ──►       sink->Complete(status)
//                                   ◄──       DONE_REPLY (status)
//
// The receiver answers any frame it cannot use with an error reply and closes; a reserved
// transfer that breaks off (error, DONE with an error, connection lost, idle timeout,
// shutdown) completes the sink with the error. A sender that fails after the reservation sends
// DONE(error) before closing.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "engine/transfer/kv_transport.h"
#include "engine/transfer/socket_io.h"

namespace pds::engine {

// Options of the device KV transports (cuda_ipc_transport.h, nccl_transport.h).
struct DeviceKvTransportOptions {
  int socket_buffer_bytes = 256 << 10;  // control connections carry only small frames
  // Receiver: a connection that makes no progress for this long is dropped; also bounds a
  // receiver's wait for the data of one transfer.
  absl::Duration idle_timeout = absl::Seconds(30);
  int max_connections = 64;
  // Sender: back-off between offers answered RESOURCE_EXHAUSTED, doubling up to the cap.
  absl::Duration initial_backoff = absl::Milliseconds(2);
  absl::Duration max_backoff = absl::Milliseconds(50);
  // NCCL: joining a communicator with a new peer (both sides).
  absl::Duration setup_timeout = absl::Seconds(60);
};

}  // namespace pds::engine

namespace pds::engine::transfer_internal {

using DeviceTransportOptions = DeviceKvTransportOptions;

enum class DevicePlaneKind : uint8_t { kCudaIpc = 1, kNccl = 2 };
absl::string_view DevicePlaneName(DevicePlaneKind kind);

struct DeviceOffer {
  DevicePlaneKind plane = DevicePlaneKind::kCudaIpc;
  std::string plane_data;
  KvTransferHeader header;
};
struct DeviceOfferReply {
  absl::Status status;
  std::vector<int32_t> blocks;  // the receiver's, in block-table order (OK only)
  std::string plane_data;
};

// DEVICE_OFFER payload: u8 plane, u32 plane data length, plane data, the OFFER encoding.
std::string EncodeDeviceOffer(const DeviceOffer& offer);
absl::StatusOr<DeviceOffer> DecodeDeviceOffer(const ControlFrame& frame);
// DEVICE_OFFER_REPLY payload: u32 status length, the status encoding, u32 block count, i32
// blocks, u32 plane data length, plane data.
std::string EncodeDeviceOfferReply(const DeviceOfferReply& reply);
absl::StatusOr<DeviceOfferReply> DecodeDeviceOfferReply(const ControlFrame& frame);
// The status a reply or DONE frame carries (the outer StatusOr fails on a malformed frame).
absl::StatusOr<absl::Status> DecodeStatusFrame(const ControlFrame& frame);
// OK for DEVICE_DONE(OK); the carried error ("the sender broke off: ..."), or a protocol error.
absl::Status CheckDone(const ControlFrame& frame);
// Whether the receiver's shutdown has been signalled on io.wake_fd.
bool Woken(const Io& io);

// The sending side's data movement.
class SenderPlane {
 public:
  virtual ~SenderPlane() = default;
  virtual DevicePlaneKind kind() const = 0;
  // Before the first offer on a new connection to `address` (may exchange SETUP frames on
  // `io`); returns the plane data of the offers.
  virtual absl::StatusOr<std::string> Prepare(const Io& io, const std::string& address) = 0;
  // Moves every layer of `src_blocks` (the source's) into `reply.blocks` (the receiver's) and
  // returns once the data is complete in the receiver's memory. `stop` is the caller's cancel
  // flag (polled between steps; CANCELLED). Bounded by io.deadline.
  virtual absl::Status Move(const Io& io, const std::string& address,
                            const KvTransferHeader& header, KvSource& source,
                            const std::vector<int32_t>& src_blocks, const DeviceOfferReply& reply,
                            const std::string& plane_data) = 0;
};

// The receiving side's data movement. Called from connection threads, concurrently.
class ReceiverPlane {
 public:
  virtual ~ReceiverPlane() = default;
  virtual DevicePlaneKind kind() const = 0;
  // A DEVICE_SETUP frame (answers it on `io` with DEVICE_SETUP_REPLY). Default: refused.
  virtual absl::Status Setup(const Io& io, const ControlFrame& frame);
  // For a reserved offer: checks the offer's plane data and returns the reply's.
  virtual absl::StatusOr<std::string> Accept(const KvTransferHeader& header,
                                             const std::string& offer_plane_data,
                                             const std::vector<int32_t>& blocks) = 0;
  // After the OK reply: receives the data into `blocks`, or returns at once where the sender
  // writes it itself (IPC). Must fail (not block) when the sender sends DONE(error) instead.
  // Where it read the sender's DONE(OK) itself, it sets *done_read.
  virtual absl::Status Receive(const Io& io, const KvTransferHeader& header,
                               const std::string& offer_plane_data,
                               const std::vector<int32_t>& blocks, bool* done_read) = 0;
};

// Send is thread-safe; the plane must be too.
std::unique_ptr<KvSender> CreateDeviceKvSender(std::shared_ptr<SenderPlane> plane,
                                               DeviceTransportOptions options);
absl::StatusOr<std::unique_ptr<KvReceiver>> StartDeviceKvReceiver(
    const std::string& host, int port, KvSink* sink, std::shared_ptr<ReceiverPlane> plane,
    DeviceTransportOptions options);

// Runs of consecutive blocks in both lists: (src start, dst start, count), in order; one copy
// each.
struct BlockRun {
  int32_t src = 0;
  int32_t dst = 0;
  int32_t count = 0;
};
std::vector<BlockRun> CoalesceRuns(const std::vector<int32_t>& src,
                                   const std::vector<int32_t>& dst);

}  // namespace pds::engine::transfer_internal

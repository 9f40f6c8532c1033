// Internal to engine/transfer: the control protocol the device KV transports share (CUDA IPC
// and NCCL), with the data movement left to a "plane". One TCP control connection per
// transfer, tcp_wire frames (socket_io.h), the KvSender/KvReceiver contract of kv_transport.h:
//
//   sender                                    receiver
//   [DEVICE_SETUP (plane)           ──►       plane (NCCL, once per peer):
//                                   ◄──       DEVICE_SETUP_REPLY (OK: joining)
//    both join the communicator; ◄──          DEVICE_SETUP_REPLY (status)]
//   DEVICE_OFFER (plane, plane data, header)  sink->Reserve, sink->ReservedBlocks
//                                   ◄──       DEVICE_OFFER_REPLY (status, held blocks, block
//                                             ids, plane data)
//   [RESOURCE_EXHAUSTED: back off 2 ms doubling to 50 ms, offer again on the same connection]
//   plane: moves every layer of the blocks after the held ones (kv_transport.h) into the
//   receiver's blocks and waits until they are complete
//   (IPC without early DONE: copies into the mapped pool; NCCL: DEVICE_START /
//   DEVICE_START_REPLY, then one send per layer)
//   DEVICE_DONE (status, token)     ──►       sink->Complete(status, token)
//                                   ◄──       DONE_REPLY (status)
//   [the next transfer to the same receiver: DEVICE_OFFER on the same connection]
//
// DEVICE_DONE and DEVICE_DONE_PENDING carry the next token of a header with kNextTokenAtEnd
// (the sender asks its source for it once every layer is moved or started; a source error is
// sent as DEVICE_DONE(error) once nothing is in flight), -1 otherwise.
//
// Early DONE (planes whose receiver can watch the data's completion itself; IPC: an
// interprocess CUDA event recorded after the copies), instead of the wait and DEVICE_DONE:
//
//   sender                                    receiver
//   plane: enqueues the copies, records the event
//   DEVICE_DONE_PENDING (plane data: event;   watches the event and the connection, until
//     expected copy time, verdict budget) ──► min(idle_timeout, budget + 1 s):
//   waits for its own copies (stream)         event complete, nothing more received:
//                                               sink->Complete(OK)
//                                   ◄──       DONE_REPLY (OK)
//   DEVICE_DONE (OK) [the verdict]  ──►       reads the verdict (an error verdict now comes too
//                                             late: logged, the connection ends)
//   copies failed, cancelled, deadline:
//   DEVICE_ABORT (status)           ──►       stops watching the event (never accepts now)
//   waits until no copy is in flight (up to the deadline + a grace period)
//   DEVICE_DONE (error)             ──►       sink->Complete(error)
//                                   ◄──       DONE_REPLY (error)
//
// A DEVICE_DONE (verdict) that arrives before the event completes decides, as without early
// DONE (so a receiver that cannot open the event just waits for it). The receiver thus reports
// success only when the sender's copies are complete (the event follows every copy on the
// sender's stream) and the sender has not aborted; it frees the blocks of a failed transfer
// only after the sender's final DEVICE_DONE (no copy in flight), after its own limit (a
// stalled sender) or when the connection is lost (a crashed one). The sender reports success
// only when its own copies completed without error and the receiver confirmed; when its abort
// came too late (the receiver confirmed first) and its copies did complete, the transfer
// succeeded on both sides and it reports that. The sender re-records (reuses) an event only
// after the receiver answered on that connection, i.e. stopped watching it; otherwise the
// event is retired until the receiver's limit has passed.
//
// Connections are kept alive: after a transfer the receiver waits for the next frame on the
// same connection (closing it quietly after idle_timeout without one), and the sender keeps a
// few connections per receiver that finished a transfer cleanly, so later transfers skip the
// connect and the receiver's thread start. A kept connection the receiver has closed meanwhile
// is noticed before its reuse (readable: EOF) or, in a race, by the failure of its first offer,
// which is then repeated once on a fresh connection. Every other failure closes the connection.
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
  // Receiver: connections served at once (kept-alive idle ones included; see
  // max_idle_connections).
  int max_connections = 64;
  // Sender: connections kept open per receiver after a clean transfer, for the next transfers
  // to it (0: a new connection per transfer). Each holds one of the receiver's
  // max_connections while it is idle.
  int max_idle_connections = 4;
  // Sender: a kept connection unused for this long (or for half of idle_timeout, if shorter:
  // the receiver drops idle connections after idle_timeout) is closed instead of reused.
  absl::Duration keepalive = absl::Seconds(10);
  // Sender: back-off between offers answered RESOURCE_EXHAUSTED, doubling up to the cap.
  absl::Duration initial_backoff = absl::Milliseconds(2);
  absl::Duration max_backoff = absl::Milliseconds(50);
  // NCCL: joining a communicator with a new peer (both sides).
  absl::Duration setup_timeout = absl::Seconds(60);
  // IPC sender: early DONE (see device_transport.h): DONE is sent as soon as the copies are
  // enqueued and the receiver waits for them itself (an interprocess event). false: the sender
  // waits for its copies before DONE.
  bool early_done = true;
  // Both sides: a wait for a control frame expected within microseconds (an offer reply, a
  // confirmation, the DONE after an offer reply, the next offer on a kept connection) polls the
  // connection without sleeping (yielding) for up to this long before it blocks, so that a
  // reply in that time does not pay for waking a sleeping thread (and an idle CPU). 0: block
  // at once.
  absl::Duration spin = absl::Microseconds(100);
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
  // OK only: the leading blocks of the sequence the receiver already holds (not moved), and
  // the receiver's blocks for the rest, in block-table order.
  int32_t held_blocks = 0;
  std::vector<int32_t> blocks;
  std::string plane_data;
};

// DEVICE_OFFER payload: u8 plane, u32 plane data length, plane data, the OFFER encoding.
std::string EncodeDeviceOffer(const DeviceOffer& offer);
absl::StatusOr<DeviceOffer> DecodeDeviceOffer(const ControlFrame& frame);
// DEVICE_OFFER_REPLY payload: u32 status length, the status encoding, i32 held blocks, u32
// block count, i32 blocks, u32 plane data length, plane data.
std::string EncodeDeviceOfferReply(const DeviceOfferReply& reply);
absl::StatusOr<DeviceOfferReply> DecodeDeviceOfferReply(const ControlFrame& frame);
// The status a reply or DONE frame carries (the outer StatusOr fails on a malformed frame).
absl::StatusOr<tcp_wire::PeerStatus> DecodeStatusFrame(const ControlFrame& frame);
// DEVICE_DONE payload: tcp_wire::EncodeEnd.
std::string EncodeDone(const absl::Status& status, int32_t next_token = -1);
// OK for DEVICE_DONE(OK) (its token in *next_token, when given); the carried error ("the sender
// broke off: ..."), or a protocol error.
absl::Status CheckDone(const ControlFrame& frame, int32_t* next_token = nullptr);

// DEVICE_DONE_PENDING: the copies are enqueued; the receiver may watch their completion with
// `plane_data` (IPC: the event) and gets the sender's verdict (DEVICE_DONE, or DEVICE_ABORT and
// then DEVICE_DONE) within `budget`.
struct DevicePending {
  std::string plane_data;
  absl::Duration expected = absl::ZeroDuration();  // the copies should end in this long
  absl::Duration budget = absl::ZeroDuration();    // the sender's time left (its deadline)
  int32_t next_token = -1;                         // kNextTokenAtEnd transfers: the token
};
// Payload: u32 plane data length, plane data, i64 expected (us), i64 budget (us), i32 token.
std::string EncodeDevicePending(const DevicePending& pending);
absl::StatusOr<DevicePending> DecodeDevicePending(const ControlFrame& frame);

// Polls io.fd for readability without sleeping (yielding the CPU between polls) for up to
// `spin`; true when readable (or hung up). The blocking read that follows then finds the
// frame at once.
bool SpinUntilReadable(const Io& io, absl::Duration spin);
// Whether the receiver's shutdown has been signalled on io.wake_fd.
bool Woken(const Io& io);

// A data movement that SenderPlane::MoveAsync started and the receiver may watch itself (early
// DONE): every call from the transfer's thread, Finish last.
class PendingMove {
 public:
  virtual ~PendingMove() = default;
  // DEVICE_DONE_PENDING's plane data (IPC: the event's handle).
  virtual std::string plane_data() const = 0;
  // When the data is expected to be complete (not before).
  virtual absl::Time expected() const = 0;
  // Waits until the data is complete in the receiver's memory (OK), or failed (the error),
  // io.cancelled (CANCELLED), io.deadline (DEADLINE_EXCEEDED). Leaves failed copies in flight.
  virtual absl::Status Wait(const Io& io) = 0;
  // After a Wait that was not OK: waits until no data movement is in flight any more (past
  // io's deadline, for a bounded grace period), so that none lands in blocks the receiver
  // frees after the verdict. OK: none is.
  virtual absl::Status Drain() = 0;
  // Releases the resources. `receiver_answered`: the receiver has stopped watching (it sent
  // its DONE_REPLY); otherwise what it may watch is not reused before `receiver_limit`.
  virtual void Finish(bool receiver_answered, absl::Time receiver_limit) = 0;
};

// The sending side's data movement.
class SenderPlane {
 public:
  virtual ~SenderPlane() = default;
  virtual DevicePlaneKind kind() const = 0;
  // Before the first offer on a new connection to `address` (may exchange SETUP frames on
  // `io`); returns the plane data of the offers.
  virtual absl::StatusOr<std::string> Prepare(const Io& io, const std::string& address) = 0;
  // The receiver at `address` refused offers with this plane data as unknown (ABORTED: it
  // restarted, or dropped the setup after a failure): forget it, so that the next Prepare sets
  // up again. Default: nothing (planes without per-receiver state).
  virtual void Forget(const std::string& address, const std::string& plane_data) {}
  // Moves every layer of `src_blocks` (the source's) into `reply.blocks` (the receiver's) and
  // returns once the data is complete in the receiver's memory. `stop` is the caller's cancel
  // flag (polled between steps; CANCELLED). Bounded by io.deadline.
  virtual absl::Status Move(const Io& io, const std::string& address,
                            const KvTransferHeader& header, KvSource& source,
                            const std::vector<int32_t>& src_blocks, const DeviceOfferReply& reply,
                            const std::string& plane_data) = 0;
  // Early DONE: like Move, but may return as soon as the data movement is started and the
  // receiver can watch its completion (a PendingMove; the sender then sends DONE_PENDING), or
  // null once the data is complete (as Move). An error: nothing is in flight any more. Default:
  // Move.
  virtual absl::StatusOr<std::unique_ptr<PendingMove>> MoveAsync(
      const Io& io, const std::string& address, const KvTransferHeader& header, KvSource& source,
      const std::vector<int32_t>& src_blocks, const DeviceOfferReply& reply,
      const std::string& plane_data) {
    absl::Status moved = Move(io, address, header, source, src_blocks, reply, plane_data);
    if (!moved.ok()) return moved;
    return nullptr;
  }
};

// The receiving side's data movement. Called from connection threads, concurrently.
class ReceiverPlane {
 public:
  virtual ~ReceiverPlane() = default;
  virtual DevicePlaneKind kind() const = 0;
  // A DEVICE_SETUP frame (answers it on `io` with DEVICE_SETUP_REPLY). Default: refused.
  virtual absl::Status Setup(const Io& io, const ControlFrame& frame);
  // Before anything is reserved for an offer: OK, or ABORTED when the plane data names a setup
  // this receiver does not have (the sender forgets it, sets up again on the same connection
  // and offers again). Default: OK.
  virtual absl::Status Precheck(const std::string& offer_plane_data) { return absl::OkStatus(); }
  // For a reserved offer: checks the offer's plane data and returns the reply's.
  virtual absl::StatusOr<std::string> Accept(const KvTransferHeader& header,
                                             const std::string& offer_plane_data,
                                             const std::vector<int32_t>& blocks) = 0;
  // After the OK reply: receives the data into `blocks`, or returns at once where the sender
  // writes it itself (IPC). Must fail (not block) when the sender sends DONE(error) instead.
  // Where it read the sender's DONE(OK) itself, it fills *done.
  struct DoneRead {
    bool read = false;
    int32_t next_token = -1;  // DONE's token
  };
  virtual absl::Status Receive(const Io& io, const KvTransferHeader& header,
                               const std::string& offer_plane_data,
                               const std::vector<int32_t>& blocks, DoneRead* done) = 0;

  // What the plane keeps for one connection (IPC: the sender's events, opened), destroyed when
  // the connection ends, on its thread.
  class ConnectionState {
   public:
    virtual ~ConnectionState() = default;
  };
  virtual std::unique_ptr<ConnectionState> NewConnectionState() { return nullptr; }
  // Tells without blocking whether the data of a DEVICE_DONE_PENDING is complete: true,
  // false (not yet), or an error (it cannot tell: the receiver waits for the sender's verdict).
  using CompletionProbe = std::function<absl::StatusOr<bool>()>;
  // The probe for DEVICE_DONE_PENDING's plane data, valid while `state` is. Default:
  // UNIMPLEMENTED (the receiver waits for the sender's verdict).
  virtual absl::StatusOr<CompletionProbe> WatchPending(const std::string& plane_data,
                                                       ConnectionState* state);
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

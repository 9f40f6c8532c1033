// The host TCP KV transport (kv_transport.h) for CPU workers.
//
// One TCP connection per transfer (TCP_NODELAY). Everything on the wire is a frame: a fixed
// 24-byte little-endian header {magic u32, version u16, type u16, payload length u64,
// checksum u64 of the payload} and the payload. The length is checked against a limit before
// anything is allocated and the checksum (a 64-bit word-at-a-time hash, tcp_wire::Checksum)
// is verified before a payload is used; a bad magic, version, type, length or checksum closes
// the connection with an error (the sink gets Complete(error) if it had reserved).
//
//   sender                               receiver
//   OFFER (the header)           ──►     sink->Reserve
//                                ◄──     OFFER_REPLY (status; OK: the held blocks)
//   [RESOURCE_EXHAUSTED: back off 2 ms doubling to 50 ms, OFFER again on the same connection]
//   LAYER 0 .. num_layers-1      ──►     sink->WriteLayer (in order, exact size: the packed
//                                        blocks after the held ones)
//   [header.next_token == kNextTokenAtEnd:
//    END (status, the next token) ──►    an error status breaks the transfer off]
//                                ◄──     DONE_REPLY (status; the sink's Complete has run)
//
// The receiver may also send OFFER_REPLY / DONE_REPLY early with an error (a protocol error,
// a failed WriteLayer, shutdown); the sender watches for it while it streams layers.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <ostream>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "engine/transfer/kv_transport.h"

namespace pds::engine {

struct TcpTransportOptions {
  // Largest frame payload either side accepts, checked before allocating. A LAYER payload is
  // 8 bytes (layer index, reserved) plus LayerBytes, so the default fits a 1 GiB layer.
  uint64_t max_frame_bytes = (uint64_t{1} << 30) + 4096;
  // Receiver: a connection that makes no progress for this long is dropped.
  absl::Duration idle_timeout = absl::Seconds(30);
  // Receiver: connections served at once; one beyond gets OFFER_REPLY(UNAVAILABLE) and is
  // closed.
  int max_connections = 64;
  // SO_SNDBUF/SO_RCVBUF of every socket. Set with SO_*BUFFORCE where permitted, else with
  // SO_*BUF when net.core.[rw]mem_max allows it, else left to the kernel's autotuning (which
  // grows to net.ipv4.tcp_[rw]mem's maximum; a capped fixed size would be smaller). 0: always
  // autotune.
  int socket_buffer_bytes = 4 << 20;
  // Sender: back-off between offers answered RESOURCE_EXHAUSTED, doubling up to the cap.
  absl::Duration initial_backoff = absl::Milliseconds(2);
  absl::Duration max_backoff = absl::Milliseconds(50);
};

// A sender; Send is thread-safe (each call uses its own connection and buffer). Errors:
// UNAVAILABLE (cannot connect, connection lost), DEADLINE_EXCEEDED, CANCELLED, the receiver's
// refusal as it sent it (e.g. NOT_FOUND), the source's error, DATA_LOSS / INVALID_ARGUMENT for
// protocol errors; each message names the address and request id (and layer where one is).
std::unique_ptr<KvSender> CreateTcpKvSender(TcpTransportOptions options = {});

// Listens on host:port (port 0: an ephemeral port; address() then names the bound port) and
// serves each connection on its own thread, storing into `sink` (not owned, must outlive the
// receiver). bytes_received() counts packed K/V bytes of verified LAYER frames. Shutdown waits
// for sink calls in progress to return, so a sink must not call it from its own callbacks.
absl::StatusOr<std::unique_ptr<KvReceiver>> StartTcpKvReceiver(const std::string& host, int port,
                                                               KvSink* sink,
                                                               TcpTransportOptions options = {});

// The wire format, exposed for tests and tools that speak it directly.
namespace tcp_wire {

inline constexpr uint32_t kMagic = 0x564b4450;  // "PDKV" in little-endian byte order
// 2: END, and DEVICE_DONE carries a token; 3: offer replies name the receiver's held blocks.
inline constexpr uint16_t kVersion = 3;
inline constexpr size_t kFrameHeaderBytes = 24;
inline constexpr size_t kLayerPrefixBytes = 8;           // i32 layer index, u32 reserved (0)
inline constexpr uint64_t kMaxControlPayload = 1 << 16;  // OFFER and replies

enum class FrameType : uint16_t {
  kOffer = 1,
  kOfferReply = 2,
  kLayer = 3,
  kDoneReply = 4,
  // The device transports' control connections (device_transport.h); a TCP receiver refuses
  // them as unexpected.
  kDeviceOffer = 5,
  kDeviceOfferReply = 6,
  kDeviceStart = 7,
  kDeviceDone = 8,
  kDeviceSetup = 9,
  kDeviceSetupReply = 10,
  kDeviceStartReply = 11,
  kDeviceDonePending = 12,  // IPC: copies enqueued, complete when the sender's event is
  kDeviceAbort = 13,        // the sender broke off after DEVICE_DONE_PENDING
  kEnd = 14,                // after the last LAYER when the token comes at the end
  kLast = kEnd,
};

struct FrameHeader {
  FrameType type = FrameType::kOffer;
  uint64_t length = 0;
  uint64_t checksum = 0;
};

// 64-bit hash of `bytes` bytes, 8-byte words over four independent lanes (the XXH64
// construction); any single-bit change changes it. Streaming form: ChecksumState.
uint64_t Checksum(const void* data, size_t bytes);

class ChecksumState {
 public:
  ChecksumState();
  void Update(const void* data, size_t bytes);
  uint64_t Finish() const;

 private:
  uint64_t lanes_[4];
  uint8_t pending_[32];
  size_t pending_bytes_ = 0;
  uint64_t total_ = 0;
};

// The 24 header bytes of a frame whose payload has this length and checksum.
std::string EncodeFrameHeader(FrameType type, uint64_t length, uint64_t checksum);
// Header + payload with its checksum.
std::string EncodeFrame(FrameType type, const std::string& payload);
// Parses and checks magic, version, type and length <= max_payload (INVALID_ARGUMENT).
absl::StatusOr<FrameHeader> ParseFrameHeader(const uint8_t* bytes, uint64_t max_payload);

// OFFER payload: u32 id length, id bytes, i32 num_tokens, num_layers, num_blocks, kv_heads,
// block_size, head_dim, next_token, u8 dtype. Decoding checks the layout, not the values (Validate
// does).
std::string EncodeOffer(const KvTransferHeader& header);
absl::StatusOr<KvTransferHeader> DecodeOffer(const uint8_t* data, size_t bytes);
// A status a peer sent (a reply, DONE), as a value: absl::StatusOr<absl::Status> would take
// every error meant for the StatusOr itself (a read failure, a malformed payload) as its value.
// absl::StatusOr<PeerStatus> keeps them apart and converts to absl::StatusOr<absl::Status>
// with errors kept as errors.
class PeerStatus {
 public:
  explicit PeerStatus(absl::Status status) : status_(std::move(status)) {}
  bool ok() const { return status_.ok(); }
  absl::StatusCode code() const { return status_.code(); }
  absl::string_view message() const { return status_.message(); }
  operator const absl::Status&() const { return status_; }  // NOLINT: a status, by design
  friend std::ostream& operator<<(std::ostream& os, const PeerStatus& s) { return os << s.status_; }

 private:
  absl::Status status_;
};

// OFFER_REPLY / DONE_REPLY payload: u32 status code, u32 message length, message bytes.
std::string EncodeStatus(const absl::Status& status);
// Fails on a malformed payload; otherwise the status carried.
absl::StatusOr<PeerStatus> DecodeStatus(const uint8_t* data, size_t bytes);

// An OFFER_REPLY: the receiver's answer and, when OK, how many leading blocks of the sequence
// it already holds (the sender moves only the rest; KvTransferHeader::CheckHeld).
struct OfferReply {
  absl::Status status;
  int32_t held_blocks = 0;
};
// Payload: the status encoding, then (OK only) i32 held_blocks.
std::string EncodeOfferReply(const OfferReply& reply);
// Fails on a malformed payload or a negative count.
absl::StatusOr<OfferReply> DecodeOfferReply(const uint8_t* data, size_t bytes);

// The end of a sender's side of a transfer: END, and the device transports' DEVICE_DONE.
struct TransferEnd {
  absl::Status status;      // OK, or why the sender broke off
  int32_t next_token = -1;  // kNextTokenAtEnd transfers: the token (OK only); else -1
};
// Payload: the status encoding, then i32 next_token.
std::string EncodeEnd(const TransferEnd& end);
// Fails on a malformed payload, and on an OK end whose token is below -1.
absl::StatusOr<TransferEnd> DecodeEnd(const uint8_t* data, size_t bytes);

}  // namespace tcp_wire
}  // namespace pds::engine

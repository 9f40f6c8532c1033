// Internal to engine/transfer: the blocking-with-deadline socket layer the KV transports share
// (the host TCP transport's data connections and the device transports' control connections).
// Every wait is bounded by a deadline and an idle limit, can be woken by a shutdown pipe and
// polls a cancel flag. Frames are tcp_wire frames (tcp_transport.h).
#pragma once

#include <sys/uio.h>

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <map>
#include <mutex>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "engine/transfer/tcp_transport.h"

namespace pds::engine::transfer_internal {

// Little-endian fixed-size fields of control payloads (the hosts are little-endian).
template <typename T>
void Put(std::string& out, T value) {
  out.append(reinterpret_cast<const char*>(&value), sizeof(T));
}

// Reads fixed-size little-endian fields from a payload, failing past its end.
class Reader {
 public:
  Reader(const uint8_t* data, size_t bytes) : data_(data), left_(bytes) {}
  template <typename T>
  bool Get(T* value) {
    if (left_ < sizeof(T)) return false;
    std::memcpy(value, data_, sizeof(T));
    data_ += sizeof(T);
    left_ -= sizeof(T);
    return true;
  }
  bool GetBytes(size_t n, std::string* out) {
    if (left_ < n) return false;
    out->assign(reinterpret_cast<const char*>(data_), n);
    data_ += n;
    left_ -= n;
    return true;
  }
  size_t left() const { return left_; }

 private:
  const uint8_t* data_;
  size_t left_;
};

std::string Errno(int err);

// Prefixes a status message with context, keeping the code.
absl::Status WithContext(const absl::Status& status, absl::string_view context);

// The receivers' reservation: sink.Reserve(header) with its held block count checked
// (KvTransferHeader::CheckHeld) into *held_blocks (0 unless OK). A sink that names an
// impossible count has its reservation completed with the error, which is returned.
absl::Status ReserveChecked(KvSink& sink, const KvTransferHeader& header, int32_t* held_blocks);

// The sender's back-pressure wait after the receiver answered RESOURCE_EXHAUSTED (no room) to
// offer number `offers` with `answer`: sleeps `*backoff` (doubled afterwards, up to
// `max_backoff`) in short naps, CANCELLED when `cancelled` returns true meanwhile,
// DEADLINE_EXCEEDED once `deadline` has passed; OK: offer again.
absl::Status WaitToOfferAgain(absl::Duration* backoff, absl::Duration max_backoff,
                              absl::Time deadline, const std::function<bool()>& cancelled,
                              int32_t offers, const absl::Status& answer);

// A receiver connection that ended with `status` (not OK): names the receiver (`who`) and the
// request, logs it (quietly when shutdown closed a connection with nothing reserved) and
// completes the sink's reservation, if any, with it. Returns the status with its context, for
// the error reply.
absl::Status EndFailedConnection(absl::Status status, bool stopping, absl::string_view who,
                                 const KvTransferHeader& header, bool& reserved, KvSink& sink);

// An owned file descriptor.
class Fd {
 public:
  Fd() = default;
  explicit Fd(int fd) : fd_(fd) {}
  Fd(Fd&& other) noexcept : fd_(std::exchange(other.fd_, -1)) {}
  Fd& operator=(Fd&& other) noexcept {
    if (this != &other) {
      Reset();
      fd_ = std::exchange(other.fd_, -1);
    }
    return *this;
  }
  ~Fd() { Reset(); }
  int get() const { return fd_; }
  int release() { return std::exchange(fd_, -1); }
  void Reset();

 private:
  int fd_ = -1;
};

// TCP_NODELAY and the socket buffers (see TcpTransportOptions::socket_buffer_bytes).
void ConfigureSocket(int fd, int socket_buffer_bytes);

// How a connection's blocking operations wait: until `deadline`, at most `idle` per wait
// (measured from the start of each wait, i.e. since the last progress), while `wake_fd` (if
// any) is not readable and `cancelled` (if any) is false.
struct Io {
  int fd = -1;
  absl::Time deadline = absl::InfiniteFuture();
  absl::Duration idle = absl::InfiniteDuration();
  int wake_fd = -1;
  const std::function<bool()>* cancelled = nullptr;
};

enum class WaitResult { kReady, kPeerReadable };

// Waits for `events` on io.fd. With `watch_readable`, readability of the socket while waiting
// for POLLOUT is reported as kPeerReadable (the peer sent something: an early reply).
absl::StatusOr<WaitResult> Wait(const Io& io, short events, bool watch_readable = false);

// Marker message for a send interrupted because the peer replied (see Wait's watch_readable).
inline constexpr absl::string_view kPeerSpoke = "peer sent a reply while we were sending";

// Sends every byte of the iovecs (modified). MSG_NOSIGNAL: a closed peer is EPIPE, not SIGPIPE.
absl::Status WriteAll(const Io& io, iovec* iov, int iovcnt, bool watch_readable = false);

absl::Status WriteFrame(const Io& io, tcp_wire::FrameType type, const void* payload, size_t bytes,
                        uint64_t checksum, bool watch_readable = false);
absl::Status WriteFrame(const Io& io, tcp_wire::FrameType type, const std::string& payload);

// Reads exactly `bytes` bytes, feeding them to `checksum` (if any) as they arrive, while they
// are in cache. With `eof`, a clean end of stream before the first byte sets *eof.
absl::Status ReadExact(const Io& io, uint8_t* dst, size_t bytes,
                       tcp_wire::ChecksumState* checksum = nullptr, bool* eof = nullptr);

// One control frame (payload at most tcp_wire::kMaxControlPayload, checksum verified).
struct ControlFrame {
  tcp_wire::FrameType type = tcp_wire::FrameType::kOffer;
  std::string payload;
  const uint8_t* data() const { return reinterpret_cast<const uint8_t*>(payload.data()); }
};
// Reads one control frame. With `eof`, a clean end of stream before it sets *eof.
absl::StatusOr<ControlFrame> ReadControlFrame(const Io& io, bool* eof = nullptr);

// Reads a reply frame (OFFER_REPLY or DONE_REPLY, as `want`) and returns the status it carries.
// An error may come in either type; an OK must be the one expected. An OK OFFER_REPLY's held
// block count goes to *held_blocks, when given.
absl::StatusOr<tcp_wire::PeerStatus> ReadReply(const Io& io, tcp_wire::FrameType want,
                                               int32_t* held_blocks = nullptr);

// Whether the peer already sent something (an early error reply) or hung up.
bool PeerReadable(const Io& io);

// "host:port" or "[v6]:port".
absl::Status SplitAddress(const std::string& address, std::string* host, std::string* port);
std::string JoinAddress(const std::string& host, int port);

// A non-blocking connected socket, or UNAVAILABLE / DEADLINE_EXCEEDED / CANCELLED.
absl::StatusOr<Fd> Connect(const std::string& address, absl::Time deadline,
                           const std::function<bool()>* cancelled, int socket_buffer_bytes);

// A listening socket that serves each accepted connection on its own thread.
class ConnectionServer {
 public:
  struct Options {
    int max_connections = 64;
    int socket_buffer_bytes = 4 << 20;
    absl::Duration idle_timeout = absl::Seconds(30);
  };
  // Serves one connection. `io` waits at most the idle timeout per wait and fails with
  // UNAVAILABLE once Shutdown starts; the server closes the socket when the handler returns.
  using Handler = std::function<void(const Io& io)>;

  // `what` names the server in logs and errors (e.g. "kv receiver").
  ConnectionServer(std::string what, Options options, Handler handler);
  ~ConnectionServer() { Shutdown(); }
  ConnectionServer(const ConnectionServer&) = delete;
  ConnectionServer& operator=(const ConnectionServer&) = delete;

  // Binds host:port (0: ephemeral) and starts accepting. A connection beyond max_connections
  // gets OFFER_REPLY(UNAVAILABLE) and is closed.
  absl::Status Start(const std::string& host, int port);
  // host:port as bound.
  const std::string& address() const { return address_; }
  bool stopping() const { return stopping_flag_.load(); }
  // Stops accepting, wakes every connection's waits, joins every thread. Idempotent; waits for
  // handlers to return, so a handler must not call it.
  void Shutdown();

 private:
  void AcceptLoop();
  void ReapFinished();
  void Refuse(Fd fd);
  void ServeConnection(uint64_t id, int raw_fd);

  const std::string what_;
  const Options options_;
  const Handler handler_;
  std::string address_;
  Fd listen_fd_;
  Fd wake_read_, wake_write_;
  std::thread accept_thread_;
  std::atomic<bool> stopping_flag_{false};  // stopping_, readable without mu_

  std::mutex shutdown_mu_;
  bool shut_down_ = false;  // guarded by shutdown_mu_

  std::mutex mu_;
  bool stopping_ = false;                    // guarded by mu_
  uint64_t next_id_ = 0;                     // guarded by mu_
  std::map<uint64_t, std::thread> threads_;  // guarded by mu_
  std::map<uint64_t, int> conn_fds_;         // guarded by mu_
  std::vector<uint64_t> finished_;           // guarded by mu_
};

}  // namespace pds::engine::transfer_internal

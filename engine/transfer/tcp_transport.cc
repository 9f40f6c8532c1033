#include "engine/transfer/tcp_transport.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <bit>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <map>
#include <mutex>
#include <thread>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "engine/common/logging.h"
#include "engine/common/status_macros.h"

namespace pds::engine {

static_assert(std::endian::native == std::endian::little,
              "the KV wire format is little-endian and encoded with memcpy");

namespace tcp_wire {
namespace {

constexpr uint64_t kP1 = 0x9E3779B185EBCA87ull;
constexpr uint64_t kP2 = 0xC2B2AE3D27D4EB4Full;
constexpr uint64_t kP3 = 0x165667B19E3779F9ull;
constexpr uint64_t kP4 = 0x85EBCA77C2B2AE63ull;
constexpr uint64_t kP5 = 0x27D4EB2F165667C5ull;

inline uint64_t Load64(const uint8_t* p) {
  uint64_t v;
  std::memcpy(&v, p, 8);
  return v;
}
inline uint32_t Load32(const uint8_t* p) {
  uint32_t v;
  std::memcpy(&v, p, 4);
  return v;
}
inline uint64_t Round(uint64_t acc, uint64_t word) {
  acc += word * kP2;
  acc = std::rotl(acc, 31);
  return acc * kP1;
}
inline uint64_t MergeRound(uint64_t h, uint64_t lane) {
  h ^= Round(0, lane);
  return h * kP1 + kP4;
}

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

}  // namespace

ChecksumState::ChecksumState() : lanes_{kP1 + kP2, kP2, 0, 0 - kP1} {}

void ChecksumState::Update(const void* data, size_t bytes) {
  const uint8_t* p = static_cast<const uint8_t*>(data);
  total_ += bytes;
  if (pending_bytes_ > 0) {
    const size_t take = std::min(bytes, sizeof(pending_) - pending_bytes_);
    std::memcpy(pending_ + pending_bytes_, p, take);
    pending_bytes_ += take;
    p += take;
    bytes -= take;
    if (pending_bytes_ < sizeof(pending_)) return;
    for (int i = 0; i < 4; ++i) lanes_[i] = Round(lanes_[i], Load64(pending_ + 8 * i));
    pending_bytes_ = 0;
  }
  uint64_t v0 = lanes_[0], v1 = lanes_[1], v2 = lanes_[2], v3 = lanes_[3];
  for (; bytes >= 32; p += 32, bytes -= 32) {
    v0 = Round(v0, Load64(p));
    v1 = Round(v1, Load64(p + 8));
    v2 = Round(v2, Load64(p + 16));
    v3 = Round(v3, Load64(p + 24));
  }
  lanes_[0] = v0, lanes_[1] = v1, lanes_[2] = v2, lanes_[3] = v3;
  std::memcpy(pending_, p, bytes);
  pending_bytes_ = bytes;
}

uint64_t ChecksumState::Finish() const {
  uint64_t h;
  if (total_ >= 32) {
    h = std::rotl(lanes_[0], 1) + std::rotl(lanes_[1], 7) + std::rotl(lanes_[2], 12) +
        std::rotl(lanes_[3], 18);
    for (uint64_t lane : lanes_) h = MergeRound(h, lane);
  } else {
    h = kP5;
  }
  h += total_;
  const uint8_t* p = pending_;
  size_t n = pending_bytes_;
  for (; n >= 8; p += 8, n -= 8) h = std::rotl(h ^ Round(0, Load64(p)), 27) * kP1 + kP4;
  if (n >= 4) {
    h = std::rotl(h ^ (static_cast<uint64_t>(Load32(p)) * kP1), 23) * kP2 + kP3;
    p += 4;
    n -= 4;
  }
  for (; n > 0; ++p, --n) h = std::rotl(h ^ (*p * kP5), 11) * kP1;
  h ^= h >> 33;
  h *= kP2;
  h ^= h >> 29;
  h *= kP3;
  h ^= h >> 32;
  return h;
}

uint64_t Checksum(const void* data, size_t bytes) {
  ChecksumState state;
  state.Update(data, bytes);
  return state.Finish();
}

std::string EncodeFrameHeader(FrameType type, uint64_t length, uint64_t checksum) {
  std::string out;
  out.reserve(kFrameHeaderBytes);
  Put(out, kMagic);
  Put(out, kVersion);
  Put(out, static_cast<uint16_t>(type));
  Put(out, length);
  Put(out, checksum);
  return out;
}

std::string EncodeFrame(FrameType type, const std::string& payload) {
  return EncodeFrameHeader(type, payload.size(), Checksum(payload.data(), payload.size())) +
         payload;
}

absl::StatusOr<FrameHeader> ParseFrameHeader(const uint8_t* bytes, uint64_t max_payload) {
  const uint32_t magic = Load32(bytes);
  uint16_t version, type;
  std::memcpy(&version, bytes + 4, 2);
  std::memcpy(&type, bytes + 6, 2);
  if (magic != kMagic) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "bad frame magic 0x%08x (want 0x%08x; not a pdserve KV transfer peer?)", magic, kMagic));
  }
  if (version != kVersion) {
    return absl::InvalidArgumentError(
        absl::StrCat("unsupported frame version ", version, " (this side speaks ", kVersion, ")"));
  }
  if (type < static_cast<uint16_t>(FrameType::kOffer) ||
      type > static_cast<uint16_t>(FrameType::kDoneReply)) {
    return absl::InvalidArgumentError(absl::StrCat("unknown frame type ", type));
  }
  FrameHeader header;
  header.type = static_cast<FrameType>(type);
  header.length = Load64(bytes + 8);
  header.checksum = Load64(bytes + 16);
  if (header.length > max_payload) {
    return absl::InvalidArgumentError(absl::StrCat("frame payload of ", header.length,
                                                   " bytes exceeds the limit of ", max_payload));
  }
  return header;
}

std::string EncodeOffer(const KvTransferHeader& header) {
  std::string out;
  Put(out, static_cast<uint32_t>(header.request_id.size()));
  out += header.request_id;
  for (int32_t v : {header.num_tokens, header.num_layers, header.num_blocks, header.kv_heads,
                    header.block_size, header.head_dim, header.next_token}) {
    Put(out, v);
  }
  Put(out, static_cast<uint8_t>(header.dtype));
  return out;
}

absl::StatusOr<KvTransferHeader> DecodeOffer(const uint8_t* data, size_t bytes) {
  Reader reader(data, bytes);
  KvTransferHeader header;
  uint32_t id_bytes = 0;
  uint8_t dtype = 0;
  if (!reader.Get(&id_bytes) || id_bytes > reader.left() ||
      !reader.GetBytes(id_bytes, &header.request_id) || !reader.Get(&header.num_tokens) ||
      !reader.Get(&header.num_layers) || !reader.Get(&header.num_blocks) ||
      !reader.Get(&header.kv_heads) || !reader.Get(&header.block_size) ||
      !reader.Get(&header.head_dim) || !reader.Get(&header.next_token) || !reader.Get(&dtype) ||
      reader.left() != 0) {
    return absl::InvalidArgumentError(absl::StrCat("malformed OFFER payload of ", bytes, " bytes"));
  }
  if (dtype > static_cast<uint8_t>(DType::kBF16)) {
    return absl::InvalidArgumentError(absl::StrCat("OFFER names unknown dtype ", dtype));
  }
  header.dtype = static_cast<DType>(dtype);
  return header;
}

std::string EncodeStatus(const absl::Status& status) {
  const absl::string_view message = status.message().substr(0, 4096);
  std::string out;
  Put(out, static_cast<uint32_t>(status.code()));
  Put(out, static_cast<uint32_t>(message.size()));
  out.append(message.data(), message.size());
  return out;
}

absl::StatusOr<absl::Status> DecodeStatus(const uint8_t* data, size_t bytes) {
  Reader reader(data, bytes);
  uint32_t code = 0, length = 0;
  std::string message;
  if (!reader.Get(&code) || !reader.Get(&length) || length != reader.left() ||
      !reader.GetBytes(length, &message)) {
    return absl::InvalidArgumentError(absl::StrCat("malformed reply payload of ", bytes, " bytes"));
  }
  if (code > static_cast<uint32_t>(absl::StatusCode::kUnauthenticated)) {
    return absl::InvalidArgumentError(absl::StrCat("reply carries unknown status code ", code));
  }
  if (code == 0) return absl::OkStatus();
  return absl::Status(static_cast<absl::StatusCode>(code), message);
}

}  // namespace tcp_wire

namespace {

using tcp_wire::FrameType;

std::shared_ptr<spdlog::logger> Log() {
  static auto logger = Logger("transfer");
  return logger;
}

std::string Errno(int err) { return std::strerror(err); }

// Prefixes a status message with context, keeping the code.
absl::Status WithContext(const absl::Status& status, absl::string_view context) {
  if (status.ok()) return status;
  return absl::Status(status.code(), absl::StrCat(context, ": ", status.message()));
}

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
  void Reset() {
    if (fd_ >= 0) ::close(fd_);
    fd_ = -1;
  }

 private:
  int fd_ = -1;
};

// net.core.rmem_max / wmem_max, or -1 when unreadable.
int ReadSysctl(const char* path) {
  std::ifstream in(path);
  long value = -1;
  if (!(in >> value)) return -1;
  return static_cast<int>(std::min<long>(value, 1 << 30));
}

void SetBuffer(int fd, int force_opt, int opt, int max_allowed, int bytes) {
  if (::setsockopt(fd, SOL_SOCKET, force_opt, &bytes, sizeof(bytes)) == 0) return;
  if (max_allowed >= bytes) ::setsockopt(fd, SOL_SOCKET, opt, &bytes, sizeof(bytes));
  // Otherwise leave autotuning on: a capped fixed size would be smaller than what it reaches.
}

void ConfigureSocket(int fd, const TcpTransportOptions& options) {
  const int one = 1;
  ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
  if (options.socket_buffer_bytes > 0) {
    static const int rmem_max = ReadSysctl("/proc/sys/net/core/rmem_max");
    static const int wmem_max = ReadSysctl("/proc/sys/net/core/wmem_max");
    SetBuffer(fd, SO_SNDBUFFORCE, SO_SNDBUF, wmem_max, options.socket_buffer_bytes);
    SetBuffer(fd, SO_RCVBUFFORCE, SO_RCVBUF, rmem_max, options.socket_buffer_bytes);
  }
}

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
absl::StatusOr<WaitResult> Wait(const Io& io, short events, bool watch_readable = false) {
  const absl::Time limit = std::min(io.deadline, absl::Now() + io.idle);
  while (true) {
    if (io.cancelled != nullptr && *io.cancelled && (*io.cancelled)()) {
      return absl::CancelledError("cancelled");
    }
    const absl::Duration left = limit - absl::Now();
    if (left <= absl::ZeroDuration()) {
      if (limit == io.deadline) return absl::DeadlineExceededError("deadline exceeded");
      return absl::DeadlineExceededError(
          absl::StrCat("no progress for ", absl::FormatDuration(io.idle)));
    }
    absl::Duration slice = left;
    if (io.cancelled != nullptr && *io.cancelled) slice = std::min(slice, absl::Milliseconds(10));
    const int timeout_ms = static_cast<int>(std::min<int64_t>(
        absl::ToInt64Milliseconds(absl::Ceil(slice, absl::Milliseconds(1))), 3600 * 1000));
    pollfd fds[2] = {{io.fd, static_cast<short>(events | (watch_readable ? POLLIN : 0)), 0},
                     {io.wake_fd, POLLIN, 0}};
    const int n = ::poll(fds, io.wake_fd >= 0 ? 2 : 1, timeout_ms);
    if (n < 0) {
      if (errno == EINTR) continue;
      return absl::InternalError(absl::StrCat("poll: ", Errno(errno)));
    }
    if (n == 0) continue;
    if (io.wake_fd >= 0 && (fds[1].revents & POLLIN)) {
      return absl::UnavailableError("receiver shutting down");
    }
    if (watch_readable && (fds[0].revents & (POLLIN | POLLHUP | POLLERR))) {
      return WaitResult::kPeerReadable;
    }
    // Errors and hang-ups are reported by the following send/recv.
    if (fds[0].revents != 0) return WaitResult::kReady;
  }
}

// Marker message for a send interrupted because the peer replied (see Wait's watch_readable).
constexpr absl::string_view kPeerSpoke = "peer sent a reply while we were sending";

// Sends every byte of the iovecs (modified). MSG_NOSIGNAL: a closed peer is EPIPE, not SIGPIPE.
absl::Status WriteAll(const Io& io, iovec* iov, int iovcnt, bool watch_readable = false) {
  while (iovcnt > 0) {
    msghdr msg{};
    msg.msg_iov = iov;
    msg.msg_iovlen = iovcnt;
    const ssize_t n = ::sendmsg(io.fd, &msg, MSG_NOSIGNAL);
    if (n < 0) {
      if (errno == EINTR) continue;
      if (errno == EAGAIN || errno == EWOULDBLOCK) {
        PDS_ASSIGN_OR_RETURN(const WaitResult ready, Wait(io, POLLOUT, watch_readable));
        if (ready == WaitResult::kPeerReadable) return absl::AbortedError(kPeerSpoke);
        continue;
      }
      return absl::UnavailableError(absl::StrCat("send: ", Errno(errno)));
    }
    size_t done = static_cast<size_t>(n);
    while (iovcnt > 0 && done >= iov->iov_len) {
      done -= iov->iov_len;
      ++iov;
      --iovcnt;
    }
    if (iovcnt > 0) {
      iov->iov_base = static_cast<uint8_t*>(iov->iov_base) + done;
      iov->iov_len -= done;
    }
  }
  return absl::OkStatus();
}

absl::Status WriteFrame(const Io& io, FrameType type, const void* payload, size_t bytes,
                        uint64_t checksum, bool watch_readable = false) {
  std::string header = tcp_wire::EncodeFrameHeader(type, bytes, checksum);
  iovec iov[2] = {{header.data(), header.size()}, {const_cast<void*>(payload), bytes}};
  return WriteAll(io, iov, bytes > 0 ? 2 : 1, watch_readable);
}

absl::Status WriteFrame(const Io& io, FrameType type, const std::string& payload) {
  return WriteFrame(io, type, payload.data(), payload.size(),
                    tcp_wire::Checksum(payload.data(), payload.size()));
}

// Reads exactly `bytes` bytes, feeding them to `checksum` (if any) as they arrive, while they
// are in cache. With `eof_ok`, a clean end of stream before the first byte sets *eof.
constexpr size_t kReadChunk = size_t{1} << 20;
absl::Status ReadExact(const Io& io, uint8_t* dst, size_t bytes,
                       tcp_wire::ChecksumState* checksum = nullptr, bool* eof = nullptr) {
  size_t got = 0;
  while (got < bytes) {
    const ssize_t n = ::recv(io.fd, dst + got, std::min(bytes - got, kReadChunk), 0);
    if (n > 0) {
      if (checksum != nullptr) checksum->Update(dst + got, static_cast<size_t>(n));
      got += static_cast<size_t>(n);
      continue;
    }
    if (n == 0) {
      if (got == 0 && eof != nullptr) {
        *eof = true;
        return absl::OkStatus();
      }
      return absl::UnavailableError(
          absl::StrCat("connection closed by the peer (", got, " of ", bytes, " bytes read)"));
    }
    if (errno == EINTR) continue;
    if (errno == EAGAIN || errno == EWOULDBLOCK) {
      PDS_RETURN_IF_ERROR(Wait(io, POLLIN).status());
      continue;
    }
    return absl::UnavailableError(absl::StrCat("recv: ", Errno(errno)));
  }
  return absl::OkStatus();
}

// Reads a reply frame (OFFER_REPLY or DONE_REPLY, as `want`) and returns the status it carries.
absl::StatusOr<absl::Status> ReadReply(const Io& io, FrameType want) {
  uint8_t raw[tcp_wire::kFrameHeaderBytes];
  PDS_RETURN_IF_ERROR(ReadExact(io, raw, sizeof(raw)));
  PDS_ASSIGN_OR_RETURN(const tcp_wire::FrameHeader header,
                       tcp_wire::ParseFrameHeader(raw, tcp_wire::kMaxControlPayload));
  if (header.type != FrameType::kOfferReply && header.type != FrameType::kDoneReply) {
    return absl::InvalidArgumentError(
        absl::StrCat("expected a reply frame, got type ", static_cast<int>(header.type)));
  }
  std::vector<uint8_t> payload(header.length);
  PDS_RETURN_IF_ERROR(ReadExact(io, payload.data(), payload.size()));
  if (tcp_wire::Checksum(payload.data(), payload.size()) != header.checksum) {
    return absl::DataLossError("reply frame checksum mismatch");
  }
  PDS_ASSIGN_OR_RETURN(absl::Status carried,
                       tcp_wire::DecodeStatus(payload.data(), payload.size()));
  // An early error reply may come as either type; an OK must be the one expected.
  if (carried.ok() && header.type != want) {
    return absl::InvalidArgumentError(
        absl::StrCat("unexpected OK reply of frame type ", static_cast<int>(header.type)));
  }
  return carried;
}

// "host:port" or "[v6]:port".
absl::Status SplitAddress(const std::string& address, std::string* host, std::string* port) {
  size_t colon = address.rfind(':');
  if (colon == std::string::npos || colon + 1 == address.size()) {
    return absl::InvalidArgumentError(absl::StrCat("address '", address, "' is not host:port"));
  }
  *host = address.substr(0, colon);
  *port = address.substr(colon + 1);
  if (host->size() >= 2 && host->front() == '[' && host->back() == ']') {
    *host = host->substr(1, host->size() - 2);
  }
  return absl::OkStatus();
}

std::string JoinAddress(const std::string& host, int port) {
  if (host.find(':') != std::string::npos) return absl::StrCat("[", host, "]:", port);
  return absl::StrCat(host, ":", port);
}

absl::StatusOr<Fd> Connect(const std::string& address, absl::Time deadline,
                           const std::function<bool()>* cancelled,
                           const TcpTransportOptions& options) {
  std::string host, port;
  PDS_RETURN_IF_ERROR(SplitAddress(address, &host, &port));
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_NUMERICSERV;
  addrinfo* list = nullptr;
  const int rc = ::getaddrinfo(host.c_str(), port.c_str(), &hints, &list);
  if (rc != 0) {
    return absl::UnavailableError(
        absl::StrCat("cannot resolve '", address, "': ", ::gai_strerror(rc)));
  }
  std::unique_ptr<addrinfo, decltype(&::freeaddrinfo)> owner(list, &::freeaddrinfo);
  absl::Status last = absl::UnavailableError("no address");
  for (addrinfo* ai = list; ai != nullptr; ai = ai->ai_next) {
    Fd fd(::socket(ai->ai_family, ai->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC, ai->ai_protocol));
    if (fd.get() < 0) {
      last = absl::UnavailableError(absl::StrCat("socket: ", Errno(errno)));
      continue;
    }
    ConfigureSocket(fd.get(), options);
    int r;
    do {
      r = ::connect(fd.get(), ai->ai_addr, ai->ai_addrlen);
    } while (r < 0 && errno == EINTR);
    if (r < 0 && errno != EINPROGRESS) {
      last = absl::UnavailableError(absl::StrCat("connect: ", Errno(errno)));
      continue;
    }
    if (r < 0) {
      Io io{fd.get(), deadline, absl::InfiniteDuration(), -1, cancelled};
      absl::Status waited = Wait(io, POLLOUT).status();
      if (!waited.ok()) return WithContext(waited, "connect");
      int err = 0;
      socklen_t len = sizeof(err);
      ::getsockopt(fd.get(), SOL_SOCKET, SO_ERROR, &err, &len);
      if (err != 0) {
        last = absl::UnavailableError(absl::StrCat("connect: ", Errno(err)));
        continue;
      }
    }
    return fd;
  }
  return last;
}

// ---------------------------------------------------------------------------------------------
// Sender.

class TcpKvSender final : public KvSender {
 public:
  explicit TcpKvSender(TcpTransportOptions options) : options_(std::move(options)) {}

  absl::StatusOr<KvSendStats> Send(const std::string& address, const KvTransferHeader& header,
                                   KvSource& source, absl::Time deadline,
                                   std::function<bool()> cancelled) override {
    const std::string context =
        absl::StrCat("kv send of request '", header.request_id, "' to ", address);
    absl::StatusOr<KvSendStats> stats = SendImpl(address, header, source, deadline, cancelled);
    if (!stats.ok()) return WithContext(stats.status(), context);
    return stats;
  }

 private:
  absl::StatusOr<KvSendStats> SendImpl(const std::string& address, const KvTransferHeader& header,
                                       KvSource& source, absl::Time deadline,
                                       const std::function<bool()>& cancelled) {
    PDS_RETURN_IF_ERROR(header.Validate());
    const size_t layer_bytes = header.LayerBytes();
    const uint64_t frame_bytes = tcp_wire::kLayerPrefixBytes + layer_bytes;
    if (frame_bytes > options_.max_frame_bytes) {
      return absl::InvalidArgumentError(absl::StrCat("a layer frame of ", frame_bytes,
                                                     " bytes exceeds max_frame_bytes ",
                                                     options_.max_frame_bytes));
    }
    const auto is_cancelled = [&] { return cancelled && cancelled(); };
    if (is_cancelled()) return absl::CancelledError("cancelled before connecting");
    if (absl::Now() >= deadline) return absl::DeadlineExceededError("deadline already passed");

    KvSendStats stats;
    stats.offered = absl::Now();
    PDS_ASSIGN_OR_RETURN(Fd fd, Connect(address, deadline, &cancelled, options_));
    const Io io{fd.get(), deadline, absl::InfiniteDuration(), -1, &cancelled};

    // Offer until the receiver has room.
    const std::string offer = tcp_wire::EncodeOffer(header);
    absl::Duration backoff = options_.initial_backoff;
    while (true) {
      ++stats.offers;
      PDS_RETURN_IF_ERROR(WithContext(WriteFrame(io, FrameType::kOffer, offer), "offer"));
      absl::StatusOr<absl::Status> reply = ReadReply(io, FrameType::kOfferReply);
      if (!reply.ok()) return WithContext(reply.status(), "waiting for the offer reply");
      if (reply->ok()) break;
      if (reply->code() != absl::StatusCode::kResourceExhausted) {
        return WithContext(*reply, "refused by the receiver");
      }
      // Back-pressure: wait, then offer again on the same connection.
      const absl::Time wake = std::min(absl::Now() + backoff, deadline);
      while (absl::Now() < wake) {
        if (is_cancelled()) return absl::CancelledError("cancelled while the receiver had no room");
        absl::SleepFor(std::min(wake - absl::Now(), absl::Milliseconds(5)));
      }
      if (absl::Now() >= deadline) {
        return absl::DeadlineExceededError(
            absl::StrCat("deadline exceeded; the receiver had no room after ", stats.offers,
                         " offers (last answer: ", reply->message(), ")"));
      }
      backoff = std::min(backoff * 2, options_.max_backoff);
    }
    stats.reserved = absl::Now();

    // Stream the layers in order through one reusable buffer: prefix, then the packed K/V.
    std::unique_ptr<uint8_t[]> buffer(new uint8_t[frame_bytes]);
    for (int32_t layer = 0; layer < header.num_layers; ++layer) {
      const std::string where = absl::StrCat("layer ", layer, " of ", header.num_layers);
      if (is_cancelled()) return absl::CancelledError(absl::StrCat("cancelled before ", where));
      if (absl::Now() >= deadline) {
        return absl::DeadlineExceededError(absl::StrCat("deadline exceeded before ", where));
      }
      absl::Status read =
          source.ReadLayer(layer, buffer.get() + tcp_wire::kLayerPrefixBytes, layer_bytes);
      if (!read.ok()) return WithContext(read, absl::StrCat("source failed to read ", where));
      std::memcpy(buffer.get(), &layer, 4);
      std::memset(buffer.get() + 4, 0, 4);
      const uint64_t checksum = tcp_wire::Checksum(buffer.get(), frame_bytes);
      absl::Status sent = PeerReadable(io)
                              ? absl::AbortedError(kPeerSpoke)
                              : WriteFrame(io, FrameType::kLayer, buffer.get(), frame_bytes,
                                           checksum, /*watch_readable=*/true);
      if (!sent.ok()) return WithContext(EarlyReply(io, sent), absl::StrCat("sending ", where));
      stats.bytes += layer_bytes;
    }

    absl::StatusOr<absl::Status> done = ReadReply(io, FrameType::kDoneReply);
    if (!done.ok()) return WithContext(done.status(), "waiting for the receiver's confirmation");
    if (!done->ok()) return WithContext(*done, "the receiver failed the transfer");
    stats.finished = absl::Now();
    return stats;
  }

  // Whether the receiver already sent something (an early error reply) or hung up.
  static bool PeerReadable(const Io& io) {
    pollfd p{io.fd, POLLIN, 0};
    int n;
    do {
      n = ::poll(&p, 1, 0);
    } while (n < 0 && errno == EINTR);
    return n > 0 && (p.revents & (POLLIN | POLLHUP | POLLERR));
  }

  // After a failed send: the receiver's reason if it sent one, else the send error.
  static absl::Status EarlyReply(const Io& io, const absl::Status& send_error) {
    if (send_error.code() == absl::StatusCode::kCancelled ||
        send_error.code() == absl::StatusCode::kDeadlineExceeded) {
      return send_error;
    }
    Io quick = io;
    quick.deadline = std::min(io.deadline, absl::Now() + absl::Milliseconds(200));
    quick.cancelled = nullptr;
    absl::StatusOr<absl::Status> reply = ReadReply(quick, FrameType::kDoneReply);
    if (reply.ok() && !reply->ok()) return WithContext(*reply, "the receiver broke off");
    if (send_error.message() == kPeerSpoke) {
      return reply.ok() ? absl::InvalidArgumentError("receiver replied OK before the last layer")
                        : absl::UnavailableError(
                              absl::StrCat("connection lost (", reply.status().message(), ")"));
    }
    return send_error;
  }

  const TcpTransportOptions options_;
};

// ---------------------------------------------------------------------------------------------
// Receiver.

class TcpKvReceiver final : public KvReceiver {
 public:
  TcpKvReceiver(KvSink* sink, TcpTransportOptions options)
      : sink_(sink), options_(std::move(options)) {}
  ~TcpKvReceiver() override { Shutdown(); }

  absl::Status Start(const std::string& host, int port) {
    int pipe_fds[2];
    if (::pipe2(pipe_fds, O_CLOEXEC | O_NONBLOCK) != 0) {
      return absl::InternalError(absl::StrCat("pipe: ", Errno(errno)));
    }
    wake_read_ = Fd(pipe_fds[0]);
    wake_write_ = Fd(pipe_fds[1]);

    addrinfo hints{};
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
    addrinfo* list = nullptr;
    const std::string port_str = std::to_string(port);
    const int rc =
        ::getaddrinfo(host.empty() ? nullptr : host.c_str(), port_str.c_str(), &hints, &list);
    if (rc != 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("cannot resolve '", host, "': ", ::gai_strerror(rc)));
    }
    std::unique_ptr<addrinfo, decltype(&::freeaddrinfo)> owner(list, &::freeaddrinfo);
    absl::Status last = absl::UnavailableError("no address");
    for (addrinfo* ai = list; ai != nullptr; ai = ai->ai_next) {
      Fd fd(
          ::socket(ai->ai_family, ai->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC, ai->ai_protocol));
      if (fd.get() < 0) {
        last = absl::UnavailableError(absl::StrCat("socket: ", Errno(errno)));
        continue;
      }
      const int one = 1;
      ::setsockopt(fd.get(), SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
      ConfigureSocket(fd.get(), options_);  // inherited by accepted sockets
      if (::bind(fd.get(), ai->ai_addr, ai->ai_addrlen) != 0) {
        last = absl::UnavailableError(absl::StrCat("bind: ", Errno(errno)));
        continue;
      }
      if (::listen(fd.get(), 256) != 0) {
        last = absl::UnavailableError(absl::StrCat("listen: ", Errno(errno)));
        continue;
      }
      sockaddr_storage bound{};
      socklen_t len = sizeof(bound);
      ::getsockname(fd.get(), reinterpret_cast<sockaddr*>(&bound), &len);
      char name[INET6_ADDRSTRLEN] = {};
      int bound_port = 0;
      if (bound.ss_family == AF_INET6) {
        const auto* a = reinterpret_cast<const sockaddr_in6*>(&bound);
        ::inet_ntop(AF_INET6, &a->sin6_addr, name, sizeof(name));
        bound_port = ntohs(a->sin6_port);
      } else {
        const auto* a = reinterpret_cast<const sockaddr_in*>(&bound);
        ::inet_ntop(AF_INET, &a->sin_addr, name, sizeof(name));
        bound_port = ntohs(a->sin_port);
      }
      address_ = JoinAddress(host.empty() ? std::string(name) : host, bound_port);
      listen_fd_ = std::move(fd);
      accept_thread_ = std::thread([this] { AcceptLoop(); });
      return absl::OkStatus();
    }
    return WithContext(last, absl::StrCat("kv receiver on ", JoinAddress(host, port)));
  }

  std::string address() const override { return address_; }
  size_t bytes_received() const override { return bytes_received_.load(); }

  void Shutdown() override {
    std::lock_guard<std::mutex> once(shutdown_mu_);
    if (shut_down_) return;
    shut_down_ = true;
    {
      std::lock_guard<std::mutex> lock(mu_);
      stopping_ = true;
      stopping_flag_.store(true);
      for (const auto& [id, fd] : conn_fds_) ::shutdown(fd, SHUT_RDWR);
    }
    if (wake_write_.get() >= 0) {
      const char byte = 1;
      ssize_t ignored = ::write(wake_write_.get(), &byte, 1);  // never drained: stays readable
      (void)ignored;
    }
    if (listen_fd_.get() >= 0) ::shutdown(listen_fd_.get(), SHUT_RDWR);
    if (accept_thread_.joinable()) accept_thread_.join();
    listen_fd_.Reset();
    std::map<uint64_t, std::thread> threads;
    {
      std::lock_guard<std::mutex> lock(mu_);
      threads.swap(threads_);
      finished_.clear();
    }
    for (auto& [id, thread] : threads) thread.join();
  }

 private:
  void AcceptLoop() {
    while (true) {
      ReapFinished();
      pollfd fds[2] = {{listen_fd_.get(), POLLIN, 0}, {wake_read_.get(), POLLIN, 0}};
      const int n = ::poll(fds, 2, 500);
      if (n < 0 && errno != EINTR) {
        Log()->error("kv receiver {}: poll: {}", address_, Errno(errno));
        return;
      }
      if (fds[1].revents & POLLIN) return;
      if (n <= 0 || !(fds[0].revents & POLLIN)) continue;
      sockaddr_storage peer{};
      socklen_t len = sizeof(peer);
      Fd fd(::accept4(listen_fd_.get(), reinterpret_cast<sockaddr*>(&peer), &len,
                      SOCK_NONBLOCK | SOCK_CLOEXEC));
      if (fd.get() < 0) {
        if (errno == EINTR || errno == EAGAIN || errno == EWOULDBLOCK || errno == ECONNABORTED) {
          continue;
        }
        Log()->warn("kv receiver {}: accept: {}", address_, Errno(errno));
        // Out of descriptors and the like: do not spin.
        std::this_thread::sleep_for(std::chrono::milliseconds(10));
        continue;
      }
      ConfigureSocket(fd.get(), options_);
      std::lock_guard<std::mutex> lock(mu_);
      if (stopping_) return;
      if (static_cast<int>(threads_.size() - finished_.size()) >= options_.max_connections) {
        Refuse(std::move(fd));
        continue;
      }
      const uint64_t id = next_id_++;
      conn_fds_[id] = fd.get();
      threads_[id] = std::thread([this, id, raw = fd.release()] { ServeConnection(id, raw); });
    }
  }

  void ReapFinished() {
    std::vector<std::thread> done;
    {
      std::lock_guard<std::mutex> lock(mu_);
      for (uint64_t id : finished_) {
        auto it = threads_.find(id);
        if (it == threads_.end()) continue;
        done.push_back(std::move(it->second));
        threads_.erase(it);
      }
      finished_.clear();
    }
    for (auto& thread : done) thread.join();
  }

  void Refuse(Fd fd) {
    Log()->warn("kv receiver {}: refusing a connection: {} connections already served", address_,
                options_.max_connections);
    const std::string frame = tcp_wire::EncodeFrame(
        FrameType::kOfferReply, tcp_wire::EncodeStatus(absl::UnavailableError(
                                    absl::StrCat("kv receiver ", address_, " is at its limit of ",
                                                 options_.max_connections, " connections"))));
    ssize_t ignored = ::send(fd.get(), frame.data(), frame.size(), MSG_NOSIGNAL | MSG_DONTWAIT);
    (void)ignored;
    ::shutdown(fd.get(), SHUT_WR);
  }

  void ServeConnection(uint64_t id, int raw_fd) {
    Fd fd(raw_fd);
    Connection conn;
    conn.io =
        Io{fd.get(), absl::InfiniteFuture(), options_.idle_timeout, wake_read_.get(), nullptr};
    absl::Status status = Serve(conn);
    if (!status.ok()) {
      const bool stopping = stopping_flag_.load();
      if (stopping) status = absl::UnavailableError("receiver shutting down");
      std::string context = absl::StrCat("kv receiver ", address_);
      if (!conn.header.request_id.empty()) {
        absl::StrAppend(&context, ", request '", conn.header.request_id, "'");
      }
      status = WithContext(status, context);
      // A connection between offers that shutdown closes is no news.
      if (conn.reserved || !stopping) {
        Log()->warn("{}", status.ToString());
      } else {
        Log()->debug("{}", status.ToString());
      }
      if (conn.reserved) {
        conn.reserved = false;
        sink_->Complete(conn.header.request_id, status);
      }
      ReplyError(conn, status);
    }
    std::lock_guard<std::mutex> lock(mu_);
    conn_fds_.erase(id);
    fd.Reset();  // under mu_: Shutdown never calls shutdown() on a reused descriptor
    finished_.push_back(id);
  }

  struct Connection {
    Io io;
    KvTransferHeader header;
    bool reserved = false;
    int32_t next_layer = 0;
    std::unique_ptr<uint8_t[]> buffer;
  };

  // Serves one connection until it closes cleanly (OK) or fails. On failure the caller
  // completes a reserved transfer with the error.
  absl::Status Serve(Connection& conn) {
    uint8_t raw[tcp_wire::kFrameHeaderBytes];
    while (true) {
      bool eof = false;
      PDS_RETURN_IF_ERROR(ReadExact(conn.io, raw, sizeof(raw), nullptr, &eof));
      if (eof) {
        if (!conn.reserved) return absl::OkStatus();  // the sender gave up or finished
        return absl::UnavailableError(absl::StrCat("connection closed by the sender after ",
                                                   conn.next_layer, " of ", conn.header.num_layers,
                                                   " layers"));
      }
      PDS_ASSIGN_OR_RETURN(const tcp_wire::FrameHeader frame,
                           tcp_wire::ParseFrameHeader(raw, options_.max_frame_bytes));
      switch (frame.type) {
        case FrameType::kOffer: {
          if (conn.reserved) return absl::InvalidArgumentError("OFFER after the reservation");
          PDS_ASSIGN_OR_RETURN(bool done, HandleOffer(conn, frame));
          if (done) return absl::OkStatus();
          break;
        }
        case FrameType::kLayer: {
          if (!conn.reserved) return absl::InvalidArgumentError("LAYER before a reservation");
          PDS_RETURN_IF_ERROR(HandleLayer(conn, frame));
          if (conn.next_layer == conn.header.num_layers) {
            conn.reserved = false;
            sink_->Complete(conn.header.request_id, absl::OkStatus());
            // The sender may already be gone; the sink has the data either way.
            absl::Status replied = WriteFrame(conn.io, FrameType::kDoneReply,
                                              tcp_wire::EncodeStatus(absl::OkStatus()));
            if (!replied.ok()) {
              Log()->warn("kv receiver {}: request '{}' stored, but the confirmation failed: {}",
                          address_, conn.header.request_id, replied.ToString());
            }
            return absl::OkStatus();
          }
          break;
        }
        default:
          return absl::InvalidArgumentError(
              absl::StrCat("unexpected frame type ", static_cast<int>(frame.type)));
      }
    }
  }

  // Returns true when the connection is finished (the offer was refused for good).
  absl::StatusOr<bool> HandleOffer(Connection& conn, const tcp_wire::FrameHeader& frame) {
    if (frame.length > tcp_wire::kMaxControlPayload) {
      return absl::InvalidArgumentError(absl::StrCat(
          "OFFER payload of ", frame.length, " bytes exceeds ", tcp_wire::kMaxControlPayload));
    }
    std::vector<uint8_t> payload(frame.length);
    tcp_wire::ChecksumState checksum;
    PDS_RETURN_IF_ERROR(ReadExact(conn.io, payload.data(), payload.size(), &checksum));
    if (checksum.Finish() != frame.checksum) {
      return absl::DataLossError("OFFER frame checksum mismatch");
    }
    PDS_ASSIGN_OR_RETURN(KvTransferHeader header,
                         tcp_wire::DecodeOffer(payload.data(), payload.size()));
    absl::Status answer = header.Validate();
    if (answer.ok() &&
        tcp_wire::kLayerPrefixBytes + header.LayerBytes() > options_.max_frame_bytes) {
      answer = absl::InvalidArgumentError(
          absl::StrCat("a layer of ", header.LayerBytes(),
                       " bytes exceeds this receiver's frame limit of ", options_.max_frame_bytes));
    }
    if (answer.ok()) answer = sink_->Reserve(header);
    conn.header = std::move(header);
    if (answer.ok()) {
      conn.reserved = true;
      conn.next_layer = 0;
      conn.buffer.reset(new uint8_t[tcp_wire::kLayerPrefixBytes + conn.header.LayerBytes()]);
    }
    absl::Status replied =
        WriteFrame(conn.io, FrameType::kOfferReply, tcp_wire::EncodeStatus(answer));
    PDS_RETURN_IF_ERROR(WithContext(replied, "sending the offer reply"));
    if (answer.ok() || answer.code() == absl::StatusCode::kResourceExhausted) return false;
    Log()->info("kv receiver {}: refused request '{}': {}", address_, conn.header.request_id,
                answer.ToString());
    return true;
  }

  absl::Status HandleLayer(Connection& conn, const tcp_wire::FrameHeader& frame) {
    const size_t layer_bytes = conn.header.LayerBytes();
    const std::string where =
        absl::StrCat("layer ", conn.next_layer, " of ", conn.header.num_layers);
    if (frame.length != tcp_wire::kLayerPrefixBytes + layer_bytes) {
      return absl::InvalidArgumentError(
          absl::StrCat("LAYER frame of ", frame.length, " bytes, expected ",
                       tcp_wire::kLayerPrefixBytes + layer_bytes, " for ", where));
    }
    tcp_wire::ChecksumState checksum;
    PDS_RETURN_IF_ERROR(WithContext(ReadExact(conn.io, conn.buffer.get(), frame.length, &checksum),
                                    absl::StrCat("reading ", where)));
    if (checksum.Finish() != frame.checksum) {
      return absl::DataLossError(absl::StrCat("LAYER frame checksum mismatch (", where, ")"));
    }
    int32_t layer;
    std::memcpy(&layer, conn.buffer.get(), 4);
    if (layer != conn.next_layer) {
      return absl::InvalidArgumentError(
          absl::StrCat("got layer ", layer, " where ", where, " was due"));
    }
    PDS_RETURN_IF_ERROR(
        WithContext(sink_->WriteLayer(conn.header.request_id, layer,
                                      conn.buffer.get() + tcp_wire::kLayerPrefixBytes, layer_bytes),
                    absl::StrCat("the sink failed to store ", where)));
    bytes_received_.fetch_add(layer_bytes);
    ++conn.next_layer;
    return absl::OkStatus();
  }

  // Best effort: tells the sender why the connection ends, then drains briefly so the reply is
  // not lost to a reset.
  void ReplyError(Connection& conn, const absl::Status& status) {
    Io quick = conn.io;
    quick.deadline = absl::Now() + absl::Milliseconds(100);
    const FrameType type = conn.buffer ? FrameType::kDoneReply : FrameType::kOfferReply;
    if (!WriteFrame(quick, type, tcp_wire::EncodeStatus(status)).ok()) return;
    ::shutdown(conn.io.fd, SHUT_WR);
    uint8_t sink[65536];
    size_t drained = 0;
    while (drained < (size_t{64} << 20)) {
      const ssize_t n = ::recv(conn.io.fd, sink, sizeof(sink), 0);
      if (n > 0) {
        drained += static_cast<size_t>(n);
        continue;
      }
      if (n < 0 && errno == EINTR) continue;
      if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK) && Wait(quick, POLLIN).ok()) continue;
      return;
    }
  }

  KvSink* const sink_;
  const TcpTransportOptions options_;
  std::string address_;
  Fd listen_fd_;
  Fd wake_read_, wake_write_;
  std::thread accept_thread_;
  std::atomic<size_t> bytes_received_{0};
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

}  // namespace

std::unique_ptr<KvSender> CreateTcpKvSender(TcpTransportOptions options) {
  return std::make_unique<TcpKvSender>(std::move(options));
}

absl::StatusOr<std::unique_ptr<KvReceiver>> StartTcpKvReceiver(const std::string& host, int port,
                                                               KvSink* sink,
                                                               TcpTransportOptions options) {
  if (sink == nullptr) return absl::InvalidArgumentError("kv receiver needs a sink");
  if (port < 0 || port > 65535) {
    return absl::InvalidArgumentError(absl::StrCat("kv receiver port ", port, " out of range"));
  }
  if (options.max_connections < 1) {
    return absl::InvalidArgumentError("kv receiver max_connections must be positive");
  }
  auto receiver = std::make_unique<TcpKvReceiver>(sink, std::move(options));
  PDS_RETURN_IF_ERROR(receiver->Start(host, port));
  return std::unique_ptr<KvReceiver>(std::move(receiver));
}

}  // namespace pds::engine

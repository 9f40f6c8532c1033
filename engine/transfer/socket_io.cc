#include "engine/transfer/socket_io.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <fstream>
#include <memory>

#include "absl/strings/str_cat.h"
#include "engine/common/logging.h"
#include "engine/common/status_macros.h"

namespace pds::engine::transfer_internal {

using tcp_wire::FrameType;

namespace {

std::shared_ptr<spdlog::logger> Log() {
  static auto logger = Logger("transfer");
  return logger;
}

}  // namespace

void Fd::Reset() {
  if (fd_ >= 0) ::close(fd_);
  fd_ = -1;
}

std::string Errno(int err) { return std::strerror(err); }

// Prefixes a status message with context, keeping the code.
absl::Status EndFailedConnection(absl::Status status, bool stopping, absl::string_view who,
                                 const KvTransferHeader& header, bool& reserved, KvSink& sink) {
  if (stopping) status = absl::UnavailableError("receiver shutting down");
  std::string context(who);
  if (!header.request_id.empty()) {
    absl::StrAppend(&context, ", request '", header.request_id, "'");
  }
  status = WithContext(status, context);
  // A connection between offers that shutdown closes is no news, nor is a transfer the sender
  // cancelled (its request was cancelled, or ended with its first token during a hand-off).
  if ((reserved || !stopping) && !absl::IsCancelled(status)) {
    Log()->warn("{}", status.ToString());
  } else {
    Log()->debug("{}", status.ToString());
  }
  if (reserved) {
    reserved = false;
    sink.Complete(header.request_id, status, -1);
  }
  return status;
}

absl::Status WithContext(const absl::Status& status, absl::string_view context) {
  if (status.ok()) return status;
  return absl::Status(status.code(), absl::StrCat(context, ": ", status.message()));
}

absl::Status ReserveChecked(KvSink& sink, const KvTransferHeader& header, int32_t* held_blocks) {
  *held_blocks = 0;
  absl::StatusOr<int32_t> held = sink.Reserve(header);
  if (!held.ok()) return held.status();
  absl::Status checked = header.CheckHeld(*held);
  if (!checked.ok()) {
    checked = WithContext(checked, "the sink's reservation");
    sink.Complete(header.request_id, checked, -1);
    return checked;
  }
  *held_blocks = *held;
  return absl::OkStatus();
}

absl::Status WaitToOfferAgain(absl::Duration* backoff, absl::Duration max_backoff,
                              absl::Time deadline, const std::function<bool()>& cancelled,
                              int32_t offers, const absl::Status& answer) {
  const absl::Time wake = std::min(absl::Now() + *backoff, deadline);
  while (absl::Now() < wake) {
    if (cancelled && cancelled()) {
      return absl::CancelledError("cancelled while the receiver had no room");
    }
    absl::SleepFor(std::min(wake - absl::Now(), absl::Milliseconds(5)));
  }
  if (absl::Now() >= deadline) {
    return absl::DeadlineExceededError(
        absl::StrCat("deadline exceeded; the receiver had no room after ", offers,
                     " offers (last answer: ", answer.message(), ")"));
  }
  *backoff = std::min(*backoff * 2, max_backoff);
  return absl::OkStatus();
}

namespace {

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

}  // namespace

void ConfigureSocket(int fd, int socket_buffer_bytes) {
  const int one = 1;
  ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
  if (socket_buffer_bytes > 0) {
    static const int rmem_max = ReadSysctl("/proc/sys/net/core/rmem_max");
    static const int wmem_max = ReadSysctl("/proc/sys/net/core/wmem_max");
    SetBuffer(fd, SO_SNDBUFFORCE, SO_SNDBUF, wmem_max, socket_buffer_bytes);
    SetBuffer(fd, SO_RCVBUFFORCE, SO_RCVBUF, rmem_max, socket_buffer_bytes);
  }
}

// Waits for `events` on io.fd. With `watch_readable`, readability of the socket while waiting
// for POLLOUT is reported as kPeerReadable (the peer sent something: an early reply).
absl::StatusOr<WaitResult> Wait(const Io& io, short events, bool watch_readable) {
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

// Sends every byte of the iovecs (modified). MSG_NOSIGNAL: a closed peer is EPIPE, not SIGPIPE.
absl::Status WriteAll(const Io& io, iovec* iov, int iovcnt, bool watch_readable) {
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
                        uint64_t checksum, bool watch_readable) {
  std::string header = tcp_wire::EncodeFrameHeader(type, bytes, checksum);
  iovec iov[2] = {{header.data(), header.size()}, {const_cast<void*>(payload), bytes}};
  return WriteAll(io, iov, bytes > 0 ? 2 : 1, watch_readable);
}

absl::Status WriteFrame(const Io& io, FrameType type, const std::string& payload) {
  return WriteFrame(io, type, payload.data(), payload.size(),
                    tcp_wire::Checksum(payload.data(), payload.size()));
}

constexpr size_t kReadChunk = size_t{1} << 20;

absl::Status ReadExact(const Io& io, uint8_t* dst, size_t bytes, tcp_wire::ChecksumState* checksum,
                       bool* eof) {
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
absl::StatusOr<tcp_wire::PeerStatus> ReadReply(const Io& io, FrameType want, int32_t* held_blocks) {
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
  absl::Status carried;
  if (header.type == FrameType::kOfferReply) {
    PDS_ASSIGN_OR_RETURN(tcp_wire::OfferReply reply,
                         tcp_wire::DecodeOfferReply(payload.data(), payload.size()));
    carried = std::move(reply.status);
    if (held_blocks != nullptr) *held_blocks = reply.held_blocks;
  } else {
    PDS_ASSIGN_OR_RETURN(carried, tcp_wire::DecodeStatus(payload.data(), payload.size()));
  }
  // An early error reply may come as either type; an OK must be the one expected.
  if (carried.ok() && header.type != want) {
    return absl::InvalidArgumentError(
        absl::StrCat("unexpected OK reply of frame type ", static_cast<int>(header.type)));
  }
  return tcp_wire::PeerStatus(std::move(carried));
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

namespace {

// Resolves host:port for stream sockets (`flags`: getaddrinfo's) and offers each address a
// fresh non-blocking socket: the first one `use` accepts (OK) is returned; UNAVAILABLE from
// `use` tries the next address, any other error returns at once. A name that does not
// resolve is `resolve_code`, naming `what`.
absl::StatusOr<Fd> FirstUsableSocket(const char* host, const std::string& port, int flags,
                                     absl::StatusCode resolve_code, const std::string& what,
                                     const std::function<absl::Status(const addrinfo&, Fd&)>& use) {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = flags;
  addrinfo* list = nullptr;
  const int rc = ::getaddrinfo(host, port.c_str(), &hints, &list);
  if (rc != 0) {
    return absl::Status(resolve_code,
                        absl::StrCat("cannot resolve '", what, "': ", ::gai_strerror(rc)));
  }
  std::unique_ptr<addrinfo, decltype(&::freeaddrinfo)> owner(list, &::freeaddrinfo);
  absl::Status last = absl::UnavailableError("no address");
  for (addrinfo* ai = list; ai != nullptr; ai = ai->ai_next) {
    Fd fd(::socket(ai->ai_family, ai->ai_socktype | SOCK_NONBLOCK | SOCK_CLOEXEC, ai->ai_protocol));
    if (fd.get() < 0) {
      last = absl::UnavailableError(absl::StrCat("socket: ", Errno(errno)));
      continue;
    }
    last = use(*ai, fd);
    if (last.ok()) return fd;
    if (!absl::IsUnavailable(last)) return last;
  }
  return last;
}

}  // namespace

absl::StatusOr<Fd> Connect(const std::string& address, absl::Time deadline,
                           const std::function<bool()>* cancelled, int socket_buffer_bytes) {
  std::string host, port;
  PDS_RETURN_IF_ERROR(SplitAddress(address, &host, &port));
  return FirstUsableSocket(
      host.c_str(), port, AI_NUMERICSERV, absl::StatusCode::kUnavailable, address,
      [&](const addrinfo& ai, Fd& fd) -> absl::Status {
        ConfigureSocket(fd.get(), socket_buffer_bytes);
        int r;
        do {
          r = ::connect(fd.get(), ai.ai_addr, ai.ai_addrlen);
        } while (r < 0 && errno == EINTR);
        if (r < 0 && errno != EINPROGRESS) {
          return absl::UnavailableError(absl::StrCat("connect: ", Errno(errno)));
        }
        if (r < 0) {
          Io io{fd.get(), deadline, absl::InfiniteDuration(), -1, cancelled};
          absl::Status waited = Wait(io, POLLOUT).status();
          // Not UNAVAILABLE-retried: a deadline or cancel ends the attempt.
          if (!waited.ok()) return WithContext(waited, "connect");
          int err = 0;
          socklen_t len = sizeof(err);
          ::getsockopt(fd.get(), SOL_SOCKET, SO_ERROR, &err, &len);
          if (err != 0) return absl::UnavailableError(absl::StrCat("connect: ", Errno(err)));
        }
        return absl::OkStatus();
      });
}
absl::StatusOr<ControlFrame> ReadControlFrame(const Io& io, bool* eof) {
  uint8_t raw[tcp_wire::kFrameHeaderBytes];
  PDS_RETURN_IF_ERROR(ReadExact(io, raw, sizeof(raw), nullptr, eof));
  if (eof != nullptr && *eof) return ControlFrame{};
  PDS_ASSIGN_OR_RETURN(const tcp_wire::FrameHeader header,
                       tcp_wire::ParseFrameHeader(raw, tcp_wire::kMaxControlPayload));
  ControlFrame frame;
  frame.type = header.type;
  frame.payload.resize(header.length);
  tcp_wire::ChecksumState checksum;
  PDS_RETURN_IF_ERROR(ReadExact(io, reinterpret_cast<uint8_t*>(frame.payload.data()),
                                frame.payload.size(), &checksum));
  if (checksum.Finish() != header.checksum) {
    return absl::DataLossError(
        absl::StrCat("frame checksum mismatch (type ", static_cast<int>(header.type), ")"));
  }
  return frame;
}

bool PeerReadable(const Io& io) {
  pollfd p{io.fd, POLLIN, 0};
  int n;
  do {
    n = ::poll(&p, 1, 0);
  } while (n < 0 && errno == EINTR);
  return n > 0 && (p.revents & (POLLIN | POLLHUP | POLLERR));
}

// ---------------------------------------------------------------------------------------------
// ConnectionServer.

ConnectionServer::ConnectionServer(std::string what, Options options, Handler handler)
    : what_(std::move(what)), options_(options), handler_(std::move(handler)) {}

absl::Status ConnectionServer::Start(const std::string& host, int port) {
  int pipe_fds[2];
  if (::pipe2(pipe_fds, O_CLOEXEC | O_NONBLOCK) != 0) {
    return absl::InternalError(absl::StrCat("pipe: ", Errno(errno)));
  }
  wake_read_ = Fd(pipe_fds[0]);
  wake_write_ = Fd(pipe_fds[1]);

  absl::StatusOr<Fd> listener = FirstUsableSocket(
      host.empty() ? nullptr : host.c_str(), std::to_string(port), AI_PASSIVE | AI_NUMERICSERV,
      absl::StatusCode::kInvalidArgument, host, [&](const addrinfo& ai, Fd& fd) -> absl::Status {
        const int one = 1;
        ::setsockopt(fd.get(), SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
        ConfigureSocket(fd.get(), options_.socket_buffer_bytes);  // inherited by accepted ones
        if (::bind(fd.get(), ai.ai_addr, ai.ai_addrlen) != 0) {
          return absl::UnavailableError(absl::StrCat("bind: ", Errno(errno)));
        }
        if (::listen(fd.get(), 256) != 0) {
          return absl::UnavailableError(absl::StrCat("listen: ", Errno(errno)));
        }
        return absl::OkStatus();
      });
  if (!listener.ok()) {
    if (absl::IsInvalidArgument(listener.status())) return listener.status();
    return WithContext(listener.status(), absl::StrCat(what_, " on ", JoinAddress(host, port)));
  }
  sockaddr_storage bound{};
  socklen_t len = sizeof(bound);
  ::getsockname(listener->get(), reinterpret_cast<sockaddr*>(&bound), &len);
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
  listen_fd_ = std::move(*listener);
  accept_thread_ = std::thread([this] { AcceptLoop(); });
  return absl::OkStatus();
}

void ConnectionServer::Shutdown() {
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

void ConnectionServer::AcceptLoop() {
  while (true) {
    ReapFinished();
    pollfd fds[2] = {{listen_fd_.get(), POLLIN, 0}, {wake_read_.get(), POLLIN, 0}};
    const int n = ::poll(fds, 2, 500);
    if (n < 0 && errno != EINTR) {
      Log()->error("{} {}: poll: {}", what_, address_, Errno(errno));
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
      Log()->warn("{} {}: accept: {}", what_, address_, Errno(errno));
      // Out of descriptors and the like: do not spin.
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
      continue;
    }
    ConfigureSocket(fd.get(), options_.socket_buffer_bytes);
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

void ConnectionServer::ReapFinished() {
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

void ConnectionServer::Refuse(Fd fd) {
  Log()->warn("{} {}: refusing a connection: {} connections already served", what_, address_,
              options_.max_connections);
  const std::string frame = tcp_wire::EncodeFrame(
      FrameType::kOfferReply, tcp_wire::EncodeStatus(absl::UnavailableError(
                                  absl::StrCat(what_, " ", address_, " is at its limit of ",
                                               options_.max_connections, " connections"))));
  ssize_t ignored = ::send(fd.get(), frame.data(), frame.size(), MSG_NOSIGNAL | MSG_DONTWAIT);
  (void)ignored;
  ::shutdown(fd.get(), SHUT_WR);
}

void ConnectionServer::ServeConnection(uint64_t id, int raw_fd) {
  Fd fd(raw_fd);
  handler_(Io{fd.get(), absl::InfiniteFuture(), options_.idle_timeout, wake_read_.get(), nullptr});
  std::lock_guard<std::mutex> lock(mu_);
  conn_fds_.erase(id);
  fd.Reset();  // under mu_: Shutdown never calls shutdown() on a reused descriptor
  finished_.push_back(id);
}

}  // namespace pds::engine::transfer_internal

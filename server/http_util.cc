#include "server/http_util.h"

#include <dirent.h>
#include <netdb.h>
#include <sys/socket.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdlib>

#include "absl/strings/str_cat.h"
#include "httplib.h"

namespace pds::server {

absl::StatusOr<int> ListenInBackground(httplib::Server& server, const std::string& host, int port,
                                       std::thread& thread, absl::string_view what) {
  std::string bind_host = host;
  if (bind_host.size() > 2 && bind_host.front() == '[' && bind_host.back() == ']') {
    bind_host = bind_host.substr(1, bind_host.size() - 2);
  }
  int bound = port;
  if (port == 0) {
    bound = server.bind_to_any_port(bind_host);
  } else if (!server.bind_to_port(bind_host, port)) {
    bound = -1;
  }
  if (bound <= 0) {
    return absl::UnavailableError(
        absl::StrCat(what, ": cannot listen on ", host, ":", port, " (in use?)"));
  }
  thread = std::thread([&server] { server.listen_after_bind(); });
  for (int i = 0; i < 5000 && !server.is_running(); ++i) {
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  if (!server.is_running()) {
    server.stop();
    thread.detach();
    return absl::InternalError(absl::StrCat(what, ": the HTTP server did not start"));
  }
  return bound;
}

namespace {

// A socket address as cpp-httplib writes a request's: the numeric host and the port.
bool HostAndPort(const sockaddr_storage& addr, socklen_t len, std::string& host, int& port) {
  char buf[NI_MAXHOST];
  if (getnameinfo(reinterpret_cast<const sockaddr*>(&addr), len, buf, sizeof(buf), nullptr, 0,
                  NI_NUMERICHOST) != 0) {
    return false;
  }
  host = buf;
  if (addr.ss_family == AF_INET) {
    port = ntohs(reinterpret_cast<const sockaddr_in&>(addr).sin_port);
  } else if (addr.ss_family == AF_INET6) {
    port = ntohs(reinterpret_cast<const sockaddr_in6&>(addr).sin6_port);
  } else {
    return false;
  }
  return true;
}

}  // namespace

ClientConnection::ClientConnection(const httplib::Request& req, absl::Duration every)
    : local_addr_(req.local_addr),
      remote_addr_(req.remote_addr),
      local_port_(req.local_port),
      remote_port_(req.remote_port),
      every_(every),
      next_look_(absl::Now() + every) {}

int ClientConnection::Find() const {
  if (local_port_ <= 0 || remote_port_ <= 0) return -1;
  DIR* dir = opendir("/proc/self/fd");
  if (dir == nullptr) return -1;
  int found = -1;
  while (dirent* entry = readdir(dir)) {
    char* end = nullptr;
    const long fd = std::strtol(entry->d_name, &end, 10);
    if (end == entry->d_name || *end != '\0' || fd == dirfd(dir)) continue;
    sockaddr_storage addr{};
    socklen_t len = sizeof(addr);
    std::string host;
    int port = -1;
    // Non-sockets fail the first call (ENOTSOCK); listening and unconnected ones the second.
    if (getsockname(static_cast<int>(fd), reinterpret_cast<sockaddr*>(&addr), &len) != 0 ||
        !HostAndPort(addr, len, host, port) || port != local_port_ || host != local_addr_) {
      continue;
    }
    len = sizeof(addr);
    if (getpeername(static_cast<int>(fd), reinterpret_cast<sockaddr*>(&addr), &len) != 0 ||
        !HostAndPort(addr, len, host, port) || port != remote_port_ || host != remote_addr_) {
      continue;
    }
    found = static_cast<int>(fd);
    break;
  }
  closedir(dir);
  return found;
}

bool ClientConnection::Gone() {
  if (gone_) return true;
  const absl::Time now = absl::Now();
  if (now < next_look_) return false;
  next_look_ = now + every_;
  if (fd_ == -2) fd_ = Find();
  if (fd_ < 0) return false;
  // 0: the client's FIN; an error other than "nothing to read": a reset. Bytes (a pipelined
  // request) mean it is still there; they stay unread for cpp-httplib.
  char byte;
  const ssize_t n = recv(fd_, &byte, 1, MSG_PEEK | MSG_DONTWAIT);
  gone_ = n == 0 || (n < 0 && errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR);
  return gone_;
}

}  // namespace pds::server

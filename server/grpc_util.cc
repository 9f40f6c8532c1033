#include "server/grpc_util.h"

#include <arpa/inet.h>
#include <netdb.h>
#include <pthread.h>
#include <signal.h>
#include <sys/socket.h>

#include <algorithm>
#include <atomic>
#include <chrono>

#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "grpcpp/ext/proto_server_reflection_plugin.h"
#include "grpcpp/health_check_service_interface.h"

namespace pds::server {

grpc::Status ToGrpc(const absl::Status& status) {
  if (status.ok()) return grpc::Status::OK;
  return grpc::Status(static_cast<grpc::StatusCode>(status.code()), std::string(status.message()));
}

int64_t NowUs() { return absl::ToUnixMicros(absl::Now()); }

absl::StatusOr<std::unique_ptr<grpc::Server>> StartGrpcServer(
    const std::string& host, int port, const std::vector<grpc::Service*>& services,
    int* bound_port) {
  static const bool once = [] {
    grpc::EnableDefaultHealthCheckService(true);
    grpc::reflection::InitProtoReflectionServerBuilderPlugin();
    return true;
  }();
  (void)once;
  grpc::ServerBuilder builder;
  const std::string address = JoinHostPort(host, port);
  builder.AddListeningPort(address, grpc::InsecureServerCredentials(), bound_port);
  builder.SetMaxReceiveMessageSize(64 << 20);
  builder.SetMaxSendMessageSize(64 << 20);
  for (grpc::Service* service : services) builder.RegisterService(service);
  std::unique_ptr<grpc::Server> server = builder.BuildAndStart();
  if (server == nullptr || *bound_port == 0) {
    return absl::UnavailableError(
        absl::StrCat("cannot listen on ", address, " (in use, or not an address of this machine)"));
  }
  return server;
}

std::string JoinHostPort(const std::string& host, int port) {
  if (host.find(':') != std::string::npos && host.front() != '[') {
    return absl::StrCat("[", host, "]:", port);
  }
  return absl::StrCat(host, ":", port);
}

namespace {

// host and port of host:port or [v6]:port; false when it is not that.
bool SplitHostPort(const std::string& entry, std::string* host, std::string* port) {
  size_t colon;
  if (!entry.empty() && entry.front() == '[') {
    const size_t close = entry.find(']');
    if (close == std::string::npos || close + 1 >= entry.size() || entry[close + 1] != ':') {
      return false;
    }
    *host = std::string(entry.substr(1, close - 1));
    colon = close + 1;
  } else {
    colon = entry.rfind(':');
    if (colon == std::string::npos) return false;
    *host = std::string(entry.substr(0, colon));
    if (host->find(':') != std::string::npos) return false;  // a bare IPv6 address
  }
  *port = std::string(entry.substr(colon + 1));
  int number = 0;
  return !host->empty() && !port->empty() && absl::SimpleAtoi(*port, &number) && number >= 1 &&
         number <= 65535 && std::all_of(port->begin(), port->end(), absl::ascii_isdigit);
}

}  // namespace

absl::StatusOr<std::vector<std::string>> ParseFrontendList(const std::string& list) {
  std::vector<std::string> entries;
  for (absl::string_view piece : absl::StrSplit(list, ',')) {
    const std::string entry(absl::StripAsciiWhitespace(piece));
    std::string host, port;
    if (!SplitHostPort(entry, &host, &port)) {
      return absl::InvalidArgumentError(absl::StrCat("front-end '", entry, "' in '", list,
                                                     "': expected host:port ([v6 address]:port)"));
    }
    if (std::find(entries.begin(), entries.end(), entry) == entries.end()) {
      entries.push_back(entry);
    }
  }
  return entries;
}

bool IsAddressEntry(const std::string& entry) {
  std::string host, port;
  unsigned char buf[sizeof(in6_addr)];
  return SplitHostPort(entry, &host, &port) && (inet_pton(AF_INET, host.c_str(), buf) == 1 ||
                                                inet_pton(AF_INET6, host.c_str(), buf) == 1);
}

std::vector<std::string> ResolveFrontend(const std::string& entry) {
  if (IsAddressEntry(entry)) return {entry};
  std::string host, port;
  if (!SplitHostPort(entry, &host, &port)) return {};
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* found = nullptr;
  if (getaddrinfo(host.c_str(), port.c_str(), &hints, &found) != 0 || found == nullptr) {
    return {};
  }
  std::vector<std::string> v4, v6;
  for (const addrinfo* a = found; a != nullptr; a = a->ai_next) {
    char text[INET6_ADDRSTRLEN] = {};
    if (a->ai_family == AF_INET &&
        inet_ntop(AF_INET, &reinterpret_cast<const sockaddr_in*>(a->ai_addr)->sin_addr, text,
                  sizeof(text)) != nullptr) {
      v4.push_back(absl::StrCat(text, ":", port));
    } else if (a->ai_family == AF_INET6 &&
               inet_ntop(AF_INET6, &reinterpret_cast<const sockaddr_in6*>(a->ai_addr)->sin6_addr,
                         text, sizeof(text)) != nullptr) {
      v6.push_back(absl::StrCat("[", text, "]:", port));
    }
  }
  freeaddrinfo(found);
  std::vector<std::string>& out = v4.empty() ? v6 : v4;
  std::sort(out.begin(), out.end());
  out.erase(std::unique(out.begin(), out.end()), out.end());
  return out;
}

bool IsWildcardHost(const std::string& host) {
  return host.empty() || host == "0.0.0.0" || host == "::" || host == "[::]";
}

std::shared_ptr<grpc::Channel> MakeChannel(const std::string& address) {
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(64 << 20);
  args.SetInt(GRPC_ARG_ENABLE_HTTP_PROXY, 0);
  args.SetInt(GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS, 100);
  args.SetInt(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS, 1000);
  // A name (a Kubernetes Service) whose address changed, e.g. a front-end pod replaced, is
  // looked up again within a second of failing to connect, not gRPC's default 30 s.
  args.SetInt(GRPC_ARG_DNS_MIN_TIME_BETWEEN_RESOLUTIONS_MS, 1000);
  return grpc::CreateCustomChannel(address, grpc::InsecureChannelCredentials(), args);
}

namespace {

// The thread that waits for termination signals (BlockTerminationSignals' caller).
std::atomic<pthread_t> signal_waiter;

// Threads that started before BlockTerminationSignals (a BLAS library's pool, created when it
// is loaded) do not block the signals, and the kernel hands a process-wide signal to any thread
// that does not: there the default action would kill the process. This handler passes it on to
// the waiting thread instead, where it stays pending for sigwait/sigtimedwait.
void PassToWaiter(int sig) { pthread_kill(signal_waiter.load(), sig); }

}  // namespace

void BlockTerminationSignals() {
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGINT);
  sigaddset(&set, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &set, nullptr);
  signal_waiter.store(pthread_self());
  struct sigaction action = {};
  action.sa_handler = PassToWaiter;
  sigemptyset(&action.sa_mask);
  action.sa_flags = SA_RESTART;
  sigaction(SIGINT, &action, nullptr);
  sigaction(SIGTERM, &action, nullptr);
  signal(SIGPIPE, SIG_IGN);
}

int WaitForTerminationSignal() {
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGINT);
  sigaddset(&set, SIGTERM);
  int sig = 0;
  while (sigwait(&set, &sig) != 0) {
  }
  return sig;
}

void ResetSignalsForExec() {
  signal(SIGINT, SIG_DFL);
  signal(SIGTERM, SIG_DFL);
  sigset_t none;
  sigemptyset(&none);
  pthread_sigmask(SIG_SETMASK, &none, nullptr);
}

bool DrainUntil(const std::function<bool(absl::Duration)>& drain, absl::Duration timeout) {
  const absl::Time end = absl::Now() + timeout;
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGINT);
  sigaddset(&set, SIGTERM);
  while (true) {
    const absl::Duration left = end - absl::Now();
    if (drain(std::clamp(left, absl::ZeroDuration(), absl::Milliseconds(100)))) return true;
    if (absl::Now() >= end) return false;
    const timespec now = {0, 0};
    if (sigtimedwait(&set, nullptr, &now) > 0) return false;  // a second signal: stop now
  }
}

void SetDeadlineUs(grpc::ClientContext& context, int64_t deadline_us) {
  if (deadline_us <= 0) return;
  context.set_deadline(
      std::chrono::system_clock::time_point(std::chrono::microseconds(deadline_us)));
}

}  // namespace pds::server

#include "server/grpc_util.h"

#include <pthread.h>
#include <signal.h>

#include <algorithm>
#include <atomic>
#include <chrono>

#include "absl/strings/str_cat.h"
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

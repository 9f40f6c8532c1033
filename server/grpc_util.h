// Small pieces shared by the pdserve servers: status conversion, clocks, the server set-up
// every pdserve process uses (health service, reflection) and signal waiting.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "grpcpp/grpcpp.h"

namespace pds::server {

grpc::Status ToGrpc(const absl::Status& status);

// Microseconds since the Unix epoch.
int64_t NowUs();

// Builds and starts a gRPC server on host:port (0 = ephemeral) with `services`, the standard
// health service and server reflection. `bound_port` gets the port.
absl::StatusOr<std::unique_ptr<grpc::Server>> StartGrpcServer(
    const std::string& host, int port, const std::vector<grpc::Service*>& services,
    int* bound_port);

// host:port, with an IPv6 host in brackets ([fd00::5]:50051).
std::string JoinHostPort(const std::string& host, int port);

// The entries of a list of front-ends ("host:port,host:port"; an IPv6 host in brackets),
// each checked: a host and a port in 1-65535. INVALID_ARGUMENT names a malformed entry.
absl::StatusOr<std::vector<std::string>> ParseFrontendList(const std::string& list);

// The front-ends one such entry stands for, as host:port, sorted: a name that resolves to
// several addresses (a Kubernetes headless Service of front-end pods) stands for one at each
// of its IPv4 addresses (its IPv6 ones where it has none); an address stands for itself.
// Empty when the name does not resolve (now). Blocks for the system resolver (its timeouts).
std::vector<std::string> ResolveFrontend(const std::string& entry);

// Whether such an entry's host is an IP address (ResolveFrontend looks nothing up for it).
bool IsAddressEntry(const std::string& entry);

// Whether listening on `host` means every address of the machine (0.0.0.0, ::, [::], empty):
// not an address others can be told to dial.
bool IsWildcardHost(const std::string& host);

// A channel to host:port for our internal calls (no proxy, large messages).
std::shared_ptr<grpc::Channel> MakeChannel(const std::string& address);

// Blocks SIGINT, SIGTERM (and ignores SIGPIPE) in this and every thread created after it;
// call first in main (threads that started earlier pass the signals on to this one).
// WaitForTerminationSignal() then returns the signal that arrived.
void BlockTerminationSignals();
int WaitForTerminationSignal();

// In a child between fork and exec: default signal actions and an empty mask (the parent's
// pass-on handler would re-raise a pending signal on the child's thread forever).
void ResetSignalsForExec();

// Graceful stop after a first termination signal: calls drain(slice), which returns true once
// drained or false after `slice`, until it returns true (then true), `timeout` has passed or a
// second SIGINT/SIGTERM arrives (then false). Signals must be blocked (BlockTerminationSignals).
bool DrainUntil(const std::function<bool(absl::Duration)>& drain, absl::Duration timeout);

// Sets the deadline of a client context from a unix-time deadline in microseconds (0: none).
void SetDeadlineUs(grpc::ClientContext& context, int64_t deadline_us);

}  // namespace pds::server

// What the front-end's HTTP servers (metrics, the OpenAI-compatible API) share.
#pragma once

#include <string>
#include <thread>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/time/time.h"
#include "engine/common/json_depth.h"  // JsonTextDepth, for bodies

namespace httplib {
class Server;
struct Request;
}  // namespace httplib

namespace pds::server {

// Binds `server` to host:port (0: any free port; "[::1]"-style hosts lose their brackets) and
// runs it on `thread` until server.stop(); returns the bound port once it is running (a stop()
// before that would find nothing to stop, and the thread would never end). UNAVAILABLE when it
// cannot bind; INTERNAL when it never ran: `thread` is then detached and may still use
// `server`, which the caller must leave alive (the process is failing).
absl::StatusOr<int> ListenInBackground(httplib::Server& server, const std::string& host, int port,
                                       std::thread& thread, absl::string_view what);

// Whether the client of a request that is being answered is still connected. cpp-httplib
// (0.11) hands a handler no socket, and it notices a client that left only when a write
// fails, so a non-streamed request, or a stream still waiting for its first token, would run to
// its end for nobody. This finds the request's accepted socket among the process's descriptors
// (by both ends' addresses, which only it has while its handler runs) and peeks at it: the
// client's FIN or RST ends it. A client that only half-closes its side also counts as gone, as
// in uvicorn. Not thread-safe; use it from the handler's thread.
class ClientConnection {
 public:
  // Looks first `every` after this, then at most every `every`: a request answered sooner
  // costs nothing (the first look scans /proc/self/fd, tens to hundreds of microseconds).
  explicit ClientConnection(const httplib::Request& req,
                            absl::Duration every = absl::Milliseconds(200));

  // True once the client has closed or reset the connection; false when the socket cannot be
  // found (then nothing is known).
  bool Gone();

 private:
  int Find() const;

  std::string local_addr_, remote_addr_;
  int local_port_ = -1, remote_port_ = -1;
  int fd_ = -2;  // -2: not looked for yet; -1: not found
  absl::Duration every_;
  absl::Time next_look_;
  bool gone_ = false;
};

}  // namespace pds::server

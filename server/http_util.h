// What the front-end's HTTP servers (metrics, the OpenAI-compatible API) share.
#pragma once

#include <string>
#include <thread>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace httplib {
class Server;
}

namespace pds::server {

// Binds `server` to host:port (0: any free port; "[::1]"-style hosts lose their brackets) and
// runs it on `thread` until server.stop(); returns the bound port once it is running (a stop()
// before that would find nothing to stop, and the thread would never end). UNAVAILABLE when it
// cannot bind; INTERNAL when it never ran: `thread` is then detached and may still use
// `server`, which the caller must leave alive (the process is failing).
absl::StatusOr<int> ListenInBackground(httplib::Server& server, const std::string& host, int port,
                                       std::thread& thread, absl::string_view what);

// The deepest nesting of [ and { in JSON text (brackets inside strings do not count), read
// without parsing: copying or printing a parsed value recurses once per level, so a body
// nested thousands deep must be refused before it is used.
int JsonTextDepth(absl::string_view text);

}  // namespace pds::server

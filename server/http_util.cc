#include "server/http_util.h"

#include <algorithm>
#include <chrono>

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

int JsonTextDepth(absl::string_view text) {
  int depth = 0, deepest = 0;
  bool in_string = false;
  for (size_t i = 0; i < text.size(); ++i) {
    const char c = text[i];
    if (in_string) {
      if (c == '\\') {
        ++i;
      } else if (c == '"') {
        in_string = false;
      }
    } else if (c == '"') {
      in_string = true;
    } else if (c == '[' || c == '{') {
      deepest = std::max(deepest, ++depth);
    } else if (c == ']' || c == '}') {
      --depth;
    }
  }
  return deepest;
}

}  // namespace pds::server

// Text stop sequences (OpenAI's `stop`): the front-end cuts a request's text at the first of
// them and ends the request there.
#pragma once

#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/string_view.h"

namespace pds::server {

inline constexpr size_t kMaxStops = 4;  // as OpenAI
inline constexpr size_t kMaxStopBytes = 256;

// INVALID_ARGUMENT unless at most kMaxStops sequences of 1-kMaxStopBytes bytes of UTF-8.
absl::Status ValidateStops(const std::vector<std::string>& stops);

// The length of the longest end of `text` that is a proper prefix of `marker`: what a stream
// of text holds back while `marker` may still be coming (stop sequences, tool-call and
// reasoning markers).
size_t PartialMarkerAtEnd(absl::string_view text, absl::string_view marker);

// Text stop sequences over a stream of text pieces: Add returns the text that may be sent now
// (never the start of a possible stop sequence), Finish what is held back at the end. The text
// ends before the earliest stop sequence in the text so far (the shortest of those starting
// there, so a stop that begins another ends it however the text is split), or with
// `include_stop` after it (vLLM's include_stop_str_in_output).
class StopMatcher {
 public:
  explicit StopMatcher(std::vector<std::string> stops, bool include_stop = false)
      : stops_(std::move(stops)), include_stop_(include_stop) {}
  std::string Add(absl::string_view piece);
  std::string Finish();
  bool stopped() const { return stopped_; }

 private:
  std::vector<std::string> stops_;
  bool include_stop_;
  std::string held_;  // text not sent yet
  bool stopped_ = false;
};

}  // namespace pds::server

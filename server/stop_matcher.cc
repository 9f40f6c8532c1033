#include "server/stop_matcher.h"

#include <algorithm>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "engine/tokenizer/unicode.h"

namespace pds::server {

absl::Status ValidateStops(const std::vector<std::string>& stops) {
  if (stops.size() > kMaxStops) {
    return absl::InvalidArgumentError(
        absl::StrCat("'stop' holds ", stops.size(), " sequences, more than ", kMaxStops));
  }
  for (const std::string& s : stops) {
    if (s.empty() || s.size() > kMaxStopBytes || !engine::IsValidUtf8(s)) {
      return absl::InvalidArgumentError(
          absl::StrCat("'stop' sequences must be 1-", kMaxStopBytes, " bytes of UTF-8"));
    }
  }
  return absl::OkStatus();
}

size_t PartialMarkerAtEnd(absl::string_view text, absl::string_view marker) {
  if (marker.empty()) return 0;
  for (size_t len = std::min(text.size(), marker.size() - 1); len > 0; --len) {
    if (absl::EndsWith(text, marker.substr(0, len))) return len;
  }
  return 0;
}

std::string StopMatcher::Add(absl::string_view piece) {
  if (stopped_) return "";
  held_.append(piece.data(), piece.size());
  size_t first = std::string::npos, end = 0;
  for (const std::string& s : stops_) {
    const size_t at = held_.find(s);
    if (at < first || (at == first && at + s.size() < end)) {
      first = at;
      end = at + s.size();
    }
  }
  if (first != std::string::npos) {
    std::string out = held_.substr(0, include_stop_ ? end : first);
    held_.clear();
    stopped_ = true;
    return out;
  }
  // Hold back the longest end of the text that a stop sequence starts with (nothing before it
  // can start one: it would have been a longer such end).
  size_t keep = 0;
  for (const std::string& s : stops_) keep = std::max(keep, PartialMarkerAtEnd(held_, s));
  std::string out = held_.substr(0, held_.size() - keep);
  held_.erase(0, held_.size() - keep);
  return out;
}

std::string StopMatcher::Finish() {
  if (stopped_) return "";
  std::string out = std::move(held_);
  held_.clear();
  return out;
}

}  // namespace pds::server

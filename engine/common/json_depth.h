// Reading the structure of JSON text without parsing it: bounding untrusted JSON before it is
// parsed, and finding where values begin and end in text that is still being written.
#pragma once

#include "absl/strings/string_view.h"

namespace pds {

// JSON text read a character at a time: whether it is inside a string (escapes understood)
// and how deep in [ and { it is (brackets inside strings do not count). Valid or not, the text
// is never parsed.
class JsonNesting {
 public:
  // Takes the next character.
  void Feed(char c) {
    if (in_string_) {
      if (escaped_) {
        escaped_ = false;
      } else if (c == '\\') {
        escaped_ = true;
      } else if (c == '"') {
        in_string_ = false;
      }
    } else if (c == '"') {
      in_string_ = true;
    } else if (c == '[' || c == '{') {
      ++depth_;
    } else if (c == ']' || c == '}') {
      --depth_;
    }
  }
  int depth() const { return depth_; }
  bool in_string() const { return in_string_; }

 private:
  int depth_ = 0;
  bool in_string_ = false, escaped_ = false;
};

// The deepest nesting of [ and { in JSON text, read without parsing: copying or printing a
// parsed value recurses once per level, so text nested thousands deep must be refused before
// it is used.
int JsonTextDepth(absl::string_view text);

}  // namespace pds

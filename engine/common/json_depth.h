// Bounding untrusted JSON before it is parsed.
#pragma once

#include "absl/strings/string_view.h"

namespace pds {

// The deepest nesting of [ and { in JSON text (brackets inside strings do not count), read
// without parsing: copying or printing a parsed value recurses once per level, so text nested
// thousands deep must be refused before it is used.
int JsonTextDepth(absl::string_view text);

}  // namespace pds

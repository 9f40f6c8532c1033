#include "engine/common/json_depth.h"

#include <algorithm>

namespace pds {

int JsonTextDepth(absl::string_view text) {
  JsonNesting nesting;
  int deepest = 0;
  for (char c : text) {
    nesting.Feed(c);
    deepest = std::max(deepest, nesting.depth());
  }
  return deepest;
}

}  // namespace pds

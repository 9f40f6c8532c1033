#include "engine/runtime/speculative.h"

#include <algorithm>

namespace pds::engine {

std::vector<int32_t> ProposeNgramDrafts(std::span<const int32_t> tokens, int32_t ngram_min,
                                        int32_t ngram_max, int32_t k) {
  std::vector<int32_t> drafts;
  const int64_t n = static_cast<int64_t>(tokens.size());
  ngram_min = std::max(ngram_min, 1);
  if (k <= 0 || ngram_max < ngram_min || n < ngram_min + 1) return drafts;
  const int32_t last = tokens[n - 1];
  int64_t best_len = 0;
  int64_t best_end = -1;  // where the best occurrence's last token is
  // From the latest candidate back: a longer match replaces the best one, so the latest of the
  // longest wins, and a full-length match ends the search.
  for (int64_t end = n - 2; end >= 0; --end) {
    if (tokens[end] != last) continue;
    int64_t len = 1;
    while (len < ngram_max && end - len >= 0 && tokens[end - len] == tokens[n - 1 - len]) ++len;
    if (len > best_len) {
      best_len = len;
      best_end = end;
      if (len == ngram_max) break;
    }
  }
  if (best_len < ngram_min) return drafts;
  drafts.reserve(static_cast<size_t>(k));
  for (int64_t i = best_end + 1; static_cast<int32_t>(drafts.size()) < k; ++i) {
    drafts.push_back(i < n ? tokens[i] : drafts[static_cast<size_t>(i - n)]);
  }
  return drafts;
}

}  // namespace pds::engine

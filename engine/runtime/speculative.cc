#include "engine/runtime/speculative.h"

#include <algorithm>

namespace pds::engine {

namespace {

// Candidate ends `ends` (positions whose token is the last one, latest first) to the drafts.
template <typename Ends>
std::vector<int32_t> DraftsFrom(std::span<const int32_t> tokens, int32_t ngram_min,
                                int32_t ngram_max, int32_t k, Ends&& ends) {
  std::vector<int32_t> drafts;
  const int64_t n = static_cast<int64_t>(tokens.size());
  ngram_min = std::max(ngram_min, 1);
  if (k <= 0 || ngram_max < ngram_min || n < ngram_min + 1) return drafts;
  int64_t best_len = 0;
  int64_t best_end = -1;  // where the best occurrence's last token is
  // From the latest candidate back: a longer match replaces the best one, so the latest of the
  // longest wins, and a full-length match ends the search.
  ends([&](int64_t end) {
    int64_t len = 1;
    while (len < ngram_max && end - len >= 0 && tokens[end - len] == tokens[n - 1 - len]) ++len;
    if (len > best_len) {
      best_len = len;
      best_end = end;
    }
    return len < ngram_max;  // go on
  });
  if (best_len < ngram_min) return drafts;
  drafts.reserve(static_cast<size_t>(k));
  for (int64_t i = best_end + 1; static_cast<int32_t>(drafts.size()) < k; ++i) {
    drafts.push_back(i < n ? tokens[i] : drafts[static_cast<size_t>(i - n)]);
  }
  return drafts;
}

}  // namespace

std::vector<int32_t> ProposeNgramDrafts(std::span<const int32_t> tokens, int32_t ngram_min,
                                        int32_t ngram_max, int32_t k) {
  return DraftsFrom(tokens, ngram_min, ngram_max, k, [&](auto&& visit) {
    const int64_t n = static_cast<int64_t>(tokens.size());
    for (int64_t end = n - 2; end >= 0; --end) {
      if (tokens[end] == tokens[n - 1] && !visit(end)) return;
    }
  });
}

void NgramIndex::Extend(std::span<const int32_t> tokens) {
  for (; indexed_ < tokens.size(); ++indexed_) {
    positions_[tokens[indexed_]].push_back(static_cast<int32_t>(indexed_));
  }
}

std::vector<int32_t> NgramIndex::Propose(std::span<const int32_t> tokens, int32_t ngram_min,
                                         int32_t ngram_max, int32_t k) const {
  return DraftsFrom(tokens, ngram_min, ngram_max, k, [&](auto&& visit) {
    const int64_t n = static_cast<int64_t>(tokens.size());
    if (n == 0) return;
    auto it = positions_.find(tokens[n - 1]);
    if (it == positions_.end()) return;
    const std::vector<int32_t>& at = it->second;
    for (auto p = at.rbegin(); p != at.rend(); ++p) {
      if (*p <= n - 2 && !visit(*p)) return;
    }
  });
}

}  // namespace pds::engine

// Speculative decoding by prompt lookup (n-gram drafts): a decoding sequence whose latest
// tokens occurred earlier in its prompt or reply guesses that what followed them there follows
// again. The engine computes the guesses (drafts) in the same step as the sequence's next
// token, draws a token from every draft position's logits by the request's own rule, and keeps
// the drafts up to the first whose drawn token differs, plus that drawn token. Because a
// draft is deterministic, keeping draft d exactly when the draw at its position is d gives
// each token the distribution (and, for a seeded request, the token, up to the last-bit
// differences between step shapes) that decoding one token per step gives.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "absl/container/flat_hash_map.h"

namespace pds::engine {

struct SpeculativeOptions {
  int32_t num_tokens = 0;  // drafts per sequence and step (0: off)
  // The suffix looked up: the longest of ngram_max tokens down to ngram_min that occurred
  // before (its latest occurrence).
  int32_t ngram_max = 4;
  int32_t ngram_min = 2;
};

// Up to `k` drafts for the token after `tokens`: the tokens that followed the latest earlier
// occurrence of `tokens`' longest suffix of ngram_min..ngram_max tokens (empty when none
// occurred). A continuation that reaches the end of `tokens` goes on with the drafts
// themselves, so a repeating pattern is drafted in full.
std::vector<int32_t> ProposeNgramDrafts(std::span<const int32_t> tokens, int32_t ngram_min,
                                        int32_t ngram_max, int32_t k);

// The same drafts from a sequence's positions by token id, kept as the sequence grows: a step
// looks at the earlier occurrences of its last token only, latest first, instead of scanning
// the whole sequence (which costs tens of microseconds per sequence at 32k tokens).
class NgramIndex {
 public:
  // Indexes tokens[indexed(), tokens.size()): `tokens` must extend what was indexed before.
  void Extend(std::span<const int32_t> tokens);
  size_t indexed() const { return indexed_; }
  // ProposeNgramDrafts(tokens, ...), for `tokens` indexed whole.
  std::vector<int32_t> Propose(std::span<const int32_t> tokens, int32_t ngram_min,
                               int32_t ngram_max, int32_t k) const;

 private:
  absl::flat_hash_map<int32_t, std::vector<int32_t>> positions_;  // ascending
  size_t indexed_ = 0;
};

}  // namespace pds::engine

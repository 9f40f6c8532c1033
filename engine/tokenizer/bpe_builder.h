// Deterministic generator of a Llama 3 style byte-level BPE tokenizer (HF tokenizer.json), used
// by `pdserve make-model` to give random-weight models a real, loadable tokenizer.
#pragma once

#include <cstdint>
#include <string>

#include "absl/status/statusor.h"

namespace pds::engine {

// Smallest vocab_size accepted: the 256 byte tokens plus 8 special tokens.
inline constexpr int32_t kMinGeneratedVocabSize = 256 + 8;
// Largest vocab_size accepted (every id past the learned merges becomes a reserved special token).
inline constexpr int32_t kMaxGeneratedVocabSize = 1 << 20;

struct GeneratedTokenizer {
  std::string tokenizer_json;         // full tokenizer.json text
  std::string tokenizer_config_json;  // matching tokenizer_config.json
  int32_t bos_id = 0;                 // <|begin_of_text|>
  int32_t eos_id = 0;                 // <|end_of_text|>
  int32_t eot_id = 0;                 // <|eot_id|>
};

// Builds a tokenizer with exactly `vocab_size` ids: the 256 GPT-2 byte tokens, then up to ~8000
// tokens from merges learned by BPE training on a built-in corpus generated from `seed`, then
// the special tokens <|begin_of_text|>, <|end_of_text|>, <|eot_id|>, <|start_header_id|>,
// <|end_header_id|>, the added (not special) tokens <think> and </think> of reasoning models, and
// <|reserved_special_token_K|> (K = 0, 1, ...) filling the remaining ids.
// The same (vocab_size, seed) always gives the same output.
absl::StatusOr<GeneratedTokenizer> BuildByteLevelBpeTokenizer(int32_t vocab_size, uint64_t seed);

}  // namespace pds::engine

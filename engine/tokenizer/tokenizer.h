// HF tokenizer.json tokenizers: byte-level BPE (Llama 3, Qwen 2/3, GPT-2 style) and
// SentencePiece-style BPE with metaspace and byte fallback (Llama 2, TinyLlama, Mistral).
// Added/special tokens are matched before the model, the post-processor's template adds
// BOS and the like, and the decoder chain turns ids back into text. Components outside
// that set are refused at load with an error naming them.
#pragma once

#include <array>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"

namespace pds::engine {

class Tokenizer {
 public:
  // Loads a tokenizer.json file.
  static absl::StatusOr<std::unique_ptr<Tokenizer>> Load(const std::string& path);
  // Parses tokenizer.json text; `source` names it in errors.
  static absl::StatusOr<std::unique_ptr<Tokenizer>> FromJson(absl::string_view json,
                                                             absl::string_view source);
  ~Tokenizer();

  // Text to ids. Invalid UTF-8 is first replaced (maximal subparts -> U+FFFD), as HF does
  // for Python/JS strings. With add_special_tokens the post-processor template applies.
  // Thread-safe.
  std::vector<int32_t> Encode(absl::string_view text, bool add_special_tokens = true) const;
  // Ids to text through the decoder chain; ids outside the vocabulary are skipped.
  std::string Decode(absl::Span<const int32_t> ids, bool skip_special_tokens = false) const;

  // The bytes token `id` adds to generated text after other text: the decoder chain on its own,
  // without what applies only at the text's start or end (Metaspace's dropped first space,
  // Strip) and without replacing partial UTF-8 (a byte-fallback or byte-level token may be
  // part of a character). Empty for ids outside the vocabulary. For constrained decoding.
  std::string TokenBytes(int32_t id) const;

  int32_t vocab_size() const { return static_cast<int32_t>(id_to_token_.size()); }
  std::optional<int32_t> TokenToId(absl::string_view token) const;
  const std::string* IdToToken(int32_t id) const;
  bool IsSpecial(int32_t id) const;

  struct Impl;  // components parsed from the JSON (tokenizer.cc)

 private:
  Tokenizer();
  void EncodeSegment(absl::string_view segment, bool at_start, std::vector<int32_t>& ids) const;
  void Bpe(absl::string_view piece, std::vector<int32_t>& ids) const;
  void BpeUncached(absl::string_view piece, std::vector<int32_t>& ids) const;

  // Cache of BPE results for short pieces (words repeat), sharded to keep Encode cheap
  // from many threads.
  struct CacheShard;
  static constexpr int kCacheShards = 16;
  std::unique_ptr<CacheShard[]> cache_;
  std::unique_ptr<Impl> impl_;
  absl::flat_hash_map<std::string, int32_t> vocab_;
  std::vector<std::string> id_to_token_;
  std::vector<bool> special_;
};

// Streaming detokenization: feed generated ids one by one; each call returns the text that
// is final so far. Never returns a partial UTF-8 character; Finish() returns what is left.
class StreamDecoder {
 public:
  explicit StreamDecoder(const Tokenizer& tokenizer, bool skip_special_tokens = false)
      : tokenizer_(tokenizer), skip_special_(skip_special_tokens) {}
  std::string Add(int32_t id);
  std::string Finish();

 private:
  // Text of the ids not emitted yet, advancing the offsets past them; "" while it may still
  // change (unless `finish`).
  std::string NewText(bool finish);

  const Tokenizer& tokenizer_;
  bool skip_special_;
  std::vector<int32_t> ids_;
  size_t prefix_offset_ = 0;  // ids before this are fully emitted
  size_t read_offset_ = 0;    // ids before this have their text emitted
};

}  // namespace pds::engine

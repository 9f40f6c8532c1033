// Structured output: generation constrained to JSON that a JSON Schema accepts, or to text a
// regular expression matches whole (engine/runtime/regex.h). Each step, the tokens whose bytes
// cannot continue the text so far are masked out of the logits before the token is drawn, so
// every reply parses and matches (unless max_tokens cuts it short, which ends it as "length").
//
// The schema subset (anything else is refused with INVALID_ARGUMENT naming the keyword and
// where it is): type (one or a list), properties, required (a name that is not a property is an
// additional member that must be there), additionalProperties (false, the
// default under properties; true or a schema), minProperties, maxProperties, items,
// prefixItems (tuples; or draft 4-7's items as a list with additionalItems), minItems,
// maxItems, minLength,
// maxLength, pattern (a regex.h pattern, searched for as JSON Schema reads it), format (date,
// time, date-time, duration, uuid, ipv4, ipv6, hostname (labels; not the 253-character total)
// and email are held to their forms, beside a pattern too; others are annotations),
// minimum, maximum, exclusiveMinimum, exclusiveMaximum (numbers, or draft 4's booleans; exact in
// decimal as nlohmann::json reads the bound (integers to 64 bits, others as the shortest text of
// their double); at most 30 digits after the point; a bound past what 32 characters can write
// bounds nothing; a bounded number is written without an exponent), multipleOf (exact in
// decimal; a multiple is written without an exponent and with no more digits after the point
// than the divisor; refused where that automaton needs over 4096 states: the divisor's digits as
// an integer times its digits after the point plus two), enum, const (values the keywords
// beside them refuse are dropped, a $ref's schema among them), anyOf, oneOf (read as anyOf),
// allOf of one schema, $ref to a place in the same schema (#, #/$defs/..., any JSON pointer;
// recursive too; other keywords beside it but enum and const are not applied), and the
// annotations title, description, default, examples, $schema, $id,
// $comment. Properties come out in the schema's order; optional ones may be left out, and
// additional ones may not take a declared name. Whitespace between tokens is allowed up to 16
// characters at a time; numbers are at most 32 characters. Refused as too large: over 64
// alternatives in one anyOf or type list, over 256 properties in one object, text nested over 128
// deep, over 20000 compiled nodes.
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "kernels/sampling.h"

namespace pds::engine {

// The largest constraint texts a server takes from a request (GenerateRequest.json_schema and
// .regex; the front-end and the HTTP API check them before compiling anything).
inline constexpr size_t kMaxJsonSchemaBytes = 64 << 10;
inline constexpr size_t kMaxRegexBytes = 16 << 10;

class ByteDfa;
class Tokenizer;

// A model's tokens as bytes, indexed for masking: built once per model, shared by requests.
class TokenVocabulary {
 public:
  // token_bytes[id]: what token id adds to the text (Tokenizer::TokenBytes); `usable[id]`
  // false for tokens never drawn under a constraint (special tokens); `stop_ids` end the text
  // and are allowed only where it is complete (never as text, whatever their bytes). Ids at or past
  // token_bytes.size() (a model's padded vocabulary) are never allowed.
  TokenVocabulary(std::vector<std::string> token_bytes, std::vector<bool> usable,
                  std::vector<int32_t> stop_ids);
  // From a tokenizer: its special tokens are not usable.
  static std::shared_ptr<const TokenVocabulary> FromTokenizer(const Tokenizer& tokenizer,
                                                              std::vector<int32_t> stop_ids);
  ~TokenVocabulary();

  int32_t size() const { return static_cast<int32_t>(bytes_.size()); }
  const std::string& bytes(int32_t id) const { return bytes_[id]; }
  bool IsStop(int32_t id) const;
  bool usable(int32_t id) const { return usable_[id]; }

  struct Trie;  // json_constraint.cc

 private:
  friend class JsonMatcher;
  std::vector<std::string> bytes_;
  std::vector<bool> usable_;
  std::vector<int32_t> stop_ids_;
  // Every usable token, and those with a byte that is not plain string content (", \, control).
  std::unique_ptr<Trie> all_, special_;
  // Usable tokens of plain string content only (printable ASCII but " and \, whole UTF-8
  // characters), by how many characters they hold, fewest first.
  std::vector<int32_t> plain_;
  std::vector<int32_t> plain_chars_;
  std::vector<int32_t> chars_;  // by id: the characters of a plain token; -1 for the others
};

// A compiled schema or regular expression (shared by the requests that use it).
class JsonSchema {
 public:
  // `schema` is JSON Schema text; {"type": "object"} is what json_object mode asks for.
  static absl::StatusOr<std::shared_ptr<const JsonSchema>> Compile(absl::string_view schema);
  // The whole reply matches `pattern` (a regex.h pattern, in full).
  static absl::StatusOr<std::shared_ptr<const JsonSchema>> Regex(absl::string_view pattern);
  ~JsonSchema();

  struct Node;  // json_constraint.cc
  // Tokens an automaton takes from one of its states, and the most characters one of them
  // needs to reach a match (its own and those still missing after it).
  struct TokenSet {
    std::vector<uint64_t> bits;
    int64_t max_cost = 0;
  };

 private:
  friend class JsonMatcher;
  friend class SchemaCompiler;
  JsonSchema();
  // The tokens a pattern's automaton (of node `node`) takes whole from `state`.
  // Computed by `fill` once per state and vocabulary (up to 4096 of them per schema and 512
  // MiB in all schemas of the process; past that, each time).
  std::shared_ptr<const TokenSet> Tokens(int node, int32_t state,
                                         const std::shared_ptr<const TokenVocabulary>& vocab,
                                         const std::function<void(TokenSet&)>& fill) const;

  std::vector<Node> nodes_;
  int root_ = 0;
  mutable std::mutex mu_;
  mutable std::shared_ptr<const TokenVocabulary> tokens_vocab_;  // the tokens' vocabulary
  mutable int64_t tokens_bytes_ = 0;  // what tokens_ holds (of a process-wide 512 MiB)
  mutable absl::flat_hash_map<std::pair<int, int32_t>, std::shared_ptr<const TokenSet>> tokens_;
};

// One reply's place in the grammar: the set of parser stacks the text so far leaves open.
class JsonMatcher {
 public:
  JsonMatcher(std::shared_ptr<const JsonSchema> schema,
              std::shared_ptr<const TokenVocabulary> vocab);
  ~JsonMatcher();
  JsonMatcher(const JsonMatcher&);
  JsonMatcher(JsonMatcher&&) noexcept;

  // Sets logits[id] to -inf for every id in [0, n) that cannot come next. False when none can.
  bool MaskLogits(float* logits, int64_t n) const;
  // The same in two halves, so that the first can run while the model computes the logits:
  // the ids that may come next as a bitset (bit id % 64 of word id / 64; resized to the
  // vocabulary), then the mask.
  using Bits = std::vector<uint64_t>;
  void ComputeAllowed(Bits& allowed) const;
  static bool ApplyAllowed(const Bits& allowed, float* logits, int64_t n);

  // Draws a token from the logits `row` of n tokens among the `allowed` ones by `rule`
  // (kernels::cpu's Argmax / SampleLogits). When few are allowed (structure, keys, enums,
  // numbers), only they are read and the row is left alone, unless `mask_row` (logprobs read
  // it); otherwise the refused tokens' logits are set to -inf first. -1 when none is allowed.
  struct DrawScratch {
    std::vector<int32_t> ids;
    std::vector<float> logits;
  };
  static int32_t Draw(const Bits& allowed, float* row, int64_t n, const kernels::RowSampling& rule,
                      bool mask_row, DrawScratch& scratch);
  // The ids that may come next, ascending (what MaskLogits keeps).
  std::vector<int32_t> AllowedTokens() const;
  // Moves past a drawn token; false (and no change) when it cannot come next. A stop token is
  // accepted where the JSON may end.
  bool Accept(int32_t token);
  // A reasoning model's reply under a constraint: free until `end` (a token such as </think>),
  // then constrained. `inside`: the reply starts inside the reasoning (its prompt opened it);
  // else `open` (such as <think>; -1: none) may start it as the reply's first token, and any
  // other first token starts the constrained part.
  void ReasonFirst(int32_t open, int32_t end, bool inside);
  // Inside the reasoning: nothing is constrained (Accept takes any token but a stop token,
  // watching for the end token or its text).
  bool Free() const { return gate_ == Gate::kInside; }
  int32_t reasoning_end() const { return end_; }
  // The JSON is complete and nothing may follow it: the reply is over.
  bool Done() const;
  // The JSON may end here (a stop token is allowed).
  bool CanEnd() const;

  struct Frame;
  using Stack = std::vector<Frame>;

 private:
  void Walk(const TokenVocabulary::Trie& trie, uint32_t node, const std::vector<Stack>& states,
            bool plain_same, Bits& allowed) const;
  // The allowed tokens of a regex, or of a pattern string's content, from the automaton's
  // per-state token sets; false (nothing set) for other states.
  bool PatternTokens(Bits& allowed) const;
  // ComputeAllowed past any reasoning.
  void ComputeConstrained(Bits& allowed) const;

  std::shared_ptr<const JsonSchema> schema_;
  std::shared_ptr<const TokenVocabulary> vocab_;
  std::vector<Stack> states_;
  enum class Gate : uint8_t { kNone, kMayOpen, kInside };
  Gate gate_ = Gate::kNone;
  int32_t open_ = -1, end_ = -1;  // the reasoning's tokens (ReasonFirst)
  std::string tail_;              // the reasoning's last bytes (its end may be spelled out)
  mutable Bits scratch_;          // MaskLogits' allowed tokens, kept between steps
};

}  // namespace pds::engine

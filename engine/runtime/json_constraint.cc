#include "engine/runtime/json_constraint.h"

#include <algorithm>
#include <atomic>
#include <bit>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>
#include <ranges>
#include <tuple>
#include <utility>

#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "engine/common/json_depth.h"
#include "engine/common/status_macros.h"
#include "engine/runtime/number_range.h"
#include "engine/runtime/regex.h"
#include "engine/tokenizer/tokenizer.h"
#include "engine/tokenizer/unicode.h"
#include "nlohmann/json.hpp"

namespace pds::engine {
namespace {

using Json = nlohmann::ordered_json;

// FNV-1a over a key's bytes as written between its quotes: an additional key that hashes as a
// declared one is refused (it would escape that property's schema).
constexpr uint32_t kKeyHashStart = 2166136261u;
uint32_t KeyHash(uint32_t h, uint8_t c) { return (h ^ c) * 16777619u; }

void Set(std::vector<uint64_t>& bits, int32_t id) { bits[id >> 6] |= uint64_t{1} << (id & 63); }

constexpr absl::string_view kReasoningEnd = "</think>";  // as text, when not one token
constexpr int kMaxWhitespace = 16;       // consecutive whitespace characters between tokens
constexpr int kMaxNumberChars = 32;      // characters of one number
constexpr int kMaxNesting = 64;          // open objects and arrays, and schema nesting
constexpr int kMaxUnionDepth = 32;       // anyOf/$ref expansions for one value's first byte
constexpr size_t kMaxStates = 256;       // parser stacks kept alive at once
constexpr int kMaxExpansions = 4096;     // value starts one byte may try (anyOf fan-out)
constexpr size_t kMaxNodes = 20000;      // compiled schema nodes
constexpr int kMaxSchemaDepth = 128;     // nesting of the schema's JSON text
constexpr size_t kMaxAlternatives = 64;  // schemas of one anyOf/oneOf or type list
constexpr size_t kMaxProperties = 256;   // declared properties of one object
// Open frames of one parser stack: above what a schema nested kMaxNesting deep needs (root,
// containers, a string), so that only recursive schemas meet it.
constexpr size_t kMaxFrames = 2 * kMaxNesting + 2;

bool IsSpace(uint8_t c) { return c == ' ' || c == '\n' || c == '\t' || c == '\r'; }
// An ASCII byte that leaves an unconstrained string's content as it is.
bool IsPlain(uint8_t c) { return c >= 0x20 && c < 0x80 && c != '"' && c != '\\'; }

// The continuation bytes a UTF-8 lead byte needs, and the range of the first of them (the
// others are 0x80-0xBF); 0: not a lead byte.
int Utf8Lead(uint8_t c, uint8_t& lo, uint8_t& hi) {
  lo = 0x80;
  hi = 0xBF;
  if (c >= 0xC2 && c <= 0xDF) return 1;
  if (c >= 0xE0 && c <= 0xEF) {
    if (c == 0xE0) lo = 0xA0;  // no overlong forms
    if (c == 0xED) hi = 0x9F;  // no surrogates
    return 2;
  }
  if (c >= 0xF0 && c <= 0xF4) {
    if (c == 0xF0) lo = 0x90;
    if (c == 0xF4) hi = 0x8F;  // nothing past U+10FFFF
    return 3;
  }
  return 0;
}

// The characters of text that leaves an unconstrained string's content as it is (plain ASCII
// and whole UTF-8 characters); -1 for other text.
int PlainChars(const std::string& t) {
  int chars = 0;
  for (size_t i = 0; i < t.size(); ++chars) {
    const uint8_t c = static_cast<uint8_t>(t[i]);
    if (c < 0x80) {
      if (!IsPlain(c)) return -1;
      ++i;
      continue;
    }
    uint8_t lo, hi;
    const int n = Utf8Lead(c, lo, hi);
    if (n == 0 || i + n >= t.size()) return -1;  // not a lead byte, or cut short
    for (int k = 1; k <= n; ++k) {
      const uint8_t d = static_cast<uint8_t>(t[i + k]);
      if (d < (k == 1 ? lo : 0x80) || d > (k == 1 ? hi : 0xBF)) return -1;
    }
    i += n + 1;
  }
  return chars;
}

}  // namespace

// ---------------------------------------------------------------------------------------------
// The vocabulary trie.

struct TokenVocabulary::Trie {
  struct Edge {
    uint8_t byte;
    uint32_t child;
  };
  struct Node {
    uint32_t edge_begin = 0, edge_end = 0;    // into edges
    uint32_t token_begin = 0, token_end = 0;  // into tokens: those whose bytes end here
  };
  std::vector<Node> nodes;
  std::vector<Edge> edges;
  std::vector<int32_t> tokens;

  // `ids` sorted by their bytes; the node for the ids in [lo, hi), which share `depth` bytes.
  uint32_t Build(const std::vector<std::string>& bytes, const std::vector<int32_t>& ids, size_t lo,
                 size_t hi, size_t depth) {
    const uint32_t index = static_cast<uint32_t>(nodes.size());
    nodes.emplace_back();
    nodes[index].token_begin = static_cast<uint32_t>(tokens.size());
    while (lo < hi && bytes[ids[lo]].size() == depth) tokens.push_back(ids[lo++]);
    nodes[index].token_end = static_cast<uint32_t>(tokens.size());
    std::vector<Edge> children;
    while (lo < hi) {
      const uint8_t b = static_cast<uint8_t>(bytes[ids[lo]][depth]);
      size_t end = lo;
      while (end < hi && static_cast<uint8_t>(bytes[ids[end]][depth]) == b) ++end;
      children.push_back({b, Build(bytes, ids, lo, end, depth + 1)});
      lo = end;
    }
    nodes[index].edge_begin = static_cast<uint32_t>(edges.size());
    edges.insert(edges.end(), children.begin(), children.end());
    nodes[index].edge_end = static_cast<uint32_t>(edges.size());
    return index;
  }

  static std::unique_ptr<Trie> Of(const std::vector<std::string>& bytes, std::vector<int32_t> ids) {
    std::sort(ids.begin(), ids.end(), [&](int32_t x, int32_t y) {
      return bytes[x] < bytes[y] || (bytes[x] == bytes[y] && x < y);
    });
    auto trie = std::make_unique<Trie>();
    trie->Build(bytes, ids, 0, ids.size(), 0);
    return trie;
  }
};

TokenVocabulary::TokenVocabulary(std::vector<std::string> token_bytes, std::vector<bool> usable,
                                 std::vector<int32_t> stop_ids)
    : bytes_(std::move(token_bytes)), usable_(bytes_.size()), stop_ids_(std::move(stop_ids)) {
  std::vector<int32_t> all, special;
  std::vector<int> chars(bytes_.size(), -1);
  for (int32_t id = 0; id < size(); ++id) {
    // A stop token ends the text (allowed where it may end), whatever its bytes.
    usable_[id] = !bytes_[id].empty() && (static_cast<size_t>(id) >= usable.size() || usable[id]) &&
                  !IsStop(id);
    if (!usable_[id]) continue;
    all.push_back(id);
    chars[id] = PlainChars(bytes_[id]);
    (chars[id] >= 0 ? plain_ : special).push_back(id);
  }
  std::stable_sort(plain_.begin(), plain_.end(),
                   [&](int32_t x, int32_t y) { return chars[x] < chars[y]; });
  chars_ = chars;
  for (int32_t id : plain_) plain_chars_.push_back(chars[id]);
  all_ = Trie::Of(bytes_, std::move(all));
  special_ = Trie::Of(bytes_, std::move(special));
}

TokenVocabulary::~TokenVocabulary() = default;

std::shared_ptr<const TokenVocabulary> TokenVocabulary::FromTokenizer(
    const Tokenizer& tokenizer, std::vector<int32_t> stop_ids) {
  std::vector<std::string> bytes(tokenizer.vocab_size());
  std::vector<bool> usable(bytes.size());
  for (int32_t id = 0; id < tokenizer.vocab_size(); ++id) {
    usable[id] = !tokenizer.IsSpecial(id);
    if (usable[id]) bytes[id] = tokenizer.TokenBytes(id);
  }
  return std::make_shared<TokenVocabulary>(std::move(bytes), std::move(usable),
                                           std::move(stop_ids));
}

bool TokenVocabulary::IsStop(int32_t id) const {
  return std::find(stop_ids_.begin(), stop_ids_.end(), id) != stop_ids_.end();
}

// ---------------------------------------------------------------------------------------------
// Schemas.

struct JsonSchema::Node {
  enum Kind : uint8_t { kUnion, kObject, kArray, kString, kNumber, kInteger, kLiteral, kRegex };
  Kind kind = kUnion;
  std::vector<int> alts;                    // kUnion
  std::vector<std::string> keys;            // kObject: property names as JSON text, quotes included
  std::vector<int> values;                  // kObject: their schemas
  std::vector<uint8_t> required;            // kObject
  int additional = -1;                      // kObject: schema of other members; -1: none
  int items = -1;                           // kArray
  int64_t min_items = 0, max_items = -1;    // kArray (max_items counts the prefix's when no
                                            // items may follow it); kObject: min/maxProperties
  std::vector<int> prefix;                  // kArray: the schemas of its first items (tuples)
  int64_t min_length = 0, max_length = -1;  // kString, in characters
  std::vector<std::string> literals;        // kLiteral: compact JSON texts, sorted
  std::vector<uint32_t> key_hashes;         // kObject: KeyHash of each key's text
  // kString: what its content must match (pattern or format; null: anything); kRegex: the
  // whole text's.
  std::shared_ptr<const ByteDfa> dfa;
};

JsonSchema::JsonSchema() = default;
// Bytes of token sets cached by all schemas of the process, and the most they may hold.
std::atomic<int64_t> g_cached_token_bytes{0};
constexpr int64_t kMaxCachedTokenBytes = int64_t{512} << 20;

JsonSchema::~JsonSchema() { g_cached_token_bytes -= tokens_bytes_; }

std::shared_ptr<const JsonSchema::TokenSet> JsonSchema::Tokens(
    int node, int32_t state, const std::shared_ptr<const TokenVocabulary>& vocab,
    const std::function<void(TokenSet&)>& fill) const {
  constexpr size_t kMaxCached = 4096;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (tokens_vocab_ != vocab) {
      tokens_.clear();
      g_cached_token_bytes -= tokens_bytes_;
      tokens_bytes_ = 0;
      tokens_vocab_ = vocab;
    }
    if (auto it = tokens_.find({node, state}); it != tokens_.end()) return it->second;
  }
  auto bits = std::make_shared<TokenSet>();
  fill(*bits);  // unlocked: another request may fill the same state meanwhile, to the same bits
  std::lock_guard<std::mutex> lock(mu_);
  const int64_t bytes = static_cast<int64_t>(bits->bits.size() * sizeof(uint64_t));
  if (tokens_vocab_ == vocab && tokens_.size() < kMaxCached && !tokens_.contains({node, state})) {
    if (g_cached_token_bytes.fetch_add(bytes) + bytes <= kMaxCachedTokenBytes) {
      tokens_.try_emplace({node, state}, bits);
      tokens_bytes_ += bytes;
    } else {
      g_cached_token_bytes -= bytes;  // over the process's budget: not kept
    }
  }
  return bits;
}

absl::StatusOr<std::shared_ptr<const JsonSchema>> JsonSchema::Regex(absl::string_view pattern) {
  PDS_ASSIGN_OR_RETURN(std::shared_ptr<const ByteDfa> dfa,
                       ByteDfa::Compile(pattern, ByteDfa::Mode::kFullMatch));
  std::shared_ptr<JsonSchema> out(new JsonSchema());
  Node node;
  node.kind = Node::kRegex;
  node.dfa = std::move(dfa);
  out->nodes_.push_back(std::move(node));
  return std::shared_ptr<const JsonSchema>(std::move(out));
}

class SchemaCompiler {
 public:
  SchemaCompiler(JsonSchema& out, const Json& root) : out_(out), root_(root) {}

  // `type`: the one type of a type list being compiled (s's own "type" otherwise).
  absl::StatusOr<int> Compile(const Json& s, const std::string& where, int depth,
                              const Json* type_override = nullptr) {
    if (depth > kMaxNesting) return Error(where, "nested deeper than 64 schemas");
    PDS_RETURN_IF_ERROR(CheckSize(where));
    if (s.is_boolean()) {
      if (s.get<bool>()) return Any();
      return Error(where, "the schema false accepts nothing");
    }
    if (!s.is_object()) return Error(where, "a schema must be an object or a boolean");
    for (const auto& [key, value] : s.items()) {
      if (!kKnown.contains(key)) {
        return Error(where, absl::StrCat("the keyword '", key, "' is not supported"));
      }
    }
    // A $ref wins over the keywords beside it, but enum and const, whose values it filters
    // (below, with the others beside them), unless a combinator is there too.
    if (auto ref = s.find("$ref");
        ref != s.end() && ((!s.contains("enum") && !s.contains("const")) || s.contains("anyOf") ||
                           s.contains("oneOf") || s.contains("allOf"))) {
      return Ref(*ref, where, depth);
    }
    if (auto all = s.find("allOf"); all != s.end()) {
      if (!all->is_array() || all->size() != 1 || Structural(s, "allOf")) {
        return Error(where, "allOf is supported only as the one keyword, with one schema");
      }
      return Compile((*all)[0], where + "/allOf/0", depth + 1);
    }
    for (const char* key : {"anyOf", "oneOf"}) {
      auto alts = s.find(key);
      if (alts == s.end()) continue;
      if (!alts->is_array() || alts->empty() || Structural(s, key)) {
        return Error(where, absl::StrCat(key,
                                         " must be a non-empty array, without other "
                                         "keywords beside it (but annotations)"));
      }
      if (alts->size() > kMaxAlternatives) {
        return Error(where, absl::StrCat(key, " has more than 64 schemas"));
      }
      JsonSchema::Node node;
      for (size_t i = 0; i < alts->size(); ++i) {
        PDS_ASSIGN_OR_RETURN(int alt,
                             Compile((*alts)[i], absl::StrCat(where, "/", key, "/", i), depth + 1));
        node.alts.push_back(alt);
      }
      return Add(std::move(node));
    }
    auto e = s.find("enum");
    auto c = s.find("const");
    if (e != s.end() || c != s.end()) {
      std::vector<std::string> texts;
      if (e != s.end()) {
        if (!e->is_array() || e->empty()) return Error(where, "enum must be a non-empty array");
        for (const Json& v : *e) {
          if (c == s.end() || v == *c) texts.push_back(v.dump());
        }
        if (texts.empty()) return Error(where, "const is not one of the enum's values");
      } else {
        texts.push_back(c->dump());
      }
      const int literals = Literals(std::move(texts));
      // The other keywords beside them hold too: only the values they allow stay (checked
      // once the whole schema is compiled, by matching each value against them).
      Json rest = s;
      rest.erase("enum");
      rest.erase("const");
      if (Structural(rest, "")) {
        PDS_ASSIGN_OR_RETURN(const int other, Compile(rest, where, depth + 1));
        checks_.push_back({literals, other, where});
      }
      return literals;
    }
    const Json* type = type_override;
    if (type == nullptr) {
      if (auto t = s.find("type"); t != s.end()) type = &*t;
    }
    if (type != nullptr && type->is_array()) {  // one schema per type
      if (type->empty()) return Error(where, "type must not be an empty list");
      if (type->size() > kMaxAlternatives) return Error(where, "more than 64 types listed");
      JsonSchema::Node node;
      for (const Json& t : *type) {
        if (!t.is_string()) return Error(where, "type must be a string or a list of them");
        PDS_ASSIGN_OR_RETURN(int alt, Compile(s, where, depth + 1, &t));
        node.alts.push_back(alt);
      }
      return Add(std::move(node));
    }
    std::string kind;
    if (type != nullptr) {
      if (!type->is_string()) return Error(where, "type must be a string or a list of them");
      kind = type->get<std::string>();
    } else if (s.contains("properties") || s.contains("required") ||
               s.contains("additionalProperties") || s.contains("minProperties") ||
               s.contains("maxProperties")) {
      kind = "object";
    } else if (s.contains("items") || s.contains("minItems") || s.contains("maxItems") ||
               s.contains("prefixItems")) {
      kind = "array";
    } else if (s.contains("minLength") || s.contains("maxLength") || s.contains("pattern")) {
      kind = "string";
    } else if (s.contains("minimum") || s.contains("maximum") || s.contains("exclusiveMinimum") ||
               s.contains("exclusiveMaximum") || s.contains("multipleOf")) {
      kind = "number";
    } else {
      return Any();
    }
    if (kind == "object") return Object(s, where, depth);
    if (kind == "array") return Array(s, where, depth);
    JsonSchema::Node node;
    if (kind == "string") {
      node.kind = JsonSchema::Node::kString;
      PDS_RETURN_IF_ERROR(Count(s, "minLength", where, node.min_length));
      PDS_RETURN_IF_ERROR(Count(s, "maxLength", where, node.max_length));
      if (node.max_length >= 0 && node.min_length > node.max_length) {
        return Error(where, "minLength is above maxLength");
      }
      PDS_RETURN_IF_ERROR(Pattern(s, where, node));
    } else if (kind == "number" || kind == "integer") {
      node.kind = kind == "number" ? JsonSchema::Node::kNumber : JsonSchema::Node::kInteger;
      PDS_RETURN_IF_ERROR(Bounds(s, where, node));
      PDS_RETURN_IF_ERROR(Multiple(s, where, node));
    } else if (kind == "boolean" || kind == "null") {
      return Literals(kind == "null" ? std::vector<std::string>{"null"}
                                     : std::vector<std::string>{"true", "false"});
    } else {
      return Error(where, absl::StrCat("unknown type '", kind, "'"));
    }
    return Add(std::move(node));
  }

  // Any JSON value (its node made once).
  int Any() {
    if (any_ >= 0) return any_;
    any_ = Add(JsonSchema::Node());
    JsonSchema::Node object;
    object.kind = JsonSchema::Node::kObject;
    object.additional = any_;
    JsonSchema::Node array;
    array.kind = JsonSchema::Node::kArray;
    array.items = any_;
    JsonSchema::Node string, number, literal;
    string.kind = JsonSchema::Node::kString;
    number.kind = JsonSchema::Node::kNumber;
    literal.kind = JsonSchema::Node::kLiteral;
    literal.literals = {"false", "null", "true"};  // sorted, as Literals keeps them
    std::vector<int> alts;
    for (JsonSchema::Node* n : {&object, &array, &string, &number, &literal}) {
      alts.push_back(Add(std::move(*n)));
    }
    out_.nodes_[any_].alts = std::move(alts);
    return any_;
  }

 private:
  // clang-format off
  inline static const absl::flat_hash_set<std::string> kKnown = {
      "type", "properties", "required", "additionalProperties", "minProperties", "maxProperties",
      "items", "prefixItems", "additionalItems", "minItems", "maxItems", "minLength", "maxLength",
      "pattern", "format", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "enum",
      "const", "anyOf", "oneOf", "allOf", "$ref", "$defs", "definitions", "title", "description",
      "default", "examples", "$schema", "$id", "$comment", "multipleOf"};
  // clang-format on
  inline static const absl::flat_hash_set<std::string> kAnnotations = {
      "title", "description", "default", "examples",   "$schema",
      "$id",   "$comment",    "$defs",   "definitions"};

  static absl::Status Error(const std::string& where, absl::string_view why) {
    return absl::InvalidArgumentError(
        absl::StrCat("json_schema at '", where.empty() ? "/" : where, "': ", why));
  }
  // Whether `s` has keywords that shape values beside `key`.
  static bool Structural(const Json& s, const std::string& key) {
    for (const auto& [k, v] : s.items()) {
      if (k != key && !kAnnotations.contains(k)) return true;
    }
    return false;
  }
  static absl::Status Count(const Json& s, const char* key, const std::string& where,
                            int64_t& out) {
    auto it = s.find(key);
    if (it == s.end()) return absl::OkStatus();
    if (!it->is_number_unsigned()) {
      return Error(where, absl::StrCat(key, " must be a non-negative integer"));
    }
    out = static_cast<int64_t>(std::min<uint64_t>(it->get<uint64_t>(), 1u << 30));
    return absl::OkStatus();
  }

  // A string's pattern (searched for, as JSON Schema reads it) and the regular expression of
  // its format where it has one (see Format; other formats are annotations), intersected when
  // both are there. The string's length bounds go into the automaton where they can (up to
  // 1000 characters), so that its distances to a match count them.
  absl::Status Pattern(const Json& s, const std::string& where, JsonSchema::Node& node) {
    std::shared_ptr<const ByteDfa> dfa;
    auto pattern = s.find("pattern");
    if (pattern != s.end()) {
      if (!pattern->is_string()) return Error(where, "pattern must be a string");
      auto compiled =
          ByteDfa::Compile(pattern->get<std::string>(), ByteDfa::Mode::kSearch, &work_left_);
      if (!compiled.ok()) return Error(where, compiled.status().message());
      dfa = *std::move(compiled);
    }
    auto format = Format(s);
    if (!format.ok()) return Error(where, format.status().message());
    if (*format != nullptr && dfa != nullptr) {
      auto both = ByteDfa::Intersect(*dfa, **format);
      if (!both.ok()) {
        return Error(where, absl::StrContains(both.status().message(), "matches nothing")
                                ? "no string of its format matches its pattern"
                                : "its pattern and format together need over 4096 states");
      }
      dfa = *std::move(both);
    } else if (*format != nullptr) {
      dfa = *std::move(format);
    }
    if (dfa == nullptr) return absl::OkStatus();
    if (node.min_length > 0 && node.min_length <= 1000 && node.max_length <= 1000) {
      auto lengths = ByteDfa::Compile(
          absl::StrCat("[\\s\\S]{", node.min_length, ",",
                       node.max_length >= 0 ? absl::StrCat(node.max_length) : "", "}"),
          ByteDfa::Mode::kFullMatch, &work_left_);
      auto both = lengths.ok() ? ByteDfa::Intersect(*dfa, **lengths) : lengths.status();
      if (both.ok()) {
        dfa = *std::move(both);
      } else if (absl::StrContains(both.status().message(), "matches nothing")) {
        return Error(where, "no string within minLength and maxLength matches its pattern");
      }  // else too many states: the lengths are counted beside the automaton
    }
    if (node.max_length >= 0 && dfa->CharsToAccept(dfa->start()) > node.max_length) {
      return Error(where, "no string within maxLength matches its pattern");
    }
    node.dfa = std::move(dfa);
    return absl::OkStatus();
  }
  // The automaton of a string format with one; null for other formats (annotations).
  absl::StatusOr<std::shared_ptr<const ByteDfa>> Format(const Json& s) {
    auto format = s.find("format");
    if (format == s.end() || !format->is_string()) return nullptr;
    static const auto* const kFormats = new absl::flat_hash_map<std::string, std::string>{
        {"date", kDate},
        {"time", kTime},
        {"date-time", absl::StrCat(kDate, "T", kTime)},
        {"uuid", "[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"},
        {"ipv4",
         "((25[0-5]|2[0-4]\\d|1\\d\\d|[1-9]?\\d)\\.){3}(25[0-5]|2[0-4]\\d|1\\d\\d|[1-9]?\\d)"},
        {"email", "[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(\\.[A-Za-z0-9-]+)+"},
        {"hostname", absl::StrCat(kLabel, "(\\.", kLabel, ")*")},
        {"ipv6", Ipv6()},
        {"duration", Duration()}};
    auto it = kFormats->find(format->get<std::string>());
    if (it == kFormats->end()) return nullptr;
    return ByteDfa::Compile(it->second, ByteDfa::Mode::kFullMatch, &work_left_);
  }
  // RFC 1123 host name labels (the name's 253-character limit is not held).
  static constexpr const char* kLabel = "[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?";
  // RFC 4291 section 2.2 text forms (RFC 3986's IPv6address): 8 groups, or fewer around one ::,
  // the last two possibly an IPv4 address.
  static std::string Ipv6() {
    const std::string h16 = "[0-9A-Fa-f]{1,4}";
    const std::string v4 =
        "((25[0-5]|2[0-4]\\d|1\\d\\d|[1-9]?\\d)\\.){3}(25[0-5]|2[0-4]\\d|1\\d\\d|[1-9]?\\d)";
    const std::string ls32 = absl::StrCat("(", h16, ":", h16, "|", v4, ")");
    auto before = [&](int k) {  // up to k + 1 groups before the ::
      return absl::StrCat("((", h16, ":){0,", k, "}", h16, ")?");
    };
    std::vector<std::string> forms = {absl::StrCat("(", h16, ":){6}", ls32),
                                      absl::StrCat("::(", h16, ":){5}", ls32)};
    for (int tail = 4; tail >= 0; --tail) {  // groups after the :: (then ls32)
      forms.push_back(absl::StrCat(before(4 - tail), "::(", h16, ":){", tail, "}", ls32));
    }
    forms.push_back(absl::StrCat(before(5), "::", h16));
    forms.push_back(absl::StrCat(before(6), "::"));
    return absl::StrCat("(", absl::StrJoin(forms, "|"), ")");
  }
  // ISO 8601 durations as RFC 3339 appendix A writes them (P1Y2M3DT4H5M6S, P3W, PT0S, ...).
  static std::string Duration() {
    const std::string time = "T(\\d+H(\\d+M(\\d+S)?)?|\\d+M(\\d+S)?|\\d+S)";
    const std::string date = "(\\d+D|\\d+M(\\d+D)?|\\d+Y(\\d+M(\\d+D)?)?)";
    return absl::StrCat("P(", date, "(", time, ")?|", time, "|\\d+W)");
  }
  // RFC 3339 full-date: a day the month has (February 29 in leap years only).
  static constexpr const char* kDate =
      "(\\d{4}-((0[13578]|1[02])-(0[1-9]|[12]\\d|3[01])|(0[469]|11)-(0[1-9]|[12]\\d|30)|"
      "02-(0[1-9]|1\\d|2[0-8]))|(\\d\\d(0[48]|[2468][048]|[13579][26])|"
      "([02468][048]|[13579][26])00)-02-29)";
  static constexpr const char* kTime =
      "([01]\\d|2[0-3]):[0-5]\\d:([0-5]\\d|60)(\\.\\d{1,9})?(Z|[+-]([01]\\d|2[0-3]):[0-5]\\d)";

  // A number's bounds (minimum, maximum, exclusiveMinimum, exclusiveMaximum as numbers, or as
  // draft 4's booleans beside minimum and maximum) as the automaton of the texts within them.
  static absl::Status Bounds(const Json& s, const std::string& where, JsonSchema::Node& node) {
    const bool integer = node.kind == JsonSchema::Node::kInteger;
    auto flag = [&](const char* key) {
      auto it = s.find(key);
      return it != s.end() && it->is_boolean() && it->get<bool>();
    };
    struct Side {
      const char* key;
      bool upper, exclusive;
    };
    for (const Side& side :
         {Side{"minimum", false, flag("exclusiveMinimum")},
          Side{"maximum", true, flag("exclusiveMaximum")}, Side{"exclusiveMinimum", false, true},
          Side{"exclusiveMaximum", true, true}}) {
      auto it = s.find(side.key);
      if (it == s.end()) continue;
      if (it->is_boolean() && absl::StartsWith(side.key, "exclusive")) continue;  // draft 4
      if (!it->is_number()) return Error(where, absl::StrCat(side.key, " must be a number"));
      const NumberBound bound{it->dump(), side.exclusive};
      auto dfa = side.upper ? NumberRange(std::nullopt, bound, integer)
                            : NumberRange(bound, std::nullopt, integer);
      if (!dfa.ok()) return Error(where, absl::StrCat(side.key, ": ", dfa.status().message()));
      if (*dfa == nullptr) continue;  // no bound for what a number can write
      if (node.dfa == nullptr) {
        node.dfa = *std::move(dfa);
        continue;
      }
      auto both = ByteDfa::Intersect(*node.dfa, **dfa);
      if (!both.ok()) {
        return Error(where, absl::StrCat("no ", integer ? "integer" : "number",
                                         " is within its minimum and maximum"));
      }
      node.dfa = *std::move(both);
    }
    if (node.dfa != nullptr && node.dfa->CharsToAccept(node.dfa->start()) > kMaxNumberChars) {
      return Error(where, "every number within its bounds needs more than 32 characters");
    }
    return absl::OkStatus();
  }

  // multipleOf, intersected with the bounds' automaton.
  static absl::Status Multiple(const Json& s, const std::string& where, JsonSchema::Node& node) {
    auto it = s.find("multipleOf");
    if (it == s.end()) return absl::OkStatus();
    if (!it->is_number()) return Error(where, "multipleOf must be a number");
    auto dfa = MultipleOf(it->dump(), node.kind == JsonSchema::Node::kInteger);
    if (!dfa.ok()) return Error(where, dfa.status().message());
    if (*dfa == nullptr) return absl::OkStatus();
    if (node.dfa == nullptr) {
      node.dfa = *std::move(dfa);
      return absl::OkStatus();
    }
    auto both = ByteDfa::Intersect(*node.dfa, **dfa);
    if (!both.ok()) {
      return Error(where, absl::StrContains(both.status().message(), "matches nothing")
                              ? absl::StrCat("no multiple of ", it->dump(),
                                             " is within its minimum and maximum")
                              : absl::StrCat("multipleOf ", it->dump(),
                                             " with its minimum and maximum needs an automaton "
                                             "of over 4096 states"));
    }
    node.dfa = *std::move(both);
    if (node.dfa->CharsToAccept(node.dfa->start()) > kMaxNumberChars) {
      return Error(where, absl::StrCat("every multiple of ", it->dump(),
                                       " within its bounds needs more than 32 characters"));
    }
    return absl::OkStatus();
  }

  // A node of literal JSON texts, sorted and without repeats: a literal frame follows the run
  // of them that share what was written so far.
  int Literals(std::vector<std::string> texts) {
    std::sort(texts.begin(), texts.end());
    texts.erase(std::unique(texts.begin(), texts.end()), texts.end());
    JsonSchema::Node node;
    node.kind = JsonSchema::Node::kLiteral;
    node.literals = std::move(texts);
    return Add(std::move(node));
  }

  int Add(JsonSchema::Node node) {
    out_.nodes_.push_back(std::move(node));
    return static_cast<int>(out_.nodes_.size()) - 1;
  }
  absl::Status CheckSize(const std::string& where) const {
    if (out_.nodes_.size() <= kMaxNodes) return absl::OkStatus();
    return Error(where, "the schema compiles to more than 20000 nodes");
  }

  absl::StatusOr<int> Ref(const Json& ref, const std::string& where, int depth) {
    if (!ref.is_string()) return Error(where, "$ref must be a string");
    const std::string r = ref.get<std::string>();
    if (auto it = refs_.find(r); it != refs_.end()) return it->second;
    if (r != "#" && r.rfind("#/", 0) != 0) {
      return Error(where, absl::StrCat("$ref '", r, "' is not # or a pointer into this schema"));
    }
    const Json* target = nullptr;
    try {
      target = &root_.at(Json::json_pointer(r.substr(1)));
    } catch (const std::exception&) {
      return Error(where, absl::StrCat("$ref '", r, "' names nothing in the schema"));
    }
    const int placeholder = Add(JsonSchema::Node());  // a union of one: the target, once known
    refs_[r] = placeholder;
    PDS_ASSIGN_OR_RETURN(int compiled, Compile(*target, r.substr(1), depth + 1));
    if (compiled == placeholder) {
      return Error(where, absl::StrCat("$ref '", r, "' refers only to itself"));
    }
    out_.nodes_[placeholder].alts = {compiled};
    return placeholder;
  }

  // A declared member `name` (optional) whose value is node `value`.
  static void AddKey(JsonSchema::Node& node, const std::string& name, int value) {
    node.keys.push_back(Json(name).dump());
    uint32_t h = kKeyHashStart;
    for (size_t k = 1; k + 1 < node.keys.back().size(); ++k) {
      h = KeyHash(h, static_cast<uint8_t>(node.keys.back()[k]));
    }
    node.key_hashes.push_back(h);
    node.values.push_back(value);
    node.required.push_back(0);
  }

  absl::StatusOr<int> Object(const Json& s, const std::string& where, int depth) {
    JsonSchema::Node node;
    node.kind = JsonSchema::Node::kObject;
    std::vector<std::string> names;
    if (auto props = s.find("properties"); props != s.end()) {
      if (!props->is_object()) return Error(where, "properties must be an object");
      if (props->size() > kMaxProperties) {
        return Error(where, "more than 256 properties (each optional one is a parser state)");
      }
      for (const auto& [name, schema] : props->items()) {
        PDS_ASSIGN_OR_RETURN(int v,
                             Compile(schema, absl::StrCat(where, "/properties/", name), depth + 1));
        names.push_back(name);
        AddKey(node, name, v);
      }
    }
    auto extra = s.find("additionalProperties");
    if (extra == s.end()) {
      // Strict by default when properties are listed (as OpenAI's strict mode); any members
      // for a bare {"type": "object"}.
      node.additional = s.contains("properties") ? -1 : Any();
    } else if (extra->is_boolean()) {
      node.additional = extra->get<bool>() ? Any() : -1;
    } else {
      PDS_ASSIGN_OR_RETURN(node.additional,
                           Compile(*extra, where + "/additionalProperties", depth + 1));
    }
    if (auto req = s.find("required"); req != s.end()) {
      if (!req->is_array()) return Error(where, "required must be an array of names");
      for (const Json& r : *req) {
        if (!r.is_string()) return Error(where, "required must be an array of names");
        auto at = std::find(names.begin(), names.end(), r.get<std::string>());
        if (at == names.end()) {
          // Not among the properties: an additional one, which must then be there (its value
          // as additionalProperties says; any, where that is left out).
          if (extra != s.end() && extra->is_boolean() && !extra->get<bool>()) {
            return Error(where, absl::StrCat("required names ", r.dump(),
                                             ", which is not one of the properties, and "
                                             "additionalProperties is false"));
          }
          if (names.size() >= kMaxProperties) {
            return Error(where, "more than 256 properties (each optional one is a parser state)");
          }
          AddKey(node, r.get<std::string>(),
                 extra != s.end() && extra->is_object() ? node.additional : Any());
          names.push_back(r.get<std::string>());
          at = names.end() - 1;
        }
        node.required[at - names.begin()] = 1;
      }
    }
    PDS_RETURN_IF_ERROR(Count(s, "minProperties", where, node.min_items));
    PDS_RETURN_IF_ERROR(Count(s, "maxProperties", where, node.max_items));
    const int64_t required = std::count(node.required.begin(), node.required.end(), 1);
    if (node.max_items >= 0 && std::max(node.min_items, required) > node.max_items) {
      return Error(where, "maxProperties is below minProperties or the required properties");
    }
    if (node.additional < 0 && node.min_items > static_cast<int64_t>(node.keys.size())) {
      return Error(where, "minProperties is above the properties allowed");
    }
    return Add(std::move(node));
  }

  absl::StatusOr<int> Array(const Json& s, const std::string& where, int depth) {
    JsonSchema::Node node;
    node.kind = JsonSchema::Node::kArray;
    // Tuples: prefixItems (2020-12) then items, or items as a list (drafts 4-7) then
    // additionalItems; false after them: no more items.
    auto items = s.find("items");
    const char* prefix_key = "prefixItems";
    const char* rest_key = "items";
    auto prefix = s.find("prefixItems");
    if (items != s.end() && items->is_array()) {
      if (prefix != s.end()) return Error(where, "items as a list beside prefixItems");
      prefix = items;
      prefix_key = "items";
      rest_key = "additionalItems";
      items = s.find("additionalItems");
    }
    if (prefix != s.end()) {
      if (!prefix->is_array()) return Error(where, absl::StrCat(prefix_key, " must be a list"));
      if (prefix->size() > kMaxProperties) {
        return Error(where, absl::StrCat(prefix_key, " has more than 256 schemas"));
      }
      for (size_t i = 0; i < prefix->size(); ++i) {
        PDS_ASSIGN_OR_RETURN(
            int item,
            Compile((*prefix)[i], absl::StrCat(where, "/", prefix_key, "/", i), depth + 1));
        node.prefix.push_back(item);
      }
    }
    if (items == s.end() || (items->is_boolean() && items->get<bool>())) {
      node.items = Any();
    } else if (items->is_boolean()) {
      node.items = -1;
    } else {
      PDS_ASSIGN_OR_RETURN(node.items,
                           Compile(*items, absl::StrCat(where, "/", rest_key), depth + 1));
    }
    PDS_RETURN_IF_ERROR(Count(s, "minItems", where, node.min_items));
    PDS_RETURN_IF_ERROR(Count(s, "maxItems", where, node.max_items));
    if (node.items < 0) {
      const int64_t most = static_cast<int64_t>(node.prefix.size());
      node.max_items = node.max_items < 0 ? most : std::min(node.max_items, most);
      if (node.min_items > most) {
        return Error(where, absl::StrCat("minItems is above the ", most, " items allowed"));
      }
    }
    if (node.max_items >= 0 && node.min_items > node.max_items) {
      return Error(where, "minItems is above maxItems");
    }
    return Add(std::move(node));
  }

  JsonSchema& out_;
  const Json& root_;
  absl::flat_hash_map<std::string, int> refs_;
  int any_ = -1;

 public:
  // Literal nodes (enum, const) whose values must also match another node (the keywords
  // beside them), and where they are.
  struct LiteralCheck {
    int literals, other;
    std::string where;
  };
  std::vector<LiteralCheck> checks_;
  size_t work_left_ = 100'000'000;  // the schema's patterns' compilation, all together
};

absl::StatusOr<std::shared_ptr<const JsonSchema>> JsonSchema::Compile(absl::string_view schema) {
  if (JsonTextDepth(schema) > kMaxSchemaDepth) {
    return absl::InvalidArgumentError("json_schema nests arrays and objects deeper than 128");
  }
  const Json root = Json::parse(schema, nullptr, /*allow_exceptions=*/false);
  if (root.is_discarded()) return absl::InvalidArgumentError("json_schema is not valid JSON");
  std::shared_ptr<JsonSchema> out(new JsonSchema());
  SchemaCompiler compiler(*out, root);
  PDS_ASSIGN_OR_RETURN(out->root_, compiler.Compile(root, "", 0));
  if (out->nodes_.size() > kMaxNodes) {
    return absl::InvalidArgumentError("json_schema compiles to more than 20000 nodes");
  }
  // A union that reaches itself through unions alone ($refs in a cycle with no object or array
  // between) could never start a value.
  std::vector<uint8_t> state(out->nodes_.size(), 0);  // 1: on the path, 2: done
  for (size_t start = 0; start < out->nodes_.size(); ++start) {
    if (state[start] != 0) continue;
    std::vector<std::pair<int, size_t>> path = {{static_cast<int>(start), 0}};
    state[start] = 1;
    while (!path.empty()) {
      auto& [node, next] = path.back();
      const JsonSchema::Node& n = out->nodes_[node];
      if (n.kind != JsonSchema::Node::kUnion || next == n.alts.size()) {
        state[node] = 2;
        path.pop_back();
        continue;
      }
      const int alt = n.alts[next++];
      if (state[alt] == 1) {
        return absl::InvalidArgumentError(
            "json_schema: $ref cycle with nothing between (a schema that is only itself)");
      }
      if (state[alt] == 0) {
        state[alt] = 1;
        path.emplace_back(alt, 0);
      }
    }
  }
  // enum/const values the keywords beside them refuse are dropped: each value's text is fed
  // byte by byte to a matcher rooted at those keywords' node.
  if (!compiler.checks_.empty()) {
    static const auto* const bytes = [] {
      std::vector<std::string> b(257);
      std::vector<bool> usable(257, true);
      for (int i = 0; i < 256; ++i) b[i] = std::string(1, static_cast<char>(i));
      b[256] = "</s>";
      usable[256] = false;
      return new std::shared_ptr<const TokenVocabulary>(std::make_shared<TokenVocabulary>(
          std::move(b), std::move(usable), std::vector<int32_t>{256}));
    }();
    const int root = out->root_;
    for (const SchemaCompiler::LiteralCheck& check : compiler.checks_) {
      out->root_ = check.other;
      std::vector<std::string> kept;
      for (const std::string& text : out->nodes_[check.literals].literals) {
        JsonMatcher m(out, *bytes);
        bool ok = true;
        for (char ch : text) ok = ok && m.Accept(static_cast<uint8_t>(ch));
        if (ok && m.CanEnd()) kept.push_back(text);
      }
      if (kept.empty()) {
        return absl::InvalidArgumentError(
            absl::StrCat("json_schema at '", check.where.empty() ? "/" : check.where,
                         "': no value of its enum or const is allowed by its other keywords"));
      }
      out->nodes_[check.literals].literals = std::move(kept);
    }
    out->root_ = root;
  }
  return std::shared_ptr<const JsonSchema>(std::move(out));
}

// ---------------------------------------------------------------------------------------------
// Matching.

struct JsonMatcher::Frame {
  enum Kind : uint8_t { kRoot, kObject, kArray, kString, kNumber, kLiteral, kKey, kRegex };
  uint8_t kind = kRoot;
  uint8_t phase = 0;
  uint8_t ws = 0;    // whitespace characters in a row
  int32_t node = 0;  // schema node (a key's: its object's; an additional key's string:
                     // -(its object's) - 2)
  int32_t a = 0;     // object: next declared property; key: which; literal: the first of the
                     // run of literals still possible; string/number: length
  int32_t b = 0;     // object/array: members so far; literal/key: bytes matched; string: hex
                     // digits, or a character's continuation bytes still to come
  int32_t cur = -1;  // object: the property whose value comes next (-1: an additional one);
                     // literal: the end of its run; string: the next continuation byte's range
                     // (lo << 8 | hi), or a \u escape's value so far
  uint32_t h = 0;    // an additional key's string: KeyHash of its bytes so far; a pattern
                     // string: a high surrogate's value while its low half comes
  int32_t rx = -1;   // a pattern string's or a regex's automaton state

  auto Tie() const { return std::tie(kind, phase, ws, node, a, b, cur, h, rx); }
  bool operator==(const Frame& o) const { return Tie() == o.Tie(); }
  bool operator<(const Frame& o) const { return Tie() < o.Tie(); }
};

namespace {

using Frame = JsonMatcher::Frame;
using Stack = JsonMatcher::Stack;
using Node = JsonSchema::Node;

enum : uint8_t { kRootBefore, kRootDone };
enum : uint8_t { kObjStart, kObjNext, kObjColon, kObjValue, kObjAfter };
enum : uint8_t { kArrStart, kArrNext, kArrAfter };
// kStrLowSlash, kStrLowU, kStrHexLow: after a high surrogate's \uD800-\uDBFF, its low half.
enum : uint8_t { kStrContent, kStrEscape, kStrHex, kStrLowSlash, kStrLowU, kStrHexLow };
enum : uint8_t { kNumMinus, kNumZero, kNumInt, kNumDot, kNumFrac, kNumE, kNumESign, kNumExp };

bool NumberMayEnd(uint8_t phase) {
  return phase == kNumZero || phase == kNumInt || phase == kNumFrac || phase == kNumExp;
}

// The grammar's moves over the nodes of one schema.
class Moves {
 public:
  Moves(const std::vector<Node>& nodes, int root) : nodes_(nodes), root_(root) {}

  // Appends to `out` every stack `s` becomes after byte c.
  void Advance(Stack s, uint8_t c, std::vector<Stack>& out) const {
    Frame& f = s.back();
    switch (f.kind) {
      case Frame::kRoot: {
        if (f.phase == kRootDone) return;
        if (IsSpace(c)) {
          if (f.ws++ < kMaxWhitespace) out.push_back(std::move(s));
          return;
        }
        f.phase = kRootDone;
        f.ws = 0;
        int budget = kMaxExpansions;
        StartValue(std::move(s), root_, c, out, 0, budget);
        return;
      }
      case Frame::kKey: {
        const std::string& text = nodes_[f.node].keys[f.a];
        if (static_cast<uint8_t>(text[f.b]) != c) return;
        if (static_cast<size_t>(++f.b) == text.size()) s.pop_back();
        out.push_back(std::move(s));
        return;
      }
      case Frame::kLiteral: {
        const std::vector<std::string>& lits = nodes_[f.node].literals;
        const auto [lo, hi] = Run(lits, f.a, f.cur, f.b, c);
        const bool may_end = LiteralMayEnd(f);
        if (lo < hi) {
          Stack t = may_end ? s : std::move(s);
          Frame& g = t.back();
          g.a = lo;
          g.cur = hi;
          ++g.b;
          if (hi - lo == 1 && lits[lo].size() == static_cast<size_t>(g.b)) t.pop_back();
          out.push_back(std::move(t));
        }
        if (may_end) {  // a shorter literal is complete: what encloses it takes the byte
          s.pop_back();
          Advance(std::move(s), c, out);
        }
        return;
      }
      case Frame::kString: {
        // An additional key of an object with declared ones: not one of their names.
        const bool hashed = f.node <= -2 && !nodes_[-f.node - 2].keys.empty();
        if (hashed && f.phase == kStrContent && f.b == 0 && c == '"') {
          const std::vector<uint32_t>& declared = nodes_[-f.node - 2].key_hashes;
          if (std::find(declared.begin(), declared.end(), f.h) != declared.end()) return;
        }
        if (String(f, c)) {
          if (f.b == -1) {
            s.pop_back();  // closed
          } else if (hashed) {
            f.h = KeyHash(f.h, c);
          }
          out.push_back(std::move(s));
        }
        return;
      }
      case Frame::kNumber: {
        if (const ByteDfa* dfa = nodes_[f.node].dfa.get()) {  // within bounds
          const int32_t rx = dfa->Next(f.rx, c);
          if (rx >= 0 && f.a + 1 + dfa->CharsToAccept(rx) <= kMaxNumberChars) {
            f.rx = rx;
            ++f.a;
            out.push_back(std::move(s));
          } else if (dfa->Accepting(f.rx)) {
            s.pop_back();
            Advance(std::move(s), c, out);
          }
          return;
        }
        const uint8_t next = NumberNext(f, c);
        // Within the length, with room left to end: a '.', 'e' or sign needs a digit after it.
        const bool room = NumberMayEnd(next) ? f.a < kMaxNumberChars : f.a + 1 < kMaxNumberChars;
        if (next != 0xFF && room) {
          f.phase = next;
          ++f.a;
          out.push_back(std::move(s));
        } else if (NumberMayEnd(f.phase)) {
          s.pop_back();  // the number ends here: what encloses it takes the byte
          Advance(std::move(s), c, out);
        }
        return;
      }
      case Frame::kArray:
        Array(std::move(s), c, out);
        return;
      case Frame::kObject:
        Object(std::move(s), c, out);
        return;
      case Frame::kRegex:
        f.rx = nodes_[f.node].dfa->Next(f.rx, c);
        if (f.rx >= 0) out.push_back(std::move(s));
        return;
    }
  }

  // False when byte c surely cannot follow stack s (a cheap test before copying it for
  // Advance); true when it may.
  bool MayTake(const Stack& s, uint8_t c) const {
    const Frame& f = s.back();
    switch (f.kind) {
      case Frame::kRoot:
        return f.phase != kRootDone;
      case Frame::kKey:
        return static_cast<uint8_t>(nodes_[f.node].keys[f.a][f.b]) == c;
      case Frame::kLiteral: {
        if (LiteralMayEnd(f)) return true;
        const std::vector<std::string>& lits = nodes_[f.node].literals;
        return static_cast<uint8_t>(lits[f.a][f.b]) <= c &&
               c <= static_cast<uint8_t>(lits[f.cur - 1][f.b]);
      }
      case Frame::kString:
        if (f.phase == kStrContent) return f.b > 0 ? c >= 0x80 && c < 0xC0 : c >= 0x20;
        return true;
      case Frame::kObject:
        if (IsSpace(c)) return true;
        if (f.phase == kObjColon) return c == ':';
        if (f.phase == kObjNext) return c == '"';
        return f.phase != kObjAfter || c == ',' || c == '}';
      case Frame::kArray:
        return IsSpace(c) || f.phase != kArrAfter || c == ',' || c == ']';
      case Frame::kNumber:
        return true;
      case Frame::kRegex:
        return nodes_[f.node].dfa->Next(f.rx, c) >= 0;
    }
    return true;
  }

  // The text may end here: what is open is the root's finished value (a number may still
  // grow).
  bool Accepting(const Stack& s) const {
    if (s[0].kind == Frame::kRegex) return nodes_[s[0].node].dfa->Accepting(s[0].rx);
    size_t top = s.size() - 1;
    const Frame& f = s[top];
    const bool may_end = (f.kind == Frame::kNumber && NumberEnds(f)) ||
                         (f.kind == Frame::kLiteral && LiteralMayEnd(f));
    if (may_end && top > 0) --top;
    return top == 0 && s[0].phase == kRootDone;
  }
  // A string's content, unconstrained: plain bytes leave the stack as it is.
  // A string's content between characters: how many more characters may come (INT_MAX: no
  // bound); -1 for other stacks.
  int StringRoom(const Stack& s) const {
    const Frame& f = s.back();
    if (f.kind != Frame::kString || f.phase != kStrContent || f.b != 0) return -1;
    if (f.node >= 0 && nodes_[f.node].dfa != nullptr) return -1;  // its bytes move a pattern
    if (f.node < 0 || nodes_[f.node].max_length < 0) return std::numeric_limits<int>::max();
    return static_cast<int>(std::max<int64_t>(0, nodes_[f.node].max_length - f.a));
  }
  bool PlainString(const Stack& s) const {
    const Frame& f = s.back();
    if (f.kind != Frame::kString || f.phase != kStrContent || f.b != 0) return false;
    if (f.node < 0) return nodes_[-f.node - 2].keys.empty();  // else its bytes are hashed
    const Node& n = nodes_[f.node];
    return n.max_length < 0 && n.min_length == 0 && n.dfa == nullptr;
  }

 private:
  // Pushes the frame(s) of a value of `node` that starts with byte c (the enclosing frame
  // already waits after it).
  // `budget`: value starts left to try for this byte (anyOf under anyOf multiplies them).
  void StartValue(Stack s, int node, uint8_t c, std::vector<Stack>& out, int depth,
                  int& budget) const {
    const Node& n = nodes_[node];
    if (s.size() > kMaxFrames || --budget < 0) return;
    Frame f;
    f.node = node;
    switch (n.kind) {
      case Node::kUnion:
        if (depth >= kMaxUnionDepth) return;
        for (size_t i = 0; i < n.alts.size(); ++i) {
          if (i + 1 == n.alts.size()) {
            StartValue(std::move(s), n.alts[i], c, out, depth + 1, budget);
          } else {
            StartValue(s, n.alts[i], c, out, depth + 1, budget);
          }
        }
        return;
      case Node::kObject:
        if (c != '{') return;
        f.kind = Frame::kObject;
        f.phase = kObjStart;
        break;
      case Node::kArray:
        if (c != '[') return;
        f.kind = Frame::kArray;
        f.phase = kArrStart;
        break;
      case Node::kString:
        if (c != '"') return;
        f.kind = Frame::kString;
        f.phase = kStrContent;
        if (n.dfa != nullptr) f.rx = n.dfa->start();
        break;
      case Node::kRegex:  // only ever the root, as the whole text
        return;
      case Node::kNumber:
      case Node::kInteger:
        if (c != '-' && (c < '0' || c > '9')) return;
        f.kind = Frame::kNumber;
        f.phase = c == '-' ? kNumMinus : c == '0' ? kNumZero : kNumInt;
        f.a = 1;
        if (n.dfa != nullptr) {
          f.rx = n.dfa->Next(n.dfa->start(), c);
          if (f.rx < 0 || 1 + n.dfa->CharsToAccept(f.rx) > kMaxNumberChars) return;
        }
        break;
      case Node::kLiteral: {  // one frame follows the run of literals starting with c
        const auto [lo, hi] = Run(n.literals, 0, static_cast<int32_t>(n.literals.size()), 0, c);
        if (lo == hi) return;
        f.kind = Frame::kLiteral;
        f.a = lo;
        f.cur = hi;
        f.b = 1;
        if (hi - lo == 1 && n.literals[lo].size() == 1) {  // complete: nothing to follow
          out.push_back(std::move(s));
          return;
        }
        break;
      }
    }
    s.push_back(f);
    out.push_back(std::move(s));
  }

  // A number frame may end here.
  bool NumberEnds(const Frame& f) const {
    const ByteDfa* dfa = nodes_[f.node].dfa.get();
    return dfa != nullptr ? dfa->Accepting(f.rx) : NumberMayEnd(f.phase);
  }
  // A literal frame that has matched the whole of the first (shortest) literal of its run.
  bool LiteralMayEnd(const Frame& f) const {
    return nodes_[f.node].literals[f.a].size() == static_cast<size_t>(f.b);
  }
  // The run of sorted literals in [lo, hi) (which share their first `at` bytes) whose byte at
  // `at` is c.
  static std::pair<int32_t, int32_t> Run(const std::vector<std::string>& lits, int32_t lo,
                                         int32_t hi, int32_t at, uint8_t c) {
    if (lo < hi && lits[lo].size() == static_cast<size_t>(at)) ++lo;  // the one that ends here
    const auto ids = std::views::iota(lo, hi);
    const auto run = std::ranges::equal_range(
        ids, c, std::less<>(), [&](int32_t i) { return static_cast<uint8_t>(lits[i][at]); });
    return {static_cast<int32_t>(lo + (run.begin() - ids.begin())),
            static_cast<int32_t>(lo + (run.end() - ids.begin()))};
  }

  // A string frame takes byte c (false: it cannot); its closing quote sets b = -1 (done).
  bool String(Frame& f, uint8_t c) const {
    const Node* n = f.node >= 0 ? &nodes_[f.node] : nullptr;
    const ByteDfa* dfa = n != nullptr ? n->dfa.get() : nullptr;
    const bool counted = n != nullptr && (n->max_length >= 0 || n->min_length > 0);
    // One more character: false past maxLength.
    auto one = [&] {
      if (!counted) return true;
      ++f.a;
      return n->max_length < 0 || f.a <= n->max_length;
    };
    // The content's next bytes (an escape's decoded) move the pattern: false when it refuses
    // them or too few characters of maxLength would be left to reach a match.
    auto feed = [&](std::initializer_list<uint8_t> bytes) {
      if (dfa == nullptr) return true;
      for (uint8_t byte : bytes) {
        f.rx = dfa->Next(f.rx, byte);
        if (f.rx < 0) return false;
      }
      return n->max_length < 0 || f.a + dfa->CharsToAccept(f.rx) <= n->max_length;
    };
    // Characters of maxLength left after the one being written (counted from its first byte).
    auto room = [&]() -> int64_t {
      return n->max_length < 0 ? std::numeric_limits<int64_t>::max() : n->max_length - f.a;
    };
    switch (f.phase) {
      case kStrContent:
        if (f.b > 0) {  // inside a UTF-8 character: cur holds the next byte's range
          if (c < (f.cur >> 8) || c > (f.cur & 0xFF)) return false;
          f.cur = --f.b == 0 ? -1 : 0x80BF;
          return feed({c});
        }
        if (c >= 0x80) {
          uint8_t lo, hi;
          f.b = Utf8Lead(c, lo, hi);
          if (f.b == 0) return false;
          f.cur = (lo << 8) | hi;
          return one() && feed({c});
        }
        if (c == '"') {
          if (counted && f.a < n->min_length) return false;
          if (dfa != nullptr && !dfa->Accepting(f.rx)) return false;
          f.b = -1;
          return true;
        }
        if (c == '\\') {  // the character counts from its first byte on
          f.phase = kStrEscape;
          // Under a pattern, only where some character may come (any can be written \uXXXX).
          return one() && (dfa == nullptr || dfa->TakesSome(f.rx, 0, 0x10FFFF, room()));
        }
        if (c < 0x20) return false;
        return one() && feed({c});
      case kStrEscape: {
        if (c == 'u') {
          f.phase = kStrHex;
          f.b = 0;
          f.cur = 0;
          return true;
        }
        static constexpr char kEscapes[] = "\"\\/bfnrt";
        static constexpr char kDecoded[] = "\"\\/\b\f\n\r\t";
        const char* at = c == 0 ? nullptr : std::strchr(kEscapes, c);
        if (at == nullptr) return false;
        f.phase = kStrContent;
        return feed({static_cast<uint8_t>(kDecoded[at - kEscapes])});
      }
      case kStrHex:
      case kStrHexLow: {  // cur: the value so far; a surrogate must come as a pair
        const int digit = HexDigit(static_cast<char>(c));
        if (digit < 0) return false;
        const bool low = f.phase == kStrHexLow;
        f.cur = f.cur * 16 + digit;
        ++f.b;
        if (f.b == 1 && low && digit != 0xD) return false;
        if (f.b == 2 && low != (f.cur >= 0xDC && f.cur <= 0xDF)) return false;  // lone low half
        if (dfa != nullptr && f.b < 4) {  // under a pattern: digits some character may follow
          const int shift = 4 * (4 - f.b);
          const uint32_t lo = static_cast<uint32_t>(f.cur) << shift;
          const uint32_t hi = lo + (1u << shift) - 1;
          // A high half stands for the characters it may pair into; a low one for those of
          // the high half before it.
          auto pairs = [&](uint32_t high_lo, uint32_t high_hi, uint32_t low_lo, uint32_t low_hi) {
            return dfa->TakesSome(f.rx, 0x10000 + ((high_lo - 0xD800) << 10) + (low_lo - 0xDC00),
                                  0x10000 + ((high_hi - 0xD800) << 10) + (low_hi - 0xDC00), room());
          };
          if (low) return pairs(f.h, f.h, std::max(lo, 0xDC00u), std::min(hi, 0xDFFFu));
          const bool high = lo <= 0xDBFF && hi >= 0xD800 &&
                            pairs(std::max(lo, 0xD800u), std::min(hi, 0xDBFFu), 0xDC00, 0xDFFF);
          return high || dfa->TakesSome(f.rx, lo, hi, room());
        }
        if (f.b < 4) return true;
        const bool high = !low && f.cur >= 0xD800 && f.cur <= 0xDBFF;
        f.phase = high ? kStrLowSlash : kStrContent;
        f.b = 0;
        const uint32_t value = static_cast<uint32_t>(f.cur);
        f.cur = -1;
        if (dfa == nullptr) return true;
        if (high) {  // its character is fed with the low half, one of which must fit
          f.h = value;
          const uint32_t first = 0x10000 + ((value - 0xD800) << 10);
          return dfa->TakesSome(f.rx, first, first + 0x3FF, room());
        }
        std::string utf8;
        AppendUtf8(low ? 0x10000 + ((f.h - 0xD800) << 10) + (value - 0xDC00) : value, utf8);
        f.h = 0;
        for (char byte : utf8) {
          if (!feed({static_cast<uint8_t>(byte)})) return false;
        }
        return true;
      }
      case kStrLowSlash:
        if (c != '\\') return false;
        f.phase = kStrLowU;
        return true;
      case kStrLowU:
        if (c != 'u') return false;
        f.phase = kStrHexLow;
        f.cur = 0;
        return true;
    }
    return false;
  }

  // A number's next phase after byte c; 0xFF: c does not continue it.
  uint8_t NumberNext(const Frame& f, uint8_t c) const {
    const bool integer = nodes_[f.node].kind == Node::kInteger;
    const bool digit = c >= '0' && c <= '9';
    const bool exp = !integer && (c == 'e' || c == 'E');
    switch (f.phase) {
      case kNumMinus:
        return c == '0' ? kNumZero : digit ? kNumInt : 0xFF;
      case kNumZero:
        return !integer && c == '.' ? kNumDot : exp ? kNumE : 0xFF;
      case kNumInt:
        return digit ? kNumInt : !integer && c == '.' ? kNumDot : exp ? kNumE : 0xFF;
      case kNumDot:
        return digit ? kNumFrac : 0xFF;
      case kNumFrac:
        return digit ? kNumFrac : exp ? kNumE : 0xFF;
      case kNumE:
        return c == '+' || c == '-' ? kNumESign : digit ? kNumExp : 0xFF;
      case kNumESign:
      case kNumExp:
        return digit ? kNumExp : 0xFF;
    }
    return 0xFF;
  }

  static bool Space(Stack& s, uint8_t c, std::vector<Stack>& out) {
    if (!IsSpace(c)) {
      s.back().ws = 0;
      return false;
    }
    if (s.back().ws++ < kMaxWhitespace) out.push_back(std::move(s));
    return true;
  }

  void Array(Stack s, uint8_t c, std::vector<Stack>& out) const {
    if (Space(s, c, out)) return;
    Frame& f = s.back();
    const Node& n = nodes_[f.node];
    const bool full = n.max_items >= 0 && f.b >= n.max_items;
    if ((f.phase == kArrStart || f.phase == kArrAfter) && c == ']') {
      if (f.b < n.min_items) return;
      s.pop_back();
      out.push_back(std::move(s));
    } else if (f.phase == kArrAfter) {
      if (c != ',' || full) return;
      f.phase = kArrNext;
      out.push_back(std::move(s));
    } else if (!full) {  // a value starts (kArrStart, kArrNext)
      const int item = static_cast<size_t>(f.b) < n.prefix.size() ? n.prefix[f.b] : n.items;
      f.phase = kArrAfter;
      ++f.b;
      int budget = kMaxExpansions;
      StartValue(std::move(s), item, c, out, 0, budget);
    }
  }

  // The required properties at index `from` or later.
  static int64_t RequiredCount(const Node& n, int from) {
    return std::count(n.required.begin() + std::min<size_t>(from, n.required.size()),
                      n.required.end(), 1);
  }
  // Whether a required property at index `from` or later is still missing.
  static bool RequiredFrom(const Node& n, int from) {
    return std::find(n.required.begin() + std::min<size_t>(from, n.required.size()),
                     n.required.end(), 1) != n.required.end();
  }

  void Object(Stack s, uint8_t c, std::vector<Stack>& out) const {
    if (Space(s, c, out)) return;
    Frame& f = s.back();
    const Node& n = nodes_[f.node];
    const int declared = static_cast<int>(n.keys.size());
    switch (f.phase) {
      case kObjStart:
      case kObjAfter:
        if (c == '}') {
          if (RequiredFrom(n, f.a) || f.b < n.min_items) return;
          s.pop_back();
          out.push_back(std::move(s));
          return;
        }
        if (f.phase == kObjAfter) {
          if (c != ',' || (f.a >= declared && n.additional < 0)) return;
          if (n.max_items >= 0 && f.b >= n.max_items) return;  // maxProperties
          f.phase = kObjNext;
          out.push_back(std::move(s));
          return;
        }
        [[fallthrough]];
      case kObjNext: {  // a key starts: a declared one from f.a on (none required skipped), or
                        // another
        if (c != '"' || (n.max_items >= 0 && f.b >= n.max_items)) return;
        for (int i = f.a; i < declared; ++i) {
          // Without other members, skipping to key i must leave enough for minProperties; and
          // key i with the required ones after it must fit maxProperties.
          if (n.additional < 0 && f.b + declared - i < n.min_items) break;
          if (n.max_items >= 0 && f.b + 1 + RequiredCount(n, i + 1) > n.max_items) {
            if (n.required[i]) break;
            continue;
          }
          Stack t = s;
          Frame& o = t.back();
          o.a = i + 1;
          o.cur = i;
          o.phase = kObjColon;
          Frame key;
          key.kind = Frame::kKey;
          key.node = f.node;
          key.a = i;
          key.b = 1;
          t.push_back(key);
          out.push_back(std::move(t));
          if (n.required[i]) break;
        }
        if (n.additional >= 0 && !RequiredFrom(n, f.a) &&
            (n.max_items < 0 || f.b + 1 <= n.max_items)) {
          f.a = declared;
          f.cur = -1;
          f.phase = kObjColon;
          Frame key;
          key.kind = Frame::kString;
          key.phase = kStrContent;
          key.node = -f.node - 2;  // an additional key of this object
          key.h = kKeyHashStart;
          s.push_back(key);
          out.push_back(std::move(s));
        }
        return;
      }
      case kObjColon:
        if (c != ':') return;
        f.phase = kObjValue;
        out.push_back(std::move(s));
        return;
      case kObjValue: {
        const int value = f.cur >= 0 ? n.values[f.cur] : n.additional;
        f.phase = kObjAfter;
        ++f.b;
        int budget = kMaxExpansions;
        StartValue(std::move(s), value, c, out, 0, budget);
        return;
      }
    }
  }

  const std::vector<Node>& nodes_;
  int root_;
};

void Dedup(std::vector<Stack>& states) {
  std::sort(states.begin(), states.end());
  states.erase(std::unique(states.begin(), states.end()), states.end());
  if (states.size() > kMaxStates) states.resize(kMaxStates);
}

}  // namespace

JsonMatcher::JsonMatcher(std::shared_ptr<const JsonSchema> schema,
                         std::shared_ptr<const TokenVocabulary> vocab)
    : schema_(std::move(schema)), vocab_(std::move(vocab)) {
  Frame root;
  root.kind = Frame::kRoot;
  root.phase = kRootBefore;
  const Node& top = schema_->nodes_[schema_->root_];
  if (top.kind == Node::kRegex) {
    root.kind = Frame::kRegex;
    root.node = schema_->root_;
    root.rx = top.dfa->start();
  }
  states_.push_back({root});
}

JsonMatcher::~JsonMatcher() = default;
JsonMatcher::JsonMatcher(const JsonMatcher&) = default;
JsonMatcher::JsonMatcher(JsonMatcher&&) noexcept = default;

void JsonMatcher::Walk(const TokenVocabulary::Trie& trie, uint32_t node,
                       const std::vector<Stack>& states, bool plain_same, Bits& allowed) const {
  const Moves moves(schema_->nodes_, schema_->root_);
  const TokenVocabulary::Trie::Node& t = trie.nodes[node];
  for (uint32_t e = t.edge_begin; e < t.edge_end; ++e) {
    const TokenVocabulary::Trie::Edge& edge = trie.edges[e];
    const TokenVocabulary::Trie::Node& child = trie.nodes[edge.child];
    if (plain_same && IsPlain(edge.byte)) {  // nothing changes
      for (uint32_t k = child.token_begin; k < child.token_end; ++k) Set(allowed, trie.tokens[k]);
      Walk(trie, edge.child, states, true, allowed);
      continue;
    }
    std::vector<Stack> next;
    for (const Stack& s : states) {
      if (moves.MayTake(s, edge.byte)) moves.Advance(s, edge.byte, next);
    }
    if (next.empty()) continue;
    Dedup(next);
    for (uint32_t k = child.token_begin; k < child.token_end; ++k) Set(allowed, trie.tokens[k]);
    const bool plain =
        std::all_of(next.begin(), next.end(), [&](const Stack& s) { return moves.PlainString(s); });
    Walk(trie, edge.child, next, plain, allowed);
  }
}

namespace {

// Sets the tokens under trie node `node` whose bytes `dfa` takes from `state`: all of them, or
// with `chars` (the vocabulary's), only tokens of plain string content, as they are (no quote,
// backslash or control byte, whole characters); their costs (characters, and then characters
// to a match) raise `out.max_cost`.
void DfaWalk(const TokenVocabulary::Trie& trie, uint32_t node, const ByteDfa& dfa, int32_t state,
             const std::vector<int32_t>* chars, JsonSchema::TokenSet& out) {
  const TokenVocabulary::Trie::Node& t = trie.nodes[node];
  for (uint32_t e = t.edge_begin; e < t.edge_end; ++e) {
    const uint8_t byte = trie.edges[e].byte;
    if (chars != nullptr && byte < 0x80 && !IsPlain(byte)) continue;
    const int32_t next = dfa.Next(state, byte);
    if (next < 0) continue;
    const TokenVocabulary::Trie::Node& child = trie.nodes[trie.edges[e].child];
    for (uint32_t k = child.token_begin; k < child.token_end; ++k) {
      const int32_t id = trie.tokens[k];
      if (chars == nullptr) {
        Set(out.bits, id);
      } else if ((*chars)[id] >= 0) {
        Set(out.bits, id);
        out.max_cost = std::max<int64_t>(out.max_cost, (*chars)[id] + dfa.CharsToAccept(next));
      }
    }
    DfaWalk(trie, trie.edges[e].child, dfa, next, chars, out);
  }
}

}  // namespace

bool JsonMatcher::PatternTokens(Bits& allowed) const {
  if (states_.size() != 1) return false;
  const Frame& f = states_[0].back();
  if (f.kind == Frame::kRegex) {  // the whole text: every token the automaton takes
    const ByteDfa& dfa = *schema_->nodes_[f.node].dfa;
    auto tokens = schema_->Tokens(f.node, f.rx, vocab_, [&](JsonSchema::TokenSet& out) {
      out.bits.assign(allowed.size(), 0);
      DfaWalk(*vocab_->all_, 0, dfa, f.rx, nullptr, out);
    });
    allowed = tokens->bits;
    return true;
  }
  if (f.kind != Frame::kString || f.phase != kStrContent || f.b != 0 || f.node < 0) return false;
  const Node& n = schema_->nodes_[f.node];
  if (n.dfa == nullptr) return false;
  // A pattern string's content: the plain tokens the automaton takes (as they are, they are
  // the content), then a walk for the others (quotes, escapes, broken characters). Under a
  // maxLength, the cached set holds while every token in it fits; near the end, only those
  // with room for themselves and the rest of a match are taken, one by one.
  auto tokens = schema_->Tokens(f.node, f.rx, vocab_, [&](JsonSchema::TokenSet& out) {
    out.bits.assign(allowed.size(), 0);
    DfaWalk(*vocab_->all_, 0, *n.dfa, f.rx, &vocab_->chars_, out);
  });
  const int64_t room = n.max_length < 0 ? std::numeric_limits<int64_t>::max() : n.max_length - f.a;
  if (tokens->max_cost <= room) {
    allowed = tokens->bits;
  } else {
    for (size_t w = 0; w < tokens->bits.size(); ++w) {
      for (uint64_t bits = tokens->bits[w]; bits != 0; bits &= bits - 1) {
        const int32_t id = static_cast<int32_t>(w * 64 + std::countr_zero(bits));
        int32_t rx = f.rx;
        for (char c : vocab_->bytes(id)) rx = n.dfa->Next(rx, static_cast<uint8_t>(c));
        if (vocab_->chars_[id] + n.dfa->CharsToAccept(rx) <= room) Set(allowed, id);
      }
    }
  }
  Walk(*vocab_->special_, 0, states_, false, allowed);
  return true;
}

void JsonMatcher::ReasonFirst(int32_t open, int32_t end, bool inside) {
  if (end < 0) return;
  open_ = open;
  end_ = end;
  gate_ = inside ? Gate::kInside : Gate::kMayOpen;
}

void JsonMatcher::ComputeAllowed(Bits& allowed) const {
  if (gate_ == Gate::kInside) {  // anything (the engine does not mask free rows)
    allowed.assign((vocab_->size() + 63) / 64, ~uint64_t{0});
    if (vocab_->size() % 64 != 0) allowed.back() = (uint64_t{1} << (vocab_->size() % 64)) - 1;
    return;
  }
  ComputeConstrained(allowed);
  if (gate_ == Gate::kMayOpen && open_ >= 0 && open_ < vocab_->size()) Set(allowed, open_);
}

void JsonMatcher::ComputeConstrained(Bits& allowed) const {
  allowed.assign((vocab_->size() + 63) / 64, 0);
  const Moves moves(schema_->nodes_, schema_->root_);
  // Inside strings only: the plain tokens that fit are allowed without a walk (a string
  // without bounds stays as it is after them), and only the others' trie is walked.
  int room = -1;
  bool strings = true, same = true;
  for (const Stack& s : states_) {
    const int r = moves.StringRoom(s);
    strings = strings && r >= 0;
    same = same && moves.PlainString(s);
    room = std::max(room, r);
  }
  if (PatternTokens(allowed)) {
  } else if (strings) {
    const auto& chars = vocab_->plain_chars_;
    const size_t fit = std::upper_bound(chars.begin(), chars.end(), room) - chars.begin();
    for (size_t k = 0; k < fit; ++k) Set(allowed, vocab_->plain_[k]);
    Walk(*vocab_->special_, 0, states_, same, allowed);
  } else {
    Walk(*vocab_->all_, 0, states_, false, allowed);
  }
  if (CanEnd()) {
    for (int32_t id : vocab_->stop_ids_) {
      if (id >= 0 && id < vocab_->size()) Set(allowed, id);
    }
  }
}

std::vector<int32_t> JsonMatcher::AllowedTokens() const {
  Bits allowed;
  ComputeAllowed(allowed);
  std::vector<int32_t> out;
  for (size_t w = 0; w < allowed.size(); ++w) {
    for (uint64_t bits = allowed[w]; bits != 0; bits &= bits - 1) {
      out.push_back(static_cast<int32_t>(w * 64 + std::countr_zero(bits)));
    }
  }
  return out;
}

bool JsonMatcher::MaskLogits(float* logits, int64_t n) const {
  ComputeAllowed(scratch_);
  return ApplyAllowed(scratch_, logits, n);
}

bool JsonMatcher::ApplyAllowed(const Bits& allowed, float* logits, int64_t n) {
  constexpr float kNever = -std::numeric_limits<float>::infinity();
  bool any = false;
  // Only the refused tokens are written: a word of 64 allowed ones (string content) costs one
  // test.
  for (int64_t w = 0; w * 64 < n; ++w) {
    const uint64_t bits = static_cast<size_t>(w) < allowed.size() ? allowed[w] : 0;
    any = any || bits != 0;
    for (uint64_t refused = ~bits; refused != 0; refused &= refused - 1) {
      const int64_t id = w * 64 + std::countr_zero(refused);
      if (id >= n) break;
      logits[id] = kNever;
    }
  }
  return any;
}

int32_t JsonMatcher::Draw(const Bits& allowed, float* row, int64_t n,
                          const kernels::RowSampling& rule, bool mask_row, DrawScratch& scratch) {
  int64_t count = 0;
  for (uint64_t w : allowed) count += std::popcount(w);
  if (count * 8 < n && !mask_row) {
    // Ids ascending, so ties go to the lowest id, as over the whole row.
    scratch.ids.clear();
    for (size_t w = 0; w < allowed.size(); ++w) {
      for (uint64_t bits = allowed[w]; bits != 0; bits &= bits - 1) {
        const int64_t id = static_cast<int64_t>(w) * 64 + std::countr_zero(bits);
        if (id < n) scratch.ids.push_back(static_cast<int32_t>(id));
      }
    }
    if (scratch.ids.empty()) return -1;
    scratch.logits.resize(scratch.ids.size());
    for (size_t k = 0; k < scratch.ids.size(); ++k) scratch.logits[k] = row[scratch.ids[k]];
    const int64_t m = static_cast<int64_t>(scratch.ids.size());
    return scratch.ids[kernels::cpu::DrawToken(scratch.logits.data(), m, rule)];
  }
  if (rule.greedy() && !mask_row && count * 8 < n * 7) {
    // Not nearly all of the row allowed: one pass over the allowed ids, the row left alone
    // (with over 7/8 allowed, writing the few refused ones and a plain argmax is faster).
    int32_t best = -1;
    float best_logit = 0.0f;
    for (size_t w = 0; w < allowed.size() && static_cast<int64_t>(w) * 64 < n; ++w) {
      for (uint64_t bits = allowed[w]; bits != 0; bits &= bits - 1) {
        const int64_t id = static_cast<int64_t>(w) * 64 + std::countr_zero(bits);
        if (id >= n) break;
        // NaN never wins, as in Argmax; ties go to the lowest id.
        if (best < 0 ? !std::isnan(row[id]) : row[id] > best_logit) {
          best = static_cast<int32_t>(id);
          best_logit = row[id];
        }
      }
    }
    if (best >= 0) return best;
  }
  if (!ApplyAllowed(allowed, row, n)) return -1;
  return kernels::cpu::DrawToken(row, n, rule);
}

bool JsonMatcher::Accept(int32_t token) {
  if (token < 0 || token >= vocab_->size()) return false;
  if (gate_ == Gate::kInside) {  // anything but a stop token (the reply would end unconstrained)
    if (vocab_->IsStop(token)) return false;
    // The end token, or its text spelled by other tokens.
    if (vocab_->usable(token)) tail_ += vocab_->bytes(token);
    if (token == end_ || absl::EndsWith(tail_, kReasoningEnd)) {
      gate_ = Gate::kNone;
      tail_.clear();
    } else if (tail_.size() > kReasoningEnd.size()) {
      tail_.erase(0, tail_.size() - kReasoningEnd.size());
    }
    return true;
  }
  if (gate_ == Gate::kMayOpen) {  // the first token: the reasoning's start, or the reply's
    if (token == open_) {
      gate_ = Gate::kInside;
      return true;
    }
    gate_ = Gate::kNone;
    if (!Accept(token)) {
      gate_ = Gate::kMayOpen;
      return false;
    }
    return true;
  }
  if (vocab_->IsStop(token)) return CanEnd();
  if (!vocab_->usable(token)) return false;
  const std::string& bytes = vocab_->bytes(token);
  const Moves moves(schema_->nodes_, schema_->root_);
  std::vector<Stack> states = states_;
  for (char ch : bytes) {
    std::vector<Stack> next;
    for (Stack& s : states) moves.Advance(std::move(s), static_cast<uint8_t>(ch), next);
    if (next.empty()) return false;
    Dedup(next);
    states = std::move(next);
  }
  states_ = std::move(states);
  return true;
}

bool JsonMatcher::Done() const {
  if (gate_ != Gate::kNone) return false;
  return std::all_of(states_.begin(), states_.end(), [&](const Stack& s) {
    if (s[0].kind == Frame::kRegex) return schema_->nodes_[s[0].node].dfa->Final(s[0].rx);
    return s.size() == 1 && s[0].phase == kRootDone;
  });
}

bool JsonMatcher::CanEnd() const {
  if (gate_ == Gate::kInside) return false;
  const Moves moves(schema_->nodes_, schema_->root_);
  return std::any_of(states_.begin(), states_.end(),
                     [&](const Stack& s) { return moves.Accepting(s); });
}

}  // namespace pds::engine

#include "engine/tokenizer/tokenizer.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include <algorithm>
#include <fstream>
#include <mutex>
#include <queue>
#include <sstream>

#include "absl/hash/hash.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_replace.h"
#include "engine/common/status_macros.h"
#include "engine/tokenizer/unicode.h"
#include "nlohmann/json.hpp"

// Regex engine: PCRE2 (Debian's libpcre2) in UTF + UCP mode with JIT. It supports the
// Unicode property classes (\p{L}, \p{N}), scoped case-insensitivity and lookahead that the
// Llama 3 / Qwen split patterns use, and its JIT keeps pre-tokenization fast.

namespace pds::engine {
namespace {

using nlohmann::json;

constexpr char kMetaspace[] = "\xE2\x96\x81";  // U+2581 "▁"

absl::Status Unsupported(absl::string_view source, absl::string_view what) {
  return absl::InvalidArgumentError(absl::StrCat(source, ": unsupported ", what));
}

std::string TypeOf(const json& j) {
  auto t = j.find("type");
  return t != j.end() && t->is_string() ? t->get<std::string>() : std::string();
}

// Sequences of components nest this deep at most; real files use one level. The bound keeps
// the recursive parsing of hostile files off the end of the stack.
constexpr int kMaxSequenceDepth = 32;

// Typed reads of tokenizer.json fields. A present value of the wrong JSON type (null included)
// is an INVALID_ARGUMENT naming the file and the field. Messages name the JSON type found and
// never print the value: dump() recurses per nesting level and can overflow the stack.
class Fields {
 public:
  explicit Fields(absl::string_view source) : source_(source) {}

  // obj[key], or `fallback` where obj has no such key. `where` names obj in messages.
  absl::StatusOr<bool> Bool(const json& obj, absl::string_view where, const char* key,
                            bool fallback) const {
    auto it = obj.find(key);
    if (it == obj.end()) return fallback;
    if (!it->is_boolean()) return WrongType(where, key, "a boolean", *it);
    return it->get<bool>();
  }
  absl::StatusOr<std::string> String(const json& obj, absl::string_view where, const char* key,
                                     absl::string_view fallback) const {
    auto it = obj.find(key);
    if (it == obj.end()) return std::string(fallback);
    if (!it->is_string()) return WrongType(where, key, "a string", *it);
    return it->get<std::string>();
  }
  // A single character (HF's `char` fields).
  absl::StatusOr<std::string> Char(const json& obj, absl::string_view where, const char* key,
                                   absl::string_view fallback) const {
    PDS_ASSIGN_OR_RETURN(std::string c, String(obj, where, key, fallback));
    size_t end = 0;
    if (!c.empty() && IsValidUtf8(c)) NextCodePoint(c, end);
    if (c.empty() || end != c.size()) return Error(where, key, "must be a single character");
    return c;
  }
  absl::StatusOr<int> Count(const json& obj, absl::string_view where, const char* key,
                            int fallback) const {
    auto it = obj.find(key);
    if (it == obj.end()) return fallback;
    if (!it->is_number_integer()) return WrongType(where, key, "an integer", *it);
    // Non-negative JSON integers are stored unsigned; get<int64_t> would wrap the huge ones.
    const bool in_range =
        it->is_number_unsigned() ? it->get<uint64_t>() <= kMaxCount : it->get<int64_t>() >= 0;
    if (!in_range) return Error(where, key, "is out of range");
    return static_cast<int>(it->get<int64_t>());
  }
  // obj[key] as an array or an object; an empty one where obj has no such key.
  absl::StatusOr<const json*> Array(const json& obj, absl::string_view where,
                                    const char* key) const {
    static const json* const empty = new json(json::array());
    return Container(obj, where, key, *empty);
  }
  absl::StatusOr<const json*> Object(const json& obj, absl::string_view where,
                                     const char* key) const {
    static const json* const empty = new json(json::object());
    return Container(obj, where, key, *empty);
  }
  // obj[key] where it has the type of `empty` (an array or an object), else `empty`.
  absl::StatusOr<const json*> Container(const json& obj, absl::string_view where, const char* key,
                                        const json& empty) const {
    auto it = obj.find(key);
    if (it == obj.end()) return &empty;
    if (it->type() != empty.type()) {
      return WrongType(where, key, empty.is_array() ? "an array" : "an object", *it);
    }
    return &*it;
  }

  absl::Status Error(absl::string_view where, absl::string_view key, absl::string_view what) const {
    return absl::InvalidArgumentError(absl::StrCat(source_, ": ", where, " '", key, "' ", what));
  }

 private:
  static constexpr uint64_t kMaxCount = 1 << 24;

  absl::Status WrongType(absl::string_view where, absl::string_view key, absl::string_view expected,
                         const json& found) const {
    return Error(where, key, absl::StrCat("must be ", expected, ", not ", found.type_name()));
  }

  absl::string_view source_;
};

// A compiled PCRE2 pattern.
class Regex {
 public:
  static absl::StatusOr<std::unique_ptr<Regex>> Compile(const std::string& pattern, bool literal,
                                                        absl::string_view source) {
    int error = 0;
    PCRE2_SIZE offset = 0;
    const uint32_t options = PCRE2_UTF | (literal ? PCRE2_LITERAL : PCRE2_UCP);
    pcre2_code* code = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern.data()), pattern.size(),
                                     options, &error, &offset, nullptr);
    if (code == nullptr) {
      PCRE2_UCHAR message[256];
      pcre2_get_error_message(error, message, sizeof(message));
      return absl::InvalidArgumentError(absl::StrCat(source, ": cannot compile split pattern '",
                                                     pattern, "' at ", offset, ": ",
                                                     reinterpret_cast<char*>(message)));
    }
    pcre2_jit_compile(code, PCRE2_JIT_COMPLETE);  // falls back to the interpreter on failure
    return std::unique_ptr<Regex>(new Regex(code));
  }
  ~Regex() { pcre2_code_free(code_); }

  // Calls on_match(begin, end) for every non-empty match, left to right.
  template <typename F>
  void ForEachMatch(absl::string_view text, F on_match) const {
    pcre2_match_data* md = pcre2_match_data_create_from_pattern(code_, nullptr);
    PCRE2_SIZE start = 0;
    while (start <= text.size()) {
      const int rc = pcre2_match(code_, reinterpret_cast<PCRE2_SPTR>(text.data()), text.size(),
                                 start, PCRE2_NO_UTF_CHECK, md, nullptr);
      if (rc < 0) break;
      const PCRE2_SIZE* ov = pcre2_get_ovector_pointer(md);
      if (ov[1] == ov[0]) {  // empty match: step one character
        if (ov[0] >= text.size()) break;
        size_t i = ov[0];
        NextCodePoint(text, i);
        start = i;
        continue;
      }
      on_match(ov[0], ov[1]);
      start = ov[1];
    }
    pcre2_match_data_free(md);
  }

 private:
  explicit Regex(pcre2_code* code) : code_(code) {}
  pcre2_code* code_;
};

// GPT-2's pattern, used by the ByteLevel pre-tokenizer when use_regex is true.
constexpr char kGpt2Pattern[] =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

struct AddedToken {
  std::string content;
  int32_t id = 0;
  bool special = false;
  bool lstrip = false;
  bool rstrip = false;
};

struct NormStep {
  enum Kind { kNfc, kPrepend, kReplace } kind;
  std::string a, b;  // prepend: a; replace: a -> b
};

enum class SplitBehavior { kIsolated, kRemoved, kMergedWithPrevious, kMergedWithNext };

struct PreStep {
  enum Kind { kSplit, kByteLevel, kMetaspace } kind;
  std::shared_ptr<Regex> regex;  // split, or byte-level with use_regex
  SplitBehavior behavior = SplitBehavior::kIsolated;
  bool add_prefix_space = false;  // byte-level
  std::string replacement;        // metaspace
  std::string prepend_scheme;     // metaspace: always, first, never
  bool split = true;              // metaspace
};

struct DecStep {
  enum Kind { kByteLevel, kReplace, kByteFallback, kFuse, kStrip, kMetaspace } kind;
  std::string a, b;  // replace a -> b; strip content a; metaspace replacement a, scheme b
  int start = 0, stop = 0;
};

// A piece of text on its way through pre-tokenization: `at_start` marks the piece that
// begins the input (for "first" prepend schemes).
struct Piece {
  std::string text;
  bool at_start;
};

std::vector<Piece> SplitPieces(const std::vector<Piece>& in, const Regex& regex,
                               SplitBehavior behavior) {
  std::vector<Piece> out;
  for (const Piece& p : in) {
    std::vector<std::pair<size_t, size_t>> spans;  // matches and the gaps between them
    std::vector<bool> is_match;
    size_t last = 0;
    regex.ForEachMatch(p.text, [&](size_t b, size_t e) {
      if (b > last) {
        spans.emplace_back(last, b);
        is_match.push_back(false);
      }
      spans.emplace_back(b, e);
      is_match.push_back(true);
      last = e;
    });
    if (last < p.text.size()) {
      spans.emplace_back(last, p.text.size());
      is_match.push_back(false);
    }
    // As in HF, a match merges into its neighbour only when that neighbour is not a match
    // itself: "a-b--c" split on "-" gives [a-][b-][-][c] and [a][-b][-][-c].
    std::vector<std::string> parts;
    for (size_t i = 0; i < spans.size(); ++i) {
      const bool follows_match = i > 0 && is_match[i - 1];
      std::string s = p.text.substr(spans[i].first, spans[i].second - spans[i].first);
      switch (behavior) {
        case SplitBehavior::kIsolated:
          parts.push_back(std::move(s));
          break;
        case SplitBehavior::kRemoved:
          if (!is_match[i]) parts.push_back(std::move(s));
          break;
        case SplitBehavior::kMergedWithPrevious:
          if (is_match[i] && i > 0 && !follows_match) {
            parts.back() += s;
          } else {
            parts.push_back(std::move(s));
          }
          break;
        case SplitBehavior::kMergedWithNext:
          if (!is_match[i] && follows_match) {
            parts.back() += s;
          } else {
            parts.push_back(std::move(s));
          }
          break;
      }
    }
    for (size_t i = 0; i < parts.size(); ++i) {
      out.push_back({std::move(parts[i]), p.at_start && i == 0});
    }
  }
  return out;
}

}  // namespace

struct Tokenizer::Impl {
  std::vector<AddedToken> added;
  std::array<std::vector<int>, 256> added_by_first_byte;  // indices into added, longest first
  std::vector<NormStep> normalizers;
  std::vector<PreStep> pre_tokenizers;
  std::vector<DecStep> decoders;
  bool byte_level_input = false;  // a ByteLevel pre-tokenizer maps bytes to its alphabet
  bool byte_fallback = false;
  bool fuse_unk = false;
  bool ignore_merges = false;
  std::optional<int32_t> unk_id;
  absl::flat_hash_map<uint64_t, std::pair<int32_t, int32_t>> merges;  // (a, b) -> (rank, ab)
  std::array<int32_t, 256> byte_tokens;  // <0xHH> ids for byte fallback, -1 if absent
  // Post-processor template for single sequences: ids before and after the sequence.
  bool has_template = false;
  std::vector<int32_t> template_prefix, template_suffix;
};

struct Tokenizer::CacheShard {
  std::mutex mu;
  absl::flat_hash_map<std::string, std::vector<int32_t>> entries;
};

namespace {
constexpr size_t kCacheMaxPieceBytes = 64;
constexpr size_t kCacheMaxEntriesPerShard = 1 << 14;
}  // namespace

Tokenizer::Tokenizer() : cache_(new CacheShard[kCacheShards]), impl_(std::make_unique<Impl>()) {}
Tokenizer::~Tokenizer() = default;

absl::StatusOr<std::unique_ptr<Tokenizer>> Tokenizer::Load(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot open tokenizer file ", path));
  std::stringstream ss;
  ss << in.rdbuf();
  return FromJson(ss.str(), path);
}

// Fields are read through `Fields`, which checks their types; the handler is a backstop that
// keeps a nlohmann type error from any other read from escaping as an exception.
absl::StatusOr<std::unique_ptr<Tokenizer>> Tokenizer::FromJson(absl::string_view text,
                                                               absl::string_view source) try {
  json j = json::parse(text.begin(), text.end(), nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(source, ": invalid JSON"));
  }
  std::unique_ptr<Tokenizer> tok(new Tokenizer());
  Impl& impl = *tok->impl_;
  const Fields fields(source);
  auto too_deep = [&](absl::string_view what) {
    return absl::InvalidArgumentError(
        absl::StrCat(source, ": ", what, " Sequences nested over ", kMaxSequenceDepth, " deep"));
  };

  // Model.
  // By reference: copying JSON recurses per nesting level.
  const auto model_it = j.find("model");
  if (model_it == j.end() || !model_it->is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(source, ": no model"));
  }
  const json& model = *model_it;
  const std::string model_type =
      TypeOf(model).empty() && model.contains("merges") ? "BPE" : TypeOf(model);
  if (model_type != "BPE")
    return Unsupported(source, absl::StrCat("model type '", model_type, "'"));
  for (const char* key : {"continuing_subword_prefix", "end_of_word_suffix"}) {
    if (model.contains(key) && !model[key].is_null() && model[key] != "") {
      return Unsupported(source, absl::StrCat("BPE option '", key, "'"));
    }
  }
  if (model.contains("dropout") && model["dropout"].is_number() &&
      model["dropout"].get<double>() > 0) {
    return Unsupported(source, "BPE dropout");
  }
  if (!model.contains("vocab") || !model["vocab"].is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(source, ": model.vocab missing"));
  }
  auto set_token = [&](const std::string& token, int64_t id) -> absl::Status {
    if (id < 0 || id > (1 << 24)) {
      return absl::InvalidArgumentError(absl::StrCat(source, ": token id ", id, " out of range"));
    }
    if (static_cast<size_t>(id) >= tok->id_to_token_.size()) tok->id_to_token_.resize(id + 1);
    tok->id_to_token_[id] = token;
    tok->vocab_[token] = static_cast<int32_t>(id);
    return absl::OkStatus();
  };
  for (auto it = model["vocab"].begin(); it != model["vocab"].end(); ++it) {
    if (!it.value().is_number_integer()) {
      return absl::InvalidArgumentError(
          absl::StrCat(source, ": vocab entry '", it.key(), "' has no integer id"));
    }
    PDS_RETURN_IF_ERROR(set_token(it.key(), it.value().get<int64_t>()));
  }
  PDS_ASSIGN_OR_RETURN(impl.byte_fallback, fields.Bool(model, "model", "byte_fallback", false));
  PDS_ASSIGN_OR_RETURN(impl.fuse_unk, fields.Bool(model, "model", "fuse_unk", false));
  PDS_ASSIGN_OR_RETURN(impl.ignore_merges, fields.Bool(model, "model", "ignore_merges", false));
  if (model.contains("unk_token") && model["unk_token"].is_string()) {
    auto it = tok->vocab_.find(model["unk_token"].get<std::string>());
    if (it != tok->vocab_.end()) impl.unk_id = it->second;
  }
  if (model.contains("merges") && model["merges"].is_array()) {
    int32_t rank = 0;
    for (const json& m : model["merges"]) {
      std::string a, b;
      if (m.is_string()) {
        const std::string s = m.get<std::string>();
        const size_t space = s.find(' ', 1);
        if (space == std::string::npos) {
          return absl::InvalidArgumentError(absl::StrCat(source, ": malformed merge '", s, "'"));
        }
        a = s.substr(0, space);
        b = s.substr(space + 1);
      } else if (m.is_array() && m.size() == 2 && m[0].is_string() && m[1].is_string()) {
        a = m[0].get<std::string>();
        b = m[1].get<std::string>();
      } else {
        return absl::InvalidArgumentError(
            absl::StrCat(source, ": malformed merge ", rank, " (", m.type_name(), ")"));
      }
      auto ia = tok->vocab_.find(a), ib = tok->vocab_.find(b), iab = tok->vocab_.find(a + b);
      if (ia == tok->vocab_.end() || ib == tok->vocab_.end() || iab == tok->vocab_.end()) {
        return absl::InvalidArgumentError(
            absl::StrCat(source, ": merge '", a, " ", b, "' uses tokens missing from the vocab"));
      }
      const uint64_t key =
          (static_cast<uint64_t>(ia->second) << 32) | static_cast<uint32_t>(ib->second);
      impl.merges.try_emplace(key, rank++, iab->second);
    }
  }
  impl.byte_tokens.fill(-1);
  for (int b = 0; b < 256; ++b) {
    char name[8];
    std::snprintf(name, sizeof(name), "<0x%02X>", b);
    auto it = tok->vocab_.find(name);
    if (it != tok->vocab_.end()) impl.byte_tokens[b] = it->second;
  }

  // Added tokens.
  if (j.contains("added_tokens") && j["added_tokens"].is_array()) {
    const json& added = j["added_tokens"];
    for (size_t i = 0; i < added.size(); ++i) {
      const json& a = added[i];
      const std::string where = absl::StrCat("added_tokens[", i, "]");
      if (!a.is_object() || !a.contains("content") || !a["content"].is_string() ||
          !a.contains("id") || !a["id"].is_number_integer()) {
        return absl::InvalidArgumentError(
            absl::StrCat(source, ": malformed ", where, " (needs a string content and an id)"));
      }
      AddedToken t;
      t.content = a["content"].get<std::string>();
      PDS_ASSIGN_OR_RETURN(t.special, fields.Bool(a, where, "special", false));
      PDS_ASSIGN_OR_RETURN(t.lstrip, fields.Bool(a, where, "lstrip", false));
      PDS_ASSIGN_OR_RETURN(t.rstrip, fields.Bool(a, where, "rstrip", false));
      if (t.content.empty()) continue;
      // Read wide so that set_token's range check sees ids that int32_t would truncate.
      const int64_t id = a["id"].get<int64_t>();
      PDS_RETURN_IF_ERROR(set_token(t.content, id));
      t.id = static_cast<int32_t>(id);
      impl.added.push_back(t);
    }
  }
  tok->special_.assign(tok->id_to_token_.size(), false);
  for (size_t i = 0; i < impl.added.size(); ++i) {
    if (impl.added[i].special) tok->special_[impl.added[i].id] = true;
    impl.added_by_first_byte[static_cast<uint8_t>(impl.added[i].content[0])].push_back(
        static_cast<int>(i));
  }
  for (auto& list : impl.added_by_first_byte) {
    std::stable_sort(list.begin(), list.end(), [&](int x, int y) {
      return impl.added[x].content.size() > impl.added[y].content.size();
    });
  }

  // Normalizers.
  std::function<absl::Status(const json&, int)> add_normalizer = [&](const json& n,
                                                                     int depth) -> absl::Status {
    if (n.is_null()) return absl::OkStatus();
    const std::string type = TypeOf(n);
    const std::string where = absl::StrCat("normalizer ", type);
    if (type == "Sequence") {
      if (depth >= kMaxSequenceDepth) return too_deep("normalizer");
      PDS_ASSIGN_OR_RETURN(const json* subs, fields.Array(n, where, "normalizers"));
      for (const json& sub : *subs) PDS_RETURN_IF_ERROR(add_normalizer(sub, depth + 1));
    } else if (type == "NFC") {
      impl.normalizers.push_back({NormStep::kNfc, "", ""});
    } else if (type == "Prepend") {
      PDS_ASSIGN_OR_RETURN(std::string prepend, fields.String(n, where, "prepend", ""));
      impl.normalizers.push_back({NormStep::kPrepend, std::move(prepend), ""});
    } else if (type == "Replace") {
      PDS_ASSIGN_OR_RETURN(const json* pattern, fields.Object(n, where, "pattern"));
      if (!pattern->contains("String"))
        return Unsupported(source, "Replace normalizer with a regex");
      PDS_ASSIGN_OR_RETURN(std::string from, fields.String(*pattern, where, "String", ""));
      PDS_ASSIGN_OR_RETURN(std::string to, fields.String(n, where, "content", ""));
      impl.normalizers.push_back({NormStep::kReplace, std::move(from), std::move(to)});
    } else {
      return Unsupported(source, absl::StrCat("normalizer '", type, "'"));
    }
    return absl::OkStatus();
  };
  if (j.contains("normalizer")) PDS_RETURN_IF_ERROR(add_normalizer(j["normalizer"], 0));

  // Metaspace's prepend_scheme; older files have add_prefix_space instead.
  auto prepend_scheme = [&](const json& m, absl::string_view where) -> absl::StatusOr<std::string> {
    PDS_ASSIGN_OR_RETURN(const bool add_prefix_space,
                         fields.Bool(m, where, "add_prefix_space", true));
    PDS_ASSIGN_OR_RETURN(std::string scheme, fields.String(m, where, "prepend_scheme",
                                                           add_prefix_space ? "always" : "never"));
    if (scheme != "always" && scheme != "first" && scheme != "never") {
      return Unsupported(source, absl::StrCat("Metaspace prepend_scheme '", scheme, "'"));
    }
    return scheme;
  };

  // Pre-tokenizers.
  std::function<absl::Status(const json&, int)> add_pre = [&](const json& p,
                                                              int depth) -> absl::Status {
    if (p.is_null()) return absl::OkStatus();
    const std::string type = TypeOf(p);
    const std::string where = absl::StrCat("pre_tokenizer ", type);
    PreStep step;
    if (type == "Sequence") {
      if (depth >= kMaxSequenceDepth) return too_deep("pre_tokenizer");
      PDS_ASSIGN_OR_RETURN(const json* subs, fields.Array(p, where, "pretokenizers"));
      for (const json& sub : *subs) PDS_RETURN_IF_ERROR(add_pre(sub, depth + 1));
      return absl::OkStatus();
    } else if (type == "Split") {
      PDS_ASSIGN_OR_RETURN(const json* pattern, fields.Object(p, where, "pattern"));
      const bool literal = pattern->contains("String");
      if (!literal && !pattern->contains("Regex")) return Unsupported(source, "Split pattern");
      PDS_ASSIGN_OR_RETURN(std::string expr,
                           fields.String(*pattern, where, literal ? "String" : "Regex", ""));
      PDS_ASSIGN_OR_RETURN(std::unique_ptr<Regex> re, Regex::Compile(expr, literal, source));
      step.kind = PreStep::kSplit;
      step.regex = std::move(re);
      PDS_ASSIGN_OR_RETURN(const bool invert, fields.Bool(p, where, "invert", false));
      if (invert) return Unsupported(source, "Split with invert: true");
      PDS_ASSIGN_OR_RETURN(const std::string behavior,
                           fields.String(p, where, "behavior", "Isolated"));
      if (behavior == "Isolated") {
        step.behavior = SplitBehavior::kIsolated;
      } else if (behavior == "Removed") {
        step.behavior = SplitBehavior::kRemoved;
      } else if (behavior == "MergedWithPrevious") {
        step.behavior = SplitBehavior::kMergedWithPrevious;
      } else if (behavior == "MergedWithNext") {
        step.behavior = SplitBehavior::kMergedWithNext;
      } else {
        return Unsupported(source, absl::StrCat("Split behavior '", behavior, "'"));
      }
    } else if (type == "ByteLevel") {
      step.kind = PreStep::kByteLevel;
      PDS_ASSIGN_OR_RETURN(step.add_prefix_space, fields.Bool(p, where, "add_prefix_space", false));
      PDS_ASSIGN_OR_RETURN(const bool use_regex, fields.Bool(p, where, "use_regex", true));
      if (use_regex) {
        PDS_ASSIGN_OR_RETURN(std::unique_ptr<Regex> re,
                             Regex::Compile(kGpt2Pattern, false, source));
        step.regex = std::move(re);
      }
      impl.byte_level_input = true;
    } else if (type == "Metaspace") {
      step.kind = PreStep::kMetaspace;
      PDS_ASSIGN_OR_RETURN(step.replacement, fields.Char(p, where, "replacement", kMetaspace));
      PDS_ASSIGN_OR_RETURN(step.prepend_scheme, prepend_scheme(p, where));
      PDS_ASSIGN_OR_RETURN(step.split, fields.Bool(p, where, "split", true));
    } else {
      return Unsupported(source, absl::StrCat("pre-tokenizer '", type, "'"));
    }
    impl.pre_tokenizers.push_back(std::move(step));
    return absl::OkStatus();
  };
  if (j.contains("pre_tokenizer")) PDS_RETURN_IF_ERROR(add_pre(j["pre_tokenizer"], 0));

  // Post-processor: a TemplateProcessing (possibly inside a Sequence) for single inputs.
  std::function<absl::Status(const json&, int)> add_post = [&](const json& p,
                                                               int depth) -> absl::Status {
    if (p.is_null()) return absl::OkStatus();
    const std::string type = TypeOf(p);
    const std::string where = absl::StrCat("post_processor ", type);
    if (type == "Sequence") {
      if (depth >= kMaxSequenceDepth) return too_deep("post_processor");
      PDS_ASSIGN_OR_RETURN(const json* subs, fields.Array(p, where, "processors"));
      for (const json& sub : *subs) PDS_RETURN_IF_ERROR(add_post(sub, depth + 1));
    } else if (type == "ByteLevel") {
      // Offsets only; ids unchanged.
    } else if (type == "TemplateProcessing") {
      impl.has_template = true;
      bool seen_sequence = false;
      PDS_ASSIGN_OR_RETURN(const json* specials, fields.Object(p, where, "special_tokens"));
      PDS_ASSIGN_OR_RETURN(const json* single, fields.Array(p, where, "single"));
      for (const json& piece : *single) {
        if (piece.contains("Sequence")) {
          seen_sequence = true;
        } else if (piece.contains("SpecialToken")) {
          PDS_ASSIGN_OR_RETURN(const json* special, fields.Object(piece, where, "SpecialToken"));
          PDS_ASSIGN_OR_RETURN(const std::string name, fields.String(*special, where, "id", ""));
          std::vector<int32_t> ids;
          if (specials->contains(name) && (*specials)[name].contains("ids")) {
            const std::string entry = absl::StrCat(where, " special_tokens['", name, "']");
            PDS_ASSIGN_OR_RETURN(const json* listed, fields.Array((*specials)[name], entry, "ids"));
            for (const json& id : *listed) {
              if (!id.is_number_integer() || id.get<int64_t>() < 0 ||
                  id.get<int64_t>() > INT32_MAX) {
                return fields.Error(entry, "ids", "must hold non-negative integers");
              }
              ids.push_back(id.get<int32_t>());
            }
          } else if (auto it = tok->vocab_.find(name); it != tok->vocab_.end()) {
            ids.push_back(it->second);
          } else {
            return absl::InvalidArgumentError(
                absl::StrCat(source, ": template token '", name, "' is not in the vocabulary"));
          }
          auto& target = seen_sequence ? impl.template_suffix : impl.template_prefix;
          target.insert(target.end(), ids.begin(), ids.end());
        }
      }
    } else {
      return Unsupported(source, absl::StrCat("post-processor '", type, "'"));
    }
    return absl::OkStatus();
  };
  if (j.contains("post_processor")) PDS_RETURN_IF_ERROR(add_post(j["post_processor"], 0));

  // Decoders.
  std::function<absl::Status(const json&, int)> add_dec = [&](const json& d,
                                                              int depth) -> absl::Status {
    if (d.is_null()) return absl::OkStatus();
    const std::string type = TypeOf(d);
    const std::string where = absl::StrCat("decoder ", type);
    if (type == "Sequence") {
      if (depth >= kMaxSequenceDepth) return too_deep("decoder");
      PDS_ASSIGN_OR_RETURN(const json* subs, fields.Array(d, where, "decoders"));
      for (const json& sub : *subs) PDS_RETURN_IF_ERROR(add_dec(sub, depth + 1));
    } else if (type == "ByteLevel") {
      impl.decoders.push_back({DecStep::kByteLevel});
    } else if (type == "Replace") {
      PDS_ASSIGN_OR_RETURN(const json* pattern, fields.Object(d, where, "pattern"));
      if (!pattern->contains("String")) return Unsupported(source, "Replace decoder with a regex");
      PDS_ASSIGN_OR_RETURN(std::string from, fields.String(*pattern, where, "String", ""));
      PDS_ASSIGN_OR_RETURN(std::string to, fields.String(d, where, "content", ""));
      impl.decoders.push_back({DecStep::kReplace, std::move(from), std::move(to)});
    } else if (type == "ByteFallback") {
      impl.decoders.push_back({DecStep::kByteFallback});
    } else if (type == "Fuse") {
      impl.decoders.push_back({DecStep::kFuse});
    } else if (type == "Strip") {
      DecStep step{DecStep::kStrip};
      PDS_ASSIGN_OR_RETURN(step.a, fields.Char(d, where, "content", " "));
      PDS_ASSIGN_OR_RETURN(step.start, fields.Count(d, where, "start", 0));
      PDS_ASSIGN_OR_RETURN(step.stop, fields.Count(d, where, "stop", 0));
      impl.decoders.push_back(std::move(step));
    } else if (type == "Metaspace") {
      DecStep step{DecStep::kMetaspace};
      PDS_ASSIGN_OR_RETURN(step.a, fields.Char(d, where, "replacement", kMetaspace));
      PDS_ASSIGN_OR_RETURN(step.b, prepend_scheme(d, where));
      impl.decoders.push_back(std::move(step));
    } else {
      return Unsupported(source, absl::StrCat("decoder '", type, "'"));
    }
    return absl::OkStatus();
  };
  if (j.contains("decoder")) PDS_RETURN_IF_ERROR(add_dec(j["decoder"], 0));
  return tok;
} catch (const json::exception& e) {
  return absl::InvalidArgumentError(absl::StrCat(source, ": malformed tokenizer: ", e.what()));
}

std::optional<int32_t> Tokenizer::TokenToId(absl::string_view token) const {
  auto it = vocab_.find(token);
  if (it == vocab_.end()) return std::nullopt;
  return it->second;
}

const std::string* Tokenizer::IdToToken(int32_t id) const {
  if (id < 0 || id >= vocab_size()) return nullptr;
  return &id_to_token_[id];
}

bool Tokenizer::IsSpecial(int32_t id) const {
  return id >= 0 && static_cast<size_t>(id) < special_.size() && special_[id];
}

std::vector<int32_t> Tokenizer::Encode(absl::string_view raw, bool add_special_tokens) const {
  const Impl& impl = *impl_;
  const std::string text = IsValidUtf8(raw) ? std::string(raw) : SanitizeUtf8(raw);
  std::vector<int32_t> ids;
  if (add_special_tokens) ids = impl.template_prefix;
  // Split around added tokens (leftmost, longest), honouring lstrip/rstrip.
  size_t segment_begin = 0;
  size_t i = 0;
  auto is_space = [](char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r'; };
  while (i < text.size()) {
    const AddedToken* match = nullptr;
    for (int index : impl.added_by_first_byte[static_cast<uint8_t>(text[i])]) {
      const AddedToken& t = impl.added[index];
      if (text.compare(i, t.content.size(), t.content) == 0) {
        match = &t;
        break;
      }
    }
    if (match == nullptr) {
      ++i;
      continue;
    }
    size_t seg_end = i;
    if (match->lstrip) {
      while (seg_end > segment_begin && is_space(text[seg_end - 1])) --seg_end;
    }
    if (seg_end > segment_begin) {
      EncodeSegment(absl::string_view(text).substr(segment_begin, seg_end - segment_begin),
                    segment_begin == 0, ids);
    }
    ids.push_back(match->id);
    i += match->content.size();
    if (match->rstrip) {
      while (i < text.size() && is_space(text[i])) ++i;
    }
    segment_begin = i;
  }
  if (segment_begin < text.size()) {
    EncodeSegment(absl::string_view(text).substr(segment_begin), segment_begin == 0, ids);
  }
  if (add_special_tokens)
    ids.insert(ids.end(), impl.template_suffix.begin(), impl.template_suffix.end());
  return ids;
}

void Tokenizer::EncodeSegment(absl::string_view segment, bool at_start,
                              std::vector<int32_t>& ids) const {
  const Impl& impl = *impl_;
  std::string normalized(segment);
  for (const NormStep& n : impl.normalizers) {
    switch (n.kind) {
      case NormStep::kNfc: {
        auto nfc = NormalizeNfc(normalized);
        if (nfc.ok()) normalized = std::move(*nfc);
        break;
      }
      case NormStep::kPrepend:
        if (!normalized.empty()) normalized = n.a + normalized;
        break;
      case NormStep::kReplace:
        normalized = absl::StrReplaceAll(normalized, {{n.a, n.b}});
        break;
    }
  }
  std::vector<Piece> pieces = {{std::move(normalized), at_start}};
  for (const PreStep& step : impl.pre_tokenizers) {
    switch (step.kind) {
      case PreStep::kSplit:
        pieces = SplitPieces(pieces, *step.regex, step.behavior);
        break;
      case PreStep::kByteLevel: {
        if (step.add_prefix_space) {
          for (Piece& p : pieces) {
            if (p.text.empty() || p.text[0] != ' ') p.text.insert(0, " ");
          }
        }
        if (step.regex) pieces = SplitPieces(pieces, *step.regex, SplitBehavior::kIsolated);
        const auto& chars = ByteLevelChars();
        for (Piece& p : pieces) {
          std::string mapped;
          mapped.reserve(p.text.size() * 2);
          for (unsigned char c : p.text) mapped += chars[c];
          p.text = std::move(mapped);
        }
        break;
      }
      case PreStep::kMetaspace: {
        for (Piece& p : pieces) {
          p.text = absl::StrReplaceAll(p.text, {{" ", step.replacement}});
          const bool prepend =
              step.prepend_scheme == "always" || (step.prepend_scheme == "first" && p.at_start);
          if (prepend && p.text.compare(0, step.replacement.size(), step.replacement) != 0) {
            p.text.insert(0, step.replacement);
          }
        }
        if (step.split) {
          std::vector<Piece> out;
          // HF splits before every replacement (MergedWithNext) but one at offset 0, also in
          // pieces that do not start with one (no prepend, or not the first piece).
          for (Piece& p : pieces) {
            size_t start = 0;
            for (size_t k = p.text.find(step.replacement, 1); k != std::string::npos;
                 k = p.text.find(step.replacement, k + 1)) {
              out.push_back({p.text.substr(start, k - start), p.at_start && start == 0});
              start = k;
            }
            if (start < p.text.size()) {
              out.push_back({p.text.substr(start), p.at_start && start == 0});
            }
          }
          pieces = std::move(out);
        }
        break;
      }
    }
  }
  for (const Piece& p : pieces) {
    if (!p.text.empty()) Bpe(p.text, ids);
  }
}

void Tokenizer::Bpe(absl::string_view piece, std::vector<int32_t>& ids) const {
  if (piece.size() > kCacheMaxPieceBytes) return BpeUncached(piece, ids);
  CacheShard& shard = cache_[absl::HashOf(piece) % kCacheShards];
  {
    std::lock_guard<std::mutex> lock(shard.mu);
    auto it = shard.entries.find(piece);
    if (it != shard.entries.end()) {
      ids.insert(ids.end(), it->second.begin(), it->second.end());
      return;
    }
  }
  const size_t before = ids.size();
  BpeUncached(piece, ids);
  std::lock_guard<std::mutex> lock(shard.mu);
  if (shard.entries.size() >= kCacheMaxEntriesPerShard) shard.entries.clear();
  shard.entries.emplace(piece, std::vector<int32_t>(ids.begin() + before, ids.end()));
}

void Tokenizer::BpeUncached(absl::string_view piece, std::vector<int32_t>& ids) const {
  const Impl& impl = *impl_;
  if (impl.ignore_merges) {
    auto it = vocab_.find(piece);
    if (it != vocab_.end()) {
      ids.push_back(it->second);
      return;
    }
  }
  // Initial symbols: one per character; characters outside the vocabulary fall back to
  // <0xHH> byte tokens or the unknown token.
  std::vector<int32_t> symbols;
  size_t i = 0;
  bool last_unk = false;
  while (i < piece.size()) {
    const size_t begin = i;
    NextCodePoint(piece, i);
    auto it = vocab_.find(piece.substr(begin, i - begin));
    if (it != vocab_.end()) {
      symbols.push_back(it->second);
      last_unk = false;
      continue;
    }
    if (impl.byte_fallback) {
      bool all = true;
      for (size_t k = begin; k < i; ++k)
        all &= impl.byte_tokens[static_cast<uint8_t>(piece[k])] >= 0;
      if (all) {
        for (size_t k = begin; k < i; ++k)
          symbols.push_back(impl.byte_tokens[static_cast<uint8_t>(piece[k])]);
        last_unk = false;
        continue;
      }
    }
    if (impl.unk_id) {
      if (!(impl.fuse_unk && last_unk)) symbols.push_back(*impl.unk_id);
      last_unk = true;
    }
  }
  const size_t n = symbols.size();
  if (n > 1 && !impl.merges.empty()) {
    // Merge the lowest-ranked adjacent pair, leftmost first, until none applies; symbols
    // form a linked list, and stale heap entries are skipped when popped.
    std::vector<int32_t> prev(n), next(n);
    for (size_t k = 0; k < n; ++k) {
      prev[k] = static_cast<int32_t>(k) - 1;
      next[k] = k + 1 < n ? static_cast<int32_t>(k + 1) : -1;
    }
    struct Candidate {
      int32_t rank, pos, left, right;
      bool operator>(const Candidate& o) const {
        return rank != o.rank ? rank > o.rank : pos > o.pos;
      }
    };
    std::priority_queue<Candidate, std::vector<Candidate>, std::greater<>> heap;
    auto push = [&](int32_t pos) {
      if (pos < 0 || next[pos] < 0) return;
      const int32_t a = symbols[pos], b = symbols[next[pos]];
      auto it = impl.merges.find((static_cast<uint64_t>(a) << 32) | static_cast<uint32_t>(b));
      if (it != impl.merges.end()) heap.push({it->second.first, pos, a, b});
    };
    for (size_t k = 0; k + 1 < n; ++k) push(static_cast<int32_t>(k));
    while (!heap.empty()) {
      const Candidate c = heap.top();
      heap.pop();
      const int32_t r = next[c.pos];
      if (symbols[c.pos] != c.left || r < 0 || symbols[r] != c.right) continue;  // stale
      symbols[c.pos] =
          impl.merges.find((static_cast<uint64_t>(c.left) << 32) | static_cast<uint32_t>(c.right))
              ->second.second;
      symbols[r] = -1;
      next[c.pos] = next[r];
      if (next[r] >= 0) prev[next[r]] = c.pos;
      push(prev[c.pos]);
      push(c.pos);
    }
    for (int32_t k = 0; k >= 0; k = next[k]) ids.push_back(symbols[k]);
    return;
  }
  ids.insert(ids.end(), symbols.begin(), symbols.end());
}

std::string Tokenizer::Decode(absl::Span<const int32_t> ids, bool skip_special_tokens) const {
  const Impl& impl = *impl_;
  std::vector<std::string> tokens;
  tokens.reserve(ids.size());
  for (int32_t id : ids) {
    if (id < 0 || id >= vocab_size()) continue;
    if (skip_special_tokens && special_[id]) continue;
    tokens.push_back(id_to_token_[id]);
  }
  if (impl.decoders.empty()) {
    std::string out;
    for (size_t k = 0; k < tokens.size(); ++k) absl::StrAppend(&out, k ? " " : "", tokens[k]);
    return out;
  }
  for (const DecStep& d : impl.decoders) {
    switch (d.kind) {
      case DecStep::kByteLevel: {
        std::string bytes;
        for (const std::string& t : tokens) {
          std::string mapped;
          bool ok = true;
          size_t k = 0;
          while (k < t.size()) {
            const int b = ByteLevelByte(NextCodePoint(t, k));
            if (b < 0) {
              ok = false;
              break;
            }
            mapped.push_back(static_cast<char>(b));
          }
          bytes += ok ? mapped : t;
        }
        tokens = {SanitizeUtf8(bytes)};
        break;
      }
      case DecStep::kReplace:
        for (std::string& t : tokens) t = absl::StrReplaceAll(t, {{d.a, d.b}});
        break;
      case DecStep::kByteFallback: {
        std::vector<std::string> out;
        std::string pending;
        size_t pending_count = 0;
        auto flush = [&] {
          if (pending_count == 0) return;
          if (IsValidUtf8(pending)) {
            out.push_back(pending);
          } else {
            for (size_t k = 0; k < pending_count; ++k) out.push_back("\xEF\xBF\xBD");
          }
          pending.clear();
          pending_count = 0;
        };
        for (std::string& t : tokens) {
          unsigned value;
          if (t.size() == 6 && t.compare(0, 3, "<0x") == 0 && t[5] == '>' &&
              std::sscanf(t.c_str() + 3, "%2x", &value) == 1) {
            pending.push_back(static_cast<char>(value));
            ++pending_count;
          } else {
            flush();
            out.push_back(std::move(t));
          }
        }
        flush();
        tokens = std::move(out);
        break;
      }
      case DecStep::kFuse: {
        std::string joined;
        for (const std::string& t : tokens) joined += t;
        tokens = {std::move(joined)};
        break;
      }
      case DecStep::kStrip:
        for (std::string& t : tokens) {
          int s = 0;
          while (s < d.start && t.compare(0, d.a.size(), d.a) == 0 && !d.a.empty()) {
            t.erase(0, d.a.size());
            ++s;
          }
          int e = 0;
          while (e < d.stop && t.size() >= d.a.size() && !d.a.empty() &&
                 t.compare(t.size() - d.a.size(), d.a.size(), d.a) == 0) {
            t.erase(t.size() - d.a.size());
            ++e;
          }
        }
        break;
      case DecStep::kMetaspace:
        // HF's decode_chain: unless the scheme is "never", every replacement in the first
        // token is dropped, not just a leading one ("▁a▁b" alone decodes to "ab").
        for (size_t k = 0; k < tokens.size(); ++k) {
          tokens[k] = absl::StrReplaceAll(tokens[k], {{d.a, k == 0 && d.b != "never" ? "" : " "}});
        }
        break;
    }
  }
  std::string out;
  for (const std::string& t : tokens) out += t;
  return out;
}

std::string Tokenizer::TokenBytes(int32_t id) const {
  if (id < 0 || id >= vocab_size()) return "";
  std::string t = id_to_token_[id];
  if (impl_->decoders.empty()) return t;
  for (const DecStep& d : impl_->decoders) {
    switch (d.kind) {
      case DecStep::kByteLevel: {
        std::string mapped;
        bool ok = true;
        size_t k = 0;
        while (ok && k < t.size()) {
          const int b = ByteLevelByte(NextCodePoint(t, k));
          ok = b >= 0;
          mapped.push_back(static_cast<char>(b));
        }
        if (ok) t = std::move(mapped);  // else: not byte-level text, kept as it is (as Decode)
        break;
      }
      case DecStep::kReplace:
        t = absl::StrReplaceAll(t, {{d.a, d.b}});
        break;
      case DecStep::kByteFallback: {
        unsigned value;
        if (t.size() == 6 && t.compare(0, 3, "<0x") == 0 && t[5] == '>' &&
            std::sscanf(t.c_str() + 3, "%2x", &value) == 1) {
          t = std::string(1, static_cast<char>(value));
        }
        break;
      }
      case DecStep::kMetaspace:
        t = absl::StrReplaceAll(t, {{d.a, " "}});
        break;
      case DecStep::kFuse:
      case DecStep::kStrip:
        break;
    }
  }
  return t;
}

namespace {
constexpr absl::string_view kReplacementChar = "\xEF\xBF\xBD";  // U+FFFD
}  // namespace

// Decode(ids[prefix_offset_:]) normally starts with the emitted Decode(ids[prefix_offset_:
// read_offset_]) and the rest is new. ByteFallback breaks that when bytes after read_offset_
// make the whole byte run invalid UTF-8: the run then decodes to one U+FFFD per byte, emitted
// text included, and cutting it at the emitted length would split a U+FFFD. The new ids are
// then decoded on their own: valid UTF-8 (as every Decode is), and nothing emitted repeats.
std::string StreamDecoder::NewText(bool finish) {
  const absl::Span<const int32_t> all(ids_);
  const std::string text = tokenizer_.Decode(all.subspan(prefix_offset_), skip_special_);
  // A trailing U+FFFD may be a character whose remaining bytes are still to come.
  if (!finish && absl::EndsWith(text, kReplacementChar)) return "";
  const std::string prefix =
      tokenizer_.Decode(all.subspan(prefix_offset_, read_offset_ - prefix_offset_), skip_special_);
  std::string out;
  if (absl::StartsWith(text, prefix)) {
    if (!finish && text.size() == prefix.size()) return "";
    out = text.substr(prefix.size());
  } else {
    out = tokenizer_.Decode(all.subspan(read_offset_), skip_special_);
  }
  prefix_offset_ = finish ? ids_.size() : read_offset_;
  read_offset_ = ids_.size();
  return out;
}

std::string StreamDecoder::Add(int32_t id) {
  ids_.push_back(id);
  return NewText(/*finish=*/false);
}

std::string StreamDecoder::Finish() { return NewText(/*finish=*/true); }

}  // namespace pds::engine

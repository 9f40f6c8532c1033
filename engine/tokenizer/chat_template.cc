#include "engine/tokenizer/chat_template.h"

#include <unicode/uchar.h>
#include <unicode/ustring.h>

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <functional>
#include <limits>
#include <sstream>
#include <utility>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "engine/common/status_macros.h"
#include "engine/tokenizer/unicode.h"
#include "nlohmann/json.hpp"

namespace pds::engine {
namespace {

using Json = nlohmann::ordered_json;

constexpr int kMaxParseDepth = 200;    // nested expressions, and nested blocks
constexpr int kMaxTagTokens = 4096;    // tokens in one {{ }} or {% %} (an expression's nodes)
constexpr int kMaxNativeDepth = 1000;  // statements and expressions being run inside each other
constexpr int kMaxMacroDepth = 64;
constexpr int64_t kMaxSteps = 5'000'000;  // expressions and statements evaluated
constexpr size_t kMaxOutputBytes = size_t{64} << 20;
constexpr size_t kMaxListItems = 1'000'000;  // a list value's items
// Lists and dicts nested in each other (copying, comparing and printing values recurse).
constexpr int kMaxValueDepth = 128;

// --- lexer ---------------------------------------------------------------------------------

enum class Tok {
  kText,
  kVarBegin,
  kVarEnd,
  kBlockBegin,
  kBlockEnd,
  kName,
  kString,
  kInt,
  kFloat,
  kOp,
  kEof
};

struct Token {
  Tok kind;
  std::string text;  // text, name, string value, operator
  int64_t i = 0;
  double f = 0;
  int line = 1;
};

bool IsSpace(char c) {
  return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f';
}

bool IsPyWhitespace(uint32_t c);

// Bytes at the start (end) of `s` whose characters all satisfy `pred`.
size_t PrefixWhile(absl::string_view s, const std::function<bool(uint32_t)>& pred) {
  size_t i = 0;
  while (i < s.size()) {
    size_t next = i;
    if (!pred(NextCodePoint(s, next))) break;
    i = std::min(next, s.size());
  }
  return i;
}
size_t SuffixWhile(absl::string_view s, const std::function<bool(uint32_t)>& pred) {
  size_t e = s.size();
  while (e > 0) {
    size_t start = e - 1;  // the last character's first byte
    while (start > 0 && (static_cast<uint8_t>(s[start]) & 0xC0) == 0x80) --start;
    size_t next = start;
    if (!pred(NextCodePoint(s, next))) break;
    e = start;
  }
  return s.size() - e;
}

// Bytes of Python whitespace (str.isspace, as Jinja's \s and rstrip) at the start or end of s.
size_t SpaceAtStart(absl::string_view s) { return PrefixWhile(s, IsPyWhitespace); }
size_t SpaceAtEnd(absl::string_view s) { return SuffixWhile(s, IsPyWhitespace); }

size_t CountNewlines(absl::string_view s) { return std::count(s.begin(), s.end(), '\n'); }

absl::Status LexError(absl::string_view source, int line, absl::string_view what) {
  return absl::InvalidArgumentError(absl::StrCat(source, " line ", line, ": ", what));
}

// Splits a template into text and tag tokens with Jinja's whitespace rules as HF sets them:
// trim_blocks (the newline after a block or comment tag goes), lstrip_blocks (spaces and tabs
// before a block or comment tag at the start of a line go), '-' strips all whitespace on its
// side, '+' keeps it; the template's one trailing newline goes (keep_trailing_newline off).
// Counts a nesting level while it lives.
struct DepthGuard {
  explicit DepthGuard(int& depth) : depth(depth) { ++depth; }
  ~DepthGuard() { --depth; }
  int& depth;
};

class Lexer {
 public:
  Lexer(absl::string_view text, absl::string_view source) : source_(source) {
    src_.reserve(text.size());
    for (size_t i = 0; i < text.size(); ++i) {  // newlines are \n in Jinja's text
      if (text[i] == '\r') {
        src_.push_back('\n');
        if (i + 1 < text.size() && text[i + 1] == '\n') ++i;
      } else {
        src_.push_back(text[i]);
      }
    }
    if (!src_.empty() && src_.back() == '\n') src_.pop_back();
  }

  absl::StatusOr<std::vector<Token>> Run() {
    size_t pos = 0;
    bool strip_next = false;    // the previous tag ended with '-'
    bool trim_newline = false;  // the previous tag was a block or comment (trim_blocks)
    bool line_start = true;
    const size_t n = src_.size();
    while (pos <= n) {
      size_t p = pos;
      while (true) {
        p = src_.find('{', p);
        if (p == std::string::npos || p + 1 >= n) {
          p = std::string::npos;
          break;
        }
        const char c = src_[p + 1];
        if (c == '{' || c == '%' || c == '#') break;
        ++p;
      }
      std::string text = src_.substr(pos, p == std::string::npos ? std::string::npos : p - pos);
      // The previous tag's right side.
      bool at_line_start = line_start;
      if (strip_next) {
        const size_t k = SpaceAtStart(text);
        if (k > 0) at_line_start = text[k - 1] == '\n';
        text.erase(0, k);
      } else if (trim_newline && !text.empty() && text[0] == '\n') {
        text.erase(0, 1);
        at_line_start = true;
      }
      if (p == std::string::npos) {
        Emit(Tok::kText, std::move(text));
        break;
      }
      const char kind = src_[p + 1];
      size_t q = p + 2;
      char sign = 0;
      if (q < n && (src_[q] == '-' || src_[q] == '+')) sign = src_[q++];
      if (sign == '-') {
        text.resize(text.size() - SpaceAtEnd(text));
      } else if (kind != '{' && sign != '+') {  // lstrip_blocks: a line of only whitespace
        const size_t nl = text.rfind('\n');
        const size_t l = nl == std::string::npos ? 0 : nl + 1;
        if ((l > 0 || at_line_start) &&
            SpaceAtStart(absl::string_view(text).substr(l)) == text.size() - l) {
          text.resize(l);
        }
      }
      Emit(Tok::kText, std::move(text));
      line_ += static_cast<int>(CountNewlines(absl::string_view(src_).substr(pos, p - pos)));
      pos = q;
      if (kind == '#') {
        const size_t end = src_.find("#}", q);
        if (end == std::string::npos) return LexError(source_, line_, "unclosed comment");
        strip_next = end > q && src_[end - 1] == '-';
        trim_newline = !(end > q && src_[end - 1] == '+');
        line_ += static_cast<int>(CountNewlines(absl::string_view(src_).substr(q, end - q)));
        pos = end + 2;
        line_start = false;
        continue;
      }
      const bool block = kind == '%';
      tokens_.push_back({block ? Tok::kBlockBegin : Tok::kVarBegin, "", 0, 0, line_});
      const size_t first = tokens_.size();
      char end_sign = 0;
      PDS_RETURN_IF_ERROR(LexTag(block ? '%' : '}', pos, end_sign));
      // Bounds an expression's tree, whose evaluation and destruction recurse.
      if (tokens_.size() - first > kMaxTagTokens) {
        return LexError(source_, line_,
                        absl::StrCat("a tag of more than ", kMaxTagTokens, " tokens"));
      }
      tokens_.push_back({block ? Tok::kBlockEnd : Tok::kVarEnd, "", 0, 0, line_});
      strip_next = end_sign == '-';
      trim_newline = block && end_sign != '+';
      line_start = false;
      if (block && tokens_.size() == first + 2 && tokens_[first].kind == Tok::kName &&
          tokens_[first].text == "raw") {
        PDS_RETURN_IF_ERROR(Raw(first, pos, strip_next, trim_newline));
      }
    }
    tokens_.push_back({Tok::kEof, "", 0, 0, line_});
    return std::move(tokens_);
  }

 private:
  void Emit(Tok kind, std::string text) {
    if (kind == Tok::kText && text.empty()) return;
    tokens_.push_back({kind, std::move(text), 0, 0, line_});
  }

  // The tokens of a tag's inside, up to its end ("%}" or "}}" outside brackets); `pos` ends
  // past it.
  absl::Status LexTag(char closer, size_t& pos, char& end_sign) {
    const size_t n = src_.size();
    int depth = 0;
    while (true) {
      while (pos < n && IsSpace(src_[pos])) {
        if (src_[pos] == '\n') ++line_;
        ++pos;
      }
      if (pos >= n) return LexError(source_, line_, "unclosed tag");
      const char c = src_[pos];
      if (depth == 0) {
        for (char s : {'-', '+', '\0'}) {
          const size_t at = pos + (s ? 1 : 0);
          if ((s == 0 || c == s) && at + 1 < n && src_[at] == closer && src_[at + 1] == '}') {
            end_sign = s;
            pos = at + 2;
            return absl::OkStatus();
          }
        }
      }
      if (std::isalpha(static_cast<unsigned char>(c)) || c == '_') {
        size_t e = pos;
        while (e < n && (std::isalnum(static_cast<unsigned char>(src_[e])) || src_[e] == '_')) ++e;
        Emit(Tok::kName, src_.substr(pos, e - pos));
        pos = e;
      } else if (std::isdigit(static_cast<unsigned char>(c))) {
        PDS_RETURN_IF_ERROR(Number(pos));
      } else if (c == '\'' || c == '"') {
        PDS_RETURN_IF_ERROR(String(pos));
      } else {
        static constexpr const char* kOps[] = {"**", "//", "==", "!=", "<=", ">=", "+", "-", "*",
                                               "/",  "%",  "~",  "<",  ">",  "=",  ".", ",", ":",
                                               "|",  "(",  ")",  "[",  "]",  "{",  "}"};
        const char* op = nullptr;
        for (const char* o : kOps) {
          if (src_.compare(pos, std::strlen(o), o) == 0) {
            op = o;
            break;
          }
        }
        if (op == nullptr) {
          return LexError(source_, line_,
                          absl::StrCat("unexpected character '", std::string(1, c), "'"));
        }
        if (c == '(' || c == '[' || c == '{') ++depth;
        if ((c == ')' || c == ']' || c == '}') && depth > 0) --depth;
        Emit(Tok::kOp, op);
        pos += std::strlen(op);
      }
    }
  }

  absl::Status Number(size_t& pos) {
    const size_t n = src_.size();
    size_t e = pos;
    bool is_float = false;
    while (e < n && (std::isdigit(static_cast<unsigned char>(src_[e])) || src_[e] == '_')) ++e;
    if (e + 1 < n && src_[e] == '.' && std::isdigit(static_cast<unsigned char>(src_[e + 1]))) {
      is_float = true;
      ++e;
      while (e < n && std::isdigit(static_cast<unsigned char>(src_[e]))) ++e;
    }
    if (e < n && (src_[e] == 'e' || src_[e] == 'E')) {
      size_t k = e + 1;
      if (k < n && (src_[k] == '+' || src_[k] == '-')) ++k;
      if (k < n && std::isdigit(static_cast<unsigned char>(src_[k]))) {
        is_float = true;
        e = k;
        while (e < n && std::isdigit(static_cast<unsigned char>(src_[e]))) ++e;
      }
    }
    std::string digits;
    for (size_t k = pos; k < e; ++k) {
      if (src_[k] != '_') digits.push_back(src_[k]);
    }
    Token t{is_float ? Tok::kFloat : Tok::kInt, digits, 0, 0, line_};
    if (is_float) {
      t.f = std::strtod(digits.c_str(), nullptr);
    } else {
      auto [ptr, ec] = std::from_chars(digits.data(), digits.data() + digits.size(), t.i);
      if (ec != std::errc()) return LexError(source_, line_, "integer literal out of range");
    }
    tokens_.push_back(std::move(t));
    pos = e;
    return absl::OkStatus();
  }

  // A Python string literal with its escapes.
  absl::Status String(size_t& pos) {
    const size_t n = src_.size();
    const char quote = src_[pos++];
    std::string out;
    while (true) {
      if (pos >= n) return LexError(source_, line_, "unterminated string");
      const char c = src_[pos++];
      if (c == quote) break;
      if (c == '\n') ++line_;
      if (c != '\\' || pos >= n) {
        out.push_back(c);
        continue;
      }
      if (src_[pos] == '\n') ++line_;  // a continued line
      if (!AppendPythonEscape(src_, pos, out)) {
        return LexError(source_, line_, "bad escape in string");
      }
    }
    tokens_.push_back({Tok::kString, std::move(out), 0, 0, line_});
    return absl::OkStatus();
  }

  // After {% raw %}: the text up to {% endraw %}, as it is.
  absl::Status Raw(size_t first, size_t& pos, bool& strip_next, bool& trim_newline) {
    tokens_.resize(first - 1);  // drop the raw tag's tokens
    const size_t n = src_.size();
    size_t p = pos;
    while (true) {
      p = src_.find("{%", p);
      if (p == std::string::npos) return LexError(source_, line_, "{% raw %} without {% endraw %}");
      size_t q = p + 2;
      const bool strip_before = q < n && src_[q] == '-';
      if (q < n && (src_[q] == '-' || src_[q] == '+')) ++q;
      while (q < n && IsSpace(src_[q])) ++q;
      if (src_.compare(q, 6, "endraw") != 0) {
        p += 2;
        continue;
      }
      q += 6;
      while (q < n && IsSpace(src_[q])) ++q;
      char end_sign = 0;
      if (q < n && (src_[q] == '-' || src_[q] == '+')) end_sign = src_[q++];
      if (src_.compare(q, 2, "%}") != 0) {
        p += 2;
        continue;
      }
      std::string text = src_.substr(pos, p - pos);
      // trim_blocks does not apply after {% raw %} (Jinja keeps that newline); lstrip_blocks
      // does before {% endraw %}.
      if (strip_next) text.erase(0, SpaceAtStart(text));
      if (strip_before) {
        text.resize(text.size() - SpaceAtEnd(text));
      } else if (src_[p + 2] != '+') {
        const size_t nl = text.rfind('\n');
        if (nl != std::string::npos &&
            SpaceAtStart(absl::string_view(text).substr(nl + 1)) == text.size() - nl - 1) {
          text.resize(nl + 1);
        }
      }
      Emit(Tok::kText, std::move(text));
      line_ += static_cast<int>(CountNewlines(absl::string_view(src_).substr(pos, q + 2 - pos)));
      pos = q + 2;
      strip_next = end_sign == '-';
      trim_newline = end_sign != '+';
      return absl::OkStatus();
    }
  }

  std::string src_;
  std::string source_;
  std::vector<Token> tokens_;
  int line_ = 1;
};

// --- syntax tree ---------------------------------------------------------------------------

struct Expr {
  enum Kind {
    kLiteral,
    kName,
    kList,
    kDict,
    kAttr,
    kIndex,
    kSlice,
    kCall,
    kFilter,
    kTest,
    kNot,
    kNeg,
    kPos,
    kBinary,
    kCompare,
    kCond
  };
  Kind kind;
  int line = 0;
  Json value;        // kLiteral
  std::string name;  // name, attribute, filter, test, operator
  // kAttr [obj]; kIndex [obj, key]; kSlice [obj, start, stop, step] (null: absent); kCall
  // [callee, args...]; kFilter/kTest [obj, args...]; kNot/kNeg/kPos [x]; kBinary [l, r]; kCond
  // [then, cond, else (null: absent)]; kList items; kDict key, value, key, value, ...; kCompare
  // [x0, x1, ..., xn] with ops[i] between x(i) and x(i+1) (a chain: x0 < x1 < x2).
  std::vector<std::unique_ptr<Expr>> args;
  std::vector<std::string> ops;  // kCompare
  std::vector<std::pair<std::string, std::unique_ptr<Expr>>> kwargs;
};

using ExprPtr = std::unique_ptr<Expr>;

}  // namespace

struct ChatTemplate::Node {
  enum Kind {
    kBody,
    kText,
    kOutput,
    kIf,
    kFor,
    kSet,
    kSetAttr,
    kSetBlock,
    kMacro,
    kBreak,
    kContinue,
    kScope
  };
  Kind kind = kBody;
  int line = 0;
  bool loop_neighbors = false;  // kFor: its body may read loop.previtem or loop.nextitem
  std::string text;             // kText; kSetAttr's attribute; kMacro's name
  // kOutput [e]; kIf conditions; kFor [iterable, filter (may be null)]; kSet/kSetAttr [value];
  // kMacro parameter defaults (null: none).
  std::vector<ExprPtr> exprs;
  // kFor and kSet targets; kSetAttr [namespace]; kSetBlock [name]; kMacro parameters.
  std::vector<std::string> targets;
  // kBody statements; kIf bodies (one per condition, then the else body if any); kFor [body,
  // else body (may be absent)]; kSetBlock/kMacro/kScope [body].
  std::vector<std::unique_ptr<Node>> children;
};

namespace {

using Node = ChatTemplate::Node;
using NodePtr = std::unique_ptr<Node>;

const absl::flat_hash_set<std::string>& KnownFilters() {
  static const auto* const kFilters = new absl::flat_hash_set<std::string>{
      "abs",        "capitalize", "count",    "d",       "default", "dictsort", "e",
      "escape",     "first",      "float",    "indent",  "int",     "items",    "join",
      "last",       "length",     "list",     "lower",   "map",     "max",      "min",
      "reject",     "rejectattr", "replace",  "reverse", "round",   "safe",     "select",
      "selectattr", "sort",       "string",   "sum",     "title",   "tojson",   "trim",
      "unique",     "upper",      "wordcount"};
  return *kFilters;
}

const absl::flat_hash_set<std::string>& KnownTests() {
  static const auto* const kTests = new absl::flat_hash_set<std::string>{
      "boolean", "callable",  "defined", "divisibleby", "eq",          "equalto",  "escaped",
      "even",    "false",     "float",   "ge",          "greaterthan", "gt",       "in",
      "integer", "iterable",  "le",      "lessthan",    "lower",       "lt",       "mapping",
      "ne",      "none",      "number",  "odd",         "sameas",      "sequence", "string",
      "true",    "undefined", "upper",   "==",          "!=",          "<",        "<=",
      ">",       ">="};
  return *kTests;
}

class Parser {
 public:
  Parser(std::vector<Token> tokens, std::string source)
      : tokens_(std::move(tokens)), source_(std::move(source)) {}

  absl::StatusOr<NodePtr> Run() {
    std::string end;
    PDS_ASSIGN_OR_RETURN(NodePtr body, Body({}, &end));
    return body;
  }

 private:
  const Token& Peek(size_t ahead = 0) const {
    return tokens_[std::min(pos_ + ahead, tokens_.size() - 1)];
  }
  const Token& Next() { return tokens_[std::min(pos_++, tokens_.size() - 1)]; }
  bool IsOp(absl::string_view op, size_t ahead = 0) const {
    return Peek(ahead).kind == Tok::kOp && Peek(ahead).text == op;
  }
  bool IsName(absl::string_view name, size_t ahead = 0) const {
    return Peek(ahead).kind == Tok::kName && Peek(ahead).text == name;
  }
  absl::Status Error(absl::string_view what) const {
    return absl::InvalidArgumentError(absl::StrCat(source_, " line ", Peek().line, ": ", what));
  }
  std::string Describe(const Token& t) const {
    switch (t.kind) {
      case Tok::kText:
        return "text";
      case Tok::kVarBegin:
        return "'{{'";
      case Tok::kVarEnd:
        return "'}}'";
      case Tok::kBlockBegin:
        return "'{%'";
      case Tok::kBlockEnd:
        return "'%}'";
      case Tok::kEof:
        return "the end of the template";
      case Tok::kString:
        return "a string";
      case Tok::kInt:
      case Tok::kFloat:
        return "a number";
      default:
        return absl::StrCat("'", t.text, "'");
    }
  }
  absl::Status Expect(Tok kind, absl::string_view what) {
    if (Peek().kind != kind)
      return Error(absl::StrCat("expected ", what, ", got ", Describe(Peek())));
    ++pos_;
    return absl::OkStatus();
  }
  absl::Status ExpectOp(absl::string_view op) {
    if (!IsOp(op)) return Error(absl::StrCat("expected '", op, "', got ", Describe(Peek())));
    ++pos_;
    return absl::OkStatus();
  }
  absl::StatusOr<std::string> ExpectName() {
    if (Peek().kind != Tok::kName)
      return Error(absl::StrCat("expected a name, got ", Describe(Peek())));
    return Next().text;
  }

  // Statements until a block tag named in `ends` (its '{%' and name consumed; returned in
  // *end) or the end of the template (only when `ends` is empty).
  absl::StatusOr<NodePtr> Body(const std::vector<absl::string_view>& ends, std::string* end) {
    DepthGuard guard(block_depth_);
    if (block_depth_ > kMaxParseDepth) return Error("blocks nested too deeply");
    auto body = std::make_unique<Node>();
    body->kind = Node::kBody;
    body->line = Peek().line;
    while (true) {
      const Token& t = Peek();
      if (t.kind == Tok::kEof) {
        if (ends.empty()) return body;
        // Name the closing tag ({% endif %}, not {% elif %}).
        absl::string_view closer = ends.front();
        for (absl::string_view e : ends) {
          if (absl::StartsWith(e, "end")) closer = e;
        }
        return Error(absl::StrCat("missing {% ", closer, " %}"));
      }
      if (t.kind == Tok::kText) {
        auto node = std::make_unique<Node>();
        node->kind = Node::kText;
        node->line = t.line;
        node->text = t.text;
        body->children.push_back(std::move(node));
        ++pos_;
        continue;
      }
      if (t.kind == Tok::kVarBegin) {
        ++pos_;
        auto node = std::make_unique<Node>();
        node->kind = Node::kOutput;
        node->line = t.line;
        PDS_ASSIGN_OR_RETURN(ExprPtr e, Expression());
        node->exprs.push_back(std::move(e));
        PDS_RETURN_IF_ERROR(Expect(Tok::kVarEnd, "'}}'"));
        body->children.push_back(std::move(node));
        continue;
      }
      if (t.kind != Tok::kBlockBegin) return Error(absl::StrCat("unexpected ", Describe(t)));
      ++pos_;
      PDS_ASSIGN_OR_RETURN(std::string tag, ExpectName());
      if (std::find(ends.begin(), ends.end(), tag) != ends.end()) {
        *end = tag;
        return body;
      }
      if (tag == "generation") {  // HF's assistant-mask marker: its body renders as is
        PDS_RETURN_IF_ERROR(Expect(Tok::kBlockEnd, "'%}'"));
        std::string e;
        PDS_ASSIGN_OR_RETURN(NodePtr inner, Body({"endgeneration"}, &e));
        PDS_RETURN_IF_ERROR(Expect(Tok::kBlockEnd, "'%}'"));
        // A call block in HF's extension: its own scope, so its sets stay inside.
        auto scope = std::make_unique<Node>();
        scope->kind = Node::kScope;
        scope->line = t.line;
        scope->children.push_back(std::move(inner));
        body->children.push_back(std::move(scope));
        continue;
      }
      PDS_ASSIGN_OR_RETURN(NodePtr node, Statement(tag, t.line));
      body->children.push_back(std::move(node));
    }
  }

  absl::StatusOr<NodePtr> Statement(const std::string& tag, int line) {
    auto node = std::make_unique<Node>();
    node->line = line;
    std::string end;
    if (tag == "if") {
      node->kind = Node::kIf;
      while (true) {
        PDS_ASSIGN_OR_RETURN(ExprPtr cond, Expression());
        node->exprs.push_back(std::move(cond));
        PDS_RETURN_IF_ERROR(Expect(Tok::kBlockEnd, "'%}'"));
        PDS_ASSIGN_OR_RETURN(NodePtr body, Body({"elif", "else", "endif"}, &end));
        node->children.push_back(std::move(body));
        if (end != "elif") break;
      }
      if (end == "else") {
        PDS_RETURN_IF_ERROR(Expect(Tok::kBlockEnd, "'%}'"));
        PDS_ASSIGN_OR_RETURN(NodePtr body, Body({"endif"}, &end));
        node->children.push_back(std::move(body));
      }
      PDS_RETURN_IF_ERROR(Expect(Tok::kBlockEnd, "'%}'"));
      return node;
    }
    if (tag == "for") {
      node->kind = Node::kFor;
      PDS_ASSIGN_OR_RETURN(node->targets, Targets());
      if (!IsName("in")) return Error("expected 'in' in the for loop");
      ++pos_;
      PDS_ASSIGN_OR_RETURN(ExprPtr iterable, TupleOrExpression(/*with_cond=*/false));
      node->exprs.push_back(std::move(iterable));
      ExprPtr filter;
      if (IsName("if")) {
        ++pos_;
        PDS_ASSIGN_OR_RETURN(filter, Expression());
      }
      node->exprs.push_back(std::move(filter));
      if (IsName("recursive")) return Error("recursive loops are not supported");
      PDS_RETURN_IF_ERROR(Expect(Tok::kBlockEnd, "'%}'"));
      const size_t body_start = pos_;
      PDS_ASSIGN_OR_RETURN(NodePtr body, Body({"else", "endfor"}, &end));
      node->children.push_back(std::move(body));
      // loop.previtem and loop.nextitem (copies of items) only for a body that names them.
      for (size_t i = body_start; i < pos_ && !node->loop_neighbors; ++i) {
        const Token& t = tokens_[i];
        node->loop_neighbors = (t.kind == Tok::kName || t.kind == Tok::kString) &&
                               (t.text == "previtem" || t.text == "nextitem");
      }
      if (end == "else") {
        PDS_RETURN_IF_ERROR(Expect(Tok::kBlockEnd, "'%}'"));
        PDS_ASSIGN_OR_RETURN(NodePtr else_body, Body({"endfor"}, &end));
        node->children.push_back(std::move(else_body));
      }
      PDS_RETURN_IF_ERROR(Expect(Tok::kBlockEnd, "'%}'"));
      return node;
    }
    if (tag == "set") {
      if (Peek().kind == Tok::kName && IsOp(".", 1)) {
        node->kind = Node::kSetAttr;
        node->targets.push_back(Next().text);
        ++pos_;
        PDS_ASSIGN_OR_RETURN(node->text, ExpectName());
        PDS_RETURN_IF_ERROR(ExpectOp("="));
        PDS_ASSIGN_OR_RETURN(ExprPtr value, TupleOrExpression(true));
        node->exprs.push_back(std::move(value));
        PDS_RETURN_IF_ERROR(Expect(Tok::kBlockEnd, "'%}'"));
        return node;
      }
      PDS_ASSIGN_OR_RETURN(node->targets, Targets());
      if (Peek().kind == Tok::kBlockEnd && node->targets.size() == 1) {
        ++pos_;
        node->kind = Node::kSetBlock;
        PDS_ASSIGN_OR_RETURN(NodePtr body, Body({"endset"}, &end));
        node->children.push_back(std::move(body));
        PDS_RETURN_IF_ERROR(Expect(Tok::kBlockEnd, "'%}'"));
        return node;
      }
      node->kind = Node::kSet;
      PDS_RETURN_IF_ERROR(ExpectOp("="));
      PDS_ASSIGN_OR_RETURN(ExprPtr value, TupleOrExpression(true));
      node->exprs.push_back(std::move(value));
      PDS_RETURN_IF_ERROR(Expect(Tok::kBlockEnd, "'%}'"));
      return node;
    }
    if (tag == "macro") {
      node->kind = Node::kMacro;
      PDS_ASSIGN_OR_RETURN(node->text, ExpectName());
      PDS_RETURN_IF_ERROR(ExpectOp("("));
      while (!IsOp(")")) {
        PDS_ASSIGN_OR_RETURN(std::string param, ExpectName());
        node->targets.push_back(std::move(param));
        ExprPtr def;
        if (IsOp("=")) {
          ++pos_;
          PDS_ASSIGN_OR_RETURN(def, Expression());
        }
        node->exprs.push_back(std::move(def));
        if (!IsOp(",")) break;
        ++pos_;
      }
      PDS_RETURN_IF_ERROR(ExpectOp(")"));
      PDS_RETURN_IF_ERROR(Expect(Tok::kBlockEnd, "'%}'"));
      PDS_ASSIGN_OR_RETURN(NodePtr body, Body({"endmacro"}, &end));
      node->children.push_back(std::move(body));
      if (Peek().kind == Tok::kName) ++pos_;  // {% endmacro name %}
      PDS_RETURN_IF_ERROR(Expect(Tok::kBlockEnd, "'%}'"));
      return node;
    }
    if (tag == "break" || tag == "continue") {
      node->kind = tag == "break" ? Node::kBreak : Node::kContinue;
      PDS_RETURN_IF_ERROR(Expect(Tok::kBlockEnd, "'%}'"));
      return node;
    }
    return Error(absl::StrCat("the tag '", tag, "' is not supported"));
  }

  // name | name, name, ... | (name, name)
  absl::StatusOr<std::vector<std::string>> Targets() {
    std::vector<std::string> names;
    const bool paren = IsOp("(");
    if (paren) ++pos_;
    while (true) {
      PDS_ASSIGN_OR_RETURN(std::string name, ExpectName());
      names.push_back(std::move(name));
      if (!IsOp(",")) break;
      ++pos_;
    }
    if (paren) PDS_RETURN_IF_ERROR(ExpectOp(")"));
    return names;
  }

  ExprPtr Make(Expr::Kind kind, int line) {
    auto e = std::make_unique<Expr>();
    e->kind = kind;
    e->line = line;
    return e;
  }

  // An expression, or a bare tuple `a, b` (a list).
  absl::StatusOr<ExprPtr> TupleOrExpression(bool with_cond) {
    const int line = Peek().line;
    PDS_ASSIGN_OR_RETURN(ExprPtr first, Expression(with_cond));
    if (!IsOp(",")) return first;
    ExprPtr list = Make(Expr::kList, line);
    list->args.push_back(std::move(first));
    while (IsOp(",")) {
      ++pos_;
      if (Peek().kind == Tok::kBlockEnd || Peek().kind == Tok::kVarEnd || IsName("if")) break;
      PDS_ASSIGN_OR_RETURN(ExprPtr e, Expression(with_cond));
      list->args.push_back(std::move(e));
    }
    return list;
  }

  absl::StatusOr<ExprPtr> Expression(bool with_cond = true) {
    if (++depth_ > kMaxParseDepth) return Error("expression nested too deeply");
    absl::StatusOr<ExprPtr> e = with_cond ? Conditional() : Or();
    --depth_;
    return e;
  }

  absl::StatusOr<ExprPtr> Conditional() {
    PDS_ASSIGN_OR_RETURN(ExprPtr e, Or());
    while (IsName("if")) {
      const int line = Next().line;
      PDS_ASSIGN_OR_RETURN(ExprPtr cond, Or());
      ExprPtr otherwise;
      if (IsName("else")) {
        ++pos_;
        PDS_ASSIGN_OR_RETURN(otherwise, Conditional());
      }
      ExprPtr c = Make(Expr::kCond, line);
      c->args.push_back(std::move(e));
      c->args.push_back(std::move(cond));
      c->args.push_back(std::move(otherwise));
      e = std::move(c);
    }
    return e;
  }

  ExprPtr Binary(std::string op, ExprPtr l, ExprPtr r, int line) {
    ExprPtr b = Make(Expr::kBinary, line);
    b->name = std::move(op);
    b->args.push_back(std::move(l));
    b->args.push_back(std::move(r));
    return b;
  }

  // One left-associative level: operands parsed by `next`, joined by any of `ops` (operator
  // tokens, or names such as "and").
  absl::StatusOr<ExprPtr> Level(absl::StatusOr<ExprPtr> (Parser::*next)(),
                                std::initializer_list<absl::string_view> ops) {
    PDS_ASSIGN_OR_RETURN(ExprPtr e, (this->*next)());
    while (true) {
      auto op = std::find_if(ops.begin(), ops.end(),
                             [&](absl::string_view o) { return IsOp(o) || IsName(o); });
      if (op == ops.end()) return e;
      const int line = Next().line;
      PDS_ASSIGN_OR_RETURN(ExprPtr r, (this->*next)());
      e = Binary(std::string(*op), std::move(e), std::move(r), line);
    }
  }

  absl::StatusOr<ExprPtr> Or() { return Level(&Parser::And, {"or"}); }
  absl::StatusOr<ExprPtr> And() { return Level(&Parser::Not, {"and"}); }

  absl::StatusOr<ExprPtr> Not() {
    if (IsName("not")) {
      const int line = Next().line;
      if (++depth_ > kMaxParseDepth) return Error("expression nested too deeply");
      PDS_ASSIGN_OR_RETURN(ExprPtr x, Not());
      --depth_;
      ExprPtr n = Make(Expr::kNot, line);
      n->args.push_back(std::move(x));
      return n;
    }
    return Compare();
  }

  // A chain `a < b < c` means `a < b and b < c` with b evaluated once, as in Python.
  absl::StatusOr<ExprPtr> Compare() {
    PDS_ASSIGN_OR_RETURN(ExprPtr e, Math1());
    const Expr* chain_end = nullptr;
    while (true) {
      const int line = Peek().line;
      std::string op;
      if (Peek().kind == Tok::kOp &&
          (Peek().text == "==" || Peek().text == "!=" || Peek().text == "<" ||
           Peek().text == "<=" || Peek().text == ">" || Peek().text == ">=")) {
        op = Next().text;
      } else if (IsName("in")) {
        ++pos_;
        op = "in";
      } else if (IsName("not") && IsName("in", 1)) {
        pos_ += 2;
        op = "not in";
      } else {
        return e;
      }
      PDS_ASSIGN_OR_RETURN(ExprPtr r, Math1());
      if (e->kind != Expr::kCompare || chain_end != e.get()) {
        ExprPtr c = Make(Expr::kCompare, line);
        c->args.push_back(std::move(e));
        e = std::move(c);
        chain_end = e.get();
      }
      e->ops.push_back(std::move(op));
      e->args.push_back(std::move(r));
    }
  }

  absl::StatusOr<ExprPtr> Math1() { return Level(&Parser::Concat, {"+", "-"}); }
  absl::StatusOr<ExprPtr> Concat() { return Level(&Parser::Math2, {"~"}); }
  absl::StatusOr<ExprPtr> Math2() { return Level(&Parser::Pow, {"*", "/", "//", "%"}); }
  // Left-associative in Jinja (2 ** 3 ** 2 is 64), unlike Python.
  absl::StatusOr<ExprPtr> Pow() { return Level(&Parser::UnaryWithFilter, {"**"}); }
  absl::StatusOr<ExprPtr> UnaryWithFilter() { return Unary(true); }

  absl::StatusOr<ExprPtr> Unary(bool with_filter) {
    if (++depth_ > kMaxParseDepth) return Error("expression nested too deeply");
    ExprPtr e;
    if (IsOp("-") || IsOp("+")) {
      const Token& t = Next();
      PDS_ASSIGN_OR_RETURN(ExprPtr x, Unary(false));
      e = Make(t.text == "-" ? Expr::kNeg : Expr::kPos, t.line);
      e->args.push_back(std::move(x));
    } else {
      PDS_ASSIGN_OR_RETURN(e, Primary());
    }
    PDS_ASSIGN_OR_RETURN(e, Postfix(std::move(e)));
    if (with_filter) {
      PDS_ASSIGN_OR_RETURN(e, FilterExpr(std::move(e)));
    }
    --depth_;
    return e;
  }

  absl::StatusOr<ExprPtr> Primary() {
    const Token& t = Peek();
    switch (t.kind) {
      case Tok::kName: {
        ++pos_;
        ExprPtr e = Make(Expr::kLiteral, t.line);
        if (t.text == "true" || t.text == "True") {
          e->value = true;
        } else if (t.text == "false" || t.text == "False") {
          e->value = false;
        } else if (t.text == "none" || t.text == "None") {
          e->value = nullptr;
        } else {
          e->kind = Expr::kName;
          e->name = t.text;
        }
        return e;
      }
      case Tok::kString: {
        ExprPtr e = Make(Expr::kLiteral, t.line);
        std::string s;
        while (Peek().kind == Tok::kString) s += Next().text;  // 'a' 'b' is 'ab'
        e->value = std::move(s);
        return e;
      }
      case Tok::kInt:
      case Tok::kFloat: {
        ++pos_;
        ExprPtr e = Make(Expr::kLiteral, t.line);
        if (t.kind == Tok::kInt) {
          e->value = t.i;
        } else {
          e->value = t.f;
        }
        return e;
      }
      case Tok::kOp:
        if (t.text == "(") {
          ++pos_;
          if (IsOp(")")) {
            ++pos_;
            return Make(Expr::kList, t.line);
          }
          PDS_ASSIGN_OR_RETURN(ExprPtr e, Expression());
          if (IsOp(",")) {  // a tuple
            ExprPtr list = Make(Expr::kList, t.line);
            list->args.push_back(std::move(e));
            while (IsOp(",")) {
              ++pos_;
              if (IsOp(")")) break;
              PDS_ASSIGN_OR_RETURN(ExprPtr item, Expression());
              list->args.push_back(std::move(item));
            }
            e = std::move(list);
          }
          PDS_RETURN_IF_ERROR(ExpectOp(")"));
          return e;
        }
        if (t.text == "[") {
          ++pos_;
          ExprPtr list = Make(Expr::kList, t.line);
          while (!IsOp("]")) {
            PDS_ASSIGN_OR_RETURN(ExprPtr item, Expression());
            list->args.push_back(std::move(item));
            if (!IsOp(",")) break;
            ++pos_;
          }
          PDS_RETURN_IF_ERROR(ExpectOp("]"));
          return list;
        }
        if (t.text == "{") {
          ++pos_;
          ExprPtr dict = Make(Expr::kDict, t.line);
          while (!IsOp("}")) {
            PDS_ASSIGN_OR_RETURN(ExprPtr key, Expression());
            PDS_RETURN_IF_ERROR(ExpectOp(":"));
            PDS_ASSIGN_OR_RETURN(ExprPtr value, Expression());
            dict->args.push_back(std::move(key));
            dict->args.push_back(std::move(value));
            if (!IsOp(",")) break;
            ++pos_;
          }
          PDS_RETURN_IF_ERROR(ExpectOp("}"));
          return dict;
        }
        break;
      default:
        break;
    }
    return Error(absl::StrCat("unexpected ", Describe(t)));
  }

  absl::StatusOr<ExprPtr> Postfix(ExprPtr e) {
    while (true) {
      const int line = Peek().line;
      if (IsOp(".")) {
        ++pos_;
        if (Peek().kind == Tok::kInt) {  // x.0 is x[0]
          ExprPtr index = Make(Expr::kIndex, line);
          ExprPtr key = Make(Expr::kLiteral, line);
          key->value = Next().i;
          index->args.push_back(std::move(e));
          index->args.push_back(std::move(key));
          e = std::move(index);
          continue;
        }
        PDS_ASSIGN_OR_RETURN(std::string name, ExpectName());
        ExprPtr attr = Make(Expr::kAttr, line);
        attr->name = std::move(name);
        attr->args.push_back(std::move(e));
        e = std::move(attr);
      } else if (IsOp("[")) {
        ++pos_;
        PDS_ASSIGN_OR_RETURN(e, Subscript(std::move(e), line));
      } else if (IsOp("(")) {
        PDS_ASSIGN_OR_RETURN(e, Call(std::move(e), line));
      } else {
        return e;
      }
    }
  }

  // After '[': an index or a slice.
  absl::StatusOr<ExprPtr> Subscript(ExprPtr obj, int line) {
    ExprPtr parts[3];
    int part = 0;
    bool slice = false;
    while (true) {
      if (IsOp(":")) {
        slice = true;
        if (++part > 2) return Error("a slice has at most three parts");
        ++pos_;
        continue;
      }
      if (IsOp("]")) break;
      if (parts[part]) return Error("expected ':' or ']'");
      PDS_ASSIGN_OR_RETURN(parts[part], Expression());
    }
    ++pos_;  // ']'
    if (!slice) {
      if (!parts[0]) return Error("empty subscript");
      ExprPtr index = Make(Expr::kIndex, line);
      index->args.push_back(std::move(obj));
      index->args.push_back(std::move(parts[0]));
      return index;
    }
    ExprPtr s = Make(Expr::kSlice, line);
    s->args.push_back(std::move(obj));
    for (ExprPtr& p : parts) s->args.push_back(std::move(p));
    return s;
  }

  // Call arguments after the callee (at '('): positional ones into args, name=value ones into
  // kwargs.
  absl::Status Arguments(Expr& e) {
    PDS_RETURN_IF_ERROR(ExpectOp("("));
    while (!IsOp(")")) {
      if (Peek().kind == Tok::kName && IsOp("=", 1)) {
        std::string name = Next().text;
        ++pos_;
        PDS_ASSIGN_OR_RETURN(ExprPtr value, Expression());
        e.kwargs.emplace_back(std::move(name), std::move(value));
      } else {
        if (!e.kwargs.empty()) return Error("a positional argument follows a keyword argument");
        PDS_ASSIGN_OR_RETURN(ExprPtr value, Expression());
        e.args.push_back(std::move(value));
      }
      if (!IsOp(",")) break;
      ++pos_;
    }
    return ExpectOp(")");
  }

  absl::StatusOr<ExprPtr> Call(ExprPtr callee, int line) {
    ExprPtr call = Make(Expr::kCall, line);
    call->args.push_back(std::move(callee));
    PDS_RETURN_IF_ERROR(Arguments(*call));
    return call;
  }

  absl::StatusOr<ExprPtr> FilterExpr(ExprPtr e) {
    while (true) {
      const int line = Peek().line;
      if (IsOp("|")) {
        ++pos_;
        PDS_ASSIGN_OR_RETURN(std::string name, ExpectName());
        if (!KnownFilters().contains(name)) {
          return Error(absl::StrCat("the filter '", name, "' is not supported"));
        }
        ExprPtr f = Make(Expr::kFilter, line);
        f->name = std::move(name);
        f->args.push_back(std::move(e));
        if (IsOp("(")) PDS_RETURN_IF_ERROR(Arguments(*f));
        e = std::move(f);
      } else if (IsName("is")) {
        ++pos_;
        const bool negated = IsName("not");
        if (negated) ++pos_;
        std::string name;
        if (Peek().kind == Tok::kName ||
            (Peek().kind == Tok::kOp && KnownTests().contains(Peek().text))) {
          name = Next().text;
        } else {
          return Error(absl::StrCat("expected a test name, got ", Describe(Peek())));
        }
        if (name == "none" || name == "true" || name == "false") {
          absl::AsciiStrToLower(&name);
        }
        if (!KnownTests().contains(name)) {
          return Error(absl::StrCat("the test '", name, "' is not supported"));
        }
        ExprPtr t = Make(Expr::kTest, line);
        t->name = std::move(name);
        t->args.push_back(std::move(e));
        if (IsOp("(")) {
          PDS_RETURN_IF_ERROR(Arguments(*t));
        } else if ((Peek().kind == Tok::kName && !IsName("else") && !IsName("or") &&
                    !IsName("and") && !IsName("if") && !IsName("in") && !IsName("not") &&
                    !IsName("is")) ||
                   Peek().kind == Tok::kString || Peek().kind == Tok::kInt ||
                   Peek().kind == Tok::kFloat || IsOp("[") || IsOp("{")) {
          PDS_ASSIGN_OR_RETURN(ExprPtr arg, Primary());  // `is divisibleby 3`
          PDS_ASSIGN_OR_RETURN(arg, Postfix(std::move(arg)));
          t->args.push_back(std::move(arg));
        }
        e = std::move(t);
        if (negated) {
          ExprPtr n = Make(Expr::kNot, line);
          n->args.push_back(std::move(e));
          e = std::move(n);
        }
      } else if (IsOp("(")) {
        PDS_ASSIGN_OR_RETURN(e, Call(std::move(e), line));
      } else {
        return e;
      }
    }
  }

  std::vector<Token> tokens_;
  std::string source_;
  size_t pos_ = 0;
  int depth_ = 0;
  int block_depth_ = 0;
};

// --- values --------------------------------------------------------------------------------

// A template value: JSON data, or Jinja's undefined (holding the message an error about it
// gives).
struct Value {
  Value() = default;
  Value(Json data) : j(std::move(data)) {}  // NOLINT: implicit on purpose
  static Value Undefined(std::string why) {
    Value v;
    v.undefined = true;
    v.missing = std::move(why);
    return v;
  }
  Json j;
  bool undefined = false;
  // With undefined: a dict's method (`d.items`), defined and true in Jinja, whose attributes
  // are undefined rather than errors.
  bool method = false;
  bool ns = false;  // a namespace(): its attributes may be assigned
  std::string missing;
};

// An undefined value kept inside a list, dict or namespace, as Jinja keeps its Undefined there:
// JSON's "discarded" value, which no parsed input holds. Taken out (Renderer::Eval), it is
// undefined again.
Json Stored(Value v) { return v.undefined ? Json(Json::value_t::discarded) : std::move(v.j); }

bool IsIntLike(const Json& j) { return j.is_number_integer() || j.is_boolean(); }
bool IsNumber(const Json& j) { return j.is_number() || j.is_boolean(); }
int64_t AsInt(const Json& j) {
  if (j.is_boolean()) return j.get<bool>() ? 1 : 0;
  if (j.is_number_unsigned()) {
    return static_cast<int64_t>(std::min<uint64_t>(j.get<uint64_t>(), INT64_MAX));
  }
  if (j.is_number_integer()) return j.get<int64_t>();
  const double d = j.get<double>();  // truncated, and clamped (a cast past int64 is undefined)
  if (std::isnan(d)) return 0;
  if (d >= 9.2233720368547758e18) return INT64_MAX;
  if (d <= -9.2233720368547758e18) return INT64_MIN;
  return static_cast<int64_t>(d);
}
double AsDouble(const Json& j) {
  if (j.is_number_float()) return j.get<double>();
  return static_cast<double>(AsInt(j));
}

std::string TypeName(const Value& v) {
  if (v.undefined) return "Undefined";
  if (v.ns) return "Namespace";
  switch (v.j.type()) {
    case Json::value_t::null:
      return "NoneType";
    case Json::value_t::boolean:
      return "bool";
    case Json::value_t::number_integer:
    case Json::value_t::number_unsigned:
      return "int";
    case Json::value_t::number_float:
      return "float";
    case Json::value_t::string:
      return "str";
    case Json::value_t::array:
      return "list";
    case Json::value_t::object:
      return "dict";
    default:
      return "object";
  }
}

bool Truthy(const Json& j) {
  switch (j.type()) {
    case Json::value_t::discarded:  // a stored undefined
      return false;
    case Json::value_t::null:
      return false;
    case Json::value_t::boolean:
      return j.get<bool>();
    case Json::value_t::number_integer:
    case Json::value_t::number_unsigned:
      return AsInt(j) != 0;
    case Json::value_t::number_float:
      return j.get<double>() != 0;
    case Json::value_t::string:
      return !j.get_ref<const std::string&>().empty();
    case Json::value_t::array:
    case Json::value_t::object:
      return !j.empty();
    default:
      return true;
  }
}
bool Truthy(const Value& v) { return v.method || (!v.undefined && (v.ns || Truthy(v.j))); }

// Python's repr() of a float: the shortest digits that read back, in fixed notation for
// exponents in [-4, 16), else as 1.5e+16.
std::string FloatRepr(double d) {
  if (std::isnan(d)) return "nan";
  if (std::isinf(d)) return d < 0 ? "-inf" : "inf";
  char buf[64];
  const auto r = std::to_chars(buf, buf + sizeof(buf), d, std::chars_format::scientific);
  std::string s(buf, r.ptr);
  std::string sign;
  if (s[0] == '-') {
    sign = "-";
    s.erase(0, 1);
  }
  const size_t e = s.find('e');
  const int exp = std::stoi(s.substr(e + 1));
  std::string digits;
  for (char c : s.substr(0, e)) {
    if (c != '.') digits.push_back(c);
  }
  std::string out;
  if (exp < -4 || exp >= 16) {
    out = digits.substr(0, 1);
    if (digits.size() > 1) absl::StrAppend(&out, ".", digits.substr(1));
    absl::StrAppend(&out, exp < 0 ? "e-" : "e+", std::abs(exp) < 10 ? "0" : "", std::abs(exp));
  } else if (exp >= 0) {
    const size_t whole = static_cast<size_t>(exp) + 1;
    if (digits.size() <= whole) {
      out = digits + std::string(whole - digits.size(), '0') + ".0";
    } else {
      out = digits.substr(0, whole) + "." + digits.substr(whole);
    }
  } else {
    out = "0." + std::string(static_cast<size_t>(-exp - 1), '0') + digits;
  }
  return sign + out;
}

// Python's str.isprintable() of one character: not a control, format, surrogate, private,
// unassigned, or separator character other than the space.
bool IsPrintable(uint32_t c) {
  if (c < 0x80) return c >= 0x20 && c != 0x7f;
  switch (u_charType(static_cast<UChar32>(c))) {
    case U_CONTROL_CHAR:
    case U_FORMAT_CHAR:
    case U_SURROGATE:
    case U_PRIVATE_USE_CHAR:
    case U_UNASSIGNED:
    case U_SPACE_SEPARATOR:
    case U_LINE_SEPARATOR:
    case U_PARAGRAPH_SEPARATOR:
      return false;
    default:
      return true;
  }
}

// The largest run of decimal digits in `s`, as a number (0 for none; runs are short).
int64_t LargestNumber(absl::string_view s) {
  int64_t largest = 0, n = 0;
  for (char c : s) {
    n = absl::ascii_isdigit(static_cast<unsigned char>(c)) ? n * 10 + (c - '0') : 0;
    largest = std::max(largest, n);
  }
  return largest;
}

// A number character (Unicode N*).
bool IsNumberChar(uint32_t c) {
  if (c < 0x80) return c >= '0' && c <= '9';
  const int8_t type = u_charType(static_cast<UChar32>(c));
  return type == U_DECIMAL_DIGIT_NUMBER || type == U_LETTER_NUMBER || type == U_OTHER_NUMBER;
}

// Python's \w: letters, numbers and the underscore.
bool IsWordChar(uint32_t c) {
  if (c < 0x80) return std::isalnum(static_cast<int>(c)) || c == '_';
  switch (u_charType(static_cast<UChar32>(c))) {
    case U_UPPERCASE_LETTER:
    case U_LOWERCASE_LETTER:
    case U_TITLECASE_LETTER:
    case U_MODIFIER_LETTER:
    case U_OTHER_LETTER:
    case U_DECIMAL_DIGIT_NUMBER:
    case U_LETTER_NUMBER:
    case U_OTHER_NUMBER:
      return true;
    default:
      return false;
  }
}

// Python's repr() of a string: quotes, and escapes for what is not printable.
std::string StrRepr(const std::string& s) {
  const char q = s.find('\'') != std::string::npos && s.find('"') == std::string::npos ? '"' : '\'';
  std::string out(1, q);
  size_t i = 0;
  while (i < s.size()) {
    const size_t at = i;
    const uint32_t c = NextCodePoint(s, i);
    i = std::min(i, s.size());
    if (c == static_cast<uint8_t>(q) || c == '\\') {
      out.push_back('\\');
      out.push_back(static_cast<char>(c));
    } else if (c == '\n') {
      out += "\\n";
    } else if (c == '\r') {
      out += "\\r";
    } else if (c == '\t') {
      out += "\\t";
    } else if (IsPrintable(c)) {
      out.append(s, at, i - at);
    } else if (c < 0x100) {
      absl::StrAppend(&out, "\\x", absl::Hex(c, absl::kZeroPad2));
    } else if (c < 0x10000) {
      absl::StrAppend(&out, "\\u", absl::Hex(c, absl::kZeroPad4));
    } else {
      absl::StrAppend(&out, "\\U", absl::Hex(c, absl::kZeroPad8));
    }
  }
  out.push_back(q);
  return out;
}

// Python's round(x, digits) of a float: the decimal rounding of x's exact binary value, ties to
// even (printf's rounding, for digits >= 0).
double PyRound(double x, int digits) {
  if (!std::isfinite(x)) return x;
  if (digits < 0) {
    const double scale = std::pow(10.0, -digits);
    return std::nearbyint(x / scale) * scale;
  }
  char buf[800];  // up to 309 integer digits, the point and 340 decimals
  std::snprintf(buf, sizeof(buf), "%.*f", std::min(digits, 340), x);
  return std::strtod(buf, nullptr);
}

// Python's repr() of the value.
void Repr(const Json& j, std::string& out) {
  switch (j.type()) {
    case Json::value_t::null:
      out += "None";
      return;
    case Json::value_t::discarded:  // a stored undefined
      out += "Undefined";
      return;
    case Json::value_t::boolean:
      out += j.get<bool>() ? "True" : "False";
      return;
    case Json::value_t::number_integer:
      absl::StrAppend(&out, j.get<int64_t>());
      return;
    case Json::value_t::number_unsigned:
      absl::StrAppend(&out, j.get<uint64_t>());
      return;
    case Json::value_t::number_float:
      out += FloatRepr(j.get<double>());
      return;
    case Json::value_t::string:
      out += StrRepr(j.get_ref<const std::string&>());
      return;
    case Json::value_t::array: {
      out += "[";
      bool first = true;
      for (const Json& x : j) {
        if (!first) out += ", ";
        first = false;
        Repr(x, out);
      }
      out += "]";
      return;
    }
    case Json::value_t::object: {
      out += "{";
      bool first = true;
      for (const auto& [k, x] : j.items()) {
        if (!first) out += ", ";
        first = false;
        out += StrRepr(k);
        out += ": ";
        Repr(x, out);
      }
      out += "}";
      return;
    }
    default:
      return;
  }
}

// Python's str() of the value ({{ x }}, ~, |string): strings as they are.
std::string Str(const Value& v) {
  if (v.undefined || v.j.is_discarded()) return "";
  if (v.j.is_string()) return v.j.get<std::string>();
  std::string out;
  if (v.ns) out += "<Namespace ";
  Repr(v.j, out);
  if (v.ns) out += ">";
  return out;
}

// Python's json.dumps(ensure_ascii=False) of the value (HF's tojson).
void Dumps(const Json& j, const std::string* indent, bool sort_keys, bool ensure_ascii,
           const std::string& item_sep, const std::string& key_sep, int level, std::string& out) {
  auto newline = [&](int l) {
    if (indent == nullptr) return;
    out.push_back('\n');
    for (int i = 0; i < l; ++i) out += *indent;
  };
  switch (j.type()) {
    case Json::value_t::number_float: {
      const double d = j.get<double>();
      out += std::isnan(d)   ? "NaN"
             : std::isinf(d) ? (d < 0 ? "-Infinity" : "Infinity")
                             : FloatRepr(d);
      return;
    }
    case Json::value_t::array: {
      if (j.empty()) {
        out += "[]";
        return;
      }
      out += "[";
      for (size_t i = 0; i < j.size(); ++i) {
        if (i > 0) out += item_sep;
        newline(level + 1);
        Dumps(j[i], indent, sort_keys, ensure_ascii, item_sep, key_sep, level + 1, out);
      }
      newline(level);
      out += "]";
      return;
    }
    case Json::value_t::object: {
      if (j.empty()) {
        out += "{}";
        return;
      }
      std::vector<std::pair<const std::string*, const Json*>> items;
      for (const auto& [k, x] : j.items()) items.emplace_back(&k, &x);
      if (sort_keys) {
        std::stable_sort(items.begin(), items.end(),
                         [](const auto& a, const auto& b) { return *a.first < *b.first; });
      }
      out += "{";
      for (size_t i = 0; i < items.size(); ++i) {
        if (i > 0) out += item_sep;
        newline(level + 1);
        out += Json(*items[i].first).dump(-1, ' ', ensure_ascii, Json::error_handler_t::replace);
        out += key_sep;
        Dumps(*items[i].second, indent, sort_keys, ensure_ascii, item_sep, key_sep, level + 1, out);
      }
      newline(level);
      out += "}";
      return;
    }
    default:
      out += j.dump(-1, ' ', ensure_ascii, Json::error_handler_t::replace);
  }
}

// Python's ==.
bool Equal(const Json& a, const Json& b) {
  if (a.is_discarded() || b.is_discarded()) return a.is_discarded() && b.is_discarded();
  if (IsNumber(a) && IsNumber(b)) {
    if (IsIntLike(a) && IsIntLike(b)) return AsInt(a) == AsInt(b);
    return AsDouble(a) == AsDouble(b);
  }
  if (a.type() != b.type()) return false;
  if (a.is_array()) {
    if (a.size() != b.size()) return false;
    for (size_t i = 0; i < a.size(); ++i) {
      if (!Equal(a[i], b[i])) return false;
    }
    return true;
  }
  if (a.is_object()) {
    if (a.size() != b.size()) return false;
    for (const auto& [k, x] : a.items()) {
      auto it = b.find(k);
      if (it == b.end() || !Equal(x, *it)) return false;
    }
    return true;
  }
  return a == b;
}

bool Equal(const Value& a, const Value& b) {
  if (a.undefined || b.undefined) return a.undefined && b.undefined;
  return Equal(a.j, b.j);
}

// The code points of UTF-8 text, each as its bytes.
std::vector<std::string> Chars(absl::string_view s) {
  std::vector<std::string> out;
  size_t i = 0;
  while (i < s.size()) {
    const size_t start = i;
    NextCodePoint(s, i);
    if (i == start) ++i;
    out.emplace_back(s.substr(start, i - start));
  }
  return out;
}

// The names of Python dict methods, which `d.name` finds before any key.
bool IsDictMethod(absl::string_view name) {
  for (absl::string_view m : {"items", "keys", "values", "get", "pop", "popitem", "update",
                              "setdefault", "copy", "clear", "fromkeys"}) {
    if (name == m) return true;
  }
  return false;
}

// Whether a value holds a stored undefined (values nest at most kMaxValueDepth deep).
bool NestingHasUndefined(const Json& j) {
  if (j.is_discarded()) return true;
  if (!j.is_structured()) return false;
  for (const Json& x : j) {
    if (NestingHasUndefined(x)) return true;
  }
  return false;
}

// The number of characters (code points) of UTF-8 text.
int64_t CodePointCount(absl::string_view s) {
  int64_t n = 0;
  for (char c : s) n += (static_cast<uint8_t>(c) & 0xC0) != 0x80;
  return n;
}

// A value's nesting depth (a scalar is 0) and about how many bytes it takes (its strings and
// keys, and 16 a value). The walk stops past `max_depth` levels or `max_bytes` bytes (so it
// recurses no deeper, and the results then only say "more than").
struct Extent {
  int depth = 0;
  size_t bytes = 16;
};
Extent Measure(const Json& j, int max_depth, size_t max_bytes) {
  Extent e;
  if (j.is_string()) e.bytes += j.get_ref<const std::string&>().size();
  if (!j.is_structured()) return e;
  e.depth = 1;
  if (max_depth <= 0) return e;
  int deepest = 0;
  auto add = [&](const Json& x, size_t key_bytes) {
    const Extent sub = Measure(x, max_depth - 1, max_bytes - std::min(e.bytes, max_bytes));
    deepest = std::max(deepest, sub.depth);
    e.bytes += key_bytes + sub.bytes;
    return deepest < max_depth && e.bytes <= max_bytes;
  };
  if (j.is_object()) {
    for (const auto& [k, x] : j.items()) {
      if (!add(x, k.size())) break;
    }
  } else {
    for (const Json& x : j) {
      if (!add(x, 0)) break;
    }
  }
  e.depth += deepest;
  return e;
}

// Case mapping as Python's str does it: ICU's full mappings (root locale: ß -> SS, final
// sigma, dotless i), with a fast path for ASCII.
enum class CaseKind { kUpper, kLower, kTitle };

bool IsAscii(absl::string_view s) {
  for (char c : s) {
    if (static_cast<uint8_t>(c) >= 0x80) return false;
  }
  return true;
}

std::string IcuCase(absl::string_view s, CaseKind kind) {
  if (IsAscii(s) && kind != CaseKind::kTitle) {
    std::string out(s);
    for (char& c : out)
      c = kind == CaseKind::kUpper ? absl::ascii_toupper(c) : absl::ascii_tolower(c);
    return out;
  }
  const std::u16string src = ToUtf16(s);
  const int32_t len16 = static_cast<int32_t>(src.size());
  auto map = [&](UChar* dest, int32_t cap, UErrorCode* e) {
    switch (kind) {
      case CaseKind::kUpper:
        return u_strToUpper(dest, cap, src.data(), len16, "", e);
      case CaseKind::kLower:
        return u_strToLower(dest, cap, src.data(), len16, "", e);
      default:
        return u_strToTitle(dest, cap, src.data(), len16, nullptr, "", e);
    }
  };
  UErrorCode err = U_ZERO_ERROR;
  const int32_t n = map(nullptr, 0, &err);  // the mapped length
  std::u16string dst(static_cast<size_t>(n), u'\0');
  err = U_ZERO_ERROR;
  map(dst.data(), n, &err);
  if (U_FAILURE(err)) return std::string(s);
  return FromUtf16(dst);
}

bool IsCased(uint32_t c) {
  if (c < 0x80) return absl::ascii_isalpha(static_cast<unsigned char>(c));
  return u_hasBinaryProperty(static_cast<UChar32>(c), UCHAR_CASED);
}

std::string Upper(absl::string_view s) { return IcuCase(s, CaseKind::kUpper); }
std::string Lower(absl::string_view s) { return IcuCase(s, CaseKind::kLower); }

// Words' first characters mapped by `first` (Python's title case for str.title and
// capitalize, upper case for Jinja's title filter), runs of the other characters lowered; a
// word starts at the start and after a character for which `boundary` holds.
std::string TitleCase(absl::string_view s, const std::function<bool(uint32_t)>& boundary,
                      CaseKind first, bool only_first_word = false) {
  std::string out;
  size_t i = 0, run = 0;  // run: where the pending run to lower starts
  bool start = true, seen_first = false;
  while (i < s.size()) {
    const size_t from = i;
    const uint32_t c = NextCodePoint(s, i);
    i = std::min(i, s.size());
    if (start && !(only_first_word && seen_first)) {
      out += Lower(s.substr(run, from - run));
      out += IcuCase(s.substr(from, i - from), first);
      run = i;
      seen_first = true;
    }
    start = boundary(c);
  }
  out += Lower(s.substr(run));
  return out;
}

// Python's str.title(): a character after a cased one is lowered, others title-cased.
std::string PyTitle(absl::string_view s) {
  return TitleCase(
      s, [](uint32_t c) { return !IsCased(c); }, CaseKind::kTitle);
}
// Python's str.capitalize(): the first character title-cased, the rest lowered.
std::string Capitalize(absl::string_view s) {
  return TitleCase(
      s, [](uint32_t) { return true; }, CaseKind::kTitle, /*only_first_word=*/true);
}

bool IsPyWhitespace(uint32_t c) {
  return c == ' ' || (c >= 0x09 && c <= 0x0D) || (c >= 0x1C && c <= 0x1F) || c == 0x85 ||
         c == 0xA0 || c == 0x1680 || (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 ||
         c == 0x202F || c == 0x205F || c == 0x3000;
}

// Python's str.isspace/isdigit (ASCII digits only)/isupper/islower: false for "".
bool StrPredicate(absl::string_view s, const std::string& name) {
  bool any_cased = false;
  size_t i = 0;
  while (i < s.size()) {
    const size_t from = i;
    const uint32_t c = NextCodePoint(s, i);
    if (i == from) return false;
    if (name == "isspace" && !IsPyWhitespace(c)) return false;
    if (name == "isdigit" && !(c >= '0' && c <= '9')) return false;
    if (name == "isalpha" && !(IsWordChar(c) && c != '_' && !IsNumberChar(c))) return false;
    if (name == "isalnum" && !(IsWordChar(c) && c != '_')) return false;
    if (name == "isupper" || name == "islower") {
      const bool upper = name == "isupper";
      if (!IsCased(c)) continue;
      any_cased = true;
      const bool is = c < 0x80 ? (upper ? absl::ascii_isupper(static_cast<unsigned char>(c))
                                        : absl::ascii_islower(static_cast<unsigned char>(c)))
                               : u_hasBinaryProperty(static_cast<UChar32>(c),
                                                     upper ? UCHAR_UPPERCASE : UCHAR_LOWERCASE);
      if (!is) return false;
    }
  }
  return !s.empty() && (any_cased || (name != "isupper" && name != "islower"));
}

// Python's str.strip/lstrip/rstrip: whitespace, or the code points of `chars`.
std::string Strip(const std::string& s, const std::optional<std::string>& chars, bool left,
                  bool right) {
  std::vector<uint32_t> set;
  for (size_t i = 0; chars && i < chars->size();) set.push_back(NextCodePoint(*chars, i));
  auto strip = [&](uint32_t c) {
    return chars ? std::find(set.begin(), set.end(), c) != set.end() : IsPyWhitespace(c);
  };
  const size_t b = left ? PrefixWhile(s, strip) : 0;
  const size_t e = right ? s.size() - SuffixWhile(absl::string_view(s).substr(b), strip) : s.size();
  return s.substr(b, e - b);
}

// Python's str.split(sep, maxsplit).
Json Split(const std::string& s, const std::optional<std::string>& sep, int64_t maxsplit) {
  Json out = Json::array();
  if (sep) {
    size_t pos = 0;
    int64_t splits = 0;
    while (maxsplit < 0 || splits < maxsplit) {
      const size_t at = s.find(*sep, pos);
      if (at == std::string::npos) break;
      out.push_back(s.substr(pos, at - pos));
      pos = at + sep->size();
      ++splits;
    }
    out.push_back(s.substr(pos));
    return out;
  }
  const std::vector<std::string> cs = Chars(s);
  auto ws = [&](size_t i) {
    size_t k = 0;
    return IsPyWhitespace(NextCodePoint(cs[i], k));
  };
  size_t i = 0;
  int64_t splits = 0;
  while (i < cs.size()) {
    while (i < cs.size() && ws(i)) ++i;
    if (i == cs.size()) break;
    std::string word;
    if (maxsplit >= 0 && splits == maxsplit) {
      while (i < cs.size()) word += cs[i++];
      out.push_back(std::move(word));  // Python keeps the rest as it is, trailing space too
      break;
    }
    while (i < cs.size() && !ws(i)) word += cs[i++];
    out.push_back(std::move(word));
    ++splits;
  }
  return out;
}

std::string Replace(const std::string& s, const std::string& from, const std::string& to,
                    int64_t count) {
  std::string out;
  if (from.empty()) {  // Python inserts `to` around every code point
    const std::vector<std::string> cs = Chars(s);
    int64_t done = 0;
    for (size_t i = 0; i <= cs.size(); ++i) {
      if (count < 0 || done < count) {
        out += to;
        ++done;
      }
      if (i < cs.size()) out += cs[i];
    }
    return out;
  }
  size_t pos = 0;
  int64_t done = 0;
  while (count < 0 || done < count) {
    const size_t at = s.find(from, pos);
    if (at == std::string::npos) break;
    out.append(s, pos, at - pos);
    out += to;
    pos = at + from.size();
    ++done;
  }
  out.append(s, pos, std::string::npos);
  return out;
}

// markupsafe's escape, as the `escape` filter.
std::string HtmlEscape(const std::string& s) {
  std::string out;
  for (char c : s) {
    const char* entity = c == '&'    ? "&amp;"
                         : c == '<'  ? "&lt;"
                         : c == '>'  ? "&gt;"
                         : c == '"'  ? "&#34;"
                         : c == '\'' ? "&#39;"
                                     : nullptr;
    if (entity != nullptr) {
      out += entity;
    } else {
      out.push_back(c);
    }
  }
  return out;
}

// Python's str.splitlines() for \n, \r\n and \r.
std::vector<std::string> SplitLines(const std::string& s) {
  // Python's line boundaries: \n \r \r\n \v \f \x1c \x1d \x1e \x85 \u2028 \u2029.
  std::vector<std::string> lines;
  size_t start = 0, i = 0;
  while (i < s.size()) {
    const size_t at = i;
    const uint32_t c = NextCodePoint(s, i);
    if (c == '\n' || c == '\r' || c == 0x0B || c == 0x0C || (c >= 0x1C && c <= 0x1E) || c == 0x85 ||
        c == 0x2028 || c == 0x2029) {
      lines.push_back(s.substr(start, at - start));
      if (c == '\r' && i < s.size() && s[i] == '\n') ++i;
      start = i;
    }
  }
  if (start < s.size()) lines.push_back(s.substr(start));
  return lines;
}

// Python's slice(start, stop, step).indices(n), as the indices it selects.
std::vector<int64_t> SliceIndices(int64_t n, std::optional<int64_t> start,
                                  std::optional<int64_t> stop, int64_t step) {
  const int64_t lower = step < 0 ? -1 : 0, upper = step < 0 ? n - 1 : n;
  auto clamp = [&](std::optional<int64_t> v, int64_t absent) {
    if (!v) return absent;
    int64_t x = *v;
    if (x < 0) x += n;
    return std::clamp(x, lower, upper);
  };
  const int64_t b = clamp(start, step < 0 ? upper : lower);
  const int64_t e = clamp(stop, step < 0 ? lower : upper);
  std::vector<int64_t> out;
  for (int64_t i = b; step > 0 ? i < e : i > e; i += step) out.push_back(i);
  return out;
}

// Call arguments: positional, then by name.
struct Args {
  std::vector<Value> pos;
  std::vector<std::pair<std::string, Value>> kw;
  // The argument at position i or named `name`; null when absent.
  const Value* Get(size_t i, absl::string_view name) const {
    if (i < pos.size()) return &pos[i];
    for (const auto& [k, v] : kw) {
      if (k == name) return &v;
    }
    return nullptr;
  }
};

using Scope = absl::flat_hash_map<std::string, Value>;

class Renderer {
 public:
  explicit Renderer(const std::string& source) : source_(source) {}

  absl::StatusOr<std::string> Run(const Node& root, Json&& variables, const Json* defaults) {
    Scope globals;
    if (defaults != nullptr && defaults->is_object()) {
      for (const auto& [k, v] : defaults->items()) globals[k] = Value(v);
    }
    for (auto& [k, v] : variables.get_ref<Json::object_t&>()) globals[k] = Value(std::move(v));
    scopes_.push_back(&globals);
    std::string out;
    out_ = &out;
    PDS_RETURN_IF_ERROR(ExecBody(root));
    return out;
  }

 private:
  enum class Flow { kNormal, kBreak, kContinue };

  absl::Status Err(int line, absl::string_view what) const {
    return absl::InvalidArgumentError(absl::StrCat(source_, " line ", line, ": ", what));
  }

  // An indentation given as a string, or as a count of spaces (at most 1024).
  absl::StatusOr<std::string> Padding(const Value& width, int line) const {
    if (width.j.is_string()) return width.j.get<std::string>();
    if (width.undefined || !IsIntLike(width.j)) {
      return Err(line, absl::StrCat("an indentation must be a string or an integer, not '",
                                    TypeName(width), "'"));
    }
    const int64_t n = AsInt(width.j);
    if (n > 1024) return Err(line, "an indentation of more than 1024 spaces");
    return std::string(static_cast<size_t>(std::max<int64_t>(0, n)), ' ');
  }

  // Python's printf-style `format % args`: %s %r %d %i %f %F %e %E %g %G %x %X %o %c %% with
  // flags, width and precision, and %(name)s from a dict. A list (what a tuple literal is
  // here) gives the arguments in order, anything else is the one argument.
  absl::StatusOr<Value> Format(const std::string& format, const Value& args, int line) const {
    std::vector<const Json*> positional;
    Json single = args.undefined ? Json(Json::value_t::discarded) : args.j;
    if (!args.undefined && args.j.is_array()) {
      for (const Json& x : args.j) positional.push_back(&x);
    } else {
      positional.push_back(&single);
    }
    size_t next = 0;
    std::string out;
    for (size_t i = 0; i < format.size(); ++i) {
      if (format[i] != '%') {
        out.push_back(format[i]);
        continue;
      }
      if (++i >= format.size()) return Err(line, "incomplete format");
      if (format[i] == '%') {
        out.push_back('%');
        continue;
      }
      const Json* arg = nullptr;
      if (format[i] == '(') {  // %(name)s
        const size_t close = format.find(')', i);
        if (close == std::string::npos || !args.j.is_object()) {
          return Err(line, "format requires a mapping");
        }
        auto it = args.j.find(format.substr(i + 1, close - i - 1));
        if (it == args.j.end()) return Err(line, "format key not found");
        arg = &*it;
        i = close + 1;
      }
      const size_t spec_start = i;
      while (i < format.size() && std::strchr("-+ #0", format[i]) != nullptr) ++i;
      while (i < format.size() && absl::ascii_isdigit(static_cast<unsigned char>(format[i]))) ++i;
      if (i < format.size() && format[i] == '.') {
        ++i;
        while (i < format.size() && absl::ascii_isdigit(static_cast<unsigned char>(format[i]))) {
          ++i;
        }
      }
      if (i >= format.size()) return Err(line, "incomplete format");
      const std::string flags = format.substr(spec_start, i - spec_start);
      if (flags.size() > 8) return Err(line, "format width or precision too long");
      const char conv = format[i];
      // printf writes numbers into a 512-byte buffer: widths and precisions past 400 are refused.
      if (conv != 's' && conv != 'r' && LargestNumber(flags) > 400) {
        return Err(line, "format width or precision too large");
      }
      if (arg == nullptr) {
        if (next >= positional.size()) return Err(line, "not enough arguments for format string");
        arg = positional[next++];
      }
      const Value v = arg->is_discarded() ? Value::Undefined("undefined") : Value(*arg);
      std::string piece;
      char buf[512];
      if (conv == 's' || conv == 'r') {
        std::string text = conv == 's' ? Str(v) : (v.undefined ? "Undefined" : "");
        if (conv == 'r' && !v.undefined) Repr(v.j, text);
        // Width and precision count characters, not bytes as printf's would.
        const size_t dot = flags.find('.');
        const std::string before_dot = flags.substr(0, dot);
        const size_t digits = before_dot.find_first_of("123456789");
        int64_t width = 0, precision = -1;
        if (digits != std::string::npos) (void)absl::SimpleAtoi(before_dot.substr(digits), &width);
        if (dot != std::string::npos && !absl::SimpleAtoi(flags.substr(dot + 1), &precision)) {
          precision = 0;
        }
        if (precision >= 0 && CodePointCount(text) > precision) {
          size_t at = 0;
          for (int64_t k = 0; k < precision; ++k) NextCodePoint(text, at);
          text.resize(std::min(at, text.size()));
        }
        const int64_t pad = width - CodePointCount(text);
        if (pad > 0 && flags.find('-') != std::string::npos) {
          piece = text + std::string(static_cast<size_t>(pad), ' ');
        } else if (pad > 0) {
          piece = std::string(static_cast<size_t>(pad), ' ') + text;
        } else {
          piece = std::move(text);
        }
      } else if (std::strchr("dioxXc", conv) != nullptr) {
        if (v.undefined || !IsNumber(v.j)) {
          return Err(line,
                     absl::StrCat("%", std::string(1, conv), " format: a number is required"));
        }
        const std::string spec = "%" + flags + "ll" +
                                 (conv == 'i'   ? 'd'
                                  : conv == 'c' ? 'd'
                                                : conv);
        if (conv == 'c') {
          AppendUtf8(static_cast<uint32_t>(AsInt(v.j)), piece);
        } else {
          std::snprintf(buf, sizeof(buf), spec.c_str(), static_cast<long long>(AsInt(v.j)));
          piece = buf;
        }
      } else if (std::strchr("fFeEgG", conv) != nullptr) {
        if (v.undefined || !IsNumber(v.j)) {
          return Err(line,
                     absl::StrCat("%", std::string(1, conv), " format: a number is required"));
        }
        const std::string spec = "%" + flags + conv;
        std::snprintf(buf, sizeof(buf), spec.c_str(), AsDouble(v.j));
        piece = buf;
      } else {
        return Err(line, absl::StrCat("unsupported format character '", std::string(1, conv), "'"));
      }
      out += piece;
      if (out.size() > kMaxOutputBytes) return Budget(line, "formatted string too large");
    }
    if (next < positional.size() && !args.j.is_object()) {
      return Err(line, "not all arguments converted during string formatting");
    }
    return Value(std::move(out));
  }

  // RESOURCE_EXHAUSTED: the render went past one of its budgets.
  absl::Status Budget(int line, absl::string_view what) const {
    return absl::ResourceExhaustedError(absl::StrCat(source_, " line ", line, ": ", what));
  }

  // Running nested statements and expressions recurses on the native stack.
  absl::Status CheckNativeDepth(int line) const {
    if (native_depth_ <= kMaxNativeDepth) return absl::OkStatus();
    return absl::ResourceExhaustedError(
        absl::StrCat(source_, " line ", line, ": statements and expressions nested deeper than ",
                     kMaxNativeDepth, " at run time"));
  }

  // A value about to go inside a list or dict must leave room for that level.
  // A value about to go inside a list or dict: room for one more level, and (counted into
  // `*bytes`, the container's size so far) no container past the value budget.
  absl::Status CheckNesting(const Json& j, int line, size_t* bytes = nullptr) const {
    const Extent extent = Measure(j, kMaxValueDepth, kMaxOutputBytes);
    if (extent.depth >= kMaxValueDepth) {
      return absl::ResourceExhaustedError(absl::StrCat(
          source_, " line ", line, ": lists and dicts nested deeper than ", kMaxValueDepth));
    }
    size_t own = 0;
    size_t& total = bytes != nullptr ? *bytes : own;
    total += extent.bytes;
    if (total <= kMaxOutputBytes) return absl::OkStatus();
    return absl::ResourceExhaustedError(
        absl::StrCat(source_, " line ", line, ": a value grew past the template's budget"));
  }

  absl::Status Step(int line) {
    if (++steps_ > kMaxSteps) {
      return absl::ResourceExhaustedError(absl::StrCat(
          source_, " line ", line, ": the template took more than ", kMaxSteps, " steps"));
    }
    if (out_->size() > kMaxOutputBytes) {
      return absl::ResourceExhaustedError(absl::StrCat(
          source_, " line ", line, ": the template's output passed ", kMaxOutputBytes, " bytes"));
    }
    return absl::OkStatus();
  }

  absl::Status ExecBody(const Node& body) {
    for (const NodePtr& c : body.children) {
      PDS_RETURN_IF_ERROR(Exec(*c));
      if (flow_ != Flow::kNormal) break;
    }
    return absl::OkStatus();
  }

  Value Lookup(const std::string& name) const {
    if (const Value* v = FindVar(name)) return *v;
    return Value::Undefined(absl::StrCat("'", name, "' is undefined"));
  }

  // Binds `targets` to `v` (unpacked when several) in `scope`.
  absl::Status Bind(const std::vector<std::string>& targets, Value v, Scope& scope, int line) {
    if (targets.size() == 1) {
      scope[targets[0]] = std::move(v);
      return absl::OkStatus();
    }
    if (v.undefined || !v.j.is_array() || v.j.size() != targets.size()) {
      return Err(line,
                 absl::StrCat("cannot unpack ", TypeName(v), " into ", targets.size(), " values"));
    }
    for (size_t i = 0; i < targets.size(); ++i) scope[targets[i]] = Value(v.j[i]);
    return absl::OkStatus();
  }

  absl::StatusOr<std::vector<Json>> Iterate(const Value& v, int line) const {
    return Iterate(Value(v), line);
  }
  // The same, moving the items out of `v`.
  absl::StatusOr<std::vector<Json>> Iterate(Value&& v, int line) const {
    std::vector<Json> items;
    if (v.undefined) return items;
    if (v.j.is_array()) {
      items = std::move(v.j.get_ref<Json::array_t&>());
    } else if (v.j.is_object() && !v.ns) {
      for (const auto& [k, x] : v.j.items()) items.emplace_back(k);
    } else if (v.j.is_string()) {
      for (std::string& c : Chars(v.j.get_ref<const std::string&>()))
        items.emplace_back(std::move(c));
    } else {
      return Err(line, absl::StrCat("'", TypeName(v), "' object is not iterable"));
    }
    return items;
  }

  absl::Status Exec(const Node& n) {
    DepthGuard guard(native_depth_);
    PDS_RETURN_IF_ERROR(CheckNativeDepth(n.line));
    PDS_RETURN_IF_ERROR(Step(n.line));
    switch (n.kind) {
      case Node::kBody:
        return ExecBody(n);
      case Node::kText:
        out_->append(n.text);
        return absl::OkStatus();
      case Node::kOutput: {
        if (const Json* found = Resolve(*n.exprs[0]); found != nullptr && found->is_string()) {
          out_->append(found->get_ref<const std::string&>());  // `{{ content }}`: no copy
          return absl::OkStatus();
        }
        PDS_ASSIGN_OR_RETURN(Value v, Eval(*n.exprs[0]));
        if (v.j.is_string()) {
          out_->append(v.j.get_ref<const std::string&>());
        } else {
          out_->append(Str(v));
        }
        return absl::OkStatus();
      }
      case Node::kIf: {
        for (size_t i = 0; i < n.exprs.size(); ++i) {
          PDS_ASSIGN_OR_RETURN(bool c, EvalTruthy(*n.exprs[i]));
          if (c) return ExecBody(*n.children[i]);
        }
        if (n.children.size() > n.exprs.size()) return ExecBody(*n.children.back());
        return absl::OkStatus();
      }
      case Node::kFor:
        return ExecFor(n);
      case Node::kSet: {
        PDS_ASSIGN_OR_RETURN(Value v, Eval(*n.exprs[0]));
        return Bind(n.targets, std::move(v), *scopes_.back(), n.line);
      }
      case Node::kSetAttr: {
        PDS_ASSIGN_OR_RETURN(Value v, Eval(*n.exprs[0]));
        PDS_RETURN_IF_ERROR(CheckNesting(v.j, n.line));
        for (auto it = scopes_.rbegin(); it != scopes_.rend(); ++it) {
          auto found = (*it)->find(n.targets[0]);
          if (found == (*it)->end()) continue;
          if (!found->second.ns) {
            return Err(n.line, "cannot assign an attribute of a non-namespace object");
          }
          found->second.j[n.text] = Stored(std::move(v));
          return absl::OkStatus();
        }
        return Err(n.line, absl::StrCat("'", n.targets[0], "' is undefined"));
      }
      case Node::kSetBlock: {
        PDS_ASSIGN_OR_RETURN(std::string text, Capture(*n.children[0]));
        (*scopes_.back())[n.targets[0]] = Value(std::move(text));
        return absl::OkStatus();
      }
      case Node::kMacro:
        macros_[n.text] = &n;
        return absl::OkStatus();
      case Node::kScope: {
        Scope scope;
        scopes_.push_back(&scope);
        absl::Status s = ExecBody(*n.children[0]);
        scopes_.pop_back();
        return s;
      }
      case Node::kBreak:
      case Node::kContinue:
        if (loops_ == 0) return Err(n.line, "break or continue outside a loop");
        flow_ = n.kind == Node::kBreak ? Flow::kBreak : Flow::kContinue;
        return absl::OkStatus();
    }
    return absl::OkStatus();
  }

  // The output of `body`, not appended.
  absl::StatusOr<std::string> Capture(const Node& body) {
    std::string buf;
    std::string* saved = out_;
    out_ = &buf;
    absl::Status s = ExecBody(body);
    out_ = saved;
    PDS_RETURN_IF_ERROR(s);
    return buf;
  }

  absl::Status ExecFor(const Node& n) {
    PDS_ASSIGN_OR_RETURN(Value iterable, Eval(*n.exprs[0]));
    PDS_ASSIGN_OR_RETURN(std::vector<Json> items, Iterate(std::move(iterable), n.line));
    if (n.exprs[1]) {  // {% for x in xs if cond %}: the loop sees only the items it keeps
      std::vector<Json> kept;
      for (Json& item : items) {
        Scope scope;
        PDS_RETURN_IF_ERROR(Bind(n.targets, Value(item), scope, n.line));
        scopes_.push_back(&scope);
        absl::StatusOr<Value> keep = Eval(*n.exprs[1]);
        scopes_.pop_back();
        PDS_RETURN_IF_ERROR(keep.status());
        if (Truthy(*keep)) kept.push_back(std::move(item));
      }
      items = std::move(kept);
    }
    const int64_t length = static_cast<int64_t>(items.size());
    Scope scope;
    Json loop;
    bool completed = false;
    ++loops_;
    for (int64_t i = 0; i < length; ++i) {
      scope.clear();                  // each iteration starts afresh, as in Jinja
      absl::Status s = Step(n.line);  // an empty body must count too
      // The item moves into the scope unless loop.previtem/nextitem may still need it.
      if (s.ok()) {
        s = Bind(n.targets, n.loop_neighbors ? Value(items[i]) : Value(std::move(items[i])), scope,
                 n.line);
      }
      if (!s.ok()) {
        --loops_;
        return s;
      }
      // loop.*: the object of the previous iteration updated in place (no allocation).
      if (!loop.is_object() || !loop.contains("depth0")) {
        loop = {{"index", 0},       {"index0", 0},    {"revindex", 0},
                {"revindex0", 0},   {"first", false}, {"last", false},
                {"length", length}, {"depth", 1},     {"depth0", 0}};
      }
      loop["index"] = i + 1;
      loop["index0"] = i;
      loop["revindex"] = length - i;
      loop["revindex0"] = length - i - 1;
      loop["first"] = i == 0;
      loop["last"] = i == length - 1;
      if (i > 0 && n.loop_neighbors) {
        loop["previtem"] = items[i - 1];
      } else {
        loop.erase("previtem");
      }
      if (i + 1 < length && n.loop_neighbors) {
        loop["nextitem"] = items[i + 1];
      } else {
        loop.erase("nextitem");
      }
      scope["loop"] = Value(std::move(loop));
      scopes_.push_back(&scope);
      s = ExecBody(*n.children[0]);
      scopes_.pop_back();
      if (!s.ok()) {
        --loops_;
        return s;
      }
      if (auto it = scope.find("loop"); it != scope.end()) loop = std::move(it->second.j);
      const Flow f = flow_;
      flow_ = Flow::kNormal;
      if (f == Flow::kBreak) break;
      if (f == Flow::kNormal) completed = true;
    }
    --loops_;
    // As Jinja compiles it, the else body runs unless some iteration reached the end of the
    // body (not only for an empty sequence: also when every iteration continued, or the first
    // broke).
    if (!completed && n.children.size() > 1) return ExecBody(*n.children[1]);
    return absl::OkStatus();
  }

  absl::StatusOr<Args> EvalArgs(const Expr& e, size_t first) {
    Args a;
    for (size_t i = first; i < e.args.size(); ++i) {
      PDS_ASSIGN_OR_RETURN(Value v, Eval(*e.args[i]));
      a.pos.push_back(std::move(v));
    }
    for (const auto& [k, x] : e.kwargs) {
      PDS_ASSIGN_OR_RETURN(Value v, Eval(*x));
      a.kw.emplace_back(k, std::move(v));
    }
    return a;
  }

  // An expression's value; strings and lists past the output budget end the render (a
  // template doubling a string in a loop must not exhaust the front-end's memory).
  absl::StatusOr<Value> Eval(const Expr& e) {
    DepthGuard guard(native_depth_);
    PDS_RETURN_IF_ERROR(CheckNativeDepth(e.line));
    PDS_ASSIGN_OR_RETURN(Value v, EvalExpr(e));
    if (!v.undefined && v.j.is_discarded()) return Value::Undefined("an undefined value");
    if ((v.j.is_string() && v.j.get_ref<const std::string&>().size() > kMaxOutputBytes) ||
        (v.j.is_array() && v.j.size() > kMaxListItems)) {
      return absl::ResourceExhaustedError(
          absl::StrCat(source_, " line ", e.line, ": a value grew past the template's budget"));
    }
    return v;
  }

  absl::StatusOr<Value> EvalExpr(const Expr& e) {
    PDS_RETURN_IF_ERROR(Step(e.line));
    switch (e.kind) {
      case Expr::kLiteral:
        return Value(e.value);
      case Expr::kName:
        return Lookup(e.name);
      case Expr::kList: {
        Json list = Json::array();
        size_t bytes = 0;
        for (const ExprPtr& x : e.args) {
          PDS_ASSIGN_OR_RETURN(Value v, Eval(*x));
          PDS_RETURN_IF_ERROR(CheckNesting(v.j, e.line, &bytes));
          list.push_back(Stored(std::move(v)));
        }
        return Value(std::move(list));
      }
      case Expr::kDict: {
        Json dict = Json::object();
        size_t bytes = 0;
        for (size_t i = 0; i + 1 < e.args.size(); i += 2) {
          PDS_ASSIGN_OR_RETURN(Value k, Eval(*e.args[i]));
          PDS_ASSIGN_OR_RETURN(Value v, Eval(*e.args[i + 1]));
          PDS_RETURN_IF_ERROR(CheckNesting(v.j, e.line, &bytes));
          dict[Str(k)] = Stored(std::move(v));
        }
        return Value(std::move(dict));
      }
      case Expr::kAttr: {
        if (const Json* found = Resolve(e)) return Value(*found);
        PDS_ASSIGN_OR_RETURN(Value obj, Eval(*e.args[0]));
        return Attribute(obj, e.name, e.line);
      }
      case Expr::kIndex: {
        if (const Json* found = Resolve(e)) return Value(*found);
        PDS_ASSIGN_OR_RETURN(Value key, Eval(*e.args[1]));
        // `messages[loop.index0 - 1]`: the element without a copy of the whole list (the key
        // is evaluated first, so nothing it runs can move the container).
        if (const Json* container = Resolve(*e.args[0]); container != nullptr && !key.undefined) {
          if (const Json* found = Element(*container, key.j)) return Value(*found);
        }
        PDS_ASSIGN_OR_RETURN(Value obj, Eval(*e.args[0]));
        return Item(obj, key, e.line);
      }
      case Expr::kSlice:
        return EvalSlice(e);
      case Expr::kCall:
        return EvalCall(e);
      case Expr::kFilter: {
        if ((e.name == "length" || e.name == "count") && e.args.size() == 1) {
          const Json* found = Resolve(*e.args[0]);  // `messages | length`: no copy
          if (found != nullptr && found->is_structured()) {
            return Value(static_cast<int64_t>(found->size()));
          }
        }
        PDS_ASSIGN_OR_RETURN(Value obj, Eval(*e.args[0]));
        PDS_ASSIGN_OR_RETURN(Args a, EvalArgs(e, 1));
        return Filter(e.name, std::move(obj), a, e.line);
      }
      case Expr::kTest: {
        PDS_ASSIGN_OR_RETURN(Value obj, Eval(*e.args[0]));
        PDS_ASSIGN_OR_RETURN(Args a, EvalArgs(e, 1));
        PDS_ASSIGN_OR_RETURN(bool r, Test(e.name, obj, a, e.line));
        return Value(r);
      }
      case Expr::kNot: {
        PDS_ASSIGN_OR_RETURN(bool x, EvalTruthy(*e.args[0]));
        return Value(!x);
      }
      case Expr::kNeg:
      case Expr::kPos: {
        PDS_ASSIGN_OR_RETURN(Value x, Eval(*e.args[0]));
        if (x.undefined) return Err(e.line, x.missing);
        if (!IsNumber(x.j)) {
          return Err(e.line,
                     absl::StrCat("bad operand type for unary ", e.kind == Expr::kNeg ? "-" : "+",
                                  ": '", TypeName(x), "'"));
        }
        if (e.kind == Expr::kPos) return IsIntLike(x.j) ? Value(AsInt(x.j)) : x;
        if (IsIntLike(x.j)) {
          if (AsInt(x.j) == INT64_MIN) return Err(e.line, "integer overflow");
          return Value(-AsInt(x.j));
        }
        return Value(-x.j.get<double>());
      }
      case Expr::kBinary: {
        PDS_ASSIGN_OR_RETURN(Value l, Eval(*e.args[0]));
        if (e.name == "and") return Truthy(l) ? Eval(*e.args[1]) : l;
        if (e.name == "or") return Truthy(l) ? l : Eval(*e.args[1]);
        PDS_ASSIGN_OR_RETURN(Value r, Eval(*e.args[1]));
        // A chain of string concatenations appends to its left operand (no copies of it).
        if (!l.undefined && l.j.is_string() && !r.undefined &&
            (e.name == "~" || (e.name == "+" && r.j.is_string()))) {
          std::string& acc = l.j.get_ref<std::string&>();
          if (r.j.is_string()) {
            acc += r.j.get_ref<const std::string&>();
          } else {
            acc += Str(r);
          }
          return l;
        }
        return BinaryOp(e.name, l, r, e.line);
      }
      case Expr::kCompare: {
        PDS_ASSIGN_OR_RETURN(Value l, Eval(*e.args[0]));
        Value result;
        for (size_t i = 0; i < e.ops.size(); ++i) {
          PDS_ASSIGN_OR_RETURN(Value r, Eval(*e.args[i + 1]));
          PDS_ASSIGN_OR_RETURN(result, BinaryOp(e.ops[i], l, r, e.line));
          if (!Truthy(result)) break;
          l = std::move(r);
        }
        return result;
      }
      case Expr::kCond: {
        PDS_ASSIGN_OR_RETURN(Value c, Eval(*e.args[1]));
        if (Truthy(c)) return Eval(*e.args[0]);
        if (e.args[2]) return Eval(*e.args[2]);
        return Value::Undefined(
            "the inline if-expression evaluated to false and no else section was defined");
      }
    }
    return Err(e.line, "unknown expression");
  }

  // What `e` denotes inside a variable, found without copying anything: the variable, or an
  // attribute or literal index of one (`message['content']`, `loop.index0`, `messages[0]`),
  // as Attribute and Item would find it; null where they would not find an element (the
  // evaluation then takes its general path).
  const Json* Resolve(const Expr& e) const {
    if (e.kind == Expr::kName) {
      const Value* v = FindVar(e.name);
      return v == nullptr || v->undefined ? nullptr : &v->j;
    }
    const bool attr = e.kind == Expr::kAttr;
    if (!attr && (e.kind != Expr::kIndex || e.args[1]->kind != Expr::kLiteral)) return nullptr;
    const Json* obj = Resolve(*e.args[0]);
    if (obj == nullptr) return nullptr;
    if (attr) {
      if (!obj->is_object() || IsDictMethod(e.name)) return nullptr;
      auto it = obj->find(e.name);
      return it != obj->end() ? &*it : nullptr;
    }
    return Element(*obj, e.args[1]->value);
  }

  // obj[key] as Item finds it (a dict's string key, a list's index), or null.
  static const Json* Element(const Json& obj, const Json& key) {
    if (obj.is_object() && key.is_string()) {
      auto it = obj.find(key.get_ref<const std::string&>());
      return it != obj.end() ? &*it : nullptr;
    }
    if (obj.is_array() && IsIntLike(key)) {
      int64_t i = AsInt(key);
      const int64_t n = static_cast<int64_t>(obj.size());
      if (i < 0) i += n;
      return i >= 0 && i < n ? &obj[static_cast<size_t>(i)] : nullptr;
    }
    return nullptr;
  }

  // A variable, found without copying it.
  const Value* FindVar(const std::string& name) const {
    for (auto it = scopes_.rbegin(); it != scopes_.rend(); ++it) {
      auto found = (*it)->find(name);
      if (found != (*it)->end()) return &found->second;
    }
    return nullptr;
  }

  // Whether `e` is true, without copying what it names where it can.
  absl::StatusOr<bool> EvalTruthy(const Expr& e) {
    if (e.kind == Expr::kName) {
      const Value* v = FindVar(e.name);
      return v != nullptr && Truthy(*v);
    }
    if (const Json* found = Resolve(e)) return Truthy(*found);
    PDS_ASSIGN_OR_RETURN(Value v, Eval(e));
    return Truthy(v);
  }

  absl::StatusOr<Value> Attribute(const Value& obj, const std::string& name, int line) const {
    if (obj.method) {
      return Value::Undefined(
          absl::StrCat("'builtin_function_or_method object' has no attribute '", name, "'"));
    }
    if (obj.undefined) return Err(line, obj.missing);
    // `d.items` is the dict's method in Jinja, not its "items" key (a JSON schema's): it is
    // no value a template can print or read attributes of.
    if (obj.j.is_object() && !obj.ns && IsDictMethod(name)) {
      Value m = Value::Undefined(absl::StrCat("'dict object' attribute '", name, "' is a method"));
      m.method = true;
      return m;
    }
    if (obj.j.is_object()) {
      auto it = obj.j.find(name);
      if (it != obj.j.end()) return Value(*it);
    }
    return Value::Undefined(
        absl::StrCat("'", TypeName(obj), " object' has no attribute '", name, "'"));
  }

  absl::StatusOr<Value> Item(const Value& obj, const Value& key, int line) const {
    if (obj.undefined) return Err(line, obj.missing);
    if (const Json* found = key.undefined ? nullptr : Element(obj.j, key.j)) return Value(*found);
    if (obj.j.is_object()) {
      return Value::Undefined(
          absl::StrCat("'", TypeName(obj), " object' has no attribute ", Str(key)));
    }
    if ((obj.j.is_array() || obj.j.is_string()) && !key.undefined && IsIntLike(key.j)) {
      if (obj.j.is_string()) {  // a list's elements were found above; a string's character
        const std::vector<std::string> chars = Chars(obj.j.get_ref<const std::string&>());
        int64_t i = AsInt(key.j);
        if (i < 0) i += static_cast<int64_t>(chars.size());
        if (i >= 0 && i < static_cast<int64_t>(chars.size())) {
          return Value(chars[static_cast<size_t>(i)]);
        }
      }
      return Value::Undefined(
          absl::StrCat("'", TypeName(obj), " object' has no element ", AsInt(key.j)));
    }
    if (key.j.is_string()) return Attribute(obj, key.j.get<std::string>(), line);
    return Value::Undefined(absl::StrCat("'", TypeName(obj), " object' has no element ", Str(key)));
  }

  absl::StatusOr<Value> EvalSlice(const Expr& e) {
    PDS_ASSIGN_OR_RETURN(Value obj, Eval(*e.args[0]));
    if (obj.undefined) return Err(e.line, obj.missing);
    std::optional<int64_t> parts[3];
    for (int i = 0; i < 3; ++i) {
      if (!e.args[i + 1]) continue;
      PDS_ASSIGN_OR_RETURN(Value v, Eval(*e.args[i + 1]));
      if (v.undefined || v.j.is_null()) continue;
      if (!IsIntLike(v.j)) return Err(e.line, "slice indices must be integers or None");
      parts[i] = AsInt(v.j);
    }
    const int64_t step = parts[2].value_or(1);
    if (step == 0) return Err(e.line, "slice step cannot be zero");
    if (obj.j.is_array()) {
      Json out = Json::array();
      for (int64_t i : SliceIndices(static_cast<int64_t>(obj.j.size()), parts[0], parts[1], step)) {
        out.push_back(obj.j[static_cast<size_t>(i)]);
      }
      return Value(std::move(out));
    }
    if (obj.j.is_string()) {
      const std::vector<std::string> chars = Chars(obj.j.get_ref<const std::string&>());
      std::string out;
      for (int64_t i : SliceIndices(static_cast<int64_t>(chars.size()), parts[0], parts[1], step)) {
        out += chars[static_cast<size_t>(i)];
      }
      return Value(std::move(out));
    }
    return Err(e.line, absl::StrCat("'", TypeName(obj), "' object is not subscriptable"));
  }

  absl::StatusOr<Value> BinaryOp(const std::string& op, const Value& l, const Value& r, int line) {
    if (op == "==") return Value(Equal(l, r));
    if (op == "!=") return Value(!Equal(l, r));
    if (op == "~") return Value(Str(l) + Str(r));
    if (op == "in" || op == "not in") {
      PDS_ASSIGN_OR_RETURN(bool in, Contains(r, l, line));
      return Value(op == "in" ? in : !in);
    }
    if (op == "%" && !l.undefined && l.j.is_string()) {
      return Format(l.j.get_ref<const std::string&>(), r, line);
    }
    if (l.undefined) return Err(line, l.missing);
    if (r.undefined) return Err(line, r.missing);
    if (op == "<" || op == "<=" || op == ">" || op == ">=") {
      PDS_ASSIGN_OR_RETURN(int c, Compare(l.j, r.j, op, line));
      if (op == "<") return Value(c < 0);
      if (op == "<=") return Value(c <= 0);
      if (op == ">") return Value(c > 0);
      return Value(c >= 0);
    }
    const Json& a = l.j;
    const Json& b = r.j;
    auto unsupported = [&]() {
      return Err(line, absl::StrCat("unsupported operand type(s) for ", op, ": '", TypeName(l),
                                    "' and '", TypeName(r), "'"));
    };
    if (op == "+") {
      if (a.is_string() && b.is_string()) return Value(a.get<std::string>() + b.get<std::string>());
      if (a.is_array() && b.is_array()) {
        if (Measure(a, kMaxValueDepth, kMaxOutputBytes).bytes +
                Measure(b, kMaxValueDepth, kMaxOutputBytes).bytes >
            kMaxOutputBytes) {
          return Budget(line, "list concatenation too large");
        }
        Json out = a;
        for (const Json& x : b) out.push_back(x);
        return Value(std::move(out));
      }
    }
    if (op == "*" && (((a.is_string() || a.is_array()) && IsIntLike(b)) ||
                      ((b.is_string() || b.is_array()) && IsIntLike(a)))) {
      const Json& seq = a.is_string() || a.is_array() ? a : b;
      const int64_t times = AsInt(a.is_string() || a.is_array() ? b : a);
      const size_t unit = seq.is_string() ? seq.get_ref<const std::string&>().size() : seq.size();
      const uint64_t limit = seq.is_string() ? kMaxOutputBytes : kMaxListItems;
      const uint64_t bytes =
          seq.is_array() ? Measure(seq, kMaxValueDepth, kMaxOutputBytes).bytes : 1;
      if (times > 0 && unit > 0 &&
          (static_cast<uint64_t>(times) > limit / unit ||
           static_cast<uint64_t>(times) > kMaxOutputBytes / bytes)) {
        return Budget(line, "sequence repetition too large");
      }
      if (seq.is_string()) {
        std::string out;
        for (int64_t i = 0; i < times; ++i) out += seq.get_ref<const std::string&>();
        return Value(std::move(out));
      }
      Json out = Json::array();
      for (int64_t i = 0; i < times; ++i) {
        for (const Json& x : seq) out.push_back(x);
      }
      return Value(std::move(out));
    }
    if (!IsNumber(a) || !IsNumber(b)) return unsupported();
    const bool ints = IsIntLike(a) && IsIntLike(b);
    if (op == "/") {
      if (AsDouble(b) == 0) return Err(line, "division by zero");
      return Value(AsDouble(a) / AsDouble(b));
    }
    if (ints) {
      const int64_t x = AsInt(a), y = AsInt(b);
      int64_t out = 0;
      bool overflow = false;
      if (op == "+") {
        overflow = __builtin_add_overflow(x, y, &out);
      } else if (op == "-") {
        overflow = __builtin_sub_overflow(x, y, &out);
      } else if (op == "*") {
        overflow = __builtin_mul_overflow(x, y, &out);
      } else if (op == "//" || op == "%") {
        if (y == 0) return Err(line, "integer division or modulo by zero");
        if (x == INT64_MIN && y == -1) return Err(line, "integer overflow");
        int64_t q = x / y, m = x % y;
        if (m != 0 && ((m < 0) != (y < 0))) {
          --q;
          m += y;
        }
        out = op == "//" ? q : m;
      } else if (op == "**") {
        if (y < 0) return Value(std::pow(static_cast<double>(x), static_cast<double>(y)));
        out = 1;  // by squaring: y may be huge when x is 0, 1 or -1
        for (int64_t base = x, n = y; n > 0 && !overflow; n >>= 1) {
          if (n & 1) overflow = __builtin_mul_overflow(out, base, &out);
          if (n > 1 && !overflow) overflow = __builtin_mul_overflow(base, base, &base);
        }
      } else {
        return unsupported();
      }
      if (overflow) return Err(line, "integer overflow");
      return Value(out);
    }
    const double x = AsDouble(a), y = AsDouble(b);
    if (op == "+") return Value(x + y);
    if (op == "-") return Value(x - y);
    if (op == "*") return Value(x * y);
    if (op == "**") return Value(std::pow(x, y));
    if (op == "//" || op == "%") {
      if (y == 0) return Err(line, "float division or modulo by zero");
      const double m = std::fmod(x, y);
      // Python's: the sign of the divisor, a zero too.
      const double mod = m == 0 ? std::copysign(0.0, y) : ((m < 0) != (y < 0)) ? m + y : m;
      if (op == "%") return Value(mod);
      return Value(std::floor((x - mod) / y + 0.5));
    }
    return unsupported();
  }

  // <0, 0, >0 as Python orders a and b; an error for types Python does not order.
  absl::StatusOr<int> Compare(const Json& a, const Json& b, const std::string& op, int line) const {
    if (IsNumber(a) && IsNumber(b)) {
      if (IsIntLike(a) && IsIntLike(b)) {
        const int64_t x = AsInt(a), y = AsInt(b);
        return x < y ? -1 : x > y ? 1 : 0;
      }
      const double x = AsDouble(a), y = AsDouble(b);
      return x < y ? -1 : x > y ? 1 : 0;
    }
    if (a.is_string() && b.is_string()) {
      const int c = a.get_ref<const std::string&>().compare(b.get_ref<const std::string&>());
      return c < 0 ? -1 : c > 0 ? 1 : 0;
    }
    if (a.is_array() && b.is_array()) {
      for (size_t i = 0; i < a.size() && i < b.size(); ++i) {
        if (Equal(a[i], b[i])) continue;
        return Compare(a[i], b[i], op, line);
      }
      return a.size() < b.size() ? -1 : a.size() > b.size() ? 1 : 0;
    }
    return Err(line, absl::StrCat("'", op, "' not supported between instances of '",
                                  TypeName(Value(a)), "' and '", TypeName(Value(b)), "'"));
  }

  absl::StatusOr<bool> Contains(const Value& container, const Value& item, int line) const {
    if (container.undefined) return false;
    const Json& c = container.j;
    if (c.is_string()) {
      if (item.undefined || !item.j.is_string()) {
        return Err(line, absl::StrCat("'in <string>' requires string as left operand, not ",
                                      TypeName(item)));
      }
      return c.get_ref<const std::string&>().find(item.j.get_ref<const std::string&>()) !=
             std::string::npos;
    }
    if (c.is_array()) {
      for (const Json& x : c) {
        if (!item.undefined && Equal(x, item.j)) return true;
      }
      return false;
    }
    if (c.is_object()) return item.j.is_string() && c.contains(item.j.get<std::string>());
    return Err(line, absl::StrCat("argument of type '", TypeName(container), "' is not iterable"));
  }

  absl::StatusOr<Value> EvalCall(const Expr& e) {
    const Expr& callee = *e.args[0];
    PDS_ASSIGN_OR_RETURN(Args a, EvalArgs(e, 1));
    if (callee.kind == Expr::kAttr) {
      PDS_ASSIGN_OR_RETURN(Value obj, Eval(*callee.args[0]));
      return Method(obj, callee.name, a, e.line);
    }
    if (callee.kind != Expr::kName) return Err(e.line, "this expression cannot be called");
    const std::string& name = callee.name;
    if (auto it = macros_.find(name); it != macros_.end()) return CallMacro(*it->second, a, e.line);
    if (name == "raise_exception") {
      const Value* msg = a.Get(0, "message");
      return Err(e.line, absl::StrCat("the template raised: ", msg ? Str(*msg) : ""));
    }
    if (name == "namespace" || name == "dict") {
      Value v(Json::object());
      v.ns = name == "namespace";
      if (!a.pos.empty()) {
        if (a.pos.size() > 1 || !a.pos[0].j.is_object()) {
          return Err(e.line, absl::StrCat(name, "() takes a mapping or keyword arguments"));
        }
        v.j = a.pos[0].j;
      }
      size_t bytes = 0;
      for (auto& [k, x] : a.kw) {
        PDS_RETURN_IF_ERROR(CheckNesting(x.j, e.line, &bytes));
        v.j[k] = Stored(x);
      }
      return v;
    }
    if (name == "range") {
      if (a.pos.empty() || a.pos.size() > 3) return Err(e.line, "range() takes 1 to 3 arguments");
      for (const Value& v : a.pos) {
        if (v.undefined || !IsIntLike(v.j)) return Err(e.line, "range() takes integers");
      }
      int64_t start = 0, stop = 0, step = 1;
      if (a.pos.size() == 1) {
        stop = AsInt(a.pos[0].j);
      } else {
        start = AsInt(a.pos[0].j);
        stop = AsInt(a.pos[1].j);
        if (a.pos.size() == 3) step = AsInt(a.pos[2].j);
      }
      if (step == 0) return Err(e.line, "range() step must not be zero");
      Json out = Json::array();
      for (int64_t i = start; step > 0 ? i < stop : i > stop; i += step) {
        if (out.size() >= kMaxListItems) return Err(e.line, "range() too long");
        out.push_back(i);
      }
      return Value(std::move(out));
    }
    if (name == "strftime_now") {
      const Value* fmt = a.Get(0, "format");
      if (fmt == nullptr || !fmt->j.is_string())
        return Err(e.line, "strftime_now() takes a format");
      const std::time_t now = std::time(nullptr);
      std::tm tm{};
      localtime_r(&now, &tm);
      char buf[256];
      const size_t len = std::strftime(buf, sizeof(buf), fmt->j.get<std::string>().c_str(), &tm);
      return Value(std::string(buf, len));
    }
    Value v = Lookup(name);
    if (v.undefined) return Err(e.line, v.missing);
    return Err(e.line, absl::StrCat("'", TypeName(v), "' object is not callable"));
  }

  absl::StatusOr<Value> CallMacro(const Node& macro, const Args& a, int line) {
    if (macro_depth_ >= kMaxMacroDepth) {
      return Err(line, absl::StrCat("macro calls nested deeper than ", kMaxMacroDepth));
    }
    if (a.pos.size() > macro.targets.size()) {
      return Err(line, absl::StrCat("macro '", macro.text, "' takes not more than ",
                                    macro.targets.size(), " argument(s)"));
    }
    for (const auto& [k, v] : a.kw) {
      if (std::find(macro.targets.begin(), macro.targets.end(), k) == macro.targets.end()) {
        return Err(line, absl::StrCat("macro '", macro.text, "' has no argument '", k, "'"));
      }
    }
    Scope local;
    std::vector<Scope*> saved = scopes_;
    scopes_ = {scopes_.front(), &local};
    absl::Status s;
    for (size_t i = 0; i < macro.targets.size() && s.ok(); ++i) {
      const std::string& p = macro.targets[i];
      if (const Value* v = a.Get(i, p); v != nullptr) {
        local[p] = *v;
      } else if (macro.exprs[i]) {
        absl::StatusOr<Value> d = Eval(*macro.exprs[i]);
        if (d.ok()) {
          local[p] = *std::move(d);
        } else {
          s = d.status();
        }
      } else {
        local[p] = Value::Undefined(absl::StrCat("'", p, "' is undefined"));
      }
    }
    absl::StatusOr<std::string> out = std::string();
    if (!s.ok()) {
      out = s;
    } else {
      ++macro_depth_;
      const int loops = loops_;
      loops_ = 0;
      out = Capture(*macro.children[0]);
      loops_ = loops;
      flow_ = Flow::kNormal;
      --macro_depth_;
    }
    scopes_ = std::move(saved);
    PDS_RETURN_IF_ERROR(out.status());
    return Value(*std::move(out));
  }

  static std::optional<std::string> OptString(const Value* v) {
    if (v == nullptr || v->undefined || v->j.is_null()) return std::nullopt;
    return Str(*v);
  }

  absl::StatusOr<Value> Method(const Value& obj, const std::string& name, const Args& a, int line) {
    if (obj.undefined) return Err(line, obj.missing);
    const Json& j = obj.j;
    if (j.is_string()) {
      const std::string& s = j.get_ref<const std::string&>();
      if (name == "strip" || name == "lstrip" || name == "rstrip") {
        return Value(Strip(s, OptString(a.Get(0, "chars")), name != "rstrip", name != "lstrip"));
      }
      if (name == "startswith" || name == "endswith") {
        const Value* p = a.Get(0, "prefix");
        if (p == nullptr) return Err(line, absl::StrCat(name, "() takes an argument"));
        std::vector<std::string> options;
        if (p->j.is_array()) {
          for (const Json& x : p->j) {
            if (x.is_string()) options.push_back(x.get<std::string>());
          }
        } else if (p->j.is_string()) {
          options.push_back(p->j.get<std::string>());
        } else {
          return Err(line, absl::StrCat(name, "() takes a string or a tuple of strings"));
        }
        for (const std::string& o : options) {
          if (name == "startswith" ? absl::StartsWith(s, o) : absl::EndsWith(s, o))
            return Value(true);
        }
        return Value(false);
      }
      if (name == "split") {
        const Value* m = a.Get(1, "maxsplit");
        const std::optional<std::string> sep = OptString(a.Get(0, "sep"));
        if (sep && sep->empty()) return Err(line, "empty separator");
        return Value(Split(s, sep, m != nullptr && IsIntLike(m->j) ? AsInt(m->j) : -1));
      }
      if (name == "upper") return Value(Upper(s));
      if (name == "lower") return Value(Lower(s));
      if (name == "capitalize") return Value(Capitalize(s));
      if (name == "title") return Value(PyTitle(s));
      if (name == "replace") {
        const Value* from = a.Get(0, "old");
        const Value* to = a.Get(1, "new");
        const Value* count = a.Get(2, "count");
        if (from == nullptr || to == nullptr) return Err(line, "replace() takes two strings");
        return Value(Replace(s, Str(*from), Str(*to), count ? AsInt(count->j) : -1));
      }
      if (name == "find" || name == "rfind" || name == "index" || name == "rindex" ||
          name == "count") {
        const Value* sub = a.Get(0, "sub");
        if (sub == nullptr) return Err(line, absl::StrCat(name, "() takes a string"));
        const std::string needle = Str(*sub);
        if (name != "count") {
          const size_t at = name == "find" || name == "index" ? s.find(needle) : s.rfind(needle);
          if (at == std::string::npos) {
            if (name == "index" || name == "rindex") return Err(line, "substring not found");
            return Value(-1);
          }
          return Value(CodePointCount(absl::string_view(s).substr(0, at)));
        }
        if (needle.empty()) return Value(CodePointCount(s) + 1);
        int64_t n = 0;
        for (size_t at = s.find(needle); at != std::string::npos;
             at = s.find(needle, at + needle.size()))
          ++n;
        return Value(n);
      }
      if (name == "join") {
        const Value* items = a.Get(0, "iterable");
        if (items == nullptr) return Err(line, "join() takes an iterable");
        PDS_ASSIGN_OR_RETURN(std::vector<Json> parts, Iterate(*items, line));
        std::string out;
        for (size_t i = 0; i < parts.size(); ++i) {
          if (!parts[i].is_string()) return Err(line, "join() takes strings");
          if (i > 0) out += s;
          out += parts[i].get<std::string>();
        }
        return Value(std::move(out));
      }
      if (name == "isspace" || name == "isdigit" || name == "isupper" || name == "islower" ||
          name == "isalpha" || name == "isalnum") {
        return Value(StrPredicate(s, name));
      }
      if (name == "removeprefix" || name == "removesuffix") {
        const Value* affix = a.Get(0, name == "removeprefix" ? "prefix" : "suffix");
        if (affix == nullptr || !affix->j.is_string()) {
          return Err(line, absl::StrCat(name, "() takes a string"));
        }
        absl::string_view rest = s;
        if (name == "removeprefix") {
          absl::ConsumePrefix(&rest, affix->j.get_ref<const std::string&>());
        } else {
          absl::ConsumeSuffix(&rest, affix->j.get_ref<const std::string&>());
        }
        return Value(std::string(rest));
      }
      if (name == "rsplit") {  // from the right: only a limited split differs from split
        const Value* m = a.Get(1, "maxsplit");
        const std::optional<std::string> sep = OptString(a.Get(0, "sep"));
        if (sep && sep->empty()) return Err(line, "empty separator");
        const int64_t maxsplit = m != nullptr && IsIntLike(m->j) ? AsInt(m->j) : -1;
        if (maxsplit < 0 || !sep) {
          if (maxsplit >= 0) return Err(line, "rsplit() with a limit takes a separator");
          return Value(Split(s, sep, -1));
        }
        std::vector<std::string> parts;
        size_t end = s.size();
        while (static_cast<int64_t>(parts.size()) < maxsplit) {
          const size_t at = end == 0 ? std::string::npos : s.rfind(*sep, end - sep->size());
          if (at == std::string::npos || end < sep->size()) break;
          parts.push_back(s.substr(at + sep->size(), end - at - sep->size()));
          end = at;
        }
        parts.push_back(s.substr(0, end));
        Json out = Json::array();
        for (auto it = parts.rbegin(); it != parts.rend(); ++it) out.push_back(std::move(*it));
        return Value(std::move(out));
      }
      if (name == "splitlines") {
        Json out = Json::array();
        for (std::string& l : SplitLines(s)) out.push_back(std::move(l));
        return Value(std::move(out));
      }
    } else if (j.is_object() && !obj.ns) {
      if (name == "items") return Filter("items", obj, {}, line);
      if (name == "keys" || name == "values") {
        Json out = Json::array();
        for (const auto& [k, x] : j.items()) out.push_back(name == "keys" ? Json(k) : x);
        return Value(std::move(out));
      }
      if (name == "get") {
        const Value* key = a.Get(0, "key");
        if (key == nullptr) return Err(line, "get() takes a key");
        if (key->j.is_string()) {
          auto it = j.find(key->j.get<std::string>());
          if (it != j.end()) return Value(*it);
        }
        const Value* d = a.Get(1, "default");
        return d != nullptr ? *d : Value(nullptr);
      }
      if (name == "cycle" && j.contains("index0") && !a.pos.empty()) {  // loop.cycle(a, b, ...)
        return a.pos[static_cast<size_t>(AsInt(j["index0"])) % a.pos.size()];
      }
    }
    return Err(line, absl::StrCat("'", TypeName(obj), " object' has no method '", name, "'"));
  }

  // Attribute `path` (dotted) of an item, for map/selectattr/sort/unique/join/sum.
  static Value ItemAttribute(const Json& item, const std::string& path) {
    Value v(item);
    for (absl::string_view part : absl::StrSplit(path, '.')) {
      if (v.undefined) break;
      if (v.j.is_object()) {
        auto it = v.j.find(std::string(part));
        v = it != v.j.end() ? Value(*it)
                            : Value::Undefined(absl::StrCat("no attribute '", part, "'"));
      } else if (v.j.is_array() && !part.empty() &&
                 std::all_of(part.begin(), part.end(), ::isdigit)) {
        const size_t i = std::stoul(std::string(part));
        v = i < v.j.size() ? Value(v.j[i]) : Value::Undefined("no element");
      } else {
        v = Value::Undefined(absl::StrCat("no attribute '", part, "'"));
      }
    }
    return v;
  }

  // Jinja's sort key: strings lowercased unless case-sensitive.
  static Json SortKey(const Json& x, bool case_sensitive) {
    if (!case_sensitive && x.is_string()) return Lower(x.get<std::string>());
    return x;
  }

  absl::StatusOr<std::vector<Json>> Sorted(std::vector<Json> items, bool reverse,
                                           bool case_sensitive,
                                           const std::optional<std::string>& attribute, int line) {
    std::vector<std::pair<Json, Json>> keyed;
    for (Json& x : items) {
      Json key = attribute ? ItemAttribute(x, *attribute).j : x;
      keyed.emplace_back(SortKey(key, case_sensitive), std::move(x));
    }
    absl::Status error;
    std::stable_sort(keyed.begin(), keyed.end(), [&](const auto& p, const auto& q) {
      absl::StatusOr<int> c =
          Compare(reverse ? q.first : p.first, reverse ? p.first : q.first, "<", line);
      if (!c.ok()) {
        error = c.status();
        return false;
      }
      return *c < 0;
    });
    PDS_RETURN_IF_ERROR(error);
    std::vector<Json> out;
    for (auto& [k, x] : keyed) out.push_back(std::move(x));
    return out;
  }

  static bool BoolArg(const Args& a, size_t i, absl::string_view name, bool def) {
    const Value* v = a.Get(i, name);
    return v == nullptr ? def : Truthy(*v);
  }

  absl::StatusOr<Value> Filter(const std::string& name, Value v, const Args& a, int line) {
    if (name == "safe") return v;
    if (name == "default" || name == "d") {
      const bool boolean = BoolArg(a, 1, "boolean", false);
      if (v.undefined || (boolean && !Truthy(v))) {
        const Value* d = a.Get(0, "default_value");
        return d != nullptr ? *d : Value(std::string());
      }
      return v;
    }
    if (name == "length" || name == "count") {
      if (v.undefined) return Value(0);
      if (v.j.is_string()) return Value(CodePointCount(v.j.get_ref<const std::string&>()));
      if (v.j.is_array() || v.j.is_object()) return Value(static_cast<int64_t>(v.j.size()));
      return Err(line, absl::StrCat("object of type '", TypeName(v), "' has no len()"));
    }
    if (name == "string") return Value(Str(v));
    if (name == "trim") return Value(Strip(Str(v), OptString(a.Get(0, "chars")), true, true));
    if (name == "upper") return Value(Upper(Str(v)));
    if (name == "lower") return Value(Lower(Str(v)));
    if (name == "capitalize") return Value(Capitalize(Str(v)));
    if (name == "title") {  // Jinja's: upper case after whitespace, -, (, {, [ and <
      return Value(TitleCase(
          Str(v),
          [](uint32_t c) {
            return IsPyWhitespace(c) || c == '-' || c == '(' || c == '{' || c == '[' || c == '<';
          },
          CaseKind::kUpper));
    }
    if (name == "escape" || name == "e") return Value(HtmlEscape(Str(v)));
    if (name == "replace") {
      const Value* from = a.Get(0, "old");
      const Value* to = a.Get(1, "new");
      const Value* count = a.Get(2, "count");
      if (from == nullptr || to == nullptr) return Err(line, "replace takes two strings");
      return Value(Replace(Str(v), Str(*from), Str(*to),
                           count != nullptr && IsIntLike(count->j) ? AsInt(count->j) : -1));
    }
    if (name == "wordcount") {
      int64_t words = 0;
      bool in_word = false;
      const std::string text = Str(v);
      for (size_t i = 0; i < text.size();) {  // runs of \w, as Jinja's regex counts them
        const bool w = IsWordChar(NextCodePoint(text, i));
        if (w && !in_word) ++words;
        in_word = w;
      }
      return Value(words);
    }
    if (name == "indent") {
      const Value* width = a.Get(0, "width");
      std::string pad = "    ";
      if (width != nullptr) {
        PDS_ASSIGN_OR_RETURN(pad, Padding(*width, line));
      }
      const bool first = BoolArg(a, 1, "first", false), blank = BoolArg(a, 2, "blank", false);
      std::vector<std::string> lines = SplitLines(Str(v) + "\n");
      std::string out;
      for (size_t i = 0; i < lines.size(); ++i) {
        if (i > 0) out += "\n";
        if (i > 0 && (blank || !lines[i].empty())) out += pad;
        out += lines[i];
      }
      if (first) out = pad + out;
      return Value(std::move(out));
    }
    if (name == "tojson") {
      if (v.undefined || NestingHasUndefined(v.j)) {
        return Err(line, "Object of type Undefined is not JSON serializable");
      }
      // HF's tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False).
      const Value* indent = a.Get(1, "indent");
      std::optional<std::string> pad;
      if (indent != nullptr && !indent->undefined && !indent->j.is_null()) {
        PDS_ASSIGN_OR_RETURN(pad, Padding(*indent, line));
      }
      std::string item_sep = pad ? "," : ", ", key_sep = ": ";
      if (const Value* sep = a.Get(2, "separators"); sep != nullptr && sep->j.is_array() &&
                                                     sep->j.size() == 2 && sep->j[0].is_string() &&
                                                     sep->j[1].is_string()) {
        item_sep = sep->j[0].get<std::string>();
        key_sep = sep->j[1].get<std::string>();
      }
      std::string out;
      Dumps(v.j, pad ? &*pad : nullptr, BoolArg(a, 3, "sort_keys", false),
            BoolArg(a, 0, "ensure_ascii", false), item_sep, key_sep, 0, out);
      return Value(std::move(out));
    }
    if (name == "int" || name == "float") {
      const Value* def = a.Get(0, "default");
      Json fallback = def != nullptr ? def->j : (name == "int" ? Json(0) : Json(0.0));
      double d = 0;
      bool ok = true;
      if (v.undefined) return Err(line, v.missing);  // Jinja's int(Undefined) raises
      if (IsNumber(v.j)) {
        d = AsDouble(v.j);
        if (name == "int" && IsIntLike(v.j)) return Value(AsInt(v.j));
      } else if (v.j.is_string()) {
        const std::string s = Strip(v.j.get<std::string>(), std::nullopt, true, true);
        if (name == "int") {  // int(s), else int(float(s))
          int64_t i = 0;
          const auto r = std::from_chars(s.data(), s.data() + s.size(), i);
          if (!s.empty() && r.ec == std::errc() && r.ptr == s.data() + s.size()) return Value(i);
        }
        // Python's float(): decimal text, inf and nan (not strtod's hexadecimal).
        char* end = nullptr;
        d = std::strtod(s.c_str(), &end);
        ok = !s.empty() && end == s.c_str() + s.size() &&
             s.find_first_of("xXpP") == std::string::npos;
      } else {
        ok = false;
      }
      if (!ok) return Value(fallback);
      if (name == "float") return Value(d);
      if (std::isnan(d)) return Value(fallback);  // int(nan) is a ValueError: the default
      if (std::isinf(d)) return Err(line, "cannot convert float infinity to integer");
      return Value(AsInt(Json(d)));
    }
    if (name == "abs") {
      if (v.undefined || !IsNumber(v.j)) return Err(line, "bad operand type for abs()");
      if (IsIntLike(v.j)) {
        const int64_t x = AsInt(v.j);
        if (x == INT64_MIN) return Err(line, "integer overflow");
        return Value(x < 0 ? -x : x);
      }
      return Value(std::fabs(v.j.get<double>()));
    }
    if (name == "round") {
      if (v.undefined || !IsNumber(v.j)) return Err(line, "round takes a number");
      const Value* p = a.Get(0, "precision");
      const int64_t precision = std::clamp<int64_t>(p != nullptr ? AsInt(p->j) : 0, -400, 400);
      const std::string method = OptString(a.Get(1, "method")).value_or("common");
      if (method == "common") {  // Python's round(): ints stay ints, ties go to even
        if (IsIntLike(v.j) && precision >= 0) return Value(AsInt(v.j));
        const double r = PyRound(AsDouble(v.j), static_cast<int>(precision));
        return IsIntLike(v.j) ? Value(AsInt(Json(r))) : Value(r);
      }
      const double scale = std::pow(10.0, static_cast<double>(precision));
      const double x = AsDouble(v.j) * scale;
      return Value((method == "floor" ? std::floor(x) : std::ceil(x)) / scale);
    }
    if (name == "items") {
      if (v.undefined) return Value(Json::array());
      if (!v.j.is_object()) return Err(line, "items takes a mapping");
      Json out = Json::array();
      for (const auto& [k, x] : v.j.items()) out.push_back(Json::array({k, x}));
      return Value(std::move(out));
    }
    if (name == "dictsort") {
      if (!v.j.is_object()) return Err(line, "dictsort takes a mapping");
      const bool case_sensitive = BoolArg(a, 0, "case_sensitive", false);
      const bool by_value = OptString(a.Get(1, "by")).value_or("key") == "value";
      const bool reverse = BoolArg(a, 2, "reverse", false);
      std::vector<Json> pairs;
      for (const auto& [k, x] : v.j.items()) pairs.push_back(Json::array({k, x}));
      PDS_ASSIGN_OR_RETURN(pairs, Sorted(std::move(pairs), reverse, case_sensitive,
                                         std::string(by_value ? "1" : "0"), line));
      return Value(Json(pairs));
    }
    // The rest take an iterable.
    PDS_ASSIGN_OR_RETURN(std::vector<Json> items, Iterate(v, line));
    if (name == "list") return Value(Json(items));
    if (name == "first" || name == "last") {
      if (items.empty())
        return Value::Undefined(absl::StrCat("No ", name, " item, sequence was empty."));
      return Value(name == "first" ? items.front() : items.back());
    }
    if (name == "reverse") {
      std::reverse(items.begin(), items.end());
      if (v.j.is_string()) {
        std::string out;
        for (const Json& c : items) out += c.get<std::string>();
        return Value(std::move(out));
      }
      return Value(Json(items));
    }
    if (name == "join") {
      const std::optional<std::string> attribute = OptString(a.Get(1, "attribute"));
      const std::string sep = OptString(a.Get(0, "d")).value_or("");
      std::string out;
      for (size_t i = 0; i < items.size(); ++i) {
        if (i > 0) out += sep;
        out += Str(attribute ? ItemAttribute(items[i], *attribute) : Value(items[i]));
      }
      return Value(std::move(out));
    }
    if (name == "sort") {
      PDS_ASSIGN_OR_RETURN(items, Sorted(std::move(items), BoolArg(a, 0, "reverse", false),
                                         BoolArg(a, 1, "case_sensitive", false),
                                         OptString(a.Get(2, "attribute")), line));
      return Value(Json(items));
    }
    if (name == "unique") {
      const bool case_sensitive = BoolArg(a, 0, "case_sensitive", false);
      const std::optional<std::string> attribute = OptString(a.Get(1, "attribute"));
      std::vector<Json> seen, out;
      for (Json& x : items) {
        Json key = SortKey(attribute ? ItemAttribute(x, *attribute).j : x, case_sensitive);
        if (std::any_of(seen.begin(), seen.end(), [&](const Json& s) { return Equal(s, key); }))
          continue;
        seen.push_back(std::move(key));
        out.push_back(std::move(x));
      }
      return Value(Json(out));
    }
    if (name == "min" || name == "max") {
      if (items.empty())
        return Value::Undefined(absl::StrCat("No aggregated item, sequence was empty."));
      PDS_ASSIGN_OR_RETURN(
          items, Sorted(std::move(items), name == "max", BoolArg(a, 0, "case_sensitive", false),
                        OptString(a.Get(1, "attribute")), line));
      return Value(items.front());
    }
    if (name == "sum") {
      const std::optional<std::string> attribute = OptString(a.Get(0, "attribute"));
      const Value* start = a.Get(1, "start");
      Value total = start != nullptr ? *start : Value(0);
      for (const Json& x : items) {
        PDS_ASSIGN_OR_RETURN(
            total, BinaryOp("+", total, attribute ? ItemAttribute(x, *attribute) : Value(x), line));
      }
      return total;
    }
    if (name == "map") {
      Json out = Json::array();
      if (const std::optional<std::string> attribute = OptString(a.Get(99, "attribute"))) {
        const Value* def = a.Get(99, "default");
        for (const Json& x : items) {
          Value y = ItemAttribute(x, *attribute);
          if (y.undefined && def != nullptr) y = *def;
          out.push_back(Stored(std::move(y)));
        }
        return Value(std::move(out));
      }
      if (a.pos.empty() || !a.pos[0].j.is_string())
        return Err(line, "map takes a filter name or attribute=");
      const std::string filter = a.pos[0].j.get<std::string>();
      if (!KnownFilters().contains(filter) || filter == "map") {
        return Err(line, absl::StrCat("the filter '", filter, "' is not supported"));
      }
      Args rest;
      rest.pos.assign(a.pos.begin() + 1, a.pos.end());
      rest.kw = a.kw;
      for (const Json& x : items) {
        PDS_ASSIGN_OR_RETURN(Value y, Filter(filter, Value(x), rest, line));
        out.push_back(Stored(std::move(y)));
      }
      return Value(std::move(out));
    }
    if (name == "select" || name == "reject" || name == "selectattr" || name == "rejectattr") {
      const bool attr = name == "selectattr" || name == "rejectattr";
      const bool keep_if = name == "select" || name == "selectattr";
      std::optional<std::string> attribute;
      size_t next = 0;
      if (attr) {
        if (a.pos.empty()) return Err(line, absl::StrCat(name, " takes an attribute"));
        attribute = Str(a.pos[0]);
        next = 1;
      }
      std::optional<std::string> test;
      if (next < a.pos.size()) test = Str(a.pos[next++]);
      if (test && !KnownTests().contains(*test)) {
        return Err(line, absl::StrCat("the test '", *test, "' is not supported"));
      }
      Args rest;
      rest.pos.assign(a.pos.begin() + static_cast<std::ptrdiff_t>(std::min(next, a.pos.size())),
                      a.pos.end());
      Json out = Json::array();
      for (const Json& x : items) {
        const Value subject = attribute ? ItemAttribute(x, *attribute) : Value(x);
        bool pass = Truthy(subject);
        if (test) {
          PDS_ASSIGN_OR_RETURN(pass, Test(*test, subject, rest, line));
        }
        if (pass == keep_if) out.push_back(x);
      }
      return Value(std::move(out));
    }
    return Err(line, absl::StrCat("the filter '", name, "' is not supported"));
  }

  absl::StatusOr<bool> Test(const std::string& name, const Value& v, const Args& a, int line) {
    const Json& j = v.j;
    if (name == "defined") return !v.undefined || v.method;
    if (name == "undefined") return v.undefined && !v.method;
    if (name == "callable") return v.method;
    if (name == "escaped") return false;
    if (name == "iterable")
      return v.undefined || j.is_string() || j.is_array() || (j.is_object() && !v.ns);
    if (v.undefined) {
      if (name == "none" || name == "boolean" || name == "true" || name == "false" ||
          name == "integer" || name == "float" || name == "number" || name == "string" ||
          name == "mapping" || name == "sequence") {
        return false;
      }
    }
    if (name == "none") return j.is_null();
    if (name == "boolean") return j.is_boolean();
    if (name == "true") return j.is_boolean() && j.get<bool>();
    if (name == "false") return j.is_boolean() && !j.get<bool>();
    if (name == "integer") return j.is_number_integer();
    if (name == "float") return j.is_number_float();
    if (name == "number") return IsNumber(j);
    if (name == "string") return j.is_string();
    if (name == "mapping") return j.is_object() && !v.ns;
    if (name == "sequence") return j.is_string() || j.is_array() || (j.is_object() && !v.ns);
    if (name == "lower" || name == "upper") {  // str.islower/isupper: a cased character needed
      return StrPredicate(Str(v), name == "lower" ? "islower" : "isupper");
    }
    if (name == "odd" || name == "even" || name == "divisibleby") {  // value % n as Python's
      if (v.undefined) return Err(line, v.missing);
      if (!IsNumber(j)) return Err(line, absl::StrCat("the test '", name, "' takes a number"));
      const Value* d = name == "divisibleby" ? a.Get(0, "num") : nullptr;
      if (name == "divisibleby" && (d == nullptr || !IsNumber(d->j) || AsDouble(d->j) == 0)) {
        return Err(line, "divisibleby takes a non-zero number");
      }
      const Json n = d != nullptr ? d->j : Json(2);
      PDS_ASSIGN_OR_RETURN(Value mod, BinaryOp("%", v, Value(n), line));
      const bool zero = AsDouble(mod.j) == 0;
      return name == "odd" ? AsDouble(mod.j) == 1 : zero;
    }
    const Value* other = a.Get(0, "b");
    if (other == nullptr) return Err(line, absl::StrCat("the test '", name, "' takes an argument"));
    if (name == "sameas") {
      if (v.undefined || other->undefined) return v.undefined && other->undefined;
      if (j.is_null() || j.is_boolean() || other->j.is_null() || other->j.is_boolean())
        return j == other->j;
      return j.type() == other->j.type() && j == other->j;
    }
    if (name == "in") return Contains(*other, v, line);
    std::string op = name;
    if (name == "eq" || name == "equalto") op = "==";
    if (name == "ne") op = "!=";
    if (name == "lt" || name == "lessthan") op = "<";
    if (name == "le") op = "<=";
    if (name == "gt" || name == "greaterthan") op = ">";
    if (name == "ge") op = ">=";
    PDS_ASSIGN_OR_RETURN(Value r, BinaryOp(op, v, *other, line));
    return Truthy(r);
  }

  const std::string& source_;
  std::vector<Scope*> scopes_;
  absl::flat_hash_map<std::string, const Node*> macros_;
  std::string* out_ = nullptr;
  Flow flow_ = Flow::kNormal;
  int64_t steps_ = 0;
  int native_depth_ = 0;
  int macro_depth_ = 0;
  int loops_ = 0;
};

absl::StatusOr<std::string> ReadFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat("cannot read ", path));
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

}  // namespace

ChatTemplate::ChatTemplate() = default;
ChatTemplate::~ChatTemplate() = default;

absl::StatusOr<std::unique_ptr<ChatTemplate>> ChatTemplate::Parse(absl::string_view text,
                                                                  absl::string_view source) {
  Lexer lexer(text, source);
  PDS_ASSIGN_OR_RETURN(std::vector<Token> tokens, lexer.Run());
  Parser parser(std::move(tokens), std::string(source));
  PDS_ASSIGN_OR_RETURN(NodePtr root, parser.Run());
  std::unique_ptr<ChatTemplate> t(new ChatTemplate());
  t->source_ = std::string(source);
  t->root_ = std::move(root);
  return t;
}

absl::StatusOr<std::string> ChatTemplate::Render(nlohmann::ordered_json variables,
                                                 const nlohmann::ordered_json* defaults) const {
  // The evaluator checks types before it reads values; a JSON library exception that still
  // escaped would be a bug, reported as one rather than ending the process.
  try {
    return RenderChecked(std::move(variables), defaults);
  } catch (const nlohmann::ordered_json::exception& e) {
    return absl::InternalError(absl::StrCat(source_, ": template evaluation failed: ", e.what()));
  } catch (const std::bad_alloc&) {
    return absl::ResourceExhaustedError(absl::StrCat(source_, ": the template ran out of memory"));
  } catch (const std::length_error&) {
    return absl::ResourceExhaustedError(absl::StrCat(source_, ": the template ran out of memory"));
  }
}

absl::StatusOr<std::string> ChatTemplate::RenderChecked(
    nlohmann::ordered_json variables, const nlohmann::ordered_json* defaults) const {
  if (!variables.is_object()) {
    return absl::InvalidArgumentError("chat template variables must be a JSON object");
  }
  if (Measure(variables, kMaxValueDepth, SIZE_MAX).depth > kMaxValueDepth) {
    return absl::InvalidArgumentError(
        absl::StrCat("chat template variables nest deeper than ", kMaxValueDepth, " levels"));
  }
  Renderer r(source_);
  return r.Run(*root_, std::move(variables), defaults);
}

ChatFormat::ChatFormat() : special_tokens(std::make_unique<Json>(Json::object())) {}
ChatFormat::~ChatFormat() = default;
ChatFormat::ChatFormat(ChatFormat&&) noexcept = default;
ChatFormat& ChatFormat::operator=(ChatFormat&&) noexcept = default;

absl::StatusOr<std::string> ChatFormat::Render(nlohmann::ordered_json variables) const {
  return chat_template->Render(std::move(variables), special_tokens.get());
}

absl::StatusOr<ChatFormat> LoadChatFormatFiles(const std::string& config_path,
                                               const std::string& template_path) {
  ChatFormat format;
  std::string text;
  if (!config_path.empty()) {
    PDS_ASSIGN_OR_RETURN(std::string raw, ReadFile(config_path));
    Json config = Json::parse(raw, nullptr, /*allow_exceptions=*/false);
    if (config.is_discarded() || !config.is_object()) {
      return absl::InvalidArgumentError(absl::StrCat(config_path, " is not a JSON object"));
    }
    for (const char* key : {"bos_token", "eos_token", "unk_token", "pad_token", "sep_token",
                            "cls_token", "mask_token"}) {
      auto it = config.find(key);
      if (it == config.end()) continue;
      if (it->is_string()) {
        (*format.special_tokens)[key] = *it;
      } else if (it->is_object() && it->contains("content") && (*it)["content"].is_string()) {
        (*format.special_tokens)[key] = (*it)["content"];
      }
    }
    if (template_path.empty()) {
      auto it = config.find("chat_template");
      if (it == config.end() || it->is_null()) {
        return absl::NotFoundError(absl::StrCat(config_path, " has no chat_template"));
      }
      if (it->is_string()) {
        text = it->get<std::string>();
      } else if (it->is_array()) {
        for (const Json& t : *it) {
          if (t.is_object() && t.contains("name") && t["name"] == "default" &&
              t.contains("template") && t["template"].is_string()) {
            text = t["template"].get<std::string>();
          }
        }
        if (text.empty()) {
          return absl::InvalidArgumentError(
              absl::StrCat(config_path, ": chat_template is a list without a 'default' template"));
        }
      } else {
        return absl::InvalidArgumentError(
            absl::StrCat(config_path, ": chat_template must be a string or a list of templates"));
      }
      format.source = config_path;
    }
  }
  if (!template_path.empty()) {
    PDS_ASSIGN_OR_RETURN(text, ReadFile(template_path));
    format.source = template_path;
  }
  if (format.source.empty()) return absl::NotFoundError("no chat template given");
  PDS_ASSIGN_OR_RETURN(format.chat_template, ChatTemplate::Parse(text, format.source));
  return format;
}

absl::StatusOr<ChatFormat> LoadChatFormat(const std::string& model_dir,
                                          const std::string& template_override) {
  namespace fs = std::filesystem;
  const fs::path dir(model_dir);
  std::error_code ec;
  const std::string config =
      fs::exists(dir / "tokenizer_config.json", ec) ? (dir / "tokenizer_config.json").string() : "";
  std::string tmpl = template_override;
  if (tmpl.empty() && fs::exists(dir / "chat_template.jinja", ec)) {
    tmpl = (dir / "chat_template.jinja").string();
  }
  if (config.empty() && tmpl.empty()) {
    return absl::NotFoundError(
        absl::StrCat(model_dir, " has neither tokenizer_config.json nor chat_template.jinja"));
  }
  return LoadChatFormatFiles(config, tmpl);
}
}  // namespace pds::engine

#include "server/tool_calls.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <optional>

#include "absl/container/flat_hash_set.h"
#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"
#include "engine/common/json_depth.h"
#include "engine/tokenizer/tokenizer.h"
#include "engine/tokenizer/unicode.h"
#include "nlohmann/json.hpp"
#include "server/stop_matcher.h"

namespace pds::server {
namespace {

using Json = nlohmann::ordered_json;

constexpr absl::string_view kHermesOpen = "<tool_call>";
constexpr absl::string_view kHermesClose = "</tool_call>";
constexpr absl::string_view kMistralCalls = "[TOOL_CALLS]";
constexpr absl::string_view kMistralArgs = "[ARGS]";
constexpr absl::string_view kMistralCallId = "[CALL_ID]";

bool IsBlank(absl::string_view s) { return absl::StripAsciiWhitespace(s).empty(); }

// The length of the JSON value (object or array) at the start of `text`, where its brackets
// outside strings balance; 0 when it does not end in `text`.
size_t JsonValueLength(absl::string_view text) {
  JsonNesting nesting;
  for (size_t i = 0; i < text.size(); ++i) {
    nesting.Feed(text[i]);
    if (nesting.depth() == 0) return i + 1;
  }
  return 0;
}

// A call object: {"name": "...", "<args_key>": {...}} (the arguments may also be a string that
// holds a JSON object, as some models write them).
std::optional<ToolCall> CallOf(const Json& j, std::initializer_list<const char*> args_keys) {
  if (!j.is_object()) return std::nullopt;
  auto name = j.find("name");
  if (name == j.end() || !name->is_string() || name->get_ref<const std::string&>().empty()) {
    return std::nullopt;
  }
  Json args = Json::object();
  for (const char* key : args_keys) {
    auto it = j.find(key);
    if (it == j.end() || it->is_null()) continue;
    args = it->is_string() ? Json::parse(it->get<std::string>(), nullptr, false) : *it;
    break;
  }
  if (!args.is_object()) return std::nullopt;
  return ToolCall{name->get<std::string>(),
                  args.dump(-1, ' ', false, Json::error_handler_t::replace)};
}

std::optional<ToolCall> ParseObject(absl::string_view text,
                                    std::initializer_list<const char*> args_keys) {
  const Json j = Json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) return std::nullopt;
  return CallOf(j, args_keys);
}

// <tool_call>{...}</tool_call> blocks separated by whitespace; the last may lack its closing
// tag (the reply ended there). Text after the last block is `trailing`.
std::optional<std::vector<ToolCall>> ParseHermes(absl::string_view section, std::string* trailing) {
  std::vector<ToolCall> calls;
  absl::string_view rest = section;
  while (absl::ConsumePrefix(&rest, kHermesOpen)) {
    const size_t close = rest.find(kHermesClose);
    absl::string_view body = rest.substr(0, close);
    if (close == absl::string_view::npos) {  // cut short, maybe inside the closing tag
      body.remove_suffix(PartialMarkerAtEnd(body, kHermesClose));
    }
    std::optional<ToolCall> call = ParseObject(body, {"arguments", "parameters"});
    if (!call) return std::nullopt;
    calls.push_back(*std::move(call));
    if (close == absl::string_view::npos) {
      rest = {};
      break;
    }
    rest.remove_prefix(close + kHermesClose.size());
    const absl::string_view next = absl::StripLeadingAsciiWhitespace(rest);
    if (!absl::StartsWith(next, kHermesOpen)) break;
    rest = next;
  }
  if (calls.empty()) return std::nullopt;
  if (!IsBlank(rest)) *trailing = std::string(absl::StripLeadingAsciiWhitespace(rest));
  return calls;
}

// One or more JSON objects separated by ';' (and whitespace), nothing else.
std::optional<std::vector<ToolCall>> ParseLlama3Json(absl::string_view section) {
  std::vector<ToolCall> calls;
  size_t i = 0;
  while (true) {
    while (i < section.size() && (absl::ascii_isspace(section[i]) || section[i] == ';')) ++i;
    if (i == section.size()) break;
    if (section[i] != '{') return std::nullopt;
    const size_t n = JsonValueLength(section.substr(i));
    if (n == 0) return std::nullopt;
    std::optional<ToolCall> call = ParseObject(section.substr(i, n), {"parameters", "arguments"});
    if (!call) return std::nullopt;
    calls.push_back(*std::move(call));
    i += n;
  }
  if (calls.empty()) return std::nullopt;
  return calls;
}

// A function name as Mistral's models write it before [ARGS] (or [CALL_ID]).
bool IsFunctionName(absl::string_view name) {
  return !name.empty() && std::all_of(name.begin(), name.end(), [](char c) {
    return absl::ascii_isalnum(c) || c == '_' || c == '-' || c == '.';
  });
}

// Mistral's calls: [TOOL_CALLS] segments, each a JSON list of call objects (or one object), or
// name[ARGS]{...} (name[CALL_ID]id[ARGS]{...}). Non-blank text after the last is `trailing`.
std::optional<std::vector<ToolCall>> ParseMistral(absl::string_view section,
                                                  std::string* trailing) {
  std::vector<ToolCall> calls;
  absl::string_view rest = section;
  while (absl::ConsumePrefix(&rest, kMistralCalls)) {
    rest = absl::StripLeadingAsciiWhitespace(rest);
    if (!rest.empty() && (rest[0] == '[' || rest[0] == '{')) {  // before v11: JSON
      const size_t n = JsonValueLength(rest);
      if (n == 0) return std::nullopt;
      const Json j = Json::parse(rest.substr(0, n), nullptr, /*allow_exceptions=*/false);
      if (j.is_discarded() || (j.is_array() && j.empty())) return std::nullopt;
      for (const Json& item : j.is_array() ? j : Json::array({j})) {
        std::optional<ToolCall> call = CallOf(item, {"arguments", "parameters"});
        if (!call) return std::nullopt;
        if (auto id = item.find("id"); id != item.end() && id->is_string()) {
          call->id = id->get<std::string>();
        }
        calls.push_back(*std::move(call));
      }
      rest.remove_prefix(n);
    } else {  // v11 on: name[ARGS]{...}, maybe name[CALL_ID]id[ARGS]{...}
      const size_t args = rest.find(kMistralArgs);
      if (args == absl::string_view::npos) return std::nullopt;
      absl::string_view head = rest.substr(0, args);
      std::string id;
      if (const size_t at = head.find(kMistralCallId); at != absl::string_view::npos) {
        id = std::string(absl::StripAsciiWhitespace(head.substr(at + kMistralCallId.size())));
        head = head.substr(0, at);
      }
      const absl::string_view name = absl::StripAsciiWhitespace(head);
      if (!IsFunctionName(name)) return std::nullopt;
      rest = absl::StripLeadingAsciiWhitespace(rest.substr(args + kMistralArgs.size()));
      const size_t n = rest.empty() || rest[0] != '{' ? 0 : JsonValueLength(rest);
      if (n == 0) return std::nullopt;
      const Json j = Json::parse(rest.substr(0, n), nullptr, /*allow_exceptions=*/false);
      if (!j.is_object()) return std::nullopt;
      calls.push_back({std::string(name), j.dump(-1, ' ', false, Json::error_handler_t::replace),
                       std::move(id)});
      rest.remove_prefix(n);
    }
    const absl::string_view next = absl::StripLeadingAsciiWhitespace(rest);
    if (!absl::StartsWith(next, kMistralCalls)) break;
    rest = next;
  }
  if (calls.empty()) return std::nullopt;
  if (!IsBlank(rest)) *trailing = std::string(absl::StripLeadingAsciiWhitespace(rest));
  // The model's ids stay only in the shape Mistral's templates take back (9 letters and digits)
  // and once in the reply; the others get new ones.
  absl::flat_hash_set<std::string> seen;
  for (ToolCall& call : calls) {
    const bool shaped =
        call.id.size() == 9 && std::all_of(call.id.begin(), call.id.end(), [](char c) {
          return absl::ascii_isalnum(static_cast<unsigned char>(c));
        });
    if (!shaped || !seen.insert(call.id).second) call.id.clear();
  }
  return calls;
}

// Python literals and calls, as Llama 3.2/3.3/4's "pythonic" tool calling writes them:
// [name(key=value, ...), ...] with the values Python literals (strings in either quote, triple
// quoted too; numbers; True, False, None; lists, tuples and dicts of these). Converted to JSON
// as json.dumps would (tuples become lists; dict keys must be strings). A parser over the text,
// bounded in depth; anything else (a positional argument, an expression) fails the section.
class PythonicParser {
 public:
  explicit PythonicParser(absl::string_view text) : s_(text) {}

  std::optional<std::vector<ToolCall>> Calls() {
    std::vector<ToolCall> calls;
    Space();
    if (!Eat('[')) return std::nullopt;
    while (true) {
      Space();
      if (Eat(']')) break;
      if (!calls.empty() && !(Eat(',') && (Space(), true))) return std::nullopt;
      if (!calls.empty() && Eat(']')) break;  // a trailing comma
      std::optional<ToolCall> call = Call();
      if (!call) return std::nullopt;
      calls.push_back(*std::move(call));
    }
    Space();
    if (i_ != s_.size() || calls.empty()) return std::nullopt;
    return calls;
  }

 private:
  static constexpr int kMaxDepth = 64;

  void Space() {
    while (i_ < s_.size() && absl::ascii_isspace(static_cast<unsigned char>(s_[i_]))) ++i_;
  }
  bool Eat(char c) {
    if (i_ < s_.size() && s_[i_] == c) {
      ++i_;
      return true;
    }
    return false;
  }
  bool EatWord(absl::string_view w) {
    if (!absl::StartsWith(s_.substr(i_), w)) return false;
    const size_t end = i_ + w.size();
    if (end < s_.size() && IsNameChar(s_[end])) return false;
    i_ = end;
    return true;
  }
  static bool IsNameChar(char c) {
    return absl::ascii_isalnum(static_cast<unsigned char>(c)) || c == '_' ||
           static_cast<unsigned char>(c) >= 0x80;  // Python identifiers may be non-ASCII
  }
  std::optional<std::string> Name() {
    const size_t start = i_;
    if (i_ < s_.size() && absl::ascii_isdigit(static_cast<unsigned char>(s_[i_]))) {
      return std::nullopt;
    }
    while (i_ < s_.size() && IsNameChar(s_[i_])) ++i_;
    if (i_ == start) return std::nullopt;
    return std::string(s_.substr(start, i_ - start));
  }

  std::optional<ToolCall> Call() {
    std::optional<std::string> name = Name();
    if (!name) return std::nullopt;
    Space();
    if (!Eat('(')) return std::nullopt;
    Json args = Json::object();
    while (true) {
      Space();
      if (Eat(')')) break;
      if (!args.empty() && !(Eat(',') && (Space(), true))) return std::nullopt;
      if (!args.empty() && Eat(')')) break;
      std::optional<std::string> key = Name();
      if (!key) return std::nullopt;  // a positional argument has no name to put it under
      Space();
      if (!Eat('=') || args.contains(*key)) return std::nullopt;
      Space();
      std::optional<Json> value = Value(0);
      if (!value) return std::nullopt;
      args[*key] = *std::move(value);
    }
    return ToolCall{*std::move(name), args.dump(-1, ' ', false, Json::error_handler_t::replace)};
  }

  // The items of a list, tuple or dict up to `close`; a dict's items are key: value.
  std::optional<Json> Items(char close, bool dict, int depth) {
    Json out = dict ? Json::object() : Json::array();
    bool first = true;
    while (true) {
      Space();
      if (Eat(close)) return out;
      if (!first && !(Eat(',') && (Space(), true))) return std::nullopt;
      if (!first && Eat(close)) return out;
      first = false;
      std::optional<Json> item = Value(depth + 1);
      if (!item) return std::nullopt;
      if (!dict) {
        out.push_back(*std::move(item));
        continue;
      }
      Space();
      if (!item->is_string() || !Eat(':')) return std::nullopt;
      Space();
      std::optional<Json> value = Value(depth + 1);
      if (!value) return std::nullopt;
      out[item->get<std::string>()] = *std::move(value);
    }
  }

  std::optional<Json> Value(int depth) {
    if (depth > kMaxDepth || i_ >= s_.size()) return std::nullopt;
    const char c = s_[i_];
    if (c == '[') return ++i_, Items(']', false, depth);
    if (c == '(') return ++i_, Items(')', false, depth);
    if (c == '{') return ++i_, Items('}', true, depth);
    if (c == '"' || c == '\'') return String();
    if (EatWord("True")) return Json(true);
    if (EatWord("False")) return Json(false);
    if (EatWord("None")) return Json(nullptr);
    return Number();
  }

  std::optional<Json> Number() {
    const size_t start = i_;
    if (i_ < s_.size() && (s_[i_] == '-' || s_[i_] == '+')) ++i_;
    bool digits = false, real = false;
    std::string text(s_.substr(start, i_ - start));
    for (; i_ < s_.size(); ++i_) {
      const char c = s_[i_];
      if (absl::ascii_isdigit(static_cast<unsigned char>(c))) {
        digits = true;
      } else if (c == '_' && digits) {
        continue;  // 1_000
      } else if (c == '.' || c == 'e' || c == 'E' ||
                 ((c == '-' || c == '+') && !text.empty() &&
                  (text.back() == 'e' || text.back() == 'E'))) {
        real = true;
      } else {
        break;
      }
      text.push_back(c);
    }
    if (!digits) return std::nullopt;
    if (!real) {
      const Json j = Json::parse(text.front() == '+' ? text.substr(1) : text, nullptr, false);
      if (!j.is_discarded()) return j;  // too big for 64 bits: as a double, below
    }
    char* end = nullptr;
    const double d = std::strtod(text.c_str(), &end);
    if (end != text.c_str() + text.size() || !std::isfinite(d)) return std::nullopt;
    return Json(d);
  }

  // A string literal (and any adjacent ones, which Python joins), its escapes decoded.
  std::optional<Json> String() {
    std::string out;
    do {
      if (!OneString(out)) return std::nullopt;
      const size_t at = i_;
      Space();
      if (i_ >= s_.size() || (s_[i_] != '"' && s_[i_] != '\'')) {
        i_ = at;
        break;
      }
    } while (true);
    return Json(std::move(out));
  }
  bool OneString(std::string& out) {
    const char q = s_[i_];
    const bool triple = s_.substr(i_, 3) == std::string(3, q);
    i_ += triple ? 3 : 1;
    while (i_ < s_.size()) {
      const char c = s_[i_];
      if (c == q && (!triple || s_.substr(i_, 3) == std::string(3, q))) {
        i_ += triple ? 3 : 1;
        return true;
      }
      if (c == '\n' && !triple) return false;
      if (c != '\\') {
        out.push_back(c);
        ++i_;
        continue;
      }
      if (++i_ >= s_.size() || !engine::AppendPythonEscape(s_, i_, out)) return false;
    }
    return false;
  }

  absl::string_view s_;
  size_t i_ = 0;
};

}  // namespace

absl::StatusOr<ToolCallFormat> ParseToolCallFormat(absl::string_view name) {
  if (name.empty() || name == "none") return ToolCallFormat::kNone;
  if (name == "hermes") return ToolCallFormat::kHermes;
  if (name == "llama3_json") return ToolCallFormat::kLlama3Json;
  if (name == "pythonic") return ToolCallFormat::kPythonic;
  if (name == "mistral") return ToolCallFormat::kMistral;
  return absl::InvalidArgumentError(absl::StrCat(
      "unknown tool call format '", name, "' (hermes, llama3_json, pythonic, mistral or none)"));
}

std::string ToolCallScanner::Feed(absl::string_view text) {
  if (format_ == ToolCallFormat::kNone) return std::string(text);
  held_.append(text.data(), text.size());
  if (format_ == ToolCallFormat::kArguments || format_ == ToolCallFormat::kJsonArray) {
    in_calls_ = true;  // the whole reply is the call section
  }
  if (in_calls_) return "";
  std::string out;
  if (format_ == ToolCallFormat::kHermes || format_ == ToolCallFormat::kMistral) {
    // Content up to the section's marker (held while the text may be its start).
    const absl::string_view marker =
        format_ == ToolCallFormat::kHermes ? kHermesOpen : kMistralCalls;
    const size_t at = absl::string_view(held_).find(marker);
    const size_t keep =
        at != std::string::npos ? held_.size() - at : PartialMarkerAtEnd(held_, marker);
    in_calls_ = at != std::string::npos;
    out = held_.substr(0, held_.size() - keep);
    held_.erase(0, held_.size() - keep);
    return out;
  }
  // llama3_json and pythonic: the calls are the whole reply, so it starts with '{' (or '[')
  // after any whitespace.
  if (any_text_) {
    out.swap(held_);
    return out;
  }
  const size_t first = held_.find_first_not_of(" \t\r\n");
  if (first == std::string::npos) return "";  // only whitespace so far: not decided
  if (held_[first] == (format_ == ToolCallFormat::kPythonic ? '[' : '{')) {
    in_calls_ = true;
    return "";
  }
  any_text_ = true;
  out.swap(held_);
  return out;
}

ToolCallScanner::Result ToolCallScanner::Finish() {
  Result r;
  if (in_calls_) {
    std::optional<std::vector<ToolCall>> calls;
    switch (format_) {
      case ToolCallFormat::kHermes:
        calls = ParseHermes(held_, &r.content);
        break;
      case ToolCallFormat::kLlama3Json:
        calls = ParseLlama3Json(held_);
        break;
      case ToolCallFormat::kPythonic:
        calls = PythonicParser(held_).Calls();
        break;
      case ToolCallFormat::kMistral:
        calls = ParseMistral(held_, &r.content);
        break;
      case ToolCallFormat::kArguments: {
        const Json args = Json::parse(held_, nullptr, /*allow_exceptions=*/false);
        if (args.is_object()) {
          calls = {{function_, args.dump(-1, ' ', false, Json::error_handler_t::replace)}};
        }
        break;
      }
      case ToolCallFormat::kJsonArray: {
        const Json list = Json::parse(held_, nullptr, /*allow_exceptions=*/false);
        if (!list.is_array() || list.empty()) break;
        calls.emplace();
        for (const Json& item : list) {
          std::optional<ToolCall> call = CallOf(item, {"parameters", "arguments"});
          if (!call) {
            calls.reset();
            break;
          }
          calls->push_back(*std::move(call));
        }
        break;
      }
      case ToolCallFormat::kNone:
        break;
    }
    if (calls) {
      r.calls = *std::move(calls);
      held_.clear();
      return r;
    }
    r.content.clear();
  }
  r.content += held_;  // no call section, or one that does not parse: content, whole
  held_.clear();
  return r;
}

ToolCallScanner::Result ToolCallScanner::Parse(ToolCallFormat format, absl::string_view text,
                                               const std::string& function) {
  ToolCallScanner scanner(format, function);
  const std::string content = scanner.Feed(text);
  Result r = scanner.Finish();
  r.content.insert(0, content);
  return r;
}

namespace {
constexpr absl::string_view kThinkOpen = "<think>";
constexpr absl::string_view kThinkClose = "</think>";
}  // namespace

absl::StatusOr<ReasoningFormat> ParseReasoningFormat(absl::string_view name) {
  if (name.empty() || name == "none") return ReasoningFormat::kNone;
  if (name == "deepseek_r1") return ReasoningFormat::kDeepSeekR1;
  if (name == "qwen3") return ReasoningFormat::kQwen3;
  return absl::InvalidArgumentError(
      absl::StrCat("unknown reasoning format '", name, "' (deepseek_r1, qwen3 or none)"));
}

ForcedCallStream::Delta& ForcedCallStream::Current(std::vector<Delta>& out) {
  if (out.empty() || out.back().index != index_) {
    out.emplace_back();
    out.back().index = index_;
  }
  return out.back();
}

std::vector<ForcedCallStream::Delta> ForcedCallStream::Feed(absl::string_view text) {
  std::vector<Delta> out;
  if (format_ == ToolCallFormat::kArguments) {  // the whole reply: one call's arguments
    if (index_ < 0) {
      index_ = 0;
      Delta& d = Current(out);
      d.opens = true;
      d.name = function_;
    }
    if (!text.empty() || out.empty()) Current(out).arguments.append(text.data(), text.size());
    return out;
  }
  if (format_ != ToolCallFormat::kJsonArray) return out;
  constexpr int kCall = 2, kArguments = 3;  // depths: [ 1, { 2, parameters' { 3
  for (char c : text) {
    const int depth = nesting_.depth();
    const bool was_string = nesting_.in_string();
    nesting_.Feed(c);
    // The arguments: everything from the parameters' '{' until its depth closes.
    if (index_ >= 0 && (depth >= kArguments || nesting_.depth() >= kArguments)) {
      Current(out).arguments.push_back(c);
    }
    if (depth != kCall) {
      if (nesting_.depth() == kCall && depth < kCall) {  // a call object opens
        expect_key_ = true;
        key_.clear();
      }
      continue;
    }
    if (was_string || nesting_.in_string()) {  // a key or a value at the call object's level
      string_.push_back(c);
      if (nesting_.in_string()) continue;
      const Json s = Json::parse(string_, nullptr, /*allow_exceptions=*/false);
      string_.clear();
      const std::string value = s.is_string() ? s.get<std::string>() : "";
      if (expect_key_) {
        key_ = value;
      } else if (key_ == "name") {  // the call opens
        ++index_;
        Delta& d = Current(out);
        d.opens = true;
        d.name = value;
      }
    } else if (c == ':' || c == ',') {
      expect_key_ = c == ',';
    }
  }
  return out;
}

std::optional<ReasoningGate> FindReasoningGate(const engine::Tokenizer& tokenizer,
                                               absl::Span<const int32_t> prompt) {
  const std::optional<int32_t> open = tokenizer.TokenToId(kThinkOpen);
  const std::optional<int32_t> close = tokenizer.TokenToId(kThinkClose);
  if (!close.has_value()) return std::nullopt;
  ReasoningGate gate;
  gate.open = open.value_or(-1);
  gate.end = *close;
  for (auto it = prompt.rbegin(); it != prompt.rend(); ++it) {  // the last token not blank
    if (*it == gate.end) return std::nullopt;
    if (*it == gate.open) {
      gate.inside = true;
      break;
    }
    const std::string text = tokenizer.TokenBytes(*it);
    if (text.empty() || text.find_first_not_of(" \t\r\n") != std::string::npos) break;
  }
  return gate;
}

ReasoningScanner::ReasoningScanner(ReasoningFormat format)
    : format_(format), state_(format == ReasoningFormat::kNone ? State::kContent : State::kStart) {}

ReasoningScanner::Split ReasoningScanner::Feed(absl::string_view text) {
  held_.append(text.data(), text.size());
  Split out;
  Drain(out, /*at_end=*/false);
  return out;
}

ReasoningScanner::Split ReasoningScanner::Finish() {
  Split out;
  Drain(out, /*at_end=*/true);
  return out;
}

ReasoningScanner::Split ReasoningScanner::Parse(ReasoningFormat format, absl::string_view text) {
  ReasoningScanner scanner(format);
  Split out = scanner.Feed(text);
  Split rest = scanner.Finish();
  out.reasoning += rest.reasoning;
  out.content += rest.content;
  return out;
}

void ReasoningScanner::Drain(Split& out, bool at_end) {
  while (true) {
    switch (state_) {
      case State::kStart: {  // does the reply open with <think> (after any whitespace)?
        const size_t first = held_.find_first_not_of(" \t\r\n");
        const absl::string_view rest = first == std::string::npos
                                           ? absl::string_view()
                                           : absl::string_view(held_).substr(first);
        if (absl::StartsWith(rest, kThinkOpen)) {
          held_.erase(0, first + kThinkOpen.size());
          state_ = State::kReasoning;
          continue;
        }
        if (!at_end && absl::StartsWith(kThinkOpen, rest)) return;  // not decided yet
        state_ = format_ == ReasoningFormat::kDeepSeekR1 ? State::kReasoning : State::kContent;
        continue;
      }
      case State::kReasoning: {
        const size_t close = absl::string_view(held_).find(kThinkClose);
        if (close != absl::string_view::npos) {
          out.reasoning.append(held_, 0, close);
          held_.erase(0, close + kThinkClose.size());
          state_ = State::kContent;
          continue;
        }
        const size_t keep = at_end ? 0 : PartialMarkerAtEnd(held_, kThinkClose);
        out.reasoning.append(held_, 0, held_.size() - keep);
        held_.erase(0, held_.size() - keep);
        return;
      }
      case State::kContent:
        out.content += held_;
        held_.clear();
        return;
    }
  }
}

}  // namespace pds::server

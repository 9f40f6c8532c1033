#include "server/tool_calls.h"

#include <optional>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/strip.h"
#include "nlohmann/json.hpp"
#include "server/stop_matcher.h"

namespace pds::server {
namespace {

using Json = nlohmann::ordered_json;

constexpr absl::string_view kHermesOpen = "<tool_call>";
constexpr absl::string_view kHermesClose = "</tool_call>";

bool IsBlank(absl::string_view s) { return absl::StripAsciiWhitespace(s).empty(); }

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
    // The object's end: braces outside strings balance.
    size_t end = i;
    int depth = 0;
    bool in_string = false;
    for (; end < section.size(); ++end) {
      const char c = section[end];
      if (in_string) {
        if (c == '\\') {
          ++end;
        } else if (c == '"') {
          in_string = false;
        }
      } else if (c == '"') {
        in_string = true;
      } else if (c == '{') {
        ++depth;
      } else if (c == '}' && --depth == 0) {
        break;
      }
    }
    if (end >= section.size()) return std::nullopt;
    std::optional<ToolCall> call =
        ParseObject(section.substr(i, end + 1 - i), {"parameters", "arguments"});
    if (!call) return std::nullopt;
    calls.push_back(*std::move(call));
    i = end + 1;
  }
  if (calls.empty()) return std::nullopt;
  return calls;
}

}  // namespace

absl::StatusOr<ToolCallFormat> ParseToolCallFormat(absl::string_view name) {
  if (name.empty() || name == "none") return ToolCallFormat::kNone;
  if (name == "hermes") return ToolCallFormat::kHermes;
  if (name == "llama3_json") return ToolCallFormat::kLlama3Json;
  return absl::InvalidArgumentError(
      absl::StrCat("unknown tool call format '", name, "' (hermes, llama3_json or none)"));
}

std::string ToolCallScanner::Feed(absl::string_view text) {
  if (format_ == ToolCallFormat::kNone) return std::string(text);
  held_.append(text.data(), text.size());
  if (in_calls_) return "";
  std::string out;
  if (format_ == ToolCallFormat::kHermes) {
    const size_t at = absl::string_view(held_).find(kHermesOpen);
    const size_t keep =
        at != std::string::npos ? held_.size() - at : PartialMarkerAtEnd(held_, kHermesOpen);
    in_calls_ = at != std::string::npos;
    out = held_.substr(0, held_.size() - keep);
    held_.erase(0, held_.size() - keep);
    return out;
  }
  // llama3_json: a call is the whole reply, so it starts with '{' after any whitespace.
  if (any_text_) {
    out.swap(held_);
    return out;
  }
  const size_t first = held_.find_first_not_of(" \t\r\n");
  if (first == std::string::npos) return "";  // only whitespace so far: not decided
  if (held_[first] == '{') {
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
    std::optional<std::vector<ToolCall>> calls = format_ == ToolCallFormat::kHermes
                                                     ? ParseHermes(held_, &r.content)
                                                     : ParseLlama3Json(held_);
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

ToolCallScanner::Result ToolCallScanner::Parse(ToolCallFormat format, absl::string_view text) {
  ToolCallScanner scanner(format);
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

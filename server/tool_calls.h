// Tool calls in generated text, for the chat API's `tools` (`pdserve frontend
// --tool-call-parser FORMAT`): the model writes its calls in the format its chat template taught
// it, and they come back as OpenAI `tool_calls` instead of content.
//
//   hermes       <tool_call>{"name": ..., "arguments": {...}}</tool_call>, any number, after
//                optional content (Qwen 2.5/3, Hermes 2/3 and the many templates that copy them)
//   llama3_json  the whole reply one JSON object {"name": ..., "parameters": {...}} ("arguments"
//                also taken), or several separated by ';' (Llama 3.1/3.2/3.3 JSON tool calling;
//                <|python_tag|> is a special token and not in the text)
//   pythonic     the whole reply a Python list of calls with keyword arguments,
//                [get_weather(city="Paris", days=3), ...] (Llama 3.2/3.3/4 pythonic tool
//                calling; the values Python literals, converted to JSON)
//   mistral      [TOOL_CALLS] and the calls, after optional content: a JSON list
//                [{"name": ..., "arguments": {...}}, ...] (tokenizers before v11: Mistral 7B
//                v0.3, Nemo, Small 3.0/3.1), or name[ARGS]{...} (v11 on: Small 3.2,
//                Magistral, Devstral), name[CALL_ID]id[ARGS]{...}, each call after its own
//                [TOOL_CALLS]; a model's own id (the list's "id", [CALL_ID]) is kept when it is
//                9 letters and digits and not repeated in the reply. The markers are special
//                tokens, so the chat API asks for the reply's text with special tokens kept
//                (skip_special_tokens false) when it reads these calls; the calls' ids are 9
//                letters and digits, which Mistral's chat templates demand of the next turn's
//                tool_call_id.
//
// Forced by the chat request's tool_choice, under a json_schema that makes the reply so
// (engine/runtime/json_constraint.h), whatever the model's own format:
//
//   kArguments   a named function: the whole reply is its arguments object
//   kJsonArray   "required": the whole reply is [{"name": ..., "parameters": {...}}, ...]
//
// A reply whose call section does not parse is returned as content, whole: nothing is lost.
//
// Reasoning (`--reasoning-parser FORMAT`) is split off a reply before its tool calls are read:
//
//   deepseek_r1  the reply starts inside the reasoning (the template's generation prompt opened
//                <think>; a leading <think> is dropped too) and leaves it at </think>
//   qwen3        a reply that starts with <think> is reasoning up to </think>; others are content
//
// A reasoning section that never closes is all reasoning (the reply was cut off inside it).
#pragma once

#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "absl/types/span.h"
#include "engine/common/json_depth.h"

namespace pds::engine {
class Tokenizer;
}  // namespace pds::engine

namespace pds::server {

enum class ToolCallFormat {
  kNone,
  kHermes,
  kLlama3Json,
  kPythonic,
  kMistral,
  kArguments,
  kJsonArray
};

// "hermes", "llama3_json", "pythonic", "mistral", or "" / "none" (no parsing); INVALID_ARGUMENT
// for others.
absl::StatusOr<ToolCallFormat> ParseToolCallFormat(absl::string_view name);

struct ToolCall {
  std::string name;
  std::string arguments;  // a JSON object, as text (OpenAI's `arguments` string)
  std::string id;         // the model's own id for it (mistral: 9 letters and digits); empty: none
};

// One choice's reply as it streams: content goes out as soon as it cannot be the start of a
// call section; from the section's start on, text is held until Finish.
class ToolCallScanner {
 public:
  // `function`: kArguments' function name.
  explicit ToolCallScanner(ToolCallFormat format, std::string function = "")
      : format_(format), function_(std::move(function)) {}

  // Feeds the next generated text; returns the content that may be sent now.
  std::string Feed(absl::string_view text);

  struct Result {
    std::string content;  // content held back until now (all of it when calls were found:
                          // what came before the section, not yet returned by Feed)
    std::vector<ToolCall> calls;
  };
  // At the reply's end: the calls of the section, or, when it does not parse (or there is
  // none), the held text as content.
  Result Finish();

  // The whole reply at once: its content (before the calls) and calls.
  static Result Parse(ToolCallFormat format, absl::string_view text,
                      const std::string& function = "");

 private:
  ToolCallFormat format_;
  std::string function_;
  std::string held_;       // text not yet returned: a possible marker's start, or the section
  bool in_calls_ = false;  // the call section has begun (everything from there is held)
  bool any_text_ = false;  // non-space content went out (llama3_json, pythonic: no call can start)
};

enum class ReasoningFormat { kNone, kDeepSeekR1, kQwen3 };

// "deepseek_r1", "qwen3", or "" / "none"; INVALID_ARGUMENT for others.
absl::StatusOr<ReasoningFormat> ParseReasoningFormat(absl::string_view name);

// One choice's reply as it streams, split into reasoning and content: each piece goes out as
// soon as it cannot be part of a marker.
// The calls of a forced tool choice's reply as it streams (the reply is constrained to their
// JSON): kArguments' whole reply is one call's arguments; kJsonArray's is [{"name": ...,
// "parameters": {...}}, ...], the keys in that order (the schema's). Each piece of text gives
// the deltas it completes: a call opens once its name is known, then its arguments come in
// pieces, as they are written.
class ForcedCallStream {
 public:
  ForcedCallStream(ToolCallFormat format, std::string function)
      : format_(format), function_(std::move(function)) {}

  struct Delta {
    int index = 0;
    bool opens = false;  // the call's first delta: `name` is set
    std::string name;
    std::string arguments;  // the next piece of its arguments' text
  };
  std::vector<Delta> Feed(absl::string_view text);

 private:
  // The delta of call `index_` that this Feed adds to (opened if it must be).
  Delta& Current(std::vector<Delta>& out);

  ToolCallFormat format_;
  std::string function_;
  int index_ = -1;  // the call being written
  // kJsonArray's scan: nesting and strings, the key at the call object's level and its value.
  JsonNesting nesting_;
  bool expect_key_ = false;
  std::string string_;  // a string being read at the call object's level (quotes included)
  std::string key_;     // the call object's current key
};

// Where a constrained reply's reasoning is (GenerateRequest.reasoning_first): the tokens that
// open and close it, and whether the prompt's end opened it. Nothing when the tokenizer has no
// single </think> token or the prompt closed the reasoning (a template's thinking switched
// off): the constraint then applies from the start.
struct ReasoningGate {
  int32_t open = -1;  // <think>; -1: none
  int32_t end = -1;   // </think>
  bool inside = false;
};
std::optional<ReasoningGate> FindReasoningGate(const engine::Tokenizer& tokenizer,
                                               absl::Span<const int32_t> prompt);

class ReasoningScanner {
 public:
  struct Split {
    std::string reasoning;
    std::string content;
  };
  explicit ReasoningScanner(ReasoningFormat format);

  Split Feed(absl::string_view text);
  Split Finish();  // what was held back at the end

  // The whole reply at once.
  static Split Parse(ReasoningFormat format, absl::string_view text);

 private:
  enum class State { kStart, kReasoning, kContent };
  // Moves what is settled out of `held_` into `out`.
  void Drain(Split& out, bool at_end);

  ReasoningFormat format_;
  State state_;
  std::string held_;
};

}  // namespace pds::server

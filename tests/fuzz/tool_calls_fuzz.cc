// Fuzzes the tool-call and reasoning scanners (server/tool_calls.h) on arbitrary model output:
// never a crash or a runaway recursion, and nothing lost: a reply without calls comes back as
// its own text, and feeding it in pieces gives what parsing it whole gives.
#include <cstdlib>
#include <string>

#include "server/tool_calls.h"
#include "tests/fuzz/fuzz_target.h"

std::vector<std::string> FuzzSeeds() {
  return {
      "I will check. <tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": "
      "\"Oslo\"}}\n</tool_call>\n<tool_call>{\"name\": \"now\", \"arguments\": {}}</tool_call>",
      "{\"name\": \"a\", \"parameters\": {\"q\": \"a;b {c}\"}}; {\"name\": \"b\", \"arguments\": "
      "\"{\\\"k\\\": 1}\"}",
      " [get_weather(city='Oslo', days=3, opts={'a': [1, (2, 3.5e-1)], \"b\": None}), now()]",
      "[f(s='''multi\nline''' \"joined\", t='\\x41\\u00e9\\U0001F600\\101\\d', n=-1_000)]",
      "<think>\nreasoning </think>\n\nThe answer. <tool_call>{\"name\": \"f\"}</tool_call>",
      "Sure.[TOOL_CALLS] [{\"name\": \"f\", \"arguments\": {\"x\": [1, \"]\"]}, \"id\": \"a\"}]",
      "[TOOL_CALLS]get_weather[ARGS]{\"city\": \"Oslo\"}[TOOL_CALLS]now[CALL_ID]abc[ARGS]{} ok",
  };
}

namespace {

using pds::server::ToolCallFormat;
using pds::server::ToolCallScanner;

void Check(ToolCallFormat format, const std::string& text, size_t step) {
  const ToolCallScanner::Result whole = ToolCallScanner::Parse(format, text);
  if (whole.calls.empty() && whole.content != text) std::abort();  // text lost or changed
  ToolCallScanner scanner(format);
  std::string content;
  for (size_t i = 0; i < text.size(); i += step) content += scanner.Feed(text.substr(i, step));
  ToolCallScanner::Result streamed = scanner.Finish();
  content += streamed.content;
  if (content != whole.content || streamed.calls.size() != whole.calls.size()) std::abort();
  for (size_t i = 0; i < whole.calls.size(); ++i) {
    if (streamed.calls[i].name != whole.calls[i].name ||
        streamed.calls[i].arguments != whole.calls[i].arguments ||
        streamed.calls[i].id != whole.calls[i].id) {
      std::abort();
    }
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  const size_t step = 1 + (size == 0 ? 0 : data[0] % 7);
  for (ToolCallFormat f : {ToolCallFormat::kHermes, ToolCallFormat::kLlama3Json,
                           ToolCallFormat::kPythonic, ToolCallFormat::kMistral}) {
    Check(f, text, step);
  }
  for (auto r : {pds::server::ReasoningFormat::kDeepSeekR1, pds::server::ReasoningFormat::kQwen3}) {
    const pds::server::ReasoningScanner::Split s = pds::server::ReasoningScanner::Parse(r, text);
    if (s.reasoning.size() + s.content.size() > text.size()) std::abort();
  }
  return 0;
}

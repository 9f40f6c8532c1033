// Tool calls and reasoning in generated text (server/tool_calls.h): whole replies, and the same
// replies fed in every split, which must give the same content, calls and reasoning.
#include "server/tool_calls.h"

#include <map>
#include <random>
#include <string>
#include <vector>

#include "gtest/gtest.h"

namespace pds::server {
namespace {

using Result = ToolCallScanner::Result;

// `text` fed to a scanner in pieces of `step` bytes: the content sent along the way plus the
// content Finish returns, and the calls.
Result Streamed(ToolCallFormat format, const std::string& text, size_t step) {
  ToolCallScanner scanner(format);
  std::string content;
  for (size_t i = 0; i < text.size(); i += step) content += scanner.Feed(text.substr(i, step));
  Result r = scanner.Finish();
  r.content.insert(0, content);
  return r;
}

// Parse(text), checked to equal every streamed split.
Result Parsed(ToolCallFormat format, const std::string& text) {
  const Result whole = ToolCallScanner::Parse(format, text);
  for (size_t step = 1; step <= text.size(); ++step) {
    const Result s = Streamed(format, text, step);
    EXPECT_EQ(s.content, whole.content) << "step " << step << ": " << text;
    EXPECT_EQ(s.calls.size(), whole.calls.size()) << "step " << step << ": " << text;
    for (size_t i = 0; i < s.calls.size() && i < whole.calls.size(); ++i) {
      EXPECT_EQ(s.calls[i].name, whole.calls[i].name);
      EXPECT_EQ(s.calls[i].arguments, whole.calls[i].arguments);
    }
  }
  return whole;
}

TEST(ToolCallsTest, HermesCallsAfterContent) {
  const Result r = Parsed(ToolCallFormat::kHermes,
                          "Let me look.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": "
                          "{\"city\": \"Zürich\", \"days\": 2}}\n</tool_call>\n<tool_call>\n"
                          "{\"name\": \"now\", \"arguments\": {}}\n</tool_call>\n");
  EXPECT_EQ(r.content, "Let me look.\n");
  ASSERT_EQ(r.calls.size(), 2u);
  EXPECT_EQ(r.calls[0].name, "get_weather");
  EXPECT_EQ(r.calls[0].arguments, R"({"city":"Zürich","days":2})");  // key order kept
  EXPECT_EQ(r.calls[1].name, "now");
  EXPECT_EQ(r.calls[1].arguments, "{}");
}

TEST(ToolCallsTest, HermesEdgeCases) {
  // The reply ended inside the last block's closing tag: the JSON is whole, so it counts.
  Result r = Parsed(ToolCallFormat::kHermes,
                    "<tool_call>{\"name\": \"f\", \"arguments\": \"{\\\"x\\\": 1}\"}</tool_");
  ASSERT_EQ(r.calls.size(), 1u);
  EXPECT_EQ(r.calls[0].arguments, R"({"x":1})");  // a string holding an object
  EXPECT_EQ(r.content, "");
  // Text after the calls is content.
  r = Parsed(ToolCallFormat::kHermes, "<tool_call>{\"name\": \"f\"}</tool_call> done");
  ASSERT_EQ(r.calls.size(), 1u);
  EXPECT_EQ(r.calls[0].arguments, "{}");
  EXPECT_EQ(r.content, "done");
  // Broken sections are content, whole: nothing is lost.
  for (const std::string text :
       {"a <tool_call>{\"name\": \"f\", \"arguments\": {\"x\": </tool_call>",
        "<tool_call>{\"arguments\": {}}</tool_call>", "<tool_call>[1]</tool_call>",
        "<tool_call>{\"name\": \"f\", \"arguments\": 3}</tool_call>", "<tool_call>"}) {
    r = Parsed(ToolCallFormat::kHermes, text);
    EXPECT_TRUE(r.calls.empty()) << text;
    EXPECT_EQ(r.content, text);
  }
  // A marker's start that is not a marker is content.
  r = Parsed(ToolCallFormat::kHermes, "1 < 2 and <tool_ca is not a call <tool");
  EXPECT_TRUE(r.calls.empty());
  EXPECT_EQ(r.content, "1 < 2 and <tool_ca is not a call <tool");
}

TEST(ToolCallsTest, Llama3JsonWholeReplies) {
  Result r = Parsed(ToolCallFormat::kLlama3Json,
                    " {\"name\": \"search\", \"parameters\": {\"q\": \"a;b {c}\", \"n\": [1, 2]}}");
  ASSERT_EQ(r.calls.size(), 1u);
  EXPECT_EQ(r.calls[0].name, "search");
  EXPECT_EQ(r.calls[0].arguments, R"({"q":"a;b {c}","n":[1,2]})");
  EXPECT_EQ(r.content, "");
  r = Parsed(ToolCallFormat::kLlama3Json,
             "{\"name\": \"a\", \"parameters\": {}}; {\"name\": \"b\", \"arguments\": {\"k\": "
             "\"\\\"}\"}}\n");
  ASSERT_EQ(r.calls.size(), 2u);
  EXPECT_EQ(r.calls[1].name, "b");
  EXPECT_EQ(r.calls[1].arguments, R"({"k":"\"}"})");
  // Replies that are not calls are content, whole.
  for (const std::string text :
       {"Hello {\"name\": \"a\"}", "{\"name\": \"a\", \"parameters\": {}} and more",
        "{\"no\": \"name\"}", "{\"name\": \"a\", \"parameters\": {", "  \n", ""}) {
    r = Parsed(ToolCallFormat::kLlama3Json, text);
    EXPECT_TRUE(r.calls.empty()) << text;
    EXPECT_EQ(r.content, text);
  }
}

TEST(ToolCallsTest, MistralCallsInBothLayouts) {
  // Before v11 (Mistral 7B v0.3, Nemo): a JSON list after the marker, after optional content;
  // an "id" the model wrote is kept.
  Result r =
      Parsed(ToolCallFormat::kMistral,
             "Checking.[TOOL_CALLS] [{\"name\": \"get_weather\", \"arguments\": {\"city\": "
             "\"Oslo [N]\"}}, {\"name\": \"now\", \"arguments\": {}, \"id\": \"a1B2c3D4e\"}]");
  EXPECT_EQ(r.content, "Checking.");
  ASSERT_EQ(r.calls.size(), 2u);
  EXPECT_EQ(r.calls[0].name, "get_weather");
  EXPECT_EQ(r.calls[0].arguments, R"({"city":"Oslo [N]"})");
  EXPECT_EQ(r.calls[0].id, "");
  EXPECT_EQ(r.calls[1].name, "now");
  EXPECT_EQ(r.calls[1].id, "a1B2c3D4e");
  // Ids not in the shape Mistral's templates take back, or repeated, are dropped (new ones
  // are made).
  r = Parsed(
      ToolCallFormat::kMistral,
      "[TOOL_CALLS][{\"name\": \"f\", \"arguments\": {}, \"id\": \"a\"}, {\"name\": \"g\", "
      "\"arguments\": {}, \"id\": \"abcdefgh9\"}, {\"name\": \"h\", \"arguments\": {}, \"id\": "
      "\"abcdefgh9\"}]");
  ASSERT_EQ(r.calls.size(), 3u);
  EXPECT_EQ(r.calls[0].id, "");
  EXPECT_EQ(r.calls[1].id, "abcdefgh9");
  EXPECT_EQ(r.calls[2].id, "");
  // One object rather than a list.
  r = Parsed(ToolCallFormat::kMistral, "[TOOL_CALLS]{\"name\": \"f\", \"arguments\": {\"x\": 1}}");
  ASSERT_EQ(r.calls.size(), 1u);
  EXPECT_EQ(r.calls[0].arguments, R"({"x":1})");
  // v11 on (Mistral Small 3.x, Magistral): name[ARGS]{...} after each marker, with [CALL_ID]
  // where the model writes ids; text after the calls is content.
  r = Parsed(ToolCallFormat::kMistral,
             "[TOOL_CALLS]get_weather[ARGS]{\"city\": \"a}b\", \"days\": [1, {\"d\": 2}]}"
             "[TOOL_CALLS]now[CALL_ID]Zz9Yy8Xx7[ARGS]{} \nDone.");
  EXPECT_EQ(r.content, "Done.");
  ASSERT_EQ(r.calls.size(), 2u);
  EXPECT_EQ(r.calls[0].name, "get_weather");
  EXPECT_EQ(r.calls[0].arguments, R"({"city":"a}b","days":[1,{"d":2}]})");
  EXPECT_EQ(r.calls[1].name, "now");
  EXPECT_EQ(r.calls[1].arguments, "{}");
  EXPECT_EQ(r.calls[1].id, "Zz9Yy8Xx7");
  // Broken or cut-off sections are content, whole; text that only looks like a marker's start
  // is content too.
  for (const std::string text :
       {"[TOOL_CALLS]", "[TOOL_CALLS][]", "[TOOL_CALLS][{\"name\": \"f\", \"arguments\": {",
        "[TOOL_CALLS]get_weather[ARGS]{\"city\": \"Os", "[TOOL_CALLS]get weather[ARGS]{}",
        "[TOOL_CALLS]f[ARGS][1]", "[TOOL_CALLS]f{}", "a [TOOL_CALLS][{\"arguments\": {}}]",
        "[TOOL_CALLS]f[ARGS]{}[TOOL_CALLS]", "see [TOOL_CALL and [TOOL"}) {
    r = Parsed(ToolCallFormat::kMistral, text);
    EXPECT_TRUE(r.calls.empty()) << text;
    EXPECT_EQ(r.content, text);
  }
}

// Pythonic calls, checked against Python's ast.literal_eval + json.dumps of the same text.
TEST(ToolCallsTest, PythonicWholeReplies) {
  struct Case {
    std::string text;
    std::vector<std::pair<std::string, std::string>> calls;
  };
  const std::vector<Case> cases = {
      {R"([get_weather(city="San Francisco", metric='celsius')])",
       {{"get_weather", R"({"city":"San Francisco","metric":"celsius"})"}}},
      {" [a(x=1, y=-2.5, z=1e3, w=True, v=None, u=False), b()]\n",
       {{"a", R"({"x":1,"y":-2.5,"z":1000.0,"w":true,"v":null,"u":false})"}, {"b", "{}"}}},
      {R"([f(s='it\'s \"q\" \n\t\x41\u00e9\U0001F600\101 \d', t='''multi)"
       "\n"
       R"(line''', j='a' "b")])",
       {{"f", R"({"s":"it's \"q\" \n\tAé😀A \\d","t":"multi\nline","j":"ab"})"}}},
      {R"([f(l=[1, (2, 3), {"k": [None]}], d={}, e=[], n=1_000,)])",
       {{"f", R"({"l":[1,[2,3],{"k":[null]}],"d":{},"e":[],"n":1000})"}}},
      {R"([f(name="ünï"), g(q="[x(y=1)]"),])",
       {{"f", R"({"name":"ünï"})"}, {"g", R"({"q":"[x(y=1)]"})"}}},
  };
  for (const Case& c : cases) {
    const Result r = Parsed(ToolCallFormat::kPythonic, c.text);
    EXPECT_EQ(r.content, "") << c.text;
    ASSERT_EQ(r.calls.size(), c.calls.size()) << c.text;
    for (size_t i = 0; i < c.calls.size(); ++i) {
      EXPECT_EQ(r.calls[i].name, c.calls[i].first) << c.text;
      EXPECT_EQ(r.calls[i].arguments, c.calls[i].second) << c.text;
    }
  }
  // Replies that are not a list of calls with keyword arguments are content, whole (values
  // nested deeper than the parser goes too).
  const std::string deep = "[f(x=" + std::string(100, '[') + std::string(100, ']') + ")]";
  for (const std::string& text :
       {std::string("Sure: [f(x=1)]"), std::string("[f(x=1)] and more"), std::string("[f(1)]"),
        std::string("[f(x=1, x=2)]"), std::string("[f(x=y)]"), std::string("[f(x=1 + 2)]"),
        std::string("[]"), std::string("[f(x=1)"), std::string("[f(x='open)]"),
        std::string("[1f(x=1)]"), std::string("[f(x={1: 2})]"), std::string("[f(x=1e)]"),
        std::string("[1] See the first source."), deep, std::string("  \n"), std::string()}) {
    const Result r = Parsed(ToolCallFormat::kPythonic, text);
    EXPECT_TRUE(r.calls.empty()) << text;
    EXPECT_EQ(r.content, text);
  }
  EXPECT_EQ(*ParseToolCallFormat("pythonic"), ToolCallFormat::kPythonic);
}

// A forced tool choice's reply streams its calls in any split of the text: each call opens
// once with its name, and its argument pieces add up to the arguments as written.
TEST(ToolCallsTest, ForcedCallsStreamInAnySplit) {
  const std::string args0 = R"({"city": "Oslo, \"N\" {x}", "days": [1, {"x": "}]"}]})";
  const std::string args1 = "{}";
  const std::string reply = " [ {\"name\": \"get_weather\", \"parameters\": " + args0 +
                            "} ,\n {\"name\":\"now\",\"parameters\":" + args1 + "}]";
  std::mt19937 rng(9);
  for (int trial = 0; trial < 50; ++trial) {
    ForcedCallStream stream(ToolCallFormat::kJsonArray, "");
    std::map<int, std::string> names, arguments;
    std::map<int, int> opens;
    for (size_t at = 0; at < reply.size();) {
      const size_t n = 1 + rng() % 7;
      for (const ForcedCallStream::Delta& d : stream.Feed(reply.substr(at, n))) {
        if (d.opens) {
          ++opens[d.index];
          names[d.index] = d.name;
        }
        ASSERT_TRUE(opens.count(d.index)) << "a piece before its call opened";
        arguments[d.index] += d.arguments;
      }
      at += n;
    }
    ASSERT_EQ(names.size(), 2u);
    EXPECT_EQ(names[0], "get_weather");
    EXPECT_EQ(names[1], "now");
    EXPECT_EQ(opens[0], 1);
    EXPECT_EQ(opens[1], 1);
    EXPECT_EQ(arguments[0], args0);
    EXPECT_EQ(arguments[1], args1);
  }
  // A named function: the whole reply is its arguments, opened at once.
  ForcedCallStream named(ToolCallFormat::kArguments, "f");
  std::vector<ForcedCallStream::Delta> first = named.Feed("{\"a\"");
  ASSERT_EQ(first.size(), 1u);
  EXPECT_TRUE(first[0].opens);
  EXPECT_EQ(first[0].name, "f");
  EXPECT_EQ(first[0].arguments, "{\"a\"");
  std::vector<ForcedCallStream::Delta> next = named.Feed(": 1}");
  ASSERT_EQ(next.size(), 1u);
  EXPECT_FALSE(next[0].opens);
  EXPECT_EQ(next[0].arguments, ": 1}");
}

TEST(ToolCallsTest, NoFormatPassesTextThrough) {
  ToolCallScanner scanner(ToolCallFormat::kNone);
  EXPECT_EQ(scanner.Feed("<tool_call>{\"name\": \"f\"}"), "<tool_call>{\"name\": \"f\"}");
  EXPECT_TRUE(scanner.Finish().calls.empty());
  EXPECT_EQ(*ParseToolCallFormat("hermes"), ToolCallFormat::kHermes);
  EXPECT_EQ(*ParseToolCallFormat("llama3_json"), ToolCallFormat::kLlama3Json);
  EXPECT_EQ(*ParseToolCallFormat(""), ToolCallFormat::kNone);
  EXPECT_EQ(*ParseToolCallFormat("mistral"), ToolCallFormat::kMistral);
  EXPECT_EQ(ParseToolCallFormat("granite").status().code(), absl::StatusCode::kInvalidArgument);
}

// A reply split by a reasoning scanner fed in every piece size, checked to equal Parse.
ReasoningScanner::Split Reasoned(ReasoningFormat format, const std::string& text) {
  const ReasoningScanner::Split whole = ReasoningScanner::Parse(format, text);
  for (size_t step = 1; step <= text.size(); ++step) {
    ReasoningScanner scanner(format);
    std::string reasoning, content;
    for (size_t i = 0; i < text.size(); i += step) {
      ReasoningScanner::Split s = scanner.Feed(text.substr(i, step));
      reasoning += s.reasoning;
      content += s.content;
    }
    ReasoningScanner::Split s = scanner.Finish();
    EXPECT_EQ(reasoning + s.reasoning, whole.reasoning) << "step " << step << ": " << text;
    EXPECT_EQ(content + s.content, whole.content) << "step " << step << ": " << text;
  }
  return whole;
}

TEST(ReasoningTest, DeepSeekR1RepliesStartInsideTheReasoning) {
  auto r = Reasoned(ReasoningFormat::kDeepSeekR1, "Let me think.\n</think>\n\nThe answer is 4.");
  EXPECT_EQ(r.reasoning, "Let me think.\n");
  EXPECT_EQ(r.content, "\n\nThe answer is 4.");
  r = Reasoned(ReasoningFormat::kDeepSeekR1, "<think>x < y</thi</think>done");
  EXPECT_EQ(r.reasoning, "x < y</thi");
  EXPECT_EQ(r.content, "done");
  r = Reasoned(ReasoningFormat::kDeepSeekR1, "cut off while thinking </thi");
  EXPECT_EQ(r.reasoning, "cut off while thinking </thi");
  EXPECT_EQ(r.content, "");
}

TEST(ReasoningTest, Qwen3RepliesReasonOnlyAfterThink) {
  auto r = Reasoned(ReasoningFormat::kQwen3, "<think>\nHmm.\n</think>\n\nHello!");
  EXPECT_EQ(r.reasoning, "\nHmm.\n");
  EXPECT_EQ(r.content, "\n\nHello!");
  r = Reasoned(ReasoningFormat::kQwen3, "Hello <think> is a tag.</think>");
  EXPECT_EQ(r.reasoning, "");
  EXPECT_EQ(r.content, "Hello <think> is a tag.</think>");
  r = Reasoned(ReasoningFormat::kQwen3, "  <thin");
  EXPECT_EQ(r.content, "  <thin");
  r = Reasoned(ReasoningFormat::kNone, "<think>a</think>b");
  EXPECT_EQ(r.content, "<think>a</think>b");
  EXPECT_EQ(*ParseReasoningFormat("qwen3"), ReasoningFormat::kQwen3);
  EXPECT_EQ(*ParseReasoningFormat("deepseek_r1"), ReasoningFormat::kDeepSeekR1);
  EXPECT_EQ(ParseReasoningFormat("o1").status().code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace pds::server

// The OpenAI-compatible HTTP API (server/openai_http.h): request parsing and stop sequences as
// units, then a front-end with a prefill and a decode worker driven over HTTP and compared with
// its own gRPC API.
#include "server/openai_http.h"

#include <algorithm>
#include <atomic>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <regex>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "client/openai_client.h"
#include "engine/tokenizer/chat_template.h"
#include "engine/tokenizer/tokenizer.h"
#include "grpcpp/grpcpp.h"
#include "gtest/gtest.h"
#include "httplib.h"
#include "nlohmann/json.hpp"
#include "pdserve/v1/serving.grpc.pb.h"
#include "server/frontend.h"
#include "server/stop_matcher.h"
#include "tests/server/test_worker.h"
#include "tests/testing/test_util.h"

namespace pds::server {
namespace {

namespace api = ::pdserve::v1;
using Json = nlohmann::json;
using scheduler::InstanceRole;

absl::StatusOr<CompletionRequest> Parse(const Json& body) {
  return ParseCompletionRequest(body.dump(), "m");
}

TEST(OpenAiParseTest, DefaultsAreOpenAis) {
  auto r = Parse({{"prompt", "hello"}});
  ASSERT_TRUE(r.ok()) << r.status();
  ASSERT_EQ(r->choices.size(), 1u);
  const api::GenerateRequest& g = r->choices[0];
  EXPECT_EQ(g.prompt_text(), "hello");
  EXPECT_EQ(g.max_tokens(), 16);
  EXPECT_FLOAT_EQ(g.temperature(), 1.0f);
  EXPECT_FLOAT_EQ(g.top_p(), 1.0f);
  EXPECT_EQ(g.top_k(), 0);
  EXPECT_FALSE(g.has_seed());
  EXPECT_FALSE(g.has_logprobs());
  EXPECT_FALSE(g.has_ttft_slo_ms());
  EXPECT_FALSE(r->stream);
  EXPECT_EQ(r->logprobs, -1);
}

TEST(OpenAiParseTest, PromptsAndChoicesInIndexOrder) {
  auto r = Parse({{"model", "m"},
                  {"prompt", {{5, 6, 7}, {8}}},
                  {"n", 2},
                  {"seed", 40},
                  {"max_tokens", 3},
                  {"temperature", 0.5},
                  {"top_k", -1},
                  {"stop_token_ids", {9}},
                  {"ignore_eos", true},
                  {"logprobs", 2},
                  {"ttft_slo_ms", 250},
                  {"stream", true},
                  {"stream_options", {{"include_usage", true}}},
                  {"user", "someone"},           // ignored
                  {"presence_penalty", 0},       // neutral
                  {"some_future_field", {1}}});  // ignored
  ASSERT_TRUE(r.ok()) << r.status();
  ASSERT_EQ(r->choices.size(), 4u);
  EXPECT_EQ(r->n, 2);
  EXPECT_TRUE(r->stream && r->include_usage);
  EXPECT_EQ(r->logprobs, 2);
  for (int i = 0; i < 4; ++i) {
    const api::GenerateRequest& g = r->choices[i];
    EXPECT_EQ(g.prompt_token_ids_size(), i < 2 ? 3 : 1) << i;
    EXPECT_EQ(g.seed(), 40u + i % 2) << "the n choices of a prompt differ";
    EXPECT_EQ(g.max_tokens(), 3);
    EXPECT_FLOAT_EQ(g.temperature(), 0.5f);
    EXPECT_EQ(g.top_k(), 0);
    ASSERT_EQ(g.stop_token_ids_size(), 1);
    EXPECT_TRUE(g.ignore_eos());
    EXPECT_EQ(g.logprobs(), 2);
    EXPECT_DOUBLE_EQ(g.ttft_slo_ms(), 250);
    EXPECT_FALSE(g.has_tpot_slo_ms());
  }
  auto texts = Parse({{"prompt", {"a", "b", "c"}}, {"stop", "x"}});
  ASSERT_TRUE(texts.ok()) << texts.status();
  ASSERT_EQ(texts->choices.size(), 3u);
  EXPECT_EQ(texts->choices[2].prompt_text(), "c");
  EXPECT_EQ(texts->stop, std::vector<std::string>{"x"});
}

// Penalties, logit_bias (OpenAI's string keys), min_tokens and min_p reach every choice; the
// front-end checks their ranges.
TEST(OpenAiParseTest, LogitsProcessingReachesTheChoices) {
  auto r = Parse({{"model", "m"},
                  {"prompt", "a"},
                  {"n", 2},
                  {"presence_penalty", 0.5},
                  {"frequency_penalty", -0.25},
                  {"repetition_penalty", 1.2},
                  {"min_p", 0.1},
                  {"min_tokens", 3},
                  {"logit_bias", {{"5", 10}, {"7", -100}}},
                  {"skip_special_tokens", false},
                  {"allowed_token_ids", {3, 5, 8}},
                  {"include_stop_str_in_output", true}});
  ASSERT_TRUE(r.ok()) << r.status();
  ASSERT_EQ(r->choices.size(), 2u);
  for (const api::GenerateRequest& g : r->choices) {
    EXPECT_EQ(std::vector<int32_t>(g.allowed_token_ids().begin(), g.allowed_token_ids().end()),
              (std::vector<int32_t>{3, 5, 8}));
    EXPECT_TRUE(g.include_stop_str_in_output());
    EXPECT_TRUE(g.has_skip_special_tokens() && !g.skip_special_tokens());
    EXPECT_FLOAT_EQ(g.presence_penalty(), 0.5f);
    EXPECT_FLOAT_EQ(g.frequency_penalty(), -0.25f);
    EXPECT_FLOAT_EQ(g.repetition_penalty(), 1.2f);
    EXPECT_FLOAT_EQ(g.min_p(), 0.1f);
    EXPECT_EQ(g.min_tokens(), 3);
    ASSERT_EQ(g.logit_bias_size(), 2);
    EXPECT_FLOAT_EQ(g.logit_bias().at(5), 10.0f);
    EXPECT_FLOAT_EQ(g.logit_bias().at(7), -100.0f);
  }
  auto plain = Parse({{"model", "m"}, {"prompt", "a"}});
  ASSERT_TRUE(plain.ok());
  EXPECT_FALSE(plain->choices[0].has_repetition_penalty());
  EXPECT_FALSE(plain->choices[0].has_skip_special_tokens());  // the front-end's default: skip
  EXPECT_EQ(plain->choices[0].logit_bias_size(), 0);
}

TEST(OpenAiParseTest, RefusalsNameTheField) {
  struct Case {
    Json body;
    absl::StatusCode code;
    const char* says;
  };
  const Case cases[] = {
      {{{"prompt", "a"}, {"model", "other"}}, absl::StatusCode::kNotFound, "'other' does not"},
      {{{"max_tokens", 4}}, absl::StatusCode::kInvalidArgument, "'prompt' is required"},
      {{{"prompt", ""}}, absl::StatusCode::kInvalidArgument, "'prompt'"},
      {{{"prompt", Json::array()}}, absl::StatusCode::kInvalidArgument, "'prompt'"},
      {{{"prompt", {1, "a"}}}, absl::StatusCode::kInvalidArgument, "'prompt'"},
      {{{"prompt", {1, -2}}}, absl::StatusCode::kInvalidArgument, "token id -2"},
      {{{"prompt", 7}}, absl::StatusCode::kInvalidArgument, "'prompt'"},
      {{{"prompt", "a"}, {"max_tokens", 0}}, absl::StatusCode::kInvalidArgument, "'max_tokens'"},
      {{{"prompt", "a"}, {"max_tokens", "8"}}, absl::StatusCode::kInvalidArgument, "integer"},
      {{{"prompt", "a"}, {"temperature", -1}}, absl::StatusCode::kInvalidArgument, "'temperature'"},
      {{{"prompt", "a"}, {"top_p", 0}}, absl::StatusCode::kInvalidArgument, "'top_p'"},
      {{{"prompt", "a"}, {"n", 17}}, absl::StatusCode::kInvalidArgument, "'n'"},
      {{{"prompt", "a"}, {"stream_options", {{"include_usage", true}}}},
       absl::StatusCode::kInvalidArgument,
       "only allowed with stream"},
      {{{"prompt", "a"}, {"stop", {"a", "b", "c", "d", "e"}}},
       absl::StatusCode::kInvalidArgument,
       "'stop'"},
      {{{"prompt", "a"}, {"stop", {""}}}, absl::StatusCode::kInvalidArgument, "'stop'"},
      {{{"prompt", "a"}, {"logprobs", 21}}, absl::StatusCode::kInvalidArgument, "'logprobs'"},
      {{{"prompt", "a"}, {"echo", true}, {"truncate_prompt_tokens", 1}},
       absl::StatusCode::kInvalidArgument,
       "'echo'"},
      {{{"prompt", "a"}, {"best_of", 3}}, absl::StatusCode::kInvalidArgument, "'best_of'"},
      {{{"prompt", "a"}, {"frequency_penalty", "high"}},
       absl::StatusCode::kInvalidArgument,
       "'frequency_penalty'"},
      {{{"prompt", "a"}, {"logit_bias", {{"five", 1}}}},
       absl::StatusCode::kInvalidArgument,
       "'logit_bias'"},
      {{{"prompt", "a"}, {"logit_bias", {1, 2}}},
       absl::StatusCode::kInvalidArgument,
       "'logit_bias'"},
      {{{"prompt", "a"}, {"min_tokens", 1.5}}, absl::StatusCode::kInvalidArgument, "'min_tokens'"},
      {{{"prompt", "a"}, {"allowed_token_ids", Json::array()}},
       absl::StatusCode::kInvalidArgument,
       "'allowed_token_ids'"},
      {{{"prompt", "a"}, {"allowed_token_ids", {1, -1}}},
       absl::StatusCode::kInvalidArgument,
       "'allowed_token_ids'"},
      {{{"prompt", "a"}, {"include_stop_str_in_output", 1}},
       absl::StatusCode::kInvalidArgument,
       "'include_stop_str_in_output'"},
      {{{"prompt", "a"}, {"ttft_slo_ms", -3}}, absl::StatusCode::kInvalidArgument, "'ttft_slo_ms'"},
  };
  for (const Case& c : cases) {
    auto r = Parse(c.body);
    ASSERT_FALSE(r.ok()) << c.body.dump();
    EXPECT_EQ(r.status().code(), c.code) << c.body.dump() << ": " << r.status();
    EXPECT_TRUE(absl::StrContains(r.status().message(), c.says))
        << c.body.dump() << ": " << r.status();
  }
  EXPECT_EQ(ParseCompletionRequest("{not json", "m").status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ParseCompletionRequest("[1]", "m").status().code(), absl::StatusCode::kInvalidArgument);
}

// Feeds `pieces` and returns what was released, with "|" between the releases.
std::string Feed(StopMatcher& m, const std::vector<std::string>& pieces) {
  std::string out;
  for (const std::string& p : pieces) absl::StrAppend(&out, m.Add(p), "|");
  absl::StrAppend(&out, m.Finish());
  return out;
}

TEST(StopMatcherTest, HoldsBackWhatMayStartAStopSequence) {
  StopMatcher none({});
  EXPECT_EQ(Feed(none, {"ab", "c"}), "ab|c|");
  StopMatcher one({"END"});
  // "E" and "EN" may start "END": held until the next piece shows they do not.
  EXPECT_EQ(Feed(one, {"abE", "Nx", "yEN", "D tail"}), "ab|ENx|y||");
  EXPECT_TRUE(one.stopped());
  StopMatcher two({"abc", "bd"});
  EXPECT_EQ(Feed(two, {"xab", "d"}), "x|a|");  // "bd" ends it, inside the held "ab"
  StopMatcher end({"zz"});
  EXPECT_EQ(Feed(end, {"az"}), "a|z");  // what was held comes out at the end
  EXPECT_FALSE(end.stopped());
  StopMatcher utf8({"é!"});
  EXPECT_EQ(Feed(utf8, {"caf", "é", "!", "more"}), "caf||||");
  // The earliest stop ends the text, not the first listed; of two starting there the shorter,
  // however the text is split. include_stop_str_in_output keeps it.
  StopMatcher earliest({"cd", "bc"});
  EXPECT_EQ(Feed(earliest, {"abcd"}), "a|");
  StopMatcher kept({"END", "xEN", "NDy"}, /*include_stop=*/true);
  EXPECT_EQ(Feed(kept, {"abE", "Nx", "yEN", "D tail"}), "ab|EN|xy|END|");
  for (const std::vector<std::string>& pieces :
       {std::vector<std::string>{"abcde"}, std::vector<std::string>{"abc", "de"}}) {
    StopMatcher same_start({"bcd", "bc"}, /*include_stop=*/true);
    EXPECT_EQ(Feed(same_start, pieces), pieces.size() == 1 ? "abc|" : "abc||");
  }
}

// --- over HTTP -----------------------------------------------------------------------------

const std::string& ModelDir() {
  static const std::string* dir = [] {
    auto made = testing::MakeModelDir(testing::SmallTestConfig(), "openai", 5, engine::DType::kF32,
                                      0, /*tokenizer=*/true);
    EXPECT_TRUE(made.ok()) << made.status();
    return new std::string(made.ok() ? *made : "");
  }();
  return *dir;
}

// One server-sent event stream, split into its `data:` payloads.
std::vector<std::string> Events(const std::string& body) {
  std::vector<std::string> out;
  for (absl::string_view block : absl::StrSplit(body, "\n\n", absl::SkipEmpty())) {
    if (absl::ConsumePrefix(&block, "data: ")) out.emplace_back(block);
  }
  return out;
}

// --- chat requests ---------------------------------------------------------------------------

// The small model's chat format (its tokenizer_config.json's Llama 3 style template) and
// tokenizer.
struct ChatModel {
  engine::ChatFormat format;
  std::unique_ptr<engine::Tokenizer> tokenizer;
  std::string bos;  // the template's bos_token
};

const ChatModel& SmallChatModel() {
  static const ChatModel* model = [] {
    auto* m = new ChatModel;
    auto format = engine::LoadChatFormat(ModelDir());
    EXPECT_TRUE(format.ok()) << format.status();
    if (format.ok()) m->format = *std::move(format);
    auto tok = engine::Tokenizer::Load(ModelDir() + "/tokenizer.json");
    EXPECT_TRUE(tok.ok()) << tok.status();
    if (tok.ok()) m->tokenizer = *std::move(tok);
    const Json config =
        Json::parse(std::ifstream(ModelDir() + "/tokenizer_config.json"), nullptr, false);
    m->bos = config.value("bos_token", "");
    return m;
  }();
  return *model;
}

// Writes `text` to a scratch file; its path.
std::string ScratchFile(const std::string& name, const std::string& text) {
  const std::string path = testing::ScratchDir() + "/" + name;
  std::ofstream(path) << text;
  return path;
}

absl::StatusOr<CompletionRequest> ParseChat(const Json& body, int32_t max_context = 256) {
  const ChatModel& m = SmallChatModel();
  return ParseChatRequest(body.dump(), "m", max_context, m.format, *m.tokenizer);
}

// The prompt text the small model's template makes of (role, content) pairs.
std::string LlamaPrompt(const std::vector<std::pair<std::string, std::string>>& messages,
                        bool generation_prompt = true) {
  std::string text = SmallChatModel().bos;
  for (const auto& [role, content] : messages) {
    absl::StrAppend(&text, "<|start_header_id|>", role, "<|end_header_id|>\n\n", content,
                    "<|eot_id|>");
  }
  if (generation_prompt)
    absl::StrAppend(&text, "<|start_header_id|>assistant<|end_header_id|>\n\n");
  return text;
}

std::vector<int32_t> Ids(const api::GenerateRequest& g) {
  return {g.prompt_token_ids().begin(), g.prompt_token_ids().end()};
}

TEST(OpenAiChatParseTest, RendersTheMessagesIntoTokenIds) {
  const ChatModel& m = SmallChatModel();
  ASSERT_FALSE(m.bos.empty());
  auto r = ParseChat(
      {{"model", "m"},
       {"messages",
        {{{"role", "developer"}, {"content", "Be brief."}},
         {{"role", "user"},
          {"content",
           {{{"type", "text"}, {"text", "Hi"}}, {{"type", "text"}, {"text", "there"}}}}}}}});
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_TRUE(r->chat);
  ASSERT_EQ(r->choices.size(), 1u);
  const api::GenerateRequest& g = r->choices[0];
  // developer is system; text parts join with newlines; no special tokens added (the template
  // wrote the BOS).
  const std::vector<int32_t> expected =
      m.tokenizer->Encode(LlamaPrompt({{"system", "Be brief."}, {"user", "Hi\nthere"}}), false);
  EXPECT_EQ(Ids(g), expected);
  EXPECT_EQ(m.tokenizer->Decode(Ids(g)),
            LlamaPrompt({{"system", "Be brief."}, {"user", "Hi\nthere"}}));
  // By default the reply may take what the context leaves; temperature 1 as OpenAI's.
  EXPECT_EQ(g.max_tokens(), 256 - static_cast<int>(expected.size()));
  EXPECT_FLOAT_EQ(g.temperature(), 1.0f);
  EXPECT_FALSE(g.has_logprobs());
  EXPECT_EQ(r->logprobs, -1);
}

// An assistant turn's tool calls reach the template with their arguments as objects (OpenAI
// sends them as JSON text), as HF's apply_chat_template and vLLM give them; text that is not
// JSON is refused naming the field.
TEST(OpenAiChatParseTest, ToolCallArgumentsReachTheTemplateAsObjects) {
  auto format = engine::LoadChatFormat(
      ModelDir(), ScratchFile("tool_turns.jinja",
                              "{% for m in messages %}[{{ m.role }}]{{ m.content or '' }}"
                              "{% for c in m.tool_calls or [] %}<{{ c.function.name }} "
                              "{{ c.function.arguments | tojson }}>{% endfor %}{% endfor %}"));
  ASSERT_TRUE(format.ok()) << format.status();
  const ChatModel& m = SmallChatModel();
  Json body = {
      {"messages",
       {{{"role", "user"}, {"content", "Weather?"}},
        {{"role", "assistant"},
         {"content", nullptr},
         {"tool_calls",
          {{{"id", "call_1"},
            {"type", "function"},
            {"function", {{"name", "get_weather"}, {"arguments", "{\"city\": \"Oslo\"}"}}}}}}},
        {{"role", "tool"}, {"tool_call_id", "call_1"}, {"content", "sunny"}}}}};
  auto r = ParseChatRequest(body.dump(), "m", 256, *format, *m.tokenizer);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(m.tokenizer->Decode(Ids(r->choices[0])),
            "[user]Weather?[assistant]<get_weather {\"city\": \"Oslo\"}>[tool]sunny");
  body["messages"][1]["tool_calls"][0]["function"]["arguments"] = "{city: Oslo}";
  r = ParseChatRequest(body.dump(), "m", 256, *format, *m.tokenizer);
  ASSERT_FALSE(r.ok());
  EXPECT_TRUE(absl::StrContains(r.status().message(), "messages[1].tool_calls[0].function"))
      << r.status();
}

// vLLM's prompt_logprobs on a chat request: the prompt's logprobs are asked of its first choice
// only (the response carries one list); not with stream.
TEST(OpenAiChatParseTest, PromptLogprobsAreAskedOnce) {
  const Json messages = {{{"role", "user"}, {"content", "Hi"}}};
  auto r = ParseChat({{"messages", messages}, {"n", 3}, {"prompt_logprobs", 2}});
  ASSERT_TRUE(r.ok()) << r.status();
  ASSERT_EQ(r->choices.size(), 3u);
  EXPECT_EQ(r->prompt_logprobs, 2);
  EXPECT_EQ(r->choices[0].prompt_logprobs(), 2);
  EXPECT_FALSE(r->choices[1].has_prompt_logprobs());
  EXPECT_FALSE(r->choices[2].has_prompt_logprobs());
  for (const Json& bad : {Json{{"messages", messages}, {"prompt_logprobs", 21}},
                          Json{{"messages", messages}, {"prompt_logprobs", 1}, {"stream", true}}}) {
    auto refused = ParseChat(bad);
    ASSERT_FALSE(refused.ok()) << bad.dump();
    EXPECT_TRUE(absl::StrContains(refused.status().message(), "prompt_logprobs"))
        << refused.status();
  }
}

TEST(OpenAiChatParseTest, OptionsReachTheTemplateAndTheChoices) {
  const ChatModel& m = SmallChatModel();
  const Json user = {{{"role", "user"}, {"content", "Hello"}}};
  auto r = ParseChat({{"messages", user},
                      {"add_generation_prompt", false},
                      {"max_completion_tokens", 7},
                      {"max_tokens", 99},  // the older name loses to max_completion_tokens
                      {"n", 3},
                      {"seed", 11},
                      {"temperature", 0.25},
                      {"logprobs", true},
                      {"top_logprobs", 4},
                      {"stop", "."},
                      {"stream", true},
                      {"stream_options", {{"include_usage", true}}}});
  ASSERT_TRUE(r.ok()) << r.status();
  ASSERT_EQ(r->choices.size(), 3u);
  EXPECT_TRUE(r->stream);
  EXPECT_TRUE(r->include_usage);
  EXPECT_EQ(r->logprobs, 4);
  EXPECT_EQ(r->stop, std::vector<std::string>{"."});
  const std::vector<int32_t> expected =
      m.tokenizer->Encode(LlamaPrompt({{"user", "Hello"}}, /*generation_prompt=*/false), false);
  for (const api::GenerateRequest& g : r->choices) {
    EXPECT_EQ(Ids(g), expected);
    EXPECT_EQ(g.max_tokens(), 7);
    EXPECT_FLOAT_EQ(g.temperature(), 0.25f);
    EXPECT_EQ(g.logprobs(), 4);
    ASSERT_TRUE(g.has_seed());
  }
  EXPECT_NE(r->choices[0].seed(), r->choices[1].seed()) << "n choices sample differently";
  // chat_template_kwargs are template variables (this template ignores unknown ones).
  auto kw = ParseChat({{"messages", user}, {"chat_template_kwargs", {{"enable_thinking", false}}}});
  ASSERT_TRUE(kw.ok()) << kw.status();
  EXPECT_EQ(Ids(kw->choices[0]), m.tokenizer->Encode(LlamaPrompt({{"user", "Hello"}}), false));
  // Neutral values of unsupported fields are accepted.
  auto neutral = ParseChat({{"messages", user},
                            {"tools", Json::array()},
                            {"tool_choice", "none"},
                            {"response_format", {{"type", "text"}}}});
  EXPECT_TRUE(neutral.ok()) << neutral.status();
}

TEST(OpenAiChatParseTest, RefusalsNameTheField) {
  const Json user = {{{"role", "user"}, {"content", "Hello"}}};
  auto refused = [&](Json body, const std::string& field) {
    if (!body.contains("messages")) body["messages"] = user;
    auto r = ParseChat(body);
    ASSERT_FALSE(r.ok()) << body.dump();
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument) << body.dump();
    EXPECT_TRUE(absl::StrContains(r.status().message(), field))
        << body.dump() << ": " << r.status();
  };
  refused({{"messages", Json::array()}}, "messages");
  refused({{"messages", "hi"}}, "messages");
  refused({{"messages", {{{"content", "no role"}}}}}, "messages[0]");
  refused({{"messages", {{{"role", "user"}, {"content", {{{"type", "image_url"}}}}}}}},
          "messages[0].content");
  refused({{"messages", {{{"role", "user"}, {"content", 5}}}}}, "messages[0].content");
  refused({{"tools", {{{"type", "function"}}}}}, "tools");
  refused({{"tool_choice", "required"}}, "tool_choice");
  refused({{"response_format", {{"type", "xml"}}}}, "response_format");
  refused({{"response_format", {{"type", "json_schema"}, {"json_schema", {{"name", "x"}}}}}},
          "response_format.json_schema.schema");
  refused({{"response_format",
            {{"type", "json_schema"},
             {"json_schema", {{"schema", {{"type", "string"}, {"pattern", "(a)\\1"}}}}}}}},
          "backreferences");
  refused({{"guided_json", 5}}, "guided_json");
  refused({{"guided_regex", "a(?=b)"}}, "guided_regex");
  refused({{"guided_regex", ""}}, "guided_regex");
  refused({{"guided_choice", Json::array()}}, "guided_choice");
  refused({{"guided_choice", {"a", 1}}}, "guided_choice");
  refused({{"guided_regex", "a"}, {"guided_json", {{"type", "object"}}}}, "both constrain");
  refused({{"guided_regex", "a"}, {"response_format", {{"type", "json_object"}}}},
          "'guided_regex' and response_format both");
  refused({{"structured_outputs", {{"regex", "a"}, {"choice", {"b"}}}}},
          "structured_outputs.choice");
  refused({{"structured_outputs", {{"regex", "a"}}}, {"guided_regex", "b"}},
          "structured_outputs.regex both");
  refused({{"structured_outputs", "a"}}, "structured_outputs");
  refused({{"structured_outputs", {{"grammar", "root ::= x"}}}}, "structured_outputs.grammar");
  refused({{"guided_regex", std::string(20000, 'a')}}, "longer than 16384 bytes");
  refused({{"modalities", {"text", "audio"}}}, "modalities");
  refused({{"continue_final_message", true}}, "continue_final_message");
  refused({{"top_logprobs", 2}}, "top_logprobs");  // without logprobs
  refused({{"logprobs", true}, {"top_logprobs", 100}}, "top_logprobs");
  refused({{"max_completion_tokens", 0}}, "max_completion_tokens");
  refused({{"chat_template_kwargs", {{"messages", 1}}}}, "chat_template_kwargs");
  refused({{"chat_template_kwargs", "x"}}, "chat_template_kwargs");
  // A body nested so deep that copying it would overflow the stack.
  Json deep = Json::array();
  for (int i = 0; i < 10000; ++i) deep = Json::array({std::move(deep)});
  refused({{"chat_template_kwargs", {{"x", deep}}}}, "deeper than 64");
  // A conversation past the context.
  refused({{"messages", {{{"role", "user"}, {"content", std::string(3000, 'x')}}}}}, "context");
  // Another model is NOT_FOUND.
  auto other = ParseChat({{"model", "gpt-4"}, {"messages", user}});
  EXPECT_EQ(other.status().code(), absl::StatusCode::kNotFound);
}

TEST(OpenAiChatParseTest, TheTemplatesRefusalIsTheClients) {
  auto format = engine::LoadChatFormatFiles(
      "", ScratchFile("strict.jinja",
                      "{% for m in messages %}{% if m.role == 'system' %}"
                      "{{ raise_exception('no system messages, please') }}"
                      "{% endif %}{{ m.content }}{% endfor %}"));
  ASSERT_TRUE(format.ok()) << format.status();
  const ChatModel& m = SmallChatModel();
  auto r = ParseChatRequest(Json{{"messages", {{{"role", "system"}, {"content", "x"}}}}}.dump(),
                            "m", 256, *format, *m.tokenizer);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(absl::StrContains(r.status().message(), "no system messages, please")) << r.status();
  // An empty render is an empty prompt.
  auto empty = ParseChatRequest(Json{{"messages", {{{"role", "user"}, {"content", ""}}}}}.dump(),
                                "m", 256, *format, *m.tokenizer);
  EXPECT_EQ(empty.status().code(), absl::StatusCode::kInvalidArgument);
}

const Json kTools = Json::array(
    {{{"type", "function"},
      {"function",
       {{"name", "get_weather"},
        {"description", "The weather in a city"},
        {"parameters", {{"type", "object"}, {"properties", {{"city", {{"type", "string"}}}}}}}}}},
     {{"type", "function"}, {"function", {{"name", "now"}}}}});

TEST(OpenAiChatParseTest, ToolsReachTheTemplateAndChooseTheParser) {
  auto format = engine::LoadChatFormatFiles(
      "", ScratchFile("tools.jinja",
                      "{% for t in tools %}{{ t.function.name }};{% endfor %}"
                      "{{ messages[0].content }}"));
  ASSERT_TRUE(format.ok()) << format.status();
  const ChatModel& m = SmallChatModel();
  auto parse = [&](Json body, ToolCallFormat f) {
    if (!body.contains("messages")) body["messages"] = {{{"role", "user"}, {"content", "hi"}}};
    return ParseChatRequest(body.dump(), "m", 256, *format, *m.tokenizer, f);
  };
  // tool_choice defaults to auto with tools: the replies are read in the front-end's format.
  auto r = parse({{"tools", kTools}}, ToolCallFormat::kHermes);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(Ids(r->choices[0]), m.tokenizer->Encode("get_weather;now;hi", false));
  EXPECT_EQ(r->tool_calls, ToolCallFormat::kHermes);
  EXPECT_TRUE(r->parallel_tool_calls);
  // "none": the template still sees the tools, the reply is text.
  r = parse({{"tools", kTools}, {"tool_choice", "none"}, {"parallel_tool_calls", false}},
            ToolCallFormat::kHermes);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(Ids(r->choices[0]), m.tokenizer->Encode("get_weather;now;hi", false));
  EXPECT_EQ(r->tool_calls, ToolCallFormat::kNone);
  EXPECT_FALSE(r->parallel_tool_calls);
  // Without tools there is nothing to parse.
  r = parse(Json::object(), ToolCallFormat::kLlama3Json);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->tool_calls, ToolCallFormat::kNone);

  auto refused = [&](Json body, ToolCallFormat f, const std::string& field) {
    auto r = parse(body, f);
    ASSERT_FALSE(r.ok()) << body.dump();
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_TRUE(absl::StrContains(r.status().message(), field)) << r.status();
  };
  // "required" and a named function constrain the reply to JSON calls, whatever the parser.
  r = parse({{"tools", kTools}, {"tool_choice", "required"}, {"parallel_tool_calls", false}},
            ToolCallFormat::kNone);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->tool_calls, ToolCallFormat::kJsonArray);
  const Json required = Json::parse(r->choices[0].json_schema());
  EXPECT_EQ(required["maxItems"], 1);
  EXPECT_EQ(required["items"]["anyOf"][0]["properties"]["name"]["const"], "get_weather");
  EXPECT_EQ(required["items"]["anyOf"][0]["properties"]["parameters"],
            kTools[0]["function"]["parameters"]);
  r = parse(
      {{"tools", kTools}, {"tool_choice", {{"type", "function"}, {"function", {{"name", "now"}}}}}},
      ToolCallFormat::kHermes);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->tool_calls, ToolCallFormat::kArguments);
  EXPECT_EQ(r->tool_function, "now");
  EXPECT_EQ(Json::parse(r->choices[0].json_schema()),
            Json({{"type", "object"}, {"properties", Json::object()}}));
  // response_format keeps the schema's property order (the order the reply writes them in).
  r = ParseChatRequest(
      R"({"messages": [{"role": "user", "content": "hi"}], "response_format": {"type":
          "json_schema", "json_schema": {"schema": {"properties": {"b": {}, "a": {}}}}}})",
      "", 0, *format, *m.tokenizer);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->choices[0].json_schema(), R"({"properties":{"b":{},"a":{}}})");
  // "required" over tools whose parameters use $defs: their $refs point where the parameters
  // now sit; parameters without a type are objects.
  const Json with_refs = {
      {{"type", "function"},
       {"function",
        {{"name", "f"},
         {"parameters",
          {{"$defs", {{"city", {{"enum", {"Oslo", "Paris"}}}}}},
           {"properties", {{"c", {{"$ref", "#/$defs/city"}}}}}}}}}},
      {{"type", "function"}, {"function", {{"name", "g"}, {"parameters", Json::object()}}}}};
  r = parse({{"tools", with_refs}, {"tool_choice", "required"}}, ToolCallFormat::kNone);
  ASSERT_TRUE(r.ok()) << r.status();
  const Json combined = Json::parse(r->choices[0].json_schema());
  EXPECT_EQ(combined["items"]["anyOf"][0]["properties"]["parameters"]["properties"]["c"]["$ref"],
            "#/items/anyOf/0/properties/parameters/$defs/city");
  EXPECT_EQ(combined["items"]["anyOf"][1]["properties"]["parameters"]["type"], "object");
  refused({{"tools",
            {{{"type", "function"},
              {"function", {{"name", "f"}, {"parameters", {{"type", "string"}}}}}}}},
           {"tool_choice", "required"}},
          ToolCallFormat::kNone, "must be an object schema");
  // auto needs a parser.
  refused({{"tools", kTools}}, ToolCallFormat::kNone, "--tool-call-parser");
  refused(
      {{"tools", kTools}, {"tool_choice", {{"type", "function"}, {"function", {{"name", "x"}}}}}},
      ToolCallFormat::kHermes, "which is not in tools");
  refused({{"tools", kTools}, {"tool_choice", {{"type", "function"}}}}, ToolCallFormat::kHermes,
          "tool_choice");
  refused({{"tools", kTools},
           {"tool_choice", "required"},
           {"response_format", {{"type", "json_object"}}}},
          ToolCallFormat::kHermes, "tool_choice");
  refused({{"tool_choice", "auto"}}, ToolCallFormat::kHermes, "tool_choice");
  refused({{"tools", {{{"type", "retrieval"}}}}}, ToolCallFormat::kHermes, "tools[0]");
  refused({{"tools", {kTools[0], {{"type", "function"}, {"function", {{"name", "a b"}}}}}}},
          ToolCallFormat::kHermes, "tools[1].function.name");
  refused({{"tools", {{{"type", "function"}, {"function", {{"name", "f"}, {"parameters", 1}}}}}}},
          ToolCallFormat::kHermes, "tools[0].function.parameters");
  refused({{"tools", "f"}}, ToolCallFormat::kHermes, "tools");
  refused({{"functions", {{{"name", "f"}}}}}, ToolCallFormat::kHermes, "functions");
}

// A Serving API that streams a scripted reply (pieces of text, then a Done with "stop"), so the
// HTTP server's reading of tool calls can be driven end to end.
class ScriptedServing final : public api::Serving::Service {
 public:
  std::vector<std::string> pieces;
  std::atomic<bool> reasoning_first{false};     // of the last request
  std::atomic<bool> skip_special_tokens{true};  // of the last request (unset: true)
  grpc::Status Generate(grpc::ServerContext*, const api::GenerateRequest* req,
                        grpc::ServerWriter<api::GenerateResponse>* writer) override {
    reasoning_first = req->reasoning_first();
    skip_special_tokens = !req->has_skip_special_tokens() || req->skip_special_tokens();
    for (size_t i = 0; i < pieces.size(); ++i) {
      api::GenerateResponse m;
      m.add_token_ids(static_cast<int32_t>(100 + i));
      m.set_text(pieces[i]);
      if (i + 1 == pieces.size()) {
        m.mutable_done()->set_finish_reason("stop");
        m.mutable_done()->set_prompt_tokens(req->prompt_token_ids_size());
        m.mutable_done()->set_completion_tokens(static_cast<int32_t>(pieces.size()));
      }
      writer->Write(m);
    }
    return grpc::Status::OK;
  }
};

// An HTTP server over a ScriptedServing that replies `pieces`, reading tool calls in `tools`
// and reasoning in `reasoning`.
class ScriptedHttp {
 public:
  ScriptedHttp(std::vector<std::string> pieces, ReasoningFormat reasoning,
               ToolCallFormat tools = ToolCallFormat::kHermes) {
    serving_.pieces = std::move(pieces);
    int grpc_port = 0;
    grpc::ServerBuilder builder;
    builder.AddListeningPort("127.0.0.1:0", grpc::InsecureServerCredentials(), &grpc_port);
    builder.RegisterService(&serving_);
    grpc_ = builder.BuildAndStart();
    EXPECT_TRUE(grpc_ && grpc_port > 0);
    const ChatModel& m = SmallChatModel();
    OpenAiHttpOptions o;
    o.grpc_target = absl::StrCat("127.0.0.1:", grpc_port);
    o.model = "m";
    o.max_context = 256;
    o.tokenizer = m.tokenizer.get();
    o.chat = &m.format;
    o.tool_call_format = tools;
    o.reasoning_format = reasoning;
    auto server = OpenAiHttpServer::Start(o);
    EXPECT_TRUE(server.ok()) << server.status();
    if (server.ok()) http_ = std::move(*server);
  }
  ~ScriptedHttp() {
    if (http_) http_->Stop();
    if (grpc_) grpc_->Shutdown();
  }
  void set_pieces(std::vector<std::string> pieces) { serving_.pieces = std::move(pieces); }
  bool reasoning_first() const { return serving_.reasoning_first; }
  bool skip_special_tokens() const { return serving_.skip_special_tokens; }
  // POST /v1/chat/completions with `body`.
  httplib::Result Chat(const Json& body) {
    httplib::Client client("127.0.0.1", http_ ? http_->port() : 1);
    client.set_read_timeout(30, 0);
    return client.Post("/v1/chat/completions", body.dump(), "application/json");
  }

 private:
  ScriptedServing serving_;
  std::unique_ptr<grpc::Server> grpc_;
  std::unique_ptr<OpenAiHttpServer> http_;
};

TEST(OpenAiToolCallsTest, RepliesToolCallsWholeAndStreamed) {
  ScriptedHttp scripted({"I will check.", " <tool", "_call>\n{\"name\": \"get_weather\", ",
                         "\"arguments\": {\"city\": \"Oslo\"}}\n</tool_call>",
                         "\n<tool_call>{\"name\": \"now\", \"arguments\": {}}</tool_call>"},
                        ReasoningFormat::kNone);
  Json request = {{"messages", {{{"role", "user"}, {"content", "Weather in Oslo?"}}}},
                  {"tools", kTools}};

  auto res = scripted.Chat(request);
  ASSERT_TRUE(res && res->status == 200) << (res ? res->body : "no answer");
  Json body = Json::parse(res->body);
  const Json& message = body["choices"][0]["message"];
  EXPECT_EQ(message["content"], "I will check. ");
  ASSERT_EQ(message["tool_calls"].size(), 2u) << body.dump();
  EXPECT_EQ(message["tool_calls"][0]["type"], "function");
  EXPECT_TRUE(absl::StartsWith(message["tool_calls"][0]["id"].get<std::string>(), "call_"));
  EXPECT_NE(message["tool_calls"][0]["id"], message["tool_calls"][1]["id"]);
  EXPECT_EQ(message["tool_calls"][0]["function"]["name"], "get_weather");
  EXPECT_EQ(message["tool_calls"][0]["function"]["arguments"], R"({"city":"Oslo"})");
  EXPECT_EQ(message["tool_calls"][1]["function"]["name"], "now");
  EXPECT_EQ(body["choices"][0]["finish_reason"], "tool_calls");

  // Streamed: the content as it is known not to be a call, then one delta per call, then the
  // finish.
  request["stream"] = true;
  res = scripted.Chat(request);
  ASSERT_TRUE(res && res->status == 200);
  std::string content;
  std::vector<Json> calls;
  std::string finish;
  for (const std::string& e : Events(res->body)) {
    if (e == "[DONE]") continue;
    const Json c = Json::parse(e)["choices"][0];
    EXPECT_TRUE(finish.empty()) << "nothing after the finish: " << e;
    if (c["delta"].contains("content")) {
      EXPECT_TRUE(calls.empty()) << "content after a call: " << e;
      content += c["delta"]["content"].get<std::string>();
    }
    if (c["delta"].contains("tool_calls")) calls.push_back(c["delta"]["tool_calls"][0]);
    if (!c["finish_reason"].is_null()) finish = c["finish_reason"];
  }
  EXPECT_EQ(content, "I will check. ");
  ASSERT_EQ(calls.size(), 2u);
  EXPECT_EQ(calls[0]["index"], 0);
  EXPECT_EQ(calls[1]["index"], 1);
  EXPECT_EQ(calls[0]["function"]["name"], "get_weather");
  EXPECT_EQ(calls[0]["function"]["arguments"], R"({"city":"Oslo"})");
  EXPECT_EQ(finish, "tool_calls");

  // parallel_tool_calls: false keeps the first call; tool_choice "none" leaves the text alone.
  request["stream"] = false;
  request["parallel_tool_calls"] = false;
  res = scripted.Chat(request);
  ASSERT_TRUE(res && res->status == 200);
  body = Json::parse(res->body);
  EXPECT_EQ(body["choices"][0]["message"]["tool_calls"].size(), 1u);
  request["tool_choice"] = "none";
  res = scripted.Chat(request);
  ASSERT_TRUE(res && res->status == 200);
  body = Json::parse(res->body);
  EXPECT_FALSE(body["choices"][0]["message"].contains("tool_calls"));
  EXPECT_TRUE(absl::StrContains(body["choices"][0]["message"]["content"].get<std::string>(),
                                "<tool_call>"));
  EXPECT_EQ(body["choices"][0]["finish_reason"], "stop");
}

// --tool-call-parser mistral: the request asks for special tokens kept (its markers are), the
// calls come back with ids of 9 letters and digits (Mistral's templates refuse others) or the
// model's own, whole and streamed.
TEST(OpenAiToolCallsTest, MistralCallsKeepTheMarkersAndUseMistralIds) {
  ScriptedHttp scripted({"Sure.", "[TOOL", "_CALLS]get_weather[ARGS]{\"city\": ", "\"Oslo\"}",
                         "[TOOL_CALLS]now[CALL_ID]Q1w2E3r4T[ARGS]{}"},
                        ReasoningFormat::kNone, ToolCallFormat::kMistral);
  Json request = {{"messages", {{{"role", "user"}, {"content", "Weather in Oslo?"}}}},
                  {"tools", kTools}};
  const auto mistral_id = [](const Json& id) {
    const std::string s = id.get<std::string>();
    return s.size() == 9 && std::all_of(s.begin(), s.end(), absl::ascii_isalnum);
  };
  for (const bool stream : {false, true}) {
    request["stream"] = stream;
    auto res = scripted.Chat(request);
    ASSERT_TRUE(res && res->status == 200) << (res ? res->body : "no answer");
    EXPECT_FALSE(scripted.skip_special_tokens());
    std::string content;
    std::vector<Json> calls;
    if (!stream) {
      const Json message = Json::parse(res->body)["choices"][0]["message"];
      content = message["content"];
      for (const Json& c : message["tool_calls"]) calls.push_back(c);
    } else {
      for (const std::string& e : Events(res->body)) {
        if (e == "[DONE]") continue;
        const Json d = Json::parse(e)["choices"][0]["delta"];
        if (d.contains("content")) content += d["content"].get<std::string>();
        if (d.contains("tool_calls")) calls.push_back(d["tool_calls"][0]);
      }
    }
    EXPECT_EQ(content, "Sure.");
    ASSERT_EQ(calls.size(), 2u) << res->body;
    EXPECT_EQ(calls[0]["function"]["name"], "get_weather");
    EXPECT_EQ(calls[0]["function"]["arguments"], R"({"city":"Oslo"})");
    EXPECT_TRUE(mistral_id(calls[0]["id"])) << calls[0];
    EXPECT_EQ(calls[1]["id"], "Q1w2E3r4T");
  }
  // Without tools the request keeps the default (special tokens left out).
  auto res = scripted.Chat({{"messages", {{{"role", "user"}, {"content", "Hi"}}}}});
  ASSERT_TRUE(res && res->status == 200);
  EXPECT_TRUE(scripted.skip_special_tokens());
}

// --tool-call-parser pythonic: a reply that is a Python list of calls comes back as tool_calls
// with JSON arguments, whole and streamed (no content goes out ahead of them).
TEST(OpenAiToolCallsTest, PythonicCallsComeBackAsToolCalls) {
  ScriptedHttp scripted({" [get_weather(city=", "'Oslo', days=3), ", "now()]"},
                        ReasoningFormat::kNone, ToolCallFormat::kPythonic);
  Json request = {{"messages", {{{"role", "user"}, {"content", "Weather in Oslo?"}}}},
                  {"tools", kTools}};
  auto res = scripted.Chat(request);
  ASSERT_TRUE(res && res->status == 200) << (res ? res->body : "no answer");
  const Json body = Json::parse(res->body);
  const Json& message = body["choices"][0]["message"];
  EXPECT_TRUE(message["content"].is_null()) << body.dump();
  ASSERT_EQ(message["tool_calls"].size(), 2u) << body.dump();
  EXPECT_EQ(message["tool_calls"][0]["function"]["name"], "get_weather");
  EXPECT_EQ(message["tool_calls"][0]["function"]["arguments"], R"({"city":"Oslo","days":3})");
  EXPECT_EQ(message["tool_calls"][1]["function"]["arguments"], "{}");
  EXPECT_EQ(body["choices"][0]["finish_reason"], "tool_calls");

  request["stream"] = true;
  res = scripted.Chat(request);
  ASSERT_TRUE(res && res->status == 200);
  std::vector<std::string> names;
  std::string finish;
  for (const std::string& e : Events(res->body)) {
    if (e == "[DONE]") continue;
    const Json c = Json::parse(e)["choices"][0];
    EXPECT_TRUE(!c["delta"].contains("content") || c["delta"]["content"] == "") << e;
    if (c["delta"].contains("tool_calls")) {
      names.push_back(c["delta"]["tool_calls"][0]["function"]["name"]);
    }
    if (!c["finish_reason"].is_null()) finish = c["finish_reason"];
  }
  EXPECT_EQ(names, (std::vector<std::string>{"get_weather", "now"}));
  EXPECT_EQ(finish, "tool_calls");
}

// Where a constrained reply's reasoning is, from the prompt's end: opened there (inside),
// closed there (no reasoning: the constraint applies from the start), or neither (the reply
// may open it); and nothing for a tokenizer without </think> as one token.
TEST(OpenAiToolCallsTest, TheReasoningGateFollowsThePrompt) {
  const engine::Tokenizer& tok = *SmallChatModel().tokenizer;
  const int32_t open = *tok.TokenToId("<think>"), close = *tok.TokenToId("</think>");
  std::vector<int32_t> prompt = tok.Encode("Hello there", false);
  auto gate = FindReasoningGate(tok, prompt);
  ASSERT_TRUE(gate.has_value());
  EXPECT_EQ(gate->open, open);
  EXPECT_EQ(gate->end, close);
  EXPECT_FALSE(gate->inside);
  prompt.push_back(open);
  for (int32_t id : tok.Encode("\n", false)) prompt.push_back(id);
  gate = FindReasoningGate(tok, prompt);
  ASSERT_TRUE(gate.has_value());
  EXPECT_TRUE(gate->inside);
  prompt.push_back(close);
  for (int32_t id : tok.Encode("\n\n", false)) prompt.push_back(id);
  EXPECT_FALSE(FindReasoningGate(tok, prompt).has_value());
  auto plain = engine::Tokenizer::FromJson(
      R"({"model": {"type": "BPE", "vocab": {"a": 0}, "merges": []}})", "a test");
  ASSERT_TRUE(plain.ok()) << plain.status();
  EXPECT_FALSE(FindReasoningGate(**plain, {0}).has_value());
}

// Under --reasoning-parser, a constrained reply (response_format) may reason first: the
// request asks for it (GenerateRequest.reasoning_first, the tokenizer having </think>), and
// the reply is split where the constraint began: a reply without <think> is all content (even
// under deepseek_r1, whose template would have opened it in the prompt), one with it has its
// reasoning apart. Forced tool calls do not reason.
TEST(OpenAiToolCallsTest, ConstrainedRepliesMayReasonFirst) {
  ScriptedHttp scripted({"{\"a\": ", "1}"}, ReasoningFormat::kDeepSeekR1);
  const Json request = {{"messages", {{{"role", "user"}, {"content", "JSON?"}}}},
                        {"response_format", {{"type", "json_object"}}}};
  auto res = scripted.Chat(request);
  ASSERT_TRUE(res && res->status == 200) << (res ? res->body : "no answer");
  Json body = Json::parse(res->body);
  EXPECT_EQ(body["choices"][0]["message"]["content"], "{\"a\": 1}") << body.dump();
  EXPECT_TRUE(body["choices"][0]["message"]["reasoning_content"].is_null()) << body.dump();
  EXPECT_TRUE(scripted.reasoning_first());

  scripted.set_pieces({"<think>", "Keys first.", "</think>", "\n{\"a\": ", "1}"});
  res = scripted.Chat(request);
  ASSERT_TRUE(res && res->status == 200) << (res ? res->body : "no answer");
  body = Json::parse(res->body);
  EXPECT_EQ(body["choices"][0]["message"]["reasoning_content"], "Keys first.") << body.dump();
  EXPECT_EQ(body["choices"][0]["message"]["content"], "\n{\"a\": 1}") << body.dump();

  scripted.set_pieces({"{}"});
  res = scripted.Chat({{"messages", {{{"role", "user"}, {"content", "Time?"}}}},
                       {"tools", kTools},
                       {"tool_choice", {{"type", "function"}, {"function", {{"name", "now"}}}}}});
  ASSERT_TRUE(res && res->status == 200) << (res ? res->body : "no answer");
  EXPECT_FALSE(scripted.reasoning_first());
}

// --reasoning-parser qwen3 with --tool-call-parser hermes: the reasoning is reasoning_content,
// whole and streamed, and the tool call after it is still read.
TEST(OpenAiToolCallsTest, ReasoningComesApartFromContentAndCalls) {
  ScriptedHttp scripted({"<think>\nCheck the", " weather.\n</thi", "nk>\n\nLet me call.",
                         "<tool_call>{\"name\": \"now\", \"arguments\": {}}</tool_call>"},
                        ReasoningFormat::kQwen3);
  Json request = {{"messages", {{{"role", "user"}, {"content", "Time?"}}}}, {"tools", kTools}};
  auto res = scripted.Chat(request);
  ASSERT_TRUE(res && res->status == 200) << (res ? res->body : "no answer");
  const Json message = Json::parse(res->body)["choices"][0]["message"];
  EXPECT_EQ(message["reasoning_content"], "\nCheck the weather.\n");
  EXPECT_EQ(message["content"], "\n\nLet me call.");
  ASSERT_EQ(message["tool_calls"].size(), 1u);
  EXPECT_EQ(message["tool_calls"][0]["function"]["name"], "now");

  request["stream"] = true;
  res = scripted.Chat(request);
  ASSERT_TRUE(res && res->status == 200);
  std::string reasoning, content;
  int calls = 0;
  for (const std::string& e : Events(res->body)) {
    if (e == "[DONE]") continue;
    const Json delta = Json::parse(e)["choices"][0]["delta"];
    if (delta.contains("reasoning_content")) {
      EXPECT_TRUE(content.empty()) << "reasoning after content: " << e;
      reasoning += delta["reasoning_content"].get<std::string>();
    }
    if (delta.contains("content")) content += delta["content"].get<std::string>();
    calls += delta.contains("tool_calls") ? 1 : 0;
  }
  EXPECT_EQ(reasoning, "\nCheck the weather.\n");
  EXPECT_EQ(content, "\n\nLet me call.");
  EXPECT_EQ(calls, 1);
}

class OpenAiHttpTest : public ::testing::Test {
 protected:
  void SetUp() override { Start({}); }

  void Start(FrontendOptions o) {
    if (o.model_dir.empty()) o.model_dir = ModelDir();
    o.health_period = absl::Milliseconds(50);
    o.http_port = 0;
    auto frontend = Frontend::Start(o);
    ASSERT_TRUE(frontend.ok()) << frontend.status();
    frontend_ = std::move(*frontend);
    WorkerOptions wo;
    wo.frontend = frontend_->address();
    wo.token_vocabulary = engine::TokenVocabulary::FromTokenizer(
        *SmallChatModel().tokenizer, testing::SmallTestConfig().eos_token_ids);
    wo.id = "p0";
    prefill_ = StartWorker(InstanceRole::kPrefill, wo);
    wo.id = "d0";
    wo.engine.speculative.num_tokens = decode_drafts_;
    wo.engine.speculative.ngram_min = 1;
    wo.engine.speculative.choice = engine::DraftChoice::kAll;  // the same drafts in every run
    decode_ = StartWorker(InstanceRole::kDecode, wo);
    ASSERT_TRUE(prefill_ && decode_);
    stub_ = api::Serving::NewStub(
        grpc::CreateChannel(frontend_->address(), grpc::InsecureChannelCredentials()));
    http_ = std::make_unique<httplib::Client>("127.0.0.1", frontend_->http_port());
    http_->set_read_timeout(60, 0);
    ASSERT_TRUE(PollUntil([&] { return http_->Get("/health"); },
                          [](const httplib::Result& r) { return r && r->status == 200; },
                          absl::Seconds(20)))
        << "the cluster did not become ready";
  }
  void TearDown() override {
    http_.reset();
    if (frontend_) frontend_->Shutdown();
    frontend_.reset();
  }
  // Speculative decoding on the decode worker (Start): drafts per step, 0 for none.
  int32_t decode_drafts_ = 0;

  // POST /v1/completions (or `path`); the status and the parsed body (null when not JSON).
  std::pair<int, Json> Complete(const Json& body, const char* path = "/v1/completions") {
    auto res = http_->Post(path, body.dump(), "application/json");
    if (!res) return {-1, nullptr};
    return {res->status, Json::parse(res->body, nullptr, false)};
  }
  // The same streamed: the status and the event payloads.
  // A gRPC Generate call's text and finish reason (empty when it failed).
  std::pair<std::string, std::string> GenerateText(const api::GenerateRequest& r) {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
    auto call = stub_->Generate(&ctx, r);
    api::GenerateResponse m;
    std::string text, finish;
    while (call->Read(&m)) {
      text += m.text();
      if (m.has_done()) finish = m.done().finish_reason();
    }
    const grpc::Status s = call->Finish();
    EXPECT_TRUE(s.ok()) << s.error_message();
    return {text, s.ok() ? finish : ""};
  }
  std::pair<int, std::vector<std::string>> Stream(Json body, const char* path = "/v1/completions") {
    body["stream"] = true;
    auto res = http_->Post(path, body.dump(), "application/json");
    if (!res) return {-1, {}};
    EXPECT_TRUE(res->status != 200 ||
                absl::StartsWith(res->get_header_value("Content-Type"), "text/event-stream"));
    return {res->status, Events(res->body)};
  }
  // The gRPC API's greedy tokens and text for the same prompt.
  api::GenerateResponse Grpc(const std::string& prompt, int max_tokens) {
    api::GenerateRequest r;
    r.set_prompt_text(prompt);
    r.set_max_tokens(max_tokens);
    r.set_ignore_eos(true);
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
    auto call = stub_->Generate(&ctx, r);
    api::GenerateResponse all, m;
    while (call->Read(&m)) {
      all.mutable_token_ids()->MergeFrom(m.token_ids());
      all.mutable_text()->append(m.text());
      if (m.has_done()) *all.mutable_done() = m.done();
    }
    EXPECT_TRUE(call->Finish().ok());
    return all;
  }
  // Waits until nothing is in flight and `n` requests were cancelled.
  bool EndedCancelled(int n) {
    return PollUntil([&] { return Status(); },
                     [n](const api::ClusterStatus& s) {
                       return s.requests_in_flight() == 0 && s.requests_cancelled() == n;
                     },
                     absl::Seconds(20));
  }
  api::ClusterStatus Status() {
    grpc::ClientContext ctx;
    api::ClusterStatus s;
    EXPECT_TRUE(stub_->GetClusterStatus(&ctx, api::ClusterStatusRequest(), &s).ok());
    return s;
  }

  std::unique_ptr<Frontend> frontend_;
  std::unique_ptr<TestWorker> prefill_, decode_;
  std::unique_ptr<api::Serving::Stub> stub_;
  std::unique_ptr<httplib::Client> http_;
};

constexpr char kPrompt[] = "The quick brown fox jumps over the lazy dog";

TEST_F(OpenAiHttpTest, CompletionEqualsTheGrpcApisAndStreamsTheSameText) {
  const api::GenerateResponse expected = Grpc(kPrompt, 24);
  ASSERT_EQ(expected.token_ids_size(), 24);
  const std::string model = Status().model();
  const Json request = {{"model", model},
                        {"prompt", kPrompt},
                        {"max_tokens", 24},
                        {"temperature", 0},
                        {"ignore_eos", true}};
  auto [status, body] = Complete(request);
  ASSERT_EQ(status, 200) << body.dump();
  EXPECT_EQ(body["object"], "text_completion");
  EXPECT_TRUE(absl::StartsWith(body["id"].get<std::string>(), "cmpl-"));
  EXPECT_EQ(body["model"], model);
  ASSERT_EQ(body["choices"].size(), 1u);
  EXPECT_EQ(body["choices"][0]["text"], expected.text());
  EXPECT_EQ(body["choices"][0]["finish_reason"], "length");
  EXPECT_TRUE(body["choices"][0]["logprobs"].is_null());
  EXPECT_EQ(body["usage"]["prompt_tokens"], expected.done().prompt_tokens());
  EXPECT_EQ(body["usage"]["completion_tokens"], 24);
  EXPECT_EQ(body["usage"]["total_tokens"], expected.done().prompt_tokens() + 24);
  // The second run of the prompt found its blocks cached on the prefill worker.
  EXPECT_GT(body["usage"]["prompt_tokens_details"]["cached_tokens"], 0);

  Json streamed = request;
  streamed["stream_options"] = {{"include_usage", true}};
  auto [s2, events] = Stream(streamed);
  ASSERT_EQ(s2, 200);
  ASSERT_GE(events.size(), 3u);
  EXPECT_EQ(events.back(), "[DONE]");
  std::string text;
  int finishes = 0;
  for (size_t i = 0; i + 2 < events.size(); ++i) {
    const Json chunk = Json::parse(events[i]);
    ASSERT_EQ(chunk["choices"].size(), 1u) << events[i];
    text += chunk["choices"][0]["text"].get<std::string>();
    if (!chunk["choices"][0]["finish_reason"].is_null()) {
      ++finishes;
      EXPECT_EQ(chunk["choices"][0]["finish_reason"], "length");
      EXPECT_EQ(i + 3, events.size()) << "the finish is the last choice chunk";
    }
  }
  EXPECT_EQ(text, expected.text());
  EXPECT_EQ(finishes, 1);
  const Json usage = Json::parse(events[events.size() - 2]);
  EXPECT_TRUE(usage["choices"].empty());
  EXPECT_EQ(usage["usage"]["completion_tokens"], 24);
}

// echo: the text starts with the prompt; with logprobs, so do the logprobs (the prompt's
// first token null). A prompt token's logprob (from the prefill's rows) equals the logprob the
// same token had when it was the greedy reply to the tokens before it (from the last row).
TEST_F(OpenAiHttpTest, EchoReturnsThePromptAndItsLogprobs) {
  auto tok = engine::Tokenizer::Load(ModelDir() + "/tokenizer.json");
  ASSERT_TRUE(tok.ok()) << tok.status();
  const std::vector<int32_t> ids = (*tok)->Encode(kPrompt);
  const Json base = {{"max_tokens", 4}, {"temperature", 0}, {"ignore_eos", true}};
  Json plain = base, echoed = base;
  plain["prompt"] = kPrompt;
  plain["logprobs"] = 2;
  echoed["prompt"] = kPrompt;
  echoed["echo"] = true;
  auto [s1, reply] = Complete(plain);
  auto [s2, echo_text] = Complete(echoed);
  ASSERT_EQ(s1, 200) << reply.dump();
  ASSERT_EQ(s2, 200) << echo_text.dump();
  const std::string completion = reply["choices"][0]["text"];
  EXPECT_EQ(echo_text["choices"][0]["text"], kPrompt + completion);
  EXPECT_TRUE(echo_text["choices"][0]["logprobs"].is_null());

  echoed["logprobs"] = 2;
  auto [s3, body] = Complete(echoed);
  ASSERT_EQ(s3, 200) << body.dump();
  const Json& lp = body["choices"][0]["logprobs"];
  EXPECT_EQ(body["choices"][0]["text"], kPrompt + completion);
  ASSERT_EQ(lp["tokens"].size(), ids.size() + 4) << lp.dump();
  EXPECT_EQ(lp["tokens"][1], (*tok)->Decode(std::vector<int32_t>{ids[1]}));
  EXPECT_TRUE(lp["token_logprobs"][0].is_null());
  EXPECT_TRUE(lp["top_logprobs"][0].is_null());
  for (size_t i = 1; i < ids.size(); ++i) {
    EXPECT_LE(lp["token_logprobs"][i].get<double>(), 0.0) << i;
    // (Alternatives whose texts are the same, such as two partial characters, share a key.)
    EXPECT_TRUE(lp["top_logprobs"][i].size() == 2u || lp["top_logprobs"][i].size() == 1u) << i;
    EXPECT_GE(lp["text_offset"][i], lp["text_offset"][i - 1]) << i;
  }
  for (size_t k = 0; k < 4; ++k) {  // the reply's entries as without echo
    EXPECT_NEAR(lp["token_logprobs"][ids.size() + k].get<double>(),
                reply["choices"][0]["logprobs"]["token_logprobs"][k].get<double>(), 1e-5);
  }
  // The reply's first token (its id from the gRPC API), as a prompt token of a longer prompt,
  // has the same logprob.
  api::GenerateRequest g;
  *g.mutable_prompt_token_ids() = {ids.begin(), ids.end()};
  g.set_max_tokens(1);
  g.set_logprobs(0);
  g.set_ignore_eos(true);
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
  auto call = stub_->Generate(&ctx, g);
  api::GenerateResponse first;
  std::vector<int32_t> longer = ids;
  float first_logprob = 0;
  while (call->Read(&first)) {
    if (first.token_ids_size() > 0) {
      longer.push_back(first.token_ids(0));
      first_logprob = first.logprobs(0).logprob();
    }
  }
  ASSERT_TRUE(call->Finish().ok());
  ASSERT_EQ(longer.size(), ids.size() + 1);
  EXPECT_NEAR(first_logprob, reply["choices"][0]["logprobs"]["token_logprobs"][0].get<double>(),
              1e-5);
  echoed["prompt"] = longer;
  auto [s4, extended] = Complete(echoed);
  ASSERT_EQ(s4, 200) << extended.dump();
  EXPECT_TRUE(
      absl::StartsWith(extended["choices"][0]["text"].get<std::string>(), (*tok)->Decode(longer)));
  EXPECT_NEAR(extended["choices"][0]["logprobs"]["token_logprobs"][ids.size()].get<double>(),
              first_logprob, 2e-4);

  // vLLM's prompt_logprobs beside it: per position the prompt token's entry (the same logprob)
  // and the top 3, by token id; on the response in chat; not streamed.
  echoed["prompt"] = kPrompt;
  echoed["prompt_logprobs"] = 3;
  auto [s7, vllm] = Complete(echoed);
  ASSERT_EQ(s7, 200) << vllm.dump();
  const Json& plp = vllm["choices"][0]["prompt_logprobs"];
  ASSERT_EQ(plp.size(), ids.size()) << vllm.dump();
  EXPECT_TRUE(plp[0].is_null());
  for (size_t i = 1; i < ids.size(); ++i) {
    const Json& at = plp[i];
    ASSERT_TRUE(at.contains(std::to_string(ids[i]))) << at.dump();
    const Json& mine = at[std::to_string(ids[i])];
    EXPECT_NEAR(mine["logprob"].get<double>(), lp["token_logprobs"][i].get<double>(), 1e-4);
    EXPECT_GE(mine["rank"].get<int>(), 1);
    EXPECT_EQ(mine["decoded_token"], (*tok)->Decode(std::vector<int32_t>{ids[i]}));
    EXPECT_GE(at.size(), 3u);
    EXPECT_LE(at.size(), 4u);
    // Echo's alternatives stay at logprobs = 2.
    EXPECT_LE(vllm["choices"][0]["logprobs"]["top_logprobs"][i].size(), 2u);
  }
  echoed.erase("prompt_logprobs");
  Json chat_plp = {{"messages", {{{"role", "user"}, {"content", "Hi"}}}},
                   {"max_tokens", 2},
                   {"prompt_logprobs", 0}};
  auto [s8, chatted] = Complete(chat_plp, "/v1/chat/completions");
  ASSERT_EQ(s8, 200) << chatted.dump();
  ASSERT_EQ(chatted["prompt_logprobs"].size(), chatted["usage"]["prompt_tokens"].get<size_t>());
  EXPECT_EQ(chatted["prompt_logprobs"][1].size(), 1u);  // k = 0: the prompt token's alone
  chat_plp["stream"] = true;
  EXPECT_EQ(Complete(chat_plp, "/v1/chat/completions").first, 400);

  // n = 2: each choice starts with the prompt and its logprobs.
  echoed["prompt"] = kPrompt;
  echoed["n"] = 2;
  auto [s6, two] = Complete(echoed);
  ASSERT_EQ(s6, 200) << two.dump();
  ASSERT_EQ(two["choices"].size(), 2u);
  for (const Json& c : two["choices"]) {
    EXPECT_EQ(c["text"], kPrompt + completion);
    EXPECT_EQ(c["logprobs"]["tokens"].size(), ids.size() + 4);
    EXPECT_NEAR(c["logprobs"]["token_logprobs"][1].get<double>(),
                lp["token_logprobs"][1].get<double>(), 1e-4);
  }
  echoed.erase("n");

  // Streamed: the same text, the prompt first.
  auto [s5, events] = Stream(echoed);
  ASSERT_EQ(s5, 200);
  std::string streamed;
  size_t entries = 0;
  for (const std::string& e : events) {
    if (e == "[DONE]") continue;
    const Json c = Json::parse(e)["choices"][0];
    streamed += c["text"].get<std::string>();
    if (!c["logprobs"].is_null()) entries += c["logprobs"]["tokens"].size();
  }
  EXPECT_TRUE(absl::StartsWith(Json::parse(events.at(0))["choices"][0]["text"].get<std::string>(),
                               kPrompt));
  EXPECT_EQ(streamed, kPrompt + completion);
  EXPECT_EQ(entries, ids.size() + 4);
}

// truncate_prompt_tokens keeps the prompt's last tokens: a text prompt so cut gives what its
// last tokens give as the prompt; a token prompt longer than the context is accepted; a chat
// prompt is cut the same way.
TEST_F(OpenAiHttpTest, TruncatePromptTokensKeepsThePromptsEnd) {
  auto tok = engine::Tokenizer::Load(ModelDir() + "/tokenizer.json");
  ASSERT_TRUE(tok.ok()) << tok.status();
  const std::vector<int32_t> ids = (*tok)->Encode(kPrompt);
  ASSERT_GT(ids.size(), 4u);
  const Json base = {{"max_tokens", 8}, {"temperature", 0}, {"ignore_eos", true}};
  Json tail = base, cut = base, long_ids = base;
  tail["prompt"] = std::vector<int32_t>(ids.end() - 4, ids.end());
  cut["prompt"] = kPrompt;
  cut["truncate_prompt_tokens"] = 4;
  long_ids["prompt"] = std::vector<int32_t>(3000, ids.back());
  long_ids["truncate_prompt_tokens"] = 4;
  auto [s1, want] = Complete(tail);
  auto [s2, got] = Complete(cut);
  auto [s3, from_long] = Complete(long_ids);
  ASSERT_EQ(s1, 200) << want.dump();
  ASSERT_EQ(s2, 200) << got.dump();
  ASSERT_EQ(s3, 200) << from_long.dump();
  EXPECT_EQ(got["choices"][0]["text"], want["choices"][0]["text"]);
  EXPECT_EQ(got["usage"]["prompt_tokens"], 4);
  EXPECT_EQ(from_long["usage"]["prompt_tokens"], 4);
  long_ids.erase("truncate_prompt_tokens");  // without it, too long
  EXPECT_EQ(Complete(long_ids).first, 400);
  cut["truncate_prompt_tokens"] = 0;
  EXPECT_EQ(Complete(cut).first, 400);

  Json chat = base;
  chat["messages"] = {{{"role", "user"}, {"content", "Tell me about the weather in Oslo."}}};
  chat["truncate_prompt_tokens"] = 5;
  auto [s4, chatted] = Complete(chat, "/v1/chat/completions");
  ASSERT_EQ(s4, 200) << chatted.dump();
  EXPECT_EQ(chatted["usage"]["prompt_tokens"], 5);
}

TEST_F(OpenAiHttpTest, SeveralPromptsAndChoicesWithLogprobs) {
  const Json request = {{"prompt", {{10, 11, 12, 13}, {20, 21}}},
                        {"n", 2},
                        {"max_tokens", 5},
                        {"seed", 7},
                        {"logprobs", 2},
                        {"ignore_eos", true}};
  auto [status, body] = Complete(request);
  ASSERT_EQ(status, 200) << body.dump();
  ASSERT_EQ(body["choices"].size(), 4u);
  for (int i = 0; i < 4; ++i) {
    const Json& c = body["choices"][i];
    EXPECT_EQ(c["index"], i);
    EXPECT_EQ(c["finish_reason"], "length");
    const Json& lp = c["logprobs"];
    ASSERT_EQ(lp["tokens"].size(), 5u) << c.dump();
    ASSERT_EQ(lp["token_logprobs"].size(), 5u);
    ASSERT_EQ(lp["top_logprobs"].size(), 5u);
    ASSERT_EQ(lp["text_offset"].size(), 5u);
    for (int t = 0; t < 5; ++t) {
      EXPECT_LE(lp["token_logprobs"][t].get<double>(), 0.0);
      EXPECT_GE(lp["top_logprobs"][t].size(), 1u);
      EXPECT_LE(lp["top_logprobs"][t].size(), 2u);
    }
  }
  // A prompt's prompt tokens count once (4 + 2), every choice's completion tokens.
  EXPECT_EQ(body["usage"]["prompt_tokens"], 6);
  EXPECT_EQ(body["usage"]["completion_tokens"], 20);
  // Seeded: the same request gives the same choices.
  auto [again_status, again] = Complete(request);
  ASSERT_EQ(again_status, 200);
  for (int i = 0; i < 4; ++i) EXPECT_EQ(again["choices"][i]["text"], body["choices"][i]["text"]);
  // Streamed: each choice's chunks carry its index and add up to its text.
  auto [s2, events] = Stream(request);
  ASSERT_EQ(s2, 200);
  std::vector<std::string> texts(4);
  for (const std::string& e : events) {
    if (e == "[DONE]") continue;
    const Json chunk = Json::parse(e);
    ASSERT_EQ(chunk["choices"].size(), 1u);
    texts[chunk["choices"][0]["index"].get<int>()] += chunk["choices"][0]["text"];
  }
  for (int i = 0; i < 4; ++i) EXPECT_EQ(texts[i], body["choices"][i]["text"]) << i;
}

// With speculative decoding on the decode worker, several tokens of a request come from one
// step: completions (stop sequences from the middle of the text, logprobs, streamed or not)
// and chats give what they give without it.
TEST_F(OpenAiHttpTest, SpeculativeDecodingGivesTheSameReplies) {
  const std::string twice = std::string(kPrompt) + kPrompt;
  const std::string full = Grpc(twice, 48).text();
  ASSERT_GT(full.size(), 12u);
  std::vector<Json> requests;
  for (const size_t at : {full.size() / 3, full.size() / 2}) {
    size_t a = at, e = at + 2;
    while (a > 0 && (static_cast<unsigned char>(full[a]) & 0xC0) == 0x80) --a;
    while (e < full.size() && (static_cast<unsigned char>(full[e]) & 0xC0) == 0x80) ++e;
    requests.push_back({{"prompt", twice},
                        {"max_tokens", 48},
                        {"temperature", 0},
                        {"ignore_eos", true},
                        {"logprobs", 2},
                        {"stop", {full.substr(a, e - a)}}});
  }
  for (int n : {1, 2, 3}) {  // the model's own greedy text again and again: long loops
    std::string prompt = twice;
    for (int i = 0; i < n; ++i) prompt += full;
    requests.push_back(
        {{"prompt", prompt}, {"max_tokens", 64}, {"temperature", 0}, {"ignore_eos", true}});
  }
  requests.push_back({{"prompt", twice + kPrompt},
                      {"max_tokens", 40},
                      {"temperature", 0.8},
                      {"seed", 3},
                      {"frequency_penalty", 0.5}});
  auto replies = [&] {
    std::vector<std::string> out;
    for (const Json& r : requests) {
      auto [status, body] = Complete(r);
      EXPECT_EQ(status, 200) << body.dump();
      Json c = body["choices"][0];
      // Logprobs to 3 decimals: the first token's prefill may or may not start from cached
      // K/V, which moves the last bits.
      std::string logprobs;
      if (c["logprobs"].is_object()) {
        for (const Json& lp : c["logprobs"]["token_logprobs"]) {
          absl::StrAppend(&logprobs, absl::StrFormat("%.3f,", lp.get<double>()));
        }
      }
      out.push_back(c["text"].get<std::string>() + "|" + c["finish_reason"].get<std::string>() +
                    "|" + body["usage"]["completion_tokens"].dump() + "|" + logprobs);
      auto [s2, events] = Stream(r);
      std::string text;
      for (const std::string& e : events) {
        if (e != "[DONE]") text += Json::parse(e)["choices"][0]["text"].get<std::string>();
      }
      EXPECT_EQ(text, c["text"].get<std::string>());
    }
    return out;
  };
  const std::vector<std::string> want = replies();
  TearDown();
  decode_drafts_ = 4;
  Start({});
  EXPECT_EQ(replies(), want);
  int64_t drafts = 0, kept = 0;
  const api::ClusterStatus status = Status();
  for (const auto& inst : status.instances()) {
    drafts += inst.spec_draft_tokens();
    kept += inst.spec_accepted_tokens();
  }
  EXPECT_GT(drafts, 0);
  EXPECT_GT(kept, 0);
}

TEST_F(OpenAiHttpTest, StopSequencesCutTheTextAndEndTheChoice) {
  const std::string full = Grpc(kPrompt, 40).text();
  // A stop sequence from the middle of the greedy text (whole UTF-8 characters).
  size_t at = full.size() / 2;
  while (at < full.size() && (static_cast<unsigned char>(full[at]) & 0xC0) == 0x80) ++at;
  size_t end = at + 1;
  while (end < full.size() &&
         (end - at < 2 || (static_cast<unsigned char>(full[end]) & 0xC0) == 0x80)) {
    ++end;
  }
  ASSERT_LT(end, full.size()) << "the greedy text is too short: " << full;
  const std::string stop = full.substr(at, end - at);
  const std::string expected = full.substr(0, full.find(stop));
  const Json request = {{"prompt", kPrompt},
                        {"max_tokens", 40},
                        {"temperature", 0},
                        {"ignore_eos", true},
                        {"stop", {stop, "\x01never"}}};
  auto [status, body] = Complete(request);
  ASSERT_EQ(status, 200) << body.dump();
  EXPECT_EQ(body["choices"][0]["text"], expected);
  EXPECT_EQ(body["choices"][0]["finish_reason"], "stop");
  EXPECT_GT(body["usage"]["prompt_tokens"], 0);
  EXPECT_LT(body["usage"]["completion_tokens"], 40);
  auto [s2, events] = Stream(request);
  ASSERT_EQ(s2, 200);
  std::string text;
  std::string finish;
  for (const std::string& e : events) {
    if (e == "[DONE]") continue;
    const Json chunk = Json::parse(e);
    text += chunk["choices"][0]["text"].get<std::string>();
    if (!chunk["choices"][0]["finish_reason"].is_null())
      finish = chunk["choices"][0]["finish_reason"];
  }
  EXPECT_EQ(text, expected);
  EXPECT_EQ(finish, "stop");
  // The front-end ended them (finished, not cancelled by the client) and stopped the workers.
  const api::ClusterStatus s = Status();
  EXPECT_EQ(s.requests_in_flight(), 0);
  EXPECT_EQ(s.requests_cancelled(), 0);
  EXPECT_EQ(s.requests_finished(), 3);
  // The gRPC API takes the same stop sequences.
  api::GenerateRequest g;
  g.set_prompt_text(kPrompt);
  g.set_max_tokens(40);
  g.set_ignore_eos(true);
  g.add_stop(stop);
  grpc::ClientContext ctx;
  ctx.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(60));
  auto call = stub_->Generate(&ctx, g);
  api::GenerateResponse m;
  std::string grpc_text;
  api::Done done;
  while (call->Read(&m)) {
    grpc_text += m.text();
    if (m.has_done()) done = m.done();
  }
  ASSERT_TRUE(call->Finish().ok());
  EXPECT_EQ(grpc_text, expected);
  EXPECT_EQ(done.finish_reason(), "stop");
  EXPECT_LT(done.completion_tokens(), 40);
  EXPECT_TRUE(EndedCancelled(0));
  // Both decode workers' blocks came back (the stopped decode was cancelled, not left running).
  EXPECT_TRUE(decode_->WaitFor([](const ::pdserve::internal::WorkerStatus& w) {
    return w.kv_blocks_used() == 0 && w.running_requests() == 0;
  }));
}

TEST_F(OpenAiHttpTest, ErrorsAreOpenAiErrorObjectsWithHttpStatuses) {
  auto expect_error = [](const httplib::Result& res, int status, const std::string& type) {
    ASSERT_TRUE(res);
    EXPECT_EQ(res->status, status) << res->body;
    const Json body = Json::parse(res->body, nullptr, false);
    ASSERT_TRUE(body.is_object()) << res->body;
    EXPECT_EQ(body["error"]["type"], type) << res->body;
    EXPECT_FALSE(body["error"]["message"].get<std::string>().empty());
  };
  expect_error(http_->Post("/v1/completions", "{oops", "application/json"), 400,
               "invalid_request_error");
  expect_error(
      http_->Post("/v1/completions", R"({"prompt":"a","model":"gpt-4"})", "application/json"), 404,
      "not_found_error");
  // Past the model's context (256 positions): the front-end's INVALID_ARGUMENT, streamed or not.
  const std::string too_long = R"({"prompt":"a","max_tokens":100000})";
  expect_error(http_->Post("/v1/completions", too_long, "application/json"), 400,
               "invalid_request_error");
  expect_error(http_->Post("/v1/completions", R"({"prompt":"a","max_tokens":100000,"stream":true})",
                           "application/json"),
               400, "invalid_request_error");
  expect_error(http_->Post("/v1/chat/completions", R"({"messages":[]})", "application/json"), 400,
               "invalid_request_error");
  // Out of range: the front-end's INVALID_ARGUMENT.
  for (const char* bad :
       {R"({"prompt":"a","frequency_penalty":3})", R"({"prompt":"a","logit_bias":{"5":200}})",
        R"({"prompt":"a","logit_bias":{"99999999":1}})",
        R"({"prompt":"a","min_tokens":5,"max_tokens":2})"}) {
    expect_error(http_->Post("/v1/completions", bad, "application/json"), 400,
                 "invalid_request_error");
  }
  // In range, through to the workers: a +100 bias makes every token that one.
  auto biased = http_->Post("/v1/completions",
                            R"({"prompt":"a","max_tokens":6,"ignore_eos":true,
                                "logit_bias":{"42":100},"logprobs":0})",
                            "application/json");
  ASSERT_TRUE(biased && biased->status == 200) << (biased ? biased->body : "");
  const Json tokens = Json::parse(biased->body)["choices"][0]["logprobs"]["tokens"];
  ASSERT_EQ(tokens.size(), 6u) << biased->body;
  for (const Json& t : tokens) EXPECT_EQ(t, tokens[0]) << biased->body;
  // Stop sequences count from min_tokens tokens on: that token's text stops the reply at once,
  // or at the fifth token with min_tokens 4.
  for (int min_tokens : {0, 4}) {
    Json body = {{"prompt", "a"},       {"max_tokens", 8},
                 {"ignore_eos", true},  {"logit_bias", {{"42", 100}}},
                 {"stop", {tokens[0]}}, {"min_tokens", min_tokens}};
    auto stopped = http_->Post("/v1/completions", body.dump(), "application/json");
    ASSERT_TRUE(stopped && stopped->status == 200) << (stopped ? stopped->body : "");
    const Json reply = Json::parse(stopped->body);
    EXPECT_EQ(reply["choices"][0]["finish_reason"], "stop") << stopped->body;
    EXPECT_EQ(reply["usage"]["completion_tokens"], min_tokens + 1) << stopped->body;
  }
  expect_error(http_->Get("/v2/nothing"), 404, "not_found_error");
  auto models = http_->Get("/v1/models");
  ASSERT_TRUE(models && models->status == 200);
  const Json m = Json::parse(models->body);
  EXPECT_EQ(m["data"][0]["id"], Status().model());
  EXPECT_EQ(m["data"][0]["max_model_len"], testing::SmallTestConfig().max_context());
  // Nothing was left behind by the failures.
  EXPECT_EQ(Status().requests_in_flight(), 0);
}

constexpr char kChatPath[] = "/v1/chat/completions";

// The chat API: the messages rendered by the model's template are the prompt; the reply is
// /v1/completions' on those token ids, whole and streamed, in the chat format.
TEST_F(OpenAiHttpTest, ChatCompletionIsTheTemplatedPromptsCompletion) {
  const ChatModel& m = SmallChatModel();
  const Json messages = {{{"role", "system"}, {"content", "You are terse."}},
                         {{"role", "user"}, {"content", kPrompt}}};
  const std::vector<int32_t> ids = m.tokenizer->Encode(
      LlamaPrompt({{"system", "You are terse."}, {"user", kPrompt}}), /*add_special_tokens=*/false);
  auto [cs, completion] =
      Complete({{"prompt", ids}, {"max_tokens", 16}, {"temperature", 0}, {"ignore_eos", true}});
  ASSERT_EQ(cs, 200) << completion.dump();
  const std::string expected = completion["choices"][0]["text"];
  ASSERT_FALSE(expected.empty());

  const Json request = {{"messages", messages},
                        {"max_completion_tokens", 16},
                        {"temperature", 0},
                        {"ignore_eos", true}};
  auto [status, body] = Complete(request, kChatPath);
  ASSERT_EQ(status, 200) << body.dump();
  EXPECT_EQ(body["object"], "chat.completion");
  EXPECT_TRUE(absl::StartsWith(body["id"].get<std::string>(), "chatcmpl-"));
  ASSERT_EQ(body["choices"].size(), 1u);
  const Json& choice = body["choices"][0];
  EXPECT_EQ(choice["index"], 0);
  EXPECT_EQ(choice["message"]["role"], "assistant");
  EXPECT_EQ(choice["message"]["content"], expected);
  EXPECT_EQ(choice["finish_reason"], "length");
  EXPECT_TRUE(choice["logprobs"].is_null());
  EXPECT_EQ(body["usage"]["prompt_tokens"], ids.size());
  EXPECT_EQ(body["usage"]["completion_tokens"], 16);

  // Streamed with two (greedy, so equal) choices: each opens with the assistant's role, its
  // content deltas add up to the text, and it closes with an empty delta and the finish reason.
  Json streamed = request;
  streamed["n"] = 2;
  streamed["stream_options"] = {{"include_usage", true}};
  auto [s2, events] = Stream(streamed, kChatPath);
  ASSERT_EQ(s2, 200);
  ASSERT_GE(events.size(), 6u);
  EXPECT_EQ(events.back(), "[DONE]");
  std::vector<std::string> texts(2);
  std::vector<int> roles(2, 0), finishes(2, 0);
  for (size_t i = 0; i + 2 < events.size(); ++i) {
    const Json chunk = Json::parse(events[i]);
    EXPECT_EQ(chunk["object"], "chat.completion.chunk");
    EXPECT_EQ(chunk["id"], Json::parse(events[0])["id"]);
    ASSERT_EQ(chunk["choices"].size(), 1u) << events[i];
    const Json& c = chunk["choices"][0];
    const int index = c["index"];
    ASSERT_TRUE(index == 0 || index == 1) << events[i];
    const Json& delta = c["delta"];
    if (delta.contains("role")) {
      EXPECT_EQ(delta["role"], "assistant");
      EXPECT_TRUE(texts[index].empty()) << "the role comes first";
      ++roles[index];
    }
    if (delta.contains("content")) texts[index] += delta["content"].get<std::string>();
    if (!c["finish_reason"].is_null()) {
      EXPECT_EQ(c["finish_reason"], "length");
      EXPECT_TRUE(delta.empty()) << events[i];
      ++finishes[index];
    } else {
      EXPECT_EQ(finishes[index], 0) << "nothing after the finish";
    }
  }
  for (int i = 0; i < 2; ++i) {
    EXPECT_EQ(roles[i], 1) << i;
    EXPECT_EQ(finishes[i], 1) << i;
    EXPECT_EQ(texts[i], expected) << i;
  }
  const Json usage = Json::parse(events[events.size() - 2]);
  EXPECT_TRUE(usage["choices"].empty());
  EXPECT_EQ(usage["usage"]["prompt_tokens"], ids.size());  // a prompt counts once
  EXPECT_EQ(usage["usage"]["completion_tokens"], 32);

  // Logprobs in the chat format: one entry per token whose bytes add up to the content; greedy,
  // so each token is its own first alternative.
  auto [s3, with_logprobs] = Complete({{"messages", messages},
                                       {"max_completion_tokens", 6},
                                       {"temperature", 0},
                                       {"ignore_eos", true},
                                       {"logprobs", true},
                                       {"top_logprobs", 2}},
                                      kChatPath);
  ASSERT_EQ(s3, 200) << with_logprobs.dump();
  const Json& content = with_logprobs["choices"][0]["logprobs"]["content"];
  ASSERT_EQ(content.size(), 6u) << with_logprobs.dump();
  std::string bytes;
  for (const Json& entry : content) {
    ASSERT_TRUE(entry["token"].is_string()) << entry.dump();
    EXPECT_LE(entry["logprob"].get<double>(), 0.0);
    for (const Json& b : entry["bytes"]) bytes += static_cast<char>(b.get<int>());
    ASSERT_GE(entry["top_logprobs"].size(), 1u);
    ASSERT_LE(entry["top_logprobs"].size(), 2u);
    EXPECT_EQ(entry["top_logprobs"][0]["token"], entry["token"]);
    EXPECT_FLOAT_EQ(entry["top_logprobs"][0]["logprob"].get<float>(),
                    entry["logprob"].get<float>());
  }
  EXPECT_EQ(bytes, with_logprobs["choices"][0]["message"]["content"]);
  EXPECT_EQ(Status().requests_in_flight(), 0);
}

// A model without a chat template refuses chat requests (naming --chat-template) and serves
// completions; --chat-template gives it one; a template that does not parse fails the start, as
// does an unknown --tool-call-parser.
TEST_F(OpenAiHttpTest, ChatTemplateFlagAndAModelWithoutATemplate) {
  TearDown();
  namespace fs = std::filesystem;
  const fs::path plain = fs::path(testing::ScratchDir()) / "openai_no_template";
  fs::remove_all(plain);
  fs::copy(ModelDir(), plain, fs::copy_options::recursive);
  Json config = Json::parse(std::ifstream(plain / "tokenizer_config.json"));
  config.erase("chat_template");
  std::ofstream(plain / "tokenizer_config.json") << config.dump(2);
  FrontendOptions o;
  o.model_dir = plain.string();
  Start(o);
  const Json request = {{"messages", {{{"role", "user"}, {"content", "hi"}}}},
                        {"max_completion_tokens", 4},
                        {"temperature", 0},
                        {"ignore_eos", true}};
  auto [status, body] = Complete(request, kChatPath);
  EXPECT_EQ(status, 400) << body.dump();
  EXPECT_TRUE(absl::StrContains(body["error"]["message"].get<std::string>(), "--chat-template"))
      << body.dump();
  EXPECT_EQ(Complete({{"prompt", "hi"}, {"max_tokens", 2}}).first, 200);
  TearDown();

  o.chat_template = ScratchFile(
      "override.jinja",
      "{{ bos_token }}{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}"
      "[assistant] ");
  Start(o);
  auto [s2, with_template] = Complete(request, kChatPath);
  ASSERT_EQ(s2, 200) << with_template.dump();
  const ChatModel& m = SmallChatModel();
  EXPECT_EQ(with_template["usage"]["prompt_tokens"],
            m.tokenizer->Encode(m.bos + "[user] hi\n[assistant] ", false).size());
  TearDown();

  o.chat_template = ScratchFile("broken.jinja", "{% if %}");
  o.http_port = 0;
  auto broken = Frontend::Start(o);
  ASSERT_FALSE(broken.ok());
  EXPECT_TRUE(absl::StrContains(broken.status().message(), "broken.jinja")) << broken.status();

  // --tool-call-parser: a known format serves chat requests with tools, another fails the start.
  o = FrontendOptions();
  o.tool_call_parser = "granite";
  o.model_dir = ModelDir();
  o.http_port = 0;
  auto unknown = Frontend::Start(o);
  ASSERT_FALSE(unknown.ok());
  EXPECT_TRUE(absl::StrContains(unknown.status().message(), "granite")) << unknown.status();
  o.tool_call_parser = "hermes";
  o.reasoning_parser = "o1";
  unknown = Frontend::Start(o);
  ASSERT_FALSE(unknown.ok());
  EXPECT_TRUE(absl::StrContains(unknown.status().message(), "o1")) << unknown.status();
  o.reasoning_parser = "qwen3";
  Start(o);
  Json with_tools = request;
  with_tools["tools"] = kTools;
  auto [s3, reply] = Complete(with_tools, kChatPath);
  ASSERT_EQ(s3, 200) << reply.dump();
  EXPECT_EQ(reply["choices"][0]["finish_reason"], "length");  // random weights write no calls
}

// POST /tokenize gives the token ids a completion or chat request sends; /detokenize the text.
TEST_F(OpenAiHttpTest, TokenizeAndDetokenize) {
  const ChatModel& m = SmallChatModel();
  auto [s1, text] = Complete({{"prompt", kPrompt}}, "/tokenize");
  ASSERT_EQ(s1, 200) << text.dump();
  const std::vector<int32_t> ids = m.tokenizer->Encode(kPrompt, /*add_special_tokens=*/true);
  EXPECT_EQ(text["tokens"], ids);
  EXPECT_EQ(text["count"], ids.size());
  EXPECT_EQ(text["max_model_len"], testing::SmallTestConfig().max_context());
  auto [s2, plain] = Complete({{"prompt", kPrompt}, {"add_special_tokens", false}}, "/tokenize");
  ASSERT_EQ(s2, 200);
  EXPECT_EQ(plain["tokens"], m.tokenizer->Encode(kPrompt, false));
  // Messages: the chat prompt, as many tokens as a chat request's usage counts.
  const Json messages = {{{"role", "user"}, {"content", kPrompt}}};
  auto [s3, chat] = Complete({{"messages", messages}}, "/tokenize");
  ASSERT_EQ(s3, 200) << chat.dump();
  EXPECT_EQ(chat["tokens"], m.tokenizer->Encode(LlamaPrompt({{"user", kPrompt}}), false));
  auto [s4, reply] = Complete({{"messages", messages}, {"max_completion_tokens", 2}}, kChatPath);
  ASSERT_EQ(s4, 200);
  EXPECT_EQ(reply["usage"]["prompt_tokens"], chat["count"]);
  // Detokenize: the text of the ids.
  auto [s5, back] = Complete({{"tokens", ids}}, "/detokenize");
  ASSERT_EQ(s5, 200) << back.dump();
  EXPECT_EQ(back["prompt"], m.tokenizer->Decode(ids));
  // Refusals.
  EXPECT_EQ(Complete({{"tokens", {1, -1}}}, "/detokenize").first, 400);
  EXPECT_TRUE(absl::StrContains(Complete({{"tokens", {1, 100000}}}, "/detokenize")
                                    .second["error"]["message"]
                                    .get<std::string>(),
                                "tokens[1]"));
  EXPECT_EQ(Complete({{"tokens", "x"}}, "/detokenize").first, 400);
  EXPECT_EQ(Complete(Json::object(), "/tokenize").first, 400);
  EXPECT_EQ(Complete({{"prompt", "a"}, {"model", "other"}}, "/tokenize").first, 404);
  EXPECT_EQ(Complete({{"messages", Json::array()}}, "/tokenize").first, 400);
}

// A client that goes away mid-stream: its call is cancelled (not decoded to the end).
TEST_F(OpenAiHttpTest, AClientThatLeavesCancelsItsRequest) {
  decode_->backend.delay_ms = 30;  // decode steps of ~60 ms: the stream lasts seconds
  httplib::Request req;
  req.method = "POST";
  req.path = "/v1/completions";
  req.set_header("Content-Type", "application/json");
  req.body =
      Json{{"prompt", kPrompt}, {"max_tokens", 150}, {"ignore_eos", true}, {"stream", true}}.dump();
  int chunks = 0;
  req.content_receiver = [&](const char*, size_t, uint64_t, uint64_t) { return ++chunks < 3; };
  auto res = http_->send(req);
  EXPECT_GE(chunks, 3);
  EXPECT_TRUE(EndedCancelled(1)) << Status().DebugString();
  decode_->backend.delay_ms = 0;
}

// A non-streamed client that gives up (its socket closed, nothing ever written to it): the
// server notices the closed connection and cancels the request instead of decoding it for
// nobody.
TEST_F(OpenAiHttpTest, ANonStreamedClientThatLeavesCancelsItsRequest) {
  decode_->backend.delay_ms = 30;  // 150 tokens at ~60 ms a step: about 9 s to the end
  httplib::Client impatient("127.0.0.1", frontend_->http_port());
  impatient.set_read_timeout(0, 500000);
  const absl::Time start = absl::Now();
  auto res =
      impatient.Post("/v1/completions",
                     Json{{"prompt", kPrompt}, {"max_tokens", 150}, {"ignore_eos", true}}.dump(),
                     "application/json");
  EXPECT_FALSE(res);
  impatient.stop();
  EXPECT_TRUE(EndedCancelled(1)) << Status().DebugString();
  EXPECT_LT(absl::Now() - start, absl::Seconds(4));
  decode_->backend.delay_ms = 0;
}

// Structured output end to end (prefill and decode workers): response_format's schema on
// completions and chat, whole and streamed, and a named tool choice whose reply is the call's
// arguments; the random model writes JSON that matches.
TEST_F(OpenAiHttpTest, ResponseFormatsAndForcedToolsGiveMatchingJson) {
  const Json schema = {
      {"type", "object"},
      {"properties", {{"city", {{"enum", {"Oslo", "Paris"}}}}, {"days", {{"type", "integer"}}}}},
      {"required", {"city", "days"}}};
  auto check = [](const std::string& text) {
    const Json j = Json::parse(text, nullptr, false);
    ASSERT_TRUE(j.is_object()) << text;
    EXPECT_TRUE(j["city"] == "Oslo" || j["city"] == "Paris") << text;
    EXPECT_TRUE(j["days"].is_number_integer()) << text;
    EXPECT_EQ(j.size(), 2u) << text;
  };
  const Json format = {{"type", "json_schema"},
                       {"json_schema", {{"name", "w"}, {"schema", schema}}}};
  // max_tokens: room for the longest reply the schema takes (16 whitespace characters at each
  // of its places), so that no draw ends as "length".
  Json request = {{"prompt", kPrompt}, {"max_tokens", 400}, {"response_format", format}};
  for (int seed = 0; seed < 3; ++seed) {
    request["seed"] = seed;
    auto [status, body] = Complete(request);
    ASSERT_EQ(status, 200) << body.dump();
    EXPECT_EQ(body["choices"][0]["finish_reason"], "stop") << body.dump();
    check(body["choices"][0]["text"]);
  }
  auto [status, events] = Stream(request);
  ASSERT_EQ(status, 200);
  std::string streamed;
  for (const std::string& e : events) {
    if (e != "[DONE]") streamed += Json::parse(e)["choices"][0]["text"].get<std::string>();
  }
  check(streamed);

  const Json user = {{{"role", "user"}, {"content", "Weather?"}}};
  auto [chat_status, chat] =
      Complete({{"messages", user}, {"max_tokens", 400}, {"response_format", format}},
               "/v1/chat/completions");
  ASSERT_EQ(chat_status, 200) << chat.dump();
  check(chat["choices"][0]["message"]["content"]);

  const Json tools = {
      {{"type", "function"}, {"function", {{"name", "get_weather"}, {"parameters", schema}}}}};
  const Json forced = {
      {"messages", user},
      {"max_tokens", 400},
      {"tools", tools},
      {"tool_choice", {{"type", "function"}, {"function", {{"name", "get_weather"}}}}}};
  auto [tool_status, called] = Complete(forced, "/v1/chat/completions");
  ASSERT_EQ(tool_status, 200) << called.dump();
  const Json& message = called["choices"][0]["message"];
  EXPECT_TRUE(message["content"].is_null()) << called.dump();
  ASSERT_EQ(message["tool_calls"].size(), 1u) << called.dump();
  EXPECT_EQ(message["tool_calls"][0]["function"]["name"], "get_weather");
  check(message["tool_calls"][0]["function"]["arguments"]);
  EXPECT_EQ(called["choices"][0]["finish_reason"], "tool_calls");

  // Streamed, the arguments come as they are generated: a first delta with the call's id and
  // name, then pieces of its arguments, then finish_reason "tool_calls".
  Json streamed_forced = forced;
  streamed_forced["stream"] = true;
  auto [stream_status, call_events] = Stream(streamed_forced, "/v1/chat/completions");
  ASSERT_EQ(stream_status, 200);
  std::string arguments, finish;
  int pieces = 0, opened = 0;
  for (const std::string& e : call_events) {
    if (e == "[DONE]") continue;
    const Json j = Json::parse(e);
    const Json& choice = j["choices"][0];
    if (choice["finish_reason"].is_string()) finish = choice["finish_reason"];
    if (!choice["delta"].contains("tool_calls")) continue;
    const Json& call = choice["delta"]["tool_calls"][0];
    EXPECT_EQ(call["index"], 0);
    if (call.contains("id")) {
      ++opened;
      EXPECT_EQ(call["function"]["name"], "get_weather");
      EXPECT_EQ(call["type"], "function");
    }
    arguments += call["function"]["arguments"].get<std::string>();
    ++pieces;
  }
  EXPECT_EQ(opened, 1);
  EXPECT_GT(pieces, 3);  // incremental, not one delta at the end
  check(arguments);
  EXPECT_EQ(finish, "tool_calls");

  // "required", streamed (one call: without parallel calls the schema allows one): calls
  // open by index, each with its name, then its arguments.
  streamed_forced["tool_choice"] = "required";
  streamed_forced["parallel_tool_calls"] = false;
  // A list of calls has more places for whitespace: with 200 tokens an unseeded draw ended as
  // "length" about once in 8 runs.
  streamed_forced["max_tokens"] = 600;
  auto [required_status, required_events] = Stream(streamed_forced, "/v1/chat/completions");
  ASSERT_EQ(required_status, 200);
  std::map<int, std::string> call_names, call_arguments;
  std::string required_finish;
  for (const std::string& e : required_events) {
    if (e == "[DONE]") continue;
    const Json j = Json::parse(e);
    const Json& choice = j["choices"][0];
    if (choice["finish_reason"].is_string()) required_finish = choice["finish_reason"];
    if (!choice["delta"].contains("tool_calls")) continue;
    const Json& call = choice["delta"]["tool_calls"][0];
    const int index = call["index"];
    if (call.contains("id")) call_names[index] = call["function"]["name"];
    ASSERT_TRUE(call_names.count(index)) << e;
    call_arguments[index] += call["function"]["arguments"].get<std::string>();
  }
  ASSERT_EQ(call_names.size(), 1u);
  for (const auto& [index, name] : call_names) {
    EXPECT_EQ(name, "get_weather");
    check(call_arguments[index]);
  }
  EXPECT_EQ(required_finish, "tool_calls");
}

// The gRPC API's json_schema: a bad one is INVALID_ARGUMENT from the front-end, naming the
// keyword; a good one gives JSON.
TEST_F(OpenAiHttpTest, GrpcJsonSchemaIsCheckedAndFollowed) {
  api::GenerateRequest r;
  r.set_prompt_text(kPrompt);
  r.set_max_tokens(100);
  r.set_json_schema(R"({"type": "array", "items": {"type": "integer"}, "uniqueItems": true})");
  {
    grpc::ClientContext ctx;
    auto call = stub_->Generate(&ctx, r);
    api::GenerateResponse m;
    while (call->Read(&m)) {
    }
    const grpc::Status s = call->Finish();
    EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
    EXPECT_TRUE(absl::StrContains(s.error_message(), "uniqueItems")) << s.error_message();
  }
  r.set_json_schema(R"({"type": "array", "items": {"type": "integer"}, "maxItems": 3})");
  auto [text, finish] = GenerateText(r);
  EXPECT_EQ(finish, "stop");
  const Json j = Json::parse(text, nullptr, false);
  ASSERT_TRUE(j.is_array()) << text;
  EXPECT_LE(j.size(), 3u);
  for (const Json& v : j) EXPECT_TRUE(v.is_number_integer()) << text;
}

// Regular expressions end to end: guided_regex, guided_choice and structured_outputs on
// completions and chat, and the gRPC API's regex (a bad one is INVALID_ARGUMENT naming it).
TEST_F(OpenAiHttpTest, RegexesAndChoicesHoldTheReply) {
  const std::string pattern = "[a-z]{2,5}( [a-z]{2,5}){0,3}\\.";
  const std::regex re(pattern, std::regex::ECMAScript);
  for (int seed = 0; seed < 3; ++seed) {
    auto [status, body] = Complete(
        {{"prompt", kPrompt}, {"max_tokens", 60}, {"seed", seed}, {"guided_regex", pattern}});
    ASSERT_EQ(status, 200) << body.dump();
    const std::string text = body["choices"][0]["text"];
    EXPECT_TRUE(std::regex_match(text, re)) << text;
    EXPECT_EQ(body["choices"][0]["finish_reason"], "stop") << body.dump();
  }
  const std::vector<std::string> choices = {"yes", "no", "it depends (see 2.1)"};
  const Json user = {{{"role", "user"}, {"content", "Well?"}}};
  for (const Json& extra :
       {Json{{"guided_choice", choices}}, Json{{"structured_outputs", {{"choice", choices}}}}}) {
    Json body = {{"messages", user}, {"max_tokens", 30}, {"temperature", 1.0}, {"seed", 5}};
    body.update(extra);
    auto [status, reply] = Complete(body, "/v1/chat/completions");
    ASSERT_EQ(status, 200) << reply.dump();
    const std::string content = reply["choices"][0]["message"]["content"];
    EXPECT_NE(std::find(choices.begin(), choices.end(), content), choices.end()) << content;
  }
  auto [status, events] = Stream(
      {{"prompt", kPrompt}, {"max_tokens", 60}, {"structured_outputs", {{"regex", pattern}}}});
  ASSERT_EQ(status, 200);
  std::string streamed;
  for (const std::string& e : events) {
    if (e != "[DONE]") streamed += Json::parse(e)["choices"][0]["text"].get<std::string>();
  }
  EXPECT_TRUE(std::regex_match(streamed, re)) << streamed;

  api::GenerateRequest r;
  r.set_prompt_text(kPrompt);
  r.set_max_tokens(40);
  for (const char* bad : {"(a", "\\1"}) {
    r.set_regex(bad);
    grpc::ClientContext ctx;
    auto call = stub_->Generate(&ctx, r);
    api::GenerateResponse m;
    while (call->Read(&m)) {
    }
    const grpc::Status s = call->Finish();
    EXPECT_EQ(s.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << bad;
    EXPECT_TRUE(absl::StrContains(s.error_message(), "regex")) << s.error_message();
  }
  r.set_regex("\\d{3}-\\d{4}");
  auto [text, finish] = GenerateText(r);
  EXPECT_EQ(finish, "stop");
  EXPECT_TRUE(std::regex_match(text, std::regex("\\d{3}-\\d{4}"))) << text;
}

// A reasoning model's constrained chat reply through the cluster (--reasoning-parser): when
// the prompt opens the reasoning, the reply is free until </think> (which this greedy random
// model does not write, so the reply is all reasoning, cut at max_tokens); when it does not,
// the reply is JSON from its first token.
TEST_F(OpenAiHttpTest, ConstrainedRepliesOfAReasoningModel) {
  TearDown();
  FrontendOptions o;
  o.reasoning_parser = "deepseek_r1";
  const std::string turns =
      "{{ bos_token }}{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}";
  o.chat_template = ScratchFile("opens_think.jinja", turns + "[assistant] <think>\n");
  Start(o);
  Json request = {{"messages", {{{"role", "user"}, {"content", "JSON?"}}}},
                  {"max_tokens", 12},
                  {"temperature", 0},
                  {"response_format", {{"type", "json_object"}}}};
  auto [status, body] = Complete(request, kChatPath);
  ASSERT_EQ(status, 200) << body.dump();
  const Json& reasoned = body["choices"][0]["message"];
  EXPECT_EQ(body["choices"][0]["finish_reason"], "length") << body.dump();
  ASSERT_TRUE(reasoned["reasoning_content"].is_string()) << body.dump();
  // Unconstrained (the worker's matcher was free): not the start of a JSON object.
  const std::string reasoning = reasoned["reasoning_content"];
  EXPECT_FALSE(reasoning.empty());
  EXPECT_FALSE(absl::StartsWith(absl::StripLeadingAsciiWhitespace(reasoning), "{")) << reasoning;
  EXPECT_TRUE(reasoned["content"].is_null() || reasoned["content"] == "") << body.dump();
  TearDown();

  o.chat_template = ScratchFile("no_think.jinja", turns + "[assistant] ");
  Start(o);
  request["max_tokens"] = 200;
  auto [status2, direct] = Complete(request, kChatPath);
  ASSERT_EQ(status2, 200) << direct.dump();
  const Json& message = direct["choices"][0]["message"];
  EXPECT_TRUE(message["reasoning_content"].is_null()) << direct.dump();
  ASSERT_TRUE(message["content"].is_string()) << direct.dump();
  // JSON from the first token (greedy, this random model's object may not end in 200 tokens).
  const std::string content = message["content"];
  EXPECT_TRUE(absl::StartsWith(absl::StripLeadingAsciiWhitespace(content), "{")) << content;
  if (direct["choices"][0]["finish_reason"] == "stop") {
    EXPECT_TRUE(Json::parse(content, nullptr, false).is_object()) << content;
  }
}

// Overload is 429: the front-end's RESOURCE_EXHAUSTED while its one slot is taken.
TEST_F(OpenAiHttpTest, OverloadIsTooManyRequests) {
  TearDown();
  FrontendOptions o;
  o.max_in_flight = 1;
  Start(o);
  decode_->backend.delay_ms = 30;
  std::thread slow([&] {
    auto [status, body] = Complete({{"prompt", kPrompt}, {"max_tokens", 60}, {"ignore_eos", true}});
    EXPECT_EQ(status, 200) << body.dump();
  });
  ASSERT_TRUE(PollUntil([&] { return Status(); },
                        [](const api::ClusterStatus& s) { return s.requests_in_flight() == 1; },
                        absl::Seconds(20)));
  httplib::Client other("127.0.0.1", frontend_->http_port());
  auto res = other.Post("/v1/completions", R"({"prompt":"a","max_tokens":2})", "application/json");
  ASSERT_TRUE(res);
  EXPECT_EQ(res->status, 429) << res->body;
  EXPECT_EQ(Json::parse(res->body)["error"]["type"], "rate_limit_error");
  slow.join();
  decode_->backend.delay_ms = 0;
}

// pdbench's OpenAI client (client/openai_client.h) against this server: the stream comes back
// as the gRPC API's messages (token counts, a Done from the usage), errors as its codes, and a
// cancelled call cancels the request.
TEST_F(OpenAiHttpTest, PdbenchsOpenAiClientReadsTheStreamAsGrpcMessages) {
  const api::GenerateResponse expected = Grpc(kPrompt, 12);
  client::OpenAiClient http_client(absl::StrCat("http://127.0.0.1:", frontend_->http_port()), "");
  ASSERT_TRUE(http_client.WaitForConnected(absl::Seconds(10)).ok());
  EXPECT_EQ(http_client.model(), Status().model());
  EXPECT_EQ(http_client.GetClusterStatus(absl::Seconds(1)).status().code(),
            absl::StatusCode::kUnimplemented);
  struct Got {
    std::mutex mu;
    std::vector<api::GenerateResponse> messages;
    grpc::Status status;
  };
  auto run = [&](const api::GenerateRequest& r, Got& got, bool cancel_after_first = false,
                 client::OpenAiClient* via = nullptr) {
    std::shared_ptr<client::GenerateCall> call;
    client::GenerateCallbacks cb;
    cb.on_message = [&](const api::GenerateResponse& m, client::Clock::time_point) {
      std::lock_guard<std::mutex> lock(got.mu);
      got.messages.push_back(m);
    };
    cb.on_done = [&](const grpc::Status& s, client::Clock::time_point) { got.status = s; };
    call = (via != nullptr ? *via : http_client).StartGenerate(r, absl::Seconds(60), std::move(cb));
    if (cancel_after_first) {
      ASSERT_TRUE(PollUntil(
          [&] {
            std::lock_guard<std::mutex> lock(got.mu);
            return got.messages.size();
          },
          [](size_t n) { return n > 0; }, absl::Seconds(20)));
      call->Cancel();
    }
    ASSERT_TRUE(call->WaitFor(absl::Seconds(60)));
  };
  api::GenerateRequest r;
  r.set_prompt_text(kPrompt);
  r.set_max_tokens(12);
  r.set_ignore_eos(true);
  r.set_temperature(0);
  Got got;
  run(r, got);
  ASSERT_TRUE(got.status.ok()) << got.status.error_message();
  ASSERT_GE(got.messages.size(), 2u);
  std::string text;
  int tokens = 0;
  for (const auto& m : got.messages) {
    text += m.text();
    tokens += m.token_ids_size();
  }
  EXPECT_EQ(text, expected.text());
  EXPECT_EQ(tokens, 12);
  ASSERT_TRUE(got.messages.back().has_done());
  EXPECT_EQ(got.messages.back().done().finish_reason(), "length");
  EXPECT_EQ(got.messages.back().done().prompt_tokens(), expected.done().prompt_tokens());
  EXPECT_EQ(got.messages.back().done().completion_tokens(), 12);

  r.set_max_tokens(100000);  // past the context: INVALID_ARGUMENT with the front-end's message
  Got refused;
  run(r, refused);
  EXPECT_EQ(refused.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_TRUE(absl::StrContains(refused.status.error_message(), "context"))
      << refused.status.error_message();

  decode_->backend.delay_ms = 30;
  r.set_max_tokens(150);
  Got cancelled;
  run(r, cancelled, /*cancel_after_first=*/true);
  EXPECT_EQ(cancelled.status.error_code(), grpc::StatusCode::CANCELLED);
  EXPECT_TRUE(EndedCancelled(1)) << Status().DebugString();
  decode_->backend.delay_ms = 0;

  // The chat endpoint (pdbench --api openai-chat): the prompt text is one user message.
  client::OpenAiClient chat_client(absl::StrCat("http://127.0.0.1:", frontend_->http_port()), "",
                                   /*chat=*/true);
  ASSERT_TRUE(chat_client.WaitForConnected(absl::Seconds(10)).ok());
  auto [status, body] = Complete({{"messages", {{{"role", "user"}, {"content", kPrompt}}}},
                                  {"max_completion_tokens", 12},
                                  {"temperature", 0},
                                  {"ignore_eos", true}},
                                 kChatPath);
  ASSERT_EQ(status, 200) << body.dump();
  r.set_max_tokens(12);
  r.set_logprobs(1);  // counted from the chat logprobs' entries
  Got chat;
  run(r, chat, false, &chat_client);
  ASSERT_TRUE(chat.status.ok()) << chat.status.error_message();
  std::string chat_text;
  int chat_tokens = 0;
  for (const auto& m : chat.messages) {
    chat_text += m.text();
    chat_tokens += m.token_ids_size();
  }
  EXPECT_EQ(chat_text, body["choices"][0]["message"]["content"]);
  EXPECT_EQ(chat_tokens, 12);
  ASSERT_TRUE(chat.messages.back().has_done());
  EXPECT_EQ(chat.messages.back().done().prompt_tokens(), body["usage"]["prompt_tokens"]);
  // Token ids cannot be a chat message.
  api::GenerateRequest ids;
  ids.add_prompt_token_ids(5);
  ids.set_max_tokens(2);
  Got refused_ids;
  run(ids, refused_ids, false, &chat_client);
  EXPECT_EQ(refused_ids.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
}

}  // namespace
}  // namespace pds::server

// Structured output in the generation engine: a request with a json_schema on a random model
// replies JSON that the schema accepts and stops when it is complete, greedy or sampled, in one
// engine or prefilled in one and decoded in another; a regex holds the whole reply; requests
// without a vocabulary, with a bad schema or pattern, or with both, are refused.
#include <memory>
#include <regex>
#include <string>

#include "absl/strings/match.h"
#include "engine/backend/cpu_backend.h"
#include "engine/model/transformer.h"
#include "engine/runtime/llm_engine.h"
#include "engine/tokenizer/tokenizer.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/testing/test_util.h"

namespace pds::engine {
namespace {

using Json = nlohmann::ordered_json;

constexpr char kSchema[] = R"({"type": "object", "properties": {
    "kind": {"enum": ["cat", "dog"]},
    "n": {"type": "integer"},
    "ok": {"type": "boolean"},
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "maxItems": 2}},
    "required": ["kind", "n", "ok"]})";

class StructuredOutputTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    ModelConfig config = testing::SmallTestConfig();
    config.vocab_size = 512;
    auto dir = testing::MakeModelDir(config, "structured", 3, DType::kF32, 0, /*tokenizer=*/true);
    ASSERT_TRUE(dir.ok()) << dir.status();
    backend_ = new CpuBackend(1);
    auto model = Transformer::Load(*dir, *backend_);
    ASSERT_TRUE(model.ok()) << model.status();
    model_ = model->release();
    auto tok = Tokenizer::Load(*dir + "/tokenizer.json");
    ASSERT_TRUE(tok.ok()) << tok.status();
    tokenizer_ = tok->release();
    vocab_ = new std::shared_ptr<const TokenVocabulary>(
        TokenVocabulary::FromTokenizer(*tokenizer_, model_->config().eos_token_ids));
  }
  static void TearDownTestSuite() {
    delete vocab_;
    delete tokenizer_;
    delete model_;
    delete backend_;
  }
  static std::unique_ptr<LlmEngine> NewEngine(bool with_vocab = true) {
    auto engine = LlmEngine::Create(*model_, {.block_size = 8, .num_blocks = 256});
    EXPECT_TRUE(engine.ok()) << engine.status();
    if (with_vocab) (*engine)->set_token_vocabulary(*vocab_);
    return std::move(*engine);
  }
  static GenerateRequest Request(const std::string& id, float temperature, uint64_t seed) {
    GenerateRequest r;
    r.id = id;
    r.prompt = tokenizer_->Encode("Reply in JSON: the animal", false);
    r.params.temperature = temperature;
    r.params.seed = seed;
    r.params.max_tokens = 400;
    r.params.json_schema = kSchema;
    return r;
  }
  // The reply's text, checked to be JSON that kSchema accepts.
  static void ExpectMatches(const GenerateResult& r) {
    ASSERT_EQ(r.finish, FinishReason::kStop) << FinishReasonName(r.finish);
    const std::string text = tokenizer_->Decode(r.token_ids, /*skip_special_tokens=*/true);
    const Json j = Json::parse(text, nullptr, false);
    ASSERT_TRUE(j.is_object()) << text;
    EXPECT_TRUE(j["kind"] == "cat" || j["kind"] == "dog") << text;
    EXPECT_TRUE(j["n"].is_number_integer()) << text;
    EXPECT_TRUE(j["ok"].is_boolean()) << text;
    if (j.contains("tags")) {
      ASSERT_TRUE(j["tags"].is_array()) << text;
      EXPECT_LE(j["tags"].size(), 2u) << text;
    }
    for (const auto& [k, v] : j.items()) {
      EXPECT_TRUE(k == "kind" || k == "n" || k == "ok" || k == "tags") << text;
    }
  }

  static CpuBackend* backend_;
  static Transformer* model_;
  static Tokenizer* tokenizer_;
  static std::shared_ptr<const TokenVocabulary>* vocab_;
};

CpuBackend* StructuredOutputTest::backend_ = nullptr;
Transformer* StructuredOutputTest::model_ = nullptr;
Tokenizer* StructuredOutputTest::tokenizer_ = nullptr;
std::shared_ptr<const TokenVocabulary>* StructuredOutputTest::vocab_ = nullptr;

TEST_F(StructuredOutputTest, RepliesAreJsonTheSchemaAccepts) {
  std::vector<GenerateRequest> requests = {Request("greedy", 0.0f, 1)};
  for (int i = 0; i < 12; ++i) {
    requests.push_back(Request(absl::StrCat("sampled-", i), 1.0f, 100 + i));
  }
  auto results = NewEngine()->Generate(std::move(requests));
  ASSERT_TRUE(results.ok()) << results.status();
  for (const GenerateResult& r : *results) ExpectMatches(r);
  // A reply whose JSON completes on its max_tokens-th token ends as "stop", not "length".
  GenerateRequest exact = Request("exact", 0.0f, 1);
  exact.params.max_tokens = static_cast<int32_t>((*results)[0].token_ids.size());
  auto cut = NewEngine()->Generate({exact});
  ASSERT_TRUE(cut.ok());
  EXPECT_EQ((*cut)[0].token_ids, (*results)[0].token_ids);
  EXPECT_EQ((*cut)[0].finish, FinishReason::kStop);
  exact.params.max_tokens -= 1;
  cut = NewEngine()->Generate({exact});
  ASSERT_TRUE(cut.ok());
  EXPECT_EQ((*cut)[0].finish, FinishReason::kLength);
  // Without the schema, the same random model does not write JSON.
  GenerateRequest free = Request("free", 0.0f, 1);
  free.params.json_schema.clear();
  free.params.max_tokens = 20;
  auto plain = NewEngine()->Generate({free});
  ASSERT_TRUE(plain.ok());
  EXPECT_TRUE(
      Json::parse(tokenizer_->Decode((*plain)[0].token_ids, true), nullptr, false).is_discarded());
}

// Prefilled in one engine (which draws the first token) and decoded in another: the same
// reply as one engine gives.
TEST_F(StructuredOutputTest, AnImportedRequestGoesOnFromItsFirstToken) {
  auto whole = NewEngine()->Generate({Request("r", 0.0f, 1)});
  ASSERT_TRUE(whole.ok());

  auto prefill = NewEngine();
  GenerateRequest r = Request("r", 0.0f, 1);
  r.hold_kv_after_prefill = true;
  ASSERT_TRUE(prefill->AddRequest(r).ok());
  auto first = prefill->Step();
  ASSERT_TRUE(first.ok()) << first.status();
  ASSERT_EQ(first->size(), 1u);
  const int32_t token = (*first)[0].token;
  ASSERT_EQ(token, (*whole)[0].token_ids[0]);

  // The decode engine's blocks hold no K/V here (nothing is transferred), so its logits differ
  // from the whole run's; what matters is that its matcher starts after the first token: a
  // token that cannot start the JSON is refused, and the reply goes on from the right one.
  auto decode = NewEngine();
  GenerateRequest d = Request("r", 0.0f, 1);
  auto reservation = decode->ReserveImport(d, static_cast<int32_t>(d.prompt.size()));
  ASSERT_TRUE(reservation.ok()) << reservation.status();
  EXPECT_EQ(decode->ActivateImport("r", tokenizer_->Encode("not json", false)[0]).code(),
            absl::StatusCode::kInvalidArgument);
  ASSERT_TRUE(decode->ActivateImport("r", token).ok());
  GenerateResult rest;
  rest.token_ids = {token};
  for (int i = 0; i < 500 && rest.finish == FinishReason::kNone; ++i) {
    auto step = decode->Step();
    ASSERT_TRUE(step.ok()) << step.status();
    for (const TokenOutput& out : *step) {
      rest.token_ids.push_back(out.token);
      rest.finish = out.finish;
    }
  }
  ExpectMatches(rest);
}

// A regex (and a JSON string's pattern) holds the reply, greedy or sampled, whole or imported
// after its first token; a reply that reaches a final state ends "stop".
TEST_F(StructuredOutputTest, RegexRepliesMatchWhole) {
  const std::string pattern = "(cat|dog)s?: [1-9]\\d{0,2}( kg| g)?";
  std::vector<GenerateRequest> requests;
  for (int i = 0; i < 8; ++i) {
    GenerateRequest r = Request(absl::StrCat("rx-", i), i == 0 ? 0.0f : 1.0f, 7 + i);
    r.params.json_schema.clear();
    r.params.regex = pattern;
    r.params.max_tokens = 40;
    requests.push_back(r);
  }
  GenerateRequest dated = Request("dated", 1.0f, 3);
  dated.params.json_schema =
      R"({"type": "object", "properties": {"on": {"type": "string", "format": "date"},
          "code": {"type": "string", "pattern": "^[A-Z]{3}-\\d{2}$"},
          "n": {"type": "integer", "minimum": 10, "maximum": 20}},
          "required": ["on", "code", "n"]})";
  requests.push_back(dated);
  auto results = NewEngine()->Generate(requests);
  ASSERT_TRUE(results.ok()) << results.status();
  const std::regex re(pattern, std::regex::ECMAScript);
  for (size_t i = 0; i + 1 < results->size(); ++i) {
    const GenerateResult& r = (*results)[i];
    const std::string text = tokenizer_->Decode(r.token_ids, true);
    EXPECT_TRUE(std::regex_match(text, re)) << text;
    EXPECT_EQ(r.finish, FinishReason::kStop) << text;
  }
  const GenerateResult& d = results->back();
  const std::string text = tokenizer_->Decode(d.token_ids, true);
  const Json j = Json::parse(text, nullptr, false);
  ASSERT_TRUE(j.is_object()) << text;
  EXPECT_TRUE(std::regex_match(j["on"].get<std::string>(),
                               std::regex("\\d{4}-(0[1-9]|1[0-2])-(0[1-9]|[12]\\d|3[01])")))
      << text;
  EXPECT_TRUE(std::regex_match(j["code"].get<std::string>(), std::regex("[A-Z]{3}-\\d{2}")))
      << text;
  EXPECT_TRUE(j["n"].is_number_integer() && j["n"] >= 10 && j["n"] <= 20) << text;

  // Imported after its first token, a regex reply goes on from it.
  auto decode = NewEngine();
  GenerateRequest d2 = requests[0];
  ASSERT_TRUE(decode->ReserveImport(d2, static_cast<int32_t>(d2.prompt.size())).ok());
  EXPECT_FALSE(decode->ActivateImport(d2.id, tokenizer_->Encode(" x", false)[0]).ok());
  ASSERT_TRUE(decode->ActivateImport(d2.id, (*results)[0].token_ids[0]).ok());
  std::vector<int32_t> ids = {(*results)[0].token_ids[0]};
  FinishReason finish = FinishReason::kNone;
  for (int i = 0; i < 100 && finish == FinishReason::kNone; ++i) {
    auto step = decode->Step();
    ASSERT_TRUE(step.ok()) << step.status();
    for (const TokenOutput& out : *step) {
      ids.push_back(out.token);
      finish = out.finish;
    }
  }
  EXPECT_TRUE(std::regex_match(tokenizer_->Decode(ids, true), re)) << tokenizer_->Decode(ids, true);
}

// A reasoning model's reply reasons first, unconstrained, until its end token, then is JSON:
// greedy, the free part is the unconstrained reply's start.
TEST_F(StructuredOutputTest, ReasoningComesBeforeTheConstraint) {
  GenerateRequest free = Request("free", 0.0f, 1);
  free.params.json_schema.clear();
  free.params.max_tokens = 6;
  auto plain = NewEngine()->Generate({free});
  ASSERT_TRUE(plain.ok());
  const std::vector<int32_t>& start = (*plain)[0].token_ids;
  ASSERT_GE(start.size(), 3u);
  const int32_t end = start[2];  // stands for </think>
  const size_t reasoned = std::find(start.begin(), start.end(), end) - start.begin() + 1;

  GenerateRequest r = Request("reasons", 0.0f, 1);
  r.params.reasoning_end = end;
  r.params.reasoning_inside = true;
  auto results = NewEngine()->Generate({r});
  ASSERT_TRUE(results.ok()) << results.status();
  const std::vector<int32_t>& ids = (*results)[0].token_ids;
  ASSERT_GT(ids.size(), reasoned);
  EXPECT_EQ(std::vector<int32_t>(ids.begin(), ids.begin() + reasoned),
            std::vector<int32_t>(start.begin(), start.begin() + reasoned));
  GenerateResult rest = (*results)[0];
  rest.token_ids.erase(rest.token_ids.begin(), rest.token_ids.begin() + reasoned);
  ExpectMatches(rest);

  // A token that would end the reply inside its reasoning (here a stop token id) closes the
  // reasoning instead.
  if (start[1] != end && start[0] != start[1]) {
    GenerateRequest stopped = r;
    stopped.params.stop_token_ids = {start[1]};
    auto cut = NewEngine()->Generate({stopped});
    ASSERT_TRUE(cut.ok()) << cut.status();
    const std::vector<int32_t>& got = (*cut)[0].token_ids;
    ASSERT_GT(got.size(), 2u);
    EXPECT_EQ(got[0], start[0]);
    EXPECT_EQ(got[1], end);
    GenerateResult after = (*cut)[0];
    after.token_ids.erase(after.token_ids.begin(), after.token_ids.begin() + 2);
    ExpectMatches(after);
  }

  // Not opened by the prompt: the first token may open it (here it does not), and the reply
  // is JSON from its start.
  r.params.reasoning_inside = false;
  r.params.reasoning_open = end;
  results = NewEngine()->Generate({r});
  ASSERT_TRUE(results.ok()) << results.status();
  ExpectMatches((*results)[0]);
}

TEST_F(StructuredOutputTest, RequestsItCannotServeAreRefused) {
  GenerateRequest r = Request("r", 0.0f, 1);
  auto no_vocab = NewEngine(/*with_vocab=*/false);
  absl::Status s = no_vocab->AddRequest(r);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(absl::StrContains(s.message(), "tokenizer.json")) << s;
  r.params.json_schema = R"({"type": "string", "pattern": "(x)\\1"})";
  s = NewEngine()->AddRequest(r);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(absl::StrContains(s.message(), "backreferences")) << s;
  r.params.json_schema = kSchema;
  r.params.regex = "a+";
  s = NewEngine()->AddRequest(r);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(absl::StrContains(s.message(), "one only")) << s;
  r.params.json_schema.clear();
  r.params.regex = "a(?=b)";
  s = NewEngine()->AddRequest(r);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(absl::StrContains(s.message(), "lookaround")) << s;
}

}  // namespace
}  // namespace pds::engine

// Structured output (engine/runtime/json_constraint.h): the schema subset compiles or is
// refused by name, texts are accepted exactly when they are JSON the schema accepts, the
// token mask equals trying every token, and random draws under the mask always end in JSON
// that parses and matches.
#include "engine/runtime/json_constraint.h"

#include <arpa/inet.h>

#include <algorithm>
#include <random>
#include <regex>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"

namespace pds::engine {
namespace {

using Json = nlohmann::ordered_json;

constexpr int32_t kStop = 0;

// Every single byte (ids 1..255; id 0 is the stop token), plus random multi-byte tokens over
// a JSON-ish alphabet, and a few special (unusable) ones.
std::shared_ptr<const TokenVocabulary> Vocabulary(int extra = 3000, uint32_t seed = 1) {
  std::vector<std::string> bytes = {"</s>"};
  std::vector<bool> usable = {false};
  for (int b = 1; b < 256; ++b) {
    bytes.push_back(std::string(1, static_cast<char>(b)));
    usable.push_back(true);
  }
  static const std::string kAlphabet = "{}[]\",:0123456789.-+eE \n\tabcdfnlrstuxyz\\/_\xC3\xA9";
  std::mt19937 rng(seed);
  for (int i = 0; i < extra; ++i) {
    std::string t;
    const int len = 2 + static_cast<int>(rng() % 5);
    for (int k = 0; k < len; ++k) t.push_back(kAlphabet[rng() % kAlphabet.size()]);
    bytes.push_back(t);
    usable.push_back(true);
  }
  for (const char* w : {"true", "false", "null", "\"name\"", "\": \"", "\", \"", "{\"", "\"}"}) {
    bytes.push_back(w);
    usable.push_back(true);
  }
  bytes.push_back("<|special|>");
  usable.push_back(false);
  return std::make_shared<TokenVocabulary>(std::move(bytes), std::move(usable),
                                           std::vector<int32_t>{kStop});
}

std::shared_ptr<const JsonSchema> Schema(const std::string& text) {
  auto s = JsonSchema::Compile(text);
  EXPECT_TRUE(s.ok()) << s.status() << " for " << text;
  return s.ok() ? *s : nullptr;
}

// Feeds `text` byte by byte (single-byte tokens): whether every byte is accepted, and then
// whether the text may end there.
std::pair<bool, bool> Feed(const std::shared_ptr<const JsonSchema>& schema,
                           const std::shared_ptr<const TokenVocabulary>& vocab,
                           const std::string& text) {
  JsonMatcher m(schema, vocab);
  for (char c : text) {
    if (!m.Accept(static_cast<uint8_t>(c))) return {false, false};
  }
  return {true, m.CanEnd()};
}

// Texts a schema accepts whole (`good`) and texts it refuses or that are not complete (`bad`).
struct Case {
  std::string schema;
  std::vector<std::string> good, bad;
};

void ExpectCases(const std::vector<Case>& cases,
                 const std::shared_ptr<const TokenVocabulary>& vocab) {
  for (const Case& c : cases) {
    const auto schema = Schema(c.schema);
    ASSERT_NE(schema, nullptr);
    for (const std::string& t : c.good) {
      EXPECT_EQ(Feed(schema, vocab, t), std::make_pair(true, true)) << c.schema << "\n" << t;
    }
    for (const std::string& t : c.bad) {
      EXPECT_NE(Feed(schema, vocab, t), std::make_pair(true, true)) << c.schema << "\n" << t;
    }
  }
}

TEST(JsonSchemaTest, RefusesWhatItDoesNotSupportByName) {
  struct Bad {
    std::string schema, message;
  };
  for (const Bad& b : std::vector<Bad>{
           {"{", "not valid JSON"},
           {R"({"type": "string", "pattern": "(a)\\1"})",
            "'/': regex at character 3: backreferences"},
           {R"({"type": "string", "pattern": 3})", "pattern must be a string"},
           {R"({"properties": {"x": {"uniqueItems": true}}})",
            "'/properties/x': the keyword 'uniqueItems'"},
           {R"({"type": "integer", "multipleOf": 0})", "multipleOf 0 is not above 0"},
           {R"({"type": "number", "multipleOf": 0.0001234})", "over 4096 states"},
           {R"({"type": "integer", "multipleOf": 5, "minimum": 1, "maximum": 4})",
            "no multiple of 5 is within its minimum and maximum"},
           {R"({"multipleOf": "2"})", "multipleOf must be a number"},
           {R"({"enum": [1, 7], "minimum": 8})", "no value of its enum or const is allowed"},
           {R"({"$defs": {"n": {"type": "null"}}, "$ref": "#/$defs/n", "enum": [1]})",
            "no value of its enum or const is allowed"},
           {R"({"enum": [1], "const": 2})", "const is not one of the enum's values"},
           {R"({"type": "integer", "minimum": 3.5, "exclusiveMaximum": 4})",
            "no integer is within its minimum and maximum"},
           {R"({"type": "number", "maximum": "7"})", "maximum must be a number"},
           {R"({"type": "number", "minimum": -1e-30, "maximum": -1e-30})",
            "needs more than 32 characters"},
           {R"({"type": "string", "format": "date", "maxLength": 8})",
            "no string within maxLength"},
           {R"({"type": "string", "pattern": "^a{1,3}$", "minLength": 5})",
            "no string within minLength and maxLength"},
           {R"({"type": "number", "minimum": 1e40})",
            "minimum: no number of at most 32 characters is above"},
           {R"({"type": "tuple"})", "unknown type 'tuple'"},
           {R"({"$ref": "#/$defs/missing"})", "names nothing"},
           {R"({"$ref": "http://x/y"})", "is not #"},
           {R"({"$defs": {"a": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"})",
            "refers only to itself"},
           {R"({"properties": {"a": {}}, "required": ["b"], "additionalProperties": false})",
            "not one of the properties, and additionalProperties is false"},
           {R"({"anyOf": []})", "non-empty"},
           {R"({"anyOf": [{}], "type": "string"})", "without other keywords"},
           {R"({"allOf": [{}, {}]})", "allOf"},
           {R"({"prefixItems": [{}], "items": false, "minItems": 2})",
            "minItems is above the 1 items allowed"},
           {R"({"prefixItems": [{}], "items": [{}]})", "items as a list beside prefixItems"},
           {R"({"properties": {"a": {}}, "minProperties": 2})", "minProperties is above"},
           {R"({"properties": {"a": {}}, "required": ["a"], "maxProperties": 0})",
            "maxProperties is below"},
           {R"({"minItems": 3, "maxItems": 2})", "minItems is above maxItems"},
           {R"({"type": "string", "maxLength": -1})", "non-negative"},
           {"false", "accepts nothing"},
           {R"({"type": "string", "minLength": 5, "maxLength": 2})", "minLength is above"},
           {R"({"$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"anyOf": [{"$ref": "#/$defs/a"}]}},
               "$ref": "#/$defs/a"})",
            "cycle"},
       }) {
    auto s = JsonSchema::Compile(b.schema);
    ASSERT_FALSE(s.ok()) << b.schema;
    EXPECT_EQ(s.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_TRUE(absl::StrContains(s.status().message(), b.message))
        << b.schema << ": " << s.status();
  }
}

// Hostile schemas are bounded: text nested too deep, types that multiply the compiled nodes,
// and anyOf fan-outs through $ref (each byte tries a bounded number of value starts).
TEST(JsonSchemaTest, HostileSchemasAreBounded) {
  std::string deep;
  for (int i = 0; i < 200; ++i) deep += R"({"items": )";
  deep += "{}" + std::string(200, '}');
  auto s = JsonSchema::Compile(deep);
  ASSERT_FALSE(s.ok());
  EXPECT_TRUE(absl::StrContains(s.status().message(), "deeper than 128")) << s.status();

  std::string multiplied = R"({"type": "string"})";
  for (int i = 0; i < 20; ++i) {  // 2^20 copies of the leaf
    multiplied = R"({"type": ["array", "array"], "items": )" + multiplied + "}";
  }
  s = JsonSchema::Compile(multiplied);
  ASSERT_FALSE(s.ok());
  EXPECT_TRUE(absl::StrContains(s.status().message(), "nodes")) << s.status();

  // a0 = anyOf[a1, a1, a1, a1], a1 = anyOf[a2 x4], ...: 4^20 paths to the leaf.
  Json defs = Json::object();
  for (int i = 0; i < 20; ++i) {
    const Json ref = {{"$ref", "#/$defs/a" + std::to_string(i + 1)}};
    defs["a" + std::to_string(i)] = {{"anyOf", {ref, ref, ref, ref}}};
  }
  defs["a20"] = {{"type", "integer"}};
  const auto fan = Schema(Json({{"$defs", defs}, {"$ref", "#/$defs/a0"}}).dump());
  ASSERT_NE(fan, nullptr);
  JsonMatcher m(fan, Vocabulary(0));
  m.AllowedTokens();  // finishes (whatever it allows)
}

TEST(JsonMatcherTest, AcceptsExactlyTheTextsTheSchemaAccepts) {
  const auto vocab = Vocabulary(0);
  const std::vector<Case> cases = {
      {R"({"type": "object"})",
       {"{}", R"({"a": [1, -2.5e+3, "x\"\u00e9\n", true, null, {}]})", " {\"k\" : {} }"},
       {"", "[]", "{", R"({"a" 1})", R"({"a": 01})", R"({"a": 1,})", R"({"a": "x
"})",
        "{} {}", R"({"a": tru})", R"({'a': 1})"}},
      {R"({"properties": {"name": {"type": "string", "maxLength": 3}, "age": {"type": "integer"},
          "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2}},
          "required": ["age"]})",
       {R"({"age": 3})", R"({"name": "abc", "age": -10})", R"({"age": 0, "tags": ["a", "b"]})",
        R"({"name":"\u00e9\n","age":1,"tags":[]})"},
       {R"({})", R"({"age": 1.5})", R"({"name": "abcd", "age": 1})", R"({"age": 1, "name": "a"})",
        R"({"age": 1, "x": 2})", R"({"age": 1, "tags": ["a", "b", "a"]})",
        R"({"age": 1, "tags": ["c"]})", R"({"name": "a"})"}},
      {R"({"anyOf": [{"type": "integer"}, {"type": "null"}, {"const": {"k": [1]}}]})",
       {"7", "null", R"({"k":[1]})", "-0"},
       {"7.5", "nul", R"({"k": [1]})", "\"7\""}},
      {R"({"$defs": {"node": {"type": "object", "properties": {"v": {"type": "number"},
          "next": {"anyOf": [{"$ref": "#/$defs/node"}, {"type": "null"}]}},
          "required": ["v", "next"]}}, "$ref": "#/$defs/node"})",
       {R"({"v": 1, "next": {"v": 2.5, "next": null}})"},
       {R"({"v": 1, "next": {"v": 2}})", R"({"v": 1})"}},
      {R"({"type": ["string", "boolean"], "minLength": 2})",
       {"\"ab\"", "true", "false"},
       {"\"a\"", "null", "\"\""}},
      {R"({"type": "array", "items": {"type": "object", "additionalProperties": {"type": "integer"}},
          "minItems": 1})",
       {R"([{}])", R"([{"x": 1, "y": 2}, {}])"},
       {"[]", R"([{"x": "1"}])"}},
  };
  ExpectCases(cases, vocab);
}

// Review findings: a large enum keeps every value (one frame follows the run of values that
// share what was written); an additional key may not take a declared name; a surrogate escape
// comes as a pair; a number never walks into a state it cannot end from.
TEST(JsonMatcherTest, EnumsExtraKeysSurrogatesAndNumberEnds) {
  const auto vocab = Vocabulary(0);
  Json values = Json::array();
  for (int i = 0; i < 300; ++i) values.push_back("v" + std::to_string(i));
  values.push_back("v2x");
  const auto big = Schema(Json({{"enum", values}}).dump());
  for (const char* t : {"\"v299\"", "\"v2\"", "\"v2x\"", "\"v29\"", "\"v0\""}) {
    EXPECT_EQ(Feed(big, vocab, t), std::make_pair(true, true)) << t;
  }
  EXPECT_FALSE(Feed(big, vocab, "\"v300\"").second);
  EXPECT_FALSE(Feed(big, vocab, "\"v2y").first);

  const auto extra = Schema(
      R"({"properties": {"age": {"type": "integer"}}, "additionalProperties": {"type": "string"}})");
  EXPECT_EQ(Feed(extra, vocab, R"({"age": 3, "name": "x"})"), std::make_pair(true, true));
  EXPECT_EQ(Feed(extra, vocab, R"({"nage": "x"})"), std::make_pair(true, true));
  EXPECT_NE(Feed(extra, vocab, R"({"age": "old"})"), std::make_pair(true, true));

  const auto str = Schema(R"({"type": "string", "maxLength": 2})");
  EXPECT_EQ(Feed(str, vocab, R"("\ud83d\ude00a")"), std::make_pair(true, true));  // a pair is one
  EXPECT_FALSE(Feed(str, vocab, R"("\ud83d")").first);
  EXPECT_FALSE(Feed(str, vocab, R"("\ude00")").first);
  EXPECT_FALSE(Feed(str, vocab, R"("\ud83d\u0041")").first);

  const auto num = Schema(R"({"type": "number"})");
  JsonMatcher m(num, vocab);
  for (int i = 0; i < 31; ++i) ASSERT_TRUE(m.Accept('1'));
  EXPECT_FALSE(m.Accept('.'));  // no room for a digit after it
  EXPECT_FALSE(m.Accept('e'));
  EXPECT_TRUE(m.Accept('2'));
  EXPECT_TRUE(m.CanEnd());
}

TEST(JsonMatcherTest, WhitespaceAndNumbersAreBounded) {
  const auto vocab = Vocabulary(0);
  const auto schema = Schema(R"({"type": "array", "items": {"type": "number"}})");
  EXPECT_TRUE(Feed(schema, vocab, "[" + std::string(16, ' ') + "1]").second);
  EXPECT_FALSE(Feed(schema, vocab, "[" + std::string(17, ' ') + "1]").first);
  EXPECT_TRUE(Feed(schema, vocab, "[" + std::string(32, '9') + "]").second);
  EXPECT_FALSE(Feed(schema, vocab, "[" + std::string(33, '9') + "]").first);
}

// The mask at every prefix of some replies equals trying each token on its own.
TEST(JsonMatcherTest, MaskEqualsTryingEveryToken) {
  const auto vocab = Vocabulary();
  const std::vector<std::pair<std::string, std::string>> replies = {
      {R"({"type": "object"})", R"({"name": "x\"y\u00e9z", "n": [1, -2.5e3, {}], "t": true})"},
      {R"({"properties": {"name": {"type": "string", "maxLength": 4}, "kind": {"enum": ["a", "bc"]},
          "n": {"type": "integer"}}, "required": ["kind"]})",
       R"({"name": "ab", "kind": "bc", "n": 12})"},
      {R"({"anyOf": [{"type": "number"}, {"type": "array", "items": {"type": "string"}}]})",
       R"(["a", "b\\"])"},
      {R"({"properties": {"e": {"enum": ["a", "ab", "abc", 1, 12]}, "s": {"type": "string"}},
          "additionalProperties": {"type": "integer"}})",
       R"({"e": "ab", "s": "\ud83d\ude00\u00e9", "x": 12})"},
  };
  std::vector<std::pair<std::shared_ptr<const JsonSchema>, std::string>> grammars;
  for (const auto& [text, reply] : replies) grammars.emplace_back(Schema(text), reply);
  grammars.emplace_back(
      Schema(R"({"properties": {"id": {"type": "string", "pattern": "^[a-f0-9]{2,}\\.x?$"},
          "d": {"type": "string", "format": "date", "maxLength": 10},
          "p": {"type": "string", "pattern": "\"", "maxLength": 5},
          "n": {"type": "integer", "minimum": -5, "maximum": 300},
          "x": {"type": "number", "exclusiveMinimum": 0, "maximum": 1}}})"),
      R"({"id": "a0f.", "d": "2026-01-31", "p": "\u00e9\"\\", "n": 250, "x": 0.05})");
  grammars.emplace_back(*JsonSchema::Regex("[a-z]+( [a-z]+)*: \\d{1,3}(\\.\\d+)?\n"),
                        "ab cd: 12.5\n");
  for (const auto& [schema, reply] : grammars) {
    const std::string text = reply;
    JsonMatcher m(schema, vocab);
    for (size_t i = 0; i <= reply.size(); ++i) {
      std::vector<int32_t> expected;
      for (int32_t id = 0; id < vocab->size(); ++id) {
        JsonMatcher copy = m;
        if (copy.Accept(id)) expected.push_back(id);
      }
      EXPECT_EQ(m.AllowedTokens(), expected) << text << " after '" << reply.substr(0, i) << "'";
      if (i < reply.size()) ASSERT_TRUE(m.Accept(static_cast<uint8_t>(reply[i])));
    }
    EXPECT_TRUE(m.CanEnd());
    EXPECT_TRUE(m.Done());
  }
}

// Random logits, masked, drawn until the matcher is done: always JSON that matches.
TEST(JsonMatcherTest, RandomDrawsEndInMatchingJson) {
  const auto vocab = Vocabulary();
  const auto schema = Schema(R"({"type": "object", "properties": {
      "name": {"type": "string", "maxLength": 8},
      "kind": {"enum": ["cat", "dog", 3]},
      "scores": {"type": "array", "items": {"type": "integer"}, "minItems": 1, "maxItems": 3},
      "extra": {"anyOf": [{"type": "boolean"}, {"type": "null"}]}},
      "required": ["kind", "scores"]})");
  std::mt19937 rng(7);
  std::uniform_real_distribution<float> logit(-4.0f, 4.0f);
  int done = 0;
  for (int trial = 0; trial < 200; ++trial) {
    JsonMatcher m(schema, vocab);
    std::string text;
    std::vector<float> logits(vocab->size() + 5);  // a padded vocabulary
    for (int step = 0; step < 400 && !m.Done(); ++step) {
      for (float& l : logits) l = logit(rng);
      ASSERT_TRUE(m.MaskLogits(logits.data(), static_cast<int64_t>(logits.size()))) << text;
      int32_t best = 0;
      for (int32_t id = 1; id < static_cast<int32_t>(logits.size()); ++id) {
        if (logits[id] > logits[best]) best = id;
      }
      ASSERT_LT(best, vocab->size());
      ASSERT_TRUE(m.Accept(best)) << text << " + " << vocab->bytes(best);
      if (best == kStop) break;
      text += vocab->bytes(best);
    }
    if (!m.Done()) continue;  // cut short by the step limit (max_tokens)
    ++done;
    const Json j = Json::parse(text, nullptr, false);
    ASSERT_FALSE(j.is_discarded()) << text;
    ASSERT_TRUE(j.is_object()) << text;
    ASSERT_TRUE(j.contains("kind") && j.contains("scores")) << text;
    EXPECT_TRUE(j["kind"] == "cat" || j["kind"] == "dog" || j["kind"] == 3) << text;
    ASSERT_TRUE(j["scores"].is_array()) << text;
    EXPECT_GE(j["scores"].size(), 1u);
    EXPECT_LE(j["scores"].size(), 3u);
    for (const Json& s : j["scores"]) EXPECT_TRUE(s.is_number_integer()) << text;
    if (j.contains("name")) {
      EXPECT_TRUE(j["name"].is_string()) << text;
    }
    if (j.contains("extra")) EXPECT_TRUE(j["extra"].is_boolean() || j["extra"].is_null()) << text;
    for (const auto& [k, v] : j.items()) {
      EXPECT_TRUE(k == "name" || k == "kind" || k == "scores" || k == "extra") << text;
    }
  }
  EXPECT_GT(done, 150);
}

// A string's pattern is searched for in its content as decoded (escapes and all); formats with
// a form are held to it; maxLength leaves room for the pattern to match.
TEST(JsonMatcherTest, PatternsAndFormatsHoldStringContent) {
  const auto vocab = Vocabulary(0);
  const std::vector<Case> cases = {
      {R"({"type": "string", "pattern": "^[a-z]+\\d?$"})",
       {R"("abc")", R"("a1")", R"("\u0061b")"},
       {R"("")", R"("A")", R"("a12")", R"("a b")"}},
      {R"({"pattern": "ab"})",  // unanchored: anything containing ab
       {R"("ab")", R"("xxaby")", R"("a\u0062")"},
       {R"("a b")", R"("ba")"}},
      {R"({"type": "string", "pattern": "^a\"b\n\\\\$"})",
       {R"("a\"b\n\\")", R"("a\u0022b\u000a\u005c")"},
       {R"("a\"b\\n")", R"("ab")"}},
      {R"({"type": "string", "pattern": "^\\u{1F600}é$"})",
       {"\"\xF0\x9F\x98\x80\xC3\xA9\"", R"("\ud83d\ude00\u00e9")"},
       {R"("\ud83d\ude01\u00e9")", R"("é")"}},
      {R"({"type": "string", "pattern": "^a+$", "maxLength": 3, "minLength": 2})",
       {R"("aa")", R"("aaa")"},
       {R"("a")", R"("aaaa")"}},
      {R"({"type": "string", "format": "date"})",
       {R"("2026-11-29")", R"("2024-02-29")", R"("2000-02-29")", R"("1999-12-31")",
        R"("2026-04-30")"},
       {R"("2026-13-01")", R"("2026-1-01")", R"("x")", R"("1999-02-31")", R"("2023-02-29")",
        R"("1900-02-29")", R"("2026-04-31")", R"("2026-00-10")"}},
      {R"({"type": "string", "format": "date-time"})",
       {R"("2026-11-29T09:30:00Z")", R"("2026-11-29T09:30:00.123+01:00")"},
       {R"("2026-11-29 09:30:00Z")", R"("2026-11-29T25:00:00Z")"}},
      {R"({"type": "string", "format": "uuid"})",
       {R"("123e4567-e89b-12d3-a456-426614174000")"},
       {R"("123e4567e89b12d3a456426614174000")"}},
      {R"({"type": "string", "format": "ipv4"})",
       {R"("10.0.255.1")"},
       {R"("256.1.1.1")", R"("1.2.3")"}},
      {R"({"type": "string", "format": "email"})", {R"("a.b@c.io")"}, {R"("a@b")", R"("@c.io")"}},
      {R"({"type": "string", "format": "hostname"})",
       {R"("a")", R"("pdserve-0.pdserve-registry.default.svc")", R"("X9")"},
       {R"("-a")", R"("a-")", R"("a..b")", R"("a b")", R"("")", R"("a.")"}},
      {R"({"type": "string", "format": "ipv6"})",
       {R"("::")", R"("::1")", R"("fe80::1:2")", R"("2001:db8:0:0:1:0:0:1")",
        R"("2001:DB8::8:800:200C:417A")", R"("::ffff:192.0.2.128")", R"("1::")",
        R"("1:2:3:4:5:6:7::")", R"("1:2:3:4:5:6::8")", R"("64:ff9b::10.0.0.1")"},
       {R"(":::")", R"("1:2:3:4:5:6:7:8:9")", R"("1::2::3")", R"("12345::")",
        R"("::ffff:256.0.0.1")", R"("1:2:3:4:5:6:7")", R"("g::")"}},
      {R"({"type": "string", "format": "duration"})",
       {R"("P3Y6M4DT12H30M5S")", R"("PT0S")", R"("P1W")", R"("P1M")", R"("PT36H")", R"("P1DT2M")"},
       {R"("P")", R"("PT")", R"("P1H")", R"("P1Y2W")", R"("1D")", R"("P1DT")", R"("PT1S2M")"}},
      {R"({"type": "number", "multipleOf": 0.25, "minimum": -1, "maximum": 1})",
       {"0", "-0", "0.25", "-1", "1", "0.5", "-0.75"},
       {"0.2", "1.25", "-1.25", "0.125", "0.500", "2.5e-1"}},
      {R"({"type": "integer", "multipleOf": 7})",
       {"0", "7", "-14", "700", "9999997"},
       {"1", "-8", "7.0", "70000001"}},
      {R"({"multipleOf": 1.5})",  // typeless: a number
       {"3", "4.5", "-1.5", "0"},
       {"1", "2.25", "1.50"}},
      {R"({"type": "integer", "minimum": -3, "exclusiveMaximum": 120})",
       {"-3", "0", "-0", "119", "42"},
       {"-4", "120", "1.5", "1e2", "007"}},
      {R"({"type": "number", "exclusiveMinimum": 0, "maximum": 1.5})",
       {"0.001", "1", "1.5", "1.50", "0.75"},
       {"0", "-0.5", "1.51", "2", "0.0"}},
      {R"({"minimum": 2.5, "exclusiveMinimum": true})",  // draft 4, typeless: a number
       {"2.51", "3"},
       {"2.5", "2"}},
      {R"({"type": ["integer", "null"], "maximum": -1})", {"-1", "-100", "null"}, {"0", "5"}},
      {R"({"type": "array", "prefixItems": [{"type": "integer"}, {"type": "string"}],
          "items": false})",
       {"[1, \"a\"]", "[1]", "[]"},
       {"[1, 2]", "[1, \"a\", 3]", "[\"a\"]"}},
      {R"({"prefixItems": [{"type": "integer"}], "items": {"type": "boolean"}, "minItems": 2})",
       {"[1, true]", "[1, false, true]"},
       {"[1]", "[1, 2]", "[true, true]"}},
      {R"({"items": [{"type": "integer"}], "additionalItems": false})",  // draft 4 tuples
       {"[1]", "[]"},
       {"[1, 2]", "[\"x\"]"}},
      {R"({"type": "object", "additionalProperties": {"type": "integer"}, "minProperties": 1,
          "maxProperties": 2})",
       {"{\"a\": 1}", "{\"a\": 1, \"b\": 2}"},
       {"{}", "{\"a\": 1, \"b\": 2, \"c\": 3}"}},
      {R"({"type": "string", "pattern": "^(N/A|\\d{4,})$", "minLength": 4})",
       {"\"1234\"", "\"12345\""},
       {"\"N", "\"123\""}},
      {R"({"properties": {"a": {}, "b": {}}, "required": ["b"], "maxProperties": 1})",
       {"{\"b\": 1}"},
       {"{\"a\"", "{}"}},
      {R"({"type": "number", "maximum": 1e308, "minimum": -1.7976931348623157e308})",
       {"5", "-3.25", "99999999999999999999"},
       {"x"}},
      {R"({"type": "integer", "enum": [1, 2, 3], "minimum": 2})",  // enum and its siblings
       {"2", "3"},
       {"1"}},
      {R"({"type": "string", "enum": ["a", "bb", 1], "maxLength": 1})", {"\"a\""}, {"\"bb\"", "1"}},
      {R"({"enum": [1, 2], "const": 2})", {"2"}, {"1"}},
      {R"({"$defs": {"small": {"type": "integer", "maximum": 2}},
          "properties": {"a": {"$ref": "#/$defs/small", "enum": [1, 3, "x", 2]}}})",
       {"{\"a\": 1}", "{\"a\": 2}"},  // enum beside a $ref: the values it allows
       {"{\"a\": 3}", "{\"a\": \"x\"}"}},
      {R"({"$defs": {"s": {"type": "string"}}, "$ref": "#/$defs/s", "enum": [1, "k"],
          "anyOf": [{"type": "string"}]})",  // (a combinator beside: the $ref wins, as before)
       {"\"k\"", "\"x\""},
       {"1"}},
      {R"({"$defs": {"s": {"type": "string"}}, "$ref": "#/$defs/s", "const": "k"})",
       {"\"k\""},
       {"\"x\"", "1"}},
      {R"({"type": "object", "required": ["a"]})",  // an additional member, then required
       {"{\"a\": 1}", "{\"a\": {}, \"b\": 2}"},
       {"{}", "{\"b\": 2}"}},
      {R"({"properties": {"x": {"type": "integer"}}, "required": ["y"],
          "additionalProperties": {"type": "string"}})",
       {"{\"x\": 1, \"y\": \"s\"}", "{\"y\": \"s\"}"},
       {"{\"y\": 1}", "{\"x\": 1}"}},
      {R"({"properties": {"a": {}, "b": {}, "c": {}}, "minProperties": 2})",
       {"{\"a\": 1, \"c\": 2}", "{\"b\": 1, \"c\": 2}", "{\"a\": 1, \"b\": 2, \"c\": 3}"},
       {"{\"c\": 1}", "{\"a\": 1}", "{}"}},
  };
  ExpectCases(cases, vocab);
  // With maxLength, a pattern that needs more characters than are left is refused early.
  JsonMatcher m(Schema(R"({"type": "string", "pattern": "^x*abc$", "maxLength": 4})"), vocab);
  ASSERT_TRUE(m.Accept('"'));
  ASSERT_TRUE(m.Accept('x'));
  EXPECT_FALSE(JsonMatcher(m).Accept('x'));  // "xx" leaves 2 for "abc"
  EXPECT_TRUE(m.Accept('a'));
}

// Random draws under patterns never reach a dead end (escapes included: a \\u escape's digits
// stay within characters the pattern takes) and end in strings that match; the same for
// formats, bounds and multiples.
TEST(JsonMatcherTest, RandomDrawsUnderPatternsMatch) {
  const auto vocab = Vocabulary();
  const auto schema = Schema(R"({"type": "object", "properties": {
      "d": {"type": "string", "format": "date"},
      "w": {"type": "string", "pattern": "^[a-c\"]+ é?\\d$", "maxLength": 6},
      "e": {"type": "string", "pattern": "^\\u{1F600}+$"},
      "n": {"type": "integer", "minimum": -5, "exclusiveMaximum": 300},
      "x": {"type": "number", "exclusiveMinimum": 0, "maximum": 1.5},
      "t": {"prefixItems": [{"type": "integer", "minimum": 0, "maximum": 9}, {"enum": ["x", "y"]}],
            "items": false, "minItems": 1},
      "o": {"properties": {"a": {"type": "integer"}, "b": {"type": "integer"},
            "c": {"type": "integer"}}, "minProperties": 2, "maxProperties": 2},
      "m": {"type": "number", "multipleOf": 0.25, "minimum": -3, "maximum": 3},
      "k": {"type": "integer", "multipleOf": 7, "minimum": -1000, "maximum": 1000},
      "v6": {"type": "string", "format": "ipv6"},
      "du": {"type": "string", "format": "duration", "maxLength": 12},
      "hn": {"type": "string", "format": "hostname", "maxLength": 12}},
      "required": ["d", "w", "e", "n", "x", "t", "o", "m", "k", "v6", "du", "hn"]})");
  ASSERT_NE(schema, nullptr);
  std::mt19937 rng(11);
  std::uniform_real_distribution<float> logit(-4.0f, 4.0f);
  int done = 0;
  for (int trial = 0; trial < 200; ++trial) {
    JsonMatcher m(schema, vocab);
    std::string text;
    std::vector<float> logits(vocab->size());
    for (int step = 0; step < 600 && !m.Done(); ++step) {
      for (float& l : logits) l = logit(rng);
      ASSERT_TRUE(m.MaskLogits(logits.data(), static_cast<int64_t>(logits.size()))) << text;
      const int32_t best =
          static_cast<int32_t>(std::max_element(logits.begin(), logits.end()) - logits.begin());
      ASSERT_TRUE(m.Accept(best)) << text << " + " << vocab->bytes(best);
      if (best == kStop) break;
      text += vocab->bytes(best);
    }
    if (!m.Done()) continue;
    ++done;
    const Json j = Json::parse(text, nullptr, false);
    ASSERT_TRUE(j.is_object()) << text;
    EXPECT_TRUE(std::regex_match(j["d"].get<std::string>(),
                                 std::regex("\\d{4}-(0[1-9]|1[0-2])-(0[1-9]|[12]\\d|3[01])")))
        << text;
    const std::string w = j["w"].get<std::string>();
    EXPECT_TRUE(std::regex_match(w, std::regex("[a-c\"]+ (\xC3\xA9)?\\d"))) << text;
    EXPECT_LE(w.size() - (absl::StrContains(w, "\xC3\xA9") ? 1 : 0), 6u) << text;
    const std::string e = j["e"].get<std::string>();
    EXPECT_TRUE(!e.empty() && e.size() % 4 == 0 && e.rfind("\xF0\x9F\x98\x80", 0) == 0) << text;
    ASSERT_TRUE(j["n"].is_number_integer()) << text;
    EXPECT_TRUE(j["n"].get<int64_t>() >= -5 && j["n"].get<int64_t>() < 300) << text;
    ASSERT_TRUE(j["x"].is_number()) << text;
    EXPECT_TRUE(j["x"].get<double>() > 0 && j["x"].get<double>() <= 1.5) << text;
    ASSERT_TRUE(j["t"].is_array() && !j["t"].empty() && j["t"].size() <= 2) << text;
    EXPECT_TRUE(j["t"][0].is_number_integer() && j["t"][0] >= 0 && j["t"][0] <= 9) << text;
    if (j["t"].size() == 2) EXPECT_TRUE(j["t"][1] == "x" || j["t"][1] == "y") << text;
    ASSERT_TRUE(j["o"].is_object()) << text;
    EXPECT_EQ(j["o"].size(), 2u) << text;
    ASSERT_TRUE(j["m"].is_number()) << text;
    const double quarters = j["m"].get<double>() * 4;
    EXPECT_TRUE(quarters == std::floor(quarters) && std::abs(quarters) <= 12) << text;
    ASSERT_TRUE(j["k"].is_number_integer()) << text;
    EXPECT_TRUE(j["k"].get<int64_t>() % 7 == 0 && std::abs(j["k"].get<int64_t>()) <= 1000) << text;
    unsigned char v6[16];
    EXPECT_EQ(inet_pton(AF_INET6, j["v6"].get<std::string>().c_str(), v6), 1) << text;
    EXPECT_TRUE(std::regex_match(
        j["du"].get<std::string>(),
        std::regex(
            "P((\\d+D|\\d+M(\\d+D)?|\\d+Y(\\d+M(\\d+D)?)?)(T(\\d+H(\\d+M(\\d+S)?)?|\\d+M(\\d+S)?|"
            "\\d+S))?|T(\\d+H(\\d+M(\\d+S)?)?|\\d+M(\\d+S)?|\\d+S)|\\d+W)")))
        << text;
    EXPECT_TRUE(std::regex_match(j["hn"].get<std::string>(),
                                 std::regex("[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?(\\.[A-Za-z0-9]("
                                            "[A-Za-z0-9-]*[A-Za-z0-9])?)*")))
        << text;
  }
  EXPECT_GT(done, 150);
}

// Reasoning first: free until its end token, then constrained; or, when the prompt did not
// open it, the first token may open it and any other starts the constrained reply.
TEST(JsonMatcherTest, ReasoningComesBeforeTheConstraint) {
  const auto vocab = Vocabulary(0);
  const int32_t open = vocab->size() - 1, end = 'Z';
  const auto schema = Schema(R"({"type": "integer"})");
  JsonMatcher inside(schema, vocab);
  inside.ReasonFirst(open, end, /*inside=*/true);
  EXPECT_TRUE(inside.Free());
  EXPECT_EQ(inside.AllowedTokens().size(), static_cast<size_t>(vocab->size()));
  EXPECT_FALSE(inside.CanEnd());
  for (char c : std::string("hmm, {[")) EXPECT_TRUE(inside.Accept(static_cast<uint8_t>(c)));
  EXPECT_FALSE(inside.Done());
  EXPECT_TRUE(inside.Accept(end));
  EXPECT_FALSE(inside.Free());
  EXPECT_FALSE(inside.Accept('x'));
  EXPECT_TRUE(inside.Accept('7'));
  EXPECT_TRUE(inside.CanEnd());

  // A stop token would end the reply unconstrained: refused; the end spelled as text closes it.
  JsonMatcher spelled(schema, vocab);
  spelled.ReasonFirst(open, end, /*inside=*/true);
  EXPECT_FALSE(spelled.Accept(kStop));
  for (char c : std::string("so </think")) ASSERT_TRUE(spelled.Accept(static_cast<uint8_t>(c)));
  EXPECT_TRUE(spelled.Free());
  ASSERT_TRUE(spelled.Accept('>'));
  EXPECT_FALSE(spelled.Free());
  EXPECT_FALSE(spelled.Accept('x'));

  JsonMatcher may(schema, vocab);
  may.ReasonFirst(open, end, /*inside=*/false);
  EXPECT_FALSE(may.Free());
  std::vector<int32_t> allowed = may.AllowedTokens();
  EXPECT_NE(std::find(allowed.begin(), allowed.end(), open), allowed.end());
  EXPECT_EQ(std::find(allowed.begin(), allowed.end(), 'x'), allowed.end());
  EXPECT_FALSE(may.Accept('x'));  // refused, and still the first token
  JsonMatcher opened = may;
  EXPECT_TRUE(opened.Accept(open));
  EXPECT_TRUE(opened.Free());
  EXPECT_TRUE(may.Accept('4'));  // the constrained reply, from its first token
  EXPECT_FALSE(may.Accept(open));
  EXPECT_TRUE(may.CanEnd());
}

// A regex grammar: the whole reply matches, ended by a stop token or by a final state.
TEST(JsonMatcherTest, RegexRepliesMatchWhole) {
  const auto vocab = Vocabulary(0);
  auto schema = JsonSchema::Regex("(yes|no)( maybe)?");
  ASSERT_TRUE(schema.ok()) << schema.status();
  EXPECT_EQ(Feed(*schema, vocab, "yes"), std::make_pair(true, true));
  EXPECT_EQ(Feed(*schema, vocab, "no maybe"), std::make_pair(true, true));
  EXPECT_EQ(Feed(*schema, vocab, "no may"), std::make_pair(true, false));
  EXPECT_EQ(Feed(*schema, vocab, " yes").first, false);
  JsonMatcher m(*schema, vocab);
  for (char c : std::string("no maybe")) ASSERT_TRUE(m.Accept(static_cast<uint8_t>(c)));
  EXPECT_TRUE(m.Done());
  JsonMatcher open(*schema, vocab);
  ASSERT_TRUE(open.Accept('n'));
  ASSERT_TRUE(open.Accept('o'));
  EXPECT_FALSE(open.Done());  // " maybe" may follow
  EXPECT_TRUE(open.Accept(kStop));
  auto bad = JsonSchema::Regex("(a");
  ASSERT_FALSE(bad.ok());
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(JsonMatcherTest, SpecialTokensAndStopsAreKeptOut) {
  const auto vocab = Vocabulary(0);
  JsonMatcher m(Schema(R"({"type": "integer"})"), vocab);
  std::vector<int32_t> allowed = m.AllowedTokens();
  EXPECT_EQ(allowed.front(), '\t');           // no stop before any value; whitespace may lead
  EXPECT_FALSE(m.Accept(vocab->size() - 1));  // the special token
  EXPECT_FALSE(m.Accept(kStop));
  ASSERT_TRUE(m.Accept('4'));
  EXPECT_TRUE(m.CanEnd());
  EXPECT_FALSE(m.Done());  // more digits may come
  allowed = m.AllowedTokens();
  EXPECT_EQ(allowed.front(), kStop);
  EXPECT_TRUE(m.Accept(kStop));
}

}  // namespace
}  // namespace pds::engine

// Tokenizer behaviour that holds for any tokenizer.json: round trips, special tokens, invalid
// UTF-8, streaming decode, SentencePiece-style byte fallback, and clear errors. Token-for-
// token agreement with the HF reference on real tokenizer files is tests/tokenizer.
#include "engine/tokenizer/tokenizer.h"

#include <random>

#include "engine/tokenizer/bpe_builder.h"
#include "engine/tokenizer/unicode.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"

namespace pds::engine {
namespace {

const std::vector<std::string>& Samples() {
  static const std::vector<std::string> samples = {
      "Hello, world! It's a test.",
      "  leading and trailing spaces  ",
      "tabs\tand\nnewlines\r\n",
      "数字 12345678901234567890 and 3.14159",
      "Привет, мир! Γειά σου κόσμε",
      "emoji 👍🏽 family 👨‍👩‍👧‍👦 flag 🇩🇪",
      "مرحبا بالعالم नमस्ते दुनिया",
      "code: for (int i = 0; i < n; ++i) { x += y; }",
      "",
  };
  return samples;
}

class ByteLevelTokenizerTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto generated = BuildByteLevelBpeTokenizer(2048, 5);
    ASSERT_TRUE(generated.ok()) << generated.status();
    generated_ = *generated;
    auto tok = Tokenizer::FromJson(generated_.tokenizer_json, "generated");
    ASSERT_TRUE(tok.ok()) << tok.status();
    tok_ = std::move(*tok);
  }
  GeneratedTokenizer generated_;
  std::unique_ptr<Tokenizer> tok_;
};

TEST_F(ByteLevelTokenizerTest, RoundTripsAndAddsBos) {
  EXPECT_EQ(tok_->vocab_size(), 2048);
  for (const std::string& s : Samples()) {
    const auto ids = tok_->Encode(s);
    ASSERT_FALSE(ids.empty());
    EXPECT_EQ(ids[0], generated_.bos_id) << s;
    EXPECT_EQ(tok_->Decode(ids, /*skip_special_tokens=*/true), s);
    const auto plain = tok_->Encode(s, /*add_special_tokens=*/false);
    EXPECT_EQ(std::vector<int32_t>(ids.begin() + 1, ids.end()), plain);
    EXPECT_EQ(tok_->Decode(plain), s);
  }
  // Each token's bytes, joined, are the text (byte-level tokens map back to raw bytes).
  for (const std::string& s : Samples()) {
    std::string joined;
    for (int32_t id : tok_->Encode(s, false)) joined += tok_->TokenBytes(id);
    EXPECT_EQ(joined, s);
  }
  // Merges compress common text well below one token per byte.
  const std::string text = "the quick brown fox jumps over the lazy dog and the cat";
  EXPECT_LT(tok_->Encode(text, false).size(), text.size() / 2);
}

TEST_F(ByteLevelTokenizerTest, SpecialTokensInTextAreMatchedWhole) {
  const auto ids = tok_->Encode("a<|end_of_text|>b<|eot_id|>", false);
  EXPECT_NE(std::find(ids.begin(), ids.end(), generated_.eos_id), ids.end());
  EXPECT_EQ(ids.back(), generated_.eot_id);
  EXPECT_EQ(tok_->Decode(ids), "a<|end_of_text|>b<|eot_id|>");
  EXPECT_EQ(tok_->Decode(ids, true), "ab");
  EXPECT_TRUE(tok_->IsSpecial(generated_.eos_id));
  EXPECT_EQ(tok_->TokenToId("<|eot_id|>"), generated_.eot_id);
}

TEST_F(ByteLevelTokenizerTest, InvalidUtf8BecomesReplacementCharacters) {
  const std::string bad = "ok\x80 \xE2\x82 \xFF\xC0\xAF end";
  EXPECT_EQ(SanitizeUtf8(bad),
            "ok\xEF\xBF\xBD \xEF\xBF\xBD \xEF\xBF\xBD\xEF\xBF\xBD\xEF\xBF\xBD end");
  const auto ids = tok_->Encode(bad, false);
  EXPECT_EQ(tok_->Decode(ids), SanitizeUtf8(bad));
  EXPECT_EQ(ids, tok_->Encode(SanitizeUtf8(bad), false));
}

TEST_F(ByteLevelTokenizerTest, StreamingDecodeNeverSplitsCharactersAndLosesNothing) {
  for (const std::string& s : Samples()) {
    const auto ids = tok_->Encode(s, false);
    StreamDecoder stream(*tok_);
    std::string joined;
    for (int32_t id : ids) {
      const std::string piece = stream.Add(id);
      EXPECT_TRUE(IsValidUtf8(piece)) << "broken UTF-8 emitted for " << s;
      joined += piece;
    }
    joined += stream.Finish();
    EXPECT_EQ(joined, s);
  }
}

// Streaming with skip_special_tokens (the front-end's streamed text): special tokens anywhere
// in the stream (BOS first, EOS between pieces and last) add no text, the rest is the
// non-streaming decode's.
TEST_F(ByteLevelTokenizerTest, StreamingDecodeSkipsSpecialTokens) {
  ASSERT_TRUE(tok_->IsSpecial(generated_.bos_id));
  ASSERT_TRUE(tok_->IsSpecial(generated_.eos_id));
  for (const std::string& s : Samples()) {
    std::vector<int32_t> ids = tok_->Encode(s);  // BOS first
    ids.insert(ids.begin() + static_cast<std::ptrdiff_t>(ids.size() / 2), generated_.eos_id);
    ids.push_back(generated_.eos_id);
    StreamDecoder stream(*tok_, /*skip_special_tokens=*/true);
    std::string joined;
    for (int32_t id : ids) {
      const std::string piece = stream.Add(id);
      EXPECT_TRUE(IsValidUtf8(piece)) << s;
      joined += piece;
    }
    joined += stream.Finish();
    EXPECT_EQ(joined, tok_->Decode(ids, /*skip_special_tokens=*/true)) << s;
    EXPECT_EQ(joined.find(tok_->Decode({generated_.eos_id})), std::string::npos) << s;
  }
}

// A SentencePiece-style BPE (Llama 2 layout): metaspace normalizer, byte fallback, <s>.
std::string SentencePieceJson() {
  nlohmann::ordered_json vocab;
  int id = 0;
  for (const char* t : {"<unk>", "<s>", "</s>"}) vocab[t] = id++;
  for (int b = 0; b < 256; ++b) {
    char name[8];
    std::snprintf(name, sizeof(name), "<0x%02X>", b);
    vocab[name] = id++;
  }
  const std::vector<std::string> pieces = {"\xE2\x96\x81",
                                           "h",
                                           "e",
                                           "l",
                                           "o",
                                           "w",
                                           "r",
                                           "d",
                                           "\xE2\x96\x81h",
                                           "ll",
                                           "\xE2\x96\x81he",
                                           "\xE2\x96\x81hell",
                                           "\xE2\x96\x81hello",
                                           "\xE2\x96\x81w",
                                           "or",
                                           "\xE2\x96\x81wor",
                                           "ld",
                                           "\xE2\x96\x81world"};
  for (const auto& p : pieces) vocab[p] = id++;
  nlohmann::ordered_json j;
  j["version"] = "1.0";
  j["added_tokens"] = {{{"id", 0}, {"content", "<unk>"}, {"special", true}},
                       {{"id", 1}, {"content", "<s>"}, {"special", true}},
                       {{"id", 2}, {"content", "</s>"}, {"special", true}}};
  j["normalizer"] = {
      {"type", "Sequence"},
      {"normalizers",
       {{{"type", "Prepend"}, {"prepend", "\xE2\x96\x81"}},
        {{"type", "Replace"}, {"pattern", {{"String", " "}}}, {"content", "\xE2\x96\x81"}}}}};
  j["pre_tokenizer"] = nullptr;
  j["post_processor"] = {
      {"type", "TemplateProcessing"},
      {"single",
       {{{"SpecialToken", {{"id", "<s>"}, {"type_id", 0}}}},
        {{"Sequence", {{"id", "A"}, {"type_id", 0}}}}}},
      {"special_tokens", {{"<s>", {{"id", "<s>"}, {"ids", {1}}, {"tokens", {"<s>"}}}}}}};
  j["decoder"] = {
      {"type", "Sequence"},
      {"decoders",
       {{{"type", "Replace"}, {"pattern", {{"String", "\xE2\x96\x81"}}}, {"content", " "}},
        {{"type", "ByteFallback"}},
        {{"type", "Fuse"}},
        {{"type", "Strip"}, {"content", " "}, {"start", 1}, {"stop", 0}}}}};
  j["model"] = {
      {"type", "BPE"},
      {"unk_token", "<unk>"},
      {"byte_fallback", true},
      {"fuse_unk", true},
      {"vocab", vocab},
      {"merges",
       {"\xE2\x96\x81 h", "l l", "\xE2\x96\x81h e", "\xE2\x96\x81he ll", "\xE2\x96\x81hell o",
        "\xE2\x96\x81 w", "o r", "\xE2\x96\x81w or", "l d", "\xE2\x96\x81wor ld"}}};
  return j.dump();
}

TEST(SentencePieceTokenizerTest, MergesByteFallbackAndDecoderChain) {
  auto tok = Tokenizer::FromJson(SentencePieceJson(), "sp");
  ASSERT_TRUE(tok.ok()) << tok.status();
  const int32_t hello = *(*tok)->TokenToId("\xE2\x96\x81hello");
  const int32_t world = *(*tok)->TokenToId("\xE2\x96\x81world");
  EXPECT_EQ((*tok)->Encode("hello world"), (std::vector<int32_t>{1, hello, world}));
  // "é" is not in the vocabulary: its two UTF-8 bytes fall back to <0xC3><0xA9>.
  const auto ids = (*tok)->Encode("hello é", false);
  ASSERT_EQ(ids.size(), 4u);
  EXPECT_EQ(ids[2], 3 + 0xC3);
  EXPECT_EQ(ids[3], 3 + 0xA9);
  EXPECT_EQ((*tok)->Decode(ids), "hello é");
  EXPECT_EQ((*tok)->Decode((*tok)->Encode("hello world")), "<s> hello world");
  EXPECT_EQ((*tok)->Decode((*tok)->Encode("hello world"), true), "hello world");
  // A lone fallback byte that is not valid UTF-8 decodes to U+FFFD.
  EXPECT_EQ((*tok)->Decode({3 + 0xC3}), "\xEF\xBF\xBD");
  StreamDecoder stream(**tok);
  std::string joined;
  for (int32_t id : ids) joined += stream.Add(id);
  joined += stream.Finish();
  EXPECT_EQ(joined, "hello é");
}

// TokenBytes: each token's bytes after other text (the metaspace is a space, fallback bytes
// are raw, even when they are half a character).
TEST(SentencePieceTokenizerTest, TokenBytesAreWhatEachTokenAdds) {
  auto tok = Tokenizer::FromJson(SentencePieceJson(), "sp");
  ASSERT_TRUE(tok.ok()) << tok.status();
  const auto ids = (*tok)->Encode("hello world é", false);
  std::string joined;
  for (int32_t id : ids) joined += (*tok)->TokenBytes(id);
  EXPECT_EQ(joined, " hello world é");
  EXPECT_EQ((*tok)->TokenBytes(3 + 0xC3), "\xC3");
  EXPECT_EQ((*tok)->TokenBytes(-1), "");
}

// ByteFallback turns a run of byte tokens that is invalid UTF-8 as a whole into one U+FFFD
// per byte, so bytes that already went out as a character decode differently once more bytes
// follow. The stream must still emit only valid UTF-8 and never repeat what it emitted.
TEST(SentencePieceTokenizerTest, StreamingDecodeSurvivesByteRunsThatTurnInvalid) {
  auto tok = Tokenizer::FromJson(SentencePieceJson(), "sp");
  ASSERT_TRUE(tok.ok()) << tok.status();
  auto byte = [](int b) { return 3 + b; };
  const std::string fffd = "\xEF\xBF\xBD";
  auto stream = [&](const std::vector<int32_t>& ids) {
    StreamDecoder decoder(**tok);
    std::string joined;
    for (int32_t id : ids) {
      const std::string piece = decoder.Add(id);
      EXPECT_TRUE(IsValidUtf8(piece)) << "broken UTF-8 from Add";
      joined += piece;
    }
    const std::string rest = decoder.Finish();
    EXPECT_TRUE(IsValidUtf8(rest)) << "broken UTF-8 from Finish";
    return joined + rest;
  };
  // 😀, then an emoji cut off after two bytes.
  EXPECT_EQ(stream({byte(0xF0), byte(0x9F), byte(0x98), byte(0x80), byte(0xF0), byte(0x9F)}),
            "\xF0\x9F\x98\x80" + fffd + fffd);
  // é, a lone lead byte, then an ordinary token.
  const int32_t h = *(*tok)->TokenToId("h");
  EXPECT_EQ(stream({byte(0xC3), byte(0xA9), byte(0xE2), h}), "\xC3\xA9" + fffd + "h");
  // Random mixes of bytes and tokens: every piece valid, and where the whole decode has no
  // U+FFFD (so no run was re-decoded) the pieces add up to it exactly.
  std::mt19937 rng(7);
  for (int trial = 0; trial < 2000; ++trial) {
    std::vector<int32_t> ids;
    const int n = 1 + static_cast<int>(rng() % 12);
    for (int k = 0; k < n; ++k) {
      const uint32_t r = rng() % 10;
      ids.push_back(r < 2 ? h
                          : byte(r < 6 ? 0x80 + static_cast<int>(rng() % 64)
                                       : 0xC2 + static_cast<int>(rng() % 0x33)));
    }
    const std::string joined = stream(ids);
    const std::string whole = (*tok)->Decode(ids);
    if (whole.find(fffd) == std::string::npos) {
      EXPECT_EQ(joined, whole);
    }
  }
}

// The newer layout of the same tokenizer (Mistral v0.3 style): no normalizer, a Metaspace
// pre-tokenizer that prepends to the first section only, and a Metaspace decoder.
TEST(SentencePieceTokenizerTest, MetaspacePreTokenizerMatchesLegacyLayout) {
  auto legacy = Tokenizer::FromJson(SentencePieceJson(), "legacy");
  ASSERT_TRUE(legacy.ok()) << legacy.status();
  auto j = nlohmann::json::parse(SentencePieceJson());
  j["normalizer"] = nullptr;
  j["pre_tokenizer"] = {{"type", "Metaspace"},
                        {"replacement", "\xE2\x96\x81"},
                        {"prepend_scheme", "first"},
                        {"split", false}};
  j["decoder"] = {
      {"type", "Sequence"},
      {"decoders",
       {{{"type", "Metaspace"}, {"replacement", "\xE2\x96\x81"}, {"prepend_scheme", "first"}},
        {{"type", "ByteFallback"}},
        {{"type", "Fuse"}}}}};
  auto modern = Tokenizer::FromJson(j.dump(), "modern");
  ASSERT_TRUE(modern.ok()) << modern.status();
  for (const std::string text : {"hello world", "hello  world é", "world hello"}) {
    const auto ids = (*modern)->Encode(text, false);
    EXPECT_EQ(ids, (*legacy)->Encode(text, false)) << text;
    EXPECT_EQ((*modern)->Decode(ids), text);
  }
  // Split with every behaviour on the same input.
  for (const auto& [behavior, expected] :
       std::vector<std::pair<std::string, std::string>>{{"Isolated", "[a][-][b][-][-][c]"},
                                                        {"Removed", "[a][b][c]"},
                                                        {"MergedWithPrevious", "[a-][b-][-][c]"},
                                                        {"MergedWithNext", "[a][-b][-][-c]"}}) {
    nlohmann::json split = nlohmann::json::parse(SentencePieceJson());
    split["normalizer"] = nullptr;
    split["pre_tokenizer"] = {{"type", "Split"},
                              {"pattern", {{"String", "-"}}},
                              {"behavior", behavior},
                              {"invert", false}};
    // Each expected piece is a vocab entry and ignore_merges maps a whole piece to its one
    // id, so the ids spell out the piece boundaries.
    split["model"]["vocab"]["a"] = 1000;
    split["model"]["vocab"]["b"] = 1001;
    split["model"]["vocab"]["c"] = 1002;
    split["model"]["vocab"]["-"] = 1003;
    split["model"]["vocab"]["a-"] = 1004;
    split["model"]["vocab"]["b-"] = 1005;
    split["model"]["vocab"]["b--"] = 1006;
    split["model"]["vocab"]["-b"] = 1007;
    split["model"]["vocab"]["--"] = 1008;
    split["model"]["vocab"]["--c"] = 1009;
    split["model"]["vocab"]["-c"] = 1010;
    split["model"]["ignore_merges"] = true;  // a piece that is a vocab entry is one token
    auto tok = Tokenizer::FromJson(split.dump(), "split");
    ASSERT_TRUE(tok.ok()) << tok.status();
    std::string pieces;
    for (int32_t id : (*tok)->Encode("a-b--c", false)) pieces += "[" + *(*tok)->IdToToken(id) + "]";
    EXPECT_EQ(pieces, expected) << behavior;
  }
}

// HF's Metaspace pre-tokenizer with split: true cuts before every ▁ but one at the very
// start, also in pieces that got no ▁ prepended (after an added token, or prepend "never").
TEST(SentencePieceTokenizerTest, MetaspaceSplitsBeforeEveryReplacement) {
  const std::string m = "\xE2\x96\x81";  // ▁
  auto j = nlohmann::json::parse(SentencePieceJson());
  j["normalizer"] = nullptr;
  j["pre_tokenizer"] = {
      {"type", "Metaspace"}, {"replacement", m}, {"prepend_scheme", "first"}, {"split", true}};
  j["model"]["vocab"]["x"] = 1000;
  j["model"]["vocab"]["a"] = 1001;
  j["model"]["vocab"]["b"] = 1002;
  j["model"]["vocab"][m + "b"] = 1003;
  j["model"]["ignore_merges"] = true;  // a piece that is a vocab entry is one token
  auto tok = Tokenizer::FromJson(j.dump(), "metaspace");
  ASSERT_TRUE(tok.ok()) << tok.status();
  auto pieces = [&](const std::string& text) {
    std::string out;
    for (int32_t id : (*tok)->Encode(text, false)) out += "[" + *(*tok)->IdToToken(id) + "]";
    return out;
  };
  EXPECT_EQ(pieces("x<s>a b"), "[" + m + "][x][<s>][a][" + m + "b]");
  j["pre_tokenizer"]["prepend_scheme"] = "never";
  tok = Tokenizer::FromJson(j.dump(), "metaspace");
  ASSERT_TRUE(tok.ok()) << tok.status();
  EXPECT_EQ(pieces("a b"), "[a][" + m + "b]");
  EXPECT_EQ(pieces("a  b"), "[a][" + m + "][" + m + "b]");
}

// HF's Metaspace decoder (decode_chain): unless prepend_scheme is "never", every ▁ of the
// first token is dropped, not only a leading one; in later tokens each ▁ becomes a space.
TEST(SentencePieceTokenizerTest, MetaspaceDecoderDropsReplacementsOfFirstToken) {
  const std::string m = "\xE2\x96\x81";  // ▁
  auto j = nlohmann::json::parse(SentencePieceJson());
  j["decoder"] = {{"type", "Metaspace"}, {"replacement", m}, {"prepend_scheme", "first"}};
  j["model"]["vocab"][m + m] = 1000;
  j["model"]["vocab"]["a"] = 1001;
  j["model"]["vocab"][m + "a" + m + "b"] = 1002;
  auto tok = Tokenizer::FromJson(j.dump(), "metaspace");
  ASSERT_TRUE(tok.ok()) << tok.status();
  EXPECT_EQ((*tok)->Decode({1000, 1001}), "a");
  EXPECT_EQ((*tok)->Decode({1002}), "ab");
  EXPECT_EQ((*tok)->Decode({1001, 1002}), "a a b");
  j["decoder"]["prepend_scheme"] = "never";
  tok = Tokenizer::FromJson(j.dump(), "metaspace");
  ASSERT_TRUE(tok.ok()) << tok.status();
  EXPECT_EQ((*tok)->Decode({1000, 1001}), "  a");
  EXPECT_EQ((*tok)->Decode({1002}), " a b");
}

TEST(TokenizerErrorsTest, UnsupportedComponentsAreNamed) {
  auto base = nlohmann::json::parse(SentencePieceJson());
  auto expect_error = [](const nlohmann::json& j, const std::string& fragment) {
    auto tok = Tokenizer::FromJson(j.dump(), "tok.json");
    ASSERT_FALSE(tok.ok());
    EXPECT_EQ(tok.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_NE(tok.status().message().find(fragment), std::string::npos) << tok.status();
    EXPECT_NE(tok.status().message().find("tok.json"), std::string::npos) << tok.status();
  };
  auto j = base;
  j["model"]["type"] = "WordPiece";
  expect_error(j, "WordPiece");
  j = base;
  j["pre_tokenizer"] = {{"type", "BertPreTokenizer"}};
  expect_error(j, "BertPreTokenizer");
  j = base;
  j["normalizer"] = {{"type", "NFKD"}};
  expect_error(j, "NFKD");
  j = base;
  j["decoder"] = {{"type", "WordPiece"}};
  expect_error(j, "decoder 'WordPiece'");
  j = base;
  j["model"]["merges"].push_back("q z");
  expect_error(j, "q z");
  expect_error(nlohmann::json::parse("{\"model\": 3}"), "no model");
  EXPECT_FALSE(Tokenizer::FromJson("{not json", "tok.json").ok());
  EXPECT_EQ(Tokenizer::Load("/nonexistent/tokenizer.json").status().code(),
            absl::StatusCode::kNotFound);
}

// Fields of the wrong JSON type are load errors naming the file, never aborts.
TEST(TokenizerErrorsTest, WrongTypedFieldsAreErrors) {
  const auto base = nlohmann::json::parse(SentencePieceJson());
  auto expect_error = [](const std::string& text, const std::string& fragment) {
    auto tok = Tokenizer::FromJson(text, "tok.json");
    ASSERT_FALSE(tok.ok()) << fragment;
    EXPECT_EQ(tok.status().code(), absl::StatusCode::kInvalidArgument) << tok.status();
    EXPECT_NE(tok.status().message().find("tok.json"), std::string::npos) << tok.status();
    EXPECT_NE(tok.status().message().find(fragment), std::string::npos) << tok.status();
  };
  auto j = base;
  j["model"]["byte_fallback"] = nullptr;
  expect_error(j.dump(), "byte_fallback");
  j = base;
  j["added_tokens"][1]["special"] = nullptr;
  expect_error(j.dump(), "special");
  j = base;
  j["added_tokens"][1]["id"] = 1ll << 40;
  expect_error(j.dump(), "out of range");
  j = base;
  j["pre_tokenizer"] = {{"type", "Split"}, {"pattern", {{"Regex", 5}}}, {"behavior", "Isolated"}};
  expect_error(j.dump(), "Regex");
  j = base;
  j["post_processor"]["special_tokens"]["<s>"]["ids"] = {"0"};
  expect_error(j.dump(), "ids");
  j = base;
  j["post_processor"]["single"] = {{{"SpecialToken", "a"}}};
  expect_error(j.dump(), "SpecialToken");
  j = base;
  j["decoder"]["decoders"][3]["start"] = "1";
  expect_error(j.dump(), "start");
  j = base;
  j["pre_tokenizer"] = {{"type", "Metaspace"}, {"replacement", nullptr}};
  expect_error(j.dump(), "replacement");
  j = base;
  j["pre_tokenizer"] = {{"type", "Metaspace"}, {"replacement", ""}};
  expect_error(j.dump(), "replacement");
  j = base;
  j["normalizer"]["normalizers"] = 3;
  expect_error(j.dump(), "normalizers");
  // Deep nesting: messages name the JSON type instead of printing the value, and nested
  // Sequences are bounded, so neither recurses once per level.
  constexpr int kDepth = 200000;
  j = base;
  j["model"]["merges"] = {"DEEP"};
  std::string text = j.dump();
  const size_t at = text.find("\"DEEP\"");
  ASSERT_NE(at, std::string::npos);
  expect_error(text.replace(at, 6, std::string(kDepth, '[') + std::string(kDepth, ']')), "merge");
  j = base;
  j["normalizer"] = "DEEP";
  text = j.dump();
  std::string nested;
  for (int k = 0; k < kDepth; ++k) nested += R"({"type":"Sequence","normalizers":[)";
  for (int k = 0; k < kDepth; ++k) nested += "]}";
  expect_error(text.replace(text.find("\"DEEP\""), 6, nested), "nested");
}

}  // namespace
}  // namespace pds::engine

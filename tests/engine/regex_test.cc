// Regular expressions as byte automata (engine/runtime/regex.h): on ASCII texts they agree
// with std::regex's ECMAScript grammar (full match and search), on Unicode they take whole
// UTF-8 characters only, every state they keep can still reach a match, and what they do not
// support is refused by name.
#include "engine/runtime/regex.h"

#include <random>
#include <regex>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "gtest/gtest.h"

namespace pds::engine {
namespace {

std::shared_ptr<const ByteDfa> Dfa(const std::string& pattern,
                                   ByteDfa::Mode mode = ByteDfa::Mode::kFullMatch) {
  auto dfa = ByteDfa::Compile(pattern, mode);
  EXPECT_TRUE(dfa.ok()) << pattern << ": " << dfa.status();
  return dfa.ok() ? *dfa : nullptr;
}

TEST(RegexTest, AgreesWithStdRegexOnAsciiTexts) {
  // Each pattern with a text it matches: the trials are random texts and that text with a few
  // random edits.
  const std::vector<std::pair<std::string, std::string>> patterns = {
      {"abc", "abc"},
      {"a|b|cd", "cd"},
      {"a*b+c?", "aabbc"},
      {"(ab|c)*d", "abcabd"},
      {"[a-c]{2,3}", "abc"},
      {"[^ab]+", "xyz"},
      {"\\d{3}-\\d{4}", "123-4567"},
      {"\\w+@\\w+\\.com", "ab@cd.com"},
      {"(?:x|y){0,2}z{2,}", "xyzzz"},
      {"a.c", "a-c"},
      {"[\\s\\S]?b", " b"},
      {"\\D\\W", "a."},
      {"(a|ab)(c|bcd)", "abcd"},
      {"[-a]+", "-a-"},
      {"a{2}b{0}", "aa"},
      {"^ab$|c", "ab"},
      {"(?<year>\\d{2})-", "26-"},
      {"\\.\\*\\[\\]\\(\\)", ".*[]()"},
      {"[\\d.]+", "1.2"},
      {"(a*)*b", "aab"},
      {"\\x41\\u0042", "AB"},
  };
  const std::string alphabet = "abcdxyz0123-.@*[]()AB _{,}2\n";
  std::mt19937 rng(5);
  for (const auto& [p, sample] : patterns) {
    const auto full = Dfa(p);
    const auto search = Dfa(p, ByteDfa::Mode::kSearch);
    ASSERT_NE(full, nullptr);
    ASSERT_NE(search, nullptr);
    std::string plain = p;  // std::regex has no named groups
    if (absl::StrContains(p, "?<year>")) plain = "(\\d{2})-";
    const std::regex re(plain, std::regex::ECMAScript);
    ASSERT_TRUE(std::regex_match(sample, re)) << p;
    int matched = 0;
    for (int trial = 0; trial < 4000; ++trial) {
      std::string text;
      if (trial % 2 == 0) {
        const int len = static_cast<int>(rng() % 8);
        for (int k = 0; k < len; ++k) text.push_back(alphabet[rng() % alphabet.size()]);
      } else {
        text = sample;
        for (int edits = static_cast<int>(rng() % 3); edits > 0; --edits) {
          const size_t at = rng() % (text.size() + 1);
          const char c = alphabet[rng() % alphabet.size()];
          switch (rng() % 3) {
            case 0:
              text.insert(text.begin() + at, c);
              break;
            case 1:
              if (at < text.size()) text.erase(at, 1);
              break;
            default:
              if (at < text.size()) text[at] = c;
          }
        }
      }
      const bool want = std::regex_match(text, re);
      matched += want;
      EXPECT_EQ(full->Matches(text), want) << "/" << p << "/ full on '" << text << "'";
      EXPECT_EQ(search->Matches(text), std::regex_search(text, re))
          << "/" << p << "/ search on '" << text << "'";
    }
    EXPECT_GT(matched, 100) << p;  // the trials reach the language, not only its outside
  }
}

TEST(RegexTest, SpecificTextsMatch) {
  struct Case {
    std::string pattern;
    std::vector<std::string> good, bad;
  };
  const std::vector<Case> cases = {
      {"\\d{4}-\\d{2}-\\d{2}", {"2026-11-29"}, {"2026-1-29", "20261129", "2026-11-299"}},
      {"(?:yes|no|maybe)", {"yes", "no", "maybe"}, {"", "ye", "yesno", "Yes"}},
      {"[A-Z][a-z]*( [A-Z][a-z]*)*", {"Ada", "Ada Lovelace"}, {"ada", "Ada ", "Ada  L"}},
      {"\\u00e9+", {"\xC3\xA9", "\xC3\xA9\xC3\xA9"}, {"e", "\xC3"}},
      {"[^a]", {"b", "\xC3\xA9", "\xE2\x82\xAC", "\xF0\x9F\x98\x80"}, {"a", "\xC3", "bb"}},
      {".", {"x", "\xF0\x9F\x98\x80"}, {"\n", "\r", "\xE2\x80\xA8"}},
      {"\\ud83d\\ude00|\\u{1F601}", {"\xF0\x9F\x98\x80", "\xF0\x9F\x98\x81"}, {"\xED\xA0\xBD"}},
      {"[α-γ]+", {"αβγ", "γ"}, {"δ", "a"}},
      {"\\s", {" ", "\t", "\xC2\xA0", "\xE3\x80\x80"}, {"x", "\xC2"}},
      {"a{0,3}", {"", "a", "aaa"}, {"aaaa"}},
      {"x{,2}|y{", {"x{,2}", "y{"}, {"x", "xx", "y"}},  // not counts: literal braces
      {"[\\w-.]+", {"a-b.c", "-", "."}, {"a b", ""}},   // Annex B: '-' beside a set
  };
  for (const Case& c : cases) {
    const auto dfa = Dfa(c.pattern);
    ASSERT_NE(dfa, nullptr);
    for (const std::string& t : c.good) EXPECT_TRUE(dfa->Matches(t)) << c.pattern << " " << t;
    for (const std::string& t : c.bad) EXPECT_FALSE(dfa->Matches(t)) << c.pattern << " " << t;
  }
  // Never a surrogate, an overlong form or a byte past U+10FFFF, even for "anything".
  const auto any = Dfa("[\\s\\S]*");
  for (const char* t : {"\xED\xA0\x80", "\xC0\xAF", "\xF4\x90\x80\x80", "\xFF", "\x80"}) {
    EXPECT_FALSE(any->Matches(t)) << t;
  }
}

// Every kept state reaches a match, in as many characters as CharsToAccept says, and Final
// states have nothing after them.
TEST(RegexTest, StatesAreLiveAndCountTheirDistance) {
  const auto dfa = Dfa("ab(c|\\u00e9\\u00e9)d|x*");
  ASSERT_NE(dfa, nullptr);
  EXPECT_EQ(dfa->CharsToAccept(dfa->start()), 0);  // x* matches the empty text
  int32_t s = dfa->start();
  s = dfa->Next(s, 'a');
  ASSERT_GE(s, 0);
  EXPECT_EQ(dfa->CharsToAccept(s), 3);  // b c d
  s = dfa->Next(s, 'b');
  s = dfa->Next(s, 0xC3);
  ASSERT_GE(s, 0);
  EXPECT_EQ(dfa->CharsToAccept(s), 2);  // the rest of é (no new character), é, d
  EXPECT_EQ(dfa->Next(s, 'c'), -1);
  EXPECT_FALSE(dfa->Final(dfa->start()));
  const auto done = Dfa("ab");
  int32_t t = done->Next(done->Next(done->start(), 'a'), 'b');
  EXPECT_TRUE(done->Final(t));
  for (int32_t state = 0; state < dfa->size(); ++state) {
    EXPECT_LT(dfa->CharsToAccept(state), 1 << 20) << state;
  }
}

TEST(RegexTest, RefusesWhatItCannotHoldByName) {
  struct Bad {
    std::string pattern, message;
  };
  for (const Bad& b : std::vector<Bad>{
           {"(a)\\1", "backreferences"},
           {"a(?=b)", "lookaround"},
           {"(?i)a", "lookaround and inline flags"},
           {"\\bword", "word boundaries"},
           {"\\p{L}", "\\p is not supported"},
           {"a{1001}", "over 1000"},
           {"a{3,2}", "m < n"},
           {"(ab", "without its ')'"},
           {"ab)", "unmatched ')'"},
           {"[ab", "without its ']'"},
           {"*a", "nothing to repeat"},
           {"a**", "quantifier after a quantifier"},
           {"a^b", "^ and $ only"},
           {"(a$)", "^ and $ only"},
           {"[z-a]", "out of order"},
           {"[]", "matches nothing"},
           {"\\ud800", "lone surrogate"},
           {"a\\", "ending in a backslash"},
           {"((a|b|c|d|e|f|g|h){1000}){10}", "over 100000 automaton states"},
           {"[ab]*a[ab]{20}", "over 4096 automaton states"},
           {"\xC3", "UTF-8"},
           {std::string(10000, '(') + "a" + std::string(10000, ')'), "nested deeper than 256"},
           {"(?:(?:x?){1000}){45}", "too costly to compile"},
       }) {
    auto dfa = ByteDfa::Compile(b.pattern, ByteDfa::Mode::kFullMatch);
    ASSERT_FALSE(dfa.ok()) << b.pattern;
    EXPECT_EQ(dfa.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_TRUE(absl::StrContains(dfa.status().message(), b.message))
        << b.pattern << ": " << dfa.status();
  }
}

TEST(RegexTest, AlternationEscapesItsChoices) {
  const std::vector<std::string> choices = {"a.b", "(x)", "1+1=2", "what?", "a|b", "\xC3\xA9"};
  const auto dfa = Dfa(ByteDfa::Alternation(choices));
  ASSERT_NE(dfa, nullptr);
  for (const std::string& c : choices) EXPECT_TRUE(dfa->Matches(c)) << c;
  for (const char* t : {"axb", "x", "11=2", "a", "b", "what"}) EXPECT_FALSE(dfa->Matches(t)) << t;
}

}  // namespace
}  // namespace pds::engine

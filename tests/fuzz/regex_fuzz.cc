// Fuzzes regular expressions (engine/runtime/regex.h) with hostile request input: any pattern
// compiles or is refused with a message, never a crash, a hang or a runaway allocation; a
// compiled one keeps only live states (each a finite number of characters from a match), and
// as a whole-reply grammar its mask agrees with Accept for some steps (the input's bytes
// choosing among the allowed tokens).
#include <cstdio>
#include <cstdlib>
#include <string>

#include "engine/runtime/json_constraint.h"
#include "engine/runtime/regex.h"
#include "tests/fuzz/fuzz_target.h"

std::vector<std::string> FuzzSeeds() {
  return {
      R"(\d{4}-(0[1-9]|1[0-2])-\d{2}T[^\s"]{1,8}Z?)",
      R"(^(?:yes|no|maybe)$|[A-Z][a-z]*( [a-z]+){0,3}\.)",
      R"([\u00e0-\u00ff\u{1F600}-\u{1F64F}]+\w*\W?\s\S\D)",
      R"((a|ab)(c|bcd)*?x{2,}y{3}z?.\\\/\.\[\]\(\)\{\})",
      R"([^a-z\d]+[\-.]{1,2}(?<n>q+)(?:r|s)\x41\n\t)",
  };
}

namespace {
[[noreturn]] void Fail(const char* why) {
  std::fprintf(stderr, "fuzz_regex: %s\n", why);
  std::abort();
}
}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using pds::engine::ByteDfa;
  using pds::engine::JsonMatcher;
  static const auto* vocab = [] {
    std::vector<std::string> bytes = {"<eos>"};
    for (int b = 1; b < 256; ++b) bytes.push_back(std::string(1, static_cast<char>(b)));
    for (const char* t : {"yes", "no", "ab", "\xC3\xA9", "\xF0\x9F\x98\x80", "2026-", "  ", "\n"}) {
      bytes.push_back(t);
    }
    return new std::shared_ptr<const pds::engine::TokenVocabulary>(
        std::make_shared<pds::engine::TokenVocabulary>(bytes, std::vector<bool>(bytes.size(), true),
                                                       std::vector<int32_t>{0}));
  }();
  const std::string text(reinterpret_cast<const char*>(data), size);
  for (ByteDfa::Mode mode : {ByteDfa::Mode::kFullMatch, ByteDfa::Mode::kSearch}) {
    auto dfa = ByteDfa::Compile(text, mode);
    if (!dfa.ok()) {
      if (dfa.status().message().empty()) Fail("an error without a message");
      return 0;
    }
    int32_t s = (*dfa)->start();
    for (size_t i = 0; i < size && s >= 0; ++i) {
      if ((*dfa)->CharsToAccept(s) > (1 << 24)) Fail("a dead state kept");
      s = (*dfa)->Next(s, data[i]);
    }
  }
  auto grammar = pds::engine::JsonSchema::Regex(text);
  if (!grammar.ok()) Fail("compiled as a pattern, refused as a grammar");
  JsonMatcher m(*grammar, *vocab);
  for (size_t step = 0; step < 24 && !m.Done(); ++step) {
    const std::vector<int32_t> allowed = m.AllowedTokens();
    if (allowed.empty()) break;  // what the pattern needs next no token writes (e.g. NUL)
    const int32_t token = allowed[(size ? data[step % size] : 0) % allowed.size()];
    if (!m.Accept(token)) Fail("the mask allowed what Accept refuses");
    if (token == 0) break;
  }
  return 0;
}

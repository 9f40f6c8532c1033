// Draws random replies under each schema of a corpus, for tests/engine/json_schema_validate.py
// to check with an independent validator (python3-jsonschema).
//
// usage: json_schema_samples CORPUS OUT [SAMPLES]
// CORPUS: one JSON Schema per line ('#' lines and blank lines skipped), or {"x-regex": R} for a
// whole-reply regular expression (JsonSchema::Regex). OUT gets one JSON line
// per schema: {"line": N, "refused": MESSAGE} or {"line": N, "replies": [...],
// "incomplete": K, "dead_ends": [...]}: replies the matcher completed, how many ran out of
// steps, and prefixes after which it allowed nothing (a bug).
#include <cstdio>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include "engine/runtime/json_constraint.h"
#include "nlohmann/json.hpp"

namespace {

using pds::engine::JsonMatcher;
using pds::engine::JsonSchema;
using pds::engine::TokenVocabulary;

constexpr int32_t kStop = 0;

// Every byte (ids 1..255; 0 is the stop token) and multi-byte tokens over a JSON-ish alphabet.
std::shared_ptr<const TokenVocabulary> Vocabulary() {
  std::vector<std::string> bytes = {"</s>"};
  std::vector<bool> usable = {false};
  for (int b = 1; b < 256; ++b) {
    bytes.push_back(std::string(1, static_cast<char>(b)));
    usable.push_back(true);
  }
  static const std::string kAlphabet =
      "{}[]\",:0123456789.-+eE \nabcdfnlrstuxyzAFPTZWHMSDY@\\/_\xC3\xA9";
  std::mt19937 rng(7);
  for (int i = 0; i < 2000; ++i) {
    std::string t;
    const int len = 2 + static_cast<int>(rng() % 4);
    for (int k = 0; k < len; ++k) t.push_back(kAlphabet[rng() % kAlphabet.size()]);
    bytes.push_back(t);
    usable.push_back(true);
  }
  for (const char* w : {"true", "false", "null", "\": ", ", \"", "{\"", "\"}", "::", "-02-"}) {
    bytes.push_back(w);
    usable.push_back(true);
  }
  return std::make_shared<TokenVocabulary>(std::move(bytes), std::move(usable),
                                           std::vector<int32_t>{kStop});
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 3) {
    std::fprintf(stderr, "usage: %s CORPUS OUT [SAMPLES]\n", argv[0]);
    return 2;
  }
  const int samples = argc > 3 ? std::atoi(argv[3]) : 40;
  std::ifstream in(argv[1]);
  std::ofstream out(argv[2]);
  if (!in || !out) {
    std::fprintf(stderr, "cannot open %s or %s\n", argv[1], argv[2]);
    return 2;
  }
  const auto vocab = Vocabulary();
  const int64_t n = vocab->size();
  // Closing characters, favoured now and then so that replies end within the step bound.
  std::vector<int32_t> closers;
  for (int32_t id = 0; id < n; ++id) {
    const std::string& b = vocab->bytes(id);
    if (b == "\"" || b == "}" || b == "]") closers.push_back(id);
  }
  std::string line;
  int line_no = 0;
  while (std::getline(in, line)) {
    ++line_no;
    if (line.empty() || line[0] == '#') continue;
    nlohmann::json record;
    record["line"] = line_no;
    const nlohmann::json parsed = nlohmann::json::parse(line, nullptr, false);
    auto schema = parsed.is_object() && parsed.size() == 1 && parsed.contains("x-regex")
                      ? JsonSchema::Regex(parsed["x-regex"].get<std::string>())
                      : JsonSchema::Compile(line);
    if (!schema.ok()) {
      record["refused"] = std::string(schema.status().message());
      out << record.dump() << "\n";
      continue;
    }
    std::mt19937 rng(line_no);
    std::uniform_real_distribution<float> logit(-4.0f, 4.0f);
    nlohmann::json replies = nlohmann::json::array(), dead = nlohmann::json::array();
    int incomplete = 0;
    std::vector<float> logits(n);
    for (int k = 0; k < samples; ++k) {
      JsonMatcher m(*schema, vocab);
      std::string text;
      bool ended = false, stuck = false;
      const bool closing = k % 2 == 1;  // every other reply leans to closing what is open
      for (int step = 0; step < 1500; ++step) {
        for (float& l : logits) l = logit(rng);
        if (closing && rng() % 3 == 0) {
          for (int32_t id : closers) logits[id] += 6;
        }
        if (!m.MaskLogits(logits.data(), n)) {
          dead.push_back(text);
          stuck = true;
          break;
        }
        const int32_t best =
            static_cast<int32_t>(std::max_element(logits.begin(), logits.end()) - logits.begin());
        if (!m.Accept(best)) {
          dead.push_back(text + " (then a token the mask let through was refused)");
          stuck = true;
          break;
        }
        if (best == kStop) {
          ended = true;
          break;
        }
        text += vocab->bytes(best);
        if (m.Done()) {
          ended = true;
          break;
        }
      }
      if (ended) {
        replies.push_back(text);
      } else if (!stuck) {
        ++incomplete;
      }
    }
    record["replies"] = std::move(replies);
    record["incomplete"] = incomplete;
    record["dead_ends"] = std::move(dead);
    out << record.dump() << "\n";
  }
  return 0;
}

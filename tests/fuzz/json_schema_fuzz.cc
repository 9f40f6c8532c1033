// Fuzzes structured output (engine/runtime/json_constraint.h) with hostile request input: any
// schema text compiles or is refused with a message, never a crash, a hang or a runaway
// allocation; a compiled one then drives a matcher over a small vocabulary for some steps (the
// input's bytes choosing among the allowed tokens), and every step's mask agrees with Accept.
#include <cstdlib>
#include <string>

#include "engine/runtime/json_constraint.h"
#include "tests/fuzz/fuzz_target.h"

std::vector<std::string> FuzzSeeds() {
  return {
      R"({"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
          "kind": {"enum": ["cat", "dog", 3, null]}, "tags": {"type": "array",
          "items": {"type": "integer"}, "minItems": 1, "maxItems": 3}},
          "required": ["kind"], "additionalProperties": {"type": "number"}})",
      R"({"$defs": {"n": {"type": "object", "properties": {"v": {"type": "number"},
          "next": {"anyOf": [{"$ref": "#/$defs/n"}, {"type": "null"}]}}}}, "$ref": "#/$defs/n"})",
      R"({"type": ["string", "boolean", "array"], "minLength": 1, "items": {"const": {"a": [1]}}})",
      R"({"allOf": [{"oneOf": [{"type": "integer"}, {"type": "string", "format": "date"}]}]})",
      R"({"type": "object"})",
      R"({"properties": {"d": {"type": "string", "format": "date-time"}, "p": {"type": "string",
          "pattern": "^[a-c\"]+\\u00e9?$", "maxLength": 4}, "n": {"type": "number",
          "exclusiveMinimum": -2.5, "maximum": 1e2}, "i": {"type": "integer", "minimum": 3}},
          "required": ["d", "p"]})",
  };
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using pds::engine::JsonMatcher;
  static const auto* vocab = [] {
    std::vector<std::string> bytes = {"<eos>"};
    for (int b = 1; b < 128; ++b) bytes.push_back(std::string(1, static_cast<char>(b)));
    for (const char* t : {"{\"", "\": ", ", \"", "\"}", "[1, ", "true", "null", "\xC3\xA9", "\xC3",
                          "\xA9", "\\u00", "  ", "\n", "cat", "\"dog\"", "-1.5e3"}) {
      bytes.push_back(t);
    }
    return new std::shared_ptr<const pds::engine::TokenVocabulary>(
        std::make_shared<pds::engine::TokenVocabulary>(bytes, std::vector<bool>(bytes.size(), true),
                                                       std::vector<int32_t>{0}));
  }();
  const std::string text(reinterpret_cast<const char*>(data), size);
  auto schema = pds::engine::JsonSchema::Compile(text);
  if (!schema.ok()) {
    if (schema.status().message().empty()) std::abort();
    return 0;
  }
  JsonMatcher m(*schema, *vocab);
  for (size_t step = 0; step < 24 && !m.Done(); ++step) {
    const std::vector<int32_t> allowed = m.AllowedTokens();
    if (allowed.empty()) break;  // a dead end (a schema nothing can satisfy here)
    const int32_t token = allowed[(size ? data[step % size] : 0) % allowed.size()];
    if (!m.Accept(token)) std::abort();  // the mask allowed what Accept refuses
    if (token == 0) break;
  }
  return 0;
}

// Chat templates (engine/tokenizer/chat_template.h): Jinja semantics held to python3-jinja2's
// output (the golden texts below were rendered by Jinja 3.1 in HF's environment: trim_blocks,
// lstrip_blocks, loop controls, json.dumps tojson), errors, limits, and loading from model
// directories. tests/chat_template compares whole templates with python3-jinja2 directly.
#include "engine/tokenizer/chat_template.h"

#include <filesystem>
#include <fstream>
#include <string>

#include "absl/strings/match.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tests/testing/test_util.h"

namespace pds::engine {
namespace {

using Json = nlohmann::ordered_json;

absl::StatusOr<std::string> Render(const std::string& tmpl, const Json& vars = Json::object()) {
  auto t = ChatTemplate::Parse(tmpl, "test.jinja");
  if (!t.ok()) return t.status();
  return (*t)->Render(vars);
}

// Rendered by python3-jinja2 3.1.6 (see the file comment).
constexpr char kGolden[] = R"golden([
{"template": "  {% if true %}\n  x\n  {% endif %}\n{# c #}\n  y  {{- ' z ' -}}  \n w\n", "vars": {}, "text": "  x\n  y z w"},
{"template": "{% for i in [1,2] %}[{{ x }}]{% set x = i %}{% endfor %}<{{ x }}>{% set x = 5 %}{% for i in [1] %}{{ x }}{% endfor %}", "vars": {}, "text": "[][]<>5"},
{"template": "{% set ns = namespace(n=0, s='') %}{% for m in messages if m.role != 'system' %}{% set ns.n = ns.n + 1 %}{% set ns.s = ns.s ~ m.role[0] %}{{ loop.index }}/{{ loop.length }}{{ '!' if loop.last }}{% endfor %} {{ ns.n }} {{ ns.s }}", "vars": {"messages": [{"role": "system"}, {"role": "user"}, {"role": "assistant"}]}, "text": "1/22/2! 2 ua"},
{"template": "{% macro f(a, b=2) %}{{ a }}+{{ b }}{% endmacro %}{{ f(1) }} {{ f(1, b=3) }} {{ f('x', 'y') }}", "vars": {}, "text": "1+2 1+3 x+y"},
{"template": "{{ [1, 'a', None, True, {'k': 1.0}] }}|{{ 7 / 2 }}|{{ 7 // 2 }}|{{ -7 % 3 }}|{{ 2 ** 10 }}|{{ 'ab' * 2 }}|{{ 1.5e3 }}|{{ 0.1 + 0.2 }}|{{ 1e20 }}|{{ 1e-5 }}|{{ none }}", "vars": {}, "text": "[1, 'a', None, True, {'k': 1.0}]|3.5|3|2|1024|abab|1500.0|0.30000000000000004|1e+20|1e-05|None"},
{"template": "{{ x | tojson }}|{{ x | tojson(indent=2) }}|{{ x | tojson(sort_keys=true) }}|{{ 'é\"\\n' | tojson }}", "vars": {"x": {"b": [1, 2.5, null, true], "a": {}, "c": []}}, "text": "{\"b\": [1, 2.5, null, true], \"a\": {}, \"c\": []}|{\n  \"b\": [\n    1,\n    2.5,\n    null,\n    true\n  ],\n  \"a\": {},\n  \"c\": []\n}|{\"a\": {}, \"b\": [1, 2.5, null, true], \"c\": []}|\"é\\\"\\n\""},
{"template": "{{ 'abcdef'[1:4] }}{{ 'abcdef'[::-2] }}{{ 'héllo'[1] }}{{ [1,2,3,4][-2:] }}{{ messages[1:] | length }}", "vars": {"messages": [1, 2, 3]}, "text": "bcdfdbé[3, 4]2"},
{"template": "{{ '  a b  '.strip() }}|{{ 'xxhixx'.strip('x') }}|{{ 'a,b,,c'.split(',') }}|{{ ' a  b '.split() }}|{{ 'a b c'.split(' ', 1) }}|{{ 'Hello'.startswith('He') }}{{ 'Hello'.endswith(('x', 'lo')) }}|{{ 'they\\'re ok-ish'.title() }}|{{ 'they\\'re ok-ish' | title }}|{{ 'éCOLE' | lower }}{{ 'ça' | upper }}|{{ 'aaa'.replace('a', 'b', 2) }}", "vars": {}, "text": "a b|hi|['a', 'b', '', 'c']|['a', 'b']|['a', 'b c']|TrueTrue|They'Re Ok-Ish|They're Ok-Ish|écoleÇA|bba"},
{"template": "{{ users | selectattr('active') | map(attribute='name') | join(', ') }}|{{ users | rejectattr('name', 'equalto', 'b') | map(attribute='name') | list }}|{{ [3, 1, 2] | sort | reverse | list }}|{{ ['B', 'a', 'b'] | unique | list }}|{{ {'b': 1, 'A': 2} | dictsort | map('first') | join }}|{{ [1, 2, 3] | select('odd') | list }}|{{ [] | first is undefined }}|{{ missing | default('d') }}|{{ '' | default('e', true) }}|{{ [1,2,3] | sum }}|{{ ['x','y'] | max }}", "vars": {"users": [{"name": "a", "active": true}, {"name": "b", "active": false}, {"name": "c", "active": 1}]}, "text": "a, c|['a', 'c']|[3, 2, 1]|['B', 'a']|Ab|[1, 3]|True|d|e|6|y"},
{"template": "{% for k, v in d.items() %}{{ k }}={{ v }};{% else %}none{% endfor %}{% for x in [] %}x{% else %}empty{% endfor %}{% for i in range(10) %}{% if i == 2 %}{% continue %}{% endif %}{% if i > 4 %}{% break %}{% endif %}{{ i }}{% endfor %}", "vars": {"d": {"a": 1, "b": [1]}}, "text": "a=1;b=[1];empty0134"},
{"template": "{{ x is defined }}{{ y is none }}{{ 1 is number }}{{ true is integer }}{{ 1.0 is float }}{{ 's' is string }}{{ {} is mapping }}{{ [] is iterable }}{{ 3 is divisibleby 3 }}{{ 'a' in 'cat' }}{{ 2 not in [1] }}{{ 1 == 1.0 }}{{ 'a' < 'b' }}{{ not x is defined }}", "vars": {"y": null}, "text": "FalseTrueTrueFalseTrueTrueTrueTrueTrueTrueTrueTrueTrueTrue"},
{"template": "{% set x %}a{{ 1 + 1 }}b{% endset %}{{ x }}{{ x | length }}{% raw %}{{ not evaluated }}{% endraw %}", "vars": {}, "text": "a2b3{{ not evaluated }}"},
{"template": "{%- for m in messages -%}\n    {{- m.content | trim -}}\n    {%- if not loop.last %}|{% endif -%}\n{%- endfor %}\n", "vars": {"messages": [{"content": " a "}, {"content": "b\n"}]}, "text": "a|b"},
{"template": "{{ loop_prev }}{% for x in 'abc' %}{{ loop.previtem | default('^') }}{{ x }}{{ loop.nextitem | default('$') }}{{ loop.revindex0 }} {% endfor %}{{ (1, 2) | join('-') }}{{ {'a': 'b'}.get('a') }}{{ {'a': 'b'}.get('z', 'n') }}{{ 'ab' ~ 1 ~ none }}", "vars": {}, "text": "^ab2 abc1 bc$0 1-2bnab1None"},
{"template": "{{ 'x' if false }}|{{ 'a' 'b' }}|{{ -3 | abs }}|{{ '12' | int + 1 }}|{{ '1.5' | float }}|{{ 'a\nb\n\nc' | indent(2) }}|{{ [1,2] + [3] }}|{{ 10 - 2 * 3 }}|{{ (10 - 2) * 3 }}|{{ 2 ** 3 ** 2 }}", "vars": {}, "text": "|ab|3|13|1.5|a\n  b\n\n  c|[1, 2, 3]|4|24|64"},
{"template": "{{ 1 < 2 < 3 }}{{ 3 > 2 > 2 }}{{ 1 < 5 == 5 }}{{ (1 < 2) < 3 }}|{{ 'άέήίόύώ' | upper }}{{ 'ΆΈΉΊΌΎΏ' | lower }}{{ 'ϊϋ' | upper }}|{% set x = 1 %}{% generation %}{% set x = 2 %}{{ x }}{% endgeneration %}{{ x }}|{{ ' \\t'.isspace() }}{{ ''.isspace() }}{{ '123'.isdigit() }}{{ '12a'.isdigit() }}{{ 'AB1'.isupper() }}{{ '12'.isupper() }}{{ 'ab'.islower() }}{{ 'aB'.islower() }}{{ 'ΣΑ'.isupper() }}", "vars": {}, "text": "TrueFalseTrueTrue|ΆΈΉΊΌΎΏάέήίόύώΪΫ|21|TrueFalseTrueFalseTrueFalseTrueFalseTrue"},
{"template": "{% for x in [1,2] %}{% continue %}{% else %}E{% endfor %}|{% for x in [1,2] %}{% break %}{% else %}E{% endfor %}|{% for x in [1,2] %}{{x}}{% if x == 2 %}{% break %}{% endif %}{% else %}E{% endfor %}|{% for x in [1,2] %}{% if x == 1 %}{% continue %}{% endif %}{{x}}{% else %}E{% endfor %}|{% for x in [1,2] %}{{x}}{% if x == 1 %}{% continue %}{% endif %}{% else %}E{% endfor %}", "vars": {}, "text": "E|E|12|2|12"},
{"template": "A{% raw %}\nraw\n  {% endraw %}B|A　{{- 'x' -}} |{{ ['a b'] }}|{{ 'Việt ß ΣΑΣ' | upper }}|{{ 'ǆa élan' | title }}|{{ 5 | round }}{{ 2.5 | round }}{{ 0.125 | round(2) }}|{{ {'a': 'é'} | tojson(true) }}|{{ 'a b  c '.split(None, 1) }}|{{ p.items.type }}{{ p['items'].type }}{{ p.items is defined }}|{% for m in ms %}{{ ms[loop.index0 - 1].n }}{% endfor %}|{{ '123' is lower }}{{ 3.0 is odd }}{{ 0.0 % -1 }}|{{ 'nan' | int }}{{ '0x1A' | int(7) }}|{{ 'a — b' | wordcount }}", "vars": {"p": {"items": {"type": "string"}}, "ms": [{"n": 1}, {"n": 2}, {"n": 3}]}, "text": "A\nraw\nB|Ax|['a\\xa0b']|VIỆT SS ΣΑΣ|Ǆa Élan|52.00.12|{\"a\": \"\\u00e9\"}|['a', 'b  c ']|stringTrue|312|FalseTrue-0.0|07|2"},
{"template": "{{ [x] }}|{{ [x]|first is defined }}|{% for y in [x] %}{{ y is defined }}{% endfor %}|{{ [x, 1]|join('-') }}|{% set ns = namespace(a=1) %}{% set ns.a = m.b %}{{ ns.a is not none }}|{{ {'k': x} }}|{{ [x] == [x] }}|{{ ms|map(attribute='name')|join(',') }}", "vars": {"m": {"a": "q"}, "ms": [{"name": "a"}, {}, {"name": "b"}]}, "text": "[Undefined]|False|False|-1|True|{'k': Undefined}|True|a,,b"},
{"template": "{{ '%s!' % 'a' }}|{{ '%s and %s' % ('x', 2) }}|{{ '%05.2f|%-4d|%x|%r' % (3.14159, 7, 255, 'q') }}|{{ '%(a)s-%(b)d' % {'a': 'A', 'b': 5} }}|{{ '100%%' % () }}|{{ '%s' % x }}|{{ '%.3s|%5s' % ('abcdef', 'é') }}|{{ 'a-b-c'.rsplit('-', 1) }}|{{ 'abcabc'.rfind('b') }}|{{ 'xxa'.removeprefix('x') }}|{{ 'ab1'.isalnum() }}{{ 'é'.isalpha() }}", "vars": {}, "text": "a!|x and 2|03.14|7   |ff|'q'|A-5|100%||abc|    é|['a-b', 'c']|4|xa|TrueTrue"}]
)golden";

TEST(ChatTemplateTest, RendersAsJinjaDoes) {
  const Json golden = Json::parse(kGolden);
  ASSERT_GE(golden.size(), 20u);
  for (const Json& c : golden) {
    const std::string tmpl = c["template"].get<std::string>();
    absl::StatusOr<std::string> got = Render(tmpl, c["vars"]);
    ASSERT_TRUE(got.ok()) << tmpl << "\n" << got.status();
    EXPECT_EQ(*got, c["text"].get<std::string>()) << tmpl;
  }
}

// The message of a failed render (or parse).
std::string Error(const std::string& tmpl, const Json& vars = Json::object()) {
  absl::StatusOr<std::string> r = Render(tmpl, vars);
  EXPECT_FALSE(r.ok()) << tmpl << " rendered " << (r.ok() ? *r : "");
  return r.ok() ? "" : std::string(r.status().message());
}

TEST(ChatTemplateTest, ErrorsNameTheTemplateLineAndCause) {
  // raise_exception: the template's own refusal, as chat templates refuse bad conversations.
  const std::string raised = Error(
      "{% if messages[0].role != 'user' %}\n{{ raise_exception('Conversation must start with "
      "user') }}{% endif %}",
      {{"messages", {{{"role", "assistant"}}}}});
  EXPECT_TRUE(absl::StrContains(raised, "test.jinja line 2")) << raised;
  EXPECT_TRUE(absl::StrContains(raised, "Conversation must start with user")) << raised;
  // Undefined values are empty when printed and tested, errors when used.
  EXPECT_TRUE(absl::StrContains(Error("{{ x.y }}"), "'x' is undefined"));
  EXPECT_TRUE(absl::StrContains(Error("{{ m.a.b }}", {{"m", Json::object()}}),
                                "'dict object' has no attribute 'a'"));
  EXPECT_TRUE(absl::StrContains(Error("{{ 'a' + 1 }}"), "unsupported operand"));
  EXPECT_TRUE(absl::StrContains(Error("{{ 1 // 0 }}"), "by zero"));
  EXPECT_TRUE(absl::StrContains(Error("{{ x | tojson }}"), "not JSON serializable"));
  // Parse errors, when the template is loaded.
  EXPECT_TRUE(absl::StrContains(Error("a\n{% if x %}"), "missing {% endif %}"));
  EXPECT_TRUE(
      absl::StrContains(Error("{{ x | nosuchfilter }}"), "'nosuchfilter' is not supported"));
  EXPECT_TRUE(absl::StrContains(Error("{% include 'x' %}"), "'include' is not supported"));
  EXPECT_TRUE(absl::StrContains(Error("\n\n{{ 'open }}"), "line 3"));
  EXPECT_TRUE(absl::StrContains(Error("{{ x is nosuchtest }}"), "'nosuchtest' is not supported"));
  EXPECT_TRUE(absl::StrContains(Error("{% break %}"), "outside a loop"));
  // Arithmetic past int64 and absurd indentations are errors, not undefined behaviour.
  EXPECT_TRUE(absl::StrContains(Error("{{ -(-9223372036854775807 - 1) }}"), "overflow"));
  EXPECT_TRUE(absl::StrContains(Error("{{ 9223372036854775807 + 1 }}"), "overflow"));
  EXPECT_TRUE(absl::StrContains(Error("{{ [1] | tojson(indent=2000) }}"), "1024 spaces"));
  EXPECT_TRUE(absl::StrContains(Error("{{ 'a' | indent(1e308) }}"), "must be a string or"));
  // The sandbox's immutability: no list methods.
  EXPECT_TRUE(absl::StrContains(Error("{{ [].append(1) }}"), "has no method 'append'"));
}

TEST(ChatTemplateTest, RunawayTemplatesStopAtTheirBudgets) {
  absl::StatusOr<std::string> r =
      Render("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}");
  EXPECT_EQ(r.status().code(), absl::StatusCode::kResourceExhausted) << r.status();
  r = Render("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}");
  EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument) << r.status();
  EXPECT_TRUE(absl::StrContains(r.status().message(), "nested deeper")) << r.status();
  r = Render("{% set s = 'x' * 1000000 %}{% for i in range(100) %}{{ s }}{% endfor %}");
  EXPECT_EQ(r.status().code(), absl::StatusCode::kResourceExhausted) << r.status();
  std::string deep(1000, '(');
  deep += "1" + std::string(1000, ')');
  EXPECT_TRUE(absl::StrContains(Error("{{ " + deep + " }}"), "nested too deeply"));
  // What recursion on the native stack could not survive: deeply nested blocks, expressions of
  // thousands of nodes, deeply nested values (built or given), deep runs of macro calls.
  std::string blocks;
  for (int i = 0; i < 5000; ++i) blocks += "{% if true %}";
  EXPECT_TRUE(absl::StrContains(Error(blocks + "x"), "blocks nested too deeply"));
  std::string chain = "{{ x";
  for (int i = 0; i < 50000; ++i) chain += " | trim";
  EXPECT_TRUE(absl::StrContains(Error(chain + " }}"), "a tag of more than 4096 tokens"));
  r = Render(
      "{% set ns = namespace(x=[]) %}{% for i in range(100000) %}{% set ns.x = [ns.x] %}"
      "{% endfor %}{{ ns.x | tojson }}");
  EXPECT_EQ(r.status().code(), absl::StatusCode::kResourceExhausted) << r.status();
  EXPECT_TRUE(absl::StrContains(r.status().message(), "nested deeper than 128")) << r.status();
  Json value = Json::array();
  for (int i = 0; i < 200; ++i) value = Json::array({std::move(value)});
  EXPECT_TRUE(absl::StrContains(Error("{{ x | tojson }}", {{"x", value}}), "nest deeper"));
  std::string nested_macro = "{% macro m(n) %}";
  for (int i = 0; i < 190; ++i) nested_macro += "{% if true %}";
  nested_macro += "{{ m(n + 1) }}";
  for (int i = 0; i < 190; ++i) nested_macro += "{% endif %}";
  r = Render(nested_macro + "{% endmacro %}{{ m(0) }}");
  EXPECT_EQ(r.status().code(), absl::StatusCode::kResourceExhausted) << r.status();
  EXPECT_TRUE(absl::StrContains(r.status().message(), "deeper than 1000 at run time"))
      << r.status();
  // Values are bounded in bytes too, not only in items: no list of huge strings.
  for (const char* big :
       {"{% set s = 'a' * 50000000 %}{{ ([s] * 100) | length }}",
        "{% set s = 'a' * 50000000 %}{{ [s, s, s] | length }}",
        "{% set s = 'a' * 30000000 %}{% set ns = namespace(l=[s]) %}{% for i in range(30) %}"
        "{% set ns.l = ns.l + ns.l %}{% endfor %}{{ ns.l | length }}"}) {
    r = Render(big);
    EXPECT_EQ(r.status().code(), absl::StatusCode::kResourceExhausted) << big << r.status();
  }
  // Below the limits, as deep as they allow, they run.
  std::string sum = "{{ 1";
  for (int i = 0; i < 990; ++i) sum += " + 1";
  r = Render(sum + " }}");
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(*r, "991");
}

void Write(const std::filesystem::path& p, const std::string& text) {
  std::ofstream(p, std::ios::binary) << text;
}

TEST(ChatTemplateTest, LoadsTheModelsTemplateAndSpecialTokens) {
  // make-model's directory: Llama 3 Instruct's template in tokenizer_config.json.
  auto dir = testing::MakeModelDir(testing::SmallTestConfig(), "chat", 5, DType::kF32, 0,
                                   /*tokenizer=*/true);
  ASSERT_TRUE(dir.ok()) << dir.status();
  absl::StatusOr<ChatFormat> format = LoadChatFormat(*dir);
  ASSERT_TRUE(format.ok()) << format.status();
  const Json vars = {
      {"messages",
       {{{"role", "system"}, {"content", " Be brief. "}}, {{"role", "user"}, {"content", "Hi"}}}},
      {"add_generation_prompt", true}};
  absl::StatusOr<std::string> text = format->Render(vars);
  ASSERT_TRUE(text.ok()) << text.status();
  EXPECT_EQ(*text,
            "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe "
            "brief.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_"
            "header_id|>assistant<|end_header_id|>\n\n");
  // A variable the request sets wins over the config's special token.
  Json with_bos = vars;
  with_bos["bos_token"] = "<B>";
  EXPECT_TRUE(absl::StartsWith(*format->Render(with_bos), "<B><|start_header_id|>"));

  // chat_template.jinja beside it wins; an override file wins over both.
  const std::filesystem::path d(*dir);
  Write(d / "chat_template.jinja", "{{ bos_token }}J{{ messages | length }}\n");
  format = LoadChatFormat(*dir);
  ASSERT_TRUE(format.ok()) << format.status();
  EXPECT_EQ(*format->Render(vars), "<|begin_of_text|>J2");  // its trailing newline goes
  Write(d / "override.jinja", "O{{ eos_token }}");
  format = LoadChatFormat(*dir, (d / "override.jinja").string());
  ASSERT_TRUE(format.ok()) << format.status();
  EXPECT_EQ(*format->Render(vars), "O<|end_of_text|>");
  std::filesystem::remove(d / "chat_template.jinja");

  // A list of named templates: "default" is used; AddedToken-style special tokens.
  const Json config = {
      {"bos_token", {{"content", "<s>"}, {"lstrip", false}}},
      {"eos_token", "</s>"},
      {"pad_token", nullptr},
      {"chat_template",
       {{{"name", "tool_use"}, {"template", "T"}},
        {{"name", "default"}, {"template", "{{ bos_token }}D{{ pad_token is defined }}"}}}}};
  Write(d / "list_config.json", config.dump());
  format = LoadChatFormatFiles((d / "list_config.json").string(), "");
  ASSERT_TRUE(format.ok()) << format.status();
  EXPECT_EQ(*format->Render(vars), "<s>DFalse");

  // Broken or missing templates name the file.
  Write(d / "bad.json", R"({"chat_template": "{% for x in y %}"})");
  format = LoadChatFormatFiles((d / "bad.json").string(), "");
  EXPECT_EQ(format.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(absl::StrContains(format.status().message(), "bad.json line 1")) << format.status();
  Write(d / "none.json", R"({"bos_token": "<s>"})");
  format = LoadChatFormatFiles((d / "none.json").string(), "");
  EXPECT_EQ(format.status().code(), absl::StatusCode::kNotFound);
  EXPECT_TRUE(absl::StrContains(format.status().message(), "none.json")) << format.status();
  EXPECT_EQ(LoadChatFormat((d / "nowhere").string()).status().code(), absl::StatusCode::kNotFound);
}

}  // namespace
}  // namespace pds::engine

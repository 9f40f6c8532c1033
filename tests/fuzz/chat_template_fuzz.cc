// Fuzzes the chat template interpreter: any template text gives a parse error, or renders a
// conversation (with tools, tool calls and odd contents) to text or an error, never a crash,
// a hang or a runaway allocation (the interpreter's budgets bound each render).
#include <cstdlib>
#include <string>

#include "engine/tokenizer/chat_template.h"
#include "nlohmann/json.hpp"
#include "tests/fuzz/fuzz_target.h"

std::vector<std::string> FuzzSeeds() {
  return {
      // Llama 3 style, with the system message split off and tool calls printed as JSON.
      "{{- bos_token }}{%- if messages[0]['role'] == 'system' %}{%- set system = "
      "messages[0]['content']|trim %}{%- set messages = messages[1:] %}{%- else %}{%- set "
      "system = '' %}{%- endif %}{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' + system "
      "+ '<|eot_id|>' }}{%- for m in messages %}{%- if m.tool_calls is defined %}{%- for c in "
      "m.tool_calls %}{{- '{\"name\": \"' + c.function.name + '\", \"parameters\": ' + "
      "c.function.arguments | tojson + '}' }}{%- endfor %}{%- else %}{{- "
      "'<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + m['content'] | trim + "
      "'<|eot_id|>' }}{%- endif %}{%- endfor %}{%- if add_generation_prompt %}{{- "
      "'<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}",
      // ChatML with tools, namespaces and loop variables.
      "{%- if tools %}<|im_start|>system\n{% for t in tools %}{{ t | tojson(indent=2) }}\n{% "
      "endfor %}<|im_end|>\n{%- endif %}{%- set ns = namespace(last=-1) %}{%- for m in "
      "messages[::-1] %}{%- if ns.last == -1 and m.role == 'user' %}{%- set ns.last = "
      "messages|length - 1 - loop.index0 %}{%- endif %}{%- endfor %}{%- for m in messages %}"
      "<|im_start|>{{ m.role }}\n{{ m.content if m.content is string else '' }}{% if loop.index0 "
      "> ns.last %}!{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt "
      "%}<|im_start|>assistant\n{% endif %}",
      // Macros, filters, string methods, raise_exception.
      "{% macro f(x, y='-') %}{{ x | upper }}{{ y * 2 }}{% endmacro %}{% for m in messages if "
      "m.content %}{{ f(m.role) }}{{ m.content.split(' ') | map('title') | join(',') }}{{ "
      "m.content[1:5] | replace('a', 'b') }}{% if m.role == 'nobody' %}{{ "
      "raise_exception('no tools') }}{% endif %}{% else %}none{% endfor %}{{ messages | "
      "selectattr('role', 'equalto', 'user') | list | length }}{{ range(3) | sum }}{{ "
      "'%d'|length }}",
      // Whitespace control, raw, set blocks, comments, generation.
      "{#- c -#}\n  {%- set x -%}\n {{ messages[0].content }} {%- endset %}{% raw %}{{ x "
      "}}{% endraw %}{{ x | trim }}{% generation %}{{ x ~ 1.5 ~ none ~ true }}{% endgeneration "
      "%}{%+ if 1 < 2 < 3 %}ok{% elif x %}no{% endif +%}",
      // printf-style formatting and string methods.
      "{{ '%s=%05.1f %-3d|%(k)r' % ('a', 2.25, 7) if false else '%(k)r %%' % {'k': 'v'} }}"
      "{{ '%s and %s' % (messages[0].role, messages|length) }}{{ 'a-b-c'.rsplit('-', 1) }}"
      "{{ 'x.txt'.removesuffix('.txt') }}{{ 'Straße'.upper() }}{{ 3.5 | round }}",
  };
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using Json = nlohmann::ordered_json;
  static const Json* vars = [] {
    auto* v = new Json(Json::parse(R"({
      "bos_token": "<s>",
      "add_generation_prompt": true,
      "messages": [
        {"role": "system", "content": "Be brief. é ß ά"},
        {"role": "user", "content": "What is {{ x }} in Zürich?"},
        {"role": "assistant", "content": null, "tool_calls": [
          {"type": "function", "function": {"name": "w", "arguments": {"city": "Z", "n": [1, 2.5]}}}]},
        {"role": "tool", "content": "{\"t\": 3}"},
        {"role": "user", "content": ""}],
      "tools": [{"type": "function", "function": {"name": "w", "parameters": {"type": "object"}}}]
    })"));
    return v;
  }();
  const std::string text(reinterpret_cast<const char*>(data), size);
  auto parsed = pds::engine::ChatTemplate::Parse(text, "fuzz.jinja");
  if (!parsed.ok()) {
    if (parsed.status().message().empty()) std::abort();
    return 0;
  }
  absl::StatusOr<std::string> out = (*parsed)->Render(*vars);
  if (!out.ok() && out.status().message().empty()) std::abort();
  return 0;
}

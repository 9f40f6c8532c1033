#!/usr/bin/env bash
# The one script for the GPU machine, run from the repository root with the bundle that
# bench/gpu/bundle.sh made (.gpu-bundle/, carried with the tree):
#
#   OUT=/some/dir bash bench/gpu/run.sh [--dry-run] [--quick-bench]
#
# Steps, each under a timeout (the whole run stays under ~7 minutes), none stopping the next:
# unpack the bundle (into $PDS_GPU_WORK/bundle, outside the tree; LD_LIBRARY_PATH is its lib/
# then /usr/local/cuda/lib64), check that every binary resolves its libraries, nvidia-smi,
# generate the tiny and small models, a CUDA `pdserve generate` smoke run of each, every gpu
# test binary, compute-sanitizer memcheck and racecheck on the kernel parity tests (filtered
# short), bench_cuda, bench_kv_transfer (the KV transports between two processes on the GPU).
# Then pdbench against `pdserve up --backend cuda` and Nsight Compute profiles of the main kernels.
# Writes to $OUT (default ./out/gpu) nine files: setup.log, tests.log, gtest.json (test binary
# -> its gtest JSON report), sanitizer.log, bench.log (both benches' output), bench.json,
# transfer.json, ncu.log and summary.txt; prints the summary last. Exit status 1 if any step
# failed.
#
#   --dry-run      print the steps and their commands, run nothing
#   --quick-bench  bench_cuda --quick and bench_kv_transfer --quick (smaller shapes)
# Environment: OUT; PDS_GPU_DEADLINE_S (default 540), PDS_GPU_NCU (0: no ncu step),
# PDS_GPU_WORK (default /tmp/pds-gpu),
# PDS_MEMCHECK_FILTER, PDS_RACECHECK_FILTER (gtest filters of the sanitizer runs).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT" || exit 1
DRY=0
BENCH_FLAGS=()
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY=1 ;;
    --quick-bench) BENCH_FLAGS+=(--quick) ;;
    -h|--help) awk 'NR > 1 && !/^#/ {exit} NR > 1 {sub(/^# ?/, ""); print}' "$0"; exit 0 ;;
    *) echo "run.sh: unknown argument '$arg' (see --help)" >&2; exit 2 ;;
  esac
done

OUT="${OUT:-$ROOT/out/gpu}"
BUNDLE="$ROOT/.gpu-bundle"
WORK="${PDS_GPU_WORK:-/tmp/pds-gpu}"
# Unpacked outside the tree, so that a tree carried again never carries the unpacked bundle.
UNPACKED="$WORK/bundle"
BIN="$UNPACKED/bin"
DEADLINE_S="${PDS_GPU_DEADLINE_S:-540}"
MEMCHECK_FILTER="${PDS_MEMCHECK_FILTER:-*/BF16:-*ErrorsAreStatuses*:*PrefillLongPrompt*:*DecodeRagged*:*PrefillCausal*:*DecodeLegacyKernel*:*DecodeMmaKernel*:*DecodeFusedCombine*:*FusedCombineIsBitwise*:*PrefillPrefixAlignments*:*GemvMatchesCpuAtEveryShape*}"
RACECHECK_DEFAULT="*SanitizerSized*/BF16"
RACECHECK_FILTER="${PDS_RACECHECK_FILTER:-$RACECHECK_DEFAULT}"
PARITY_TEST=kernels_cuda_ops_test
START=$(date +%s)
FAILED=0
HAVE_GPU=0
SUMMARY=()

mkdir -p "$OUT" "$WORK"
if [ "$DRY" = 0 ]; then
  : >"$OUT/setup.log"; : >"$OUT/tests.log"; : >"$OUT/sanitizer.log"; : >"$OUT/bench.log"
  rm -f "$OUT/bench.json" "$OUT/transfer.json" "$OUT/gtest.json" "$OUT/summary.txt"
fi
export LD_LIBRARY_PATH="$UNPACKED/lib:/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

say() { printf '[gpu] %s\n' "$*"; }
elapsed() { echo $(($(date +%s) - START)); }
# A step's timeout: its cap, cut so that `reserve` seconds are left for the steps after it.
clamp() {
  local cap=$1 reserve=${2:-0} left
  left=$((DEADLINE_S - $(elapsed) - reserve))
  [ "$left" -lt "$cap" ] && cap=$left
  echo "$cap"
}
note() {  # note STATUS NAME DETAIL
  SUMMARY+=("$(printf '%-7s %-34s %s' "$1" "$2" "$3")")
  case "$1" in FAIL|TIMEOUT|SKIP!) FAILED=1 ;; esac
}

# run_step NAME CAP RESERVE LOG CMD...: runs CMD under the clamped timeout, appending to LOG;
# sets STEP_RC (124: timed out, 125: no time left).
run_step() {
  local name=$1 cap=$2 reserve=$3 log=$4 t
  shift 4
  t=$(clamp "$cap" "$reserve")
  if [ "$DRY" = 1 ]; then
    printf '[dry-run] %-30s timeout %4ss  >> %s\n            %s\n' "$name" "$cap" \
      "${log#"$ROOT/"}" "$*"
    STEP_RC=0
    return 0
  fi
  if [ "$t" -lt 5 ]; then
    say "$name: skipped, no time left"
    echo "=== $name: skipped (no time left of the ${DEADLINE_S}s deadline)" >>"$log"
    STEP_RC=125
    return 0
  fi
  say "$name (timeout ${t}s)"
  {
    echo "=== $name  ($(date -u +%H:%M:%S), timeout ${t}s)"
    echo "\$ $*"
  } >>"$log"
  local t0
  t0=$(date +%s)
  if declare -F "$1" >/dev/null; then  # a function of this script: in a child bash
    timeout -k 10 "$t" bash -c "$(declare -f "$1"); \"\$@\"" _ "$@" >>"$log" 2>&1
  else
    timeout -k 10 "$t" "$@" >>"$log" 2>&1
  fi
  STEP_RC=$?
  echo "=== $name: exit $STEP_RC after $(($(date +%s) - t0))s" >>"$log"
  [ "$STEP_RC" = 124 ] || [ "$STEP_RC" = 137 ] && STEP_RC=124
  return 0
}

status_of() {  # status_of RC -> OK / TIMEOUT / SKIP! / FAIL
  case "$1" in 0) echo OK ;; 124) echo TIMEOUT ;; 125) echo SKIP! ;; *) echo FAIL ;; esac
}

# --- 1. the bundle -----------------------------------------------------------------------
ARCHIVE=""
for a in "$BUNDLE/bundle.tar.xz" "$BUNDLE/bundle.tar.gz"; do
  [ -f "$a" ] && ARCHIVE=$a && break
done
unpack() {  # unpack ARCHIVE DIR
  local archive=$1 dir=$2
  rm -rf "$dir" && mkdir -p "$dir" || return 1
  case "$archive" in
    *.xz)
      if command -v xz >/dev/null; then
        xz -dc "$archive" | tar -C "$dir" -xf -
      else  # no xz binary: Python's lzma
        python3 -c 'import sys, tarfile
tarfile.open(sys.argv[1], "r:xz").extractall(sys.argv[2])' "$archive" "$dir"
      fi ;;
    *) tar -C "$dir" -xzf "$archive" ;;
  esac
}
if [ "$DRY" = 1 ]; then
  run_step "unpack bundle" 45 0 "$OUT/setup.log" unpack "${ARCHIVE:-.gpu-bundle/bundle.tar.xz}" \
    "$UNPACKED"
elif [ -z "$ARCHIVE" ]; then
  echo "no bundle in $BUNDLE: run bench/gpu/bundle.sh on the build machine and carry .gpu-bundle" \
    >>"$OUT/setup.log"
  note FAIL "bundle" "no .gpu-bundle/bundle.tar.* (run bench/gpu/bundle.sh; carry .gpu-bundle)"
else
  if [ "$UNPACKED/.unpacked" -nt "$ARCHIVE" ] &&
    cmp -s "$UNPACKED/manifest.txt" "$BUNDLE/manifest.txt"; then
    echo "=== bundle already unpacked in $UNPACKED" >>"$OUT/setup.log"
  else
    run_step "unpack bundle" 45 300 "$OUT/setup.log" unpack "$ARCHIVE" "$UNPACKED"
    [ "$STEP_RC" = 0 ] && touch "$UNPACKED/.unpacked"
    [ "$STEP_RC" = 0 ] || note "$(status_of "$STEP_RC")" "unpack bundle" "see setup.log"
  fi
  cat "$BUNDLE/manifest.txt" >>"$OUT/setup.log" 2>/dev/null
fi

# Binaries built with absolute paths compiled in (tests run pdserve from the build tree) find
# the bundled ones there: the source root and each binary's build path are linked if absent.
if [ "$DRY" = 0 ] && [ -f "$BUNDLE/manifest.txt" ]; then
  src_root=$(awk '$1 == "source_root" {print $2}' "$BUNDLE/manifest.txt")
  if [ -n "$src_root" ] && [ ! -e "$src_root" ]; then
    mkdir -p "$(dirname "$src_root")" 2>/dev/null && ln -s "$ROOT" "$src_root" 2>/dev/null &&
      echo "linked $src_root -> $ROOT" >>"$OUT/setup.log"
  fi
  while read -r kind name path; do
    [ "$kind" = bin ] || [ "$kind" = test ] || continue
    [ -e "$path" ] && continue
    mkdir -p "$(dirname "$path")" 2>/dev/null && ln -s "$BIN/$name" "$path" 2>/dev/null &&
      echo "linked $path -> $BIN/$name" >>"$OUT/setup.log"
  done <"$BUNDLE/manifest.txt"
fi

TESTS=()
if [ -f "$BUNDLE/tests.txt" ]; then
  mapfile -t TESTS < <(grep -v '^\s*$' "$BUNDLE/tests.txt")
elif [ "$DRY" = 1 ]; then
  TESTS=(kernels_cuda_ops_test engine_cuda_model_test "(the rest of .gpu-bundle/tests.txt)")
fi

# Every bundled binary must resolve its libraries here.
if [ "$DRY" = 1 ]; then
  echo "[dry-run] check libraries: ldd .gpu-bundle/bin/* (LD_LIBRARY_PATH=$LD_LIBRARY_PATH)"
elif [ -d "$BIN" ]; then
  missing=""
  for b in "$BIN"/*; do
    m=$(ldd "$b" 2>&1 | awk '/not found/ {print $1}' | sort -u | tr '\n' ' ')
    [ -n "$m" ] && missing+="$(basename "$b"): $m; "
  done
  if [ -n "$missing" ]; then
    echo "missing libraries: $missing" >>"$OUT/setup.log"
    note FAIL "libraries" "$missing"
  else
    note OK "libraries" "every bundled binary resolves its libraries"
  fi
fi

# --- 2. the GPU ----------------------------------------------------------------------------
if [ "$DRY" = 1 ]; then
  echo "[dry-run] nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap"
else
  gpu=$(env -u LD_LIBRARY_PATH timeout 20 nvidia-smi \
    --query-gpu=name,driver_version,memory.total,compute_cap --format=csv,noheader 2>&1 | head -n 4)
  rc=$?
  echo "=== nvidia-smi: $gpu" >>"$OUT/setup.log"
  if [ $rc -eq 0 ] && [ -n "$gpu" ]; then
    HAVE_GPU=1
    say "GPU: $gpu"
    note OK "gpu" "$gpu"
  else
    say "no GPU: $gpu"
    note FAIL "gpu" "nvidia-smi failed: $(echo "$gpu" | head -n 1)"
  fi
fi

# --- 3. models and a CUDA generate smoke run -------------------------------------------------
for preset in tiny small; do
  run_step "make-model $preset" 40 300 "$OUT/setup.log" \
    "$BIN/pdserve" make-model --preset "$preset" --out "$WORK/models/$preset" --seed 1
  note "$(status_of "$STEP_RC")" "make-model $preset" "$WORK/models/$preset"
done
for preset in tiny small; do
  run_step "generate $preset (cuda)" 40 280 "$OUT/setup.log" \
    "$BIN/pdserve" generate --model "$WORK/models/$preset" --backend cuda \
    --prompt-ids 1,2,3,4,5,6,7,8 --max-tokens 16 --temperature 0 --ignore-eos --json
  note "$(status_of "$STEP_RC")" "pdserve generate $preset --backend cuda" "see setup.log"
done
export PDS_GPU_TINY_MODEL="$WORK/models/tiny" PDS_GPU_SMALL_MODEL="$WORK/models/small"

# --- 4. the gpu test binaries ----------------------------------------------------------------
mkdir -p "$WORK/gtest"
[ "$DRY" = 1 ] || rm -f "$WORK/gtest/"*.json
gtest_counts() {  # the counts gtest prints at the end of a run, from a log
  local log=$1 ran passed skipped failed
  ran=$(grep -Eo '^\[==========\] [0-9]+ tests? from .* ran' "$log" | tail -n 1 | awk '{print $2}')
  passed=$(grep -Eo '^\[  PASSED  \] [0-9]+' "$log" | tail -n 1 | awk '{print $NF}')
  skipped=$(grep -Eo '^\[  SKIPPED \] [0-9]+ tests?,' "$log" | tail -n 1 | awk '{print $4}')
  failed=$(grep -Eo '^\[  FAILED  \] [0-9]+ tests?,' "$log" | tail -n 1 | awk '{print $4}')
  echo "ran ${ran:-?}, passed ${passed:-0}, failed ${failed:-0}, skipped ${skipped:-0}"
}
n_tests=${#TESTS[@]}
i=0
for t in "${TESTS[@]}"; do
  i=$((i + 1))
  # The tests share 180 s; each gets at most 120 s and leaves the sanitizers and the bench theirs.
  tests_left=$((180 - ($(elapsed) - ${TESTS_START:=$(elapsed)})))
  cap=$((tests_left / (n_tests - i + 1) > 30 ? tests_left - (n_tests - i) * 30 : 30))
  [ "$cap" -gt 120 ] && cap=120
  one="$WORK/gtest/$t.log"
  [ "$DRY" = 1 ] || : >"$one"
  [ "$DRY" = 1 ] &&
    echo "[dry-run] (appended to ${OUT#"$ROOT/"}/tests.log; the JSON reports to gtest.json)"
  run_step "test $t" "$cap" 200 "$one" "$BIN/$t" --gtest_output="json:$WORK/gtest/$t.json" \
    --gtest_color=no
  [ "$DRY" = 1 ] && continue
  cat "$one" >>"$OUT/tests.log"
  counts=$(gtest_counts "$one")
  status=$(status_of "$STEP_RC")
  if [ "$status" = OK ] && echo "$counts" | grep -q 'ran ?'; then status=FAIL; fi
  # With a GPU here, skipped GPU tests mean the binary did not see it.
  if [ "$status" = OK ] && [ "$HAVE_GPU" = 1 ] && ! echo "$counts" | grep -q 'skipped 0$'; then
    if echo "$counts" | grep -q 'passed 0,'; then status=FAIL; else status=WARN; fi
  fi
  [ "$STEP_RC" != 0 ] && [ "$STEP_RC" != 124 ] && [ "$STEP_RC" != 125 ] &&
    ! grep -q '^\[  FAILED  \]' "$one" && counts="$counts (exit $STEP_RC: crashed?)"
  note "$status" "$t" "$counts"
done
if [ "$DRY" = 0 ]; then  # the gtest JSON reports as one object: test binary -> its report
  {
    echo "{"
    first=1
    for r in "$WORK"/gtest/*.json; do
      [ -s "$r" ] || continue
      [ $first = 1 ] || echo ","
      first=0
      printf '"%s": ' "$(basename "$r" .json)"
      cat "$r"
    done
    echo "}"
  } >"$OUT/gtest.json"
fi

# --- 5. compute-sanitizer on the kernel parity tests -----------------------------------------
SANITIZER=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
if [ "$DRY" = 1 ] || { [ -x "$SANITIZER" ] && [ -x "$BIN/$PARITY_TEST" ]; }; then
  run_step "memcheck $PARITY_TEST" 70 140 "$OUT/sanitizer.log" "$SANITIZER" --tool memcheck \
    --error-exitcode 86 --print-limit 30 "$BIN/$PARITY_TEST" --gtest_filter="$MEMCHECK_FILTER" \
    --gtest_color=no
  [ "$DRY" = 1 ] || note "$(status_of "$STEP_RC")" "memcheck $PARITY_TEST" \
    "$(tail -n 40 "$OUT/sanitizer.log" | grep -Eo 'ERROR SUMMARY: [0-9]+ errors?' | tail -n 1)"
  run_step "racecheck $PARITY_TEST" 60 130 "$OUT/sanitizer.log" "$SANITIZER" --tool racecheck \
    --error-exitcode 86 --print-limit 30 "$BIN/$PARITY_TEST" --gtest_filter="$RACECHECK_FILTER" \
    --gtest_color=no
  [ "$DRY" = 1 ] || note "$(status_of "$STEP_RC")" "racecheck $PARITY_TEST" \
    "$(tail -n 40 "$OUT/sanitizer.log" | grep -Eo '(RACECHECK|ERROR) SUMMARY: .*' | tail -n 1)"
elif [ ! -x "$SANITIZER" ]; then
  note FAIL "compute-sanitizer" "not found (PATH, /usr/local/cuda/bin)"
else
  note FAIL "compute-sanitizer" "no $PARITY_TEST in the bundle"
fi

# --- 6. bench_cuda ------------------------------------------------------------------------
# bench_cuda's own watchdog fires before the outer timeout, naming the stage that hung. It
# leaves bench_kv_transfer 45 s when the deadline is near.
bench_t=$(clamp 150 45)
run_step "bench_cuda" 150 45 "$OUT/bench.log" "$BIN/bench_cuda" --json-out "$OUT/bench.json" \
  --timeout-s $((bench_t > 20 ? bench_t - 10 : 10)) "${BENCH_FLAGS[@]}"
if [ "$DRY" = 0 ]; then
  note "$(status_of "$STEP_RC")" "bench_cuda" "see bench.log, bench.json"
  # The bench's table (from its header line to its next status line).
  BENCH_TABLE=$(awk '/^metric +value/ {on = 1} on && (/^$/ || /^bench_cuda:/) {exit} on' \
    "$OUT/bench.log")
fi

# --- 7. bench_kv_transfer ------------------------------------------------------------------
# The CUDA IPC KV transport (and host TCP) between this process and a child on the same GPU,
# against the cross-process IPC copy bandwidth, and the layer-by-layer hand-off of a llama3-8b
# engine's prefill against the prefill alone; its table is appended to bench.log.
kv_t=$(clamp 90 0)
kv_from=1
[ "$DRY" = 0 ] && kv_from=$(($(wc -l <"$OUT/bench.log") + 1))
run_step "bench_kv_transfer" 90 0 "$OUT/bench.log" "$BIN/bench_kv_transfer" \
  --json-out "$OUT/transfer.json" --timeout-s $((kv_t > 15 ? kv_t - 5 : 10)) "${BENCH_FLAGS[@]}"
if [ "$DRY" = 0 ]; then
  note "$(status_of "$STEP_RC")" "bench_kv_transfer" "see bench.log, transfer.json"
  # Its table, from the lines this step appended.
  KV_TABLE=$(tail -n "+$kv_from" "$OUT/bench.log" |
    awk '/^metric +value/ {on = 1} on && (/^$/ || /^bench_kv_transfer:/) {exit} on')
fi

# --- 8. serving on the GPU: pdserve up --backend cuda under pdbench --------------------------
# The small model served disaggregated (1 prefill + 1 decode process on the one GPU, KV over
# CUDA IPC, layer by layer during the prefill step), the same with the KV sent after the step
# (--kv-handoff after) and colocated (one process), each under the same pdbench load; reports
# appended to bench.log.
gpu_serving() {
  local mode=$1 dir="$WORK/serve-$1" addr i
  rm -rf "$dir" && mkdir -p "$dir"
  case "$mode" in
    disagg) set -- --prefill 1 --decode 1 ;;
    disagg-after) set -- --prefill 1 --decode 1 --kv-handoff after ;;
    *) set -- --colocated 1 ;;
  esac
  "$BIN/pdserve" up --model "$WORK/models/small" --backend cuda "$@" --port 0 \
    --ready-file "$dir/ready" >"$dir/cluster.log" 2>&1 &
  local up=$!
  for i in $(seq 1 300); do [ -s "$dir/ready" ] && break; sleep 0.1; done
  if [ ! -s "$dir/ready" ]; then
    echo "cluster ($mode) not ready in 30 s"; tail -n 20 "$dir/cluster.log"; kill $up; return 1
  fi
  addr=$(cat "$dir/ready")
  echo "--- pdbench against pdserve up --backend cuda ($mode) at $addr"
  "$BIN/pdbench" --target "$addr" --dataset chatbot --length-scale 0.125 --max-model-len 1024 \
    --rate 40 --num-requests 300 --seed 1 --goodput ttft:100 tpot:20 --quiet
  local rc=$?
  kill -INT $up; wait $up
  return $rc
}
export BIN WORK  # gpu_serving runs in a child bash
for mode in disagg disagg-after colocated; do
  run_step "serving $mode (cuda)" 40 0 "$OUT/bench.log" gpu_serving "$mode"
  [ "$DRY" = 1 ] || note "$(status_of "$STEP_RC")" "pdserve up --backend cuda ($mode)" \
    "pdbench report in bench.log"
done

# --- 9. kernel profiles (ncu) -----------------------------------------------------------------
# One launch each of the decode attention, prefill attention and row GEMV kernels at the
# llama3-8b shapes (bench_cuda --kernels-only under Nsight Compute): speed of light, memory
# workload, occupancy and warp stall sections, to ncu.log. Skipped with PDS_GPU_NCU=0.
NCU=$(command -v ncu || echo /usr/local/cuda/bin/ncu)
ncu_profiles() {
  local k rc=0
  for k in PipelinedDecodeKernel MmaDecodeKernel PrefillMmaKernel GemvRowsKernel; do
    echo "=== ncu: $k"
    "$NCU" --kernel-name "regex:$k" --launch-skip 2 --launch-count 1 --section SpeedOfLight \
      --section MemoryWorkloadAnalysis --section Occupancy --section WarpStateStats \
      --section LaunchStats --section SchedulerStats --log-file "$WORK/ncu-$k.txt" \
      "$BIN/bench_cuda" --kernels-only --iters 1 --timeout-s 100 >"$WORK/ncu-$k.out" 2>&1 || rc=1
    cat "$WORK/ncu-$k.txt" 2>/dev/null || tail -n 20 "$WORK/ncu-$k.out"
  done
  return $rc
}
export NCU WORK
if [ "${PDS_GPU_NCU:-1}" != 0 ] && { [ "$DRY" = 1 ] || [ -x "$NCU" ]; }; then
  [ "$DRY" = 1 ] || : >"$OUT/ncu.log"
  run_step "ncu kernel profiles" 150 0 "$OUT/ncu.log" ncu_profiles
  [ "$DRY" = 1 ] || note "$(status_of "$STEP_RC")" "ncu kernel profiles" "see ncu.log"
fi

# --- summary ------------------------------------------------------------------------------
[ "$DRY" = 1 ] && {
  echo "[dry-run] then summary.txt: one line per step, the bench_cuda and bench_kv_transfer tables"
  exit 0
}
{
  built=$(awk '$1 == "git" {print $2}' "$BUNDLE/manifest.txt" 2>/dev/null)
  echo "GPU run summary ($(date -u +%Y-%m-%dT%H:%M:%SZ), $(elapsed)s, bundle of $built)"
  printf '%s\n' "${SUMMARY[@]}"
  if [ -n "${BENCH_TABLE:-}" ]; then
    echo
    echo "$BENCH_TABLE"
  fi
  if [ -n "${KV_TABLE:-}" ]; then
    echo
    echo "$KV_TABLE"
  fi
  echo
  if [ "$FAILED" = 0 ]; then
    echo "result: all steps passed"
  else
    echo "result: FAILED (see the logs in $OUT)"
  fi
} >"$OUT/summary.txt"
echo
cat "$OUT/summary.txt"
exit "$FAILED"

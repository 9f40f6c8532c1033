#!/usr/bin/env bash
# Front-end and hand-off overhead of the serving path on this machine: the same `tiny` model
# (compute is small, so the serving path dominates) served offline by one engine (the
# ceiling) and through a local cluster (front-end + 1 prefill + 1 decode, CPU), driven by
# pdbench. Prints a table; usage: bench/serving_overhead.sh [BUILD_DIR]
set -euo pipefail
BUILD="${1:-build}"
PDS="$BUILD/server/pdserve"
PDB="$BUILD/client/pdbench"
WORK="$(mktemp -d)"
trap 'kill -TERM ${UP:-0} 2>/dev/null; wait ${UP:-0} 2>/dev/null; rm -rf "$WORK"' EXIT

"$PDS" make-model --preset tiny --out "$WORK/tiny" --seed 1 >/dev/null 2>&1
OUT_LEN=256
# Offline ceiling: one engine, b=1 and b=32, 256 generated tokens each.
ids=$(seq -s, 100 115)
off1=$("$PDS" generate --model "$WORK/tiny" --prompt-ids "$ids" --max-tokens $OUT_LEN \
  --ignore-eos --json --threads 1 2>/dev/null | python3 -c \
  'import json,sys; j=json.load(sys.stdin); t=j["timing_ms"]; print((t["total"]-t["first_token"])/(j["completion_tokens"]-1))')

"$PDS" up --model "$WORK/tiny" --prefill 1 --decode 1 --port 0 --threads 1 \
  --ready-file "$WORK/ready" >"$WORK/cluster.log" 2>&1 &
UP=$!
for _ in $(seq 1 600); do [ -s "$WORK/ready" ] && break; sleep 0.1; done
ADDR=$(cat "$WORK/ready")
run() {  # concurrency -> json
  "$PDB" --target "$ADDR" --concurrency "$1" --num-requests "$2" --input-len 16 \
    --output-len $OUT_LEN --seed 1 --quiet --json-out "$WORK/c$1.json" >/dev/null
  cat "$WORK/c$1.json"
}
one=$(run 1 8)
many=$(run 32 64)
python3 - "$off1" "$one" "$many" <<'PY'
import json, sys
off_itl = float(sys.argv[1])
one, many = json.loads(sys.argv[2]), json.loads(sys.argv[3])
print(f"{'measure':44s} {'value':>12s}")
print(f"{'offline engine, b=1: ms per token':44s} {off_itl:12.3f}")
print(f"{'cluster, 1 stream: mean ITL ms':44s} {one['mean_itl_ms']:12.3f}")
print(f"{'added latency per token (ms)':44s} {one['mean_itl_ms'] - off_itl:12.3f}")
print(f"{'cluster, 1 stream: mean TTFT ms':44s} {one['mean_ttft_ms']:12.3f}")
print(f"{'cluster, 32 streams: output tokens/s':44s} {many['output_throughput']:12.1f}")
print(f"{'cluster, 1 stream: output tokens/s':44s} {one['output_throughput']:12.1f}")
print(f"{'1 stream: fraction of offline b=1 rate':44s} {(1000/one['mean_itl_ms'])/(1000/off_itl):12.2f}")
PY

#!/usr/bin/env bash
# Prefix caching on a local CPU cluster: the same shared-prefix workload against
# `pdserve up --prefix-caching on` and `off` (1 prefill + 1 decode, `small` preset, 1 thread
# each), one pdbench run each; prints both reports' TTFT/TPOT/attainment, the prefill
# worker's cache figures, the KV bytes handed off and those not sent because the decode worker
# held them, and the hand-off times. Usage: bench/prefix_cache.sh [BUILD_DIR] [OUT_DIR]
# Knobs (environment): RATE (req/s, default 2), N (requests, default 60), PREFIX (tokens, 512),
# NPREFIX (distinct prefixes, 4), SLO ("ttft:500 tpot:50"), TURNS (multi-turn conversations of
# this many requests, default 1: RATE and N then count conversations), THINK (seconds between
# an answer and the next turn, default 1), MODES (the runs, default "on off": prefix caching on
# or off; "local" is on with --local-prefill-max-tokens LOCAL, default 256). "P-worker hit %"
# is the prefill worker's cache alone (local prefills hit the decode worker's).
set -euo pipefail
BUILD="${1:-build}"
OUT="${2:-$BUILD/prefix_cache}"
RATE="${RATE:-2}" N="${N:-60}" PREFIX="${PREFIX:-512}" NPREFIX="${NPREFIX:-4}"
SLO="${SLO:-ttft:500 tpot:50}" TURNS="${TURNS:-1}" THINK="${THINK:-1}"
MODES="${MODES:-on off}" LOCAL="${LOCAL:-256}"
model="$BUILD/models/small"
mkdir -p "$OUT"
[ -f "$model/config.json" ] ||
  "$BUILD/server/pdserve" make-model --preset small --out "$model" --seed 1 >/dev/null
for mode in $MODES; do
  rm -f "$OUT/ready-$mode"
  port=$((19000 + RANDOM % 20000))
  caching=on local=0
  [ "$mode" = off ] && caching=off
  [ "$mode" = local ] && local="$LOCAL"
  "$BUILD/server/pdserve" up --model "$model" --prefill 1 --decode 1 --port 0 --threads 1 \
    --metrics-port "$port" --prefix-caching "$caching" --local-prefill-max-tokens "$local" \
    --ready-file "$OUT/ready-$mode" >"$OUT/cluster-$mode.log" 2>&1 &
  up=$!
  for _ in $(seq 1 600); do
    [ -s "$OUT/ready-$mode" ] && break
    kill -0 "$up" 2>/dev/null || { cat "$OUT/cluster-$mode.log" >&2; exit 1; }
    sleep 0.2
  done
  addr="$(cat "$OUT/ready-$mode")"
  # shellcheck disable=SC2086
  "$BUILD/client/pdbench" --target "$addr" --dataset chatbot --length-scale 0.125 \
    --shared-prefix-len "$PREFIX" --num-shared-prefixes "$NPREFIX" --max-model-len 2048 \
    --rate "$RATE" --num-requests "$N" --turns "$TURNS" --think-time "$THINK" --seed 1 \
    --goodput $SLO \
    --json-out "$OUT/report-$mode.json" --report-out "$OUT/report-$mode.txt" --quiet >/dev/null
  sleep 1  # the front-end's next health polls carry the workers' last counters
  curl -s "http://127.0.0.1:$port/metrics" >"$OUT/metrics-$mode.txt" || true
  kill -TERM "$up"
  wait "$up" || true
done
python3 - "$OUT" $MODES <<'PY'
import json, re, sys
out, modes = sys.argv[1], sys.argv[2:]
print(f"{'prefix caching':<16}{'attain %':>9}{'goodput':>9}{'TTFT mean':>10}{'p50':>8}"
      f"{'p99':>8}{'TPOT mean':>10}{'P-worker hit %':>15}{'KV MB sent':>11}{'held %':>7}"
      f"{'transfer ms':>12}{'after prefill ms':>17}{'local':>7}")
for mode in modes:
    r = json.load(open(f"{out}/report-{mode}.json"))
    sums = {}
    try:
        for line in open(f"{out}/metrics-{mode}.txt"):
            m = re.match(r'pdserve_instance_(prefix_cache_hit_tokens|prefix_cache_query_tokens|'
                         r'kv_bytes_sent|kv_bytes_held)_total\{.*role="prefill".*\} (\S+)', line)
            if m: sums[m.group(1)] = sums.get(m.group(1), 0.0) + float(m.group(2))
            m = re.match(r'pdserve_requests_local_prefill_total (\S+)', line)
            if m: sums["local"] = float(m.group(1))
    except OSError:
        pass
    hit, query = sums.get("prefix_cache_hit_tokens", 0), sums.get("prefix_cache_query_tokens", 0)
    sent, held = sums.get("kv_bytes_sent", 0), sums.get("kv_bytes_held", 0)
    rate = f"{100 * hit / query:.1f}" if query else "-"
    held_pct = f"{100 * held / (sent + held):.1f}" if sent + held else "-"
    t = r.get("server_timeline", {})
    print(f"{mode:<16}{100 * r['slo_attainment']:>9.1f}{r['request_goodput']:>9.2f}"
          f"{r['mean_ttft_ms']:>10.1f}{r['median_ttft_ms']:>8.1f}{r['p99_ttft_ms']:>8.1f}"
          f"{r['mean_tpot_ms']:>10.2f}{rate:>15}{sent / 1e6:>11.1f}{held_pct:>7}"
          f"{t.get('transfer_ms', {}).get('mean', 0):>12.2f}"
          f"{t.get('handoff_ms', {}).get('mean', 0):>17.2f}{sums.get('local', 0):>7.0f}")
PY

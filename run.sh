#!/usr/bin/env bash
# pdserve developer entry point. On a fresh Debian 12 machine each command installs what is
# missing (apt, as root or through sudo) and builds before it runs.
#
#   ./run.sh demo    the main job: a local disaggregated cluster (1 prefill + 1 decode worker,
#                    CPU, `small` model) under a pdbench SLO load test; prints the report
#   ./run.sh test    build and run the whole test suite (ctest)
#   ./run.sh build   install dependencies and build only
#   ./run.sh bench   run the CPU benchmarks (results printed; see bench/results/)
#
# Environment: PDS_BUILD_DIR (default build), PDS_JOBS (default 2), PDS_CUDA (AUTO|ON|OFF).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
BUILD="${PDS_BUILD_DIR:-$ROOT/build}"
JOBS="${PDS_JOBS:-2}"

PACKAGES=(
  build-essential cmake ninja-build ccache pkg-config git
  libabsl-dev libspdlog-dev nlohmann-json3-dev libopenblas-dev libpcre2-dev libicu-dev libcpp-httplib-dev
  libgrpc++-dev libprotobuf-dev protobuf-compiler protobuf-compiler-grpc
  libgtest-dev libgmock-dev libbenchmark-dev
  python3 python3-grpcio python3-protobuf python3-yaml python3-jinja2 python3-jsonschema
)

log() { printf '\033[1m[run.sh]\033[0m %s\n' "$*" >&2; }

install_deps() {
  local missing=()
  for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  # node and npm run the tokenizer's JavaScript reference in the tests; any install will do.
  command -v node >/dev/null 2>&1 || missing+=(nodejs)
  command -v npm >/dev/null 2>&1 || missing+=(npm)
  # kubectl renders deploy/k8s (kustomize) for the deploy test; any install will do.
  command -v kubectl >/dev/null 2>&1 || missing+=(kubernetes-client)
  [ ${#missing[@]} -eq 0 ] && return 0
  log "installing: ${missing[*]}"
  local sudo=""
  [ "$(id -u)" -ne 0 ] && sudo="sudo"
  $sudo apt-get update -q
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends "${missing[@]}"
}

build() {
  install_deps
  if [ ! -f "$BUILD/build.ninja" ]; then
    cmake -S "$ROOT" -B "$BUILD" -G Ninja -DPDS_CUDA="${PDS_CUDA:-AUTO}" "$@"
  fi
  cmake --build "$BUILD" -j "$JOBS"
}

demo() {
  build
  local model="$BUILD/models/small" out="$BUILD/demo"
  mkdir -p "$out"
  if [ ! -f "$model/config.json" ]; then
    log "writing the 'small' preset model (random weights) to $model"
    "$BUILD/server/pdserve" make-model --preset small --out "$model" --seed 1
  fi
  rm -f "$out/ready"
  log "starting a local cluster: front-end + 1 prefill + 1 decode worker (CPU; logs: $out/cluster.log)"
  "$BUILD/server/pdserve" up --model "$model" --prefill 1 --decode 1 --port 0 \
    --threads 1 --ready-file "$out/ready" >"$out/cluster.log" 2>&1 &
  local up=$!
  trap 'kill -TERM '"$up"' 2>/dev/null; wait '"$up"' 2>/dev/null' EXIT
  for _ in $(seq 1 600); do
    [ -s "$out/ready" ] && break
    kill -0 "$up" 2>/dev/null || { cat "$out/cluster.log" >&2; log "the cluster did not start"; exit 1; }
    sleep 0.2
  done
  [ -s "$out/ready" ] || { log "the cluster was not ready in 120 s"; exit 1; }
  local addr
  addr="$(cat "$out/ready")"
  log "cluster ready at $addr; one request through the public API:"
  "$BUILD/client/pdbench" --target "$addr" --num-requests 1 --input-len 16 --output-len 24 \
    --concurrency 1 --quiet --seed 3 >/dev/null
  log "pdbench: chatbot-shaped workload (lengths scaled 1/8), Poisson arrivals at 4 req/s," \
    "SLOs TTFT 250 ms / TPOT 50 ms"
  "$BUILD/client/pdbench" --target "$addr" --dataset chatbot --length-scale 0.125 \
    --max-model-len 1024 --rate 4 --num-requests 60 --seed 1 --goodput ttft:250 tpot:50 \
    --json-out "$out/report.json" --report-out "$out/report.txt"
  log "report also written to $out/report.txt and $out/report.json"
}

run_tests() {
  build
  cd "$BUILD"
  ctest -j "$JOBS" --timeout 600 --output-on-failure
}

bench() {
  build
  PDS_THREADS="$JOBS" "$BUILD/bench/bench_cpu_ops"
  PDS_THREADS="$JOBS" "$BUILD/bench/bench_engine"
}

case "${1:-}" in
  demo) demo ;;
  test) run_tests ;;
  build) shift; build "$@" ;;
  bench) bench ;;
  *) sed -n '2,12p' "$0" >&2; exit 2 ;;
esac

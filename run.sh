#!/usr/bin/env bash
# pdserve developer entry point. On a fresh Debian 12 machine each command installs what is
# missing (apt, as root or through sudo) and builds before it runs.
#
#   ./run.sh demo    the main job: generate a small model and run generation with it
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
  libabsl-dev libspdlog-dev nlohmann-json3-dev libopenblas-dev libpcre2-dev libicu-dev
  libgrpc++-dev libprotobuf-dev protobuf-compiler protobuf-compiler-grpc
  libgtest-dev libgmock-dev libbenchmark-dev
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
  local model="$BUILD/models/small"
  if [ ! -f "$model/config.json" ]; then
    log "writing the 'small' preset model (random weights) to $model"
    "$BUILD/server/pdserve" make-model --preset small --out "$model" --seed 1
  fi
  log "offline generation (CPU backend, greedy, 64 tokens)"
  "$BUILD/server/pdserve" generate --model "$model" --prompt-ids 128,2045,77,1999,4012,311,9 \
    --max-tokens 64 --ignore-eos --threads "$JOBS"
  log "seeded sampling with logprobs (JSON)"
  "$BUILD/server/pdserve" generate --model "$model" --prompt-ids 128,2045,77 --max-tokens 8 \
    --temperature 0.8 --top-p 0.95 --seed 7 --logprobs 2 --json --threads "$JOBS"
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
  *) sed -n '2,11p' "$0" >&2; exit 2 ;;
esac

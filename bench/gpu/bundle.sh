#!/usr/bin/env bash
# Builds what the GPU machine runs and packs it, with the shared libraries it needs that the
# GPU machine lacks, into .gpu-bundle/ at the repository root (ignored by git). There
# bench/gpu/run.sh unpacks and runs it. See bench/gpu/README.md.
#
#   bench/gpu/bundle.sh [--build-dir DIR] [--jobs N] [--no-build] [--max-mib N]
#
#   --build-dir  build directory (default: $PDS_GPU_BUILD_DIR, else ./build when it is
#                configured with CUDA for sm_90a, else ./build-gpu, configured here)
#   --jobs       parallel build jobs (default: $PDS_JOBS or 2)
#   --no-build   bundle what is already built
#   --max-mib    fail when the packed bundle is larger (default 45)
#   --keep-going build what builds and bundle it, leaving out (with a warning) the targets
#                that fail to build (default: any build failure is fatal)
#
# Bundled: pdserve, pdbench, bench_cuda, bench_kv_transfer and every test binary with the ctest
# label `gpu` (found from the pds_test(... LABELS gpu) calls under tests/, checked after the build
# against `ctest -L gpu`), stripped; the libraries `ldd` resolves for them under
# /usr/lib/x86_64-linux-gnu and /lib/x86_64-linux-gnu, except glibc's, libstdc++/libgcc_s (the
# GPU machine's Ubuntu 24.04 has newer ones) and the CUDA/NCCL libraries (present there).
# Everything is packed into one xz tarball (xz's window deduplicates the CUDA kernels that every
# binary links).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
BUNDLE="$ROOT/.gpu-bundle"
BUILD="${PDS_GPU_BUILD_DIR:-}"
JOBS="${PDS_JOBS:-2}"
DO_BUILD=1
KEEP_GOING=0
MAX_MIB=45

log() { printf '\033[1m[bundle]\033[0m %s\n' "$*" >&2; }
die() { printf '\033[1;31m[bundle] error:\033[0m %s\n' "$*" >&2; exit 1; }

while [ $# -gt 0 ]; do
  case "$1" in
    --build-dir) BUILD="$2"; shift 2 ;;
    --build-dir=*) BUILD="${1#*=}"; shift ;;
    --jobs) JOBS="$2"; shift 2 ;;
    --jobs=*) JOBS="${1#*=}"; shift ;;
    --no-build) DO_BUILD=0; shift ;;
    --keep-going) KEEP_GOING=1; shift ;;
    --max-mib) MAX_MIB="$2"; shift 2 ;;
    --max-mib=*) MAX_MIB="${1#*=}"; shift ;;
    -h|--help) awk 'NR > 1 && !/^#/ {exit} NR > 1 {sub(/^# ?/, ""); print}' "$0"; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done

# A configured build directory with the CUDA language enabled for an sm_90 architecture (the
# root CMakeLists.txt defaults to 90a when CMAKE_CUDA_ARCHITECTURES is not given).
cuda_configured() {
  local cache="$1/CMakeCache.txt"
  [ -f "$cache" ] || return 1
  compgen -G "$1/CMakeFiles/*/CMakeCUDACompiler.cmake" >/dev/null || return 1
  grep -Eq '^PDS_CUDA:[A-Z]*=OFF' "$cache" && return 1
  if grep -Eq '^CMAKE_CUDA_ARCHITECTURES:' "$cache"; then
    grep -Eq '^CMAKE_CUDA_ARCHITECTURES:[A-Z]*=.*90' "$cache" || return 1
  fi
  return 0
}

if [ -z "$BUILD" ]; then
  if cuda_configured "$ROOT/build"; then BUILD="$ROOT/build"; else BUILD="$ROOT/build-gpu"; fi
fi
case "$BUILD" in /*) ;; *) BUILD="$ROOT/$BUILD" ;; esac

if [ ! -f "$BUILD/CMakeCache.txt" ]; then
  [ "$DO_BUILD" = 1 ] || die "$BUILD is not configured (and --no-build was given)"
  log "configuring $BUILD (Release, CUDA sm_90a)"
  cmake -S "$ROOT" -B "$BUILD" -G Ninja -DCMAKE_BUILD_TYPE=Release -DPDS_CUDA=ON \
    -DCMAKE_CUDA_ARCHITECTURES=90a >&2
fi
cuda_configured "$BUILD" ||
  die "$BUILD is not configured with CUDA for sm_90 (reconfigure it with -DPDS_CUDA=ON" \
    "-DCMAKE_CUDA_ARCHITECTURES=90a, or pass --build-dir)"
log "build directory: $BUILD"

# The gpu-labelled test targets: pds_test(NAME ... LABELS ... gpu ...) under tests/.
gpu_test_targets() {
  python3 - "$ROOT/tests" <<'PY'
import pathlib, re, sys
names = []
for f in sorted(pathlib.Path(sys.argv[1]).rglob("CMakeLists.txt")):
    text = re.sub(r"#[^\n]*", "", f.read_text())
    for call in re.finditer(r"\bpds_test\s*\(([^)]*)\)", text):
        args = call.group(1).split()
        if "LABELS" not in args or "gpu" not in args[args.index("LABELS") + 1:]:
            continue
        if "$" in args[0]:
            print(f"bundle: cannot resolve the gpu test target '{args[0]}' in {f}", file=sys.stderr)
            continue
        names.append(args[0])
print("\n".join(dict.fromkeys(names)))
PY
}

mapfile -t TEST_TARGETS < <(gpu_test_targets)
declare -A LEFT_OUT=()
TARGETS=(pdserve pdbench bench_cuda bench_kv_transfer "${TEST_TARGETS[@]}")
log "targets: ${TARGETS[*]}"
if [ "$DO_BUILD" = 1 ]; then
  if [ "$KEEP_GOING" = 1 ]; then
    cmake --build "$BUILD" -j "$JOBS" --target "${TARGETS[@]}" -- -k 0 >&2 ||
      log "warning: some targets failed to build (--keep-going)"
    # Leave out what is not up to date now (it failed; a binary there would be stale).
    kept=()
    for t in "${TARGETS[@]}"; do
      if [ "$(ninja -C "$BUILD" -n "$t" 2>/dev/null | tail -n 1)" = "ninja: no work to do." ]; then
        kept+=("$t")
      else
        log "warning: $t did not build: left out of the bundle"
        LEFT_OUT[$t]=1
      fi
    done
    TARGETS=("${kept[@]}")
    kept=()
    for t in "${TEST_TARGETS[@]}"; do [ -n "${LEFT_OUT[$t]:-}" ] || kept+=("$t"); done
    TEST_TARGETS=("${kept[@]}")
  else
    cmake --build "$BUILD" -j "$JOBS" --target "${TARGETS[@]}" >&2 ||
      die "the build failed (--keep-going bundles the targets that build)"
  fi
fi

# Where each target's binary is (the first executable of that name in the build tree).
find_binary() {
  find "$BUILD" -path "$BUILD/CMakeFiles" -prune -o -type f -name "$1" -perm -u+x -print | head -n 1
}

declare -A BIN_PATHS=() IS_TEST=()
declare -a TEST_NAMES=()
for t in "${TARGETS[@]}"; do
  p="$(find_binary "$t")"
  [ -n "$p" ] || die "no binary for target $t in $BUILD"
  BIN_PATHS[$t]="$p"
done
for t in "${TEST_TARGETS[@]}"; do TEST_NAMES+=("$t"); IS_TEST[$t]=1; done

# Cross-check with ctest: every executable of a gpu-labelled test must be in the bundle.
if command -v ctest >/dev/null; then
  while IFS= read -r exe; do
    [ -n "$exe" ] || continue
    name="$(basename "$exe")"
    if [ -z "${BIN_PATHS[$name]:-}" ] && [ -z "${LEFT_OUT[$name]:-}" ]; then
      if [ -x "$exe" ] && file -b "$exe" | grep -q ELF; then
        log "ctest -L gpu also runs $name: bundled"
        BIN_PATHS[$name]="$exe"
        TEST_NAMES+=("$name")
        IS_TEST[$name]=1
      else
        log "warning: ctest -L gpu runs '$exe', which is not a test binary: run.sh will not run it"
      fi
    fi
  done < <(ctest --test-dir "$BUILD" -L gpu --show-only=json-v1 2>/dev/null | python3 -c '
import json, sys
try:
    data = json.load(sys.stdin)
except Exception:
    sys.exit(0)
seen = []
for t in data.get("tests", []):
    cmd = t.get("command") or []
    if cmd and cmd[0] not in seen:
        seen.append(cmd[0])
print("\n".join(seen))')
fi
[ ${#TEST_NAMES[@]} -gt 0 ] || log "warning: no gpu-labelled test binaries found"

STAGE="$(mktemp -d "${TMPDIR:-/tmp}/pds-gpu-bundle.XXXXXX")"
trap 'rm -rf "$STAGE"' EXIT
mkdir -p "$STAGE/bin" "$STAGE/lib"

# glibc, the C++ runtime (newer on the GPU machine) and CUDA/NCCL (present there) stay out.
SKIP_RE='^(linux-vdso|ld-linux|libc\.so|libm\.so|libmvec\.so|libpthread\.so|libdl\.so|librt\.so|'
SKIP_RE+='libutil\.so|libresolv\.so|libnsl\.so|libanl\.so|libBrokenLocale\.so|libstdc\+\+\.so|'
SKIP_RE+='libgcc_s\.so|libcuda\.so|libcudart\.so|libcublas\.so|libcublasLt\.so|libnccl\.so|libnvidia|'
SKIP_RE+='libnvrtc|libnvJitLink|libcufft|libcurand|libcusparse|libcusolver)'

declare -A LIBS=()
for name in "${!BIN_PATHS[@]}"; do
  src="${BIN_PATHS[$name]}"
  strip -o "$STAGE/bin/$name" "$src"
  missing="$(env -u LD_LIBRARY_PATH ldd "$src" | awk '/not found/ {print $1}' |
    grep -Ev "$SKIP_RE" || true)"
  [ -z "$missing" ] || die "$name: libraries not found here: $missing"
  while read -r soname path; do
    [[ "$soname" =~ $SKIP_RE ]] && continue
    case "$path" in
      /usr/lib/x86_64-linux-gnu/*|/lib/x86_64-linux-gnu/*) LIBS[$soname]="$path" ;;
      *) ;;  # CUDA toolkit libraries and anything else outside the system library folders
    esac
  done < <(env -u LD_LIBRARY_PATH ldd "$src" | awk '$2 == "=>" && $3 ~ /^\// {print $1, $3}')
done
for soname in "${!LIBS[@]}"; do cp -L "${LIBS[$soname]}" "$STAGE/lib/$soname"; done

{
  echo "# pdserve GPU bundle (bench/gpu/bundle.sh); run with: bash bench/gpu/run.sh"
  echo "created $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  head="$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)"
  git -C "$ROOT" diff --quiet HEAD 2>/dev/null || head+="+dirty"
  echo "git $head"
  echo "source_root $ROOT"
  echo "build_dir $BUILD"
  arch="$(grep -E '^CMAKE_CUDA_ARCHITECTURES:' "$BUILD/CMakeCache.txt" | cut -d= -f2 || true)"
  echo "cuda_architectures ${arch:-90a}"
  for name in $(printf '%s\n' "${!BIN_PATHS[@]}" | sort); do
    kind="bin"
    [ -z "${IS_TEST[$name]:-}" ] || kind="test"
    echo "$kind $name ${BIN_PATHS[$name]}"
  done
  for soname in $(printf '%s\n' "${!LIBS[@]}" | sort); do echo "lib $soname ${LIBS[$soname]}"; done
} >"$STAGE/manifest.txt"
printf '%s\n' "${TEST_NAMES[@]}" | sort -u >"$STAGE/tests.txt"

raw_bytes="$(du -sb "$STAGE" | cut -f1)"
rm -rf "$BUNDLE"
mkdir -p "$BUNDLE"
if command -v xz >/dev/null; then
  archive="$BUNDLE/bundle.tar.xz"
  log "packing with xz -9 ($((raw_bytes >> 20)) MiB unpacked)"
  tar -C "$STAGE" -cf - manifest.txt tests.txt bin lib | xz -9 -T"$JOBS" >"$archive"
else
  archive="$BUNDLE/bundle.tar.gz"
  log "packing with gzip -9 (no xz here; $((raw_bytes >> 20)) MiB unpacked)"
  tar -C "$STAGE" -cf - manifest.txt tests.txt bin lib | gzip -9 >"$archive"
fi
cp "$STAGE/manifest.txt" "$STAGE/tests.txt" "$BUNDLE/"
packed_bytes="$(du -sb "$BUNDLE" | cut -f1)"

log "bundle: $BUNDLE ($(basename "$archive"))"
mib() { awk -v b="$1" 'BEGIN {printf "%.1f", b / 1048576}'; }
log "  ${#BIN_PATHS[@]} binaries ($(printf '%s\n' "${!BIN_PATHS[@]}" | sort | tr '\n' ' ')), ${#LIBS[@]} libraries"
log "  unpacked $(mib "$raw_bytes") MiB, packed $(mib "$packed_bytes") MiB (limit $MAX_MIB MiB)"
if [ "$packed_bytes" -gt $((MAX_MIB * 1048576)) ]; then
  die "the bundle is $((packed_bytes >> 20)) MiB, over the $MAX_MIB MiB limit"
fi
echo "$BUNDLE"

#!/usr/bin/env bash
# Installs (apt, Debian 12) what a pdserve image stage needs; the Dockerfile's one source of
# package names, also read by tests/deploy (every shared library the binaries load must come
# from a runtime package listed here or from the base image).
#
#   packages.sh build|runtime cpu|cuda        install
#   packages.sh --list build|runtime cpu|cuda print the package names, one per line
#
# The cuda variants add NVIDIA's CUDA repository for Debian 12 (cuda-keyring) and its packages;
# the GPU driver itself comes from the node (NVIDIA container toolkit), never the image.
set -euo pipefail

CUDA_MAJOR_MINOR="${CUDA_VERSION:-13-0}"

BUILD_CPU=(
  build-essential cmake ninja-build pkg-config ca-certificates
  libabsl-dev libspdlog-dev nlohmann-json3-dev libopenblas-dev libpcre2-dev libicu-dev
  libcpp-httplib-dev
  libgrpc++-dev libprotobuf-dev protobuf-compiler protobuf-compiler-grpc
)
RUNTIME_CPU=(
  ca-certificates libgrpc++1.51 libgrpc29 libprotobuf32 libabsl20220623 libspdlog1.10 libfmt9
  libopenblas0-pthread libpcre2-8-0 libicu72 libssl3 libre2-9 libc-ares2 zlib1g
  libcpp-httplib0.11
)
BUILD_CUDA=("cuda-nvcc-$CUDA_MAJOR_MINOR" "cuda-cudart-dev-$CUDA_MAJOR_MINOR"
            "libcublas-dev-$CUDA_MAJOR_MINOR" libnccl-dev)
RUNTIME_CUDA=("cuda-cudart-$CUDA_MAJOR_MINOR" "libcublas-$CUDA_MAJOR_MINOR" libnccl2)

list=0
if [ "${1:-}" = "--list" ]; then list=1; shift; fi
stage="${1:-}" backend="${2:-}"
case "$stage/$backend" in
  build/cpu) pkgs=("${BUILD_CPU[@]}") ;;
  runtime/cpu) pkgs=("${RUNTIME_CPU[@]}") ;;
  build/cuda) pkgs=("${BUILD_CPU[@]}" "${BUILD_CUDA[@]}") ;;
  runtime/cuda) pkgs=("${RUNTIME_CPU[@]}" "${RUNTIME_CUDA[@]}") ;;
  *) echo "usage: $0 [--list] build|runtime cpu|cuda" >&2; exit 2 ;;
esac
if [ "$list" = 1 ]; then printf '%s\n' "${pkgs[@]}"; exit 0; fi

export DEBIAN_FRONTEND=noninteractive
apt-get update -q
if [ "$backend" = cuda ]; then
  apt-get install -y -q --no-install-recommends ca-certificates curl
  curl -fsSL -o /tmp/cuda-keyring.deb \
    https://developer.download.nvidia.com/compute/cuda/repos/debian12/x86_64/cuda-keyring_1.1-1_all.deb
  dpkg -i /tmp/cuda-keyring.deb
  rm /tmp/cuda-keyring.deb
  apt-get update -q
fi
apt-get install -y -q --no-install-recommends "${pkgs[@]}"
rm -rf /var/lib/apt/lists/*

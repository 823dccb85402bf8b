#!/usr/bin/env bash
# Installs, from Debian's packages, whatever the build, the tests and the demo need and this machine
# lacks. Quiet, idempotent, works as root or through sudo. Sourced by test.sh and demo.sh; also runnable.
set -euo pipefail

lora_packages=(
  cmake g++ ninja-build pkg-config
  ccache                   # rebuilds of unchanged translation units are free (CI runs on a kept machine)
  libeigen3-dev            # the only dependency of <lora/lora.hpp>
  libopenblas-dev          # optional GEMM back end of our own programs (LORA_USE_BLAS, release preset)
  libgtest-dev googletest  # tests
  libbenchmark-dev         # benchmarks
  nlohmann-json3-dev       # <lora/io/...> (safetensors headers, PEFT configs)
  zlib1g-dev               # reading Fashion-MNIST's .gz files in the examples
  dataset-fashion-mnist    # the real data the flagship example trains on
  gnuplot-nox              # plots rendered from the example's JSON output
  openmpi-bin libopenmpi-dev  # <lora/dist/mpi.hpp>: data-parallel training; its tests run under mpirun
)
lora_packages+=("$@")

missing=()
for p in "${lora_packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -eq 0 ]; then sudo=(); else sudo=(sudo); fi
  echo "setup: installing ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  "${sudo[@]}" apt-get update -qq >/dev/null
  "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

#!/usr/bin/env bash
# The main job, on a fresh Debian machine: installs what is missing (Fashion-MNIST included), builds the
# examples in release mode and runs the flagship fine-tuning program. Extra arguments go to the program
# (try --help).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
jobs=${LORA_JOBS:-$(nproc)}
cmake --preset release -DLORA_BUILD_TESTS=OFF -DLORA_BUILD_BENCHMARKS=OFF >/dev/null
cmake --build --preset release -j "$jobs" --target quickstart
exec build/release/examples/quickstart "$@"

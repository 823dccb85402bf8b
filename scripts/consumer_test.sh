#!/usr/bin/env bash
# Builds and runs tests/consumer twice: against an install into a temporary prefix (find_package) and
# through add_subdirectory. Exits non-zero if either fails.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cmake -S . -B "$tmp/lib" -G Ninja -DLORA_BUILD_TESTS=OFF -DLORA_BUILD_EXAMPLES=OFF -DLORA_BUILD_BENCHMARKS=OFF \
  -DCMAKE_INSTALL_PREFIX="$tmp/prefix" >/dev/null
cmake --install "$tmp/lib" >/dev/null
cmake -S tests/consumer -B "$tmp/found" -G Ninja -DCMAKE_PREFIX_PATH="$tmp/prefix" >/dev/null
cmake --build "$tmp/found"
"$tmp/found/consumer"
cmake -S tests/consumer -B "$tmp/sub" -G Ninja -DUSE_SUBDIRECTORY=ON -DLORA_SOURCE_DIR="$root" >/dev/null
cmake --build "$tmp/sub"
"$tmp/sub/consumer"
echo "consumer tests: 2 passed, 0 failed"

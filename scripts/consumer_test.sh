#!/usr/bin/env bash
# Builds and runs tests/consumer twice: against an install into a temporary prefix (find_package) and
# through add_subdirectory. The install must also hold the shipped programs, <prefix>/bin/lora-inspect,
# <prefix>/bin/lora-merge, <prefix>/bin/lora-gguf and <prefix>/bin/lora-combine, which must run. Exits
# non-zero if anything fails.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
jobs=${LORA_JOBS:-$(nproc)}
cmake -S . -B "$tmp/lib" -G Ninja -DLORA_BUILD_TESTS=OFF -DLORA_BUILD_EXAMPLES=OFF -DLORA_BUILD_BENCHMARKS=OFF \
  -DLORA_BUILD_TOOLS=ON -DCMAKE_INSTALL_PREFIX="$tmp/prefix" >/dev/null
cmake --build "$tmp/lib" -j "$jobs" --target lora-inspect lora-merge lora-gguf lora-combine
cmake --install "$tmp/lib" >/dev/null
for tool in lora-inspect lora-merge lora-gguf lora-combine; do
  if [ ! -x "$tmp/prefix/bin/$tool" ]; then
    echo "consumer tests: cmake --install did not put $tool in <prefix>/bin" >&2
    ls -l "$tmp/prefix" "$tmp/prefix/bin" >&2 || true
    exit 1
  fi
  help=$("$tmp/prefix/bin/$tool" --help 2>&1)
  case "$help" in
    *"usage: $tool"*) ;;
    *) echo "consumer tests: installed $tool --help does not print its usage: $help" >&2; exit 1 ;;
  esac
done
cmake -S tests/consumer -B "$tmp/found" -G Ninja -DCMAKE_PREFIX_PATH="$tmp/prefix" >/dev/null
cmake --build "$tmp/found"
"$tmp/found/consumer"
cmake -S tests/consumer -B "$tmp/sub" -G Ninja -DUSE_SUBDIRECTORY=ON -DLORA_SOURCE_DIR="$root" >/dev/null
cmake --build "$tmp/sub"
"$tmp/sub/consumer"
echo "consumer tests: 3 passed, 0 failed (installed tools, find_package, add_subdirectory)"

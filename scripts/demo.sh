#!/usr/bin/env bash
# The main job, on a fresh Debian machine: installs what is missing (the fortune packages included),
# builds the flagship program in release mode and runs its default study: pretrains a small byte-level
# GPT-2 on the English fortunes once (cached under .cache/gpt2_fortunes), fine-tunes it with LoRA
# (ranks 4 and 16) and full fine-tuning on three shifts (held-out English categories, Spanish,
# Russian), prints a table and samples, and renders the plots. About 10 minutes on 2 cores, the first
# pretraining included.
#
#   scripts/demo.sh                     the default study; extra arguments go to `gpt2_finetune study`
#                                       (try --help, or --full-study for every rank and 3 seeds)
#   scripts/demo.sh fashion-mnist ...   the Fashion-MNIST study (MLP), arguments to fashion_mnist
#   scripts/demo.sh serve ...           the study's adapters served together in mixed batches (gpt2_serve)
set -euo pipefail
cd "$(dirname "$0")/.."
jobs=${LORA_JOBS:-$(nproc)}

if [ "${1:-}" = "fashion-mnist" ]; then
  shift
  scripts/setup.sh
  cmake --preset release >/dev/null
  cmake --build --preset release -j "$jobs" --target fashion_mnist
  exec build/release/examples/fashion_mnist --json build/release/fashion_mnist_results.json "$@"
fi

if [ "${1:-}" = "serve" ]; then
  # The study's three r = 16 adapters (English held-out, Spanish, Russian) and the base, served at once:
  # scripts/serve_requests.tsv's requests in one mixed batch, against one adapter at a time and one
  # request at a time (gpt2_serve). Runs the default study first if its adapters are not there yet.
  shift
  scripts/setup.sh fortunes fortunes-min fortunes-es fortunes-ru
  cmake --preset release >/dev/null
  cmake --build --preset release -j "$jobs" --target gpt2_finetune gpt2_serve
  a=.cache/gpt2_fortunes/study/adapters
  if [ ! -f "$a/extreme/lora_r16_seed0/adapter_config.json" ]; then
    build/release/examples/gpt2_finetune study --json build/release/gpt2_results.json
  fi
  exec build/release/examples/gpt2_serve --model .cache/gpt2_fortunes/base --adapter "mild=$a/mild/lora_r16_seed0" \
    --adapter "es=$a/larger/lora_r16_seed0" --adapter "ru=$a/extreme/lora_r16_seed0" \
    --requests scripts/serve_requests.tsv --temperature 0.8 --top-k 40 --json build/release/serve_results.json "$@"
fi

scripts/setup.sh fortunes fortunes-min fortunes-es fortunes-ru
cmake --preset release >/dev/null
cmake --build --preset release -j "$jobs" --target gpt2_finetune
results=build/release/gpt2_results.json
build/release/examples/gpt2_finetune study --json "$results" "$@"
if command -v gnuplot >/dev/null && command -v python3 >/dev/null; then
  scripts/plot_gpt2.sh "$results" build/release/gpt2_plots
fi

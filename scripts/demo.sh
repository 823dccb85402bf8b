#!/usr/bin/env bash
# The main job, on a fresh Debian machine: installs what is missing (Fashion-MNIST included), builds the
# flagship fine-tuning program in release mode and runs it: pretrains a base MLP once (cached under
# .cache/), fine-tunes it on two shifted domains with LoRA, full and head-only fine-tuning, and prints a
# table. Extra arguments go to the program (try --help).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
jobs=${LORA_JOBS:-$(nproc)}
cmake --preset release >/dev/null
cmake --build --preset release -j "$jobs" --target fashion_mnist
exec build/release/examples/fashion_mnist --json build/release/fashion_mnist_results.json "$@"

#!/usr/bin/env bash
# The one command to try Allmende: fetches the model if needed, builds, and generates
# a completion with every layer in this process.
set -euo pipefail
cd "$(dirname "$0")/.."
model="$(scripts/fetch-model.sh)"
cargo build --release --quiet
prompt="${1:-The three most important inventions in history are}"
echo "prompt: $prompt" >&2
./target/release/allmende generate --local --model "$model" --prompt "$prompt" \
    --max-tokens 64 --temperature 0

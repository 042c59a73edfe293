#!/usr/bin/env bash
# Runs the whole test suite: fetches the test model if needed, then builds and tests
# every crate in release mode (the model code is too slow unoptimised).
set -euo pipefail
cd "$(dirname "$0")/.."
ALLMENDE_MODEL="$(scripts/fetch-model.sh)"
export ALLMENDE_MODEL
cargo test --release --workspace "$@"

#!/usr/bin/env bash
# Runs the whole test suite: fetches the test model if needed, builds and tests every
# crate in release mode (the model code is too slow unoptimised), then runs the
# end-to-end tests in tests/e2e (Python: openai, pytest, selenium; Chromium), then a
# short run of every fuzz target.
set -euo pipefail
cd "$(dirname "$0")/.."
ALLMENDE_MODEL="$(scripts/fetch-model.sh)"
export ALLMENDE_MODEL
cargo test --release --workspace "$@"
# End-to-end: the official openai client and headless Chromium against a real swarm,
# using the binary the tests above built.
python3 -m pytest -q tests/e2e
# A short fuzzing run of every decoder (scripts/fuzz.sh runs the long one).
scripts/fuzz.sh "${FUZZ_RUNS:-20000}"

#!/usr/bin/env bash
# The project's test command, for a fresh machine with a Rust toolchain and Python 3:
# installs what is missing (the model; scripts/setup-test-deps.sh: Python packages in
# target/e2e-venv, Chromium as root; scripts/llama-cpp.sh: llama.cpp, built once into
# a cache), makes the reference models (scripts/reference-models.sh), then builds and
# tests every crate in release mode (the model code is too slow unoptimised), runs the
# end-to-end tests in tests/e2e (the openai client, headless Chromium and a terminal
# chat against real nodes), and a short run of every fuzz target. Prints how long
# each stage took.
#
#   scripts/test.sh [cargo test args...]      # FUZZ_RUNS=N sets the fuzzing length
set -euo pipefail
cd "$(dirname "$0")/.."

started=$(date +%s)
times=()
stage() {
    local name=$1 t0
    shift
    echo "==> $name" >&2
    t0=$(date +%s)
    "$@"
    times+=("$(printf '%-22s %5d s' "$name" $(( $(date +%s) - t0 )))")
}
report() {
    echo >&2
    echo "stage times:" >&2
    for t in "${times[@]}"; do echo "  $t" >&2; done
    echo "  $(printf '%-22s %5d s' total $(( $(date +%s) - started )))" >&2
}
trap report EXIT

fetch_model() {
    ALLMENDE_MODEL="$(scripts/fetch-model.sh)"
    ALLMENDE_GEMMA3="$(scripts/fetch-gemma3.sh)"
    export ALLMENDE_MODEL ALLMENDE_GEMMA3
}
setup() {
    python="$(scripts/setup-test-deps.sh)"
    ALLMENDE_TEST_PYTHON="$PWD/$python"
    export ALLMENDE_TEST_PYTHON
}
# llama.cpp is the independent reference: its tokenizer test vectors, chat templates,
# quantizer and outputs (built once into a cache outside the checkout, ~13 minutes).
llama_cpp() {
    ALLMENDE_LLAMA_CPP_DIR="$(dirname "$(dirname "$(scripts/llama-cpp.sh)")")"
    export ALLMENDE_LLAMA_CPP_DIR
}
references() {
    ALLMENDE_REFERENCE_DIR="$PWD/target/reference-models"
    export ALLMENDE_REFERENCE_DIR
    scripts/reference-models.sh "$ALLMENDE_REFERENCE_DIR"
}

stage "model" fetch_model
stage "test dependencies" setup
stage "llama.cpp" llama_cpp
stage "reference models" references
stage "cargo test" cargo test --release --workspace "$@"
# End-to-end: real clients against real nodes, using the binary the tests above built.
stage "end-to-end tests" "$python" -m pytest -q tests/e2e
# A short fuzzing run of every decoder (scripts/fuzz.sh runs the long one).
stage "fuzzing" scripts/fuzz.sh "${FUZZ_RUNS:-20000}"

#!/usr/bin/env bash
# Makes the reference test models and llama.cpp's outputs on them, for the test suite
# (node/tests/reference_types.rs): the test model requantized by llama.cpp's
# llama-quantize to every supported tensor type, and llama-server's greedy
# continuations of the golden prompts with top log-probabilities on each, the same
# weights dressed as each supported architecture, and the exact reference. Builds
# llama.cpp first if needed (scripts/llama-cpp.sh). About two minutes once llama.cpp
# is built, plus the exact reference (float64, scripts/reference/exact.py) on every
# file, some five minutes on 2 cores; files already made are kept.
#
#   scripts/reference-models.sh [OUT]         # default target/reference-models
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-target/reference-models}"
bin="$(scripts/llama-cpp.sh)"
python="$(scripts/setup-test-deps.sh)"
model="$(scripts/fetch-model.sh)"
"$python" scripts/reference/make_references.py --llama-bin "$bin" --model "$model" \
    --prompts tests/golden/smollm2-135m-q4_1.llama-cpp.json --out "$out"

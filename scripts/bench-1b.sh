#!/usr/bin/env bash
# Speed on a model of Llama 3.2 1B's shape (scripts/reference/synthetic.py: random
# weights, Llama 3's vocabulary), quantized by llama.cpp's llama-quantize, against
# llama.cpp's llama-bench on the same file: scripts/bench-llama-cpp.sh with a
# 512-token prompt and 128 greedy tokens. The files are made once into
# target/bench-models (about 5 GB, a few minutes).
#
#   scripts/bench-1b.sh [TYPE] [THREADS] [ROUNDS]     # default Q4_K_M 2 3
set -euo pipefail
cd "$(dirname "$0")/.."
kind="${1:-Q4_K_M}"
threads="${2:-2}"
rounds="${3:-3}"
bin="$(scripts/llama-cpp.sh)"
python="$(scripts/setup-test-deps.sh)"
dir=target/bench-models
mkdir -p "$dir"
f16="$dir/llama-1b-shape-F16.gguf"
if [ ! -f "$f16" ]; then
    "$python" scripts/reference/synthetic.py \
        --vocab "$(dirname "$bin")/../src/models/ggml-vocab-llama-bpe.gguf" --out "$f16"
fi
model="$dir/llama-1b-shape-$kind.gguf"
if [ ! -f "$model" ]; then
    echo "quantizing to $kind ..." >&2
    "$bin/llama-quantize" "$f16" "$model.partial" "$kind" > "$dir/quantize-$kind.log" 2>&1
    mv "$model.partial" "$model"
fi
ALLMENDE_BENCH_MODEL="$model" ALLMENDE_BENCH_PROMPT_TOKENS=512 \
    scripts/bench-llama-cpp.sh "$threads" "$rounds"

#!/usr/bin/env bash
# Decode and prefill speed of `allmende generate --local`: a ~200-token prompt, 128
# greedy tokens, N runs (default 5); prints each run and the median.
#   scripts/bench-local.sh [THREADS] [RUNS]
set -euo pipefail
cd "$(dirname "$0")/.."
threads="${1:-2}"
runs="${2:-5}"
model="$(scripts/fetch-model.sh)"
cargo build --release --quiet
prompt=$(python3 -c "print('The history of the city is long and full of events. ' * 18)")
for _ in $(seq "$runs"); do
    ./target/release/allmende generate --local --model "$model" --prompt "$prompt" \
        --max-tokens 128 --ignore-eos --temperature 0 --threads "$threads" --json | tail -n 1
done | python3 -c '
import json, statistics, sys
rows = [json.loads(line) for line in sys.stdin]
pre = [r["timings"]["prefill_tokens_per_s"] for r in rows]
dec = [r["timings"]["decode_tokens_per_s"] for r in rows]
n = len(rows[0]["prompt_token_ids"])
for p, d in zip(pre, dec):
    print(f"prefill {p:7.1f} tok/s   decode {d:7.1f} tok/s")
print(f"median over {len(rows)} runs ({n}-token prompt, 128 tokens): "
      f"prefill {statistics.median(pre):.1f} tok/s, decode {statistics.median(dec):.1f} tok/s")
'

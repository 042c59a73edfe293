#!/usr/bin/env bash
# llama.cpp against `allmende generate --local` on the same GGUF and thread count,
# alternating in the same minutes (the machine's speed drifts, so ratios are only
# meaningful within one run). Prints each round and the medians' ratios.
#
#   scripts/bench-llama-cpp.sh [THREADS] [ROUNDS]
#
# ALLMENDE_BENCH_MODEL names another GGUF than the test model (scripts/bench-1b.sh
# passes a 1B-shape one), and ALLMENDE_BENCH_PROMPT_TOKENS a prompt length of about
# that many tokens (the exact count is measured and given to llama-bench).
#
# llama.cpp's `llama-bench` comes from scripts/llama-cpp.sh, which builds it once
# (about 13 minutes on 2 cores) into a cache outside the checkout.
#
# Compared: llama.cpp's decode of 128 tokens after an n-token context (`tg128 @ dn`,
# n = 217 by default) and its prefill of n tokens (`ppn`), against ours on an n-token
# prompt and 128 greedy tokens (as scripts/bench-local.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
threads="${1:-2}"
rounds="${2:-3}"

model="${ALLMENDE_BENCH_MODEL:-$(scripts/fetch-model.sh)}"
cargo build --release --quiet
llama_bench="$(scripts/llama-cpp.sh)/llama-bench"

# Twelve tokens a sentence for the test model's tokenizer: 18 of them are 217 tokens.
sentences=$(( (${ALLMENDE_BENCH_PROMPT_TOKENS:-217} + 11) / 12 ))
prompt=$(python3 -c "print('The history of the city is long and full of events. ' * $sentences)")
n=$(./target/release/allmende generate --local --model "$model" --prompt "$prompt" \
        --max-tokens 1 --threads "$threads" --json 2> /dev/null | tail -n 1 |
    python3 -c 'import json, sys; print(len(json.load(sys.stdin)["prompt_token_ids"]))')
echo "prompt: $n tokens" >&2
for _ in $(seq "$rounds"); do
    "$llama_bench" -m "$model" -t "$threads" -p "$n" -n 128 -d "0,$n" -r 2 -o csv 2> /dev/null |
        python3 -c '
import csv, json, sys
rows = list(csv.DictReader(sys.stdin))
pick = lambda prompt, depth: next(float(r["avg_ts"]) for r in rows
                                  if (int(r["n_prompt"]) > 0) == prompt and r["n_depth"] == depth)
print(json.dumps({"who": "llama.cpp", "prefill": pick(True, "0"), "decode": pick(False, "'"$n"'"),
                  "decode_empty_context": pick(False, "0")}))'
    ./target/release/allmende generate --local --model "$model" --prompt "$prompt" \
        --max-tokens 128 --ignore-eos --temperature 0 --threads "$threads" --json |
        tail -n 1 | python3 -c '
import json, sys
t = json.load(sys.stdin)["timings"]
print(json.dumps({"who": "allmende", "prefill": t["prefill_tokens_per_s"],
                  "decode": t["decode_tokens_per_s"]}))'
done | python3 -c '
import json, statistics, sys
rows = [json.loads(line) for line in sys.stdin]
for r in rows:
    line = "%-9s  prefill %6.1f tok/s   decode %6.1f tok/s" % (r["who"], r["prefill"], r["decode"])
    if "decode_empty_context" in r:
        line += "   (decode from an empty context %.1f)" % r["decode_empty_context"]
    print(line)
med = lambda who, key: statistics.median(r[key] for r in rows if r["who"] == who)
for key in ["prefill", "decode"]:
    ours, theirs = med("allmende", key), med("llama.cpp", key)
    print("%s: allmende %.1f / llama.cpp %.1f tok/s = %.2fx (medians)" % (key, ours, theirs, ours / theirs))
'

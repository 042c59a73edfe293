#!/usr/bin/env bash
# Decode speed through a 3-node loopback swarm (layers 0..10, 10..20, 20..30) against
# `generate --local` of the same binary, alternating runs in one session; prints the
# medians, their ratio, and the per-hop overhead per token.
#   scripts/bench-swarm.sh [THREADS] [RUNS]
set -euo pipefail
cd "$(dirname "$0")/.."
threads="${1:-1}"
runs="${2:-5}"
model="$(scripts/fetch-model.sh)"
cargo build --release --quiet
bin=./target/release/allmende

source scripts/nodes.sh

start_node a 0..10
first=$(addr_of a)
start_node b 10..20 --bootstrap "$first"
start_node c 20..30 --bootstrap "$first"

prompt=$(python3 -c "print('The history of the city is long and full of events. ' * 18)")
common=(--model "$model" --prompt "$prompt" --max-tokens 128 --ignore-eos --temperature 0
        --threads "$threads" --json)
for _ in $(seq "$runs"); do
    echo "local $("$bin" generate --local "${common[@]}" | tail -n 1)"
    echo "swarm $("$bin" generate --bootstrap "$first" --no-mdns "${common[@]}" | tail -n 1)"
done | THREADS="$threads" python3 -c '
import json, os, statistics, sys
rows = {"local": [], "swarm": []}
for line in sys.stdin:
    kind, payload = line.split(" ", 1)
    rows[kind].append(json.loads(payload))
def med(kind, key):
    return statistics.median(r["timings"][key] for r in rows[kind])
same = all(a["token_ids"] == b["token_ids"] for a, b in zip(rows["local"], rows["swarm"]))
local, swarm = med("local", "decode_tokens_per_s"), med("swarm", "decode_tokens_per_s")
hops = len(rows["swarm"][0]["route"])
overhead_ms = (1000 / swarm - 1000 / local) / hops
runs = len(rows["local"])
threads = os.environ["THREADS"]
print(f"threads per process: {threads}, runs: {runs}, identical tokens: {same}")
print(f"decode  local {local:.1f} tok/s   swarm ({hops} hops) {swarm:.1f} tok/s   ratio {swarm / local:.3f}")
pl, ps = med("local", "prefill_tokens_per_s"), med("swarm", "prefill_tokens_per_s")
print(f"prefill local {pl:.1f} tok/s   swarm {ps:.1f} tok/s   ratio {ps / pl:.3f}")
print(f"per-hop overhead per decoded token: {overhead_ms:.3f} ms")
'

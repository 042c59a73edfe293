#!/usr/bin/env bash
# Two builds of `allmende` against each other: one `allmende bench` run of each per
# round (1 thread, one session), the order flipped every round, and per figure the
# median of the rounds' paired ratios (new / old). For checking that a change to how
# requests run costs nothing: single-node prefill and decode, the 3-node loopback
# swarm's, and one session against a node.
#   scripts/bench-pair.sh OLD_BINARY NEW_BINARY [ROUNDS]
set -euo pipefail
cd "$(dirname "$0")/.."
old="$1"
new="$2"
rounds="${3:-12}"
ALLMENDE_MODEL="$(scripts/fetch-model.sh)"
export ALLMENDE_MODEL
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
for i in $(seq "$rounds"); do
    if (( i % 2 )); then order="old new"; else order="new old"; fi
    for side in $order; do
        bin="$old"; [[ $side == new ]] && bin="$new"
        "$bin" bench --threads 1 --runs 1 --sessions 1 --output "$out/$side-$i.json" >/dev/null
    done
    echo "round $i of $rounds" >&2
done
python3 - "$out" "$rounds" <<'PY'
import json, statistics, sys
out, rounds = sys.argv[1], int(sys.argv[2])
def figures(path):
    d = json.load(open(path))
    swarm = d["swarm"]
    assert swarm["tokens_identical_to_local"], path
    return {
        "local prefill tok/s": d["local"]["prefill_tokens_per_s"],
        "local decode tok/s": d["local"]["decode_tokens_per_s"],
        "3-node swarm prefill tok/s": swarm["single"]["prefill_tokens_per_s"],
        "3-node swarm decode tok/s": swarm["single"]["decode_tokens_per_s"],
        "one session against a node, tok/s": d["sessions"]["results"][0]["aggregate_tokens_per_s"],
    }
pairs = [(figures(f"{out}/old-{i}.json"), figures(f"{out}/new-{i}.json")) for i in range(1, rounds + 1)]
print("| figure | old | new | new / old, median of paired ratios | range |")
print("|---|--:|--:|--:|--:|")
for key in pairs[0][0]:
    olds = [o[key] for o, _ in pairs]
    news = [n[key] for _, n in pairs]
    ratios = [n / o for o, n in zip(olds, news)]
    print(f"| {key} | {statistics.median(olds):.1f} | {statistics.median(news):.1f} "
          f"| {statistics.median(ratios):.3f} | {min(ratios):.2f}–{max(ratios):.2f} |")
PY

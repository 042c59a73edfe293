#!/usr/bin/env bash
# Whether serving weights to new donors slows the sessions a node serves. One node
# holds every layer; a client generates TOKENS greedy tokens through it, alternately
# alone and while donors started with only the model id fetch every layer from the
# node, one after another (each donor is stopped once it has fetched, and its cache
# deleted, so the node uploads all the time). The donors run at the lowest CPU
# priority: on a real network they are other machines, and what is measured here is
# the node's own cost of uploading. Prints each run's decode speed and the median of
# the paired ratios (while uploading / alone).
#
#   scripts/bench-weights-upload.sh [ROUNDS] [TOKENS] [THREADS]
#
# ALLMENDE_BENCH_MODEL names another GGUF than the test model.
set -euo pipefail
cd "$(dirname "$0")/.."
rounds="${1:-5}"
tokens="${2:-400}"
threads="${3:-1}"
model="${ALLMENDE_BENCH_MODEL:-$(scripts/fetch-model.sh)}"
cargo build --release --quiet
bin=./target/release/allmende
source scripts/nodes.sh
start_node seed auto
id=$(sed -n 's/^model id: //p' "$work/seed.log")
seed=$(addr_of seed)
prompt=$(python3 -c "print('The history of the city is long and full of events. ' * 18)")

# Donors fetching from the seed back to back until $work/stop exists.
donors() {
    local n=0
    while [ ! -e "$work/stop" ]; do
        n=$((n + 1))
        rm -rf "$work/weights"
        nice -n 19 "$bin" serve --model-id "$id" --layers auto --weights-dir "$work/weights" \
            --listen /ip4/127.0.0.1/tcp/0 --identity "$work/donor.key" --no-mdns \
            --threads 1 --bootstrap "$seed" >"$work/donor.log" 2>&1 &
        local pid=$!
        while kill -0 "$pid" 2>/dev/null && ! grep -q "^fetched" "$work/donor.log"; do
            [ -e "$work/stop" ] && break
            sleep 0.05
        done
        kill -9 "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
        grep -m1 "^fetched" "$work/donor.log" >>"$work/fetches.log" || true
    done
}

decode() {
    "$bin" generate --model "$model" --bootstrap "$seed" --no-mdns --prompt "$prompt" \
        --max-tokens "$tokens" --ignore-eos --temperature 0 --threads "$threads" --json |
        tail -n 1 | python3 -c 'import json, sys; print(json.load(sys.stdin)["timings"]["decode_tokens_per_s"])'
}

for round in $(seq "$rounds"); do
    alone=$(decode)
    rm -f "$work/stop"
    donors &
    fetcher=$!
    sleep 1
    uploading=$(decode)
    touch "$work/stop"
    wait "$fetcher"
    echo "round $round: alone $alone tok/s, while uploading $uploading tok/s"
done | tee "$work/rounds.log"
echo "donor fetches meanwhile:"
cat "$work/fetches.log"
python3 - "$work/rounds.log" <<'EOF'
import re, statistics, sys
pairs = [tuple(map(float, re.findall(r"([\d.]+) tok/s", l))) for l in open(sys.argv[1])]
ratios = [u / a for a, u in pairs]
print("decode while uploading / alone: median %.3f (%s)" % (
    statistics.median(ratios), ", ".join("%.3f" % r for r in ratios)))
EOF

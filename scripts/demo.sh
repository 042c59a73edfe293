#!/usr/bin/env bash
# The one command to try Allmende: fetches the model if needed, builds, starts three
# nodes on 127.0.0.1 serving layers 0..10, 10..20 and 20..30, sends a prompt through
# them, streams the answer, shows the swarm's status, and stops the nodes.
#
#   scripts/demo.sh ["your prompt"]
set -euo pipefail
cd "$(dirname "$0")/.."

prompt="${1:-The three most important inventions in history are}"
model="$(scripts/fetch-model.sh)"
echo "building ..." >&2
cargo build --release --quiet
bin=./target/release/allmende

work=$(mktemp -d)
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

# Starts a node and waits until it serves; prints its first listen address.
start_node() {
    local name=$1 layers=$2
    shift 2
    "$bin" serve --model "$model" --layers "$layers" --listen /ip4/127.0.0.1/tcp/0 \
        --identity "$work/$name.key" --no-mdns --threads 1 "$@" >"$work/$name.log" 2>&1 &
    pids+=($!)
    for _ in $(seq 600); do
        if grep -q "^serving layers" "$work/$name.log"; then
            grep -m1 "^listening on" "$work/$name.log" | cut -d' ' -f3
            return
        fi
        sleep 0.1
    done
    echo "node $name did not start:" >&2
    cat "$work/$name.log" >&2
    exit 1
}

first=$(start_node a 0..10)
echo "node a serves layers 0..10 at $first" >&2
start_node b 10..20 --bootstrap "$first" >/dev/null
echo "node b serves layers 10..20" >&2
start_node c 20..30 --bootstrap "$first" >/dev/null
echo "node c serves layers 20..30" >&2

echo >&2
echo "prompt: $prompt" >&2
"$bin" generate --model "$model" --bootstrap "$first" --no-mdns --prompt "$prompt" \
    --max-tokens 64 --temperature 0 --threads 1
echo >&2
"$bin" status --model "$model" --bootstrap "$first" --no-mdns

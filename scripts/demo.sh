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
if [ ! -x target/release/allmende ]; then
    echo "building allmende (the first build compiles about 400 crates: 10-15 minutes on 2 cores) ..." >&2
else
    echo "building allmende ..." >&2
fi
# cargo shows each crate it compiles and, on a terminal, a progress bar.
cargo build --release --bin allmende
bin=./target/release/allmende
threads=1

source scripts/nodes.sh

start_node a 0..10
first=$(addr_of a)
echo "node a serves layers 0..10 at $first" >&2
start_node b 10..20 --bootstrap "$first"
echo "node b serves layers 10..20" >&2
start_node c 20..30 --bootstrap "$first"
echo "node c serves layers 20..30" >&2

echo >&2
echo "prompt: $prompt" >&2
"$bin" generate --model "$model" --bootstrap "$first" --no-mdns --prompt "$prompt" \
    --max-tokens 64 --temperature 0 --threads 1
echo >&2
"$bin" status --model "$model" --bootstrap "$first" --no-mdns

#!/usr/bin/env bash
# The WAN benchmark: three servers and a client in the WAN lab (network namespaces,
# as root), one-way delay d = 0, 10, 25, 50 ms between any two; prints a Markdown
# table of decode step times against the floor (N + 1)·d + compute, prefill times,
# relayed against direct, and prefill at 20 Mbit/s uplinks.
#   scripts/wan-bench.sh
set -euo pipefail
cd "$(dirname "$0")/.."
ALLMENDE_MODEL="${ALLMENDE_MODEL:-$(scripts/fetch-model.sh)}"
export ALLMENDE_MODEL
cargo test --release -p allmende-node --test wan_benchmark -- --ignored --nocapture

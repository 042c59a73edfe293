#!/usr/bin/env bash
# The soak of the adversary suite: an attacker cycles through every attack against a
# 3-node swarm (each node in a memory cgroup of its own, as root) while an honest
# client generates; prints the honest generations and each node's peak memory.
#   scripts/soak.sh [SECONDS]        # default 300
set -euo pipefail
cd "$(dirname "$0")/.."
ALLMENDE_MODEL="${ALLMENDE_MODEL:-$(scripts/fetch-model.sh)}"
export ALLMENDE_MODEL ALLMENDE_SOAK_SECS="${1:-300}"
cargo test --release -p allmende-node --test soak -- --ignored --nocapture

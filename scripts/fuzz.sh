#!/usr/bin/env bash
# Runs every fuzz target (libFuzzer, via cargo fuzz) for RUNS iterations each:
# the protocol's decoders, stream framing, DHT records, and the GGUF header reader.
#   scripts/fuzz.sh [RUNS]          # default 1000000; CI uses a short run
# cargo fuzz needs nightly features; RUSTC_BOOTSTRAP lets the stable toolchain build
# them. A crash leaves its input under fuzz/artifacts/ and fails the script.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
runs="${1:-1000000}"
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "installing cargo-fuzz ..." >&2
    cargo install cargo-fuzz --locked --quiet
fi
export RUSTC_BOOTSTRAP=1
cargo fuzz build -O
for target in $(cargo fuzz list); do
    start=$(date +%s)
    cargo fuzz run -O "$target" -- -runs="$runs" -max_len=4096 2>fuzz-"$target".log \
        || { tail -n 40 fuzz-"$target".log >&2; exit 1; }
    echo "fuzz $target: $runs runs, no crash ($(( $(date +%s) - start )) s)"
done
rm -f fuzz-*.log

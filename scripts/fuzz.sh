#!/usr/bin/env bash
# Runs every fuzz target (libFuzzer, via cargo fuzz) for RUNS iterations each:
# the protocol's decoders, stream framing, DHT records, and the GGUF header reader.
#   scripts/fuzz.sh [RUNS]          # default 1000000; CI uses a short run
# The targets are built once, our crates with debug assertions and overflow checks
# (fuzz/Cargo.toml), and each binary is then run directly: `cargo fuzz run` would rebuild
# per target. libFuzzer's -malloc_limit_mb fails a run on any single allocation
# over the limit, which catches a decoder that sizes a buffer from a length it was
# told rather than from the bytes it has. cargo fuzz needs nightly features;
# RUSTC_BOOTSTRAP lets the stable toolchain build them. A crash leaves its input
# under fuzz/artifacts/ and fails the script.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
runs="${1:-1000000}"
max_len=4096
malloc_limit_mb=64
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "installing cargo-fuzz ..." >&2
    cargo install cargo-fuzz --locked --quiet
fi
export RUSTC_BOOTSTRAP=1
# The instrumented build of the node takes a quarter of an hour from scratch: it is
# kept in the cache, outside the checkout, like llama.cpp's build.
cache="${ALLMENDE_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/allmende}"
target_dir="$cache/fuzz-target"
mkdir -p "$target_dir"
start=$(date +%s)
cargo fuzz build -O --target-dir "$target_dir"
echo "fuzz targets built ($(( $(date +%s) - start )) s)"
bin="$target_dir/$(rustc -vV | sed -n 's/^host: //p')/release"
for target in $(cargo fuzz list); do
    start=$(date +%s)
    mkdir -p "corpus/$target" "artifacts/$target"
    # Committed seeds (valid inputs to mutate from) are read, never written to.
    seeds=()
    if [ -d "seeds/$target" ]; then seeds=("seeds/$target"); fi
    "$bin/$target" -runs="$runs" -max_len="$max_len" -malloc_limit_mb="$malloc_limit_mb" \
        -rss_limit_mb=2048 -artifact_prefix="artifacts/$target/" "corpus/$target" "${seeds[@]}" \
        2>fuzz-"$target".log \
        || { tail -n 40 fuzz-"$target".log >&2; exit 1; }
    echo "fuzz $target: $runs runs, no crash ($(( $(date +%s) - start )) s)"
done
rm -f fuzz-*.log

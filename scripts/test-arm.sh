#!/usr/bin/env bash
# Runs the model's tests on the Arm (AArch64) kernel path, under emulation:
# cross-compiles for aarch64-unknown-linux-gnu and runs the library's unit tests and
# the golden, batching and split tests with qemu-user. Needs the Rust target (added
# here), and a cross linker and qemu (Debian: `apt-get install gcc-aarch64-linux-gnu
# libc6-dev-arm64-cross qemu-user`). Emulated times say nothing of speed on Arm
# hardware; this checks results only.
set -euo pipefail
cd "$(dirname "$0")/.."
ALLMENDE_MODEL="$(scripts/fetch-model.sh)"
export ALLMENDE_MODEL
target=aarch64-unknown-linux-gnu
rustup target add "$target"
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="qemu-aarch64 -L /usr/aarch64-linux-gnu"
# qemu-user does not pass the huge-page advice on to the kernel, so the test that
# checks it cannot pass under emulation.
cargo test --release --target "$target" -p allmende-node --lib -- \
    --skip regions_are_advised_for_huge_pages_where_the_system_offers_them
cargo test --release --target "$target" -p allmende-node \
    --test golden --test batching --test split

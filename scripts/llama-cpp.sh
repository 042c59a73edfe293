#!/usr/bin/env bash
# Builds llama.cpp's tools (llama-quantize, llama-server, llama-bench) once, from the
# llama-cpp-python source package on PyPI, which vendors llama.cpp, into a cache
# outside the checkout keyed by version, and prints the directory of the binaries.
# Later runs only print it. The vendored tree (its vocabularies with tokenizer test
# vectors, its chat templates) stays beside the build: `$dir/src`.
#
#   scripts/llama-cpp.sh              # about 13 minutes the first time on 2 cores
#
# Needs a C++ compiler, make and cmake (installed from Debian's packages when run as
# root and missing). Built for AVX2 (and
# AVX-512 where the CPU has it) rather than -march=native: some virtual machines report
# AMX but fault on its instructions.
set -euo pipefail
cd "$(dirname "$0")/.."

VERSION="0.3.36"
SHA256="832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
cache="${ALLMENDE_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/allmende}"
dir="$cache/llama.cpp-$VERSION"
bin="$dir/build/bin"
tools=(llama-quantize llama-server llama-bench)

built() {
    for t in "${tools[@]}"; do [ -x "$bin/$t" ] || return 1; done
}
if built; then
    echo "$bin"
    exit 0
fi

mkdir -p "$dir"
if [ ! -d "$dir/src" ]; then
    echo "downloading llama-cpp-python $VERSION (source) from PyPI ..." >&2
    work=$(mktemp -d "$dir/.fetch.XXXXXX")
    trap 'rm -rf "$work"' EXIT
    python3 -m pip download --no-deps --no-binary llama-cpp-python --disable-pip-version-check \
        --progress-bar on "llama-cpp-python==$VERSION" -d "$work" >&2
    tarball=$(ls "$work"/llama_cpp_python-*.tar.gz)
    echo "$SHA256  $tarball" | sha256sum -c --quiet
    tar -xzf "$tarball" -C "$work"
    mv "$work/llama_cpp_python-$VERSION/vendor/llama.cpp" "$dir/src"
fi

missing=()
command -v cmake >/dev/null 2>&1 || missing+=(cmake)
command -v c++ >/dev/null 2>&1 || missing+=(g++)
command -v make >/dev/null 2>&1 || missing+=(make)
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" != 0 ]; then
        echo "error: building llama.cpp needs: ${missing[*]} (as root: apt-get install ${missing[*]})" >&2
        exit 1
    fi
    echo "installing Debian packages: ${missing[*]} ..." >&2
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >&2
fi
flags=(-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON)
if grep -q avx512_vnni /proc/cpuinfo; then
    flags+=(-DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON)
fi
echo "configuring llama.cpp $VERSION (log: $dir/cmake.log) ..." >&2
cmake -S "$dir/src" -B "$dir/build" -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON \
    "${flags[@]}" >"$dir/cmake.log" 2>&1 || { tail -n 30 "$dir/cmake.log" >&2; exit 1; }
echo "building ${tools[*]} (about 13 minutes on 2 cores the first time) ..." >&2
# cmake's progress lines ("[ 42%] Building ...") are the heartbeat.
cmake --build "$dir/build" -j "$(nproc)" --target "${tools[@]}" 2>&1 |
    tee "$dir/build.log" | grep --line-buffered -E '^\[ *[0-9]+%\]' >&2
built || { tail -n 40 "$dir/build.log" >&2; exit 1; }
echo "$bin"

#!/usr/bin/env bash
# llama.cpp against `allmende generate --local` on the same GGUF and thread count,
# alternating in the same minutes (the machine's speed drifts, so ratios are only
# meaningful within one run). Prints each round and the medians' ratios.
#
#   scripts/bench-llama-cpp.sh [THREADS] [ROUNDS]
#
# The first run builds llama.cpp's `llama-bench` into target/llama.cpp from the
# llama-cpp-python source package on PyPI, which vendors llama.cpp (needs cmake, which
# pip installs if missing, and a C++ compiler; about 10 minutes on 2 cores). Built
# without AMX: some virtual machines report AMX but fault on its instructions.
#
# Compared: llama.cpp's decode of 128 tokens after a 217-token context (`tg128 @ d217`)
# and its prefill of 217 tokens (`pp217`), against ours on a 217-token prompt and 128
# greedy tokens (as scripts/bench-local.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
threads="${1:-2}"
rounds="${2:-3}"

VERSION="0.3.36"
SHA256="832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
dir="target/llama.cpp"
llama_bench="$dir/build/bin/llama-bench"

model="$(scripts/fetch-model.sh)"
cargo build --release --quiet

if [ ! -x "$llama_bench" ]; then
    mkdir -p "$dir"
    echo "downloading llama-cpp-python $VERSION (source) from PyPI ..." >&2
    python3 - "$VERSION" "$dir/src.tar.gz" <<'PY'
import json, sys, urllib.parse, urllib.request
version, out = sys.argv[1:]
index = "https://pypi.org/pypi/llama-cpp-python/json"
files = json.load(urllib.request.urlopen(index))["releases"][version]
url = next(f["url"] for f in files if f["packagetype"] == "sdist")
urllib.request.urlretrieve(urllib.parse.urljoin(index, url), out)
PY
    echo "$SHA256  $dir/src.tar.gz" | sha256sum -c --quiet
    tar -xzf "$dir/src.tar.gz" -C "$dir"
    src="$dir/llama_cpp_python-$VERSION/vendor/llama.cpp"
    command -v cmake > /dev/null || python3 -m pip install --quiet cmake
    echo "building llama.cpp's llama-bench into $dir (log: $dir/build.log) ..." >&2
    flags=(-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON)
    if grep -q avx512_vnni /proc/cpuinfo; then
        flags+=(-DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON)
    fi
    cmake -S "$src" -B "$dir/build" -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF \
        -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF "${flags[@]}" > "$dir/cmake.log" 2>&1
    cmake --build "$dir/build" -j "$(nproc)" --target llama-bench > "$dir/build.log" 2>&1
fi

prompt=$(python3 -c "print('The history of the city is long and full of events. ' * 18)")
for _ in $(seq "$rounds"); do
    "$llama_bench" -m "$model" -t "$threads" -p 217 -n 128 -d 0,217 -r 2 -o csv 2> /dev/null |
        python3 -c '
import csv, json, sys
rows = list(csv.DictReader(sys.stdin))
pick = lambda prompt, depth: next(float(r["avg_ts"]) for r in rows
                                  if (int(r["n_prompt"]) > 0) == prompt and r["n_depth"] == depth)
print(json.dumps({"who": "llama.cpp", "prefill": pick(True, "0"), "decode": pick(False, "217"),
                  "decode_empty_context": pick(False, "0")}))'
    ./target/release/allmende generate --local --model "$model" --prompt "$prompt" \
        --max-tokens 128 --ignore-eos --temperature 0 --threads "$threads" --json |
        tail -n 1 | python3 -c '
import json, sys
t = json.load(sys.stdin)["timings"]
print(json.dumps({"who": "allmende", "prefill": t["prefill_tokens_per_s"],
                  "decode": t["decode_tokens_per_s"]}))'
done | python3 -c '
import json, statistics, sys
rows = [json.loads(line) for line in sys.stdin]
for r in rows:
    line = "%-9s  prefill %6.1f tok/s   decode %6.1f tok/s" % (r["who"], r["prefill"], r["decode"])
    if "decode_empty_context" in r:
        line += "   (decode from an empty context %.1f)" % r["decode_empty_context"]
    print(line)
med = lambda who, key: statistics.median(r[key] for r in rows if r["who"] == who)
for key in ["prefill", "decode"]:
    ours, theirs = med("allmende", key), med("llama.cpp", key)
    print("%s: allmende %.1f / llama.cpp %.1f tok/s = %.2fx (medians)" % (key, ours, theirs, ours / theirs))
'

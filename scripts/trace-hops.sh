#!/usr/bin/env bash
# Where a swarm token's time goes, from the kernel's scheduler trace: starts three
# loopback nodes (layers 0..10, 10..20, 20..30), generates through them, records
# every context switch for SECONDS of the decode with `perf sched record`, and prints
# per token the median time each process computes (the client's LM head H, nodes A, B,
# C) and the median gap between one finishing and the next starting (the hops).
#   scripts/trace-hops.sh [THREADS] [TOKENS] [SECONDS]
# Needs perf and the kernel's tracefs (as root: mount -t tracefs nodev /sys/kernel/tracing).
set -euo pipefail
cd "$(dirname "$0")/.."
threads="${1:-2}"
tokens="${2:-800}"
seconds="${3:-1}"
model="$(scripts/fetch-model.sh)"
cargo build --release --quiet
bin=./target/release/allmende
source scripts/nodes.sh
start_node a 0..10
start_node b 10..20 --bootstrap "$(addr_of a)"
start_node c 20..30 --bootstrap "$(addr_of a)"
trace="$work/sched.data"
prompt=$(python3 -c "print('The history of the city is long and full of events. ' * 18)")
# The recording starts once the prompt is in and decoding is under way.
(sleep 2.5 && perf sched record -a -o "$trace" -- sleep "$seconds" >/dev/null 2>&1) &
recorder=$!
"$bin" generate --model "$model" --bootstrap "$(addr_of a)" --no-mdns --prompt "$prompt" \
    --max-tokens "$tokens" --ignore-eos --temperature 0 --threads "$threads" --json \
    | tail -n 1 | python3 -c 'import json, sys; print("decode", round(json.load(sys.stdin)["timings"]["decode_tokens_per_s"], 1), "tok/s")'
wait "$recorder"
perf sched timehist -i "$trace" 2>/dev/null | python3 -c '
import collections, re, statistics, sys
runs = []  # (start, end, thread, run ms) of every time a thread held a CPU
for line in sys.stdin:
    m = re.match(r"\s*([\d.]+)\s+\[\d+\]\s+(\S+)\s+[\d.]+\s+[\d.]+\s+([\d.]+)", line)
    if m:
        end, thread, run = float(m.group(1)), m.group(2), float(m.group(3))
        runs.append((end - run / 1e3, end, thread, run))
total = collections.Counter()
for _, _, thread, run in runs:
    total[thread] += run
pid = lambda t: int(t.split("[")[1].split("/")[0])
# Nodes start in route order; each has one compute worker thread.
computes = sorted((t for t in total if t.startswith("allmende-comput")), key=pid)
# The client generates on a blocking thread of its runtime: the busiest of its threads.
client = max((t for t in total if t.startswith("tokio-rt-worker")), key=total.get)
roles = dict(zip(computes, "ABC"), **{client: "H"})
spans = []  # runs of 0.3 ms or more, pieces less than 0.4 ms apart joined
for start, end, thread, run in sorted(r for r in runs if r[2] in roles and r[3] > 0.3):
    role = roles[thread]
    if spans and spans[-1][2] == role and start - spans[-1][1] < 0.0004:
        spans[-1][1] = end
    else:
        spans.append([start, end, role])
order = "HABC"
busy, gaps = collections.defaultdict(list), collections.defaultdict(list)
for a, b in zip(spans, spans[1:]):
    busy[a[2]].append((a[1] - a[0]) * 1e3)
    if order[(order.index(a[2]) + 1) % 4] == b[2]:
        gaps[a[2] + "->" + b[2]].append((b[0] - a[1]) * 1e3)
for role in order:
    print(f"{role} computes  {statistics.median(busy[role]):.3f} ms (median of {len(busy[role])})")
for hop in ("H->A", "A->B", "B->C", "C->H"):
    print(f"{hop} gap       {statistics.median(gaps[hop]):.3f} ms")
print(f"per token: computing {sum(statistics.median(v) for v in busy.values()):.3f} ms,"
      f" hops {sum(statistics.median(v) for v in gaps.values()):.3f} ms")
'

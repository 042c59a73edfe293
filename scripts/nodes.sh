# Starting and stopping local `allmende serve` nodes; sourced by demo.sh and
# trace-hops.sh.
# The caller sets: bin (the binary), model (the GGUF file), and
# threads (compute threads per node).

work=$(mktemp -d)
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

# start_node NAME LAYERS [serve flags...]: starts a node on 127.0.0.1 and waits until
# it serves. Not in a subshell: its pid must reach `pids` for the cleanup.
start_node() {
    local name=$1 layers=$2
    shift 2
    "$bin" serve --model "$model" --layers "$layers" --listen /ip4/127.0.0.1/tcp/0 \
        --identity "$work/$name.key" --no-mdns --threads "$threads" "$@" >"$work/$name.log" 2>&1 &
    pids+=($!)
    for _ in $(seq 600); do
        if grep -q "^serving layers" "$work/$name.log"; then
            return
        fi
        sleep 0.1
    done
    echo "node $name did not start:" >&2
    cat "$work/$name.log" >&2
    exit 1
}

# addr_of NAME: the node's first listen address, ready for --bootstrap.
addr_of() {
    grep -m1 "^listening on" "$work/$1.log" | cut -d' ' -f3
}

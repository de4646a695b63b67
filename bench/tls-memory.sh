#!/usr/bin/env bash
# User-space memory per idle WebSocket connection with TLS (wss://) against without, in the same
# run: `tunegate serve` started twice (plain, then --tls-cert/--tls-key with a CA and
# certificate made here by openssl), each given the same warm-up and then N idle connections
# from bench/hold_idle.py (--tls-ca for the TLS run), all open and the server quiet before its
# memory is read again. Reported: (RSS after - RSS before) / N for both, and the difference,
# which is what one idle TLS session costs.
# Results: stdout, bench/results/tls-memory.md and bench/results/tls-memory.json.
#
# Environment (all optional):
#   TUNEGATE_BIN   binary to measure (default target/release/tunegate; build it first)
#   BENCH_CONNS    idle connections per run (default 10000; one client process holds them)
#   BENCH_OUT      results path without extension (default bench/results/tls-memory)
#
# Only loopback is used; every wait is bounded; everything started here is stopped on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
bench_name=tls-memory
# shellcheck source=bench/lib.sh
source bench/lib.sh

bin=${TUNEGATE_BIN:-target/release/tunegate}
conns=${BENCH_CONNS:-10000}
out=${BENCH_OUT:-bench/results/tls-memory}
warmup=100
[[ -x $bin ]] || die "no tunegate binary at $bin (cargo build --release, or set TUNEGATE_BIN)"
command -v openssl >/dev/null || die "openssl is needed (it makes the test CA and certificate)"
((conns + 64 <= $(ulimit -Hn))) || die "BENCH_CONNS $conns does not fit RLIMIT_NOFILE $(ulimit -Hn)"

bench_work tls-memory

openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
    -keyout "$work/ca.key" -out "$work/ca.pem" -subj "/CN=tunegate bench CA" 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
    -keyout "$work/server.key" -out "$work/server.csr" -subj "/CN=127.0.0.1" 2>/dev/null
printf 'subjectAltName=IP:127.0.0.1\n' >"$work/ext"
openssl x509 -req -in "$work/server.csr" -CA "$work/ca.pem" -CAkey "$work/ca.key" \
    -CAcreateserial -days 2 -extfile "$work/ext" -out "$work/server.pem" 2>/dev/null

rss_kb() { awk '$1 == "VmRSS:" { print $2 }' "/proc/$1/status"; }

# quiet PID: until RSS and CPU time stay put for 3 samples a second apart (at most 60 s).
quiet() {
    local last="" now i same=0
    for ((i = 0; i < 60; i++)); do
        now="$(rss_kb "$1") $(awk '{ print $14 + $15 }' "/proc/$1/stat")"
        if [[ $now == "$last" ]]; then ((++same >= 3)) && return 0; else same=0; fi
        last=$now
        sleep 1
    done
    return 1
}

# hold NAME N HOLD_SECONDS [hold_idle flags...]: starts a client; its status file is $work/NAME.
hold() {
    local name=$1 n=$2 secs=$3
    shift 3
    python3 "$root/bench/hold_idle.py" --port "$port" -n "$n" --expect-hello --hold "$secs" \
        --status "$work/$name" "$@" &
    pids+=($!)
    client=$!
}

# opened NAME PHASE: the client's open count once it reached PHASE (within 180 s).
opened() {
    local i
    for ((i = 0; i < 1800; i++)); do
        if grep -q "phase=$2" "$work/$1" 2>/dev/null; then
            sed -n 's/.* open=\([0-9]*\).*/\1/p' "$work/$1"
            return 0
        fi
        sleep 0.1
    done
    return 1
}

declare -A per_conn
run() {
    local mode=$1 tls_args=() client_args=()
    shift
    if [[ $mode == tls ]]; then
        tls_args=(--tls-cert "$work/server.pem" --tls-key "$work/server.key")
        client_args=(--tls-ca "$work/ca.pem")
    fi
    "$bin" serve --listen 127.0.0.1:0 --threads 1 --ping-interval 600000 "${tls_args[@]}" \
        2>"$work/$mode.log" &
    local server=$!
    pids+=("$server")
    poll 10 grep -q "listening on" "$work/$mode.log" || die "$mode: the server did not start"
    port=$(sed -n 's/.*listening on 127.0.0.1:\([0-9]*\).*/\1/p' "$work/$mode.log")
    hold "$mode-warmup" "$warmup" 0 "${client_args[@]}"
    wait "$client" || true
    [[ $(opened "$mode-warmup" "done") == "$warmup" ]] || die "$mode: warm-up failed: $(cat "$work/$mode-warmup")"
    quiet "$server" || log "$mode: not quiet after the warm-up"
    local before after open
    before=$(rss_kb "$server")
    hold "$mode" "$conns" 600 "${client_args[@]}"
    open=$(opened "$mode" holding) || die "$mode: clients still connecting after 180 s"
    ((open == conns)) || die "$mode: $open of $conns opened: $(cat "$work/$mode")"
    quiet "$server" || log "$mode: not quiet with $conns connections"
    after=$(rss_kb "$server")
    per_conn[$mode]=$(((after - before) * 1024 / conns))
    log "$mode: RSS $before kB -> $after kB with $conns idle connections: ${per_conn[$mode]} B each"
    stop_pid "$client" 5
    stop_pid "$server" 10
}

run plain
run tls
tls_cost=$((per_conn[tls] - per_conn[plain]))
mkdir -p "$(dirname "$out")"
{
    echo "# Memory per idle connection, plain and TLS ($(date -u +%F), $conns connections, 1 thread)"
    echo
    echo "| server | bytes per idle connection (RSS delta / N) |"
    echo "|---|---|"
    echo "| tunegate serve (ws://) | ${per_conn[plain]} |"
    echo "| tunegate serve --tls-cert (wss://, TLS 1.3, ECDSA P-256) | ${per_conn[tls]} |"
    echo "| one idle TLS session | $tls_cost |"
} | tee "$out.md"
printf '{"date": "%s", "connections": %d, "plain_bytes": %d, "tls_bytes": %d, "tls_session_bytes": %d}\n' \
    "$(date -u +%F)" "$conns" "${per_conn[plain]}" "${per_conn[tls]}" "$tls_cost" >"$out.json"

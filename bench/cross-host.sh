#!/usr/bin/env bash
# Several hosts joined by a Redis 7 Cluster (`tunegate serve --bus`), against the same load on
# one host, all on this machine's loopback.
#
# Starts a 3-master, 3-replica cluster (scripts/redis-cluster.sh) and BENCH_HOSTS "hosts", each
# BENCH_WORKERS `tunegate serve --threads 1` worker processes on its own address (127.0.0.11,
# .12, ...; node h+1, worker i has incarnation 100+i), then:
#
#  1. traffic: bench/bus_traffic.py (Python websockets) opens BENCH_TRAFFIC_CLIENTS connections
#     spread over the hosts at random, builds the room mix of bench/bus-traffic.sh, publishes
#     BENCH_TRAFFIC_MESSAGES messages and checks each reached every other member exactly once;
#     from where the members sit it computes, per publish, the worker processes other than the
#     publisher's that hold a member (what Redis should deliver, nothing more). This script
#     requires: the masters' SPUBLISH calls (INFO commandstats) = publishes, each worker's
#     tunegate_bus_room_messages_received_total = its ideal, nothing dropped.
#  2. load: `tunegate load` with BENCH_CONNECTIONS connections over every host, rooms
#     BENCH_ROOMS (the same mix by membership), BENCH_RATE messages/s for BENCH_SECONDS; then
#     the same load against one host with all BENCH_HOSTS x BENCH_WORKERS workers on the unix
#     bus. Latency p50/p99 from the load generator, CPU of the workers and of Redis over the
#     publish phase (/proc/PID/stat), SPUBLISH per publish.
#  3. memory: bench/idle-memory.sh's measurement of one `serve --threads 1` holding
#     BENCH_IDLE_CONNS idle connections, with and without --bus.
#
# Results: stdout, BENCH_OUT.md and BENCH_OUT.json (default bench/results/cross-host.*).
# Exit status 0 only if delivery was complete and exact and every counter matched.
#
# Environment (all optional):
#   TUNEGATE_BIN            binary (default target/release/tunegate; build it first)
#   BENCH_HOSTS             hosts (default 3)
#   BENCH_WORKERS           worker processes per host (default 2)
#   BENCH_CONNECTIONS       connections of the load phase (default 100000)
#   BENCH_ROOMS             its room spread, SIZE:PERCENT,... (default 2:38,5:23,25:23,250:16)
#   BENCH_RATE, BENCH_SECONDS   its messages per second and for how long (default 5000, 10)
#   BENCH_TRAFFIC_CLIENTS, BENCH_TRAFFIC_MESSAGES   the traffic phase (default 3000, 20000;
#                           0 clients skips it)
#   BENCH_IDLE_CONNS        idle connections of the memory phase (default 10000; 0 skips it)
#   BENCH_REDIS_PORT        first port of the cluster (default 17400)
#   BENCH_OUT               results path without extension
#
# Only loopback is used; every wait is bounded and everything started here is stopped on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
bench_name=cross-host
# shellcheck source=bench/lib.sh
source bench/lib.sh
invocation="$(env | grep -E '^(BENCH_|TUNEGATE_BIN=)' | sort | sed "s/=\(.*\)/='\1'/" | paste -sd' ' || true)"
invocation="${invocation:+$invocation }bench/cross-host.sh"

bin=${TUNEGATE_BIN:-target/release/tunegate}
hosts=${BENCH_HOSTS:-3}
per_host=${BENCH_WORKERS:-2}
conns=${BENCH_CONNECTIONS:-100000}
rooms=${BENCH_ROOMS:-2:38,5:23,25:23,250:16}
rate=${BENCH_RATE:-5000}
seconds=${BENCH_SECONDS:-10}
traffic_clients=${BENCH_TRAFFIC_CLIENTS:-3000}
traffic_messages=${BENCH_TRAFFIC_MESSAGES:-20000}
idle_conns=${BENCH_IDLE_CONNS:-10000}
redis_port=${BENCH_REDIS_PORT:-17400}
out=${BENCH_OUT:-bench/results/cross-host}
port=9300
ping_interval_ms=600000

[[ -x $bin ]] || die "no tunegate binary at $bin (cargo build --release, or set TUNEGATE_BIN)"
bin=$(cd "$(dirname "$bin")" && pwd)/$(basename "$bin")
for v in hosts per_host conns rate seconds traffic_clients traffic_messages idle_conns redis_port; do
    [[ ${!v} =~ ^[0-9]+$ ]] || die "$v must be a whole number (got '${!v}')"
done
((hosts >= 2 && hosts <= 20)) || die "BENCH_HOSTS must be 2..20"
command -v redis-server >/dev/null || die "redis-server is needed (bash scripts/deps.sh)"
python3 -c 'import websockets.asyncio.client' 2>/dev/null || die "Python websockets 13+ is needed"
ulimit -n "$(ulimit -Hn)"

work=$(mktemp -d "${TMPDIR:-/tmp}/tunegate-cross-host.XXXXXX")
pids=()
workers=()
cleanup() {
    local pid
    for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do stop_pid "$pid" 5; done
    bash scripts/redis-cluster.sh stop "$work/redis" >/dev/null 2>&1 || true
    rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

log "a Redis Cluster on 127.0.0.1:$redis_port.."
mapfile -t redis_ports < <(bash scripts/redis-cluster.sh start "$work/redis" "$redis_port")
mapfile -t redis_pids < <(cat "$work/redis"/*.pid)
bus="redis://127.0.0.1:$redis_port,127.0.0.1:$((redis_port + 1))"

# start_workers NAME ADDR COUNT FIRST_INCARNATION [FLAG...]: COUNT workers sharing ADDR; their
# pids are appended to `workers`.
start_workers() {
    local name=$1 addr=$2 count=$3 first=$4 w
    shift 4
    for ((w = 0; w < count; w++)); do
        : >"$work/$name-$w.log"
        "$bin" serve --listen "$addr" --threads 1 --workers "$count" --worker "$w" \
            --incarnation $((first + w)) --bus-dir "$work/bus-$name" \
            --ping-interval "$ping_interval_ms" "$@" 2>>"$work/$name-$w.log" &
        pids+=("$!")
        workers+=("$!")
    done
    for ((w = 0; w < count; w++)); do
        poll 10 grep -q 'listening on' "$work/$name-$w.log" \
            || die "$name worker $w did not listen: $(cat "$work/$name-$w.log")"
    done
}

stop_workers() {
    local pid
    for pid in "${workers[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${workers[@]}"; do stop_pid "$pid" 10; done
    workers=()
}

# metric_at ADDR NAME: the value a host's /metrics gives (summed over its workers and labels).
metric_at() {
    curl -s -m 5 --noproxy '*' "http://$1/metrics" | awk -v n="$2" '
        $1 == n || index($1, n "{") == 1 { s += $2 } END { print s + 0 }'
}

cpu_ticks() {  # cpu_ticks PID...: utime + stime, summed
    local pid total=0
    for pid in "$@"; do
        total=$((total + $(sed 's/.*) //' /proc/"$pid"/stat | awk '{ print $12 + $13 }')))
    done
    echo "$total"
}

spublish_calls() {  # over the masters only (replicas re-run what they replicate)
    local p total=0 n
    for p in "${redis_ports[@]}"; do
        redis-cli -p "$p" info replication | grep -q '^role:master' || continue
        n=$(redis-cli -p "$p" info commandstats | sed -n 's/^cmdstat_spublish:calls=\([0-9]*\),.*/\1/p')
        total=$((total + ${n:-0}))
    done
    echo "$total"
}

host_addr() { echo "127.0.0.$((11 + $1)):$port"; }
urls=""
for ((h = 0; h < hosts; h++)); do
    start_workers "host$h" "$(host_addr "$h")" "$per_host" $((100 + h * per_host)) \
        --bus "$bus" --node $((h + 1))
    urls+="${urls:+,}ws://$(host_addr "$h")/"
done
log "$hosts hosts x $per_host workers up: $urls"

# ---- 1. traffic, exact -------------------------------------------------------------------------
traffic_rc=0
: >"$work/traffic-metrics.txt"
if ((traffic_clients > 0)); then
    log "traffic: $traffic_clients clients, $traffic_messages messages"
    timeout -k 5 300 python3 bench/bus_traffic.py --urls "$urls" --workers $((hosts * per_host)) \
        --first-incarnation 100 --redis-ports "$(IFS=,; echo "${redis_ports[*]}")" \
        --clients "$traffic_clients" --messages "$traffic_messages" \
        --timeout 240 --out "$work/traffic.json" || traffic_rc=$?
    sleep 1.2  # every worker's counters reach its host's /metrics within 0.5 s
    for ((h = 0; h < hosts; h++)); do
        curl -s -m 5 --noproxy '*' "http://$(host_addr "$h")/metrics" \
            | sed -n "s/^\(tunegate_bus_\(room_messages_received_total\|redis_[a-z_]*\)\)/$h \1/p" \
                >>"$work/traffic-metrics.txt"
    done
fi

# ---- 2. load: across hosts, then one host --------------------------------------------------------
# run_load NAME URLS REDIS(0|1): the load with CPU readings at the start and the end of its
# publish phase (its progress lines say the phase, one a second).
run_load() {
    local name=$1 target=$2 with_redis=$3 t1 t2 w1 w2 r1=0 r2=0
    local log_file=$work/load-$name.log
    ((with_redis)) && for p in "${redis_ports[@]}"; do redis-cli -p "$p" config resetstat >/dev/null; done
    "$bin" load "$target" -n "$conns" --rooms "$rooms" --hold 2 --publish-rate "$rate" \
        --publish-seconds "$seconds" --json >"$work/load-$name.json" 2>"$log_file" &
    local load_pid=$!
    pids+=("$load_pid")
    poll 600 grep -q '^tunegate load: publish:' "$log_file" || die "$name: no publish phase: $(tail -n 5 "$log_file")"
    t1=$(date +%s.%N) w1=$(cpu_ticks "${workers[@]}")
    ((with_redis)) && r1=$(cpu_ticks "${redis_pids[@]}")
    # The drain's first progress line, or the end of a run whose drain was under a second.
    publish_over() { grep -qE '^tunegate load: (drain|finish):' "$log_file" || gone "$load_pid"; }
    poll $((seconds + 60)) publish_over || true
    t2=$(date +%s.%N) w2=$(cpu_ticks "${workers[@]}")
    ((with_redis)) && r2=$(cpu_ticks "${redis_pids[@]}")
    wait "$load_pid" || true
    local spub=0
    ((with_redis)) && spub=$(spublish_calls)
    log "$name: CPU ticks workers $w1 -> $w2, Redis $r1 -> $r2"
    printf '{"t1": %s, "t2": %s, "workers_ticks": %d, "redis_ticks": %d, "spublish": %d}\n' \
        "$t1" "$t2" $((w2 - w1)) $((r2 - r1)) "$spub" >"$work/cpu-$name.json"
}

log "load across hosts: $conns connections, rooms $rooms, $rate msg/s for $seconds s"
run_load hosts "$urls" 1
redis_received=0 redis_dropped=0
for ((h = 0; h < hosts; h++)); do
    redis_received=$((redis_received + $(metric_at "$(host_addr "$h")" tunegate_bus_redis_received_total)))
    redis_dropped=$((redis_dropped + $(metric_at "$(host_addr "$h")" tunegate_bus_redis_dropped_total)))
done
echo "{\"received\": $redis_received, \"dropped\": $redis_dropped}" >"$work/redis-counters.json"
stop_workers
log "load on one host: $((hosts * per_host)) workers on the unix bus"
start_workers one "127.0.0.10:$port" $((hosts * per_host)) 200
run_load one "ws://127.0.0.10:$port/" 0
stop_workers

# ---- 3. memory per idle connection, with and without the bus --------------------------------------
idle_with="" idle_without=""
if ((idle_conns > 0)); then
    for mode in without with; do
        args=""
        [[ $mode == with ]] && args="--bus $bus"
        TUNEGATE_BIN=$bin TUNEGATE_SERVE_ARGS=$args BENCH_PEERS="" BENCH_CONNS=$idle_conns \
            BENCH_OUT="$work/idle-$mode" bash bench/idle-memory.sh >/dev/null 2>"$work/idle-$mode.log" \
            || die "idle-memory.sh ($mode the bus) failed: $(tail -n 5 "$work/idle-$mode.log")"
    done
    idle_with=$work/idle-with.json idle_without=$work/idle-without.json
fi

# ---- report -----------------------------------------------------------------------------------------
mkdir -p "$(dirname "$out")"
python3 bench/cross_host_report.py --work "$work" --out "$out" --hosts "$hosts" \
    --per-host "$per_host" --traffic-rc "$traffic_rc" --traffic-clients "$traffic_clients" \
    --invocation "$invocation" --rooms "$rooms" --rate "$rate" --seconds "$seconds" \
    --tunegate "$("$bin" --version)" --idle-with "$idle_with" --idle-without "$idle_without"

#!/usr/bin/env bash
# More connections than one process's descriptor limit allows: `tunegate run` spreads them over
# worker processes it sizes itself.
#
# In a network namespace this script creates (nothing on the host is changed): `tunegate run`
# with the c100k profile applies what it can inside the namespace (somaxconn, port range, ...),
# sizes its workers from the hard RLIMIT_NOFILE it really has (20000 here; no CAP_SYS_RESOURCE)
# and target_connections 100000, and starts them on one port. bench/hold_idle.py clients in the
# same namespace open BENCH_CONNS idle WebSockets (source addresses 127.0.0.2, .3, ...; each
# connection counts only once its `hello` arrived). Then, from the server's side: the whole
# server's /metrics, each worker's socket descriptors, RLIMIT_NOFILE and RSS, and what `ss` sees
# established on the port; every connection must still be open at the end.
# Results: stdout, bench/results/many-connections.md and .json.
#
# Environment (all optional):
#   TUNEGATE_BIN           binary (default target/release/tunegate; build it first)
#   BENCH_CONNS            connections to hold (default 100000: five processes' worth)
#   BENCH_PROFILE          profile for `tunegate run` (default c100k)
#   BENCH_CONNECT_TIMEOUT  seconds to get all connections open (default 180)
#   BENCH_HOLD             seconds the clients hold before the readings end (default 10)
#
# Bounded: every wait has a timeout, the clients exit by themselves, and the trap stops every
# process and deletes the namespace on any exit.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
bench_name=many-connections
# shellcheck source=bench/lib.sh
source bench/lib.sh

bin=${TUNEGATE_BIN:-target/release/tunegate}
conns=${BENCH_CONNS:-100000}
bench_profile=${BENCH_PROFILE:-c100k}
connect_timeout=${BENCH_CONNECT_TIMEOUT:-180}
hold_extra=${BENCH_HOLD:-10}
port=18080
# One client process holds at most this many: its own descriptors count against the same
# hard limit as the server's.
per_client=15000

[[ $(id -u) == 0 ]] || die "run as root (it creates a network namespace)"
[[ -x $bin ]] || die "no tunegate binary at $bin (cargo build --release, or set TUNEGATE_BIN)"
bin=$(cd "$(dirname "$bin")" && pwd)/$(basename "$bin")
[[ $conns =~ ^[0-9]+$ ]] || die "BENCH_CONNS must be a whole number"
for tool in ip python3 curl ss; do command -v $tool >/dev/null || die "$tool is needed"; done
ulimit -n "$(ulimit -Hn)"
limit=$(ulimit -Hn)

ns_work "many"
client_prefix=(ip netns exec "$ns")
socket_fds() { find /proc/"$1"/fd -lname 'socket:*' 2>/dev/null | wc -l; }

log "starting tunegate run (profile $bench_profile) in namespace $ns; hard RLIMIT_NOFILE $limit"
start_daemon "$bench_profile" "  ping_interval_ms: 600000"

t0=$(date +%s.%N)
run_clients clients "$conns" 0 $((connect_timeout + hold_extra + 60)) --expect-hello
open=$(wait_clients holding "$connect_timeout") || die "clients still connecting after ${connect_timeout}s ($open open; $(client_errors))"
t1=$(date +%s.%N)
connect_s=$(python3 -c "print(round($t1 - $t0, 1))")
log "$open of $conns connections open in ${connect_s} s; holding ${hold_extra} s"
sleep "$hold_extra"

problems=()
((open == conns)) || problems+=("$open of $conns opened ($(client_errors))")
# /metrics sums the workers' counters, which travel the bus every half second.
ws_settled() { ws_open=$(metric tunegate_websockets_open); [[ $ws_open == "$conns" ]]; }
poll 5 ws_settled || true
[[ $ws_open == "$conns" ]] || problems+=("tunegate_websockets_open is ${ws_open:-unreadable}, not $conns")
established=$(in_ns ss -Htn state established "( sport = :$port )" | wc -l)
rows="" total_fds=0 total_rss=0 max_fds=0
for i in "${!worker_pids[@]}"; do
    pid=${worker_pids[$i]}
    fds=$(socket_fds "$pid")
    rss=$(kb_field /proc/"$pid"/status VmRSS)
    wlimit=$(awk '/Max open files/ { print $4 }' /proc/"$pid"/limits)
    total_fds=$((total_fds + fds)) total_rss=$((total_rss + rss))
    ((fds > max_fds)) && max_fds=$fds
    rows+="| worker $i | $pid | $fds | $wlimit | $((rss / 1024)) MiB |"$'\n'
done
still=$(wait_clients holding 1) || true
((still == open)) || problems+=("connections closed while held: $open -> $still")
kill -0 "$daemon_pid" || problems+=("tunegate run died")
restarts=$(status_json 'd["restarts"]')
((restarts == 0)) || problems+=("$restarts worker restart(s) during the run")

for pid in "${client_pids[@]}"; do stop_pid "$pid" 10; done
stop_pid "$daemon_pid" 30
rc=0
wait "$daemon_pid" || rc=$?
daemon_pid=""
((rc == 0)) || problems+=("tunegate run exited $rc after SIGTERM")

mkdir -p bench/results
{
    echo "Measured $(date -u +%Y-%m-%d) on $(nproc) cores, kernel $(uname -r), hard RLIMIT_NOFILE $limit."
    echo
    echo "Command: \`bash bench/many-connections.sh\` (BENCH_CONNS=$conns, profile $bench_profile)."
    echo
    echo "Sizing (tunegate run's log): $sizing"
    echo
    echo "| | Connections held |"
    echo "|:---|---:|"
    echo "| opened by the clients (hello received) | $open |"
    echo "| tunegate_websockets_open (whole server) | ${ws_open:-?} |"
    echo "| established on port $port (ss) | $established |"
    echo "| still open at the end | $still |"
    echo "| one process's limit (RLIMIT_NOFILE) | $limit |"
    echo
    echo "Time to open all $conns: $connect_s s (hold_idle.py clients, at most 200 handshakes in flight per client)."
    echo
    echo "| Worker | pid | Socket descriptors | RLIMIT_NOFILE | RSS |"
    echo "|:---|---:|---:|---:|---:|"
    printf '%s' "$rows"
    echo
    echo "Workers' RSS together: $((total_rss / 1024)) MiB; busiest worker: $max_fds sockets."
    if ((${#problems[@]})); then
        echo
        for p in "${problems[@]}"; do echo "PROBLEM: $p"; done
    fi
} | tee bench/results/many-connections.md
python3 - "$conns" "$open" "${ws_open:-0}" "$established" "$still" "$limit" "$connect_s" "${#worker_pids[@]}" "$total_rss" "${#problems[@]}" >bench/results/many-connections.json <<'PY'
import json, sys
keys = ["target", "opened", "websockets_open", "established", "still_open", "rlimit_nofile",
        "connect_seconds", "workers", "workers_rss_kb", "problems"]
vals = [float(v) if "." in v else int(v) for v in sys.argv[1:]]
print(json.dumps(dict(zip(keys, vals)), indent=2))
PY
((${#problems[@]} == 0)) || die "${#problems[@]} problem(s), see above"

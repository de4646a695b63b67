#!/usr/bin/env bash
# The fleet side-by-side (issue 17): the write-up's topology — nginx in front, two hosts of two
# server processes each behind it, a Redis 7 Cluster between them — once with Socket.IO 4 and
# once with tunegate, on this machine, one after the other, under the same load plan.
#
# Started once: a 3-master, 3-replica Redis Cluster (scripts/redis-cluster.sh, base port
# BENCH_REDIS_PORT). Then for each mode (BENCH_MODES: "nginx", clients through one real nginx;
# "direct", clients straight to the hosts) and each stack (BENCH_STACKS), everything fresh:
#  - socketio: per "host" (127.0.0.11, 127.0.0.12) 2 Node processes of
#    bench/peer_socketio_server.js on ports 18111 and 18112, joined by `@socket.io/redis-adapter`'s
#    sharded adapter (createShardedAdapter, SPUBLISH, subscriptionMode "dynamic": a room's
#    messages go only to the servers holding one of its members) on the `redis` v4 client's
#    createCluster; loaded by bench/peer_socketio_load.js (socket.io-client) in
#    BENCH_LOAD_PROCESSES Node processes.
#  - tunegate: per host 2 `tunegate serve --threads 1 --workers 2 --worker W --bus redis://...
#    --trusted-proxy 127.0.0.1` (nginx's address as the hosts see it, as a deployment sets it)
#    processes sharing the host's address 127.0.0.1x:18101 (SO_REUSEPORT), node h+1, a fresh
#    incarnation per start, as bench/cross-host.sh starts hosts; loaded by `tunegate load` in
#    BENCH_LOAD_PROCESSES processes.
#  - nginx (mode "nginx"): Debian's nginx, its configuration derived from the shipped example
#    packaging/nginx/tunegate.conf (sticky `hash $remote_addr consistent`, the upgrade headers,
#    timeouts), with only what this machine needs changed: listen 127.0.0.1:BENCH_NGINX_PORT,
#    the upstream list (the addresses the servers listen on: 4 Node processes, or 2 tunegate
#    hosts of 2 processes each), `worker_processes 2`, `worker_rlimit_nofile 20000` (the hard
#    limit here, which nobody can raise), `worker_connections 20000`, error log, pid and temp
#    paths in the run's temp dir, in the foreground (`daemon off`), stopped by its id.
# Same plan for both: BENCH_CONNS connections, rooms BENCH_ROOMS (tunegate load's spread;
# the load client implements the same plan), heartbeats 25 s / 20 s (Socket.IO's pingInterval
# / pingTimeout; `tunegate serve --ping-interval/--ping-timeout`), a BENCH_HOLD s hold, then
# BENCH_RATE messages/s for BENCH_SECONDS s with BENCH_PAYLOAD bytes of padding. Client i binds
# source address 127.0.1.1 + i / BENCH_PER_SOURCE (through nginx, its hash by client address
# picks the upstream) and, direct, goes to host address number hash(i) (tunegate load's hash).
#
# Measured per run: connections held (opened / asked; and per server process from `ss`);
# memory per connection per host (RSS of the host's server processes late in the hold minus
# before the load, over the connections they hold); Redis commands per published message (the
# masters' INFO commandstats after CONFIG RESETSTAT late in the hold, up to the last reading
# before the clients' teardown began, over the messages published; by command), and what
# Redis is sent with no message at all (2 s of the hold); CPU over the publish phase (from
# /proc/PID/stat, in cores; until the drain is over) of the servers, of every redis-server, of
# nginx and of the load processes; latency p50/p99/p99.9 and messages lost, from the load client.
#
# The connection count is bounded by nginx: each nginx worker may hold 20,000 descriptors (the
# hard RLIMIT_NOFILE here) and every proxied connection costs it two (the client's and the
# upstream's), so 2 workers top out near 19,000 proxied connections; BENCH_CONNS (default
# 16,000) leaves room for the kernel's uneven spread between the workers. The script says so.
#
# Results: stdout, BENCH_OUT.md and BENCH_OUT.json (default bench/results/fleet.*) and the plot
# BENCH_OUT.svg (bench/fleet_report.py), copied to docs/fleet.svg with BENCH_PUBLISH=1.
# Exit status 0 once the report is written, whatever was measured: what went wrong in a run
# (connections not opened, messages lost, a load that ended early) is in the report, with the
# servers' and nginx's log lines; non-zero when something could not be started.
#
# Environment (all optional):
#   TUNEGATE_BIN         binary (default target/release/tunegate; build it first)
#   BENCH_CONNS          connections per run (default 16000; at most 18810 through nginx)
#   BENCH_ROOMS          room spread SIZE:PERCENT,... (default 2:38,5:23,25:23,250:16)
#   BENCH_RATE           room messages per second (default 500)
#   BENCH_SECONDS        message phase length (default 10)
#   BENCH_HOLD           seconds held after all joined, before messages (default 30: at least
#                        one heartbeat round for most connections; 6 at least: the readings
#                        are taken 4 s before its end)
#   BENCH_PAYLOAD        bytes of padding per message (default 64)
#   BENCH_STACKS         which stacks (default "socketio tunegate")
#   BENCH_MODES          which modes (default "nginx direct")
#   BENCH_LOAD_PROCESSES load processes per run, both stacks (default 2)
#   BENCH_PER_SOURCE     connections per client source address (default 1: every client its
#                        own address, so nginx's hash by address spreads the members of a room
#                        over the hosts independently, as the direct runs' hash of the index does)
#   BENCH_PING_INTERVAL_MS, BENCH_PING_TIMEOUT_MS   heartbeats (default 25000, 20000)
#   BENCH_REDIS_PORT     first port of the cluster (default 17600)
#   BENCH_NGINX_PORT     nginx's port on 127.0.0.1 (default 18080)
#   NGINX_BIN            nginx (default /usr/sbin/nginx)
#   BENCH_CACHE          where the Node packages go (default ~/.cache/tunegate), never the repo
#   BENCH_OUT            results path without extension (default bench/results/fleet)
#   BENCH_PUBLISH        1: also copy the plot to docs/fleet.svg (for BENCHMARKS.md)
#   BENCH_KEEP           1: keep the temp dir (logs) and say where
#
# Only loopback is used (127.0.0.0/8). Every wait is bounded; every load is bounded in count and
# time (--max-time); everything started here is stopped on exit, Ctrl-C and failure included.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
bench_name=fleet
# shellcheck source=bench/lib.sh
source bench/lib.sh
invocation="$(env | grep -E '^(BENCH_|TUNEGATE_BIN=|NGINX_BIN=)' | sort | sed "s/=\(.*\)/='\1'/" | paste -sd' ' || true)"
invocation="${invocation:+$invocation }bash bench/fleet.sh"

bin=${TUNEGATE_BIN:-target/release/tunegate}
conns=${BENCH_CONNS:-16000}
rooms=${BENCH_ROOMS:-2:38,5:23,25:23,250:16}
rate=${BENCH_RATE:-500}
seconds=${BENCH_SECONDS:-10}
hold=${BENCH_HOLD:-30}
payload=${BENCH_PAYLOAD:-64}
stacks=${BENCH_STACKS:-socketio tunegate}
modes=${BENCH_MODES:-nginx direct}
load_procs=${BENCH_LOAD_PROCESSES:-2}
per_source=${BENCH_PER_SOURCE:-1}
ping_interval=${BENCH_PING_INTERVAL_MS:-25000}
ping_timeout=${BENCH_PING_TIMEOUT_MS:-20000}
redis_port=${BENCH_REDIS_PORT:-17600}
nginx_port=${BENCH_NGINX_PORT:-18080}
nginx=${NGINX_BIN:-/usr/sbin/nginx}
cache=${BENCH_CACHE:-$HOME/.cache/tunegate}
out=${BENCH_OUT:-bench/results/fleet}
node_pkgs=(ws@8.23.0 socket.io@4.8.1 socket.io-client@4.8.1 @socket.io/redis-adapter@8.3.0 redis@4.7.1)
hosts=2
per_host=2
source_base=127.0.1.1
tunegate_port=18101
socketio_ports=(18111 18112)
nginx_workers=2
nginx_nofile=20000

[[ -x $bin ]] || die "no tunegate binary at $bin (cargo build --release, or set TUNEGATE_BIN)"
bin=$(cd "$(dirname "$bin")" && pwd)/$(basename "$bin")
for v in conns rate seconds hold payload load_procs per_source ping_interval ping_timeout redis_port nginx_port; do
    [[ ${!v} =~ ^[0-9]+$ ]] || die "$v must be a whole number (got '${!v}')"
done
((conns >= 100 && load_procs >= 1 && per_source >= 1 && seconds >= 1 && hold >= 6)) \
    || die "BENCH_CONNS >= 100, BENCH_LOAD_PROCESSES, BENCH_PER_SOURCE and BENCH_SECONDS >= 1, BENCH_HOLD >= 6"
for s in $stacks; do [[ $s == socketio || $s == tunegate ]] || die "unknown stack '$s' (socketio tunegate)"; done
for m in $modes; do [[ $m == nginx || $m == direct ]] || die "unknown mode '$m' (nginx direct)"; done
for tool in node npm python3 ss redis-server redis-cli; do
    command -v "$tool" >/dev/null || die "$tool is needed (bash scripts/deps.sh)"
done
ulimit -n "$(ulimit -Hn)"
nofile=$(ulimit -n)
# nginx: two descriptors per proxied connection, spread over its workers by the kernel; keep
# 5 % for the uneven spread plus listeners, logs and the like.
if [[ " $modes " == *" nginx "* ]]; then
    [[ -x $nginx ]] || die "nginx is needed at $nginx (apt-get install nginx; or NGINX_BIN)"
    nginx_max=$((nginx_workers * (nginx_nofile - 200) * 95 / 200))
    ((conns <= nginx_max)) || die "BENCH_CONNS=$conns: nginx's $nginx_workers workers hold at most $nginx_nofile descriptors each (the hard RLIMIT_NOFILE here) and a proxied connection costs two: keep it under $nginx_max"
fi
((conns / load_procs + 100 <= nofile)) || die "BENCH_CONNS / BENCH_LOAD_PROCESSES must fit in RLIMIT_NOFILE $nofile"
[[ " $modes " == *" nginx "* ]] && log "nginx's descriptor limit bounds the proxied connections: $nginx_workers workers x $nginx_nofile descriptors, 2 per connection, so at most $nginx_max proxied (5 % kept for the uneven spread); this run: $conns"

# Node packages: pinned, installed once into the cache, never into the repo.
if [[ " $stacks " == *" socketio "* ]]; then
    node_packages "$cache/bench-node" "${node_pkgs[@]}"
else
    export NODE_PATH=$cache/bench-node/node_modules # the report names the versions found there
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/tunegate-fleet.XXXXXX")
pids=()
cleanup() {
    local pid
    for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do stop_pid "$pid" 5; done
    bash scripts/redis-cluster.sh stop "$work/redis" >/dev/null 2>&1 || true
    if [[ ${BENCH_KEEP:-0} == 1 ]]; then log "kept $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---- helpers ----------------------------------------------------------------------------------
cpu_ticks() {  # cpu_ticks PID...: utime + stime, summed over those still there
    local pid total=0 t
    for pid in "$@"; do
        t=$(sed 's/.*) //' /proc/"$pid"/stat 2>/dev/null | awk '{ print $12 + $13 }' || true)
        total=$((total + ${t:-0}))
    done
    echo "$total"
}
rss_kb() { kb_field /proc/"$1"/status VmRSS; }
children_of() { ps -o pid= --ppid "$1" 2>/dev/null | tr -d ' ' || true; }
now() { date +%s.%N; }

# The cluster's masters, their ports (replicas re-run what they replicate: not counted).
masters=()
find_masters() {
    local p
    masters=()
    for p in "${redis_ports[@]}"; do
        redis-cli -p "$p" info replication | grep -q '^role:master' && masters+=("$p")
    done
    ((${#masters[@]} > 0)) || die "no Redis master found"
}
# commandstats_line: "TIME cmd=calls cmd=calls ..." summed over the masters.
commandstats_line() {
    local p
    {
        for p in "${masters[@]}"; do redis-cli -p "$p" info commandstats; done
    } | awk -v t="$(now)" -F'[:,=]' '/^cmdstat_/ { c[substr($1, 9)] += $3 }
        END { printf "%s", t; for (k in c) printf " %s=%d", k, c[k]; printf "\n" }'
}

# unsubscribes: SUNSUBSCRIBE calls in the last reading (rooms emptying: a teardown).
unsubscribes() {
    local n
    n=$(tail -n 1 "$dir/commandstats" | grep -o ' sunsubscribe=[0-9]*' | cut -d= -f2 || true)
    echo "${n:-0}"
}

# ---- Redis ------------------------------------------------------------------------------------
log "a Redis Cluster (3 masters, 3 replicas) on 127.0.0.1:$redis_port.."
mapfile -t redis_ports < <(bash scripts/redis-cluster.sh start "$work/redis" "$redis_port")
mapfile -t redis_pids < <(cat "$work/redis"/*.pid)
find_masters
bus="redis://127.0.0.1:$redis_port,127.0.0.1:$((redis_port + 1))"
seeds="127.0.0.1:$redis_port,127.0.0.1:$((redis_port + 1))"

# ---- servers ----------------------------------------------------------------------------------
# start_stack STACK RUN: the 4 server processes; sets `servers` (pids), `server_hosts` (host
# index of each), `server_ports` (their ports), `upstreams` (addresses they listen on).
servers=() server_hosts=() server_ports=() upstreams=()
incarnation=100
start_stack() {
    local stack=$1 run=$2 h w addr f
    servers=() server_hosts=() server_ports=() upstreams=()
    for ((h = 0; h < hosts; h++)); do
        if [[ $stack == tunegate ]]; then
            addr="127.0.0.$((11 + h)):$tunegate_port"
            upstreams+=("$addr")
            for ((w = 0; w < per_host; w++)); do
                f=$work/$run/server-h$h-$w.log
                : >"$f"
                "$bin" serve --listen "$addr" --threads 1 --workers "$per_host" --worker "$w" \
                    --incarnation "$incarnation" --bus-dir "$work/$run/bus-h$h" --bus "$bus" \
                    --node $((h + 1)) --ping-interval "$ping_interval" --ping-timeout "$ping_timeout" \
                    --trusted-proxy 127.0.0.1 2>>"$f" &
                pids+=("$!") servers+=("$!") server_hosts+=("$h") server_ports+=("$tunegate_port")
                incarnation=$((incarnation + 1))
            done
        else
            for ((w = 0; w < per_host; w++)); do
                addr="127.0.0.$((11 + h)):${socketio_ports[w]}"
                upstreams+=("$addr")
                f=$work/$run/server-h$h-$w.log
                : >"$f"
                BIND_ADDRESS=127.0.0.$((11 + h)) REDIS_CLUSTER=$seeds node bench/peer_socketio_server.js \
                    "${socketio_ports[w]}" "$ping_interval" "$ping_timeout" 2>>"$f" &
                pids+=("$!") servers+=("$!") server_hosts+=("$h") server_ports+=("${socketio_ports[w]}")
            done
        fi
    done
    for f in "$work/$run"/server-h*.log; do
        poll 20 grep -q 'listening on' "$f" || die "$run: a server did not listen within 20 s: $f: $(tail -n 5 "$f")"
    done
}

stop_servers() {
    local pid
    for pid in "${servers[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${servers[@]}"; do stop_pid "$pid" 15; done
}

# ---- nginx ------------------------------------------------------------------------------------
# nginx_conf DIR UPSTREAM...: the shipped example with what this machine needs, on stdout.
nginx_conf() {
    local dir=$1
    shift
    python3 - "$root/packaging/nginx/tunegate.conf" "$dir" "127.0.0.1:$nginx_port" "$nginx_workers" "$nginx_nofile" "$@" <<'PY'
import sys
example, d, listen, workers, nofile, *ups = sys.argv[1:]
out, done = [], set()
for line in open(example).read().splitlines():
    t = line.strip()
    indent = line[: len(line) - len(line.lstrip())]
    if t.startswith("worker_processes "):
        out.append(f"{indent}worker_processes {workers};"); done.add("workers")
    elif t.startswith("worker_rlimit_nofile "):
        out.append(f"{indent}worker_rlimit_nofile {nofile};"); done.add("nofile")
    elif t.startswith("worker_connections "):
        out.append(f"{indent}worker_connections {nofile};"); done.add("connections")
    elif t.startswith("server 10.0.0."):
        if "upstream" not in done:
            out += [f"{indent}server {u} max_fails=1 fail_timeout=5s;" for u in ups]
            done.add("upstream")
    elif t.startswith("listen 80 "):
        out.append(line.replace("listen 80 ", f"listen {listen} ")); done.add("listen")
    elif t.startswith("error_log /var/log/nginx/error.log"):
        out.append(line.replace("/var/log/nginx/error.log", f"{d}/error.log")); done.add("log")
    elif t == "http {":
        out.append(line)
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
            out.append(f"    {kind}_temp_path {d}/{kind}_temp;")
        done.add("temp")
    else:
        out.append(line)
want = {"workers", "nofile", "connections", "upstream", "listen", "log", "temp"}
if done != want:
    sys.exit(f"packaging/nginx/tunegate.conf changed shape: did not find {sorted(want - done)}")
print("\n".join(out))
PY
}

nginx_pid="" nginx_workers_pids=()
start_nginx() {
    local run=$1 dir=$work/$1/nginx
    mkdir -p "$dir"
    nginx_conf "$dir" "${upstreams[@]}" >"$dir/nginx.conf" || die "could not derive the nginx configuration"
    local g="pid $dir/nginx.pid; daemon off;"
    "$nginx" -t -q -p "$dir/" -e "$dir/error.log" -c "$dir/nginx.conf" -g "$g" 2>"$dir/test.log" \
        || die "nginx -t: $(cat "$dir/test.log" "$dir/error.log" 2>/dev/null)"
    "$nginx" -p "$dir/" -e "$dir/error.log" -c "$dir/nginx.conf" -g "$g" 2>>"$dir/stderr.log" &
    nginx_pid=$!
    pids+=("$nginx_pid")
    nginx_up() {
        gone "$nginx_pid" && die "nginx exited: $(cat "$dir/error.log")"
        [[ -n $(ss -Htln "( sport = :$nginx_port )") ]]
    }
    poll 10 nginx_up || die "nginx did not listen on 127.0.0.1:$nginx_port within 10 s: $(cat "$dir/error.log")"
    mapfile -t nginx_workers_pids < <(children_of "$nginx_pid")
    ((${#nginx_workers_pids[@]} == nginx_workers)) \
        || log "$run: nginx has ${#nginx_workers_pids[@]} worker(s), not $nginx_workers"
}

stop_nginx() {
    [[ -n $nginx_pid ]] || return 0
    stop_pid "$nginx_pid" 10
    nginx_pid="" nginx_workers_pids=()
}

# ---- one run ----------------------------------------------------------------------------------
# conns_by_pid: "PID COUNT" lines, the established TCP connections each server process holds on
# its listening port (ss).
conns_by_pid() {
    local filter="" p
    for p in $(printf '%s\n' "${server_ports[@]}" | sort -u); do filter+="${filter:+ or }sport = :$p"; done
    ss -Htnp state established "( $filter )" | grep -o 'pid=[0-9]*' | cut -d= -f2 | sort | uniq -c \
        | awk '{ print $2, $1 }'
}

# process_json NAME PID...: {"pid": [rss_kb, cpu_ticks], ...} for a group of processes.
process_json() {
    local name=$1 pid first=1
    shift
    printf '"%s": {' "$name"
    for pid in "$@"; do
        ((first)) || printf ', '
        first=0
        printf '"%s": [%s, %s]' "$pid" "$(rss_kb "$pid" 2>/dev/null || echo 0)" "$(cpu_ticks "$pid")"
    done
    printf '}'
}

# snapshot FILE: what every process of the run uses now.
snapshot() {
    local loaders
    mapfile -t loaders < <(load_pids)
    {
        printf '{"t": %s, ' "$(now)"
        process_json servers "${servers[@]}"
        printf ', '
        process_json redis "${redis_pids[@]}"
        printf ', '
        process_json nginx ${nginx_pid:+"$nginx_pid"} "${nginx_workers_pids[@]}"
        printf ', '
        process_json load "${loaders[@]}"
        printf '}\n'
    } >"$1"
}

load_pid=""
load_pids() {  # the load generator and its shard processes
    [[ -n $load_pid ]] || return 0
    gone "$load_pid" && return 0
    echo "$load_pid"
    children_of "$load_pid"
}

# measure STACK MODE
measure() {
    local stack=$1 mode=$2 run="$1-$2" target i loaded
    local dir=$work/$run
    mkdir -p "$dir"
    log "== $run: starting the servers"
    start_stack "$stack" "$run"
    if [[ $mode == nginx ]]; then
        start_nginx "$run"
        if [[ $stack == tunegate ]]; then target="ws://127.0.0.1:$nginx_port/"; else target="http://127.0.0.1:$nginx_port"; fi
    else
        target=""
        for i in "${upstreams[@]}"; do
            if [[ $stack == tunegate ]]; then target+="${target:+,}ws://$i/"; else target+="${target:+,}http://$i"; fi
        done
    fi
    printf '%s\n' "${servers[@]}" >"$dir/servers"
    printf '%s\n' "${server_hosts[@]}" >"$dir/server-hosts"
    printf '%s\n' "${upstreams[@]}" >"$dir/upstreams"
    [[ -f $dir/nginx/nginx.conf ]] && cp "$dir/nginx/nginx.conf" "$dir/nginx.conf"
    sleep 1
    snapshot "$dir/before.json"

    local plan=(-n "$conns" --rooms "$rooms" --hold "$hold" --publish-rate "$rate"
        --publish-seconds "$seconds" --payload "$payload" --source "$source_base"
        --per-source "$per_source" --processes "$load_procs" --max-inflight 1000
        --connect-rate 20000 --connect-timeout 120 --max-time $((hold + seconds + 300)) --json)
    local log_file=$dir/load.log prefix
    : >"$log_file"
    if [[ $stack == tunegate ]]; then
        prefix="tunegate load"
        "$bin" load "$target" "${plan[@]}" >"$dir/load.json" 2>"$log_file" &
    else
        prefix="peer_socketio_load"
        node bench/peer_socketio_load.js "$target" "${plan[@]}" >"$dir/load.json" 2>"$log_file" &
    fi
    load_pid=$!
    pids+=("$load_pid")
    log "$run: $conns connections to $target, rooms $rooms, hold $hold s, $rate msg/s for $seconds s"
    in_phase() { grep -qE "^$prefix: ($1):" "$log_file" || gone "$load_pid"; }

    # Late in the hold: memory, connections per process, then Redis counters reset.
    loaded=1
    poll $((hold + 300)) in_phase 'hold|publish|drain|finish' || true
    if gone "$load_pid"; then
        loaded=0
        log "$run: the load ended before its hold: $(tail -n 5 "$log_file")"
    else
        grep -qE "^$prefix: (publish|drain|finish):" "$log_file" \
            && log "$run: the hold was over before it was seen (the readings below are late)"
        # The hold's first progress line comes up to a second after it began: 4 s before its
        # end leaves the 2 s reading below clear of the first message.
        sleep $((hold - 4))
        snapshot "$dir/held.json"
        conns_by_pid >"$dir/conns-by-pid"
        for i in "${redis_ports[@]}"; do redis-cli -p "$i" config resetstat >/dev/null; done
        commandstats_line >"$dir/commandstats"
        sleep 2
        commandstats_line >>"$dir/commandstats"  # 2 s with no message: what Redis is sent anyway
        poll $((seconds + 60)) in_phase 'publish|drain|finish' || true
        snapshot "$dir/publish-start.json"
        # Until the load ends: the counters four times a second (the report keeps the last
        # reading before the teardown), CPU once the publish phase and the drain are over (the
        # load client's drain line, or the teardown: SUNSUBSCRIBE calls, rooms emptying).
        local t0=$SECONDS over=0 teardown loaders
        teardown=$(unsubscribes)
        mapfile -t loaders < <(load_pids)
        while ! gone "$load_pid" && ((SECONDS - t0 < seconds + 120)); do
            commandstats_line >>"$dir/commandstats"
            # The load processes' CPU: "TIME TICKS ALIVE ALL" (they may be gone by the end).
            printf '%s %s %s %s\n' "$(now)" "$(cpu_ticks "${loaders[@]}")" \
                "$(for i in "${loaders[@]}"; do gone "$i" || echo "$i"; done | wc -l)" "${#loaders[@]}" \
                >>"$dir/load-cpu"
            if ((!over)) && { in_phase 'drain|finish' || (($(unsubscribes) > teardown)); }; then
                snapshot "$dir/publish-end.json"
                over=1
            fi
            sleep 0.25
        done
        ((over)) || snapshot "$dir/publish-end.json"
    fi
    poll 60 gone "$load_pid" || log "$run: the load generator outlived its --max-time; stopping it"
    stop_pid "$load_pid" 5
    wait "$load_pid" 2>/dev/null || true
    load_pid=""
    tail -n 7 "$log_file" >&2
    echo "$loaded" >"$dir/loaded"
    stop_nginx
    stop_servers
}

echo "$conns $rooms $rate $seconds $hold $payload $load_procs $per_source $ping_interval $ping_timeout" >"$work/plan"
runs=()
for mode in $modes; do
    for stack in $stacks; do
        measure "$stack" "$mode"
        runs+=("$stack-$mode")
    done
done

mkdir -p "$(dirname "$out")"
node_version=$(node --version)
python3 bench/fleet_report.py --work "$work" --out "$out" --runs "${runs[*]}" \
    --invocation "$invocation" --conns "$conns" --rooms "$rooms" --rate "$rate" \
    --seconds "$seconds" --hold "$hold" --payload "$payload" --load-processes "$load_procs" \
    --per-source "$per_source" --ping "$ping_interval/$ping_timeout" \
    --nginx-version "$("$nginx" -v 2>&1 | sed 's/.*nginx\///')" --nginx-workers "$nginx_workers" \
    --nginx-nofile "$nginx_nofile" --redis-version "$(redis-server --version | sed 's/.* v=\([^ ]*\).*/\1/')" \
    --tunegate "$("$bin" --version)" --node "$node_version" \
    --socketio "$(node -p 'require(process.env.NODE_PATH + "/socket.io/package.json").version')" \
    --adapter "$(node -p 'require(process.env.NODE_PATH + "/@socket.io/redis-adapter/package.json").version')" \
    --redis-client "$(node -p 'require(process.env.NODE_PATH + "/redis/package.json").version')"
if [[ ${BENCH_PUBLISH:-0} == 1 ]]; then cp "$out.svg" docs/fleet.svg; log "copied the plot to docs/fleet.svg"; fi

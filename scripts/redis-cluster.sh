#!/usr/bin/env bash
# scripts/redis-cluster.sh: a throwaway Redis 7 Cluster on loopback, for the tests and benchmarks
# of tunegate's cross-host bus: 3 masters and 3 replicas (or as many as asked), each a
# redis-server of Debian's package bound to 127.0.0.1, its files in one directory.
#
#   scripts/redis-cluster.sh start DIR [BASE_PORT] [MASTERS]   start, create the cluster, wait
#                                                              until every node says it is ok;
#                                                              prints the ports, one per line
#   scripts/redis-cluster.sh stop DIR                          stop every node started in DIR
#                                                              and remove DIR
#   scripts/redis-cluster.sh restart DIR                       stop every node of the cluster in
#                                                              DIR, start them again (they keep
#                                                              their cluster configuration, not
#                                                              their data), wait until it is ok
#   scripts/redis-cluster.sh standalone DIR PORT               one plain (non-cluster) server
#
# BASE_PORT defaults to 17000, MASTERS to 3 (each with one replica). Every wait is bounded, and
# a failed start stops what it started. Nothing listens beyond 127.0.0.1.
#
# At start, two variables make the cluster closer to a production one (restart keeps them):
#   REDIS_TLS_DIR   TLS only, on every port, cluster bus and replication included: the
#                   directory holds ca.crt, redis.crt (valid for 127.0.0.1) and redis.key
#   REDIS_PASSWORD  AUTH required (requirepass; masterauth for the replicas)
set -euo pipefail

die() { printf 'redis-cluster: error: %s\n' "$*" >&2; exit 1; }

# poll SECONDS CMD...: CMD every 0.1 s until it succeeds or SECONDS have passed.
poll() {
    local seconds=$1 i
    shift
    for ((i = 0; i < seconds * 10; i++)); do
        "$@" && return 0
        sleep 0.1
    done
    "$@"
}

need() {
    if ! command -v redis-server >/dev/null || ! command -v redis-cli >/dev/null; then
        die "redis-server and redis-cli are needed (apt-get install redis-server redis-tools; scripts/deps.sh does)"
    fi
}

# The TLS and password options of the cluster in DIR, as `start` saved them.
load_options() {
    tls_dir="" password=""
    if [[ -f $1/options ]]; then
        tls_dir=$(sed -n 1p "$1/options")
        password=$(sed -n 2p "$1/options")
    fi
}

# cli PORT ARGS...: redis-cli to a node, with the cluster's TLS and password.
cli() {
    local port=$1 extra=()
    shift
    [[ -n $tls_dir ]] && extra+=(--tls --cacert "$tls_dir/ca.crt")
    [[ -n $password ]] && extra+=(-a "$password" --no-auth-warning)
    redis-cli -p "$port" "${extra[@]}" "$@"
}

# start_node DIR PORT [cluster]: one redis-server, daemonized, its pid in DIR/PORT.pid.
start_node() {
    local dir=$1 port=$2 cluster=${3:-} args
    mkdir -p "$dir/$port"
    args=(--bind 127.0.0.1 --protected-mode no --daemonize yes
        --dir "$dir/$port" --pidfile "$dir/$port.pid" --logfile "$dir/$port.log"
        --save "" --appendonly no)
    if [[ -n $tls_dir ]]; then
        args+=(--port 0 --tls-port "$port" --tls-cluster yes --tls-replication yes
            --tls-cert-file "$tls_dir/redis.crt" --tls-key-file "$tls_dir/redis.key"
            --tls-ca-cert-file "$tls_dir/ca.crt" --tls-auth-clients no)
    else
        args+=(--port "$port")
    fi
    [[ -n $password ]] && args+=(--requirepass "$password" --masterauth "$password")
    if [[ -n $cluster ]]; then
        # Replicas sync at once (Redis 7 otherwise waits 5 s for more replicas before a
        # diskless sync): a replica that never synced cannot take over from its master.
        args+=(--cluster-enabled yes --cluster-config-file nodes.conf --cluster-node-timeout 2000
            --repl-diskless-sync-delay 0)
    fi
    redis-server "${args[@]}"
    responds() { cli "$1" ping 2>/dev/null | grep -qx PONG; }
    poll 10 responds "$port" || die "redis-server on port $port did not answer (log: $dir/$port.log)"
}

# cluster_ok PORT...: every node says the cluster is ok, and every replica has synced with its
# master (only a synced replica can fail over).
cluster_ok() {
    local port
    for port in "$@"; do
        cli "$port" cluster info 2>/dev/null | grep -q '^cluster_state:ok' || return 1
        if cli "$port" info replication 2>/dev/null | grep -q '^role:slave'; then
            cli "$port" info replication | grep -q '^master_link_status:up' || return 1
        fi
    done
}

cmd_start() {
    local dir=${1:?start DIR [BASE_PORT] [MASTERS]} base=${2:-17000} masters=${3:-3} ports=() i
    need
    [[ ! -e $dir/ports ]] || die "$dir already holds a cluster (stop it first)"
    mkdir -p "$dir"
    tls_dir=${REDIS_TLS_DIR:-} password=${REDIS_PASSWORD:-}
    if [[ -n $tls_dir ]]; then
        local f
        for f in ca.crt redis.crt redis.key; do
            [[ -r $tls_dir/$f ]] || die "REDIS_TLS_DIR $tls_dir has no readable $f"
        done
    fi
    (umask 077 && printf '%s\n%s\n' "$tls_dir" "$password" >"$dir/options")
    trap 'cmd_stop "$dir" >/dev/null 2>&1 || true' ERR
    for ((i = 0; i < masters * 2; i++)); do
        start_node "$dir" $((base + i)) cluster
        ports+=($((base + i)))
    done
    printf '%s\n' "${ports[@]}" >"$dir/ports"
    cli "$base" --cluster create "${ports[@]/#/127.0.0.1:}" --cluster-replicas 1 --cluster-yes \
        >"$dir/create.log" 2>&1 || die "cluster create failed: $(tail -n 5 "$dir/create.log")"
    poll 30 cluster_ok "${ports[@]}" || die "the cluster is not ok after 30 s"
    trap - ERR
    printf '%s\n' "${ports[@]}"
}

cmd_standalone() {
    local dir=${1:?standalone DIR PORT} port=${2:?standalone DIR PORT}
    need
    mkdir -p "$dir"
    tls_dir="" password=""
    start_node "$dir" "$port"
    echo "$port" >>"$dir/ports"
}

# stop_nodes DIR: every node started in DIR, TERM then (after 5 s) KILL.
stop_nodes() {
    local dir=$1 pidfile pid
    for pidfile in "$dir"/*.pid; do
        [[ -f $pidfile ]] || continue
        pid=$(cat "$pidfile")
        rm -f "$pidfile"
        # A node killed by hand (a failover test) leaves its pid file; never signal whatever
        # process has that number now.
        [[ $(cat "/proc/$pid/comm" 2>/dev/null) == redis-server ]] || continue
        kill -TERM "$pid" 2>/dev/null || true
        gone() { ! kill -0 "$1" 2>/dev/null; }
        poll 5 gone "$pid" || kill -KILL "$pid" 2>/dev/null || true
    done
}

cmd_stop() {
    local dir=${1:?stop DIR}
    [[ -d $dir ]] || return 0
    stop_nodes "$dir"
    rm -rf "$dir"
}

cmd_restart() {
    local dir=${1:?restart DIR} ports port
    [[ -f $dir/ports ]] || die "$dir holds no cluster"
    mapfile -t ports <"$dir/ports"
    load_options "$dir"
    stop_nodes "$dir"
    for port in "${ports[@]}"; do
        start_node "$dir" "$port" cluster
    done
    poll 30 cluster_ok "${ports[@]}" || die "the cluster is not ok 30 s after its restart"
}

case ${1:-} in
start) shift; cmd_start "$@" ;;
stop) shift; cmd_stop "$@" ;;
restart) shift; cmd_restart "$@" ;;
standalone) shift; cmd_standalone "$@" ;;
*) sed -n '2,/^set/{/^set/d;s/^# \{0,1\}//;p}' "$0" >&2; exit 2 ;;
esac

# shellcheck shell=bash
# The variables below are the sourcing script's, so shellcheck cannot see them assigned here.
# shellcheck disable=SC2154
# Shell functions shared by the bench/ scripts (sourced, never run). The sourcing script sets
# `bench_name` (log prefix), `work` (its temp dir), `root` (the repo), `port`, `per_client`,
# `connect_timeout`, and the array `pids` (everything started, stopped by its cleanup trap);
# `client_prefix` (an array, e.g. `ip netns exec NS`) runs the clients somewhere else.

log() { printf '%s: %s\n' "${bench_name:-bench}" "$*" >&2; }
die() { log "error: $*"; exit 1; }

stop_pid() {  # stop_pid PID [SECONDS]: SIGTERM, then SIGKILL if it outlives the grace period
    local pid=$1 grace=${2:-10} i
    kill -0 "$pid" 2>/dev/null || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < grace * 10; i++)); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.1
    done
    log "pid $pid ignored SIGTERM for ${grace}s; killing it"
    kill -KILL "$pid" 2>/dev/null || true
}

kb_field() { awk -v k="$2:" '$1 == k { print $2; f = 1 } END { if (!f) print 0 }' "$1"; }
# status_field FILE KEY: one value from a client's status line; empty if the client has not
# written its file yet (never a failure: callers run under set -e and pipefail).
status_field() {
    [[ -f $1 ]] || return 0
    sed -n "s/.* $2=\([^ ]*\).*/\1/p; s/^$2=\([^ ]*\).*/\1/p" "$1" | head -n1 || true
}

# run_clients NAME COUNT FIRST_INDEX HOLD EXPECT_HELLO: starts ceil(COUNT/per_client) clients
# in the background; their ids go to client_pids, their status files to client_status.
run_clients() {
    local name=$1 count=$2 first=$3 hold=$4 hello=$5 i n
    client_pids=() client_status=()
    for ((i = 0; i * per_client < count; i++)); do
        n=$((count - i * per_client < per_client ? count - i * per_client : per_client))
        client_status+=("$work/$name.client$i.status")
        "${client_prefix[@]}" python3 "$root/bench/hold_idle.py" --port "$port" -n "$n" \
            --first-index $((first + i * per_client)) ${hello:+"$hello"} --hold "$hold" \
            --connect-timeout "$connect_timeout" --status "${client_status[-1]}" \
            2>>"$work/$name.clients.log" &
        client_pids+=($!)
        pids+=($!)
    done
}

# wait_clients PHASE TIMEOUT: until every client reports PHASE (or "done"); prints the open
# connections summed over clients. Returns 1 on timeout.
wait_clients() {
    local want=$1 timeout=$2 i f ph all open=0 v
    for ((i = 0; i < timeout * 5; i++)); do
        all=1 open=0
        for f in "${client_status[@]}"; do
            ph=$(status_field "$f" phase)
            [[ $ph == "$want" || $ph == "done" ]] || all=0
            v=$(status_field "$f" open)
            open=$((open + ${v:-0}))
        done
        ((all)) && { echo "$open"; return 0; }
        sleep 0.2
    done
    echo "$open"
    return 1
}

client_errors() { local f; for f in "${client_status[@]}"; do status_field "$f" errors; done | paste -sd' '; }

start_server() {  # start_server NAME CMD...: sets server_pid and port (from its stderr)
    local name=$1 i
    shift
    # The file exists before the server does: a sed racing the redirection below must not
    # fail (under set -e and pipefail that would end the run).
    : >"$work/$name.log"
    "$@" 2>>"$work/$name.log" &
    server_pid=$!
    pids+=("$server_pid")
    for ((i = 0; i < 100; i++)); do
        port=$(sed -n 's/.*listening on 127\.0\.0\.1:\([0-9]*\).*/\1/p' "$work/$name.log" | head -n1 || true)
        [[ -n $port ]] && return 0
        kill -0 "$server_pid" 2>/dev/null || { cat "$work/$name.log" >&2; die "$name exited before listening"; }
        sleep 0.1
    done
    cat "$work/$name.log" >&2
    die "$name did not print its listening address within 10 s"
}

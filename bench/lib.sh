# shellcheck shell=bash
# The variables below are the sourcing script's, so shellcheck cannot see them assigned here.
# shellcheck disable=SC2154
# Shell functions shared by the bench/ scripts (sourced, never run). The sourcing script sets
# `bench_name` (log prefix), `work` (its temp dir), `root` (the repo), `port`, `per_client`,
# `connect_timeout`, and the array `pids` (everything started, stopped by its cleanup trap);
# `client_prefix` (an array, e.g. `ip netns exec NS`) runs the clients somewhere else.

log() { printf '%s: %s\n' "${bench_name:-bench}" "$*" >&2; }
die() { log "error: $*"; exit 1; }

# node_packages DIR NAME@VERSION...: makes DIR/node_modules hold exactly these versions (npm
# install, bounded, only when one is missing or another version) and exports NODE_PATH to it.
node_packages() {
    local dir=$1
    shift
    if ! NODE_PATH=$dir/node_modules node -e '
        const want = process.argv.slice(1);
        for (const w of want) { const [n, v] = [w.slice(0, w.lastIndexOf("@")), w.slice(w.lastIndexOf("@") + 1)];
          const fs = require("fs"), p = require("path");
          const pj = JSON.parse(fs.readFileSync(p.join(process.env.NODE_PATH, n, "package.json")));
          if (pj.version !== v) process.exit(1); }' "$@" 2>/dev/null; then
        log "installing $* into $dir"
        mkdir -p "$dir"
        timeout 300 npm install --prefix "$dir" --save-exact --no-audit --no-fund \
            --loglevel=error "$@" >&2
    fi
    export NODE_PATH=$dir/node_modules
}

# poll SECONDS CMD...: runs CMD every 0.1 s until it succeeds (returns 0) or SECONDS have passed
# (returns 1). The bounded wait every script here uses. Bounded by the clock, not by a count of
# tries: a check that itself takes a second (a /metrics scrape while two cores carry a million
# connections) would otherwise stretch 10 s into minutes, and a reading meant for the start of
# a hold would be taken while the load was closing every connection.
poll() {
    local seconds=$1 deadline
    shift
    deadline=$((${EPOCHREALTIME/[.,]/} + seconds * 1000000))
    while ((${EPOCHREALTIME/[.,]/} < deadline)); do
        "$@" && return 0
        sleep 0.1
    done
    "$@"
}

gone() { ! kill -0 "$1" 2>/dev/null; }

# bench_work NAME: sets `work` (a new temp dir) and `pids` (empty), and on exit (INT and TERM
# exit too) stops every process in `pids` and removes `work`: the cleanup every bench that needs
# nothing more shares.
bench_work() {
    work=$(mktemp -d "${TMPDIR:-/tmp}/tunegate-$1.XXXXXX")
    pids=()
    trap stop_all EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
}
stop_all() {
    local pid
    for pid in "${pids[@]}"; do stop_pid "$pid" 5; done
    rm -rf "$work"
}

stop_pid() {  # stop_pid PID [SECONDS]: SIGTERM, then SIGKILL if it outlives the grace period
    local pid=$1 grace=${2:-10}
    gone "$pid" && return 0
    kill -TERM "$pid" 2>/dev/null || true
    poll "$grace" gone "$pid" && return 0
    log "pid $pid ignored SIGTERM for ${grace}s; killing it"
    kill -KILL "$pid" 2>/dev/null || true
}

# ---- a namespace with tunegate run in it (c100k.sh, many-connections.sh) ----------------------
# The sourcing script sets `ns`, `work`, `bin`, `port`; `start_daemon` sets `daemon_pid`,
# `sizing` and the array `worker_pids`.

# ns_work NAME: sets `work` (a new temp dir), `ns` (a namespace name), `pids` (empty) and
# `daemon_pid`, and on exit (INT and TERM exit too) stops everything and removes both; then
# makes the namespace with its loopback up.
ns_work() {
    work=$(mktemp -d "${TMPDIR:-/tmp}/tunegate-$1.XXXXXX")
    ns=tg$1-$$
    pids=()
    daemon_pid=""
    trap ns_cleanup EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
    ns_up
}

# ns_up: the namespace, with its loopback up; ns_cleanup removes it and everything started.
#
# BENCH_NS_EHASH=N: the namespace gets a TCP established-socket hash table of its own, N buckets
# (a power of two), instead of sharing the host's (sized at boot: 262,144 here, so a million
# connections with both ends on the host chain 7-8 sockets per bucket, and every segment's
# socket lookup walks them). Only a namespace created while the host-global
# net.ipv4.tcp_child_ehash_entries is set gets one: it is set for the instant `ip netns add`
# takes and put back at once (and by the cleanup trap, should that instant be interrupted).
ns_up() {
    if [[ -n ${BENCH_NS_EHASH:-} ]]; then
        local knob=/proc/sys/net/ipv4/tcp_child_ehash_entries own
        [[ $BENCH_NS_EHASH =~ ^[0-9]+$ ]] || die "BENCH_NS_EHASH must be a whole number"
        ehash_before=$(cat "$knob")
        echo "$BENCH_NS_EHASH" >"$knob"
        ip netns add "$ns" || { echo "$ehash_before" >"$knob"; die "ip netns add $ns failed"; }
        echo "$ehash_before" >"$knob"
        ehash_before=""
        own=$(ip netns exec "$ns" cat /proc/sys/net/ipv4/tcp_ehash_entries)
        [[ $own == "$BENCH_NS_EHASH" ]] \
            || die "namespace $ns has $own established-hash buckets, not $BENCH_NS_EHASH (negative: the host's, shared)"
        log "namespace $ns: its own TCP established hash, $own buckets (the host's: $(cat /proc/sys/net/ipv4/tcp_ehash_entries); tcp_child_ehash_entries back to $(cat "$knob"))"
    else
        ip netns add "$ns"
    fi
    ip -n "$ns" link set lo up
}

ns_cleanup() {
    local pid
    if [[ -n ${ehash_before:-} ]]; then
        echo "$ehash_before" >/proc/sys/net/ipv4/tcp_child_ehash_entries
    fi
    for pid in "${pids[@]}"; do stop_pid "$pid" 5; done
    [[ -n ${daemon_pid:-} ]] && stop_pid "$daemon_pid" 20
    ip netns del "$ns" 2>/dev/null || true
    rm -rf "$work"
}

in_ns() { ip netns exec "$ns" "$@"; }

# metric NAME: the whole server's value, summed over label sets; -1 when /metrics gave no answer
# in 5 tries of 10 s each (a server whose two cores are saturated can take seconds: a silent 0
# once made a heartbeat count negative).
metric() {
    local body
    for _ in 1 2 3 4 5; do
        if body=$(in_ns curl -sf -m 10 --noproxy '*' "http://127.0.0.1:$port/metrics"); then
            awk -v m="$1" 'index($1, m) == 1 && (length($1) == length(m) || substr($1, length(m) + 1, 1) == "{") { s += $2 } END { print s + 0 }' <<<"$body"
            return
        fi
        sleep 1
    done
    log "no answer from /metrics for $1 (5 tries)"
    echo -1
}

# status_json EXPR: a Python expression over the daemon's status file (`d`).
status_json() { python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); print(eval(sys.argv[2]))' "$work/status.json" "$1"; }

daemon_ready() {
    gone "$daemon_pid" && { cat "$work/daemon.log" >&2; die "tunegate run exited"; }
    [[ -f $work/status.json ]] && [[ $(status_json 'd["ready"]') == True ]]
}

# start_daemon PROFILE SERVER_YAML: tunegate run in the namespace with the profile and these
# lines under `server:`, until ready (60 s at most).
start_daemon() {
    cat >"$work/tunegate.yaml" <<EOF
profile: $1
listen: 127.0.0.1:$port
state_dir: $work/state
status_file: $work/status.json
server:
$2
drift:
  interval_s: 0
saturation:
  interval_s: ${BENCH_SATURATION_S:-5}
EOF
    # Not through in_ns: a backgrounded function is a subshell, and $! must be the daemon.
    ip netns exec "$ns" "$bin" run --config "$work/tunegate.yaml" 2>"$work/daemon.log" &
    daemon_pid=$!
    poll 60 daemon_ready || { cat "$work/daemon.log" >&2; die "not ready within 60 s"; }
    sizing=$(status_json 'd["sizing"]["explanation"]')
    # shellcheck disable=SC2034  # for the sourcing script
    mapfile -t worker_pids < <(status_json '"\n".join(str(w["pid"]) for w in d["workers"])')
    log "sizing: $sizing"
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
            ${client_args[@]+"${client_args[@]}"} 2>>"$work/$name.clients.log" &
        client_pids+=($!)
        pids+=($!)
    done
}

# clients_at PHASE: every client reports PHASE (or "done"); sets clients_open to the open
# connections summed over clients.
clients_at() {
    local f ph v all=0
    clients_open=0
    for f in "${client_status[@]}"; do
        ph=$(status_field "$f" phase)
        [[ $ph == "$1" || $ph == "done" ]] || all=1
        v=$(status_field "$f" open)
        clients_open=$((clients_open + ${v:-0}))
    done
    return "$all"
}

# wait_clients PHASE TIMEOUT: until every client reports PHASE (or "done"); prints the open
# connections summed over clients. Returns 1 on timeout.
wait_clients() {
    local ok=0
    poll "$2" clients_at "$1" || ok=1
    echo "$clients_open"
    return "$ok"
}

client_errors() { local f; for f in "${client_status[@]}"; do status_field "$f" errors; done | paste -sd' '; }

start_server() {  # start_server NAME CMD...: sets server_pid and port (from its stderr)
    local name=$1
    shift
    # The file exists before the server does: a sed racing the redirection below must not
    # fail (under set -e and pipefail that would end the run).
    : >"$work/$name.log"
    "$@" 2>>"$work/$name.log" &
    server_pid=$!
    pids+=("$server_pid")
    poll 10 server_listening "$name" && return 0
    cat "$work/$name.log" >&2
    die "$name did not print its listening address within 10 s"
}

server_listening() {  # server_listening NAME: sets port once the server's log names it
    port=$(sed -n 's/.*listening on 127\.0\.0\.1:\([0-9]*\).*/\1/p' "$work/$1.log" | head -n1 || true)
    [[ -n $port ]] && return 0
    gone "$server_pid" && { cat "$work/$1.log" >&2; die "$1 exited before listening"; }
    return 1
}

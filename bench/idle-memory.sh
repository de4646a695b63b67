#!/usr/bin/env bash
# User-space memory that `tunegate serve` spends per idle WebSocket connection, next to two
# peers measured the same way in the same run: a Node `ws` echo server and a Python
# `websockets` server that only holds connections.
#
# For each server: start it on 127.0.0.1 (port 0, address parsed from its stderr), warm it up,
# read its memory, open N idle WebSocket connections with bench/hold_idle.py, wait until all
# are open and the server is quiet, read its memory again, verify from the server's side that
# it really holds N connections, then tear everything down. Reported: (RSS after - RSS before)
# / N, and for information the kernel's Slab delta / N.
# Results: stdout, bench/results/idle-memory.md and bench/results/idle-memory.json.
#
# Environment (all optional):
#   TUNEGATE_BIN       binary to measure (default target/release/tunegate; build it first)
#   TUNEGATE_SERVE_ARGS  more `serve` flags, e.g. "--bus redis://127.0.0.1:7000" (default none;
#                      split on spaces)
#   BENCH_OUT          results path without extension (default bench/results/idle-memory)
#   TUNEGATE_THREADS   `serve --threads` (default 1: one event loop, the per-connection cost
#                      with no per-thread overhead mixed in)
#   BENCH_CONNS        idle connections per server (default 10000)
#   BENCH_CLIENT_ARGS  more bench/hold_idle.py flags, e.g. "--offer-deflate" (with
#                      TUNEGATE_SERVE_ARGS="--deflate on": every connection agrees to it)
#   BENCH_WARMUP       connections opened and closed before the baseline (default 100)
#   BENCH_PEERS        which peers to run, space-separated from "node python" (default both;
#                      empty runs tunegate alone)
#   BENCH_CONNECT_TIMEOUT  seconds to get all N connections open (default 180)
#   BENCH_QUIET_TIMEOUT    seconds to wait for a server to go quiet (default 60)
#   BENCH_CACHE        where the peers' packages go (default ~/.cache/tunegate), never the repo
#   BENCH_WS_VERSION / BENCH_WEBSOCKETS_VERSION  peer library versions (pinned defaults below)
#
# Only loopback is used: servers listen on 127.0.0.1, clients bind 127.0.0.2, 127.0.0.3, ...
# Every wait has a timeout and every process started here is ended on exit (trap), by its id.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
bench_name=idle-memory
client_prefix=()
# shellcheck source=bench/lib.sh
source bench/lib.sh

bin=${TUNEGATE_BIN:-target/release/tunegate}
threads=${TUNEGATE_THREADS:-1}
read -ra serve_args <<<"${TUNEGATE_SERVE_ARGS:-}"
read -ra client_args <<<"${BENCH_CLIENT_ARGS:-}"
out=${BENCH_OUT:-bench/results/idle-memory}
conns=${BENCH_CONNS:-10000}
warmup=${BENCH_WARMUP:-100}
peers=${BENCH_PEERS-node python}
connect_timeout=${BENCH_CONNECT_TIMEOUT:-180}
quiet_timeout=${BENCH_QUIET_TIMEOUT:-60}
cache=${BENCH_CACHE:-$HOME/.cache/tunegate}
ws_version=${BENCH_WS_VERSION:-8.23.0}
websockets_version=${BENCH_WEBSOCKETS_VERSION:-17.4}
# One client process holds at most this many connections: its own descriptors count against
# the same RLIMIT_NOFILE (hard 20000 here, not raisable), so large N is split over clients.
per_client=10000
# A server is "quiet" once its CPU time and RSS have not moved for this many 1 s samples: the
# accept/handshake work is over and nothing (timers, GC, lazy frees) is still changing memory.
quiet_samples=3
# Ping interval far beyond the run, so no heartbeat traffic touches the idle connections.
ping_interval_ms=600000

[[ -x $bin ]] || die "no tunegate binary at $bin (cargo build --release, or set TUNEGATE_BIN)"
bin=$(cd "$(dirname "$bin")" && pwd)/$(basename "$bin")
[[ $conns =~ ^[0-9]+$ && $warmup =~ ^[0-9]+$ && $threads =~ ^[0-9]+$ ]] \
    || die "BENCH_CONNS, BENCH_WARMUP and TUNEGATE_THREADS must be whole numbers"
command -v python3 >/dev/null || die "python3 is needed (the client is bench/hold_idle.py)"
command -v curl >/dev/null || die "curl is needed (tunegate's /metrics is the server-side count)"
command -v ss >/dev/null || die "ss (iproute2) is needed (kernel-side count of held sockets)"

# Servers inherit this; each server holds N sockets in one process, and the hard limit is
# what it is (no CAP_SYS_RESOURCE here), so refuse an N that cannot fit rather than measure
# a server that is shedding connections.
ulimit -n "$(ulimit -Hn)"
nofile=$(ulimit -n)
((conns + 100 <= nofile)) || die "BENCH_CONNS=$conns does not fit in RLIMIT_NOFILE $nofile"

bench_work idle-memory

# ---- peers' packages: installed into a cache outside the repo, pinned, once ----------------
for peer in $peers; do
    case $peer in
    node)
        { command -v node && command -v npm; } >/dev/null || die "node and npm are needed"
        if [[ $(node -p "try{require('$cache/bench-node/node_modules/ws/package.json').version}catch(e){''}") != "$ws_version" ]]; then
            log "installing ws@$ws_version into $cache/bench-node"
            mkdir -p "$cache/bench-node"
            timeout 300 npm install --prefix "$cache/bench-node" --no-audit --no-fund \
                --loglevel=error "ws@$ws_version" >&2
        fi
        ;;
    python)
        if [[ $(PYTHONPATH=$cache/bench-py python3 -c 'import websockets; print(websockets.__version__)' 2>/dev/null) != "$websockets_version" ]]; then
            log "installing websockets==$websockets_version into $cache/bench-py"
            timeout 300 python3 -m pip install --quiet --disable-pip-version-check --upgrade \
                --target "$cache/bench-py" "websockets==$websockets_version" >&2
        fi
        ;;
    *) die "unknown peer '$peer' in BENCH_PEERS (known: node python)" ;;
    esac
done

# ---- readings ------------------------------------------------------------------------------
# VmRSS is the headline number (what `ps`/`top` show and what an operator budgets); RssAnon and
# smaps_rollup's Private_Dirty/Anonymous go into the JSON: they leave out file-backed pages
# (the binary, libnode, libpython) that could be shared or dropped.
mem_json() {
    local pid=$1
    printf '{"vmrss_kb": %d, "rss_anon_kb": %d, "private_dirty_kb": %d, "anonymous_kb": %d}' \
        "$(kb_field /proc/"$pid"/status VmRSS)" "$(kb_field /proc/"$pid"/status RssAnon)" \
        "$(kb_field /proc/"$pid"/smaps_rollup Private_Dirty)" \
        "$(kb_field /proc/"$pid"/smaps_rollup Anonymous)"
}
# Slab is system-wide: the other engineer's builds and tests move it too, so it is
# information, not the headline; it holds both ends of every loopback connection.
slab_kb() { kb_field /proc/meminfo Slab; }
cpu_ticks() { sed 's/.*) //' /proc/"$1"/stat | awk '{ print $12 + $13 }'; }  # utime + stime
socket_fds() { find /proc/"$1"/fd -lname 'socket:*' 2>/dev/null | wc -l; }
established() { ss -Htn state established "( sport = :$1 )" | wc -l; }
sockstat_tcp() { awk '$1 == "TCP:" { print }' /proc/net/sockstat; }

wait_quiet() {  # wait_quiet PID: 0 once quiet, 1 on timeout (the reading is taken anyway)
    local pid=$1 t r last="" same=0 i
    for ((i = 0; i < quiet_timeout; i++)); do
        kill -0 "$pid" 2>/dev/null || return 1
        t=$(cpu_ticks "$pid") r=$(kb_field /proc/"$pid"/status VmRSS)
        if [[ "$t $r" == "$last" ]]; then
            ((++same >= quiet_samples)) && return 0
        else
            same=0 last="$t $r"
        fi
        sleep 1
    done
    return 1
}


tunegate_metric() { curl -s -m 5 --noproxy '*' "http://127.0.0.1:$port/metrics" | awk -v m="$1" '$1 == m { print $2 }'; }

# ---- one measurement -----------------------------------------------------------------------
# measure NAME LABEL SLOT EXPECT_HELLO CMD...: appends one JSON line to $work/rows.jsonl.
# SLOT keeps each run's client source addresses apart from the previous runs' (ports on
# 127.0.0.x are then never reused across servers, even if some socket lingered).
measure() {
    local name=$1 label=$2 slot=$3 hello=$4
    shift 4
    local problems=() quiet=true open warm_open metric_ws="null" metric_conn="null" rc=0
    log "== $label: starting"
    start_server "$name" "$@"
    local base=$((slot * 200000))

    # Warm-up before the baseline: the first connections pay for one-off allocations (the
    # event loop's buffers, the connection table's first growth, the allocator's arenas,
    # lazily bound library code, V8's/CPython's first compilation of the handler paths). They
    # belong to "a server that has served", not to each idle connection, so they are in the
    # baseline. The cost is a small bias the other way: memory the warm-up freed but the
    # allocator kept can be reused by the measured connections, at most WARMUP/N (1% by
    # default) of the result.
    if ((warmup > 0)); then
        run_clients "$name-warmup" "$warmup" "$base" 0 "$hello"
        warm_open=$(wait_clients "done" 60) || problems+=("warm-up clients did not finish in 60 s")
        ((warm_open == warmup)) || problems+=("warm-up: $warm_open of $warmup connections opened ($(client_errors))")
        for pid in "${client_pids[@]}"; do wait "$pid" || true; done
    fi
    wait_quiet "$server_pid" || { quiet=false; problems+=("not quiet after warm-up within ${quiet_timeout}s"); }
    local sockets_before established_before slab_before mem_before sockstat_before
    sockets_before=$(socket_fds "$server_pid")
    established_before=$(established "$port")
    slab_before=$(slab_kb)
    sockstat_before=$(sockstat_tcp)
    mem_before=$(mem_json "$server_pid")

    # The clients hold long enough for the waits below and exit by themselves after that.
    local hold=$((quiet_timeout + 120)) t0=$SECONDS
    run_clients "$name" "$conns" $((base + 100000)) "$hold" "$hello"
    open=$(wait_clients holding "$connect_timeout") || problems+=("clients still connecting after ${connect_timeout}s")
    local connect_secs=$((SECONDS - t0))
    ((open == conns)) || problems+=("$open of $conns connections opened ($(client_errors))")
    log "$label: $open connections open in ${connect_secs}s; waiting for the server to go quiet"
    wait_quiet "$server_pid" || { quiet=false; problems+=("not quiet with $conns connections within ${quiet_timeout}s"); }
    kill -0 "$server_pid" 2>/dev/null || die "$label exited while holding connections: $(cat "$work/$name.log")"

    local slab_after mem_after sockets_after established_after sockstat_after still_open
    mem_after=$(mem_json "$server_pid")
    slab_after=$(slab_kb)
    sockstat_after=$(sockstat_tcp)
    # Server-side counts, after the memory readings (listing 10k descriptors and answering
    # /metrics allocate too): descriptors the server process holds, and what the kernel
    # sees established on the server's port.
    sockets_after=$(socket_fds "$server_pid")
    established_after=$(established "$port")
    if [[ $name == tunegate ]]; then
        metric_ws=$(tunegate_metric tunegate_websockets_open)
        metric_conn=$(tunegate_metric tunegate_connections_open)
        [[ $metric_ws == "$conns" ]] || problems+=("tunegate_websockets_open is ${metric_ws:-unreadable}, not $conns")
    fi
    local held=$((sockets_after - sockets_before))
    ((held == conns)) || problems+=("server holds $held sockets more than at baseline, not $conns")
    # And from the clients' side: nothing was closed on them while they were measured.
    still_open=$(wait_clients holding 1) || true
    ((still_open == open)) || problems+=("connections closed during the measurement: $open -> $still_open ($(client_errors))")

    # Clients first (abortive close, no TIME_WAIT), then the server, whose exit code is noted.
    for pid in "${client_pids[@]}"; do stop_pid "$pid" 10; wait "$pid" 2>/dev/null || true; done
    stop_pid "$server_pid" 15
    wait "$server_pid" 2>/dev/null || rc=$?
    ((rc == 0)) || problems+=("exit code $rc after SIGTERM")

    local p probs_json=""
    for p in "${problems[@]}"; do
        log "$label: PROBLEM: $p"
        probs_json+="${probs_json:+, }\"${p//\"/\'}\""
    done
    {
        printf '{"name": "%s", "server": "%s", "target": %d, "opened": %d, "held_fds": %d, ' \
            "$name" "$label" "$conns" "$open" "$held"
        printf '"established_on_port": %d, "metrics_websockets_open": %s, "metrics_connections_open": %s, ' \
            "$((established_after - established_before))" "${metric_ws:-null}" "${metric_conn:-null}"
        printf '"connect_seconds": %d, "quiet": %s, "exit_code": %d, "before": %s, "after": %s, ' \
            "$connect_secs" "$quiet" "$rc" "$mem_before" "$mem_after"
        printf '"slab_before_kb": %d, "slab_after_kb": %d, "sockstat_before": "%s", "sockstat_after": "%s", "problems": [%s]}\n' \
            "$slab_before" "$slab_after" "$sockstat_before" "$sockstat_after" "$probs_json"
    } >>"$work/rows.jsonl"
    log "$label: done"
}

: >"$work/rows.jsonl"
tg_version=$("$bin" --version 2>/dev/null || echo tunegate)
measure tunegate "tunegate serve (--threads $threads${serve_args[*]:+ ${serve_args[*]}})" 0 --expect-hello \
    "$bin" serve --listen 127.0.0.1:0 --threads "$threads" --ping-interval "$ping_interval_ms" \
    "${serve_args[@]}"
slot=1
for peer in $peers; do
    case $peer in
    node)
        measure node "node ws $ws_version echo ($(node --version))" $slot "" \
            env NODE_PATH="$cache/bench-node/node_modules" node "$root/bench/peer_ws_echo.js" 0
        ;;
    python)
        measure python "python websockets $websockets_version ($(python3 -c 'import sys; print(sys.version.split()[0])'))" $slot "" \
            env PYTHONPATH="$cache/bench-py" python3 "$root/bench/peer_websockets.py" 0
        ;;
    esac
    slot=$((slot + 1))
done

# ---- report --------------------------------------------------------------------------------
mkdir -p "$(dirname "$out")"
python3 - "$work/rows.jsonl" "$tg_version" "$threads" "$warmup" "$out" <<'PY'
import datetime, json, os, platform, sys

rows_file, tg_version, threads, warmup, out = sys.argv[1:6]
rows = [json.loads(l) for l in open(rows_file) if l.strip()]

def mib(kb):
    return "%.1f MiB" % (kb / 1024)

lines = [
    "| Server | Connections | RSS before | RSS after | Bytes per connection | Kernel slab Δ per connection |",
    "|:---|---:|---:|---:|---:|---:|",
]
for r in rows:
    # Per connection the server really held (its socket descriptors over the baseline); that
    # is N in a clean run, and a partial run (flagged below) still gives a meaningful figure.
    n = r["held_fds"] if r["held_fds"] > 0 else r["target"]
    r["per_conn_divisor"] = n
    r["rss_bytes_per_conn"] = round((r["after"]["vmrss_kb"] - r["before"]["vmrss_kb"]) * 1024 / n)
    for k in ("rss_anon_kb", "private_dirty_kb", "anonymous_kb"):
        r[k.replace("_kb", "") + "_bytes_per_conn"] = round((r["after"][k] - r["before"][k]) * 1024 / n)
    r["slab_bytes_per_conn"] = round((r["slab_after_kb"] - r["slab_before_kb"]) * 1024 / n)
    held = r["held_fds"] if r["held_fds"] == n else "%d of %d" % (r["held_fds"], n)
    lines.append("| %s | %s | %s | %s | %s | %s |" % (
        r["server"], held, mib(r["before"]["vmrss_kb"]), mib(r["after"]["vmrss_kb"]),
        "{:,}".format(r["rss_bytes_per_conn"]) + ("" if not r["problems"] else " (!)"),
        "{:,}".format(r["slab_bytes_per_conn"])))
notes = [
    "",
    "Bytes per connection: (VmRSS with the connections open - VmRSS before) / connections held, after a "
    "warm-up of %s connections opened and closed. Kernel slab Δ: system-wide /proc/meminfo Slab, "
    "so it counts both ends of each loopback connection (client and server socket) and anything "
    "else the machine did meanwhile; for information only." % warmup,
]
problems = [(r["server"], p) for r in rows for p in r["problems"]]
if problems:
    notes.append("")
    notes += ["(!) %s: %s" % sp for sp in problems]
md = "\n".join(lines + notes) + "\n"
print(md, end="")
open(out + ".md", "w").write(md)
json.dump({
    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    "tunegate": tg_version, "threads": int(threads), "warmup": int(warmup),
    "kernel": platform.release(), "cpus": os.cpu_count(),
    "results": rows,
}, open(out + ".json", "w"), indent=2)
sys.exit(1 if problems else 0)
PY

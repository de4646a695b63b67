#!/usr/bin/env bash
# tunegate serve, a Node `ws` relay and a Socket.IO 4 server, side by side in the same run on
# the same machine: each holds BENCH_CONNS connections in one process (a single process's
# descriptor limit is 20,000 here) and goes through the same message phase.
#
# For each server: start it on 127.0.0.1 (one process: tunegate with --threads 1, like Node's
# one thread), read its baseline RSS, run the load (tunegate load for tunegate and ws; the
# Socket.IO client bench/peer_socketio_load.js for Socket.IO), sampling every 0.25 s what `ss`
# sees established on the server's port and the server's RSS and CPU. Same plan for all: rooms
# of BENCH_ROOMS, a hold, BENCH_RATE room messages/s for BENCH_SECONDS, source addresses
# 127.0.0.2, .3, ... (5,000 each), Socket.IO's default heartbeats (25 s / 20 s).
# Results: stdout, bench/results/side-by-side.{md,json}, and the memory plot
# bench/results/memory.svg (bench/plot_memory.py), copied to docs/memory.svg with BENCH_PUBLISH=1.
#
# Environment (all optional):
#   TUNEGATE_BIN   binary (default target/release/tunegate; build it first)
#   BENCH_CONNS    connections per server (default 19000)
#   BENCH_ROOMS    room size (default 10)
#   BENCH_RATE     room messages per second (default 5000)
#   BENCH_SECONDS  message phase length (default 10)
#   BENCH_HOLD     seconds held after all joined, before messages (default 5)
#   BENCH_SERVERS  which to run (default "tunegate ws socketio"; "tunegate ws" with BENCH_DEFLATE)
#   BENCH_DEFLATE  1: permessage-deflate on: `serve --deflate on`, the ws relay with
#                  perMessageDeflate (its default server settings), `tunegate load --deflate`
#   BENCH_PAYLOAD  bytes of padding per message (default 64; messages under 256 bytes are not
#                  compressed, so use more with BENCH_DEFLATE)
#   BENCH_CACHE    where the Node packages go (default ~/.cache/tunegate), never the repo
#   BENCH_PUBLISH  1: also copy the plot to docs/memory.svg (for BENCHMARKS.md)
#
# Only loopback is used. Every wait has a timeout; every process started here is stopped on
# exit (trap).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
bench_name=side-by-side
# shellcheck source=bench/lib.sh
source bench/lib.sh

bin=${TUNEGATE_BIN:-target/release/tunegate}
conns=${BENCH_CONNS:-19000}
rooms=${BENCH_ROOMS:-10}
rate=${BENCH_RATE:-5000}
seconds=${BENCH_SECONDS:-10}
hold=${BENCH_HOLD:-5}
deflate=${BENCH_DEFLATE:-0}
payload=${BENCH_PAYLOAD:-64}
if ((deflate)); then
    servers=${BENCH_SERVERS:-tunegate ws}
    [[ $servers != *socketio* ]] || die "BENCH_DEFLATE: the Socket.IO load client has no deflate mode"
    export PEER_DEFLATE=1
    serve_extra=(--deflate on)
    load_extra=(--deflate)
else
    servers=${BENCH_SERVERS:-tunegate ws socketio}
    serve_extra=()
    load_extra=()
fi
cache=${BENCH_CACHE:-$HOME/.cache/tunegate}
node_pkgs=(ws@8.23.0 socket.io@4.8.1 socket.io-client@4.8.1)
per_source=5000

[[ -x $bin ]] || die "no tunegate binary at $bin (cargo build --release, or set TUNEGATE_BIN)"
bin=$(cd "$(dirname "$bin")" && pwd)/$(basename "$bin")
for tool in node npm python3 ss; do command -v $tool >/dev/null || die "$tool is needed"; done
ulimit -n "$(ulimit -Hn)"
((conns + 200 <= $(ulimit -n))) || die "BENCH_CONNS=$conns does not fit in RLIMIT_NOFILE $(ulimit -n)"

# Node packages: pinned, installed once into the cache, never into the repo.
node_packages "$cache/bench-node" "${node_pkgs[@]}"

bench_work side

cpu_ticks() { sed 's/.*) //' /proc/"$1"/stat | awk '{ print $12 + $13 }'; }

# measure NAME LABEL LOADER CMD...: LOADER is "tunegate" or "socketio".
measure() {
    local name=$1 label=$2 loader=$3
    shift 3
    log "== $label"
    start_server "$name" "$@"
    sleep 1
    local rss0 load_pid
    rss0=$(kb_field /proc/"$server_pid"/status VmRSS)
    local plan=(-n "$conns" --rooms "$rooms" --hold "$hold" --publish-rate "$rate"
        --publish-seconds "$seconds" --per-source "$per_source" --max-inflight 1000
        --connect-rate 30000 --max-time 600 --json --payload "$payload")
    if [[ $loader == tunegate ]]; then
        "$bin" load "ws://127.0.0.1:$port/" "${plan[@]}" ${load_extra[@]+"${load_extra[@]}"} \
            >"$work/$name.json" 2>"$work/$name.load.log" &
    else
        node "$root/bench/peer_socketio_load.js" "http://127.0.0.1:$port" "${plan[@]}" \
            >"$work/$name.json" 2>"$work/$name.load.log" &
    fi
    load_pid=$!
    pids+=("$load_pid")
    : >"$work/$name.samples"
    local t0=$SECONDS phase est
    while kill -0 "$load_pid" 2>/dev/null && ((SECONDS - t0 < 900)); do
        phase=$({ grep -ao ': [a-z]*: open' "$work/$name.load.log" || true; } | tail -n 1 | cut -d' ' -f2 | tr -d :)
        est=$(ss -Htn state established "( sport = :$port )" | wc -l)
        printf '%s %s %s %s %s\n' "$(date +%s.%N)" "$est" \
            "$(kb_field /proc/"$server_pid"/status VmRSS)" "$(cpu_ticks "$server_pid")" "${phase:-connect}" \
            >>"$work/$name.samples"
        sleep 0.25
    done
    wait "$load_pid" || true
    tail -n 6 "$work/$name.load.log" >&2
    stop_pid "$server_pid" 15
    python3 - "$name" "$label" "$conns" "$rss0" "$work/$name.samples" "$work/$name.json" "$work/$name.csv" \
        >>"$work/rows.jsonl" <<'PY'
import json, os, sys
name, label, conns, rss0, samples, result, csv = sys.argv[1:]
conns, rss0, hz = int(conns), int(rss0), os.sysconf("SC_CLK_TCK")
rows = [l.split() for l in open(samples) if l.strip()]
rows = [(float(t), int(e), int(r), int(c), p) for t, e, r, c, p in rows]
try:
    r = json.load(open(result))
except Exception as e:
    r = {"ok": False, "problems": ["no result: %s" % e]}
# Memory holding the connections: the last reading before the message phase.
before_msgs = [x for x in rows if x[4] not in ("publish", "drain", "finish")] or rows
held = max(x[1] for x in rows) if rows else 0
rss_held = before_msgs[-1][2] if before_msgs else rss0
pub = [x for x in rows if x[4] == "publish"]
cpu = None
if len(pub) >= 2:
    cpu = (pub[-1][3] - pub[0][3]) / hz / (pub[-1][0] - pub[0][0])
with open(csv, "w") as f:
    f.write("%d,%d\n" % (0, rss0))
    for x in rows:
        if x[4] in ("connect", "join", "verify", "hold"):
            f.write("%d,%d\n" % (x[1], x[2]))
lat = r.get("latency", {})
print(json.dumps({
    "name": name, "server": label, "connections": conns, "held": held,
    "opened": r.get("opened"), "connect_seconds": r.get("connect_seconds"),
    "connects_per_second": r.get("connects_per_second"),
    "rss_before_kb": rss0, "rss_held_kb": rss_held,
    "bytes_per_connection": round((rss_held - rss0) * 1024 / conns) if conns else None,
    "peak_rss_kb": max([x[2] for x in rows] or [0]),
    "publish_rate_achieved": r.get("publish_rate_achieved"), "sent": r.get("sent"),
    "expected": r.get("expected"), "received": r.get("received"), "lost": r.get("lost"),
    "latency": lat, "service_time": r.get("service_time", {}),
    "schedule_lag": r.get("schedule_lag", {}), "server_cpu_cores_during_messages": round(cpu, 2) if cpu is not None else None,
    "ok": r.get("ok"), "problems": r.get("problems"),
}))
PY
}

: >"$work/rows.jsonl"
for s in $servers; do
    case $s in
    tunegate)
        measure tunegate "tunegate serve (--threads 1)" tunegate \
            "$bin" serve --listen 127.0.0.1:0 --threads 1 ${serve_extra[@]+"${serve_extra[@]}"} ;;
    ws)
        measure ws "Node ws $(node -p 'require(process.env.NODE_PATH + "/ws/package.json").version') relay ($(node --version))" tunegate \
            node "$root/bench/peer_ws_relay.js" 0 25000 ;;
    socketio)
        measure socketio "Socket.IO $(node -p 'require(process.env.NODE_PATH + "/socket.io/package.json").version') ($(node --version))" socketio \
            node "$root/bench/peer_socketio_server.js" 0 25000 20000 ;;
    *) die "unknown server '$s' in BENCH_SERVERS (known: tunegate ws socketio)" ;;
    esac
done

mkdir -p bench/results
plot_args=()
for s in $servers; do
    label=$(python3 -c 'import json,sys; print([json.loads(l) for l in open(sys.argv[1]) if json.loads(l)["name"] == sys.argv[2]][0]["server"])' "$work/rows.jsonl" "$s")
    plot_args+=("$label=$work/$s.csv")
done
python3 bench/plot_memory.py bench/results/memory.svg "${plot_args[@]}"
[[ ${BENCH_PUBLISH:-0} == 1 ]] && cp bench/results/memory.svg docs/memory.svg
python3 - "$work/rows.jsonl" "$conns" "$rooms" "$rate" "$seconds" <<'PY'
import datetime, json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
conns, rooms, rate, seconds = sys.argv[2:]
json.dump(rows, open("bench/results/side-by-side.json", "w"), indent=2)
def f(v, fmt="{:,.0f}"):
    return "-" if v is None else fmt.format(v)
lines = [
    "Measured %s: %s connections per server, rooms of %s, %s messages/s for %s s, one process each."
    % (datetime.date.today().isoformat(), conns, rooms, rate, seconds),
    "",
    "| Server | Held | Memory per connection | Connect rate | Latency p50 / p99 (from schedule) | Service time p50 / p99 | Publisher behind schedule, max | Lost | Server CPU (messages) |",
    "|:---|---:|---:|---:|---:|---:|---:|---:|---:|",
]
for r in rows:
    lat = r.get("latency") or {}
    svc = r.get("service_time") or {}
    lag = r.get("schedule_lag") or {}
    lines.append("| %s | %s | %s B | %s/s | %s / %s ms | %s / %s ms | %s ms | %s of %s | %s |" % (
        r["server"], f(r["held"]), f(r["bytes_per_connection"]), f(r["connects_per_second"]),
        f(lat.get("p50_ms"), "{:.2f}"), f(lat.get("p99_ms"), "{:.2f}"),
        f(svc.get("p50_ms"), "{:.2f}"), f(svc.get("p99_ms"), "{:.2f}"),
        f(lag.get("max_ms"), "{:.1f}"),
        f(r["lost"]), f(r["expected"]),
        f(r["server_cpu_cores_during_messages"], "{:.2f} cores")))
for r in rows:
    for p in r.get("problems") or []:
        lines.append("")
        lines.append("PROBLEM (%s): %s" % (r["server"], p))
open("bench/results/side-by-side.md", "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
PY

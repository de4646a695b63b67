#!/usr/bin/env bash
# One room of 100,000 members: how long a message takes to reach all of them, against the floor
# (one send() per socket and nothing else), and against Node `ws` where one process can hold the
# room.
#
# In a network namespace this script creates (nothing on the host changes):
#   1. `tunegate apply --profile c100k` and `tunegate run` (workers sized by the profile: 6 under
#      a 20,000-descriptor limit), heartbeats out of the way (one every 10 minutes);
#   2. `tunegate load -n BENCH_MEMBERS --rooms BENCH_MEMBERS`: every connection in one room;
#      BENCH_SINGLES messages BENCH_GAP seconds apart (time for the machine to finish one
#      before the next: both ends of 100,000 deliveries share its two cores), then (a second
#      run) a burst of BENCH_BURST messages within 10 ms. Each delivery is timed from the publisher's stamp; the workers'
#      CPU is read over each message phase, and the bytes of one delivered frame from /metrics;
#   2b. the same room and daemon with bench/ws_receivers.c (C clients that read and take the
#      stamp, as the floor's receivers do) instead of tunegate load, singles and a burst: the
#      server against the floor with the same clients on both sides;
#   3. bench/send_floor.c (built here with gcc -O2): as many sender processes as tunegate has
#      workers, each holding its share of BENCH_MEMBERS loopback connections, writing a frame
#      of the same size to each with one send(), timed the same way, with the same singles and
#      burst. Its receivers connect as tunegate's do: each receiver process's connections
#      spread over every sender (the kernel spreads them over tunegate's workers), the layout
#      the figures are compared with; then the singles once more with each receiver process
#      paired with one sender (a layout a server behind SO_REUSEPORT cannot have, and cheaper
#      on two shared cores: a receiver woken by one sender only sleeps less often);
#   4. at BENCH_NODE_MEMBERS (default 19,000: one process's descriptors), Node `ws`
#      (bench/peer_ws_relay.js, one JSON.stringify per publish shared by every receiver) and
#      `tunegate serve` in one process, with the C receivers, then the floor in one process,
#      with the same singles.
# Results: stdout, bench/results/broadcast.{md,json}. With `perf` installed, the workers' hot
# symbols during the burst are recorded too (what bounds a broadcast).
#
# Environment (all optional):
#   TUNEGATE_BIN        binary (default target/release/tunegate; build it first)
#   BENCH_MEMBERS       members of the one room (default 100000)
#   BENCH_SINGLES       single messages (default 10)
#   BENCH_GAP           seconds between them (default 3)
#   BENCH_BURST         messages in the burst (default 5)
#   BENCH_PAYLOAD       bytes of padding in each message (default 64)
#   BENCH_NODE_MEMBERS  members for the one-process comparison (default 19000; 0 skips it)
#   BENCH_CACHE         where the Node packages are installed (default ~/.cache/tunegate)
#
# Bounded: every load has --max-time, every wait a timeout, the floor's waits 30 s; the trap
# stops every process and deletes the namespace on any exit.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
bench_name=broadcast
# shellcheck source=bench/lib.sh
source bench/lib.sh

bin=${TUNEGATE_BIN:-target/release/tunegate}
members=${BENCH_MEMBERS:-100000}
singles=${BENCH_SINGLES:-10}
gap=${BENCH_GAP:-3}
burst=${BENCH_BURST:-5}
payload=${BENCH_PAYLOAD:-64}
node_members=${BENCH_NODE_MEMBERS:-19000}
cache=${BENCH_CACHE:-$HOME/.cache/tunegate}
out=bench/results/broadcast
port=18080

[[ $(id -u) == 0 ]] || die "run as root (it creates a network namespace)"
[[ -x $bin ]] || die "no tunegate binary at $bin (cargo build --release, or set TUNEGATE_BIN)"
bin=$(cd "$(dirname "$bin")" && pwd)/$(basename "$bin")
for v in "$members" "$singles" "$gap" "$burst" "$payload" "$node_members"; do
    [[ $v =~ ^[0-9]+$ ]] || die "BENCH_* values must be whole numbers"
done
for tool in ip python3 curl gcc node npm; do command -v $tool >/dev/null || die "$tool is needed"; done
ulimit -n "$(ulimit -Hn)"
limit=$(ulimit -Hn)
((node_members == 0 || node_members + 200 <= limit)) \
    || die "BENCH_NODE_MEMBERS=$node_members does not fit in one process's RLIMIT_NOFILE $limit"
if ((node_members > 0)); then node_packages "$cache/bench-node" ws@8.23.0; fi

ns_work "broadcast"
gcc -O2 -Wall -o "$work/send_floor" bench/send_floor.c
gcc -O2 -Wall -o "$work/ws_receivers" bench/ws_receivers.c

log "tunegate apply --profile c100k in namespace $ns"
ip netns exec "$ns" env TUNEGATE_STATE_DIR="$work/apply-state" TUNEGATE_SYSCTL_DIR="$work/sysctl.d" \
    "$bin" apply --profile c100k >"$work/apply.txt" 2>&1 || true

cpu_of() {  # cpu_of PID...: utime + stime ticks, summed
    local pid total=0
    for pid in "$@"; do total=$((total + $(sed 's/.*) //' /proc/"$pid"/stat | awk '{ print $12 + $13 }'))); done
    echo "$total"
}

# load_phase NAME TARGET_PORT N RATE SECONDS MESSAGES PIDS...: a tunegate load run with every
# connection in one room (RATE x SECONDS = MESSAGES); writes $work/NAME.json (the load's result plus the server's CPU ticks over the
# message phase and, for tunegate, the bytes per delivered frame).
load_phase() {
    local name=$1 target=$2 n=$3 rate=$4 seconds=$5 messages=$6
    shift 6
    local server_pids=("$@") c0 c1 b0=0 b1=0 m0=0 m1=0 load_pid
    ip netns exec "$ns" "$bin" load "ws://127.0.0.1:$target/" -n "$n" --rooms "$n" \
        --connect-rate 30000 --max-inflight 2000 --payload "$payload" --hold 2 \
        --publish-rate "$rate" --publish-seconds "$seconds" --max-time 300 --json \
        >"$work/$name.load.json" 2>"$work/$name.load.log" &
    load_pid=$!
    pids+=("$load_pid")
    phase_or_end() { grep -q "tunegate load: $1:" "$work/$name.load.log" || gone "$load_pid"; }
    # From the 2 s hold before the messages (a burst is over before the next progress line).
    poll 200 phase_or_end hold || true
    grep -q "tunegate load: hold:" "$work/$name.load.log" \
        || { tail -n 20 "$work/$name.load.log" >&2; die "$name: the load never reached its hold"; }
    c0=$(cpu_of "${server_pids[@]}")
    if [[ $target == "$port" ]]; then
        b0=$(metric tunegate_bytes_out_total) m0=$(metric tunegate_messages_out_total)
    fi
    if [[ -n ${perf_during:-} ]]; then perf_record "$name" "${server_pids[@]}"; fi
    # Until every delivery is in (before the closes of the finish phase cost the server CPU).
    local expected=$((messages * (n - 1)))
    all_in() {
        grep -q "delivered $expected/$expected\$" "$work/$name.load.log" || phase_or_end finish
    }
    poll 120 all_in || true
    c1=$(cpu_of "${server_pids[@]}")
    wait "$load_pid" || true
    if [[ $target == "$port" ]]; then
        sleep 2 # the workers' counters travel the bus and are summed once 1 s old
        b1=$(metric tunegate_bytes_out_total) m1=$(metric tunegate_messages_out_total)
    fi
    python3 - "$work/$name.load.json" "$((c1 - c0))" "$((b1 - b0))" "$((m1 - m0))" >"$work/$name.json" <<'PY'
import json, os, sys
try:
    r = json.load(open(sys.argv[1]))
except Exception as e:
    r = {"ok": False, "problems": ["no result from tunegate load: %s" % e]}
ticks, bytes_out, msgs_out = (int(x) for x in sys.argv[2:5])
r["server_cpu_seconds"] = ticks / os.sysconf("SC_CLK_TCK")
r["frame_bytes"] = round(bytes_out / msgs_out) if msgs_out else None
print(json.dumps(r))
PY
    tail -n 4 "$work/$name.load.log" >&2
}

perf_record() {  # perf_record NAME PID...: 5 s of the workers' stacks, summarized into NAME.perf
    command -v perf >/dev/null || return 0
    local name=$1 list
    shift
    list=$(IFS=,; echo "$*")
    timeout 20 perf record -F 999 -g -p "$list" -o "$work/$name.perf.data" -- sleep 5 >/dev/null 2>&1 || true
    perf report -i "$work/$name.perf.data" --no-children --sort sym --stdio -g none 2>/dev/null \
        | grep -E '^ +[0-9.]+%' | head -n 12 >"$work/$name.perf" || true
}

# ws_phase NAME PORT MEMBERS PROCESSES MESSAGES ROUNDS SERVER_PID...: a server's room with the
# floor's kind of receivers (bench/ws_receivers.c)
ws_phase() {
    local name=$1 target=$2 n=$3 procs=$4 messages=$5 rounds=$6
    shift 6
    log "$name: C receivers, $n members, $procs receiver processes, $messages message(s) x $rounds round(s)"
    ip netns exec "$ns" timeout 300 "$work/ws_receivers" "$target" "$n" "$procs" "$messages" "$rounds" \
        "$@" >"$work/$name.json" || die "$name: ws_receivers failed"
}

floor_phase() {  # floor_phase NAME MEMBERS PROCESSES FRAME MESSAGES ROUNDS LAYOUT
    log "floor: $2 members, $3 sender processes, $4-byte frames, $5 message(s) x $6 round(s), $7"
    ip netns exec "$ns" timeout 300 "$work/send_floor" "$2" "$3" "$4" "$5" "$6" "$7" >"$work/$1.json" \
        || die "$1: send_floor failed"
}

# 1-2. tunegate run, one room of $members: singles, then a burst.
start_daemon c100k "  ping_interval_ms: 600000
  ping_timeout_ms: 20000"
workers=${#worker_pids[@]}
log "tunegate: one room of $members, $singles single messages $gap s apart"
rate=$(python3 -c "print(1 / $gap)")
load_phase tunegate-singles "$port" "$members" "$rate" $((singles * gap)) "$singles" "${worker_pids[@]}"
log "tunegate: one room of $members, a burst of $burst"
perf_during=1 load_phase tunegate-burst "$port" "$members" $((burst * 100)) 0.01 "$burst" "${worker_pids[@]}"
frame=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["frame_bytes"] or 200)' "$work/tunegate-singles.json")
ws_phase tunegate-c-singles "$port" "$members" "$workers" 1 "$singles" "${worker_pids[@]}"
ws_phase tunegate-c-burst "$port" "$members" "$workers" "$burst" 3 "${worker_pids[@]}"
stop_pid "$daemon_pid" 20
daemon_pid=""

# 3. the floor, same members, senders and frame.
floor_phase floor-singles "$members" "$workers" "$frame" 1 "$singles" spread
floor_phase floor-burst "$members" "$workers" "$frame" "$burst" 3 spread
floor_phase floor-paired-singles "$members" "$workers" "$frame" 1 "$singles" paired

# 4. one process: Node ws, tunegate serve, the floor.
if ((node_members > 0)); then
    for who in ws tunegate1; do
        if [[ $who == ws ]]; then
            ip netns exec "$ns" node "$root/bench/peer_ws_relay.js" 18090 600000 2>"$work/$who.log" &
        else
            ip netns exec "$ns" "$bin" serve --listen 127.0.0.1:18090 --threads 1 \
                --ping-interval 600000 2>"$work/$who.log" &
        fi
        server=$!
        pids+=("$server")
        poll 20 grep -q "listening on" "$work/$who.log" || die "$who did not start"
        ws_phase "$who-singles" 18090 "$node_members" 1 1 "$singles" "$server"
        stop_pid "$server" 10
    done
    floor_phase floor1-singles "$node_members" 1 "$frame" 1 "$singles" spread
fi

mkdir -p bench/results
python3 - "$work" "$out" "$members" "$node_members" "$workers" "$singles" "$burst" "$frame" \
    "$payload" <<'PY'
import datetime, json, os, sys
work, out = sys.argv[1], sys.argv[2]
members, node_members, workers, singles, burst, frame, payload = (int(x) for x in sys.argv[3:10])
def load(name):
    p = os.path.join(work, name + ".json")
    return json.load(open(p)) if os.path.exists(p) else None
def perf(name):
    p = os.path.join(work, name + ".perf")
    return [l.strip() for l in open(p)] if os.path.exists(p) else []
problems = []
def tunegate_row(name, label, n, messages):
    r = load(name)
    if r is None:
        return None
    lat = r.get("latency", {})
    deliveries = r.get("received") or 0
    if r.get("lost"):
        problems.append("%s: %s deliveries lost" % (label, r["lost"]))
    if not r.get("ok", False):
        problems += ["%s: %s" % (label, p) for p in r.get("problems", [])]
    sent = r.get("sent") or 0
    return {"name": name, "server": label, "members": n, "messages": sent,
            "p50_ms": lat.get("p50_ms"), "p99_ms": lat.get("p99_ms"), "max_ms": lat.get("max_ms"),
            "lost": r.get("lost"), "server_cpu_seconds": round(r["server_cpu_seconds"], 3),
            "server_cpu_ms_per_broadcast": round(1000 * r["server_cpu_seconds"] / sent, 2) if sent else None,
            "server_cpu_ns_per_delivery": round(1e9 * r["server_cpu_seconds"] / deliveries, 1) if deliveries else None}
def ws_row(name, label, n):
    r = load(name)
    if r is None:
        return None
    return {"name": name, "server": label, "members": n, "messages": len(r["rounds"]) * r["messages"],
            "p50_ms": r["p50_us"] / 1000, "p99_ms": r["p99_us"] / 1000, "max_ms": r["max_us"] / 1000,
            "lost": 0, "server_cpu_ns_per_delivery": r["server_cpu_ns_per_delivery"],
            "server_cpu_ms_per_broadcast": round(r["server_cpu_ns_per_delivery"] * n / 1e6, 2)}
def floor_row(name, label, n):
    r = load(name)
    if r is None:
        return None
    if r.get("failed_sends"):
        problems.append("%s: %s sends failed" % (label, r["failed_sends"]))
    return {"name": name, "server": label, "members": n, "messages": len(r["rounds"]) * r["messages"],
            "p50_ms": r["p50_us"] / 1000, "p99_ms": r["p99_us"] / 1000, "max_ms": r["max_us"] / 1000,
            "lost": 0, "server_cpu_ns_per_delivery": r["sender_cpu_ns_per_delivery"],
            "server_cpu_ms_per_broadcast": round(r["sender_cpu_ns_per_delivery"] * n / 1e6, 2)}
rows = [x for x in [
    tunegate_row("tunegate-singles", "tunegate run (%d workers)" % workers, members, 1),
    ws_row("tunegate-c-singles", "tunegate run, the floor's C receivers", members),
    floor_row("floor-singles", "floor: send() only (%d processes)" % workers, members),
    floor_row("floor-paired-singles", "floor, each receiver paired with one sender", members),
    tunegate_row("tunegate-burst", "tunegate run, burst of %d" % burst, members, burst),
    ws_row("tunegate-c-burst", "tunegate run, C receivers, burst of %d" % burst, members),
    floor_row("floor-burst", "floor, burst of %d" % burst, members),
    ws_row("ws-singles", "Node ws (one process), C receivers", node_members),
    ws_row("tunegate1-singles", "tunegate serve (one process), C receivers", node_members),
    floor_row("floor1-singles", "floor (one process)", node_members),
] if x]
by = {r["name"]: r for r in rows}
def ratio(a, b, key):
    if a in by and b in by and by[b].get(key):
        return round(by[a][key] / by[b][key], 2)
    return None
ratios = {
    "singles_max_vs_floor": ratio("tunegate-singles", "floor-singles", "max_ms"),
    "singles_p50_vs_floor": ratio("tunegate-singles", "floor-singles", "p50_ms"),
    "singles_cpu_vs_floor": ratio("tunegate-singles", "floor-singles", "server_cpu_ns_per_delivery"),
    "burst_max_vs_floor": ratio("tunegate-burst", "floor-burst", "max_ms"),
    "c_receivers_singles_max_vs_floor": ratio("tunegate-c-singles", "floor-singles", "max_ms"),
    "c_receivers_singles_p50_vs_floor": ratio("tunegate-c-singles", "floor-singles", "p50_ms"),
    "c_receivers_singles_cpu_vs_floor": ratio("tunegate-c-singles", "floor-singles", "server_cpu_ns_per_delivery"),
    "c_receivers_burst_max_vs_floor": ratio("tunegate-c-burst", "floor-burst", "max_ms"),
    "c_receivers_singles_max_vs_paired_floor": ratio("tunegate-c-singles", "floor-paired-singles", "max_ms"),
    "floor_paired_vs_spread_max": ratio("floor-paired-singles", "floor-singles", "max_ms"),
    "one_process_max_vs_floor": ratio("tunegate1-singles", "floor1-singles", "max_ms"),
    "one_process_max_ws_vs_tunegate": ratio("ws-singles", "tunegate1-singles", "max_ms"),
}
res = {"date": datetime.date.today().isoformat(), "frame_bytes": frame, "payload": payload,
       "rows": rows, "ratios": ratios, "perf_burst": perf("tunegate-burst"),
       "ok": not problems, "problems": problems}
json.dump(res, open(out + ".json", "w"), indent=2)
md = ["Broadcast run, %s: one room, %d-byte frames (padding %d), every delivery timed from the "
      "publisher's stamp to the receiver's read." % (res["date"], frame, payload), "",
      "| | members | messages | p50 | p99 | last member (max) | server CPU per broadcast | per delivery | lost |",
      "|:---|---:|---:|---:|---:|---:|---:|---:|---:|"]
for r in rows:
    md.append("| %s | %d | %d | %.2f ms | %.2f ms | %.2f ms | %s ms | %s ns | %s |" % (
        r["server"], r["members"], r["messages"], r["p50_ms"] or 0, r["p99_ms"] or 0, r["max_ms"] or 0,
        r.get("server_cpu_ms_per_broadcast"), r.get("server_cpu_ns_per_delivery"), r["lost"]))
md += ["", "Ratios to the floor: " + ", ".join("%s %s" % (k, v) for k, v in ratios.items())]
if res["perf_burst"]:
    md += ["", "The workers during the burst (perf, self time):", "", "```"] + res["perf_burst"] + ["```"]
if problems:
    md += [""] + ["PROBLEM: " + p for p in problems]
open(out + ".md", "w").write("\n".join(md) + "\n")
print("\n".join(md))
sys.exit(0 if not problems else 1)
PY

#!/usr/bin/env bash
# The C100k proof: 100,000 live WebSocket connections on this machine, through heartbeats and a
# room-message phase, with nothing lost.
#
# In a network namespace this script creates (nothing on the host changes):
#   1. `tunegate apply --profile c100k` (somaxconn, port range, buffers: the per-namespace part);
#   2. `tunegate run` with the c100k profile: the bundled server, workers sized automatically
#      from the RLIMIT_NOFILE it really has, heartbeats every BENCH_PING_MS (Socket.IO's 25 s;
#      CI shortens it), and a hold long enough for at least two rounds;
#   3. `tunegate load -n BENCH_CONNS` (sharded itself): connect, join rooms of BENCH_ROOMS, hold
#      BENCH_HOLD seconds, publish BENCH_PUBLISH_RATE messages/s for BENCH_PUBLISH_SECONDS.
# Readings while it runs: the workers' RSS and CPU and the kernel's Slab before the load,
# once every connection is up (hold start), and at the end of the hold; the physical pages the
# workers hold, each counted once (bench/resident.py), before the load and once they settle;
# the server's /metrics (pings sent, connections closed by reason). Results: stdout,
# BENCH_OUT.md and .json.
# Exit status 0 only if every connection opened and stayed open, at least two heartbeat rounds
# were answered, and every message reached every member.
#
# Environment (all optional):
#   TUNEGATE_BIN          binary (default target/release/tunegate; build it first)
#   BENCH_CONNS           connections (default 100000)
#   BENCH_PING_MS         server ping interval, ms (default 25000, Socket.IO's pingInterval;
#                         the timeout is 20000 or the interval if shorter; CI shortens both)
#   BENCH_HOLD            seconds held idle after all are up (default 2.2 x ping + 1: two
#                         rounds for every connection)
#   BENCH_ROOMS           room spread for tunegate load --rooms (default 10)
#   BENCH_AFFINITY        1: every connection asks for its room's home worker
#                         (tunegate load --affinity, `?affinity=ROOM`), so each room lives on one
#                         worker (default 0: the kernel's spread decides)
#   BENCH_PUBLISH_RATE    room messages per second (default 10000)
#   BENCH_PUBLISH_SECONDS message phase length (default 10)
#   BENCH_CONNECT_RATE    connects started per second (default 30000)
#   BENCH_CONNECT_TIMEOUT seconds the load gives its connections to open (default 120)
#   BENCH_LOAD_PROCESSES  load processes (default: tunegate load decides, at least 2)
#   BENCH_SATURATION_S    the daemon's saturation watch interval (default 1: five times its
#                         default rate, so the daemon's CPU during the hold bounds the watch's
#                         cost from above)
#   BENCH_NS_EHASH        give the namespace its own TCP established hash of this many buckets
#                         (bench/lib.sh: net.ipv4.tcp_child_ehash_entries, host-global, set for
#                         the instant the namespace is created; default: share the host's)
#   BENCH_PROFILE         the profile applied and run: a built-in name or a file (default
#                         c100k; bench/c1m.sh: bench/c1m-on-host.yaml)
#   BENCH_OUT             results path without extension (default bench/results/NAME, the
#                         profile's name)
#
# Bounded: every wait has a timeout, tunegate load has --max-time, and the trap stops every
# process and deletes the namespace on any exit.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
profile=${BENCH_PROFILE:-c100k}
name=$(basename "$profile" .yaml)
[[ -f $profile ]] && profile=$(realpath "$profile")
bench_name=$name
# shellcheck source=bench/lib.sh
source bench/lib.sh

bin=${TUNEGATE_BIN:-target/release/tunegate}
conns=${BENCH_CONNS:-100000}
ping_ms=${BENCH_PING_MS:-25000}
ping_timeout_ms=$((ping_ms < 20000 ? ping_ms : 20000))
hold=${BENCH_HOLD:-$(python3 -c "print(round(2.2 * $ping_ms / 1000 + 1, 1))")}
rooms=${BENCH_ROOMS:-10}
affinity=${BENCH_AFFINITY:-0}
affinity_flag=()
[[ $affinity == 1 ]] && affinity_flag=(--affinity)
publish_rate=${BENCH_PUBLISH_RATE:-10000}
publish_seconds=${BENCH_PUBLISH_SECONDS:-10}
connect_rate=${BENCH_CONNECT_RATE:-30000}
connect_timeout=${BENCH_CONNECT_TIMEOUT:-120}
load_processes=${BENCH_LOAD_PROCESSES:-}
out=${BENCH_OUT:-bench/results/$name}
export BENCH_SATURATION_S=${BENCH_SATURATION_S:-1}
port=18080

[[ $(id -u) == 0 ]] || die "run as root (it creates a network namespace)"
[[ -x $bin ]] || die "no tunegate binary at $bin (cargo build --release, or set TUNEGATE_BIN)"
bin=$(cd "$(dirname "$bin")" && pwd)/$(basename "$bin")
[[ $conns =~ ^[0-9]+$ && $ping_ms =~ ^[0-9]+$ && $publish_rate =~ ^[0-9]+$ ]] \
    || die "BENCH_CONNS, BENCH_PING_MS and BENCH_PUBLISH_RATE must be whole numbers"
for tool in ip python3 curl; do command -v $tool >/dev/null || die "$tool is needed"; done
ulimit -n "$(ulimit -Hn)"
limit=$(ulimit -Hn)
if [[ -z $load_processes ]]; then
    load_processes=$(((conns + limit - 65) / (limit - 64)))
    ((load_processes < 2)) && load_processes=2
fi

ns_work "$name"
workers_sum() {  # workers_sum rss|anon|cpu: summed over the worker processes
    local pid total=0
    for pid in "${worker_pids[@]}"; do
        if [[ $1 == rss ]]; then
            total=$((total + $(kb_field /proc/"$pid"/status VmRSS)))
        elif [[ $1 == anon ]]; then
            # Private memory alone: VmRSS also counts the binary's code pages each worker
            # touches (about 250 KiB per worker once it serves rooms), shared by all of them.
            total=$((total + $(kb_field /proc/"$pid"/status RssAnon)))
        else
            total=$((total + $(sed 's/.*) //' /proc/"$pid"/stat | awk '{ print $12 + $13 }')))
        fi
    done
    echo "$total"
}
# The physical pages the workers hold, each once (bench/resident.py): between VmRSS summed,
# which counts the code pages they share once per worker, and RssAnon, which leaves them out.
workers_distinct() { python3 "$root/bench/resident.py" "${worker_pids[@]}" | cut -d' ' -f1; }

# 1. apply (the per-namespace part of the profile; host-global keys are reported, not touched)
log "tunegate apply --profile $profile in namespace $ns"
ip netns exec "$ns" env TUNEGATE_STATE_DIR="$work/apply-state" TUNEGATE_SYSCTL_DIR="$work/sysctl.d" \
    "$bin" apply --profile "$profile" >"$work/apply.txt" 2>&1 || true
grep -E '^(SET|set|  set|->)|somaxconn|ip_local_port_range' "$work/apply.txt" | head -n 5 >&2 || true

# 2. tunegate run
start_daemon "$profile" "  ping_interval_ms: $ping_ms
  ping_timeout_ms: $ping_timeout_ms"
sleep 1 # the baseline: a second for the freshly started workers to settle
rss0=$(workers_sum rss) anon0=$(workers_sum anon) distinct0=$(workers_distinct) slab0=$(kb_field /proc/meminfo Slab) avail0=$(kb_field /proc/meminfo MemAvailable)

# 3. tunegate load, watched through its progress lines (one a second when not on a terminal)
max_time=$(python3 -c "print(int(180 + $connect_timeout + $hold + $publish_seconds))")
log "tunegate load -n $conns ($load_processes processes), hold ${hold}s, $publish_rate msg/s for ${publish_seconds}s"
ip netns exec "$ns" "$bin" load "ws://127.0.0.1:$port/" -n "$conns" --processes "$load_processes" \
    --connect-rate "$connect_rate" --connect-timeout "$connect_timeout" --max-inflight 2000 --rooms "$rooms" "${affinity_flag[@]}" --hold "$hold" \
    --publish-rate "$publish_rate" --publish-seconds "$publish_seconds" --max-time "$max_time" \
    --json >"$work/load.json" 2>"$work/load.log" &
load_pid=$!
pids+=("$load_pid")
phase_seen() { grep -q "tunegate load: $1:" "$work/load.log"; }
wait_phase() {  # wait_phase NAME SECONDS: the load reached phase NAME (not: it ended first)
    phase_or_end() { phase_seen "$1" || gone "$load_pid"; }
    poll "$2" phase_or_end "$1" || true
    phase_seen "$1"
}
wait_phase hold $((connect_timeout + 180)) || { tail -n 20 "$work/load.log" >&2; die "the load never reached its hold phase"; }
rss1=$(workers_sum rss) anon1=$(workers_sum anon) slab1=$(kb_field /proc/meminfo Slab) cpu1=$(workers_sum cpu)
# The load generator's own memory (the first process and its shards) and the host's
# descriptors (both ends of every connection count against fs.file-max when the load runs on
# the same host), once every connection is up.
load_rss_kb() {
    local pid total=0
    for pid in "$load_pid" $(pgrep -P "$load_pid"); do
        total=$((total + $(kb_field /proc/"$pid"/status VmRSS)))
    done
    echo "$total"
}
load_rss1=$(load_rss_kb) avail1=$(kb_field /proc/meminfo MemAvailable)
read -r files1 _ file_max </proc/sys/fs/file-nr
# TCP's own memory accounting (pages, host-wide), against net.ipv4.tcp_mem: what idle
# connections really hold in buffers.
# shellcheck disable=SC2016  # awk's own $ fields
tcp_mem_pages=$(in_ns awk '$1 == "TCP:" { for (i = 2; i < NF; i++) if ($i == "mem") print $(i + 1) }' /proc/net/sockstat)
tcp_mem_max=$(awk '{ print $3 }' /proc/sys/net/ipv4/tcp_mem)
daemon_cpu() { awk '{ print $14 + $15 }' "/proc/$daemon_pid/stat"; }
dcpu1=$(daemon_cpu)
pings1=$(metric tunegate_pings_sent_total) t1=$(date +%s.%N)
# Per connection means per connection held: when not all opened, the planned count would flatter.
# /metrics sums the workers' snapshots once they are a second old (so a scrape never goes back):
# give it that second before reading how many are held.
all_counted() { (($(metric tunegate_websockets_open) >= conns)); }
poll 10 all_counted || true
held1=$(metric tunegate_websockets_open)
# Each worker gives back what the connect burst left once the burst is over (docs/protocol.md:
# Memory given back; looked at every 5 s): wait for a trim per worker, within the hold and 30 s,
# and read the memory again, what the settled server holds.
all_trimmed() { (($(metric tunegate_heap_trims_total) >= ${#worker_pids[@]})); }
poll "$(python3 -c "print(max(0, min(30, int($hold - 2))))")" all_trimmed || true
rss1s=$(workers_sum rss) anon1s=$(workers_sum anon) distinct1s=$(workers_distinct)
trims1=$(metric tunegate_heap_trims_total) trimmed1=$(metric tunegate_heap_trimmed_bytes_total)
wait_phase publish $((${hold%.*} + 30)) || { tail -n 20 "$work/load.log" >&2; die "the load never reached its message phase"; }
cpu2=$(workers_sum cpu) pings2=$(metric tunegate_pings_sent_total) t2=$(date +%s.%N)
dcpu2=$(daemon_cpu)
rss2=$(workers_sum rss) avail2=$(kb_field /proc/meminfo MemAvailable)
# Heartbeat closes during the run, read when the load begins to close every connection: closing
# a million takes two saturated cores tens of seconds, and a connection waiting its turn can
# miss a pong then. (/metrics sums counters a second and one publish interval old, 3.2 s at 57
# workers: a close in those last seconds before is counted at the end only.)
closed_heartbeat_run=-1
if wait_phase finish $((${publish_seconds%.*} + 60)); then
    closed_heartbeat_run=$(metric 'tunegate_connections_closed_total{reason="heartbeat_timeout"}')
fi
wait "$load_pid" && load_rc=0 || load_rc=$?
# The workers' counters travel the bus every half second (3.2 s at 57 workers): wait until every
# connection's close has reached the one that answers (accepted = closed + still open, summed
# over the workers).
counters_settled() { (($(metric tunegate_connections_open) == 0)); }
poll 15 counters_settled || true
closed_heartbeat=$(metric 'tunegate_connections_closed_total{reason="heartbeat_timeout"}')
late_reads=$(metric tunegate_heartbeat_late_reads_total)
accepted=$(metric tunegate_connections_accepted_total)
moved=$(metric tunegate_connections_moved_out_total) move_failed=$(metric tunegate_connection_moves_failed_total)
tail -n 8 "$work/load.log" >&2
mkdir -p "$(dirname "$out")"
cp "$work/daemon.log" "$out.daemon.log" # what the daemon and the workers logged: kept for a failed run

python3 - "$work/load.json" "$out" "$conns" "$limit" "$sizing" "$rss0" "$rss1" "$rss2" "$slab0" "$slab1" \
    "$cpu1" "$cpu2" "$t1" "$t2" "$pings1" "$pings2" "$ping_ms" "$hold" "$closed_heartbeat" "$accepted" \
    "$load_rc" "${#worker_pids[@]}" "$rooms" "$publish_rate" "$load_processes" "$dcpu1" "$dcpu2" \
    "$BENCH_SATURATION_S" "$name" "$load_rss1" "$avail0" "$avail1" "$avail2" "$files1" "$file_max" \
    "${tcp_mem_pages:-0}" "$tcp_mem_max" "$held1" "$anon0" "$anon1" "$affinity" "$moved" "$move_failed" \
    "$closed_heartbeat_run" "$late_reads" "$trims1" "$trimmed1" "$rss1s" "$anon1s" "$distinct0" "$distinct1s" <<'PY'
import json, os, sys, datetime
(load_json, out, conns, limit, sizing, rss0, rss1, rss2, slab0, slab1, cpu1, cpu2, t1, t2, pings1,
 pings2, ping_ms, hold, closed_hb, accepted, load_rc, workers, rooms, rate, procs, dcpu1, dcpu2,
 sat_s, profile, load_rss1, avail0, avail1, avail2, files1, file_max, tcp_pages,
 tcp_max, held1, anon0, anon1, affinity, moved, move_failed, closed_hb_run, late_reads, trims1,
 trimmed1, rss1s, anon1s, distinct0, distinct1s) = sys.argv[1:]
conns, limit, workers = int(conns), int(limit), int(workers)
try:
    r = json.load(open(load_json))
except Exception as e:
    r = {"ok": False, "problems": ["no result from tunegate load: %s" % e]}
hz = os.sysconf("SC_CLK_TCK")
held_s = float(t2) - float(t1)
hb_cpu = (int(cpu2) - int(cpu1)) / hz
daemon_cpu = (int(dcpu2) - int(dcpu1)) / hz
pings = int(pings2) - int(pings1) if int(pings1) >= 0 and int(pings2) >= 0 else -1
# Held at the hold: the server's own count, or, when /metrics did not answer with one, the
# load's count of connections opened (never the planned count: a run that opened fewer would
# look leaner per connection than it is).
held_from = "the server's /metrics"
if 0 < int(held1) <= conns:
    held = int(held1)
else:
    held, held_from = int(r.get("opened") or conns), "the load (/metrics said %s)" % held1
rss_per = (int(rss1) - int(rss0)) * 1024 / held
anon_per = (int(anon1) - int(anon0)) * 1024 / held
rss_settled = (int(rss1s) - int(rss0)) * 1024 / held
anon_settled = (int(anon1s) - int(anon0)) * 1024 / held
distinct_settled = (int(distinct1s) - int(distinct0)) * 1024 / held
slab_per = (int(slab1) - int(slab0)) * 1024 / held
problems = list(r.get("problems", []))
rounds = pings / held if held and pings >= 0 else 0
if pings < 0:
    problems.append("the server's /metrics did not answer, so the pings of the hold are unknown")
elif rounds < 2:
    problems.append("only %.2f heartbeat rounds during the hold (%d pings)" % (rounds, pings))
# Closed for missing heartbeats while the load held them (unknown: all of them, as a problem);
# those closed after, while the load closed every connection, are reported, not failed on: the
# load's own count of connections open at its end says whether any was lost.
closed_hb_run = int(closed_hb_run) if int(closed_hb_run) >= 0 else int(closed_hb)
if closed_hb_run > 0:
    problems.append("%s connections closed for missing heartbeats during the run" % closed_hb_run)
if int(load_rc) != 0 and not problems:
    problems.append("tunegate load exited %s" % load_rc)
lat = r.get("latency", {})
res = {
    "date": datetime.date.today().isoformat(), "connections": conns, "rlimit_nofile": limit,
    "workers": workers, "sizing": sizing, "load_processes": int(procs),
    "opened": r.get("opened"), "open_at_end": r.get("open_at_end"),
    "disconnects": r.get("disconnects"), "connect_errors": r.get("connect_errors"),
    "connect_seconds": r.get("connect_seconds"), "connects_per_second": r.get("connects_per_second"),
    "rss_before_kb": int(rss0), "rss_connected_kb": int(rss1), "rss_after_hold_kb": int(rss2),
    "held_at_hold_start": held, "held_counted_by": held_from,
    "server_rss_bytes_per_connection": round(rss_per, 1),
    "server_anon_bytes_per_connection": round(anon_per, 1),
    "server_rss_bytes_per_connection_settled": round(rss_settled, 1),
    "server_anon_bytes_per_connection_settled": round(anon_settled, 1),
    "server_distinct_bytes_per_connection_settled": round(distinct_settled, 1),
    "kernel_slab_bytes_per_connection": round(slab_per, 1),
    "ping_interval_ms": int(ping_ms), "hold_seconds": round(held_s, 2),
    "pings_sent_during_hold": pings, "heartbeat_rounds": round(rounds, 2),
    "closed_heartbeat_during_run": closed_hb_run, "closed_heartbeat_by_the_end": int(closed_hb),
    "heartbeat_late_reads": int(late_reads),
    "heap_trims_at_hold": int(trims1), "heap_trimmed_bytes_at_hold": int(trimmed1),
    "heartbeat_cpu_seconds": round(hb_cpu, 2),
    "heartbeat_cpu_share_of_one_core": round(hb_cpu / held_s, 4) if held_s else None,
    "saturation_interval_s": int(sat_s),
    "daemon_cpu_seconds_during_hold": round(daemon_cpu, 3),
    "daemon_cpu_share_of_one_core": round(daemon_cpu / held_s, 5) if held_s else None,
    "pings_answered_by_clients": r.get("pings_answered"),
    "rooms": rooms, "affinity": affinity == "1", "connections_moved": int(moved),
    "connection_moves_failed": int(move_failed), "publish_rate": int(rate), "publish_rate_achieved": r.get("publish_rate_achieved"),
    "sent": r.get("sent"), "expected": r.get("expected"), "received": r.get("received"),
    "lost": r.get("lost"), "latency": lat, "service_time": r.get("service_time", {}),
    "schedule_lag": r.get("schedule_lag", {}), "accepted_total": int(accepted),
    "profile": profile,
    "load_rss_connected_kb": int(load_rss1),
    "load_rss_bytes_per_connection": round(int(load_rss1) * 1024 / held, 1),
    "mem_available_before_kb": int(avail0),
    "mem_available_min_kb": min(int(avail1), int(avail2)),
    "file_handles_connected": int(files1), "file_max": int(file_max),
    "tcp_mem_pages_connected": int(tcp_pages), "tcp_mem_max_pages": int(tcp_max),
    "ok": not problems, "problems": problems,
}
os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
json.dump(res, open(out + ".json", "w"), indent=2)
md = [
    "Proof run, %s: %d connections on %d workers (profile %s, RLIMIT_NOFILE %d per process), %d load processes."
    % (res["date"], conns, workers, profile, limit, int(procs)),
    "",
    "Sizing: " + sizing,
    "",
    "| | |",
    "|:---|---:|",
    "| connections opened / still open at the end | %s / %s |" % (r.get("opened"), r.get("open_at_end")),
    "| time to connect all | %.2f s (%.0f/s) |" % (r.get("connect_seconds") or 0, r.get("connects_per_second") or 0),
    "| unexpected disconnects | %s |" % (sum((r.get("disconnects") or {}).values())),
    "| server user-space RSS per connection held (%d at the hold, counted by %s): as connecting ended / settled | %.0f / %.0f bytes |" % (held, held_from, rss_per, rss_settled),
    "| of it private (RssAnon: without the binary's shared code pages) | %.0f / %.0f bytes |" % (anon_per, anon_settled),
    "| the physical memory the workers hold, each page once (shared code pages once, not once per worker), settled | %.0f bytes |" % distinct_settled,
    "| settled: given back to the kernel after the connect burst (malloc_trim, all workers) | %.1f MiB in %s trims (%.0f bytes per connection) |" % (int(trimmed1) / 2**20, trims1, int(trimmed1) / held),
    "| kernel Slab per connection (both ends, system-wide) | %.0f bytes |" % slab_per,
    "| the load generator's RSS per connection (%s processes, all of it) | %.0f bytes |" % (procs, int(load_rss1) * 1024 / held),
    "| the host's memory available: before / lowest during the hold | %.1f / %.1f GiB |" % (int(avail0) / 2**20, min(int(avail1), int(avail2)) / 2**20),
    "| file handles open on the host (both ends) / fs.file-max | %s / %s |" % (files1, file_max),
    "| TCP buffer memory in use (sockstat) / tcp_mem high mark | %s / %s pages |" % (tcp_pages, tcp_max),
    "| heartbeats (ping %d ms): pings during a %.1f s hold | %d (%.2f rounds) |" % (int(ping_ms), held_s, pings, rounds),
    "| CPU spent on heartbeats (all workers) | %.2f s in %.1f s = %.1f %% of one core |" % (hb_cpu, held_s, 100 * hb_cpu / held_s if held_s else 0),
    "| closed by the server for missing heartbeats: during the run / by the end (the load closing every connection) | %s / %s |" % (closed_hb_run, closed_hb),
    "| heartbeat timeouts that found an answer or a hang-up waiting unread (a worker behind in its events: read, not closed) | %s |" % late_reads,
    "| the daemon's CPU during the hold, saturation watch every %s s (all of its work: the watch, its 50 ms supervision tick) | %.2f s in %.1f s = %.2f %% of one core |" % (sat_s, daemon_cpu, held_s, 100 * daemon_cpu / held_s if held_s else 0),
    "| room affinity (`?affinity=ROOM`): connections moved to their room's home / not moved | %s |" % ("%s / %s" % (moved, move_failed) if affinity == "1" else "off"),
    "| room messages (rooms %s) | %s sent at %.0f/s |" % (rooms, r.get("sent"), r.get("publish_rate_achieved") or 0),
    "| deliveries received / expected | %s / %s (lost %s) |" % (r.get("received"), r.get("expected"), r.get("lost")),
    "| delivery latency from the scheduled send, p50 / p99 / p99.9 / max | %s / %s / %s / %s ms |" % (lat.get("p50_ms"), lat.get("p99_ms"), lat.get("p999_ms"), lat.get("max_ms")),
    "| service time (from the actual write), p50 / p99 / p99.9 / max | %s / %s / %s / %s ms |" % tuple(res["service_time"].get(k) for k in ("p50_ms", "p99_ms", "p999_ms", "max_ms")),
    "| publishers behind schedule: p99 / max; messages more than 10 ms late | %s / %s ms; %s |" % tuple(res["schedule_lag"].get(k) for k in ("p99_ms", "max_ms", "late")),
]
if problems:
    md += [""] + ["PROBLEM: " + p for p in problems]
open(out + ".md", "w").write("\n".join(md) + "\n")
print("\n".join(md))
sys.exit(0 if not problems else 1)
PY

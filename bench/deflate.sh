#!/usr/bin/env bash
# permessage-deflate's effect, measured against a running `tunegate serve --deflate on`:
# bytes on the wire per representative message (a WebRTC offer with SDP, an ICE candidate, a
# chat line, a presence list of 100 names) in JSON and MsgPack, each with and without the
# extension, as real receivers see them (bench/deflate_wire.py reads raw frames); and the
# server's CPU per delivery when a room message is compressed once and shared by N receivers,
# against N receivers without the extension, in the same run.
# Results: stdout, bench/results/deflate.md and bench/results/deflate.json.
#
# Environment (all optional):
#   TUNEGATE_BIN   binary to measure (default target/release/tunegate; build it first)
#   BENCH_FANOUT   receivers in the CPU phase (default 200)
#   BENCH_CPU_MESSAGES  room messages in the CPU phase (default 2000)
#   BENCH_OUT      results path without extension (default bench/results/deflate)
#
# Only loopback is used; every wait is bounded; the server is stopped on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
bench_name=deflate
# shellcheck source=bench/lib.sh
source bench/lib.sh

bin=${TUNEGATE_BIN:-target/release/tunegate}
fanout=${BENCH_FANOUT:-200}
cpu_messages=${BENCH_CPU_MESSAGES:-2000}
out=${BENCH_OUT:-bench/results/deflate}
[[ -x $bin ]] || die "no tunegate binary at $bin (cargo build --release, or set TUNEGATE_BIN)"
python3 -c 'import websockets, msgpack' || die "Python websockets and msgpack are needed (scripts/deps.sh)"

bench_work deflate

"$bin" serve --listen 127.0.0.1:0 --threads 1 --deflate on 2>"$work/serve.log" &
server=$!
pids+=("$server")
poll 10 grep -q "listening on" "$work/serve.log" || die "the server did not start"
port=$(sed -n 's/.*listening on 127.0.0.1:\([0-9]*\).*/\1/p' "$work/serve.log")
log "measuring against port $port (fanout $fanout, $cpu_messages messages)"
timeout 600 python3 "$root/bench/deflate_wire.py" --port "$port" --pid "$server" \
    --fanout "$fanout" --cpu-messages "$cpu_messages" >"$work/result.json" ||
    die "bench/deflate_wire.py failed"
mkdir -p "$(dirname "$out")"
cp "$work/result.json" "$out.json"
python3 - "$work/result.json" <<'PY' | tee "$out.md"
import json, sys, datetime
r = json.load(open(sys.argv[1]))
s = r["sizes"]
print(f"# permessage-deflate ({datetime.date.today()}, tunegate serve --threads 1 --deflate on)\n")
print("Bytes on the wire per message (frame header included), as a receiver reads them:\n")
print("| message | JSON | JSON + deflate | MsgPack | MsgPack + deflate |")
print("|---|---:|---:|---:|---:|")
for name in ["webrtc_offer", "ice_candidate", "chat_line", "presence_100"]:
    cells = []
    for enc in ["json", "msgpack"]:
        plain, z = s[f"{name}/{enc}/plain"], s[f"{name}/{enc}/deflate"]
        cells += [f"{plain['bytes']:.0f}",
                  f"{z['bytes']:.0f}" + ("" if z["compressed"] else " (sent plain)")]
    print(f"| {name} | " + " | ".join(cells) + " |")
c = r["cpu"]
print(f"\nServer CPU, one publisher, {r['cpu_messages']} WebRTC offers to a room of "
      f"{r['fanout']} receivers (JSON):\n")
print("| receivers | server CPU | per delivery |")
print("|---|---:|---:|")
for mode in ["plain", "deflate"]:
    d = c[mode]
    print(f"| {mode} | {d['server_cpu_s']:.2f} s | {d['server_cpu_s'] / d['deliveries'] * 1e6:.2f} us |")
PY

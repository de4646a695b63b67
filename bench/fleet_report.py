#!/usr/bin/env python3
"""The report of bench/fleet.sh: reads what each run left in --work/RUN/, writes --out.md,
--out.json and the plot --out.svg (an SVG drawn by hand, like bench/plot_memory.py: no plotting
library needed on a bare Python 3). Standard library only.

Per run (RUN = STACK-MODE) the script left: servers, server-hosts (one line per server process),
before.json / held.json / publish-start.json / publish-end.json ({"t", and per process group
{"pid": [rss_kb, cpu_ticks]}}), conns-by-pid ("PID COUNT" from ss), commandstats (lines
"TIME cmd=calls ...", summed over the masters: right after CONFIG RESETSTAT, 2 s later, then
twice a second until the load ended), load.json (the load client's result), load.log, loaded.
"""
import argparse
import datetime
import glob
import json
import os
import re

HZ = os.sysconf("SC_CLK_TCK")
STACKS = {"socketio": "Socket.IO", "tunegate": "tunegate"}
MODES = {"nginx": "through nginx", "direct": "direct (no nginx)"}
# Commands that are not the stack's: ours (the readings) and the cluster's own replication.
NOT_THE_STACKS = {"info", "config|resetstat", "replconf", "ping", "cluster|info"}
# Sent when a room empties on a server: the clients' teardown has begun.
TEARDOWN = ("sunsubscribe", "unsubscribe")
# The commands tunegate's Lua scripts run (crates/relay/src/redis_bus/scripts.rs): INFO
# commandstats counts each of them as Redis executes them, besides the EVALSHA/EVAL that ran the
# script. "Requests" below counts a script run once. Neither Socket.IO nor its adapter run
# scripts; tunegate's servers send none of these directly.
SCRIPT_INTERNAL = {"time", "hset", "hdel", "hgetall", "pexpire", "pttl", "exists", "get", "set", "del"}


# Log lines every start and stop prints; the report lists the others.
ROUTINE = [r"listening on", r"\[notice\]", r"bus: Redis Cluster reach", r"bus: link to worker \d+ .* up$",
           r"signal 15: closing connections", r"drained, exiting", r"bus: link to worker \d+ down; its members no longer count"]


def requests(counts):
    """What the servers sent, a script run counted once (see SCRIPT_INTERNAL)."""
    if not counts.get("evalsha") and not counts.get("eval"):
        return sum(counts.values())
    return sum(v for k, v in counts.items() if k not in SCRIPT_INTERNAL)


def load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def lines(path):
    try:
        with open(path) as f:
            return [l.strip() for l in f if l.strip()]
    except OSError:
        return []


def commandstats(path):
    """[(t, {cmd: calls})] with our own and the cluster's commands left out."""
    out = []
    for l in lines(path):
        parts = l.split()
        counts = {}
        for p in parts[1:]:
            k, v = p.rsplit("=", 1)
            if k not in NOT_THE_STACKS:
                counts[k] = int(v)
        out.append((float(parts[0]), counts))
    return out


def cpu_cores(a, b, group):
    """Cores used by a process group between two snapshots; None if one of its processes was
    gone by the second (a snapshot reads 0 for a process that is gone)."""
    if not a or not b or b["t"] <= a["t"] or not a[group]:
        return None
    if any(p not in b[group] or b[group][p][0] == 0 for p in a[group]):
        return None
    ticks = sum(b[group][p][1] - a[group][p][1] for p in a[group])
    return ticks / HZ / (b["t"] - a["t"])


def analyse(work, run):
    d = os.path.join(work, run)
    stack, mode = run.split("-", 1)
    r = {"run": run, "stack": stack, "mode": mode}
    servers = lines(os.path.join(d, "servers"))
    hosts = [int(h) for h in lines(os.path.join(d, "server-hosts"))]
    r["upstreams"] = lines(os.path.join(d, "upstreams"))
    before, held = load(os.path.join(d, "before.json")), load(os.path.join(d, "held.json"))
    start, end = load(os.path.join(d, "publish-start.json")), load(os.path.join(d, "publish-end.json"))
    res = load(os.path.join(d, "load.json")) or {}
    r["load"] = {k: res.get(k) for k in (
        "connections", "processes", "client", "attempted", "opened", "connect_errors", "disconnects",
        "joined", "server_errors", "rooms_checked", "rooms_short", "open_at_end", "pings_answered",
        "connect_seconds", "connects_per_second", "held_seconds", "publish_seconds",
        "publish_rate_achieved", "sent", "expected", "received", "lost", "latency", "ok", "problems")}
    r["completed"] = lines(os.path.join(d, "loaded")) == ["1"] and bool(res)

    # Connections each server process holds (ss, late in the hold), and memory per host.
    by_pid = dict(l.split() for l in lines(os.path.join(d, "conns-by-pid")))
    procs = []
    for pid, h in zip(servers, hosts):
        p = {"pid": int(pid), "host": h, "connections": int(by_pid.get(pid, 0))}
        if before and held and pid in before["servers"] and pid in held["servers"]:
            p["rss_before_kb"] = before["servers"][pid][0]
            p["rss_held_kb"] = held["servers"][pid][0]
        procs.append(p)
    r["processes"] = procs
    r["held_by_servers"] = sum(p["connections"] for p in procs)
    per_host = []
    for h in sorted(set(hosts)):
        ps = [p for p in procs if p["host"] == h]
        n = sum(p["connections"] for p in ps)
        grow = sum(p.get("rss_held_kb", 0) - p.get("rss_before_kb", 0) for p in ps)
        per_host.append({
            "host": h, "connections": n, "rss_before_kb": sum(p.get("rss_before_kb", 0) for p in ps),
            "rss_held_kb": sum(p.get("rss_held_kb", 0) for p in ps),
            "bytes_per_connection": round(grow * 1024 / n) if n else None,
        })
    r["memory_per_host"] = per_host
    known = [h["bytes_per_connection"] for h in per_host if h["bytes_per_connection"] is not None]
    tot_n = sum(h["connections"] for h in per_host)
    tot_grow = sum(h["rss_held_kb"] - h["rss_before_kb"] for h in per_host)
    r["bytes_per_connection"] = round(tot_grow * 1024 / tot_n) if tot_n and known else None
    if held and held.get("nginx"):
        r["nginx_rss_held_kb"] = sum(v[0] for v in held["nginx"].values())

    # CPU over the publish phase.
    r["publish_window_s"] = round(end["t"] - start["t"], 2) if start and end else None
    r["cpu_cores"] = {g: cpu_cores(start, end, g) for g in ("servers", "redis", "nginx", "load")}
    if not (start and start.get("nginx")):
        r["cpu_cores"]["nginx"] = None
    # The load processes may be gone by the end snapshot: their CPU from the last reading (four
    # a second) while all of them were there ("TIME TICKS ALIVE ALL").
    alive = [l.split() for l in lines(os.path.join(d, "load-cpu"))]
    alive = [x for x in alive if len(x) == 4 and x[2] == x[3]]
    if start and start.get("load") and alive:
        t, ticks = float(alive[-1][0]), int(alive[-1][1])
        if t > start["t"]:
            r["cpu_cores"]["load"] = (ticks - sum(v[1] for v in start["load"].values())) / HZ / (t - start["t"])

    # Redis commands: from the reset to the last reading before the teardown began.
    cs = commandstats(os.path.join(d, "commandstats"))
    r["redis"] = {"readings": len(cs)}
    if len(cs) >= 2:
        (t0, c0), (t1, c1) = cs[0], cs[1]
        idle = {k: c1.get(k, 0) - c0.get(k, 0) for k in c1}
        r["redis"]["idle_commands_per_second"] = round(sum(idle.values()) / (t1 - t0), 1)
        r["redis"]["idle_by_command"] = {k: v for k, v in sorted(idle.items()) if v}
        r["redis"]["idle_requests_per_second"] = round(requests(idle) / (t1 - t0), 1)
    if len(cs) >= 3:
        # The last reading before the teardown (C), and the SPUBLISH calls between it and the
        # first reading of the teardown (T): the messages published in that last quarter of a
        # second; the rest of what (C, T] holds is the teardown's (or, for under a quarter of a
        # second, background that is then not counted).
        base = sum(cs[2][1].get(k, 0) for k in TEARDOWN)
        last, after = cs[2], None
        for t, c in cs[2:]:
            if sum(c.get(k, 0) for k in TEARDOWN) > base:
                after = (t, c)
                break
            last = (t, c)
        counts = dict(last[1])
        if after:
            counts["spublish"] = after[1].get("spublish", 0)
        sent = res.get("sent") or 0
        total = sum(counts.values())
        order = sorted(counts.items(), key=lambda kv: -kv[1])
        r["redis"].update({
            "window_s": round(last[0] - cs[0][0], 2), "teardown_seen": after is not None,
            "commands": total, "requests": requests(counts), "by_command": dict(order),
            "commands_per_message": round(total / sent, 3) if sent else None,
            "requests_per_message": round(requests(counts) / sent, 3) if sent else None,
            "by_command_per_message": {k: round(v / sent, 3) for k, v in order if v} if sent else {},
        })

    # What the servers and nginx logged beyond their start.
    odd = []
    for f in sorted(glob.glob(os.path.join(d, "server-h*.log"))) + [
            os.path.join(d, "nginx", "error.log"), os.path.join(d, "nginx", "stderr.log")]:
        for l in lines(f):
            if any(re.search(p, l) for p in ROUTINE):
                continue
            odd.append(f"{os.path.relpath(f, d)}: {l}")
    r["log_lines"] = odd[:40]
    r["log_lines_total"] = len(odd)
    return r


# ---- markdown -----------------------------------------------------------------------------------
def fmt(v, f="{:,.0f}", none="-"):
    return none if v is None else f.format(v)


def cores(v):
    return fmt(v, "{:.2f} cores")


def ratio_text(s, t, lower_better=True, unit="less"):
    """How tunegate compares to Socket.IO on a row."""
    if s is None or t is None:
        return "-", None
    if lower_better:
        if t <= 0:
            return ("ahead" if s > 0 else "equal"), (True if s > 0 else None)
        if s <= 0:
            return "behind (Socket.IO: 0)", False
        x = s / t
        if x >= 1:
            return f"{x:,.1f}x {unit}", x > 1
        return f"{1 / x:,.1f}x more", False
    if t == s:
        return "equal", None
    return ("ahead" if t > s else "behind"), t > s


def latency_cmp(ls, lt):
    """Ahead only if all three percentiles are lower."""
    if not (ls and lt and ls.get("samples") and lt.get("samples")):
        return "-", None
    keys = ("p50_ms", "p99_ms", "p999_ms")
    xs = [ls[k] / lt[k] if lt[k] > 0 else float("inf") for k in keys]
    text = " / ".join(f"{x:,.1f}x" for x in xs) + " lower"
    if all(x > 1 for x in xs):
        return text, True
    return text + " (not all lower)", False


def latency_text(lat):
    if not lat or not lat.get("samples"):
        return "-"
    return f"{lat['p50_ms']:.2f} / {lat['p99_ms']:.2f} / {lat['p999_ms']:.2f} ms"


def mode_table(rs, mode):
    s, t = rs.get(("socketio", mode)), rs.get(("tunegate", mode))
    cols = [x for x in (s, t) if x]
    if not cols:
        return [], []
    verdicts = []
    head = "| | " + " | ".join(STACKS[x["stack"]] for x in cols) + (" | tunegate vs Socket.IO |" if s and t else " |")
    out = [head, "|:---|" + "---:|" * len(cols) + ("---|" if s and t else "")]

    def row(name, vals, cmp=None, counted=True):
        line = f"| {name} | " + " | ".join(vals)
        if s and t:
            line += f" | {cmp[0] if cmp else ''}"
            if cmp and counted:
                verdicts.append((name, cmp[1]))
        out.append(line + " |")

    def L(x):
        return x["load"]

    row("connections held (opened / asked)",
        [f"{fmt(L(x)['opened'])} / {fmt(L(x)['connections'])}" for x in cols],
        ratio_text(L(s)["opened"], L(t)["opened"], lower_better=False) if s and t else None)
    row("held by the server processes (ss), per process",
        [f"{fmt(x['held_by_servers'])}: " + " / ".join(fmt(p["connections"]) for p in x["processes"]) for x in cols])
    row("memory per connection, host 1 / host 2",
        [" / ".join(fmt(h["bytes_per_connection"], "{:,.0f} B") for h in x["memory_per_host"]) for x in cols],
        ratio_text(s["bytes_per_connection"], t["bytes_per_connection"]) if s and t else None)
    row("Redis commands per published message",
        [fmt(x["redis"].get("commands_per_message"), "{:.3f}") for x in cols],
        ratio_text(s["redis"].get("commands_per_message"), t["redis"].get("commands_per_message"), unit="fewer") if s and t else None)
    row("  which (per message)",
        [", ".join(f"{k.upper()} {v:.3f}" for k, v in list(x["redis"].get("by_command_per_message", {}).items())[:7]) or "-" for x in cols])
    row("  requests per message (a script run counted once)",
        [fmt(x["redis"].get("requests_per_message"), "{:.3f}") for x in cols],
        ratio_text(s["redis"].get("requests_per_message"), t["redis"].get("requests_per_message"), unit="fewer") if s and t else None,
        counted=False)
    row("Redis commands/s with no message at all (2 s of the hold; requests/s)",
        [fmt(x["redis"].get("idle_commands_per_second"), "{:,.0f}") + " (" + fmt(x["redis"].get("idle_requests_per_second"), "{:,.0f}") + ")" for x in cols],
        ratio_text(s["redis"].get("idle_commands_per_second"), t["redis"].get("idle_commands_per_second"), unit="fewer") if s and t else None,
        counted=False)
    row("Redis CPU (publish phase)", [cores(x["cpu_cores"]["redis"]) for x in cols],
        ratio_text(s["cpu_cores"]["redis"], t["cpu_cores"]["redis"]) if s and t else None)
    row("delivery latency p50 / p99 / p99.9", [latency_text(L(x)["latency"]) for x in cols],
        latency_cmp(L(s)["latency"], L(t)["latency"]) if s and t else None)
    row("messages lost (of expected deliveries)",
        [f"{fmt(L(x)['lost'])} of {fmt(L(x)['expected'])}" + (f" (+{L(x)['received'] - L(x)['expected']:,} dup)" if (L(x)["received"] or 0) > (L(x)["expected"] or 0) else "") for x in cols],
        ratio_text(L(s)["lost"], L(t)["lost"], unit="fewer") if s and t else None)
    row("server CPU (publish phase, 4 processes)", [cores(x["cpu_cores"]["servers"]) for x in cols],
        ratio_text(s["cpu_cores"]["servers"], t["cpu_cores"]["servers"]) if s and t else None)
    if mode == "nginx":
        row("nginx CPU (publish phase, master + workers)", [cores(x["cpu_cores"]["nginx"]) for x in cols],
            ratio_text(s["cpu_cores"]["nginx"], t["cpu_cores"]["nginx"]) if s and t else None)
        row("nginx RSS holding the connections", [fmt((x.get("nginx_rss_held_kb") or 0) / 1024, "{:,.1f} MiB") for x in cols])
    row("load generator CPU (publish phase, for information)", [cores(x["cpu_cores"]["load"]) for x in cols])
    row("unexpected disconnects; pings answered",
        [f"{sum((L(x)['disconnects'] or {}).values()):,}; {fmt(L(x)['pings_answered'])}" for x in cols])
    row("messages published (rate achieved)",
        [f"{fmt(L(x)['sent'])} ({fmt(L(x)['publish_rate_achieved'], '{:,.0f}')}/s)" for x in cols])
    return out, verdicts


def markdown(a, runs):
    rs = {(r["stack"], r["mode"]): r for r in runs}
    p = a.plan
    lines_ = [
        f"Measured {datetime.date.today().isoformat()} with `{a.invocation}`: "
        f"{a.conns:,} connections per run from {a.load_processes} load process(es), rooms {a.rooms} "
        f"(size:percent of the connections), heartbeats {p['ping']} ms, a {a.hold} s hold, "
        f"{a.rate:,} messages/s for {a.seconds} s with {a.payload} bytes of padding; client source "
        f"addresses 127.0.1.1 and up, {'one connection' if a.per_source == 1 else f'{a.per_source} connections'} "
        f"each. 2 hosts (127.0.0.11, .12) x 2 "
        f"server processes; Redis {a.redis_version} Cluster, 3 masters + 3 replicas on 127.0.0.1; "
        f"nginx {a.nginx_version} with {a.nginx_workers} workers of {a.nginx_nofile:,} descriptors. "
        f"Socket.IO {a.socketio} on Node {a.node} with @socket.io/redis-adapter {a.adapter} "
        f"(createShardedAdapter, subscriptionMode dynamic) on redis {a.redis_client} createCluster, "
        f"loaded by socket.io-client; {a.tunegate} (`serve --threads 1 --workers 2 --bus`), loaded "
        f"by `tunegate load`.",
        "",
        f"nginx's descriptor limit bounds the proxied connections: each worker may hold "
        f"{a.nginx_nofile:,} descriptors (the hard RLIMIT_NOFILE here, which cannot be raised) "
        f"and every proxied connection costs it 2, so {a.nginx_workers} workers top out near "
        f"{a.nginx_workers * a.nginx_nofile // 2:,} minus the kernel's uneven spread; both stacks "
        f"get {a.conns:,}.",
    ]
    all_verdicts = {}
    for mode in ("nginx", "direct"):
        table, verdicts = mode_table(rs, mode)
        if not table:
            continue
        all_verdicts[mode] = verdicts
        lines_ += ["", f"**{MODES[mode].capitalize()}**", ""] + table
    # What nginx costs.
    cost = []
    for stack in ("socketio", "tunegate"):
        n, d = rs.get((stack, "nginx")), rs.get((stack, "direct"))
        if not (n and d):
            continue
        ln, ld = n["load"]["latency"] or {}, d["load"]["latency"] or {}
        sum_n = sum(v for v in (n["cpu_cores"]["servers"], n["cpu_cores"]["nginx"]) if v is not None)
        cost.append(f"| {STACKS[stack]} | {fmt(ln.get('p50_ms'), '{:.2f}')} vs {fmt(ld.get('p50_ms'), '{:.2f}')} ms | "
                    f"{fmt(ln.get('p99_ms'), '{:.2f}')} vs {fmt(ld.get('p99_ms'), '{:.2f}')} ms | "
                    f"{cores(n['cpu_cores']['servers'])} + {cores(n['cpu_cores']['nginx'])} = {sum_n:.2f} vs "
                    f"{cores(d['cpu_cores']['servers'])} | {fmt((n.get('nginx_rss_held_kb') or 0) / 1024, '{:,.1f} MiB')} |")
    if cost:
        lines_ += ["", "**What nginx costs** (through nginx vs direct, same stack)", "",
                   "| Stack | p50 | p99 | CPU: servers + nginx vs servers | nginx RSS |",
                   "|:---|---:|---:|---:|---:|"] + cost
    # Targets.
    tgt = []
    for mode, verdicts in all_verdicts.items():
        ahead = [n for n, ok in verdicts if ok]
        equal = [n for n, ok in verdicts if ok is None]
        behind = [n for n, ok in verdicts if ok is False]
        tgt.append(f"- {MODES[mode]}: tunegate ahead on {len(ahead)} of the {len(verdicts)} rows compared"
                   + (f", equal on {len(equal)} ({', '.join(equal)})" if equal else "")
                   + (f"; behind on {len(behind)}: {', '.join(behind)}" if behind else ""))
        s, t = rs.get(("socketio", mode)), rs.get(("tunegate", mode))
        if s and t and s["bytes_per_connection"] and t["bytes_per_connection"]:
            x = s["bytes_per_connection"] / t["bytes_per_connection"]
            tgt.append(f"  - memory per connection {x:,.0f}x less (target: at least 50x): "
                       f"{'reached' if x >= 50 else 'NOT reached'}")
        if s and t and s["redis"].get("commands_per_message") and t["redis"].get("commands_per_message") is not None:
            x = t["redis"]["commands_per_message"] / s["redis"]["commands_per_message"]
            tgt.append(f"  - Redis commands per message {x:.2f} of Socket.IO's (target: half or fewer): "
                       f"{'reached' if x <= 0.5 else 'NOT reached'}")
    if tgt:
        lines_ += ["", "Targets (tunegate ahead on every row; at least 50x less memory per connection; "
                   "half the Redis commands per message or fewer):", ""] + tgt
    # Problems and log lines.
    for r in runs:
        name = f"{STACKS[r['stack']]} {MODES[r['mode']]}"
        if not r["completed"]:
            lines_ += ["", f"PROBLEM ({name}): the run did not complete (see its load log)"]
        for pr in r["load"].get("problems") or []:
            lines_ += ["", f"PROBLEM ({name}): {pr}"]
        if r["log_lines"]:
            lines_ += ["", f"Server and nginx log lines ({name}, {r['log_lines_total']} beyond start-up; first ones):", "", "```"]
            lines_ += r["log_lines"][:10] + ["```"]
    return "\n".join(lines_) + "\n"


# ---- the plot -----------------------------------------------------------------------------------
COLOURS = {"socketio": "#d62728", "tunegate": "#1f77b4"}
NGINX_COLOUR, REDIS_COLOUR, OTHER_COLOUR = "#7f7f7f", "#bcbd22", "#aec7e8"


def esc(s):
    return str(s).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def svg(runs, a):
    import math
    rs = {(r["stack"], r["mode"]): r for r in runs}
    modes = [m for m in ("nginx", "direct") if any(k[1] == m for k in rs)]
    stacks = [s for s in ("socketio", "tunegate") if any(k[0] == s for k in rs)]
    W, H = 1000, 640
    PW, PH = 400, 200
    origins = [(80, 70), (580, 70), (80, 370), (580, 370)]
    panels = [
        ("Memory per connection (bytes, log scale)", True,
         lambda r: [(r["bytes_per_connection"], COLOURS[r["stack"]], None)], "B"),
        ("Redis commands per published message: SPUBLISH, the rest", False,
         lambda r: [(r["redis"].get("by_command_per_message", {}).get("spublish", 0.0), COLOURS[r["stack"]], None),
                    ((r["redis"].get("commands_per_message") or 0.0)
                     - r["redis"].get("by_command_per_message", {}).get("spublish", 0.0), OTHER_COLOUR, None)], ""),
        ("Delivery latency p99 (ms, log scale; tick: p50)", True,
         lambda r: [((r["load"]["latency"] or {}).get("p99_ms"), COLOURS[r["stack"]],
                     (r["load"]["latency"] or {}).get("p50_ms"))], "ms"),
        ("CPU in the publish phase (cores): servers, nginx, Redis", False,
         lambda r: [(r["cpu_cores"]["servers"], COLOURS[r["stack"]], None),
                    (r["cpu_cores"]["nginx"], NGINX_COLOUR, None),
                    (r["cpu_cores"]["redis"], REDIS_COLOUR, None)], ""),
    ]
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">',
           f'<rect width="{W}" height="{H}" fill="white"/>',
           f'<text x="80" y="24" font-size="15">Fleet side by side: 2 hosts x 2 server processes, Redis 7 Cluster, '
           f'{a.conns:,} connections, {a.rate:,} msg/s</text>',
           f'<text x="80" y="42" fill="#555">rooms {esc(a.rooms)}; heartbeats {esc(a.plan["ping"])} ms; '
           f'left pair of bars: through nginx, right pair: direct</text>']
    for (title, logscale, values, unit), (ox, oy) in zip(panels, origins):
        vals = []
        for m in modes:
            for s in stacks:
                r = rs.get((s, m))
                if r:
                    segs = [v for v in values(r) if v[0] is not None]
                    vals.append(sum(v[0] for v in segs) if not logscale else max([v[0] for v in segs] or [0]))
        vmax = max([v for v in vals if v] or [1])
        if logscale:
            lo = 10 ** math.floor(math.log10(max(min([v for v in vals if v and v > 0] or [1]), 1e-3)))
            hi = 10 ** math.ceil(math.log10(vmax * 2))
            hi = hi if hi > lo else lo * 10

            def sy(v, lo=lo, hi=hi):
                v = max(v, lo)
                return oy + PH - (math.log10(v) - math.log10(lo)) / (math.log10(hi) - math.log10(lo)) * PH
            ticks = [10 ** e for e in range(int(round(math.log10(lo))), int(round(math.log10(hi))) + 1)]
        else:
            raw = vmax * 1.1 / 5
            mag = 10 ** math.floor(math.log10(raw)) if raw > 0 else 1
            step = next(m * mag for m in (1, 2, 2.5, 5, 10) if raw <= m * mag)
            hi = step * math.ceil(vmax * 1.1 / step)

            def sy(v, hi=hi):
                return oy + PH - v / hi * PH
            ticks = [step * i for i in range(int(round(hi / step)) + 1)]
        out.append(f'<text x="{ox}" y="{oy - 10}" font-size="13">{esc(title)}</text>')
        for tv in ticks:
            y = sy(tv)
            out.append(f'<line x1="{ox}" y1="{y:.1f}" x2="{ox + PW}" y2="{y:.1f}" stroke="#eee"/>')
            # Whole numbers with thousands separators; others as written (1.25, not "1").
            label = f"{tv:,.0f}" if float(tv).is_integer() else f"{tv:g}"
            out.append(f'<text x="{ox - 6}" y="{y + 4:.1f}" text-anchor="end">{label}</text>')
        out.append(f'<rect x="{ox}" y="{oy}" width="{PW}" height="{PH}" fill="none" stroke="#333"/>')
        group_w = PW / max(1, len(modes))
        bar_w = min(70, group_w / (len(stacks) + 1))
        for gi, m in enumerate(modes):
            gx = ox + gi * group_w
            out.append(f'<text x="{gx + group_w / 2:.1f}" y="{oy + PH + 16}" text-anchor="middle">{esc(MODES[m])}</text>')
            for si, s in enumerate(stacks):
                r = rs.get((s, m))
                if not r:
                    continue
                x = gx + (group_w - len(stacks) * bar_w) / 2 + si * bar_w
                base = 0.0
                segs = values(r)
                if logscale:
                    v, colour, tick = segs[0]
                    if v is None:
                        continue
                    y = sy(v)
                    out.append(f'<rect x="{x + 4:.1f}" y="{y:.1f}" width="{bar_w - 8:.1f}" height="{oy + PH - y:.1f}" fill="{colour}"/>')
                    if tick:
                        ty = sy(tick)
                        out.append(f'<line x1="{x + 2:.1f}" y1="{ty:.1f}" x2="{x + bar_w - 2:.1f}" y2="{ty:.1f}" stroke="black" stroke-width="2"/>')
                    out.append(f'<text x="{x + bar_w / 2:.1f}" y="{y - 4:.1f}" text-anchor="middle" font-size="11">{v:,.{0 if v >= 100 else 1}f}{unit and " " + unit}</text>')
                    continue
                for v, colour, _ in segs:
                    if v is None:
                        continue
                    y0, y1 = sy(base), sy(base + v)
                    out.append(f'<rect x="{x + 4:.1f}" y="{y1:.1f}" width="{bar_w - 8:.1f}" height="{y0 - y1:.1f}" fill="{colour}"/>')
                    base += v
                out.append(f'<text x="{x + bar_w / 2:.1f}" y="{sy(base) - 4:.1f}" text-anchor="middle" font-size="11">{base:.2f}</text>')
    # Legend.
    lx, ly = 80, H - 22
    for key, colour in [(f"Socket.IO {a.socketio} + sharded Redis adapter", COLOURS["socketio"]),
                        (a.tunegate, COLOURS["tunegate"]), ("nginx", NGINX_COLOUR), ("Redis", REDIS_COLOUR),
                        ("Redis commands but SPUBLISH", OTHER_COLOUR)]:
        out.append(f'<rect x="{lx}" y="{ly - 10}" width="14" height="12" fill="{colour}"/>')
        out.append(f'<text x="{lx + 20}" y="{ly}">{esc(key)}</text>')
        lx += 30 + 6.5 * len(key)
    out.append("</svg>")
    return "\n".join(out) + "\n"


def main():
    ap = argparse.ArgumentParser()
    for k in ("work", "out", "runs", "invocation", "rooms", "ping", "nginx-version", "redis-version",
              "tunegate", "node", "socketio", "adapter", "redis-client"):
        ap.add_argument("--" + k, required=True)
    for k in ("conns", "rate", "seconds", "hold", "payload", "load-processes", "per-source",
              "nginx-workers", "nginx-nofile"):
        ap.add_argument("--" + k, type=int, required=True)
    a = ap.parse_args()
    a.plan = {"ping": a.ping}
    runs = [analyse(a.work, r) for r in a.runs.split()]
    md = markdown(a, runs)
    doc = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": a.invocation,
        "plan": {"connections": a.conns, "rooms": a.rooms, "rate": a.rate, "seconds": a.seconds,
                 "hold": a.hold, "payload": a.payload, "heartbeats_ms": a.ping,
                 "load_processes": a.load_processes, "per_source": a.per_source},
        "versions": {"tunegate": a.tunegate, "node": a.node, "socket.io": a.socketio,
                     "@socket.io/redis-adapter": a.adapter, "redis (node)": a.redis_client,
                     "redis-server": a.redis_version, "nginx": a.nginx_version},
        "nginx": {"workers": a.nginx_workers, "worker_rlimit_nofile": a.nginx_nofile,
                  "note": "each proxied connection costs nginx two descriptors: the descriptor limit bounds the proxied count"},
        "runs": runs,
    }
    with open(a.out + ".json", "w") as f:
        json.dump(doc, f, indent=2)
    with open(a.out + ".md", "w") as f:
        f.write(md)
    with open(a.out + ".svg", "w") as f:
        f.write(svg(runs, a))
    print(md, end="")


if __name__ == "__main__":
    main()

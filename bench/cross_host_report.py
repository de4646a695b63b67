#!/usr/bin/env python3
"""The report of bench/cross-host.sh: reads what the run left in --work, checks the traffic
phase against its ideal, and writes --out.md and --out.json. Exit status 1 when a check failed.
"""
import argparse
import datetime
import json
import os
import platform
import re
import sys

HZ = os.sysconf("SC_CLK_TCK")


def load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def traffic_counters(path, hosts, per_host):
    """Per worker (global index): room messages received from Redis; per host: Redis totals."""
    per_worker = [None] * (hosts * per_host)
    per_host_totals = [dict() for _ in range(hosts)]
    for line in open(path):
        parts = line.split()
        if len(parts) != 3:
            continue
        h, name, value = int(parts[0]), parts[1], int(float(parts[2]))
        m = re.match(r'tunegate_bus_room_messages_received_total\{worker="(\d+)"\}', name)
        if m:
            per_worker[h * per_host + int(m.group(1))] = value
        elif name.startswith("tunegate_bus_redis_"):
            per_host_totals[h][name[len("tunegate_bus_redis_"):]] = value
    return per_worker, per_host_totals


def check_traffic(c, per_worker, totals, hosts, per_host, problems):
    if c is None or "failed" in c:
        problems.append("traffic: " + (c or {}).get("failed", "the client wrote no results"))
        return
    d = c["delivery"]
    for k in ("missing", "duplicates", "misdelivered", "error_replies", "closed_connections"):
        if d[k]:
            problems.append(f"traffic delivery: {k} = {d[k]}")
    spub = c["redis"]["spublish_calls"]
    if spub != d["sent"]:
        problems.append(f"SPUBLISH calls on the masters: {spub}, publishes: {d['sent']}")
    ideal = c["ideal"]["received_per_worker"]
    if per_worker != ideal:
        problems.append(f"room messages received per worker {per_worker}, ideal {ideal}")
    dropped = sum(t.get("dropped_total", 0) for t in totals)
    if dropped:
        problems.append(f"tunegate_bus_redis_dropped_total: {dropped}")


def traffic_lines(c, per_worker, hosts, per_host):
    if c is None or "failed" in c:
        return []
    d, ideal = c["delivery"], c["ideal"]["received_per_worker"]
    lines = [
        f"Traffic, exact: {hosts} hosts x {per_host} workers, {c['config']['clients']:,} clients "
        f"spread over the hosts at random, {d['sent']:,} room messages into "
        f"{sum(b['rooms'] for b in c['buckets']):,} rooms (the bus-traffic mix).",
        "",
        "| Host | Worker | Room messages from Redis (ideal) | Received (server counter) |",
        "|:---|---:|---:|---:|",
    ]
    for i, (want, got) in enumerate(zip(ideal, per_worker)):
        lines.append(f"| {i // per_host} | {i % per_host} | {want:,} | "
                     f"{got:,}" + ("" if got == want else " (!)") + " |")
    spub = c["redis"]["spublish_calls"]
    lines += [
        "",
        f"SPUBLISH calls on the masters (INFO commandstats, reset before publishing): "
        f"**{spub:,} for {d['sent']:,} publishes ({spub / d['sent']:.4f} per publish)**. "
        f"Ideal receptions per publish: the worker processes other than the publisher's that "
        f"hold a member of the room ({sum(ideal):,} in all, {sum(ideal) / d['sent']:.2f} per "
        f"publish; a send-to-all bus: {hosts * per_host - 1} per publish). Delivery to clients: "
        f"{d['received']:,} of {d['expected']:,}, {d['missing']} missing, {d['duplicates']} "
        f"duplicates, {d['misdelivered']} misdelivered.",
        "",
    ]
    return lines


def cores(cpu, key):
    secs = cpu["t2"] - cpu["t1"]
    return cpu[key] / HZ / secs if secs > 0 else 0.0


def load_row(name, o, cpu, redis):
    if o is None:
        return f"| {name} | no result | | | | | | |"
    lat = o["latency"]
    spub = f"{cpu['spublish'] / o['sent']:.3f}" if redis and o["sent"] else "n/a"
    rc = f"{cores(cpu, 'redis_ticks'):.2f}" if redis else "n/a"
    return (f"| {name} | {o['tally']['opened'] if 'tally' in o else o['opened']:,} of "
            f"{o['connections']:,} | {o['sent']:,} ({o['publish_rate_achieved']:,.0f}/s) | "
            f"{o['received']:,} of {o['expected']:,} | {o['lost']:,} | "
            f"{lat['p50_ms']:.2f} / {lat['p99_ms']:.2f} / {lat['p999_ms']:.1f} | "
            f"{cores(cpu, 'workers_ticks'):.2f} | {rc} | {spub} |")


def main():
    p = argparse.ArgumentParser()
    for a in ("work", "out", "invocation", "tunegate", "idle_with", "idle_without"):
        p.add_argument("--" + a.replace("_", "-"), default="")
    p.add_argument("--hosts", type=int, required=True)
    p.add_argument("--per-host", type=int, required=True)
    p.add_argument("--traffic-rc", type=int, default=0)
    p.add_argument("--traffic-clients", type=int, default=1)
    for a in ("rooms", "rate", "seconds"):
        p.add_argument("--" + a, default="")
    a = p.parse_args()
    w = a.work
    problems = []

    c, per_worker, totals, lines = None, None, None, []
    if a.traffic_clients > 0:
        c = load(f"{w}/traffic.json")
        per_worker, totals = traffic_counters(f"{w}/traffic-metrics.txt", a.hosts, a.per_host)
        check_traffic(c, per_worker, totals, a.hosts, a.per_host, problems)
        lines = traffic_lines(c, per_worker, a.hosts, a.per_host)

    runs = {n: (load(f"{w}/load-{n}.json"), load(f"{w}/cpu-{n}.json")) for n in ("hosts", "one")}
    for n, (o, cpu) in runs.items():
        if o is None or cpu is None:
            problems.append(f"load {n}: no result")
    redis_counts = load(f"{w}/redis-counters.json") or {}
    workers = a.hosts * a.per_host
    lines += [
        f"Load: rooms {a.rooms}, {a.rate} messages/s for {a.seconds} s "
        f"(`tunegate load`, connections spread over the hosts by a hash of their index).",
        "",
        "| Setup | Connections | Messages sent | Deliveries | Lost | Latency p50 / p99 / p99.9 (ms) | Worker CPU (cores) | Redis CPU (cores) | SPUBLISH per publish |",
        "|:---|---:|---:|---:|---:|---:|---:|---:|---:|",
        load_row(f"{a.hosts} hosts x {a.per_host} workers, Redis Cluster bus", *runs["hosts"], True),
        load_row(f"1 host, {workers} workers, unix bus", *runs["one"], False),
    ]
    (oh, _), (oo, _) = runs["hosts"], runs["one"]
    if oh and oo:
        lines += [
            "",
            "Added by the Redis hop (across hosts minus one host): p50 %+.2f ms, p99 %+.2f ms. "
            "Across hosts the workers received %s room messages from Redis and dropped %s." % (
                oh["latency"]["p50_ms"] - oo["latency"]["p50_ms"],
                oh["latency"]["p99_ms"] - oo["latency"]["p99_ms"],
                f"{redis_counts.get('received', 0):,}", f"{redis_counts.get('dropped', 0):,}"),
        ]
    idle = {}
    for mode, path in (("without", a.idle_without), ("with", a.idle_with)):
        r = load(path) if path else None
        if r:
            idle[mode] = r["results"][0]["rss_bytes_per_conn"]
    if idle:
        lines += ["", "Memory per idle connection, one `serve --threads 1`: %s B without the bus, "
                  "%s B with `--bus`." % (idle.get("without", "?"), idle.get("with", "?"))]
    lines += ["", f"Command: `{a.invocation}`", "",
              f"{a.tunegate}, kernel {platform.release()}, {os.cpu_count()} CPUs; Redis "
              f"{os.popen('redis-server --version').read().split()[2]}."]
    if problems:
        lines += ["", "Problems:"] + ["- " + x for x in problems]
    md = "\n".join(lines) + "\n"
    print(md, end="")
    with open(a.out + ".md", "w") as f:
        f.write(md)
    with open(a.out + ".json", "w") as f:
        json.dump({
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "tunegate": a.tunegate, "command": a.invocation, "hosts": a.hosts,
            "per_host": a.per_host, "traffic": c, "traffic_received_per_worker": per_worker,
            "traffic_redis_per_host": totals, "load": {n: {"outcome": o, "cpu": cpu}
                                                       for n, (o, cpu) in runs.items()},
            "redis_counters": redis_counts, "idle_bytes_per_connection": idle,
            "problems": problems,
        }, f, indent=2)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())

"""Rooms, direct messages and counts across hosts joined by a Redis 7 Cluster, checked with
Python's `websockets` (a client we did not write) against `tunegate serve --bus redis://...`
processes on their own loopback addresses.

    cross_host.py steady URL...
        Members of one room on every host, a non-member on every host, a publisher on each
        of the first two: every member gets every other publisher's message exactly once and
        in that publisher's order, non-members get nothing; `joined`, `count` and `left`
        count every host; `send` reaches a connection on another host, and a `send` to a
        connection gone from another host, or to a process that never was, answers
        `no_such_connection`.

    cross_host.py idle_cost URL_A URL_B PORT
        150 rooms, each with a member on A and one on B (300 room-process pairs); with no
        message and no join, the commands the hosts make the cluster (nodes on PORT..PORT+5,
        replicas included) run in 12 s (two lease periods and more) are fewer than half the
        rooms: the standing cost is per process, not per room. The counts stay right meanwhile. Prints the figure.

    cross_host.py host_killed URL_A URL_B PID_B
        Members on both hosts; SIGKILLs B. A's clients keep their connections and their room;
        A's count of the room converges to A's members within the lease (15 s, plus 3 s).
        Prints the seconds it took.

    cross_host.py host_stopped URL_A URL_B PID_B
        Members on both hosts; SIGTERMs B (a clean stop). A's count of the room drops to A's
        members within 3 s, and a `send` to B's connection answers `no_such_connection` within
        3 s (B gave its alive lease back).

    cross_host.py failover URL_A URL_B CLUSTER_DIR PORT
        A publisher on A, a member on B, 20 messages/s; SIGKILLs the master (its pid in
        CLUSTER_DIR/PORT.pid; the cluster answers on PORT) that owns the room's channel. No
        client is disconnected, the room's traffic resumes (the last 100 messages all arrive),
        and direct messages cross again. Prints how many messages the failover lost.

    cross_host.py local URL
        With the cluster out of reach (the host notices within 20 s): the host still serves its
        own rooms (publish reaches a local member, counts are this host's, answered at once)
        and says so in /metrics.

    cross_host.py resume URL_A URL_B
        After the cluster came (back): within 20 s a member on B receives what A publishes,
        direct messages cross, and the count covers both hosts.

Prints "cross_host: ok ..." and exits 0 when every check passes; raises otherwise. Bounded:
every wait has a deadline.
"""

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

from websockets.asyncio.client import connect
from websockets.protocol import State

TIMEOUT = 5


async def recv(ws, timeout=TIMEOUT):
    return json.loads(await asyncio.wait_for(ws.recv(), timeout))


async def ask(ws, msg):
    await ws.send(json.dumps(msg))
    return await recv(ws)


async def open_client(url):
    ws = await connect(url, max_size=None, ping_interval=None)
    hello = await recv(ws)
    assert hello["op"] == "hello", hello
    return ws, hello["id"]


async def silent(ws, seconds):
    """Nothing arrives on `ws` for `seconds`."""
    try:
        got = await recv(ws, seconds)
    except asyncio.TimeoutError:
        return
    raise AssertionError(f"expected nothing, got {got}")


async def join(ws, room):
    r = await ask(ws, {"op": "join", "room": room})
    assert r["op"] == "joined", r
    return r["members"]


async def count(ws, room):
    r = await ask(ws, {"op": "count", "room": room})
    assert r["op"] == "count", r
    return r["members"]


def metrics(url):
    http = url.replace("ws://", "http://").rstrip("/") + "/metrics"
    with urllib.request.urlopen(http, timeout=TIMEOUT) as r:
        text = r.read().decode()
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = int(value)
    return values


async def wait_until(what, check, limit):
    deadline = time.monotonic() + limit
    while True:
        if await check():
            return
        assert time.monotonic() < deadline, f"timed out after {limit} s waiting for {what}"
        await asyncio.sleep(0.2)


async def collect(ws, n, timeout=TIMEOUT):
    out = []
    for _ in range(n):
        out.append(await recv(ws, timeout))
    return out


async def steady(urls):
    assert len(urls) >= 2
    room = "steady"
    members = []  # (host index, ws, id)
    for h, url in enumerate(urls):
        for _ in range(2):
            ws, cid = await open_client(url)
            members.append((h, ws, cid))
    joined = [await join(ws, room) for _, ws, _ in members]
    assert joined == list(range(1, len(members) + 1)), f"joined counts {joined}"
    outsiders = [await open_client(url) for url in urls]
    for ws, _ in outsiders:
        assert await count(ws, room) == len(members)

    # Two publishers on two hosts, interleaved; everyone but the publisher hears each.
    publishers = [members[0], members[2]]
    per = 50
    for i in range(per):
        for p, (_, ws, _) in enumerate(publishers):
            await ws.send(json.dumps({"op": "publish", "room": room, "data": {"p": p, "i": i}}))
    for h, ws, cid in members:
        mine = [p for p, (_, _, pid) in enumerate(publishers) if pid == cid]
        expected = per * (len(publishers) - len(mine))
        got = await collect(ws, expected)
        for p, (_, _, pid) in enumerate(publishers):
            seq = [m["data"]["i"] for m in got if m["data"]["p"] == p]
            assert all(m["from"] == pid for m in got if m["data"]["p"] == p)
            if p in mine:
                assert seq == [], f"member {cid} got its own messages"
            else:
                assert seq == list(range(per)), f"member {cid} on host {h}, publisher {p}: {seq}"
    for ws, _ in outsiders:
        await silent(ws, 0.5)
    for _, ws, _ in members:
        await silent(ws, 0.1)

    # Direct messages both ways between hosts.
    (_, a, a_id), (_, b, b_id) = members[0], members[2]
    await a.send(json.dumps({"op": "send", "to": b_id, "data": "ab", "ref": 1}))
    assert (await recv(a))["op"] == "sent"
    d = await recv(b)
    assert (d["op"], d["from"], d["data"]) == ("direct", a_id, "ab"), d
    await b.send(json.dumps({"op": "send", "to": a_id, "data": "ba"}))
    d = await recv(a)
    assert (d["op"], d["from"], d["data"]) == ("direct", b_id, "ba"), d

    # A connection gone from another host, and a process that never was.
    _, gone, gone_id = members[3]
    await gone.close()
    expect = len(members) - 1
    await wait_until("the count to drop", lambda: count_is(a, room, expect), 5)
    members.pop(3)
    for target, ref in [(gone_id, 2), (gone_id ^ (0x5A << 33), 3)]:
        await a.send(json.dumps({"op": "send", "to": target, "data": "x", "ref": ref}))
        r = await recv(a)
        if r["op"] == "sent":
            r = await recv(a)
        assert (r["op"], r.get("code"), r["ref"]) == ("error", "no_such_connection", ref), r

    # Leaving counts everywhere.
    r = await ask(b, {"op": "leave", "room": room})
    assert (r["op"], r["members"]) == ("left", expect - 1), r
    for ws, _ in outsiders:
        assert await count(ws, room) == expect - 1
    print(f"cross_host: ok steady ({len(urls)} hosts, {len(members) + 1} members, "
          f"{per * len(publishers)} messages)")


async def count_is(ws, room, n):
    return await count(ws, room) == n


async def host_killed(url_a, url_b, pid_b):
    room = "doomed"
    a = [await open_client(url_a) for _ in range(2)]
    b = [await open_client(url_b) for _ in range(2)]
    for ws, _ in a + b:
        await join(ws, room)
    assert await count(a[0][0], room) == 4
    os.kill(pid_b, signal.SIGKILL)
    t0 = time.monotonic()
    await wait_until("A's count to forget B", lambda: count_is(a[0][0], room, 2), 18)
    took = time.monotonic() - t0
    # A's clients kept their connections and their room.
    for ws, _ in a:
        assert ws.state == State.OPEN
    await a[0][0].send(json.dumps({"op": "publish", "room": room, "data": "still"}))
    m = await recv(a[1][0])
    assert (m["op"], m["data"]) == ("message", "still"), m
    print(f"cross_host: ok host_killed (count converged after {took:.1f} s)")


async def host_stopped(url_a, url_b, pid_b):
    room = "leaving"
    a, _ = await open_client(url_a)
    b, b_id = await open_client(url_b)
    await join(a, room)
    await join(b, room)
    assert await count(a, room) == 2
    os.kill(pid_b, signal.SIGTERM)
    t0 = time.monotonic()
    await wait_until("A's count to drop B's member", lambda: count_is(a, room, 1), 3)
    took = time.monotonic() - t0

    async def bounced():
        await a.send(json.dumps({"op": "send", "to": b_id, "data": "x", "ref": 7}))
        while True:
            r = await recv(a)
            if r["op"] == "error":
                return r.get("code") == "no_such_connection"
            if r["op"] == "sent":
                try:
                    r = await recv(a, 1)
                except asyncio.TimeoutError:
                    return False
                return r.get("code") == "no_such_connection"

    await wait_until("a send to B's connection to bounce", bounced, 3)
    print(f"cross_host: ok host_stopped (count dropped after {took:.2f} s)")


def master_of(port, channel):
    slot = int(subprocess.check_output(["redis-cli", "-p", str(port), "cluster", "keyslot", channel]))
    nodes = subprocess.check_output(["redis-cli", "-p", str(port), "cluster", "nodes"]).decode()
    for line in nodes.splitlines():
        f = line.split()
        if "master" not in f[2] or "fail" in f[2]:
            continue
        for span in f[8:]:
            lo, _, hi = span.partition("-")
            if int(lo) <= slot <= int(hi or lo):
                return int(f[1].split(":")[1].split("@")[0])
    raise AssertionError(f"no master owns slot {slot}")


async def failover(url_a, url_b, cluster_dir, port):
    room = "failover"
    pub, pub_id = await open_client(url_a)
    sub, sub_id = await open_client(url_b)
    await join(sub, room)
    master = master_of(port, "tg:r:{%s}" % room)
    seed = port if master != port else port + 1
    got = []

    async def reader():
        while True:
            m = await recv(sub, 30)
            if m["op"] == "message":
                if got and m["data"] != got[-1] + 1:
                    print(f"gap {got[-1]}..{m['data']} at {time.time():.2f}", flush=True)
                got.append(m["data"])

    task = asyncio.create_task(reader())
    total, kill_at = 300, 60
    for i in range(total):
        await pub.send(json.dumps({"op": "publish", "room": room, "data": i}))
        if i == kill_at:
            with open(os.path.join(cluster_dir, f"{master}.pid")) as f:
                os.kill(int(f.read().strip()), signal.SIGKILL)
            print(f"killed master {master} at {time.time():.2f}", flush=True)
        await asyncio.sleep(0.05)
    deadline = time.monotonic() + 10
    while (not got or got[-1] != total - 1) and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        pass
    assert pub.state == State.OPEN and sub.state == State.OPEN, "a client was disconnected"
    assert got == sorted(set(got)), "duplicated or out of order"
    tail = list(range(total - 100, total))
    missing = sorted(set(range(total)) - set(got))
    assert got[-100:] == tail, f"traffic did not resume: missing {missing}"
    lost = total - len(got)
    await pub.send(json.dumps({"op": "send", "to": sub_id, "data": "after"}))
    d = await recv(sub, 10)
    assert (d["op"], d["data"]) == ("direct", "after"), d
    # The master that failed over is a different one now.
    assert master_of(seed, "tg:r:{%s}" % room) != master
    print(f"cross_host: ok failover (lost {lost} of {total} messages at 20/s)")


async def local(url):
    async def disconnected():
        return metrics(url)["tunegate_bus_redis_connected"] == 0

    await wait_until("the host to notice the cluster is gone", disconnected, 20)
    room = "alone"
    a, _ = await open_client(url)
    b, _ = await open_client(url)
    assert await join(a, room) == 1
    assert await join(b, room) == 2
    await a.send(json.dumps({"op": "publish", "room": room, "data": "here"}))
    m = await recv(b)
    assert (m["op"], m["data"]) == ("message", "here"), m
    assert await count(a, room) == 2
    print("cross_host: ok local (served without the cluster)")


async def resume(url_a, url_b):
    room = "resumed"
    a, a_id = await open_client(url_a)
    b, b_id = await open_client(url_b)
    await join(a, room)
    await join(b, room)
    n = 0

    async def crossed():
        nonlocal n
        n += 1
        await a.send(json.dumps({"op": "publish", "room": room, "data": n}))
        try:
            while True:
                m = await recv(b, 0.5)
                if m["op"] == "message" and m["data"] == n:
                    return True
        except asyncio.TimeoutError:
            return False

    await wait_until("a publish on A to reach B", crossed, 20)
    await wait_until("the count to cover both hosts", lambda: count_is(a, room, 2), 10)
    await a.send(json.dumps({"op": "send", "to": b_id, "data": "hi"}))
    while True:
        d = await recv(b)
        if d["op"] == "direct":
            break
    assert (d["from"], d["data"]) == (a_id, "hi"), d
    print("cross_host: ok resume")


def cluster_calls(port):
    """Commands every node of the cluster on port..port+5 ran since its stats were reset:
    the total, and per command."""
    by = {}
    for p in range(port, port + 6):
        out = subprocess.run(["redis-cli", "-p", str(p), "info", "commandstats"],
                             capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("cmdstat_"):
                name = line.split(":", 1)[0][len("cmdstat_"):]
                calls = int(line.split("calls=", 1)[1].split(",", 1)[0])
                by[name] = by.get(name, 0) + calls
    return sum(by.values()), by


async def idle_cost(url_a, url_b, port):
    rooms = 150
    held = []
    for i in range(rooms):
        a, _ = await open_client(url_a)
        b, _ = await open_client(url_b)
        await join(a, f"idle-{i}")
        await join(b, f"idle-{i}")
        held += [a, b]
    await asyncio.sleep(1)  # the joins' own commands are done
    for p in range(port, port + 6):
        subprocess.run(["redis-cli", "-p", str(p), "config", "resetstat"],
                       capture_output=True, check=True)
    await asyncio.sleep(12)
    _, by = cluster_calls(port)
    # Redis's own (replication heartbeats, our reset) are not the hosts'.
    calls = sum(n for c, n in by.items() if c not in ("replconf", "ping", "config|resetstat"))
    assert calls < rooms / 2, f"{calls} commands in 12 s at rest for {rooms} rooms on 2 hosts: {by}"
    assert await count(held[0], "idle-0") == 2
    assert await count(held[-1], f"idle-{rooms - 1}") == 2
    print(f"cross_host: ok idle_cost ({calls} commands in 12 s for {rooms} rooms x 2 hosts)")


def main():
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "steady":
        asyncio.run(steady(args))
    elif cmd == "idle_cost":
        asyncio.run(idle_cost(args[0], args[1], int(args[2])))
    elif cmd == "host_killed":
        asyncio.run(host_killed(args[0], args[1], int(args[2])))
    elif cmd == "host_stopped":
        asyncio.run(host_stopped(args[0], args[1], int(args[2])))
    elif cmd == "failover":
        asyncio.run(failover(args[0], args[1], args[2], int(args[3])))
    elif cmd == "local":
        asyncio.run(local(args[0]))
    elif cmd == "resume":
        asyncio.run(resume(args[0], args[1]))
    else:
        raise SystemExit(f"unknown command {cmd}")


if __name__ == "__main__":
    main()

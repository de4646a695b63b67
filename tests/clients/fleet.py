"""The fleet through nginx: clients (Python `websockets`, which we did not write) connect to one
nginx in front of two `tunegate serve --bus` hosts (node 1 and node 2) joined by a Redis
Cluster. Each client binds its own source address (127.0.0.101, .102, ...), as clients behind a
real load balancer come from their own addresses.

    fleet.py sticky URL
        From 16 source addresses, 3 connections each: every connection from one address lands
        on the same host (the node in its id), and both hosts get clients.

    fleet.py rooms URL
        12 members from 12 addresses, spread over both hosts: a publisher on each host
        publishes 30 messages; every other member gets each exactly once, in order.

    fleet.py host_stopped URL PID NODE
        12 members; SIGTERM to the host of node NODE (pid PID): its clients get Close 1001,
        reconnect through nginx from the same address, land on the other host, and rejoin;
        the count converges to 12; no message published after they rejoined is lost.

    fleet.py trusted_proxy NGINX_URL DIRECT_URL
        One host started with --trusted-proxy (nginx's address) and
        --max-connections-per-address 3. Through nginx the limit counts each client's own
        address (from the X-Forwarded-For nginx adds): a 4th connection from one address gets
        429 while another address still gets 3; a client forging X-Forwarded-For through nginx
        is counted as itself; a closed connection gives its place back. Straight to the host
        (a peer not trusted), forged headers are ignored: the 4th connection from one address
        gets 429 whatever address it claims. The host's /metrics counts all of it.

Prints "fleet: ok ..." and exits 0 when every check passes; raises otherwise. Bounded: every
wait has a deadline.
"""

import asyncio
import json
import os
import signal
import sys
import time
import urllib.request

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

TIMEOUT = 5


def node_of(conn_id):
    return conn_id >> 45


def source(i):
    return f"127.0.0.{101 + i}"


async def recv(ws, timeout=TIMEOUT):
    return json.loads(await asyncio.wait_for(ws.recv(), timeout))


async def open_client(url, i):
    ws = await connect(url, max_size=None, ping_interval=None, local_addr=(source(i), 0))
    hello = await recv(ws)
    assert hello["op"] == "hello", hello
    return ws, hello["id"]


async def join(ws, room):
    await ws.send(json.dumps({"op": "join", "room": room}))
    r = await recv(ws)
    assert r["op"] == "joined", r
    return r["members"]


async def count(ws, room):
    await ws.send(json.dumps({"op": "count", "room": room}))
    r = await recv(ws)
    assert r["op"] == "count", r
    return r["members"]


async def wait_until(what, check, limit):
    deadline = time.monotonic() + limit
    while not await check():
        assert time.monotonic() < deadline, f"timed out after {limit} s waiting for {what}"
        await asyncio.sleep(0.2)


async def sticky(url):
    nodes = {}
    for i in range(16):
        seen = set()
        for _ in range(3):
            ws, cid = await open_client(url, i)
            seen.add(node_of(cid))
            await ws.close()
        assert len(seen) == 1, f"{source(i)} landed on nodes {seen}"
        nodes[source(i)] = seen.pop()
    assert len(set(nodes.values())) == 2, f"one host got every address: {nodes}"
    print(f"fleet: ok sticky ({sorted(nodes.values()).count(1)} addresses on node 1, "
          f"{sorted(nodes.values()).count(2)} on node 2)")


async def members(url, room, n=12):
    out = []
    for i in range(n):
        ws, cid = await open_client(url, i)
        await join(ws, room)
        out.append([ws, cid, i])
    return out


async def publish_and_check(clients, room, publishers, per):
    """Each publisher sends `per` messages; every other member gets each once, in order."""
    for q in range(per):
        for p in publishers:
            await clients[p][0].send(json.dumps(
                {"op": "publish", "room": room, "data": {"p": p, "q": q}}))
    for k, (ws, cid, _) in enumerate(clients):
        want = per * sum(1 for p in publishers if p != k)
        got = [(await recv(ws))["data"] for _ in range(want)]
        for p in publishers:
            seq = [d["q"] for d in got if d["p"] == p]
            assert seq == ([] if p == k else list(range(per))), (k, p, seq)


async def rooms(url):
    room = "fleet"
    clients = await members(url, room)
    on = {node_of(c[1]) for c in clients}
    assert on == {1, 2}, f"members only on {on}"
    assert await count(clients[0][0], room) == len(clients)
    first = {}
    for k, c in enumerate(clients):
        first.setdefault(node_of(c[1]), k)
    await publish_and_check(clients, room, sorted(first.values()), 30)
    print(f"fleet: ok rooms ({len(clients)} members on both hosts, 60 messages)")


async def host_stopped(url, pid, node):
    room = "moving"
    clients = await members(url, room)
    doomed = [k for k, c in enumerate(clients) if node_of(c[1]) == node]
    assert doomed and len(doomed) < len(clients), "both hosts need members"
    os.kill(pid, signal.SIGTERM)
    for k in doomed:
        ws = clients[k][0]
        try:
            while True:
                await recv(ws, 10)
        except ConnectionClosed:
            pass
        assert ws.close_code == 1001, f"member {k} closed with {ws.close_code}"
    for k in doomed:
        ws, cid, i = clients[k]
        ws, cid = await open_client(url, i)
        assert node_of(cid) != node, f"{source(i)} came back to the stopped host"
        await join(ws, room)
        clients[k] = [ws, cid, i]

    async def whole():
        return await count(clients[0][0], room) == len(clients)

    await wait_until("the count to converge", whole, 20)
    await publish_and_check(clients, room, [doomed[0], 0 if doomed[0] else 1], 20)
    print(f"fleet: ok host_stopped ({len(doomed)} of {len(clients)} members moved)")


async def try_open(url, addr, headers=None):
    """An open client, or the HTTP status the upgrade was refused with."""
    try:
        ws = await connect(url, max_size=None, ping_interval=None, local_addr=(addr, 0),
                           additional_headers=headers or {}, open_timeout=TIMEOUT)
    except InvalidStatus as e:
        return e.response.status_code
    hello = await recv(ws)
    assert hello["op"] == "hello", hello
    return ws


async def open_n(url, addr, n, headers=None):
    out = []
    for k in range(n):
        ws = await try_open(url, addr, headers(k) if headers else None)
        assert not isinstance(ws, int), f"connection {k + 1} from {addr} refused: {ws}"
        out.append(ws)
    return out


def metrics(direct_url):
    base = direct_url.replace("ws://", "http://").rstrip("/")
    with urllib.request.urlopen(base + "/metrics", timeout=TIMEOUT) as r:
        text = r.read().decode()
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


async def trusted_proxy(nginx_url, direct_url):
    limit = 3
    a, b, forger, direct = "127.0.0.121", "127.0.0.122", "127.0.0.123", "127.0.0.124"
    held_a = await open_n(nginx_url, a, limit)
    assert await try_open(nginx_url, a) == 429, f"a 4th from {a} through nginx was not refused"
    held_b = await open_n(nginx_url, b, limit)
    # Claiming to be `a` (full) through nginx: nginx appends the real address, which counts.
    held_f = await open_n(nginx_url, forger, limit, lambda k: {"X-Forwarded-For": a})
    # A place given back is taken again.
    await held_a.pop().close()

    async def a_admitted():
        ws = await try_open(nginx_url, a)
        if isinstance(ws, int):
            return False
        held_a.append(ws)
        return True

    await wait_until(f"{a} to get its place back", a_admitted, 10)
    # Straight to the host: forged addresses are not believed; the peer counts.
    held_d = await open_n(direct_url, direct, limit,
                          lambda k: {"X-Forwarded-For": f"198.51.100.{k}", "X-Real-IP": f"198.51.100.{k}"})
    refused = await try_open(direct_url, direct, {"X-Forwarded-For": "198.51.100.99"})
    assert refused == 429, f"a 4th straight from {direct} claiming another address: {refused}"
    m = metrics(direct_url)
    forwarded = m["tunegate_upgrades_forwarded_total"]
    ignored = m["tunegate_forwarded_headers_ignored_total"]
    limited = m['tunegate_connections_closed_total{reason="address_limit"}']
    assert forwarded >= 3 * limit + 1, f"upgrades forwarded: {forwarded}"
    assert ignored == limit + 1, f"forwarded headers ignored: {ignored}"
    assert limited >= 2, f"refused by the address limit: {limited}"
    for ws in held_a + held_b + held_f + held_d:
        await ws.close()
    print(f"fleet: ok trusted_proxy ({forwarded:.0f} forwarded, {ignored:.0f} ignored, "
          f"{limited:.0f} refused)")


def main():
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "sticky":
        asyncio.run(sticky(args[0]))
    elif cmd == "rooms":
        asyncio.run(rooms(args[0]))
    elif cmd == "trusted_proxy":
        asyncio.run(trusted_proxy(args[0], args[1]))
    elif cmd == "host_stopped":
        asyncio.run(host_stopped(args[0], int(args[1]), int(args[2])))
    else:
        raise SystemExit(f"unknown command {cmd}")


if __name__ == "__main__":
    main()

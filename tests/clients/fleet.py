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

Prints "fleet: ok ..." and exits 0 when every check passes; raises otherwise. Bounded: every
wait has a deadline.
"""

import asyncio
import json
import os
import signal
import sys
import time

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

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


def main():
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "sticky":
        asyncio.run(sticky(args[0]))
    elif cmd == "rooms":
        asyncio.run(rooms(args[0]))
    elif cmd == "host_stopped":
        asyncio.run(host_stopped(args[0], int(args[1]), int(args[2])))
    else:
        raise SystemExit(f"unknown command {cmd}")


if __name__ == "__main__":
    main()

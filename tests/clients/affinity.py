"""Room affinity checked with Python's `websockets` (a client we did not write) against
several `tunegate serve` workers on one port.

    affinity.py URL ROOM CLIENTS OUT [hello-only] [while-open=PATH]

Connects CLIENTS clients to URL with `?affinity=ROOM` (ROOM percent-encoded by
urllib.parse.quote, as a browser's encodeURIComponent would), every one joins ROOM, the first
publishes 10 messages and every other must receive each once, in order, and nothing else;
`count` must say CLIENTS. Writes {"ids": [...]} (every hello's connection id) to OUT, for the
test to tell which worker holds each. Prints "affinity: ok ..." and exits 0 when every check
passes; raises otherwise. With `hello-only`, the clients only connect and are greeted (while
the room's home is down its rooms span workers that cannot learn of each other). With
`while-open=PATH`, before closing, waits (at most TIMEOUT) for PATH to exist and writes whether
it did as "seen" in OUT: a state the server holds only while these clients are connected (a
full home's hidden socket) is looked at while they still are. Bounded: every wait has a
deadline.
"""

import asyncio
import json
import os
import sys
import urllib.parse

from websockets.asyncio.client import connect

TIMEOUT = 5


async def recv(ws):
    return json.loads(await asyncio.wait_for(ws.recv(), TIMEOUT))


async def seen_while_open(path, out, ids):
    """Waits for `path` to exist (bounded) and records in `out` whether it did."""
    if path is None:
        return
    deadline = asyncio.get_running_loop().time() + TIMEOUT
    while not os.path.exists(path) and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.05)
    with open(out, "w") as f:
        json.dump({"ids": ids, "seen": os.path.exists(path)}, f)


async def main(url, room, clients, out, hello_only, while_open):
    target = f"{url}/?affinity={urllib.parse.quote(room, safe='')}"
    conns, ids = [], []
    for _ in range(clients):
        ws = await connect(target, open_timeout=TIMEOUT)
        hello = await recv(ws)
        assert hello["op"] == "hello", hello
        conns.append(ws)
        ids.append(hello["id"])
    with open(out, "w") as f:
        json.dump({"ids": ids}, f)
    if hello_only:
        await seen_while_open(while_open, out, ids)
        for ws in conns:
            await ws.close()
        print(f"affinity: ok {clients} clients greeted")
        return
    for ws in conns:
        await ws.send(json.dumps({"op": "join", "room": room}))
        joined = await recv(ws)
        assert joined["op"] == "joined", joined
    await conns[0].send(json.dumps({"op": "count", "room": room, "ref": "n"}))
    count = await recv(conns[0])
    assert count["members"] == clients, count
    for seq in range(10):
        await conns[0].send(
            json.dumps({"op": "publish", "room": room, "data": {"seq": seq}})
        )
    for i, ws in enumerate(conns[1:], 1):
        for seq in range(10):
            m = await recv(ws)
            assert (m["op"], m["room"], m["data"]["seq"]) == ("message", room, seq), (i, m)
        await ws.send(json.dumps({"op": "count", "room": room, "ref": "sync"}))
        sync = await recv(ws)
        assert sync["ref"] == "sync", (i, "an extra message", sync)
    await seen_while_open(while_open, out, ids)
    for ws in conns:
        await ws.close()
    print(f"affinity: ok {clients} clients in {room!r}, 10 messages each")


if __name__ == "__main__":
    options = sys.argv[5:]
    hello_only = "hello-only" in options
    while_open = next((o[len("while-open="):] for o in options if o.startswith("while-open=")), None)
    assert all(o == "hello-only" or o.startswith("while-open=") for o in options), options
    asyncio.run(
        main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], hello_only, while_open)
    )

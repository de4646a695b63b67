"""Drives `tunegate serve` with Python's `websockets` library, a client we did not write.

Usage: relay_check.py ws://127.0.0.1:PORT. Exits 0 and prints "relay_check: ok" when every
check passes; raises (non-zero exit) with the failing check otherwise. Bounded: every receive
has a timeout.
"""

import asyncio
import json
import sys

import msgpack
from websockets.asyncio.client import connect

TIMEOUT = 5


async def recv_json(ws):
    frame = await asyncio.wait_for(ws.recv(), TIMEOUT)
    assert isinstance(frame, str), f"expected a text frame, got {frame!r}"
    return json.loads(frame)


async def recv_msgpack(ws):
    frame = await asyncio.wait_for(ws.recv(), TIMEOUT)
    assert isinstance(frame, bytes), f"expected a binary frame, got {frame!r}"
    return msgpack.unpackb(frame, raw=False)


async def main(url):
    a = await connect(url, max_size=None)
    b = await connect(url, max_size=None)
    c = await connect(url, max_size=None)
    m = await connect(url + "/?encoding=msgpack", max_size=None)
    hello = await recv_json(a)
    assert hello["op"] == "hello" and hello["ping_interval"] == 25000, hello
    assert hello["ping_timeout"] == 20000, hello
    for ws in (b, c):
        assert (await recv_json(ws))["op"] == "hello"
    mh = await recv_msgpack(m)
    assert mh["op"] == "hello", mh

    for ws in (a, b):
        await ws.send(json.dumps({"op": "join", "room": "room1"}))
        assert (await recv_json(ws))["op"] == "joined"
    await m.send(msgpack.packb({"op": "join", "room": "room1", "ref": 1}))
    joined = await recv_msgpack(m)
    assert joined["op"] == "joined" and joined["members"] == 3 and joined["ref"] == 1, joined
    await c.send(json.dumps({"op": "join", "room": "room2"}))
    assert (await recv_json(c))["op"] == "joined"

    # JSON publisher: the JSON member gets JSON, the MsgPack member gets MsgPack.
    await a.send(json.dumps({"op": "publish", "room": "room1", "data": {"text": "hi", "n": 3}}))
    got_b = await recv_json(b)
    assert got_b["op"] == "message" and got_b["data"] == {"text": "hi", "n": 3}, got_b
    got_m = await recv_msgpack(m)
    assert got_m["op"] == "message" and got_m["data"] == {"text": "hi", "n": 3}, got_m
    assert got_m["from"] == hello["id"], (got_m, hello)

    # MsgPack publisher with binary data: JSON members see it as an array of byte values.
    await m.send(msgpack.packb({"op": "publish", "room": "room1", "data": {"blob": b"\x00\x01\xff"}}))
    for ws in (a, b):
        got = await recv_json(ws)
        assert got["data"]["blob"] == [0, 1, 255], got

    # The non-member got nothing: its next frame answers its own request.
    await c.send(json.dumps({"op": "count", "room": "room1", "ref": "sync"}))
    count = await recv_json(c)
    assert count["op"] == "count" and count["members"] == 3 and count["ref"] == "sync", count

    # Direct message from the MsgPack client to a JSON client.
    await m.send(msgpack.packb({"op": "send", "to": hello["id"], "data": "psst"}))
    direct = await recv_json(a)
    assert direct["op"] == "direct" and direct["data"] == "psst" and direct["from"] == mh["id"], direct

    # An error is a message.
    await b.send(json.dumps({"op": "publish"}))
    err = await recv_json(b)
    assert err["op"] == "error" and err["code"] == "bad_request", err

    # Ping/pong through the library's own keepalive API.
    pong_waiter = await a.ping(b"are you there")
    await asyncio.wait_for(pong_waiter, TIMEOUT)

    # Closing handshake: the server echoes our code.
    await b.close(code=1000, reason="bye")
    assert b.close_code == 1000, b.close_code

    for ws in (a, c, m):
        await ws.close()
    print("relay_check: ok")


if __name__ == "__main__":
    asyncio.run(asyncio.wait_for(main(sys.argv[1]), 60))

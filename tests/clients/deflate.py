"""permessage-deflate in `tunegate serve --deflate on`, checked with Python's `websockets` (which
offers the extension by default) and raw sockets with Python's own zlib, both written apart
from the server.

    deflate.py rooms URL
        A (deflate, JSON), B (deflate, MsgPack) and C (no extension offered) in one room: the
        extension is agreed without context takeover for A and B and not for C; a 4 KB WebRTC
        offer from A reaches B and C, a 4 KB presence list from B reaches A and C, each intact.

    deflate.py bomb HOST PORT COUNT
        COUNT times: a raw upgrade offering the extension, then one compressed message of
        about 64 KB that inflates to 64 MiB: the server must close with 1009.

Prints "deflate: ok ..." and exits 0 when every check passes; raises otherwise.
"""

import asyncio
import base64
import json
import os
import socket
import struct
import sys
import zlib

import msgpack
from websockets.asyncio.client import connect

TIMEOUT = 5


async def recv(ws, binary=False):
    data = await asyncio.wait_for(ws.recv(), TIMEOUT)
    return msgpack.unpackb(data) if binary else json.loads(data)


def offer(n):
    lines = ["v=0", "o=- 4611731400430051336 2 IN IP4 127.0.0.1", "s=-", "t=0 0"]
    for i in range(n):
        lines.append(f"a=candidate:{i} 1 udp 2122260223 127.0.0.{i % 250 + 1} {50000 + i} typ host")
    return "\r\n".join(lines)


async def rooms(url):
    a = await connect(url + "/", max_size=None, ping_interval=None)
    b = await connect(url + "/?encoding=msgpack", max_size=None, ping_interval=None)
    c = await connect(url + "/", max_size=None, ping_interval=None, compression=None)
    for ws in (a, b):
        ext = ws.response.headers.get("Sec-WebSocket-Extensions", "")
        assert ext.startswith("permessage-deflate") and "server_no_context_takeover" in ext \
            and "client_no_context_takeover" in ext, ext
    assert c.response.headers.get("Sec-WebSocket-Extensions") is None
    ida = (await recv(a))["id"]
    idb = (await recv(b, True))["id"]
    await recv(c)
    await a.send(json.dumps({"op": "join", "room": "call"}))
    await recv(a)
    await b.send(msgpack.packb({"op": "join", "room": "call"}))
    await recv(b, True)
    await c.send(json.dumps({"op": "join", "room": "call"}))
    assert (await recv(c))["members"] == 3
    sdp = offer(60)
    await a.send(json.dumps({"op": "publish", "room": "call", "data": {"type": "offer", "sdp": sdp}}))
    for ws, binary in ((b, True), (c, False)):
        got = await recv(ws, binary)
        assert got["from"] == ida and got["data"]["sdp"] == sdp, got["op"]
    presence = [f"user-{i}@example.com" for i in range(150)]
    await b.send(msgpack.packb({"op": "publish", "room": "call", "data": presence}))
    for ws, binary in ((a, False), (c, False)):
        got = await recv(ws, binary)
        assert got["from"] == idb and got["data"] == presence, got["op"]
    for ws in (a, b, c):
        await ws.close()
    print(f"deflate: ok rooms ({len(sdp)} B offer, {len(json.dumps(presence))} B presence)")


def bomb(host, port, count):
    z = zlib.compressobj(9, zlib.DEFLATED, -15)
    payload = z.compress(b"\0" * (64 << 20)) + z.flush(zlib.Z_SYNC_FLUSH)
    payload = payload[:-4]  # the sync tail goes, as RFC 7692 says
    for i in range(int(count)):
        s = socket.create_connection((host, int(port)), timeout=TIMEOUT)
        key = base64.b64encode(os.urandom(16)).decode()
        s.sendall((f"GET / HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\n"
                   f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                   "Sec-WebSocket-Version: 13\r\n"
                   "Sec-WebSocket-Extensions: permessage-deflate\r\n\r\n").encode())
        head = b""
        while b"\r\n\r\n" not in head:
            head += s.recv(4096)
        assert b" 101 " in head.split(b"\r\n")[0] and b"permessage-deflate" in head, head
        mask = os.urandom(4)
        masked = bytes(x ^ mask[j & 3] for j, x in enumerate(payload))
        frame = bytes([0x80 | 0x40 | 0x2, 0x80 | 127]) + struct.pack("!Q", len(payload)) + mask + masked
        s.sendall(frame)
        code = None
        data = head.split(b"\r\n\r\n", 1)[1]
        while code is None:
            while len(data) >= 2:
                ln = data[1] & 0x7F
                off = 2 if ln < 126 else (4 if ln == 126 else 10)
                if ln == 126 and len(data) >= 4:
                    ln = struct.unpack("!H", data[2:4])[0]
                if len(data) < off + ln:
                    break
                if data[0] & 0x0F == 0x8:
                    code = struct.unpack("!H", data[off:off + 2])[0]
                    break
                data = data[off + ln:]
            if code is None:
                more = s.recv(65536)
                assert more, "closed without a Close frame"
                data += more
        assert code == 1009, code
        s.close()
    print(f"deflate: ok bomb ({len(payload)} B inflating to 64 MiB, refused {count} times with 1009)")


if __name__ == "__main__":
    command, args = sys.argv[1], sys.argv[2:]
    if command == "rooms":
        asyncio.run(rooms(*args))
    else:
        bomb(*args)

#!/usr/bin/env python3
"""Bytes on the wire per message with and without permessage-deflate, for bench/deflate.sh.

Against a running `tunegate serve --deflate on` (loopback only): for each encoding (JSON,
MsgPack) two raw-socket receivers join one room, one offering permessage-deflate and one not;
a publisher (Python `websockets`, no compression) publishes each representative message
--repeat times; each receiver reads every frame and records its size on the wire (header and
payload) and whether RSV1 (compressed) was set. Then CPU: the server's CPU time while
--fanout receivers with the extension, then as many without, get --cpu-messages room messages
(a WebRTC offer each), from /proc.

Prints one JSON object on stdout.
"""
import argparse
import asyncio
import base64
import json
import os
import socket
import struct
import time

import msgpack
from websockets.asyncio.client import connect


def sdp_offer():
    lines = ["v=0", "o=- 4611731400430051336 2 IN IP4 127.0.0.1", "s=-", "t=0 0",
             "a=group:BUNDLE 0 1", "a=extmap-allow-mixed", "a=msid-semantic: WMS stream"]
    for kind, port, fmts in (("audio", 9, "111 63 9 0 8 13 110 126"),
                             ("video", 9, "96 97 98 99 100 101 102 103 104 105 106 107")):
        lines += [f"m={kind} {port} UDP/TLS/RTP/SAVPF {fmts}", "c=IN IP4 0.0.0.0",
                  "a=rtcp:9 IN IP4 0.0.0.0", "a=ice-ufrag:Xq3b", "a=ice-pwd:f0Ya7Tf9kGqkLzKtVh3nqrq1",
                  "a=ice-options:trickle",
                  "a=fingerprint:sha-256 7B:8B:F0:65:5F:78:E2:51:3B:AC:6F:F3:3F:46:1B:35:DC:B8:5F:64:1A:24:C2:43:F0:A1:58:D0:A1:2C:19:08",
                  "a=setup:actpass", f"a=mid:{0 if kind == 'audio' else 1}", "a=sendrecv", "a=rtcp-mux"]
        for f in fmts.split():
            lines += [f"a=rtpmap:{f} {'opus/48000/2' if kind == 'audio' else 'VP8/90000'}",
                      f"a=rtcp-fb:{f} transport-cc", f"a=fmtp:{f} minptime=10;useinbandfec=1"]
    return {"type": "offer", "sdp": "\r\n".join(lines) + "\r\n"}


MESSAGES = {
    "webrtc_offer": sdp_offer(),
    "ice_candidate": {"type": "candidate", "candidate":
                      "candidate:842163049 1 udp 1677729535 203.0.113.7 46154 typ srflx raddr "
                      "10.0.0.5 rport 46154 generation 0 ufrag Xq3b network-cost 999",
                      "sdpMid": "0", "sdpMLineIndex": 0},
    "chat_line": {"text": "See you at the standup in five minutes, bringing the numbers.",
                  "ts": 1764500000123},
    "presence_100": {"online": [f"user-{i:03d}@example.com" for i in range(100)]},
}


def raw_connect(host, port, path, offer):
    s = socket.create_connection((host, port), timeout=10)
    key = base64.b64encode(os.urandom(16)).decode()
    ext = "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n" if offer else ""
    s.sendall((f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
               f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n{ext}\r\n").encode())
    head = b""
    while b"\r\n\r\n" not in head:
        head += s.recv(4096)
    head, rest = head.split(b"\r\n\r\n", 1)
    assert b" 101 " in head.split(b"\r\n")[0], head
    assert (b"permessage-deflate" in head) == offer, head
    return s, rest


def frames(s, buf):
    """Yields (wire_bytes, rsv1, opcode, payload) for each frame read from s."""
    while True:
        while True:
            if len(buf) >= 2:
                ln, off = buf[1] & 0x7F, 2
                if ln == 126 and len(buf) >= 4:
                    ln, off = struct.unpack("!H", buf[2:4])[0], 4
                elif ln == 127 and len(buf) >= 10:
                    ln, off = struct.unpack("!Q", buf[2:10])[0], 10
                if ln < 126 or off > 2:
                    if len(buf) >= off + ln:
                        yield off + ln, bool(buf[0] & 0x40), buf[0] & 0x0F, buf[off:off + ln]
                        buf = buf[off + ln:]
                        continue
            break
        more = s.recv(1 << 20)
        assert more, "receiver closed"
        buf += more


def masked(op, payload):
    mask = os.urandom(4)
    n = len(payload)
    head = bytes([0x80 | op]) + (bytes([0x80 | n]) if n < 126 else
                                  bytes([0x80 | 126]) + struct.pack("!H", n))
    return head + mask + bytes(b ^ mask[i & 3] for i, b in enumerate(payload))


def receiver(host, port, encoding, offer, room):
    path = "/?encoding=msgpack" if encoding == "msgpack" else "/"
    s, rest = raw_connect(host, port, path, offer)
    it = frames(s, rest)
    next(it)  # hello
    req = {"op": "join", "room": room}
    s.sendall(masked(2, msgpack.packb(req)) if encoding == "msgpack" else masked(1, json.dumps(req).encode()))
    next(it)  # joined
    return s, it


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def publish(url, room, payloads, encoding):
    ws = await connect(url + ("/?encoding=msgpack" if encoding == "msgpack" else "/"),
                       compression=None, max_size=None, ping_interval=None)
    await ws.recv()
    for data in payloads:
        req = {"op": "publish", "room": room, "data": data}
        await ws.send(msgpack.packb(req) if encoding == "msgpack" else json.dumps(req))
    await ws.close()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--pid", type=int, required=True)
    p.add_argument("--repeat", type=int, default=100)
    p.add_argument("--fanout", type=int, default=200)
    p.add_argument("--cpu-messages", type=int, default=2000)
    a = p.parse_args()
    host = "127.0.0.1"
    url = f"ws://{host}:{a.port}"
    sizes = {}
    for encoding in ("json", "msgpack"):
        for name, data in MESSAGES.items():
            room = f"{encoding}-{name}"
            recv = {mode: receiver(host, a.port, encoding, mode == "deflate", room)
                    for mode in ("plain", "deflate")}
            asyncio.run(publish(url, room, [data] * a.repeat, encoding))
            for mode, (s, it) in recv.items():
                total = compressed = 0
                for _ in range(a.repeat):
                    n, rsv1, _, _ = next(it)
                    total += n
                    compressed += rsv1
                sizes[f"{name}/{encoding}/{mode}"] = {"bytes": total / a.repeat,
                                                      "compressed": compressed}
                s.close()
    cpu = {}
    offer = MESSAGES["webrtc_offer"]
    for mode in ("deflate", "plain"):
        room = f"cpu-{mode}"
        conns = [receiver(host, a.port, "json", mode == "deflate", room) for _ in range(a.fanout)]
        before = cpu_seconds(a.pid)
        t0 = time.monotonic()
        asyncio.run(publish(url, room, [offer] * a.cpu_messages, "json"))
        for s, it in conns:
            for _ in range(a.cpu_messages):
                next(it)
        cpu[mode] = {"server_cpu_s": cpu_seconds(a.pid) - before,
                     "wall_s": time.monotonic() - t0,
                     "deliveries": a.fanout * a.cpu_messages}
        for s, _ in conns:
            s.close()
    print(json.dumps({"sizes": sizes, "cpu": cpu, "repeat": a.repeat, "fanout": a.fanout,
                      "cpu_messages": a.cpu_messages,
                      "raw_json_bytes": {k: len(json.dumps(v)) for k, v in MESSAGES.items()}}))


if __name__ == "__main__":
    main()

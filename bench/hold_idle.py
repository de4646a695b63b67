#!/usr/bin/env python3
"""Open N WebSocket connections and hold them idle, for bench/idle-memory.sh.

Raw non-blocking sockets and `selectors` rather than a WebSocket library: the point is to put
as little as possible between the bench and the server (no client-side pings, no compression
offer, no per-connection task), and to run on a bare Python 3 with nothing installed.

Only loopback is ever dialled: the target must be in 127.0.0.0/8 and source addresses are
127.0.0.2, 127.0.0.3, ... (one per --per-source connections), bound before connect. Spreading
the sources keeps each (source address, destination) pair far from the ~28k ephemeral ports
that one source address has, whatever N is.

The client is bounded in time on its own: it gives up connecting after --connect-timeout and
exits after --hold seconds even if nobody signals it. SIGTERM/SIGINT end the hold early.

Progress goes to --status FILE (rewritten atomically a few times a second, one line of
key=value pairs) so the driving script can poll it without parsing our stdout:
    phase=connecting|holding|done target=N open=.. pending=.. failed=.. closed=.. hello=..
`open` counts connections that got the 101 (and the first text frame, with --expect-hello) and
have not been closed since.

On exit every socket is closed with SO_LINGER 0 (an RST): the close is abortive on purpose, so
neither side is left with TIME_WAIT sockets, which would sit in the kernel slab and skew the
next measurement in the same run.
"""
import argparse
import base64
import errno
import hashlib
import ipaddress
import os
import resource
import selectors
import signal
import socket
import ssl
import struct
import sys
import time

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
# Linux: let bind() pick only the address; the port is chosen at connect() time, against the
# full 4-tuple, so ports are not used up per source address by bind() alone.
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)

CONNECTING, TLS, HANDSHAKE, HELLO, OPEN, DEAD = range(6)


class Conn:
    __slots__ = ("sock", "state", "buf", "key", "out", "started", "index")

    def __init__(self, sock, key, index=0):
        self.sock = sock
        self.state = CONNECTING
        self.buf = b""
        self.key = key
        self.out = b""
        self.started = time.monotonic()
        self.index = index


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--path", default="/")
    p.add_argument("-n", "--count", type=int, required=True)
    p.add_argument("--first-index", type=int, default=0,
                   help="global index of this client's first connection (several clients "
                        "share one source-address plan)")
    p.add_argument("--per-source", type=int, default=5000,
                   help="connections per source address (127.0.0.2 takes the first ones)")
    p.add_argument("--window", type=int, default=200,
                   help="at most this many handshakes in flight, so the server's accept "
                        "queue (and the SYN backlog) never overflows into 1 s retransmits")
    p.add_argument("--expect-hello", action="store_true",
                   help="a connection counts as open only after its first text frame")
    p.add_argument("--connect-timeout", type=float, default=120.0,
                   help="seconds to get all connections open; then stop trying")
    p.add_argument("--handshake-timeout", type=float, default=20.0,
                   help="seconds one connection may take from connect() to open")
    p.add_argument("--hold", type=float, default=300.0,
                   help="seconds to hold once connecting is over; 0 closes at once")
    p.add_argument("--send-one", type=int, default=0, metavar="BYTES",
                   help="once open, send a join and then a publish (echo: true) whose data is "
                        "BYTES long, as text: a relay answers it, an echo server echoes both "
                        "(with permessage-deflate, the answer is compressed)")
    p.add_argument("--offer-deflate", action="store_true",
                   help="offer permessage-deflate, and count a connection open only if the "
                        "server agreed to it")
    p.add_argument("--tls-ca", metavar="FILE",
                   help="connect with TLS (wss://), trusting this CA file")
    p.add_argument("--status", required=True)
    a = p.parse_args()
    if not ipaddress.ip_address(a.host) in ipaddress.ip_network("127.0.0.0/8"):
        p.error("--host must be a loopback address (127.0.0.0/8)")
    return a


def source_for(index, per_source):
    # 127.0.0.2 + index // per_source, carried over the last two octets; stays in 127/8.
    n = 2 + index // per_source
    if n >= 256 * 256 * 255:
        raise SystemExit("hold_idle: ran out of 127/8 source addresses")
    return "127.%d.%d.%d" % (n >> 16, (n >> 8) & 255, n & 255)


def main():
    a = parse_args()
    # Each connection is one descriptor; take the hard limit (it cannot be raised here).
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if a.count + 64 > hard:
        raise SystemExit("hold_idle: %d connections need more than RLIMIT_NOFILE %d; "
                         "split them over several clients" % (a.count, hard))

    stop = False

    def on_signal(signum, frame):
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    sel = selectors.DefaultSelector()
    conns = []
    inflight = set()  # connections not yet open nor dead, for the per-handshake timeout
    counts = {"open": 0, "pending": 0, "failed": 0, "closed": 0, "hello": 0}
    errors = {}
    phase = "connecting"
    host_hdr = ("%s:%d" % (a.host, a.port)).encode()
    tls = None
    if a.tls_ca:
        tls = ssl.create_default_context(cafile=a.tls_ca)
        tls.check_hostname = False  # the certificate names 127.0.0.1; sources vary
    path = a.path.encode()

    def write_status(final=False):
        tmp = a.status + ".tmp"
        errs = ",".join("%s:%d" % kv for kv in sorted(errors.items())) or "-"
        with open(tmp, "w") as f:
            f.write("phase=%s target=%d open=%d pending=%d failed=%d closed=%d hello=%d "
                    "errors=%s\n" % ("done" if final else phase, a.count, counts["open"],
                                     counts["pending"], counts["failed"], counts["closed"],
                                     counts["hello"], errs))
        os.replace(tmp, a.status)

    def fail(c, why):
        errors[why] = errors.get(why, 0) + 1
        if c.state == OPEN:
            counts["open"] -= 1
            counts["closed"] += 1
        else:
            counts["pending"] -= 1
            counts["failed"] += 1
            inflight.discard(c)
        c.state = DEAD
        try:
            sel.unregister(c.sock)
        except (KeyError, ValueError):
            pass
        abort(c.sock)

    def start(index):
        key = base64.b64encode(os.urandom(16))
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            s.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
        except OSError:
            pass
        s.bind((source_for(a.first_index + index, a.per_source), 0))
        c = Conn(s, key, a.first_index + index)
        conns.append(c)
        inflight.add(c)
        counts["pending"] += 1
        err = s.connect_ex((a.host, a.port))
        if err not in (0, errno.EINPROGRESS):
            fail(c, errno.errorcode.get(err, str(err)))
            return
        c.out = (b"GET " + path + b" HTTP/1.1\r\nHost: " + host_hdr +
                 b"\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                 b"Sec-WebSocket-Key: " + key + b"\r\nSec-WebSocket-Version: 13\r\n" +
                 (b"Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n"
                  if a.offer_deflate else b"") + b"\r\n")
        sel.register(s, selectors.EVENT_WRITE, c)

    def on_frames(c):
        # Parse whole frames out of c.buf: answer pings (masked pong, as a client must),
        # note the first text frame, and treat a close frame as the end of the connection.
        while len(c.buf) >= 2:
            b0, b1 = c.buf[0], c.buf[1]
            ln, off = b1 & 0x7F, 2
            if ln == 126:
                if len(c.buf) < 4:
                    return
                ln, off = struct.unpack("!H", c.buf[2:4])[0], 4
            elif ln == 127:
                if len(c.buf) < 10:
                    return
                ln, off = struct.unpack("!Q", c.buf[2:10])[0], 10
            if b1 & 0x80:
                off += 4  # a server must not mask, but skip the key if one does
            if len(c.buf) < off + ln:
                return
            payload, c.buf = c.buf[off:off + ln], c.buf[off + ln:]
            op = b0 & 0x0F
            if op == 0x9:  # ping -> pong with the same payload
                mask = os.urandom(4)
                masked = bytes(x ^ mask[i & 3] for i, x in enumerate(payload))
                try:
                    c.sock.send(bytes([0x8A, 0x80 | len(payload)]) + mask + masked)
                except OSError:
                    pass
            elif op == 0x8:
                fail(c, "server_close")
                return
            elif c.state == HELLO and op == 0x1:
                counts["hello"] += 1
                c.state = OPEN
                inflight.discard(c)
                counts["pending"] -= 1
                counts["open"] += 1
                send_one(c)

    def send_one(c):
        if not a.send_one:
            return
        room = "r%d" % c.index
        for msg in (b'{"op":"join","room":"%s"}' % room.encode(),
                    b'{"op":"publish","room":"%s","echo":true,"data":"%s"}'
                    % (room.encode(), (b"room message " * (a.send_one // 13 + 1))[:a.send_one])):
            mask = os.urandom(4)
            n = len(msg)
            head = bytes([0x81]) + (bytes([0x80 | n]) if n < 126 else
                                    bytes([0x80 | 126]) + struct.pack("!H", n))
            try:
                c.sock.sendall(head + mask + bytes(x ^ mask[i & 3] for i, x in enumerate(msg)))
            except OSError:
                pass

    def tls_handshake(c):
        try:
            c.sock.do_handshake()
        except ssl.SSLWantReadError:
            sel.modify(c.sock, selectors.EVENT_READ, c)
            return
        except ssl.SSLWantWriteError:
            sel.modify(c.sock, selectors.EVENT_WRITE, c)
            return
        except OSError as e:
            fail(c, "tls_" + type(e).__name__)
            return
        c.state = CONNECTING  # connected and encrypted: the upgrade request goes next
        sel.modify(c.sock, selectors.EVENT_WRITE, c)

    def on_event(c, mask):
        if c.state == TLS:
            tls_handshake(c)
            return
        if c.state == CONNECTING and mask & selectors.EVENT_WRITE:
            if tls is not None and not isinstance(c.sock, ssl.SSLSocket):
                err = c.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    fail(c, errno.errorcode.get(err, str(err)))
                    return
                sel.unregister(c.sock)
                c.sock = tls.wrap_socket(c.sock, do_handshake_on_connect=False)
                sel.register(c.sock, selectors.EVENT_WRITE, c)
                c.state = TLS
                tls_handshake(c)
                return
            err = c.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                fail(c, errno.errorcode.get(err, str(err)))
                return
            try:
                n = c.sock.send(c.out)
            except OSError as e:
                fail(c, errno.errorcode.get(e.errno, str(e.errno)))
                return
            c.out = c.out[n:]
            if not c.out:
                c.state = HANDSHAKE
                sel.modify(c.sock, selectors.EVENT_READ, c)
            return
        try:
            data = c.sock.recv(65536)
            while isinstance(c.sock, ssl.SSLSocket) and c.sock.pending():
                data += c.sock.recv(65536)
        except (BlockingIOError, InterruptedError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return
        except OSError as e:
            fail(c, errno.errorcode.get(e.errno, str(e.errno)))
            return
        if not data:
            fail(c, "eof")
            return
        c.buf += data
        if c.state == HANDSHAKE:
            end = c.buf.find(b"\r\n\r\n")
            if end < 0:
                if len(c.buf) > 16384:
                    fail(c, "bad_response")
                return
            head, c.buf = c.buf[:end].decode("latin-1"), c.buf[end + 4:]
            lines = head.split("\r\n")
            if not lines[0].startswith("HTTP/1.1 101"):
                fail(c, "status_" + (lines[0].split(" ") + ["?", "?"])[1])
                return
            want = base64.b64encode(hashlib.sha1(c.key + GUID).digest()).decode()
            accept = [l.split(":", 1)[1].strip() for l in lines[1:]
                      if l.lower().startswith("sec-websocket-accept:")]
            if accept != [want]:
                fail(c, "bad_accept")
                return
            if a.offer_deflate and not any(
                    l.lower().startswith("sec-websocket-extensions:") and "permessage-deflate" in l
                    for l in lines[1:]):
                fail(c, "no_deflate")
                return
            if a.expect_hello:
                c.state = HELLO
            else:
                c.state = OPEN
                inflight.discard(c)
                counts["pending"] -= 1
                counts["open"] += 1
                send_one(c)
        if c.buf:
            on_frames(c)

    t0 = time.monotonic()
    connect_deadline = t0 + a.connect_timeout
    next_index = 0
    last_status = 0.0
    write_status()
    while not stop:
        now = time.monotonic()
        if phase == "connecting":
            while next_index < a.count and counts["pending"] < a.window:
                start(next_index)
                next_index += 1
            if next_index >= a.count and counts["pending"] == 0:
                phase = "holding"
                hold_deadline = now + a.hold
            elif now >= connect_deadline:
                # Give up on what is still pending; the status says how many made it.
                for c in list(inflight):
                    fail(c, "connect_timeout")
                phase = "holding"
                hold_deadline = now + a.hold
            else:
                for c in [c for c in inflight if now - c.started > a.handshake_timeout]:
                    fail(c, "handshake_timeout")
        if phase == "holding" and now >= hold_deadline:
            break
        if now - last_status >= 0.2:
            write_status()
            last_status = now
        for key, mask in sel.select(timeout=0.2):
            on_event(key.data, mask)
    for c in conns:
        if c.state != DEAD:
            abort(c.sock)
    write_status(final=True)


def abort(sock):
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()


if __name__ == "__main__":
    sys.exit(main())

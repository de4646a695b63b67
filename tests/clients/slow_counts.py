#!/usr/bin/env python3
"""A TCP proxy in front of a relay server that answers `count` slowly: every server frame
whose payload is a count reply reaches the client DELAY seconds late (and what follows it on
that connection after it, so order is kept); with `ramp`, the k-th count reply through the
proxy DELAY x k seconds late, so answers trickle in one every DELAY seconds. The rest passes
through as it is.

    slow_counts.py UPSTREAM_HOST:PORT DELAY [ramp]

Listens on 127.0.0.1 (a free port) and prints "slow_counts: listening on 127.0.0.1:PORT" on
stderr. Stops by itself after 120 s (bounded, like every helper of the tests).
"""
import asyncio
import sys


async def pipe_up(reader, writer):
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, asyncio.CancelledError):
        pass
    finally:
        writer.close()


counts_seen = 0


async def pipe_down(reader, writer, delay, ramp):
    """Server to client, a frame at a time (server frames are unmasked, RFC 6455 5.1)."""
    try:
        while True:
            head = await reader.readexactly(2)
            n = head[1] & 0x7F
            ext = b""
            if n == 126:
                ext = await reader.readexactly(2)
                n = int.from_bytes(ext, "big")
            elif n == 127:
                ext = await reader.readexactly(8)
                n = int.from_bytes(ext, "big")
            payload = await reader.readexactly(n)
            if b'"op":"count"' in payload:
                global counts_seen
                counts_seen += 1
                await asyncio.sleep(delay * counts_seen if ramp else delay)
            writer.write(head + ext + payload)
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
        pass
    finally:
        writer.close()


async def handshake_down(reader, writer):
    """The HTTP response head, as it is."""
    head = await reader.readuntil(b"\r\n\r\n")
    writer.write(head)
    await writer.drain()


async def main():
    host, port = sys.argv[1].rsplit(":", 1)
    delay = float(sys.argv[2])
    ramp = sys.argv[3:] == ["ramp"]

    async def serve(c_reader, c_writer):
        try:
            s_reader, s_writer = await asyncio.open_connection(host, int(port))
        except OSError:
            c_writer.close()
            return
        up = asyncio.create_task(pipe_up(c_reader, s_writer))
        try:
            await handshake_down(s_reader, c_writer)
            await pipe_down(s_reader, c_writer, delay, ramp)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            c_writer.close()
        up.cancel()

    server = await asyncio.start_server(serve, "127.0.0.1", 0, backlog=1024)
    addr = server.sockets[0].getsockname()
    print(f"slow_counts: listening on {addr[0]}:{addr[1]}", file=sys.stderr, flush=True)
    await asyncio.sleep(120)


asyncio.run(main())

#!/usr/bin/env python3
"""Peer for bench/idle-memory.sh: a Python `websockets` (asyncio) server that only holds
connections. Listens on 127.0.0.1:PORT (0 = any free port) and prints the address it got on
stderr in the same shape as `tunegate serve`, so the bench parses one format.

Keepalive pings are off (websockets pings every 20 s by default; the bench runs tunegate with a
long ping interval too), and nothing is sent on connect: an idle client costs only what
websockets and asyncio keep per connection (the handler task included, which is how this
library holds a connection).
"""
import asyncio
import signal
import sys

import websockets

try:  # websockets >= 13: the new asyncio implementation
    from websockets.asyncio.server import serve
except ImportError:  # older releases: the legacy one
    from websockets.server import serve


async def hold(ws, *_path):
    await ws.wait_closed()


async def main(port):
    stop = asyncio.get_running_loop().create_future()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set_result, None)
    # backlog as large as net.core.somaxconn allows here, like the other servers in the run.
    async with serve(hold, "127.0.0.1", port, ping_interval=None, compression=None,
                     backlog=4096) as server:
        host, real_port = server.sockets[0].getsockname()[:2]
        print("peer websockets: listening on %s:%d (websockets %s, python %s)"
              % (host, real_port, websockets.__version__, sys.version.split()[0]),
              file=sys.stderr, flush=True)
        await stop


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 0))

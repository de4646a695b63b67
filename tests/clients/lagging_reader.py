"""The server's memory while one reader lags behind a busy room, with Python's `websockets`
(a client we did not write). Issue 14's reproduction: a consumer with a 64 KiB receive buffer
joins room `t`; a publisher sends 60 KB messages to `t` about 100 times a second.

    lagging_reader.py URL SERVER_PID CAP MODE

MODE:
  steady   the consumer reads nothing until 101 messages are out, then exactly one message per
           publish: it keeps up, but stays ~6 MB behind for the whole run. It must never be cut
           off, must get every message in order, and the server's memory must stay within CAP
           (the --max-pending-output it runs with) plus a small constant.
  never    the consumer never reads: the server must cut it at CAP with 1008, its memory never
           passing CAP plus the constant.
  caughtup the consumer reads every message at once: the server queues nothing to speak of.

Prints one line "lagging_reader: ok MODE ..." with the measurements and exits 0, or raises.
Bounded: every receive has a timeout and every phase a message count.
"""

import asyncio
import json
import socket
import sys
import time
import urllib.request

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

TIMEOUT = 10
PAYLOAD = "x" * 60_000
BEHIND = 101
STEADY = 800  # publishes while the consumer stays behind: 8 s at 100/s
# What the server may use above its baseline besides the lagging connection's capped queue:
# the receive buffer, the message being relayed, allocator slack.
SLACK = 3 << 20


def rss(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


def metric(url, name):
    http = url.replace("ws://", "http://").rstrip("/") + "/metrics"
    with urllib.request.urlopen(http, timeout=TIMEOUT) as r:
        text = r.read().decode()
    return sum(float(l.split()[-1]) for l in text.splitlines()
               if l.startswith(name + " ") or l.startswith(name + "{"))


async def recv(ws):
    return json.loads(await asyncio.wait_for(ws.recv(), TIMEOUT))


async def main(url, pid, cap, mode):
    host, port = url.split("//")[1].split("/")[0].rsplit(":", 1)
    publisher = await connect(url, max_size=None)
    assert (await recv(publisher))["op"] == "hello"
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    sock.connect((host, int(port)))
    consumer = await connect(url, sock=sock, max_size=None, ping_interval=None)
    assert (await recv(consumer))["op"] == "hello"
    await consumer.send(json.dumps({"op": "join", "room": "t", "ref": 1}))
    assert (await recv(consumer))["op"] == "joined"
    await asyncio.sleep(0.3)
    base = rss(pid)
    peak = base
    queued_peak = 0
    cutoffs_before = metric(url, "tunegate_backpressure_closes_total")
    expected = 0
    samples = []

    async def publish(seq):
        await publisher.send(json.dumps(
            {"op": "publish", "room": "t", "data": {"seq": seq, "pad": PAYLOAD}}))

    async def read_one():
        nonlocal expected
        m = await recv(consumer)
        seq = m.get("data", {}).get("seq") if m["op"] == "message" else None
        assert seq == expected, f"expected message {expected}, got {m['op']} {seq}"
        expected += 1

    total = {"steady": BEHIND + STEADY, "never": 1500, "caughtup": 300}[mode]
    started = time.monotonic()
    for seq in range(total):
        await publish(seq)
        if mode == "steady" and seq >= BEHIND:
            await read_one()
        elif mode == "caughtup":
            await read_one()
        await asyncio.sleep(0.01)
        if seq % 25 == 0:
            now = rss(pid)
            peak = max(peak, now)
            queued = metric(url, "tunegate_output_queued_bytes")
            queued_peak = max(queued_peak, queued)
            samples.append((round(time.monotonic() - started, 1), (now - base) >> 10, int(queued) >> 10))
            if mode == "never" and metric(url, "tunegate_backpressure_closes_total") > cutoffs_before:
                break
    growth = peak - base
    detail = (f"baseline {base >> 10} KiB, peak +{growth >> 10} KiB, queued peak "
              f"{int(queued_peak) >> 10} KiB, cap {cap >> 10} KiB; samples (s, +KiB rss, KiB queued): "
              f"{samples}")
    if mode == "steady":
        # The scenario really happened: the server held a queue for the consumer all along...
        assert queued_peak > 256 * 1024, f"the consumer never fell behind: {detail}"
        # ...and it was never cut off: it catches up on everything, in order.
        while expected < total:
            await read_one()
        assert metric(url, "tunegate_backpressure_closes_total") == cutoffs_before, detail
        assert growth <= cap + SLACK, f"server memory grew past the cap: {detail}"
    elif mode == "never":
        assert metric(url, "tunegate_backpressure_closes_total") == cutoffs_before + 1, \
            f"the never-reading consumer was not cut off: {detail}"
        assert growth <= cap + SLACK, f"server memory grew past the cap: {detail}"
        code = None
        try:
            while True:
                await asyncio.wait_for(consumer.recv(), TIMEOUT)
        except ConnectionClosed as e:
            code = e.rcvd.code if e.rcvd else None
        assert code == 1008, f"closed with {code}, not 1008: {detail}"
    else:
        assert growth <= SLACK, f"a reader that keeps up cost the server memory: {detail}"
    await asyncio.sleep(0.2)
    queued_after = metric(url, "tunegate_output_queued_bytes")
    if mode != "never":
        assert queued_after == 0, f"{queued_after} bytes still queued: {detail}"
    await publisher.close()
    await consumer.close()
    print(f"lagging_reader: ok {mode}: {expected} messages read; {detail}")


if __name__ == "__main__":
    url, pid, cap, mode = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    asyncio.run(asyncio.wait_for(main(url, pid, cap, mode), 120))

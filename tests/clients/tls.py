"""`tunegate serve --tls-cert/--tls-key` with Python's `ssl` and `websockets`, which we did not
write, trusting only the test's own CA.

    tls.py relay URL CA
        Two wss:// clients, one negotiating TLS 1.2 and one TLS 1.3, exchange a room message
        of 100 KB (several TLS records) and a direct message; TLS 1.1 is refused.

    tls.py reload URL CA PID CERT KEY NEW_CERT NEW_KEY
        A client connects and holds; the certificate and key files are replaced by NEW_* and
        PID gets SIGHUP; a new client is served the new certificate while the first, still on
        its session with the old one, keeps talking.

Prints "tls: ok ..." and exits 0 when every check passes; raises otherwise.
"""

import asyncio
import hashlib
import json
import os
import shutil
import signal
import ssl
import sys
import time

from websockets.asyncio.client import connect

TIMEOUT = 5


def context(ca, version=None):
    ctx = ssl.create_default_context(cafile=ca)
    if version is not None:
        ctx.minimum_version = ctx.maximum_version = version
    return ctx


async def recv(ws):
    return json.loads(await asyncio.wait_for(ws.recv(), TIMEOUT))


async def open_client(url, ctx):
    ws = await connect(url, ssl=ctx, max_size=None, ping_interval=None, open_timeout=TIMEOUT)
    hello = await recv(ws)
    assert hello["op"] == "hello", hello
    return ws, hello["id"]


def fingerprint(ws):
    der = ws.transport.get_extra_info("ssl_object").getpeercert(binary_form=True)
    return hashlib.sha256(der).hexdigest()


async def relay(url, ca):
    a, a_id = await open_client(url, context(ca, ssl.TLSVersion.TLSv1_2))
    b, b_id = await open_client(url, context(ca, ssl.TLSVersion.TLSv1_3))
    versions = [ws.transport.get_extra_info("ssl_object").version() for ws in (a, b)]
    assert versions == ["TLSv1.2", "TLSv1.3"], versions
    for ws in (a, b):
        await ws.send(json.dumps({"op": "join", "room": "tls"}))
        assert (await recv(ws))["op"] == "joined"
    big = "x" * 100_000
    await a.send(json.dumps({"op": "publish", "room": "tls", "data": big}))
    got = await recv(b)
    assert (got["op"], got["from"], len(got["data"])) == ("message", a_id, 100_000), got["op"]
    await b.send(json.dumps({"op": "send", "to": a_id, "data": "back"}))
    got = await recv(a)
    assert (got["op"], got["from"], got["data"]) == ("direct", b_id, "back"), got
    try:
        await open_client(url, context(ca, ssl.TLSVersion.TLSv1_1))
        raise AssertionError("TLS 1.1 was accepted")
    except ssl.SSLError:
        pass
    await a.close()
    await b.close()
    print(f"tls: ok relay ({versions[0]} and {versions[1]})")


async def reload(url, ca, pid, cert, key, new_cert, new_key):
    first, _ = await open_client(url, context(ca))
    old = fingerprint(first)
    shutil.copyfile(new_cert, cert + ".tmp")
    shutil.copyfile(new_key, key + ".tmp")
    os.replace(key + ".tmp", key)
    os.replace(cert + ".tmp", cert)
    os.kill(int(pid), signal.SIGHUP)
    deadline = time.monotonic() + 10
    while True:
        second, _ = await open_client(url, context(ca))
        new = fingerprint(second)
        if new != old:
            break
        await second.close()
        assert time.monotonic() < deadline, "the new certificate was never served"
        await asyncio.sleep(0.1)
    for ws in (first, second):
        await ws.send(json.dumps({"op": "join", "room": "r", "ref": 1}))
        assert (await recv(ws))["ref"] == 1
    await first.send(json.dumps({"op": "publish", "room": "r", "data": "still here"}))
    assert (await recv(second))["data"] == "still here"
    assert fingerprint(first) == old, "the open connection kept its session"
    await first.close()
    await second.close()
    print("tls: ok reload (old session kept, new certificate served)")


if __name__ == "__main__":
    command, args = sys.argv[1], sys.argv[2:]
    asyncio.run({"relay": relay, "reload": reload}[command](*args))

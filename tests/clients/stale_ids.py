"""Connection ids never name two connections, checked with Python's `websockets` (a client we
did not write) against `tunegate run` with several workers.

    stale_ids.py kill URL STATUS_JSON IDS_OUT
        Connects clients, SIGKILLs the worker holding the most of them (its pid from the
        daemon's status file), waits for the daemon to restart it, reconnects until the new
        process holds some clients, and checks: no new id equals any id handed out before; a
        `send` to every dead id answers `no_such_connection`; no new connection receives
        anything meant for the dead. Writes every id it saw to IDS_OUT.

    stale_ids.py again URL IDS_IN
        After the whole daemon was restarted: new connections get none of the ids in IDS_IN,
        and a `send` to each of them answers `no_such_connection`.

Prints "stale_ids: ok ..." and exits 0 when every check passes; raises otherwise. Bounded:
every wait has a deadline.
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
CLIENTS = 36


def incarnation_of(conn_id):
    # Bits 33..44 of a connection id (docs/protocol.md).
    return (conn_id >> 33) & 0xFFF


async def recv(ws):
    return json.loads(await asyncio.wait_for(ws.recv(), TIMEOUT))


async def open_client(url):
    ws = await connect(url, max_size=None, ping_interval=None)
    hello = await recv(ws)
    assert hello["op"] == "hello", hello
    return ws, hello["id"]


def load_status(path):
    with open(path) as f:
        return json.load(f)


def wait_for(what, pred, limit=15.0):
    deadline = time.monotonic() + limit
    while True:
        value = pred()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


async def sends_to_the_dead_bounce(sender, dead):
    """Every `send` to a dead id answers no_such_connection with its ref, and never `sent`:
    the process that handed the id out is gone, so nobody can claim it."""
    for i, conn_id in enumerate(dead):
        await sender.send(json.dumps(
            {"op": "send", "to": conn_id, "data": "for the connection that died", "ref": i}))
    for i, conn_id in enumerate(dead):
        reply = await recv(sender)
        assert reply["op"] == "error" and reply["code"] == "no_such_connection", (conn_id, reply)
        assert reply["ref"] == i, (i, reply)
        assert reply["message"] == f"no connection {conn_id}", reply


async def nothing_arrived(clients):
    """Each client's next frame answers its own request: nothing meant for someone else came."""
    for ws, conn_id in clients:
        await ws.send(json.dumps({"op": "count", "room": "sync", "ref": "sync"}))
    for ws, conn_id in clients:
        reply = await recv(ws)
        assert reply.get("ref") == "sync", (conn_id, "received", reply)


async def kill(url, status_path, ids_out):
    clients = [await open_client(url) for _ in range(CLIENTS)]
    before = {conn_id for _, conn_id in clients}
    assert len(before) == CLIENTS, "two live connections share an id"
    status = load_status(status_path)
    workers = {w["incarnation"]: w for w in status["workers"]}
    assert len(workers) == len(status["workers"]), f"workers share an incarnation: {workers}"
    by_incarnation = {}
    for ws, conn_id in clients:
        assert incarnation_of(conn_id) in workers, (conn_id, workers)
        by_incarnation.setdefault(incarnation_of(conn_id), []).append((ws, conn_id))
    victim_inc = max(by_incarnation, key=lambda n: len(by_incarnation[n]))
    victim = workers[victim_inc]
    doomed = by_incarnation[victim_inc]
    survivors = [c for c in clients if incarnation_of(c[1]) != victim_inc]
    assert survivors, "every client landed on one worker"

    os.kill(victim["pid"], signal.SIGKILL)
    for ws, conn_id in doomed:
        try:
            await asyncio.wait_for(ws.recv(), TIMEOUT)
            raise AssertionError(f"{conn_id} still open after its worker was killed")
        except ConnectionClosed:
            pass

    def restarted():
        w = load_status(status_path)["workers"][victim["index"]]
        return w if w["listening"] and w["pid"] != victim["pid"] else None

    back = wait_for("the killed worker to be restarted", restarted)
    assert back["incarnation"] != victim_inc, f"the restarted worker kept incarnation {victim_inc}"

    # Reconnect (as the lost clients do) until the restarted process holds some of them.
    fresh = []
    on_restarted = 0
    for _ in range(400):
        ws, conn_id = await open_client(url)
        fresh.append((ws, conn_id))
        if incarnation_of(conn_id) == back["incarnation"]:
            on_restarted += 1
        if on_restarted >= len(doomed) and len(fresh) >= len(doomed):
            break
    assert on_restarted > 0, "no reconnect landed on the restarted worker"
    reused = [conn_id for _, conn_id in fresh if conn_id in before]
    assert not reused, f"ids handed out again after the restart: {reused}"

    dead = [conn_id for _, conn_id in doomed]
    await sends_to_the_dead_bounce(survivors[0][0], dead)
    # And from a connection of the restarted worker itself.
    newcomer = next(ws for ws, conn_id in fresh if incarnation_of(conn_id) == back["incarnation"])
    await sends_to_the_dead_bounce(newcomer, dead)
    await nothing_arrived(survivors + fresh)

    seen = sorted(before | {conn_id for _, conn_id in fresh})
    with open(ids_out, "w") as f:
        json.dump(seen, f)
    for ws, _ in survivors + fresh:
        await ws.close()
    print(f"stale_ids: ok (killed worker {victim['index']} holding {len(dead)} of {CLIENTS} "
          f"clients; {len(fresh)} reconnects, {on_restarted} on its restart, none reused an id; "
          f"{2 * len(dead)} sends to the dead answered no_such_connection)")


async def again(url, ids_in):
    with open(ids_in) as f:
        old = json.load(f)
    clients = [await open_client(url) for _ in range(CLIENTS)]
    reused = [conn_id for _, conn_id in clients if conn_id in set(old)]
    assert not reused, f"ids of the previous daemon handed out again: {reused}"
    await sends_to_the_dead_bounce(clients[0][0], old)
    await nothing_arrived(clients)
    for ws, _ in clients:
        await ws.close()
    print(f"stale_ids: ok ({CLIENTS} connections after the daemon restart, none reused any of "
          f"{len(old)} earlier ids; every send to them answered no_such_connection)")


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "kill":
        job = kill(sys.argv[2], sys.argv[3], sys.argv[4])
    elif mode == "again":
        job = again(sys.argv[2], sys.argv[3])
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    asyncio.run(asyncio.wait_for(job, 90))

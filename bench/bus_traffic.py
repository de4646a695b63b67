#!/usr/bin/env python3
"""Room traffic over a multi-worker `tunegate serve`, for bench/bus-traffic.sh.

Opens --clients WebSocket connections to one port shared by several worker processes (or to
several hosts, --urls, each with its workers, joined by a Redis Cluster: then every connection
goes to a host picked at random, as a load balancer would), notes which worker process holds
each (the process in the `hello` id: node and incarnation, bits 33..52; the driving script gives
worker i incarnation --first-incarnation + i and host h node h + 1), builds rooms of a skewed spread of
sizes (--rooms, seeded), has every member join, waits until every worker's `count` of every
room equals the room's size (member counts cross the inter-worker bus asynchronously), then
publishes --messages room messages, each from a random membership (so a room talks in
proportion to its size: every member at the same rate).

It checks delivery (each message reaches every other member of its room exactly once, and
nobody else) and computes, from where the members sit, the bus traffic an ideal interest-routed
bus hands over: for each publish, the number of workers other than the publisher's that hold
at least one member of the room; against send-to-all, workers - 1 per publish. Both per room
size bucket and in total, plus per receiving worker (what
`tunegate_bus_room_messages_received_total{worker=...}` should say).

Everything goes to --out as JSON; the driving script compares it with the server's /metrics.
Exit status: 0 when every message was delivered exactly once, 1 on any loss, duplicate,
misdelivery, error reply or closed connection, 2 when a phase did not finish in time.

Only 127.0.0.1 is dialled. The client bounds itself: --timeout seconds for the whole run.
"""
import argparse
import asyncio
import inspect
import json
import random
import subprocess
import sys
import time

import websockets
from websockets.asyncio.client import connect

PROCESS_SHIFT = 33  # id = node (8) | incarnation (12) | generation (9) | loop (5) | slot (19)
# websockets 15+ would route through an HTTP(S)_PROXY from the environment (and reads the
# environment on every connect): loopback only, so never.
NO_PROXY = {"proxy": None} if "proxy" in inspect.signature(connect).parameters else {}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--urls", required=True,
                   help="ws://IP:PORT/ of every host, comma-separated (one: a single host)")
    p.add_argument("--workers", type=int, required=True,
                   help="worker processes, over all hosts (the same number on each)")
    p.add_argument("--first-incarnation", type=int, default=100,
                   help="incarnation of worker 0; worker i has this + i")
    p.add_argument("--redis-ports", default="",
                   help="ports of the Redis Cluster's nodes (on 127.0.0.1), comma-separated: "
                        "their SPUBLISH calls are counted over the publish phase")
    p.add_argument("--clients", type=int, default=3000)
    p.add_argument("--messages", type=int, default=20000)
    p.add_argument("--rooms", default="chat=2:600,group=5:150,team=25:30,live=250:2",
                   help="room spread: comma-separated [NAME=]SIZE:ROOMS")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--connect-batch", type=int, default=200,
                   help="handshakes in flight at once (well below any accept queue)")
    p.add_argument("--window", type=int, default=256,
                   help="publishes in flight (sent, `published` not yet back)")
    p.add_argument("--rate", type=float, default=0.0,
                   help="publishes per second at most (0: only the window paces them)")
    p.add_argument("--count-sample", type=int, default=0,
                   help="rooms whose count is checked on every worker before publishing "
                        "(0: all of them, which makes the routed total exact)")
    p.add_argument("--converge-timeout", type=float, default=20.0)
    p.add_argument("--settle", type=float, default=5.0,
                   help="after the last `published`: give up waiting for deliveries after "
                        "this long without progress")
    p.add_argument("--grace", type=float, default=0.5,
                   help="extra wait once everything expected arrived, to catch duplicates")
    p.add_argument("--timeout", type=float, default=150.0, help="whole run, seconds")
    p.add_argument("--out", required=True, help="JSON results file")
    return p.parse_args()


def parse_rooms(spec):
    buckets = []
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        name, _, rest = part.rpartition("=")
        size, _, count = rest.partition(":")
        try:
            size, count = int(size), int(count)
        except ValueError:
            usage(f"bad room spec {part!r}: want [NAME=]SIZE:ROOMS")
        if size < 2 or count < 0:
            usage(f"bad room spec {part!r}: size must be >= 2, rooms >= 0")
        buckets.append({"name": name or f"size {size}", "size": size, "rooms": count})
    if not buckets:
        usage("empty room spec")
    return buckets


def log(msg):
    print(f"bus_traffic: {msg}", file=sys.stderr, flush=True)


def usage(msg):
    log(f"error: {msg}")
    sys.exit(2)


class Phase(Exception):
    pass


def redis_cli(port, *args):
    out = subprocess.run(["redis-cli", "-p", str(port), *args], capture_output=True, text=True,
                         timeout=10, check=True)
    return out.stdout


def spublish_calls(ports):
    """SPUBLISH calls the masters executed (replicas re-run what they replicate: not counted)."""
    total = 0
    for port in ports:
        if "role:master" not in redis_cli(port, "info", "replication"):
            continue
        for line in redis_cli(port, "info", "commandstats").splitlines():
            if line.startswith("cmdstat_spublish:"):
                total += int(line.split("calls=")[1].split(",")[0])
    return total


class Client:
    __slots__ = ("idx", "ws", "id", "worker", "rooms", "seen", "dups", "bad", "pending",
                 "next_ref", "errors", "closed", "task")

    def __init__(self, idx, ws, hello, first_incarnation):
        self.idx = idx
        self.ws = ws
        self.id = hello["id"]
        process = self.id >> PROCESS_SHIFT
        self.worker = (process & 0xFFF) - first_incarnation
        self.rooms = set()      # room indexes this client is a member of
        self.seen = set()       # publish seqs received
        self.dups = 0
        self.bad = 0            # messages it should not have got, or with wrong room/from
        self.pending = {}       # ref -> future
        self.next_ref = 0
        self.errors = []
        self.closed = None
        self.task = None

    def request(self, msg):
        self.next_ref += 1
        ref = self.next_ref
        msg["ref"] = ref
        fut = asyncio.get_running_loop().create_future()
        self.pending[ref] = fut
        return ref, fut, json.dumps(msg, separators=(",", ":"))


class Bench:
    def __init__(self, a):
        self.a = a
        self.deadline = time.monotonic() + a.timeout
        self.clients = []
        self.received = 0
        self.finishing = False
        self.t = {}
        self.urls = [u.strip().rstrip("/") + "/" for u in a.urls.split(",")]
        self.host_rng = random.Random(a.seed + 1)

    def left(self):
        return self.deadline - time.monotonic()

    # ---- connections ---------------------------------------------------------------------
    async def open_one(self, idx):
        url = self.urls[self.host_rng.randrange(len(self.urls))]
        ws = await connect(f"{url}bench", compression=None,
                           ping_interval=None, max_queue=None, open_timeout=20,
                           close_timeout=1, **NO_PROXY)
        hello = json.loads(await asyncio.wait_for(ws.recv(), 20))
        if hello.get("op") != "hello":
            raise RuntimeError(f"first message was not hello: {hello}")
        return Client(idx, ws, hello, self.a.first_incarnation)

    async def connect_all(self):
        t0 = time.monotonic()
        n, batch = self.a.clients, self.a.connect_batch
        for start in range(0, n, batch):
            if self.left() <= 0:
                raise Phase(f"connecting: {len(self.clients)} of {n} open at the deadline")
            res = await asyncio.gather(*(self.open_one(i) for i in range(start, min(n, start + batch))),
                                       return_exceptions=True)
            for r in res:
                if isinstance(r, BaseException):
                    raise Phase(f"connecting: {type(r).__name__}: {r}")
                self.clients.append(r)
        self.t["connect_s"] = round(time.monotonic() - t0, 2)

    async def reader(self, c):
        loads = json.loads
        room_of, pub_of = self.room_of, self.pub_of
        names, ids = self.room_names, self.ids
        try:
            async for raw in c.ws:
                m = loads(raw)
                if m.get("op") == "message":
                    self.received += 1
                    try:
                        q = m["data"]["q"]
                        r = room_of[q]
                    except (KeyError, TypeError, IndexError):
                        c.bad += 1
                        continue
                    if r not in c.rooms or m.get("room") != names[r] or m.get("from") != ids[pub_of[q]] \
                            or pub_of[q] == c.idx:
                        c.bad += 1
                    elif q in c.seen:
                        c.dups += 1
                    else:
                        c.seen.add(q)
                    continue
                fut = c.pending.pop(m.get("ref"), None)
                if fut is not None and not fut.done():
                    fut.set_result(m)
                elif m.get("op") == "error":
                    c.errors.append(m)
        except websockets.ConnectionClosed as e:
            c.closed = f"{e.rcvd.code if e.rcvd else 'no close frame'} {e.rcvd.reason if e.rcvd else ''}".strip()
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - recorded, reported as a failure
            c.closed = f"reader failed: {type(e).__name__}: {e}"
        finally:
            if c.closed is None and not self.finishing:
                c.closed = "closed"
            for fut in c.pending.values():
                if not fut.done():
                    fut.set_exception(ConnectionError(f"connection {c.idx} closed"))
            c.pending.clear()

    async def ask(self, c, msg, timeout):
        _, fut, text = c.request(msg)
        await c.ws.send(text)
        return await asyncio.wait_for(fut, timeout)

    # ---- rooms ---------------------------------------------------------------------------
    def build_rooms(self, rng):
        self.buckets = parse_rooms(self.a.rooms)
        n = len(self.clients)
        self.room_names, self.room_members, self.room_bucket = [], [], []
        for b, bk in enumerate(self.buckets):
            for i in range(bk["rooms"]):
                self.room_names.append(f"{bk['name'].replace(' ', '-')}-{bk['size']}-{i}")
                self.room_members.append(rng.sample(range(n), bk["size"]))
                self.room_bucket.append(b)
        for r, members in enumerate(self.room_members):
            for m in members:
                self.clients[m].rooms.add(r)
        most = max((len(c.rooms) for c in self.clients), default=0)
        if most > 64:
            log(f"warning: a client is in {most} rooms, above the server's default --max-rooms 64")
        self.ids = [c.id for c in self.clients]
        self.room_workers = [frozenset(self.clients[m].worker for m in members)
                             for members in self.room_members]

    async def join_all(self):
        t0 = time.monotonic()
        sem = asyncio.Semaphore(500)
        jobs = [(c, r) for c in self.clients for r in sorted(c.rooms)]

        async def one(c, r):
            async with sem:
                rep = await self.ask(c, {"op": "join", "room": self.room_names[r]}, max(1, self.left()))
            if rep.get("op") != "joined":
                raise Phase(f"join of {self.room_names[r]} by connection {c.idx}: {rep}")

        res = await asyncio.gather(*(one(c, r) for c, r in jobs), return_exceptions=True)
        bad = [r for r in res if isinstance(r, BaseException)]
        if bad:
            raise Phase(f"joining: {len(bad)} of {len(jobs)} joins failed, first: {bad[0]!r}")
        self.t["join_s"] = round(time.monotonic() - t0, 2)
        self.joins = len(jobs)

    async def converge(self, rng):
        """Until `count` of each checked room, asked on one connection of every worker, equals
        the room's size. A worker's count is its own members plus the counts its peers last
        announced; equal to the true size, every peer's count it holds is the true one, which
        is what its interest routing uses."""
        t0 = time.monotonic()
        probes = {}
        for c in self.clients:
            probes.setdefault(c.worker, c)
        self.workers_seen = sorted(probes)
        rooms = list(range(len(self.room_names)))
        if self.a.count_sample and self.a.count_sample < len(rooms):
            rooms = sorted(rng.sample(rooms, self.a.count_sample))
        todo = [(w, r) for w in self.workers_seen for r in rooms]
        self.count_checks = len(todo)
        rounds, first_round_off, last = 0, None, {}
        sem = asyncio.Semaphore(1000)

        async def one(w, r):
            async with sem:
                rep = await self.ask(probes[w], {"op": "count", "room": self.room_names[r]}, 10)
            return rep.get("members")

        while todo:
            if time.monotonic() - t0 > self.a.converge_timeout or self.left() <= 0:
                sample = ", ".join(f"{self.room_names[r]} on worker {w}: {last.get((w, r))} "
                                   f"of {len(self.room_members[r])}" for w, r in todo[:5])
                raise Phase(f"counts did not converge in {self.a.converge_timeout}s: "
                            f"{len(todo)} of {self.count_checks} (worker, room) pairs still off "
                            f"after {rounds} rounds, e.g. {sample}")
            rounds += 1
            got = await asyncio.gather(*(one(w, r) for w, r in todo))
            nxt = []
            for (w, r), members in zip(todo, got):
                last[(w, r)] = members
                if members != len(self.room_members[r]):
                    nxt.append((w, r))
            if first_round_off is None:
                first_round_off = len(nxt)
            todo = nxt
            if todo:
                await asyncio.sleep(0.05)
        self.t["converge_s"] = round(time.monotonic() - t0, 2)
        self.converge_info = {"checked_pairs": self.count_checks, "rooms_checked": len(rooms),
                              "rounds": rounds, "off_in_first_round": first_round_off}

    # ---- publishing ----------------------------------------------------------------------
    def schedule(self, rng):
        memberships = [(r, m) for r, members in enumerate(self.room_members) for m in members]
        picks = [rng.choice(memberships) for _ in range(self.a.messages)]
        self.room_of = [r for r, _ in picks]
        self.pub_of = [m for _, m in picks]

    async def publish_all(self):
        t0 = time.monotonic()
        it = iter(range(self.a.messages))
        self.published = 0
        failures = []
        rate = self.a.rate

        async def pump():
            for q in it:
                if rate > 0:
                    due = t0 + q / rate - time.monotonic()
                    if due > 0:
                        await asyncio.sleep(due)
                c = self.clients[self.pub_of[q]]
                r = self.room_of[q]
                msg = {"op": "publish", "room": self.room_names[r],
                       "data": {"q": q, "text": f"message {q} to {self.room_names[r]}"}}
                try:
                    rep = await self.ask(c, msg, max(1, self.left()))
                except Exception as e:  # noqa: BLE001
                    failures.append(f"publish {q}: {type(e).__name__}: {e}")
                    return
                if rep.get("op") != "published":
                    failures.append(f"publish {q}: {rep}")
                    return
                self.published += 1

        await asyncio.gather(*(pump() for _ in range(max(1, self.a.window))))
        self.t["publish_s"] = round(time.monotonic() - t0, 2)
        if failures:
            raise Phase(f"publishing: {len(failures)} failed, first: {failures[0]}")

    async def drain(self, expected):
        t0 = time.monotonic()
        last, last_change = -1, time.monotonic()
        while self.received < expected and self.left() > 0:
            if self.received != last:
                last, last_change = self.received, time.monotonic()
            elif time.monotonic() - last_change > self.a.settle:
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(self.a.grace)
        self.t["drain_s"] = round(time.monotonic() - t0, 2)

    # ---- the run -------------------------------------------------------------------------
    async def run(self):
        a = self.a
        rng = random.Random(a.seed)
        log(f"opening {a.clients} connections")
        await self.connect_all()
        per_worker = [0] * a.workers
        for c in self.clients:
            if c.worker >= a.workers:
                raise Phase(f"connection {c.idx} id {c.id} names worker {c.worker}, "
                            f"but the server has {a.workers}")
            per_worker[c.worker] += 1
        self.build_rooms(rng)
        self.schedule(rng)
        for c in self.clients:  # from here on, everything a connection receives is read
            c.task = asyncio.create_task(self.reader(c))
        log(f"{a.clients} open in {self.t['connect_s']}s (per worker {per_worker}); "
            f"{len(self.room_names)} rooms; joining")
        await self.join_all()
        log(f"{self.joins} joins answered in {self.t['join_s']}s; waiting for counts on every worker")
        await self.converge(rng)
        log(f"counts converged in {self.t['converge_s']}s ({self.converge_info}); "
            f"publishing {a.messages} messages")

        # What should happen, from where everybody sits.
        W = a.workers
        expected = 0
        per_bucket = [{"publishes": 0, "expected_deliveries": 0, "routed_ideal": 0,
                       "local_only": 0} for _ in self.buckets]
        received_ideal = [0] * W
        for q in range(a.messages):
            r, p = self.room_of[q], self.pub_of[q]
            pb = per_bucket[self.room_bucket[r]]
            wp = self.clients[p].worker
            others = [w for w in self.room_workers[r] if w != wp]
            pb["publishes"] += 1
            pb["expected_deliveries"] += len(self.room_members[r]) - 1
            pb["routed_ideal"] += len(others)
            pb["local_only"] += not others
            for w in others:
                received_ideal[w] += 1
            expected += len(self.room_members[r]) - 1

        redis_ports = [int(p) for p in a.redis_ports.split(",") if p]
        for port in redis_ports:
            redis_cli(port, "config", "resetstat")
        await self.publish_all()
        log(f"{self.published} published in {self.t['publish_s']}s; "
            f"{self.received} of {expected} deliveries so far")
        await self.drain(expected)
        self.finishing = True
        spublish = spublish_calls(redis_ports) if redis_ports else None

        # Delivery check per receiver.
        pubs_in_room = [0] * len(self.room_names)
        own = [0] * len(self.clients)   # publishes by this client (always in its own rooms)
        for q in range(a.messages):
            pubs_in_room[self.room_of[q]] += 1
            own[self.pub_of[q]] += 1
        missing = dups = bad = 0
        for c in self.clients:
            want = sum(pubs_in_room[r] for r in c.rooms) - own[c.idx]
            missing += want - len(c.seen)
            dups += c.dups
            bad += c.bad
        closed = [(c.idx, c.closed) for c in self.clients if c.closed]
        errors = [(c.idx, e) for c in self.clients for e in c.errors]

        buckets = []
        for bk, pb in zip(self.buckets, per_bucket):
            rooms = [r for r in range(len(self.room_names)) if self.buckets[self.room_bucket[r]] is bk]
            spread = [len(self.room_workers[r]) for r in rooms]
            buckets.append({
                "name": bk["name"], "size": bk["size"], "rooms": bk["rooms"],
                "memberships": bk["size"] * bk["rooms"],
                "avg_workers_per_room": round(sum(spread) / len(spread), 3) if spread else 0,
                "broadcast": pb["publishes"] * (W - 1), **pb,
            })
        return {
            "config": {"urls": self.urls, "clients": a.clients, "messages": a.messages,
                       "rooms": a.rooms,
                       "seed": a.seed, "workers": W, "window": a.window, "rate": a.rate,
                       "count_sample": a.count_sample, "connect_batch": a.connect_batch},
            "connections_per_worker": per_worker,
            "clients_in_no_room": sum(1 for c in self.clients if not c.rooms),
            "most_rooms_per_client": max(len(c.rooms) for c in self.clients),
            "joins": self.joins,
            "convergence": self.converge_info,
            "timings_s": self.t,
            "delivery": {"sent": a.messages, "published_acks": self.published,
                         "expected": expected, "received": self.received,
                         "missing": missing, "duplicates": dups, "misdelivered": bad,
                         "error_replies": len(errors), "errors_sample": errors[:5],
                         "closed_connections": len(closed), "closed_sample": closed[:5]},
            "ideal": {"routed": sum(pb["routed_ideal"] for pb in per_bucket),
                      "broadcast": a.messages * (W - 1),
                      "received_per_worker": received_ideal},
            "buckets": buckets,
            "redis": {"spublish_calls": spublish,
                      "spublish_per_publish": round(spublish / a.messages, 4)
                      if spublish is not None else None},
        }


async def main():
    a = parse_args()
    too_big = [b["size"] for b in parse_rooms(a.rooms) if b["size"] > a.clients]
    if too_big:
        usage(f"room size {max(too_big)} is above --clients {a.clients}")
    bench = Bench(a)
    status, out = 0, None
    try:
        out = await asyncio.wait_for(bench.run(), a.timeout)
        d = out["delivery"]
        ok = not (d["missing"] or d["duplicates"] or d["misdelivered"] or d["error_replies"]
                  or d["closed_connections"] or d["published_acks"] != d["sent"])
        status = 0 if ok else 1
        log(f"delivery: sent {d['sent']}, expected {d['expected']}, received {d['received']}, "
            f"missing {d['missing']}, duplicates {d['duplicates']}, misdelivered {d['misdelivered']}, "
            f"errors {d['error_replies']}, closed {d['closed_connections']}")
    except Phase as e:
        log(f"FAILED: {e}")
        out, status = {"failed": str(e), "timings_s": bench.t}, 2
    except asyncio.TimeoutError:
        log(f"FAILED: the run did not finish within --timeout {a.timeout}s")
        out, status = {"failed": f"timeout after {a.timeout}s", "timings_s": bench.t}, 2
    except Exception as e:  # noqa: BLE001 - reported, not a traceback in the middle of the log
        log(f"FAILED: {type(e).__name__}: {e}")
        out, status = {"failed": f"{type(e).__name__}: {e}", "timings_s": bench.t}, 2
    finally:
        bench.finishing = True
        for c in bench.clients:
            if c.task:
                c.task.cancel()
        # Abortive close (RST): nothing lingers, and the server drops the members at once.
        for c in bench.clients:
            tr = getattr(c.ws, "transport", None)
            if tr is not None:
                tr.abort()
        await asyncio.sleep(0)
    with open(a.out, "w") as f:
        json.dump(out, f, indent=2)
    return status


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))

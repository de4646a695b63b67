// Load client for bench/peer_socketio_server.js: `tunegate load`'s phases (docs/load.md) on
// `socket.io-client` 4 (WebSocket transport only, no polling, no reconnection, one Manager per
// client so every client is its own connection), in one Node process or several.
//
//   node bench/peer_socketio_load.js URL[,URL...] -n N [--rooms SIZE|SIZE:PCT,...]
//        [--connect-rate R] [--max-inflight M] [--source 127.0.0.2] [--per-source 20000]
//        [--publish-rate R] [--publish-seconds S] [--payload BYTES] [--hold H]
//        [--connect-timeout S] [--max-time S] [--processes K] [--json]
//
// The plan is tunegate load's (crates/load/src/plan.rs), so both stacks get the same load:
//  - several URLs (the hosts of one service): client i goes to URL number
//    ((i * 0x9E3779B97F4A7C15 mod 2^64) >> 32) mod count, the hash tunegate load uses, so the
//    members of a room land on hosts independently of one another;
//  - --rooms SIZE puts every SIZE consecutive clients in a room; --rooms 2:38,5:23,... gives
//    each size its percentage of the clients (rounded; the last size takes the remainder), room
//    `sSIZE-K`, and a remainder room is smaller and says so;
//  - the publishers take turns in a scattered order (a stride coprime with their count, from
//    0.618 of it up), so every client publishes once per lap whatever its room.
//  - --processes K: K Node processes (this file forked with --shard I/K), each holding its
//    range of the clients and publishing its share of the rate, coordinated by this one as
//    `tunegate load` coordinates its shards; one Node process tops out near one core. Latency
//    is timed with CLOCK_MONOTONIC (process.hrtime), one clock for every process on the host.
//
// Phases, as in tunegate load:
//  1. connect: N clients at --connect-rate per second, at most --max-inflight in flight. Client
//     i binds source address --source + floor(i / --per-source) (127.0.0.2, .3, ... for a
//     loopback target) through socket.io-client's `localAddress` option, which engine.io-client
//     hands to `ws`, which hands it to net.connect; every opened client's bound address is read
//     back from its TCP socket and counted in `sources` (a mismatch is a problem). Open means
//     Socket.IO's `connect` event (engine.io handshake plus namespace CONNECT answered).
//  2. join: each client joins its room with an acknowledgement; every ack counts.
//  3. verify: `count` on up to 64 rooms per process until each has its planned members (at
//     most 10 s); across servers the server asks every other one (see the server).
//  4. hold: --hold seconds; the clients answer engine.io pings (counted as pings_answered).
//  5. publish: --publish-rate messages/s for --publish-seconds, from the members of rooms of 2
//     or more in turn: emit("publish", {room, data: {t, p}}), t = the message's scheduled
//     send time (m / rate after the phase began), CLOCK_MONOTONIC in us
//     (process.hrtime.bigint()), p = --payload bytes of padding. Each message should reach the
//     room's other members: expected += planned size - 1. Every `message` received records
//     now - t.
//  6. drain: until every expected delivery arrived, nothing moved for 2 s, or 10 s passed.
//  7. finish: every client disconnects; the result goes to stdout (--json) or stderr.
// Progress: one line a second on stderr, `peer_socketio_load: PHASE: open ...`.
// Exit 0 only if ok: every connection opened, none dropped, every message arrived once, every
// client bound the planned source address. --max-time stops everything whatever the phase
// (exit 1, with what was measured so far).
'use strict';
const { io } = require('socket.io-client');
// The installed version of a package whose "exports" hide its package.json.
function versionOf(name) {
  const fs = require('fs');
  const path = require('path');
  for (let d = path.dirname(require.resolve(name)); d !== path.dirname(d); d = path.dirname(d)) {
    try {
      const p = JSON.parse(fs.readFileSync(path.join(d, 'package.json'), 'utf8'));
      if (p.name === name) return p.version;
    } catch (e) { /* keep walking up */ }
  }
  return '?';
}

// ---- arguments ------------------------------------------------------------------------------
const defaults = {
  n: 1000, rooms: '10', 'connect-rate': 20000, 'max-inflight': 1000, source: null,
  'per-source': 20000, 'publish-rate': 0, 'publish-seconds': 10, payload: 64, hold: 0,
  'connect-timeout': 120, 'max-time': 900, processes: 1, shard: null, json: false,
};
const textOptions = new Set(['source', 'rooms', 'shard']);
function usage(msg) {
  process.stderr.write(`peer_socketio_load: ${msg}\nusage: node peer_socketio_load.js URL[,URL...] -n N [--rooms SIZE|SIZE:PCT,...] [--connect-rate R] [--max-inflight M] [--source IPV4] [--per-source K] [--publish-rate R] [--publish-seconds S] [--payload BYTES] [--hold S] [--connect-timeout S] [--max-time S] [--processes K] [--json]\n`);
  process.exit(2);
}
const opt = { ...defaults };
let urlArg = null;
{
  const argv = process.argv.slice(2);
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (a === '--json') { opt.json = true; continue; }
    if (a === '-h' || a === '--help') usage('help');
    const key = a === '-n' ? 'n' : a.startsWith('--') ? a.slice(2) : null;
    if (key === null) {
      if (urlArg !== null) usage(`unexpected argument ${a}`);
      urlArg = a;
      continue;
    }
    if (!(key in defaults)) usage(`unknown option ${a}`);
    if (i + 1 >= argv.length) usage(`${a} needs a value`);
    const v = argv[++i];
    if (textOptions.has(key)) { opt[key] = v; continue; }
    const num = Number(v);
    if (!Number.isFinite(num) || num < 0) usage(`${a}: ${v} is not a number >= 0`);
    opt[key] = num;
  }
}
if (!urlArg) usage('no URL');
const urls = urlArg.split(',').map((u) => u.trim().replace(/^ws:/, 'http:'));
const targets = urls.map((u) => { try { return new URL(u); } catch (e) { return usage(`${u}: not a URL`); } });
const N = Math.floor(opt.n);
const K = Math.max(1, Math.floor(opt.processes));
if (N < 1 || opt['connect-rate'] <= 0 || opt['max-inflight'] < 1 || opt['per-source'] < 1) {
  usage('-n, --connect-rate, --max-inflight and --per-source must be above 0');
}

// ---- the plan (crates/load/src/plan.rs and lib.rs, the same function of the index) -----------
// --rooms: [[size, clients], ...]
function parseSpread(text, n) {
  const parts = String(text).split(',').map((s) => s.trim());
  const sized = parts.map((part) => {
    const [s, p] = part.includes(':') ? part.split(':') : (parts.length === 1 ? [part, '100'] : usage(`--rooms: ${part} needs SIZE:PERCENT in a spread`));
    const size = Number(s);
    const pct = Number(p);
    if (!Number.isInteger(size) || size < 1) usage(`--rooms: room size ${s} is not a whole number >= 1`);
    if (!(pct > 0 && pct <= 100)) usage(`--rooms: percentage ${p} is not in (0, 100]`);
    return [size, pct];
  });
  const total = sized.reduce((a, x) => a + x[1], 0);
  if (Math.abs(total - 100) > 0.01) usage(`--rooms: percentages add up to ${total}, not 100`);
  let given = 0;
  return sized.map(([size, pct], i) => {
    const want = i + 1 === sized.length ? n - given : Math.round((n * pct) / 100);
    const count = Math.min(want, n - given);
    given += count;
    return [size, count];
  });
}
const spread = parseSpread(opt.rooms, N);
const roomOf = (i) => {
  let start = 0;
  for (const [size, count] of spread) {
    if (i < start + count) {
      const offset = i - start;
      const roomStart = Math.floor(offset / size) * size;
      return [`s${size}-${Math.floor(offset / size)}`, Math.min(size, count - roomStart)];
    }
    start += count;
  }
  throw new Error(`index ${i} beyond the plan`);
};
const MASK64 = (1n << 64n) - 1n;
const targetOf = (i) => {
  if (targets.length === 1) return 0;
  const h = ((BigInt(i) * 0x9E3779B97F4A7C15n) & MASK64) >> 32n;
  return Number(h % BigInt(targets.length));
};
function lapStride(n) {
  const gcd = (a, b) => (b === 0 ? a : gcd(b, a % b));
  for (let s = Math.max(1, Math.floor(n * 0.618)); ; s++) if (gcd(s, n) === 1) return s;
}
const isLoopback = targets.every((t) => /^127\./.test(t.hostname));
const sourceBase = opt.source || (isLoopback ? '127.0.0.2' : null);
function ipAdd(ip, k) {
  const p = ip.split('.').map(Number);
  if (p.length !== 4 || p.some((x) => !Number.isInteger(x) || x < 0 || x > 255)) usage(`--source ${ip}: not an IPv4 address`);
  const v = (((p[0] << 24) >>> 0) + (p[1] << 16) + (p[2] << 8) + p[3] + k) >>> 0;
  return [v >>> 24, (v >>> 16) & 255, (v >>> 8) & 255, v & 255].join('.');
}
const sourceOf = (i) => (sourceBase ? ipAdd(sourceBase, Math.floor(i / opt['per-source'])) : undefined);

const nowUs = () => Number(process.hrtime.bigint() / 1000n);
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const bump = (map, k, by = 1) => { map[k] = (map[k] || 0) + by; };

// Samples in microseconds, sorted at the end (exact percentiles, no histogram rounding).
class Samples {
  constructor(cap) { this.a = new Float64Array(cap); this.n = 0; }
  push(v) {
    if (this.n === this.a.length) { const b = new Float64Array(this.a.length * 2); b.set(this.a); this.a = b; }
    this.a[this.n++] = v;
  }
  pushAll(arr) { for (let i = 0; i < arr.length; i++) this.push(arr[i]); }
  values() { return this.a.slice(0, this.n); }
  percentiles() {
    const s = this.a.subarray(0, this.n).sort();
    const at = (q) => (this.n ? s[Math.min(this.n - 1, Math.max(0, Math.ceil(q * this.n) - 1))] : 0);
    const ms = (us) => Math.round(us) / 1000;
    return { p50_ms: ms(at(0.5)), p99_ms: ms(at(0.99)), p999_ms: ms(at(0.999)), max_ms: ms(this.n ? s[this.n - 1] : 0), samples: this.n };
  }
}

function causeOf(err) {
  if (!err) return 'unknown';
  const d = err.description;
  const inner = d && (d.error || d);
  if (inner && inner.code) return String(inner.code);
  if (inner && inner.message && inner.message !== err.message) return `${err.message}: ${inner.message}`;
  return String(err.message || err);
}

// ---- one process's clients: global indices [lo, hi), `share` of the rates -------------------
class Shard {
  constructor(lo, hi, share) {
    this.lo = lo; this.hi = hi; this.share = share;
    this.t = {
      attempted: 0, opened: 0, connect_errors: {}, disconnects: {}, joined: 0, server_errors: 0,
      rooms_checked: 0, rooms_short: 0, sent: 0, expected: 0, received: 0, pings_answered: 0,
    };
    this.clients = []; // { socket, room, members, settled, open }
    this.sources = {};
    this.sourceMismatch = 0;
    this.inflight = 0;
    this.dropped = 0;
    this.finishing = false;
    this.firstUs = 0;
    this.lastOpenUs = 0;
    this.pad = 'x'.repeat(Math.floor(opt.payload));
    this.connectUs = new Samples(Math.max(1024, hi - lo));
    this.latencyUs = new Samples(1 << 18);
    this.serviceUs = new Samples(1 << 18);
    this.lagUs = new Samples(1 << 16);
  }

  connectOne(i, deadline) {
    const [room, members] = roomOf(i);
    const c = { socket: null, room, members, settled: false, open: false };
    const t = this.t;
    this.clients.push(c);
    t.attempted++;
    this.inflight++;
    const started = nowUs();
    const src = sourceOf(i);
    const socket = io(urls[targetOf(i)], {
      transports: ['websocket'],
      reconnection: false,
      forceNew: true,
      perMessageDeflate: false,
      timeout: Math.max(1, deadline - Date.now()),
      ...(src ? { localAddress: src } : {}),
    });
    c.socket = socket;
    socket.io.engine.on('ping', () => { t.pings_answered++; });
    socket.on('connect', () => {
      if (c.settled) return;
      c.settled = true;
      c.open = true;
      this.inflight--;
      t.opened++;
      const now = nowUs();
      this.connectUs.push(Math.max(1, now - started));
      if (now > this.lastOpenUs) this.lastOpenUs = now;
      let local;
      try { local = socket.io.engine.transport.ws._socket.localAddress; } catch (e) { local = undefined; }
      bump(this.sources, String(local));
      if (src && local !== src) this.sourceMismatch++;
    });
    socket.on('connect_error', (err) => {
      if (c.settled) return;
      c.settled = true;
      this.inflight--;
      bump(t.connect_errors, causeOf(err));
      socket.close();
    });
    socket.on('disconnect', (reason) => {
      if (!c.open) return;
      c.open = false;
      if (!this.finishing) { this.dropped++; bump(t.disconnects, reason); }
    });
    socket.on('message', (data) => {
      const now = nowUs();
      const sent = data && typeof data.t === 'number' ? data.t : now;
      const written = data && typeof data.s === 'number' ? data.s : sent;
      this.latencyUs.push(Math.max(1, now - sent));
      this.serviceUs.push(Math.max(1, now - written));
      t.received++;
    });
  }

  async connect() {
    const rate = opt['connect-rate'] * this.share;
    const cap = Math.max(1, Math.ceil(opt['max-inflight'] * this.share));
    const start = Date.now();
    const deadline = start + opt['connect-timeout'] * 1000;
    this.firstUs = nowUs();
    let i = this.lo;
    while (i < this.hi) {
      if (Date.now() >= deadline) {
        const left = this.hi - i;
        this.t.attempted += left;
        bump(this.t.connect_errors, 'not started: connect timeout', left);
        break;
      }
      const due = Math.min(this.hi, this.lo + Math.floor(((Date.now() - start) / 1000) * rate) + 1);
      let started = 0;
      while (i < due && this.inflight < cap) { this.connectOne(i++, deadline); started++; }
      // Yield to the event loop; 1 ms is the timer granularity.
      await sleep(started ? 0 : 1);
    }
    while (this.inflight > 0 && Date.now() < deadline) await sleep(5);
    for (const c of this.clients) {
      if (!c.settled) { c.settled = true; this.inflight--; bump(this.t.connect_errors, 'timeout'); c.socket.close(); }
    }
  }

  async join() {
    let asked = 0;
    let answers = 0;
    for (const c of this.clients) {
      if (!c.open) continue;
      asked++;
      c.socket.timeout(60000).emit('join', c.room, (err, res) => {
        answers++;
        if (err || !res || res.error) this.t.server_errors++;
        else this.t.joined++;
      });
    }
    const until = Date.now() + 60000;
    while (answers + this.dropped < asked && Date.now() < until) await sleep(5);
  }

  async verify() {
    const clients = this.clients;
    const step = Math.max(1, Math.floor(clients.length / 64));
    const until = Date.now() + 10000;
    for (let k = 0, i = 0; i < clients.length && k < 64; i += step, k++) {
      const c = clients[i];
      if (!c.open) continue;
      this.t.rooms_checked++;
      let ok = false;
      while (Date.now() < until && c.open) {
        let res;
        try { res = await c.socket.timeout(6000).emitWithAck('count', c.room); } catch (e) { break; }
        if (res && res.members >= c.members) { ok = true; break; }
        await sleep(20);
      }
      if (!ok) this.t.rooms_short++;
    }
  }

  // Returns how long it published, in seconds.
  async publish() {
    const rate = opt['publish-rate'] * this.share;
    const publishers = this.clients.filter((c) => c.members >= 2);
    const start = Date.now();
    const startUs = nowUs();
    if (rate <= 0 || publishers.length === 0) return 0;
    const total = Math.round(rate * opt['publish-seconds']);
    const stride = lapStride(publishers.length);
    let next = 0;
    let sent = 0;
    // Message m is due at m / rate after the start and carries that time (as tunegate load
    // does, wrk2's way): a publisher behind its schedule does not hide the wait.
    const dueUs = (m) => startUs + Math.round((m * 1e6) / rate);
    while (sent < total) {
      await sleep(Math.max(0, (dueUs(sent) - nowUs()) / 1000));
      const due = Math.min(total, Math.floor(((nowUs() - startUs) / 1e6) * rate) + 1);
      while (sent < due) {
        // Skip clients that are gone; give up on a full lap of dead ones.
        let tries = 0;
        for (;;) {
          const c = publishers[(next * stride) % publishers.length];
          next++;
          tries++;
          if (c.open) {
            const [t, s] = [dueUs(sent), nowUs()];
            this.lagUs.push(Math.max(1, s - t));
            c.socket.emit('publish', { room: c.room, data: { t, s, p: this.pad } });
            this.t.sent++;
            this.t.expected += c.members - 1;
            break;
          }
          if (tries > publishers.length) return (Date.now() - start) / 1000;
        }
        sent++;
      }
    }
    return (Date.now() - start) / 1000;
  }

  progress() {
    const t = this.t;
    return {
      opened: t.opened, failed: Object.values(t.connect_errors).reduce((a, b) => a + b, 0),
      inflight: this.inflight, dropped: this.dropped, sent: t.sent, expected: t.expected, received: t.received,
    };
  }

  // What it measured; from now on a disconnect is expected.
  result() {
    this.finishing = true;
    return {
      t: this.t, dropped: this.dropped, open_at_end: this.clients.filter((c) => c.open).length,
      sources: this.sources, source_mismatch: this.sourceMismatch, first_us: this.firstUs,
      last_open_us: this.lastOpenUs, connect_us: this.connectUs.values(), latency_us: this.latencyUs.values(),
      service_us: this.serviceUs.values(), lag_us: this.lagUs.values(),
    };
  }

  close() {
    this.finishing = true;
    for (const c of this.clients) { try { c.socket.disconnect(); } catch (e) { /* already gone */ } }
    return null;
  }
}

const commands = ['connect', 'join', 'verify', 'publish', 'progress', 'result', 'close'];

// ---- a shard in a child process (--shard I/K): runs the coordinator's commands -------------
if (opt.shard !== null) {
  const m = /^(\d+)\/(\d+)$/.exec(opt.shard);
  if (!m || Number(m[1]) >= Number(m[2]) || typeof process.send !== 'function') usage('--shard I/K is for the coordinator');
  const [i, k] = [Number(m[1]), Number(m[2])];
  const shard = new Shard(Math.floor((N * i) / k), Math.floor((N * (i + 1)) / k), 1 / k);
  process.on('message', async (msg) => {
    if (!msg || !commands.includes(msg.cmd)) return;
    try {
      const r = await shard[msg.cmd]();
      process.send({ id: msg.id, r });
      if (msg.cmd === 'close') setTimeout(() => process.exit(0), 500);
    } catch (e) {
      process.send({ id: msg.id, error: String(e && e.stack ? e.stack : e) });
    }
  });
  // The coordinator went away: so do we.
  process.on('disconnect', () => process.exit(1));
  setTimeout(() => process.exit(1), (opt['max-time'] + 30) * 1000).unref();
  process.send({ ready: true });
  return;
}

// ---- the coordinator ------------------------------------------------------------------------
// A shard's interface: the same commands, here or in a child.
function localShard() {
  const s = new Shard(0, N, 1);
  const o = {};
  for (const c of commands) o[c] = async () => s[c]();
  o.kill = () => {};
  return o;
}
function childShard(i) {
  const { fork } = require('child_process');
  const child = fork(__filename, [...process.argv.slice(2), '--shard', `${i}/${K}`], {
    serialization: 'advanced', stdio: ['ignore', 'ignore', 'inherit', 'ipc'],
  });
  const pending = new Map();
  let nextId = 0;
  let exited = null;
  let readyResolve;
  const ready = new Promise((r) => { readyResolve = r; });
  child.on('message', (m) => {
    if (m && m.ready) return readyResolve();
    const p = pending.get(m.id);
    if (!p) return;
    pending.delete(m.id);
    if (m.error) p.reject(new Error(`shard ${i}: ${m.error}`));
    else p.resolve(m.r);
  });
  child.on('exit', (code, sig) => {
    exited = `shard ${i} exited (${sig || code})`;
    readyResolve();
    for (const p of pending.values()) p.reject(new Error(exited));
    pending.clear();
  });
  const o = {};
  for (const c of commands) {
    o[c] = async () => {
      await ready;
      if (exited) throw new Error(exited);
      const id = nextId++;
      return new Promise((resolve, reject) => { pending.set(id, { resolve, reject }); child.send({ id, cmd: c }); });
    };
  }
  o.kill = () => { try { child.kill('SIGKILL'); } catch (e) { /* gone */ } };
  return o;
}
const shards = K === 1 ? [localShard()] : Array.from({ length: K }, (_, i) => childShard(i));

let phase = 'connect';
let heldSeconds = 0;
let publishSeconds = 0;
const all = (cmd) => Promise.all(shards.map((s) => s[cmd]()));
// A command that must answer within `ms`, or null.
const within = (p, ms) => Promise.race([p.catch(() => null), sleep(ms).then(() => null)]);

async function totals() {
  const ps = await within(all('progress'), 2000);
  const sum = { opened: 0, failed: 0, inflight: 0, dropped: 0, sent: 0, expected: 0, received: 0 };
  for (const p of ps || []) for (const k of Object.keys(sum)) sum[k] += p[k];
  return sum;
}

async function drain() {
  const end = Date.now() + 10000;
  let s = await totals();
  let last = [s.received, Date.now()];
  while (s.received < s.expected && Date.now() < end) {
    if (s.received !== last[0]) last = [s.received, Date.now()];
    else if (Date.now() - last[1] > 2000) break;
    await sleep(100);
    s = await totals();
  }
}

// ---- report ---------------------------------------------------------------------------------
function outcome(results, extraProblems) {
  const t = {
    attempted: 0, opened: 0, connect_errors: {}, disconnects: {}, joined: 0, server_errors: 0,
    rooms_checked: 0, rooms_short: 0, sent: 0, expected: 0, received: 0, pings_answered: 0,
  };
  const sources = {};
  const connectUs = new Samples(Math.max(1024, N));
  const latencyUs = new Samples(1 << 18);
  const serviceUs = new Samples(1 << 18);
  const lagUs = new Samples(1 << 16);
  let dropped = 0;
  let openAtEnd = 0;
  let sourceMismatch = 0;
  let firstUs = Infinity;
  let lastOpenUs = 0;
  for (const r of results) {
    for (const k of Object.keys(t)) {
      if (typeof t[k] === 'number') t[k] += r.t[k];
      else for (const [c, v] of Object.entries(r.t[k])) bump(t[k], c, v);
    }
    for (const [a, v] of Object.entries(r.sources)) bump(sources, a, v);
    dropped += r.dropped;
    openAtEnd += r.open_at_end;
    sourceMismatch += r.source_mismatch;
    if (r.first_us) firstUs = Math.min(firstUs, r.first_us);
    lastOpenUs = Math.max(lastOpenUs, r.last_open_us);
    connectUs.pushAll(r.connect_us);
    latencyUs.pushAll(r.latency_us);
    serviceUs.pushAll(r.service_us);
    lagUs.pushAll(r.lag_us);
  }
  const connectSeconds = lastOpenUs && Number.isFinite(firstUs) ? (lastOpenUs - firstUs) / 1e6 : 0;
  const o = {
    target: urls.join(','), connections: N, processes: K,
    client: `socket.io-client ${versionOf('socket.io-client')} (node ${process.version})`,
    ...t, open_at_end: openAtEnd, sources, source_mismatch: sourceMismatch,
    connect_seconds: connectSeconds, connects_per_second: t.opened / Math.max(connectSeconds, 1e-6),
    connect_time: connectUs.percentiles(), held_seconds: heldSeconds, publish_seconds: publishSeconds,
    publish_rate_achieved: publishSeconds > 0 ? t.sent / publishSeconds : 0,
    latency: latencyUs.percentiles(), service_time: serviceUs.percentiles(),
    schedule_lag: lagUs.percentiles(), lost: Math.max(0, t.expected - t.received), ok: false, problems: [],
  };
  const p = [...extraProblems];
  if (results.length < shards.length) p.push(`${shards.length - results.length} of ${shards.length} processes gave no result`);
  if (t.opened < N) p.push(`${t.opened} of ${N} connections opened; errors: ${JSON.stringify(t.connect_errors)}`);
  if (dropped > 0) p.push(`${dropped} unexpected disconnects: ${JSON.stringify(t.disconnects)}`);
  if (t.server_errors > 0) p.push(`${t.server_errors} failed joins (error ack or ack timeout)`);
  if (t.rooms_short > 0) p.push(`${t.rooms_short} of ${t.rooms_checked} rooms checked never counted their planned members`);
  if (o.lost > 0) p.push(`${o.lost} of ${t.expected} deliveries missing`);
  if (t.received > t.expected) p.push(`${t.received - t.expected} deliveries more than expected (duplicates)`);
  if (sourceMismatch > 0) p.push(`${sourceMismatch} clients not bound to their planned source address: ${JSON.stringify(sources)}`);
  o.ok = p.length === 0;
  o.problems = p;
  return [o, dropped];
}

function human(o, dropped) {
  const l = o.latency;
  const c = o.connect_time;
  const nSources = Object.keys(o.sources).length;
  return [
    `peer_socketio_load: ${o.connections} -> ${o.target} (${o.client}, ${o.processes} process(es))`,
    `connect: ${o.opened} of ${o.connections} open in ${o.connect_seconds.toFixed(2)} s (${o.connects_per_second.toFixed(0)}/s); connect time p50 ${c.p50_ms} ms, p99 ${c.p99_ms} ms, max ${c.max_ms} ms; sources ${nSources > 8 ? `${nSources} addresses` : JSON.stringify(o.sources)}`,
    Object.keys(o.connect_errors).length ? `connect errors: ${JSON.stringify(o.connect_errors)}` : null,
    `held ${o.held_seconds.toFixed(1)} s; ${o.open_at_end} still open at the end; pings answered ${o.pings_answered}; unexpected disconnects ${dropped}`,
    o.sent ? `messages: ${o.sent} sent in ${o.publish_seconds.toFixed(1)} s (${o.publish_rate_achieved.toFixed(0)}/s); deliveries ${o.received} of ${o.expected} (${o.lost} lost)` : null,
    o.sent ? `delivery latency: p50 ${l.p50_ms} ms, p99 ${l.p99_ms} ms, p99.9 ${l.p999_ms} ms, max ${l.max_ms} ms (${l.samples} samples)` : null,
    ...(o.ok ? ['result: ok'] : o.problems.map((p) => `PROBLEM: ${p}`)),
  ].filter((x) => x !== null).join('\n') + '\n';
}

let reported = false;
async function report(extraProblems) {
  if (reported) return;
  reported = true;
  clearInterval(progressTimer);
  const results = [];
  for (const s of shards) {
    const r = await within(s.result(), 10000);
    if (r) results.push(r);
  }
  const [o, dropped] = outcome(results, extraProblems);
  process.stderr.write(human(o, dropped));
  if (opt.json) process.stdout.write(`${JSON.stringify(o, null, 2)}\n`);
  await within(all('close'), 2000);
  // Let the Close frames go out, then exit whatever is still pending (bounded).
  setTimeout(() => { for (const s of shards) s.kill(); process.exit(o.ok ? 0 : 1); }, 500);
}

let progressBusy = false;
const progressTimer = setInterval(async () => {
  if (progressBusy) return;
  progressBusy = true;
  const s = await totals();
  progressBusy = false;
  if (reported) return;
  process.stderr.write(`peer_socketio_load: ${phase}: open ${s.opened}/${N} failed ${s.failed} inflight ${s.inflight} dropped ${s.dropped} sent ${s.sent} delivered ${s.received}/${s.expected}\n`);
}, 1000);

setTimeout(() => report([`--max-time ${opt['max-time']} s reached during the ${phase} phase; stopped`]), opt['max-time'] * 1000);

(async () => {
  const rooms = spread.map(([size, count]) => `${size}:${count}`).join(',');
  process.stderr.write(`peer_socketio_load: ${N} client(s) to ${urls.join(',')} from ${K} process(es), ${opt['connect-rate']} connects/s, at most ${opt['max-inflight']} in flight, rooms (size:clients) ${rooms}, sources from ${sourceBase || 'kernel choice'}\n`);
  await all('connect');
  phase = 'join';
  await all('join');
  phase = 'verify';
  await all('verify');
  phase = 'hold';
  const holdStart = Date.now();
  await sleep(opt.hold * 1000);
  if (opt['publish-rate'] > 0) {
    phase = 'publish';
    publishSeconds = Math.max(...(await all('publish')));
    phase = 'drain';
    await drain();
  }
  heldSeconds = (Date.now() - holdStart) / 1000;
  phase = 'finish';
  await report([]);
})().catch((e) => report([`internal error: ${e && e.stack ? e.stack : e}`]));

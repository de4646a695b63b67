// Load client for bench/peer_socketio_server.js: `tunegate load`'s phases (docs/load.md) for
// one Node process, on `socket.io-client` 4 (WebSocket transport only, no polling, no
// reconnection, one Manager per client so every client is its own connection).
//
//   node bench/peer_socketio_load.js http://127.0.0.1:PORT -n N [--rooms SIZE]
//        [--connect-rate R] [--max-inflight M] [--source 127.0.0.2] [--per-source 20000]
//        [--publish-rate R] [--publish-seconds S] [--payload BYTES] [--hold H]
//        [--connect-timeout S] [--max-time S] [--json]
//
// Phases, as in tunegate load:
//  1. connect: N clients at --connect-rate per second, at most --max-inflight in flight. Client
//     i binds source address --source + floor(i / --per-source) (127.0.0.2, .3, ... for a
//     loopback target) through socket.io-client's `localAddress` option, which engine.io-client
//     hands to `ws`, which hands it to net.connect; every opened client's bound address is read
//     back from its TCP socket and counted in `sources` (a mismatch is a problem). Open means
//     Socket.IO's `connect` event (engine.io handshake plus namespace CONNECT answered).
//  2. join: client i joins room `sS-floor(i/S)` with an acknowledgement; every ack counts.
//  3. verify: `count` on up to 64 rooms until each has its planned members (at most 10 s).
//  4. hold: --hold seconds; the clients answer engine.io pings (counted as pings_answered).
//  5. publish: --publish-rate messages/s for --publish-seconds, from the members of rooms of 2
//     or more in turn: emit("publish", {room, data: {t, p}}), t = CLOCK_MONOTONIC in us
//     (process.hrtime.bigint()), p = --payload bytes of padding. Each message should reach the
//     room's other members: expected += planned size - 1. Every `message` received records
//     now - t (same process, same clock).
//  6. drain: until every expected delivery arrived, nothing moved for 2 s, or 10 s passed.
//  7. finish: every client disconnects; the result goes to stdout (--json) or stderr.
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
  n: 1000, rooms: 10, 'connect-rate': 20000, 'max-inflight': 1000, source: null,
  'per-source': 20000, 'publish-rate': 0, 'publish-seconds': 10, payload: 64, hold: 0,
  'connect-timeout': 120, 'max-time': 900, json: false,
};
function usage(msg) {
  process.stderr.write(`peer_socketio_load: ${msg}\nusage: node peer_socketio_load.js URL -n N [--rooms SIZE] [--connect-rate R] [--max-inflight M] [--source IPV4] [--per-source K] [--publish-rate R] [--publish-seconds S] [--payload BYTES] [--hold S] [--connect-timeout S] [--max-time S] [--json]\n`);
  process.exit(2);
}
const opt = { ...defaults };
let url = null;
{
  const argv = process.argv.slice(2);
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (a === '--json') { opt.json = true; continue; }
    if (a === '-h' || a === '--help') usage('help');
    const key = a === '-n' ? 'n' : a.startsWith('--') ? a.slice(2) : null;
    if (key === null) {
      if (url !== null) usage(`unexpected argument ${a}`);
      url = a;
      continue;
    }
    if (!(key in defaults)) usage(`unknown option ${a}`);
    if (i + 1 >= argv.length) usage(`${a} needs a value`);
    const v = argv[++i];
    if (key === 'source') { opt.source = v; continue; }
    const num = Number(v);
    if (!Number.isFinite(num) || num < 0) usage(`${a}: ${v} is not a number >= 0`);
    opt[key] = num;
  }
}
if (!url) usage('no URL');
url = url.replace(/^ws:/, 'http:');
const target = new URL(url);
const N = Math.floor(opt.n);
const S = Math.floor(opt.rooms);
if (N < 1 || S < 1 || opt['connect-rate'] <= 0 || opt['max-inflight'] < 1 || opt['per-source'] < 1) {
  usage('-n, --rooms, --connect-rate, --max-inflight and --per-source must be above 0');
}
const isLoopback = /^127\./.test(target.hostname);
const sourceBase = opt.source || (isLoopback ? '127.0.0.2' : null);
function ipAdd(ip, k) {
  const p = ip.split('.').map(Number);
  if (p.length !== 4 || p.some((x) => !Number.isInteger(x) || x < 0 || x > 255)) usage(`--source ${ip}: not an IPv4 address`);
  const v = (((p[0] << 24) >>> 0) + (p[1] << 16) + (p[2] << 8) + p[3] + k) >>> 0;
  return [v >>> 24, (v >>> 16) & 255, (v >>> 8) & 255, v & 255].join('.');
}
const sourceOf = (i) => (sourceBase ? ipAdd(sourceBase, Math.floor(i / opt['per-source'])) : undefined);
const roomOf = (i) => {
  const r = Math.floor(i / S);
  return [`s${S}-${r}`, Math.min(S, N - r * S)];
};

// ---- state ----------------------------------------------------------------------------------
const nowUs = () => Number(process.hrtime.bigint() / 1000n);
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const t = {
  attempted: 0, opened: 0, connect_errors: {}, disconnects: {}, joined: 0, server_errors: 0,
  rooms_checked: 0, rooms_short: 0, sent: 0, expected: 0, received: 0, pings_answered: 0,
};
const bump = (map, k) => { map[k] = (map[k] || 0) + 1; };
const clients = []; // { socket, room, members, settled, open }
const sources = {};
let sourceMismatch = 0;
let inflight = 0;
let dropped = 0;
let finishing = false;
let lastOpenUs = 0;
let connectSeconds = 0;
let heldSeconds = 0;
let publishSeconds = 0;
let phase = 'connect';
const pad = 'x'.repeat(Math.floor(opt.payload));

// Samples in microseconds, sorted at the end (exact percentiles, no histogram rounding).
class Samples {
  constructor(cap) { this.a = new Float64Array(cap); this.n = 0; }
  push(v) {
    if (this.n === this.a.length) { const b = new Float64Array(this.a.length * 2); b.set(this.a); this.a = b; }
    this.a[this.n++] = v;
  }
  percentiles() {
    const s = this.a.subarray(0, this.n).sort();
    const at = (q) => (this.n ? s[Math.min(this.n - 1, Math.max(0, Math.ceil(q * this.n) - 1))] : 0);
    const ms = (us) => Math.round(us) / 1000;
    return { p50_ms: ms(at(0.5)), p99_ms: ms(at(0.99)), p999_ms: ms(at(0.999)), max_ms: ms(this.n ? s[this.n - 1] : 0), samples: this.n };
  }
}
const connectUs = new Samples(Math.max(1024, N));
const latencyUs = new Samples(1 << 20);

function causeOf(err) {
  if (!err) return 'unknown';
  const d = err.description;
  const inner = d && (d.error || d);
  if (inner && inner.code) return String(inner.code);
  if (inner && inner.message && inner.message !== err.message) return `${err.message}: ${inner.message}`;
  return String(err.message || err);
}

// ---- connect --------------------------------------------------------------------------------
function connectOne(i, deadline) {
  const [room, members] = roomOf(i);
  const c = { socket: null, room, members, settled: false, open: false };
  clients.push(c);
  t.attempted++;
  inflight++;
  const started = nowUs();
  const src = sourceOf(i);
  const socket = io(url, {
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
    inflight--;
    t.opened++;
    const now = nowUs();
    connectUs.push(Math.max(1, now - started));
    if (now > lastOpenUs) lastOpenUs = now;
    let local;
    try { local = socket.io.engine.transport.ws._socket.localAddress; } catch (e) { local = undefined; }
    bump(sources, String(local));
    if (src && local !== src) sourceMismatch++;
  });
  socket.on('connect_error', (err) => {
    if (c.settled) return;
    c.settled = true;
    inflight--;
    bump(t.connect_errors, causeOf(err));
    socket.close();
  });
  socket.on('disconnect', (reason) => {
    if (!c.open) return;
    c.open = false;
    if (!finishing) { dropped++; bump(t.disconnects, reason); }
  });
  socket.on('message', (data) => {
    const now = nowUs();
    const sent = data && typeof data.t === 'number' ? data.t : now;
    latencyUs.push(Math.max(1, now - sent));
    t.received++;
  });
}

async function connectPhase() {
  const rate = opt['connect-rate'];
  const cap = opt['max-inflight'];
  const start = Date.now();
  const deadline = start + opt['connect-timeout'] * 1000;
  const firstUs = nowUs();
  let i = 0;
  while (i < N) {
    if (Date.now() >= deadline) {
      const left = N - i;
      t.attempted += left;
      t.connect_errors['not started: connect timeout'] = (t.connect_errors['not started: connect timeout'] || 0) + left;
      break;
    }
    const due = Math.min(N, Math.floor(((Date.now() - start) / 1000) * rate) + 1);
    let started = 0;
    while (i < due && inflight < cap) { connectOne(i++, deadline); started++; }
    // Yield to the event loop; 1 ms is the timer granularity.
    await sleep(started ? 0 : 1);
  }
  while (inflight > 0 && Date.now() < deadline) await sleep(5);
  for (const c of clients) {
    if (!c.settled) { c.settled = true; inflight--; bump(t.connect_errors, 'timeout'); c.socket.close(); }
  }
  connectSeconds = lastOpenUs ? (lastOpenUs - firstUs) / 1e6 : 0;
}

// ---- join, verify ---------------------------------------------------------------------------
async function joinPhase() {
  let asked = 0;
  let answers = 0;
  for (const c of clients) {
    if (!c.open) continue;
    asked++;
    c.socket.timeout(60000).emit('join', c.room, (err, res) => {
      answers++;
      if (err || !res || res.error) t.server_errors++;
      else t.joined++;
    });
  }
  const until = Date.now() + 60000;
  while (answers + dropped < asked && Date.now() < until) await sleep(5);
}

async function verifyPhase() {
  const step = Math.max(1, Math.floor(clients.length / 64));
  const until = Date.now() + 10000;
  for (let k = 0, i = 0; i < clients.length && k < 64; i += step, k++) {
    const c = clients[i];
    if (!c.open) continue;
    t.rooms_checked++;
    let ok = false;
    while (Date.now() < until && c.open) {
      let res;
      try { res = await c.socket.timeout(2000).emitWithAck('count', c.room); } catch (e) { break; }
      if (res && res.members >= c.members) { ok = true; break; }
      await sleep(20);
    }
    if (!ok) t.rooms_short++;
  }
}

// ---- publish, drain -------------------------------------------------------------------------
async function publishPhase() {
  const rate = opt['publish-rate'];
  const publishers = clients.filter((c) => c.members >= 2);
  const start = Date.now();
  if (rate <= 0 || publishers.length === 0) return 0;
  const total = Math.round(rate * opt['publish-seconds']);
  let next = 0;
  let sent = 0;
  while (sent < total) {
    await sleep(2);
    const due = Math.min(total, Math.floor(((Date.now() - start) / 1000) * rate));
    while (sent < due) {
      let tries = 0;
      for (;;) {
        const c = publishers[next++ % publishers.length];
        tries++;
        if (c.open) {
          c.socket.emit('publish', { room: c.room, data: { t: nowUs(), p: pad } });
          t.sent++;
          t.expected += c.members - 1;
          break;
        }
        if (tries > publishers.length) return (Date.now() - start) / 1000;
      }
      sent++;
    }
  }
  return (Date.now() - start) / 1000;
}

async function drain() {
  const end = Date.now() + 10000;
  let last = [t.received, Date.now()];
  while (t.received < t.expected && Date.now() < end) {
    if (t.received !== last[0]) last = [t.received, Date.now()];
    else if (Date.now() - last[1] > 2000) break;
    await sleep(100);
  }
}

// ---- report ---------------------------------------------------------------------------------
function outcome(extraProblems) {
  const openAtEnd = clients.filter((c) => c.open).length;
  const o = {
    target: target.href, connections: N, processes: 1, client: `socket.io-client ${versionOf('socket.io-client')} (node ${process.version})`,
    ...t, open_at_end: openAtEnd, sources, source_mismatch: sourceMismatch,
    connect_seconds: connectSeconds, connects_per_second: t.opened / Math.max(connectSeconds, 1e-6),
    connect_time: connectUs.percentiles(), held_seconds: heldSeconds, publish_seconds: publishSeconds,
    publish_rate_achieved: publishSeconds > 0 ? t.sent / publishSeconds : 0,
    latency: latencyUs.percentiles(), lost: Math.max(0, t.expected - t.received), ok: false, problems: [],
  };
  const p = [...extraProblems];
  if (t.opened < N) p.push(`${t.opened} of ${N} connections opened; errors: ${JSON.stringify(t.connect_errors)}`);
  if (dropped > 0) p.push(`${dropped} unexpected disconnects: ${JSON.stringify(t.disconnects)}`);
  if (t.server_errors > 0) p.push(`${t.server_errors} failed joins (error ack or ack timeout)`);
  if (t.rooms_short > 0) p.push(`${t.rooms_short} of ${t.rooms_checked} rooms checked never counted their planned members`);
  if (o.lost > 0) p.push(`${o.lost} of ${t.expected} deliveries missing`);
  if (t.received > t.expected) p.push(`${t.received - t.expected} deliveries more than expected (duplicates)`);
  if (sourceMismatch > 0) p.push(`${sourceMismatch} clients not bound to their planned source address: ${JSON.stringify(sources)}`);
  o.ok = p.length === 0;
  o.problems = p;
  return o;
}

function human(o) {
  const l = o.latency;
  const c = o.connect_time;
  return [
    `peer_socketio_load: ${o.connections} -> ${o.target} (${o.client})`,
    `connect: ${o.opened} of ${o.connections} open in ${o.connect_seconds.toFixed(2)} s (${o.connects_per_second.toFixed(0)}/s); connect time p50 ${c.p50_ms} ms, p99 ${c.p99_ms} ms, max ${c.max_ms} ms; sources ${JSON.stringify(o.sources)}`,
    Object.keys(o.connect_errors).length ? `connect errors: ${JSON.stringify(o.connect_errors)}` : null,
    `held ${o.held_seconds.toFixed(1)} s; ${o.open_at_end} still open at the end; pings answered ${o.pings_answered}; unexpected disconnects ${dropped}`,
    o.sent ? `messages: ${o.sent} sent in ${o.publish_seconds.toFixed(1)} s (${o.publish_rate_achieved.toFixed(0)}/s); deliveries ${o.received} of ${o.expected} (${o.lost} lost)` : null,
    o.sent ? `delivery latency: p50 ${l.p50_ms} ms, p99 ${l.p99_ms} ms, p99.9 ${l.p999_ms} ms, max ${l.max_ms} ms (${l.samples} samples)` : null,
    ...(o.ok ? ['result: ok'] : o.problems.map((p) => `PROBLEM: ${p}`)),
  ].filter((x) => x !== null).join('\n') + '\n';
}

let reported = false;
function report(extraProblems) {
  if (reported) return;
  reported = true;
  finishing = true;
  clearInterval(progressTimer);
  const o = outcome(extraProblems);
  process.stderr.write(human(o));
  if (opt.json) process.stdout.write(`${JSON.stringify(o, null, 2)}\n`);
  for (const c of clients) { try { c.socket.disconnect(); } catch (e) { /* already gone */ } }
  // Let the Close frames go out, then exit whatever is still pending (bounded).
  setTimeout(() => process.exit(o.ok ? 0 : 1), 500);
}

const progressTimer = setInterval(() => {
  process.stderr.write(`peer_socketio_load: ${phase}: open ${t.opened}/${N} failed ${Object.values(t.connect_errors).reduce((a, b) => a + b, 0)} inflight ${inflight} dropped ${dropped} sent ${t.sent} delivered ${t.received}/${t.expected}\n`);
}, 1000);

setTimeout(() => report([`--max-time ${opt['max-time']} s reached during the ${phase} phase; stopped`]), opt['max-time'] * 1000);

(async () => {
  process.stderr.write(`peer_socketio_load: ${N} client(s) to ${target.href}, ${opt['connect-rate']} connects/s, at most ${opt['max-inflight']} in flight, rooms of ${S}, sources from ${sourceBase || 'kernel choice'}\n`);
  await connectPhase();
  phase = 'join';
  await joinPhase();
  phase = 'verify';
  await verifyPhase();
  phase = 'hold';
  const holdStart = Date.now();
  await sleep(opt.hold * 1000);
  if (opt['publish-rate'] > 0) {
    phase = 'publish';
    publishSeconds = await publishPhase();
    phase = 'drain';
    await drain();
  }
  heldSeconds = (Date.now() - holdStart) / 1000;
  report([]);
})().catch((e) => report([`internal error: ${e && e.stack ? e.stack : e}`]));

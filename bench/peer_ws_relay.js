// Peer for the relay benchmarks: the relay subset of docs/protocol.md (hello, join, leave,
// publish, count; JSON text frames) on Node `ws`, written the way a Node developer would
// write it: rooms as Map<string, Set<ws>>, one JSON.stringify per publish shared by every
// receiver, and the heartbeat pattern from the ws README (every interval, terminate the
// clients that did not pong since the last round, ping the others).
//
//   node bench/peer_ws_relay.js [PORT] [PING_INTERVAL_MS]
//   env: PING_INTERVAL_MS (default 25000), used when the second argument is absent.
//
// Listens on 127.0.0.1:PORT (0 = any free port) and prints `listening on 127.0.0.1:PORT` on
// stderr once listening, the line the bench scripts parse. `ws` is resolved through NODE_PATH
// (installed by the bench into ~/.cache/tunegate/bench-node, never the repo).
//
// Differences from `tunegate serve`, on purpose (they are what a plain ws app does):
// - ping_timeout in hello equals ping_interval: with the README pattern a client is dropped at
//   the first round after the one whose ping it did not answer, i.e. up to one interval later.
//   Unresponsive clients are terminate()d (no Close frame), not closed with 1001.
// - `data` goes through JSON.parse/JSON.stringify: integers beyond 2^53 lose precision and
//   1.0 becomes 1. Binary frames (MsgPack) are answered with a bad_request error.
// - `send`/`direct` is not implemented (unknown_op); no limits on rooms per connection.
'use strict';
const http = require('http');
const { WebSocketServer } = require('ws');

const port = Number(process.argv[2] || 0);
const pingInterval = Number(process.argv[3] || process.env.PING_INTERVAL_MS || 25000);
if (!Number.isInteger(port) || port < 0 || port > 65535 || !(pingInterval > 0)) {
  process.stderr.write('usage: node peer_ws_relay.js [PORT] [PING_INTERVAL_MS]\n');
  process.exit(2);
}

/** @type {Map<string, Set<import('ws').WebSocket>>} */
const rooms = new Map();
let nextId = 0;

function reply(ws, obj) {
  ws.send(JSON.stringify(obj));
}

function error(ws, code, message, ref) {
  const e = { op: 'error', code, message };
  if (ref !== undefined && ref !== null) e.ref = ref;
  reply(ws, e);
}

function answer(ws, obj, ref) {
  if (ref !== undefined && ref !== null) obj.ref = ref;
  reply(ws, obj);
}

function validRoom(room) {
  if (typeof room !== 'string') return false;
  const n = Buffer.byteLength(room);
  return n >= 1 && n <= 128;
}

function leaveAll(ws) {
  for (const room of ws.rooms) {
    const members = rooms.get(room);
    if (members) {
      members.delete(ws);
      if (members.size === 0) rooms.delete(room);
    }
  }
  ws.rooms.clear();
}

function onMessage(ws, data, isBinary) {
  if (isBinary) return error(ws, 'bad_request', 'this peer speaks JSON text frames only');
  let m;
  try {
    m = JSON.parse(data.toString());
  } catch (e) {
    return error(ws, 'bad_request', `bad JSON: ${e.message}`);
  }
  if (m === null || typeof m !== 'object' || Array.isArray(m)) {
    return error(ws, 'bad_request', 'bad JSON: expected a map');
  }
  const ref = m.ref;
  if (typeof m.op !== 'string') return error(ws, 'bad_request', 'bad JSON: missing field `op`', ref);
  const needsRoom = m.op === 'join' || m.op === 'leave' || m.op === 'publish' || m.op === 'count';
  if (needsRoom && m.room === undefined) return error(ws, 'bad_request', 'this op needs "room"', ref);
  if (needsRoom && !validRoom(m.room)) return error(ws, 'bad_request', 'room names are 1 to 128 bytes', ref);
  const room = m.room;
  switch (m.op) {
    case 'join': {
      let members = rooms.get(room);
      if (!members) rooms.set(room, (members = new Set()));
      members.add(ws);
      ws.rooms.add(room);
      return answer(ws, { op: 'joined', room, members: members.size }, ref);
    }
    case 'leave': {
      const members = rooms.get(room);
      if (!members || !members.has(ws)) return error(ws, 'not_a_member', `not in room ${JSON.stringify(room)}`, ref);
      members.delete(ws);
      ws.rooms.delete(room);
      if (members.size === 0) rooms.delete(room);
      return answer(ws, { op: 'left', room, members: members.size }, ref);
    }
    case 'count': {
      const members = rooms.get(room);
      return answer(ws, { op: 'count', room, members: members ? members.size : 0 }, ref);
    }
    case 'publish': {
      const members = rooms.get(room);
      if (members) {
        const echo = m.echo === true;
        // One serialisation for the whole room; every receiver gets the same bytes.
        const out = Buffer.from(JSON.stringify({
          op: 'message', room, from: ws.id, data: m.data === undefined ? null : m.data,
        }));
        for (const member of members) {
          if ((member !== ws || echo) && member.readyState === 1) member.send(out, { binary: false });
        }
      }
      if (ref !== undefined && ref !== null) reply(ws, { op: 'published', room, ref });
      return undefined;
    }
    default:
      return error(ws, 'unknown_op', `unknown op ${JSON.stringify(m.op)} (join, leave, publish, count)`, ref);
  }
}

const server = http.createServer((req, res) => {
  res.writeHead(426, { 'Content-Type': 'text/plain', Upgrade: 'websocket', Connection: 'close' });
  res.end('this is a WebSocket endpoint: connect with a WebSocket client\n');
});
// PEER_DEFLATE=1 (bench/side-by-side.sh BENCH_DEFLATE=1): permessage-deflate with ws's
// default server settings.
const wss = new WebSocketServer({ server, perMessageDeflate: process.env.PEER_DEFLATE === '1' });

wss.on('connection', (ws) => {
  ws.id = nextId++;
  ws.rooms = new Set();
  ws.isAlive = true;
  ws.on('pong', () => { ws.isAlive = true; });
  ws.on('message', (data, isBinary) => onMessage(ws, data, isBinary));
  ws.on('close', () => leaveAll(ws));
  ws.on('error', () => {}); // a reset from a load client is expected, not a crash
  reply(ws, { op: 'hello', id: ws.id, ping_interval: pingInterval, ping_timeout: pingInterval });
});

// The ws README's heartbeat: one round per interval over every client.
const heartbeat = setInterval(() => {
  for (const ws of wss.clients) {
    if (ws.isAlive === false) {
      leaveAll(ws);
      ws.terminate();
      continue;
    }
    ws.isAlive = false;
    ws.ping();
  }
}, pingInterval);
wss.on('close', () => clearInterval(heartbeat));

// Backlog: Node's default is 511; the kernel caps this at net.core.somaxconn.
server.listen({ host: '127.0.0.1', port, backlog: 65535 }, () => {
  const a = server.address();
  process.stderr.write(`peer ws relay: listening on ${a.address}:${a.port} (node ${process.version}, ws ${require('ws/package.json').version}, ping ${pingInterval} ms)\n`);
});
process.on('SIGTERM', () => process.exit(0));
process.on('SIGINT', () => process.exit(0));

// Peer for the relay benchmarks: the same rooms-and-publish job on Socket.IO 4, the way its
// docs write it: rooms are Socket.IO rooms, a publish is `socket.to(room).emit("message", data)`,
// join answers through an acknowledgement. WebSocket transport only (no long-polling, so no
// sticky sessions or upgrade dance), no permessage-deflate (the engine.io default), the client
// bundle not served.
//
//   node bench/peer_socketio_server.js [PORT] [PING_INTERVAL_MS] [PING_TIMEOUT_MS]
//   env: PING_INTERVAL_MS (default 25000), PING_TIMEOUT_MS (default 20000), used when the
//   arguments are absent. These are Socket.IO's defaults.
//   env: BIND_ADDRESS (default 127.0.0.1), the address to listen on.
//   env: REDIS_CLUSTER=HOST:PORT[,HOST:PORT...]: join the other servers through a Redis 7
//   Cluster with `@socket.io/redis-adapter`'s sharded adapter (createShardedAdapter, SPUBLISH /
//   SSUBSCRIBE, subscriptionMode "dynamic": a room's messages go on a channel of its own, to
//   which only the servers holding one of its members subscribe), on the `redis` v4 client's
//   createCluster (one client to publish, a duplicate to subscribe). Without it: one server,
//   the in-memory adapter (bench/side-by-side.sh).
//
// Events (client -> server):
//   join    (room, ack)          ack({room, members})   members: the room's size on this server,
//                                                       joiner included (across servers it is
//                                                       not known without asking them all)
//   count   (room, ack)          ack({room, members})   for the load client's verify phase: the
//                                                       room's size; with REDIS_CLUSTER over
//                                                       every server (io.in(room).fetchSockets(),
//                                                       which asks every server through Redis
//                                                       and waits for all their answers)
//   publish ({room, data}, ack?) every other member gets emit("message", data); ack({room})
//                                only if the client asked for one
// Listens on BIND_ADDRESS:PORT (0 = any free port) and prints `listening on ADDRESS:PORT` on
// stderr once listening (and, with REDIS_CLUSTER, connected to the cluster), the line the bench
// scripts parse. `socket.io` (and `@socket.io/redis-adapter`, `redis`) are resolved through
// NODE_PATH (installed by the bench into ~/.cache/tunegate/bench-node, never the repo).
'use strict';
const http = require('http');
const { Server } = require('socket.io');
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

const port = Number(process.argv[2] || 0);
const pingInterval = Number(process.argv[3] || process.env.PING_INTERVAL_MS || 25000);
const pingTimeout = Number(process.argv[4] || process.env.PING_TIMEOUT_MS || 20000);
const host = process.env.BIND_ADDRESS || '127.0.0.1';
const cluster = (process.env.REDIS_CLUSTER || '').split(',').map((s) => s.trim()).filter(Boolean);
if (!Number.isInteger(port) || port < 0 || port > 65535 || !(pingInterval > 0) || !(pingTimeout > 0)
    || cluster.some((s) => !/^[^\s:]+:\d+$/.test(s))) {
  process.stderr.write('usage: [BIND_ADDRESS=IP] [REDIS_CLUSTER=HOST:PORT,...] node peer_socketio_server.js [PORT] [PING_INTERVAL_MS] [PING_TIMEOUT_MS]\n');
  process.exit(2);
}

const validRoom = (room) => typeof room === 'string' && room.length > 0 && Buffer.byteLength(room) <= 128;

const httpServer = http.createServer();
const io = new Server(httpServer, {
  transports: ['websocket'],
  pingInterval,
  pingTimeout,
  perMessageDeflate: false,
  serveClient: false,
});

// The room's size: this server's members, or with the cluster every server's.
async function roomSize(room) {
  if (cluster.length === 0) {
    const members = io.sockets.adapter.rooms.get(room);
    return members ? members.size : 0;
  }
  return (await io.in(room).fetchSockets()).length;
}

io.on('connection', (socket) => {
  socket.on('join', (room, ack) => {
    if (!validRoom(room)) return typeof ack === 'function' && ack({ error: 'bad_request' });
    socket.join(room);
    if (typeof ack === 'function') ack({ room, members: io.sockets.adapter.rooms.get(room).size });
    return undefined;
  });
  socket.on('count', (room, ack) => {
    if (typeof ack !== 'function') return;
    roomSize(room).then(
      (members) => ack({ room, members }),
      (e) => ack({ room, error: String(e && e.message ? e.message : e) }),
    );
  });
  socket.on('publish', (msg, ack) => {
    if (!msg || !validRoom(msg.room)) return typeof ack === 'function' && ack({ error: 'bad_request' });
    socket.to(msg.room).emit('message', msg.data === undefined ? null : msg.data);
    if (typeof ack === 'function') ack({ room: msg.room });
    return undefined;
  });
  socket.on('error', () => {});
});

let describe = 'in-memory adapter';
async function joinCluster() {
  if (cluster.length === 0) return;
  const { createCluster } = require('redis');
  const { createShardedAdapter } = require('@socket.io/redis-adapter');
  const pubClient = createCluster({ rootNodes: cluster.map((a) => ({ url: `redis://${a}` })) });
  const subClient = pubClient.duplicate();
  for (const c of [pubClient, subClient]) {
    c.on('error', (e) => process.stderr.write(`peer socket.io: redis: ${e && e.message ? e.message : e}\n`));
  }
  await Promise.all([pubClient.connect(), subClient.connect()]);
  io.adapter(createShardedAdapter(pubClient, subClient, { subscriptionMode: 'dynamic' }));
  describe = `sharded redis adapter ${versionOf('@socket.io/redis-adapter')} (dynamic), redis ${versionOf('redis')} cluster ${cluster.join(',')}`;
}

joinCluster().then(() => {
  // Backlog: Node's default is 511; the kernel caps this at net.core.somaxconn.
  httpServer.listen({ host, port, backlog: 65535 }, () => {
    const a = httpServer.address();
    process.stderr.write(`peer socket.io: listening on ${a.address}:${a.port} (node ${process.version}, socket.io ${versionOf('socket.io')}, ${describe}, ping ${pingInterval}/${pingTimeout} ms)\n`);
  });
}, (e) => {
  process.stderr.write(`peer socket.io: could not join the Redis cluster: ${e && e.stack ? e.stack : e}\n`);
  process.exit(1);
});
process.on('SIGTERM', () => process.exit(0));
process.on('SIGINT', () => process.exit(0));

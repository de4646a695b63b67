// Peer for the relay benchmarks: the same rooms-and-publish job on Socket.IO 4, the way its
// docs write it: rooms are Socket.IO rooms (the in-memory adapter), a publish is
// `socket.to(room).emit("message", data)`, join answers through an acknowledgement.
// WebSocket transport only (no long-polling, so no sticky sessions or upgrade dance), no
// permessage-deflate (the engine.io default), the client bundle not served.
//
//   node bench/peer_socketio_server.js [PORT] [PING_INTERVAL_MS] [PING_TIMEOUT_MS]
//   env: PING_INTERVAL_MS (default 25000), PING_TIMEOUT_MS (default 20000), used when the
//   arguments are absent. These are Socket.IO's defaults.
//
// Events (client -> server):
//   join    (room, ack)          ack({room, members})   members: the room's size, joiner included
//   count   (room, ack)          ack({room, members})   for the load client's verify phase
//   publish ({room, data}, ack?) every other member gets emit("message", data); ack({room})
//                                only if the client asked for one
// Listens on 127.0.0.1:PORT (0 = any free port) and prints `listening on 127.0.0.1:PORT` on
// stderr once listening, the line the bench scripts parse. `socket.io` is resolved through
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
if (!Number.isInteger(port) || port < 0 || port > 65535 || !(pingInterval > 0) || !(pingTimeout > 0)) {
  process.stderr.write('usage: node peer_socketio_server.js [PORT] [PING_INTERVAL_MS] [PING_TIMEOUT_MS]\n');
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

io.on('connection', (socket) => {
  socket.on('join', (room, ack) => {
    if (!validRoom(room)) return typeof ack === 'function' && ack({ error: 'bad_request' });
    socket.join(room);
    if (typeof ack === 'function') ack({ room, members: io.sockets.adapter.rooms.get(room).size });
    return undefined;
  });
  socket.on('count', (room, ack) => {
    if (typeof ack !== 'function') return;
    const members = io.sockets.adapter.rooms.get(room);
    ack({ room, members: members ? members.size : 0 });
  });
  socket.on('publish', (msg, ack) => {
    if (!msg || !validRoom(msg.room)) return typeof ack === 'function' && ack({ error: 'bad_request' });
    socket.to(msg.room).emit('message', msg.data === undefined ? null : msg.data);
    if (typeof ack === 'function') ack({ room: msg.room });
    return undefined;
  });
  socket.on('error', () => {});
});

// Backlog: Node's default is 511; the kernel caps this at net.core.somaxconn.
httpServer.listen({ host: '127.0.0.1', port, backlog: 65535 }, () => {
  const a = httpServer.address();
  process.stderr.write(`peer socket.io: listening on ${a.address}:${a.port} (node ${process.version}, socket.io ${versionOf('socket.io')}, ping ${pingInterval}/${pingTimeout} ms)\n`);
});
process.on('SIGTERM', () => process.exit(0));
process.on('SIGINT', () => process.exit(0));

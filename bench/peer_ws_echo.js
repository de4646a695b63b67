// Peer for bench/idle-memory.sh: the smallest idiomatic Node `ws` echo server.
// Listens on 127.0.0.1:PORT (0 = any free port) and prints the address it got on stderr in the
// same shape as `tunegate serve`, so the bench parses one format. No heartbeat of its own (ws
// has none unless the application adds it), permessage-deflate off (ws's server default,
// spelled out), nothing sent on connect: an idle client costs only what ws and Node keep per
// socket. `ws` is resolved through NODE_PATH, installed by the bench outside the repo.
'use strict';
const { WebSocketServer } = require('ws');
const port = Number(process.argv[2] || 0);
// backlog as large as net.core.somaxconn allows here, like the other servers in the run.
// PEER_DEFLATE=1: permessage-deflate on with ws's default server settings (context takeover
// both ways, so each connection that exchanged a message keeps zlib streams), for comparing
// against `tunegate serve --deflate on`.
const deflate = process.env.PEER_DEFLATE === '1';
const wss = new WebSocketServer({ host: '127.0.0.1', port, backlog: 4096, perMessageDeflate: deflate });
wss.on('connection', (ws) => {
  ws.on('message', (data, isBinary) => ws.send(data, { binary: isBinary }));
  ws.on('error', () => {}); // an RST from the bench client is expected, not a crash
});
wss.on('listening', () => {
  const a = wss.address();
  process.stderr.write(`peer ws: listening on ${a.address}:${a.port} (node ${process.version})\n`);
});
process.on('SIGTERM', () => process.exit(0));

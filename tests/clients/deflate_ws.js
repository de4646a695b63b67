// permessage-deflate in `tunegate serve --deflate on` with Node's `ws` (which offers it by
// default): the extension is agreed without context takeover, and a 3 KB room message goes
// both ways between two ws clients intact.
//
//     node deflate_ws.js URL
//
// Prints "deflate_ws: ok ..." and exits 0 when every check passes; exits 1 otherwise (10 s cap).
"use strict";
const inbox = require("./ws_inbox");

const url = process.argv[2];
const fail = (why) => { console.error("deflate_ws: " + why); process.exit(1); };
setTimeout(() => fail("timed out"), 10000).unref();

const open = () => inbox.open(url, { perMessageDeflate: { threshold: 0 } });

(async () => {
  const a = await open();
  const b = await open();
  const ext = a.extensions;
  const pmd = a._extensions["permessage-deflate"];
  if (ext !== "permessage-deflate" || !pmd || !pmd.params.server_no_context_takeover
      || !pmd.params.client_no_context_takeover) {
    fail("extension not agreed: " + JSON.stringify(ext) + " " + JSON.stringify(pmd && pmd.params));
  }
  const ha = await a.next();
  await b.next();
  for (const ws of [a, b]) {
    ws.send(JSON.stringify({ op: "join", room: "node" }));
    await ws.next();
  }
  const text = "ice candidate 1 udp 2122260223 127.0.0.1 50000 typ host ".repeat(60);
  a.send(JSON.stringify({ op: "publish", room: "node", data: text }));
  const got = await b.next();
  if (got.op !== "message" || got.from !== ha.id || got.data !== text) fail("room message differs");
  b.send(JSON.stringify({ op: "publish", room: "node", data: text.toUpperCase() }));
  const back = await a.next();
  if (back.data !== text.toUpperCase()) fail("reply differs");
  a.close();
  b.close();
  console.log("deflate_ws: ok (" + ext + ")");
  process.exit(0);
})().catch((e) => fail(String(e)));

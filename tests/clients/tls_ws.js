// `tunegate serve --tls-cert/--tls-key` with Node's `ws`, which we did not write, trusting only
// the test's own CA: two wss:// clients, a room message between them and a direct reply.
//
//     node tls_ws.js URL CA
//
// Prints "tls_ws: ok ..." and exits 0 when every check passes; exits 1 with the reason otherwise.
// Bounded: the whole exchange has 10 s.
"use strict";
const fs = require("fs");
const inbox = require("./ws_inbox");

const [url, caFile] = process.argv.slice(2);
const ca = fs.readFileSync(caFile);
const fail = (why) => { console.error("tls_ws: " + why); process.exit(1); };
setTimeout(() => fail("timed out"), 10000).unref();

const open = () => inbox.open(url, { ca });

(async () => {
  const a = await open();
  const b = await open();
  const helloA = await a.next();
  const helloB = await b.next();
  if (helloA.op !== "hello" || helloB.op !== "hello") fail("no hello");
  const protocol = a._socket.getProtocol();
  for (const ws of [a, b]) {
    ws.send(JSON.stringify({ op: "join", room: "node" }));
    const joined = await ws.next();
    if (joined.op !== "joined") fail("join: " + JSON.stringify(joined));
  }
  a.send(JSON.stringify({ op: "publish", room: "node", data: { text: "from node over tls" } }));
  const got = await b.next();
  if (got.op !== "message" || got.from !== helloA.id || got.data.text !== "from node over tls") {
    fail("room message: " + JSON.stringify(got));
  }
  b.send(JSON.stringify({ op: "send", to: helloA.id, data: 42 }));
  const direct = await a.next();
  if (direct.op !== "direct" || direct.data !== 42) fail("direct: " + JSON.stringify(direct));
  a.close();
  b.close();
  console.log("tls_ws: ok (" + protocol + ")");
  process.exit(0);
})().catch((e) => fail(String(e)));

// Shared by the Node `ws` clients of the tests (tls_ws.js, deflate_ws.js): a connection whose
// JSON messages are read in order with `await ws.next()`.
"use strict";
const WebSocket = require("ws");

// Opens `url` with ws `options`; resolves once open.
function open(url, options) {
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(url, options);
    const inbox = [];
    let waiter = null;
    ws.on("message", (data) => {
      const msg = JSON.parse(data.toString());
      if (waiter) { const w = waiter; waiter = null; w(msg); } else inbox.push(msg);
    });
    ws.next = () => new Promise((r) => { if (inbox.length) r(inbox.shift()); else waiter = r; });
    ws.on("open", () => resolve(ws));
    ws.on("error", reject);
  });
}

module.exports = { open };

//! `tunegate serve --echo`: every text or binary message is sent back as one frame of the same
//! type (fragments are reassembled by the transport first). No relay protocol, no hello. It
//! exists for WebSocket conformance suites such as Autobahn|Testsuite; framing, UTF-8 checks,
//! limits, heartbeats, close codes and the HTTP side are the transport's, unchanged.

use super::frame::{self, OP_BINARY, OP_TEXT};
use super::handler::{Handler, Sink};
use super::outq::Out;
use super::routes::Routes;

pub struct Echo {
    routes: Routes,
}

impl Echo {
    pub fn new(routes: Routes) -> Echo {
        Echo { routes }
    }
}

impl Handler for Echo {
    type Data = ();

    fn on_open(
        &mut self,
        _sink: &mut impl Sink<()>,
        _slot: usize,
        _path: &str,
        _grant: Option<std::sync::Arc<crate::auth::Grant>>,
    ) {
    }

    fn on_message(&mut self, sink: &mut impl Sink<()>, slot: usize, binary: bool, payload: &[u8]) {
        let opcode = if binary { OP_BINARY } else { OP_TEXT };
        sink.send(slot, Out::Bytes(&frame::frame(opcode, payload)));
    }

    fn on_end(&mut self, _sink: &mut impl Sink<()>, _slot: usize) {}

    fn on_get(&mut self, path: &str) -> Vec<u8> {
        self.routes.answer(path)
    }
}

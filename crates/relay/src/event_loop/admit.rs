//! Who may upgrade: the client's address (behind a trusted proxy, the forwarded one), its
//! upgrade rate and connection cap (429), and its token when the server requires one (401).
//! Each refusal is answered, counted and logged at most once a second per kind.

use std::net::IpAddr;
use std::os::fd::AsFd;
use std::sync::Arc;

use super::EventLoop;
use crate::auth::{Grant, Refusal};
use crate::client_addr::{self, Forwarded, Source};
use crate::handler::{Handler, Sink};
use crate::handshake::{self, Credentials};
use crate::limits::Throttle;
use crate::metrics::{CloseReason, LoopMetrics};
use crate::sys;

/// One throttle per kind of refused upgrade.
#[derive(Default)]
pub(super) struct Refusals {
    address_limit: Throttle,
    upgrade_rate: Throttle,
    auth: Throttle,
    /// Connections that asked for their room's home and were served here instead.
    pub(super) moves: Throttle,
}

impl<H: Handler> EventLoop<H> {
    /// Who the client is, when that matters (a trusted proxy, a per-address limit or an
    /// upgrade rate is configured), and whether its upgrade rate and the limit admit one more
    /// connection from it. `Ok(Some)`: the address this connection now counts against; `Err`:
    /// refused (answered 429, or gone).
    pub(super) fn admit(&mut self, slot: usize, fwd: &Forwarded) -> Result<Option<IpAddr>, ()> {
        let peer = if self.admission.needs_peer() || !fwd.is_empty() {
            let fd = self.sockets.conns[slot].fd.as_ref();
            match fd.map(|fd| sys::peer_addr(fd.as_fd())) {
                Some(Ok(peer)) => peer.ip(),
                _ => {
                    // ENOTCONN: it went away between its request and our answer.
                    self.sockets.close(slot, CloseReason::PeerGone);
                    return Err(());
                }
            }
        } else {
            return Ok(None);
        };
        let (client, source) = client_addr::resolve(peer, self.admission.trusted(), fwd);
        let m = &self.sockets.metrics;
        match source {
            Source::Forwarded => LoopMetrics::add(&m.forwarded, 1),
            Source::Ignored => {
                LoopMetrics::add(&m.forwarded_ignored, 1);
                if self.admission.first_ignored() {
                    log!(
                        "loop {}: ignored X-Forwarded-For/X-Real-IP from {peer}: not a \
                         --trusted-proxy (logged once; counted in \
                         tunegate_forwarded_headers_ignored_total)",
                        self.sockets.loop_index()
                    );
                }
            }
            Source::Peer => {}
        }
        let via = if client == peer {
            String::new()
        } else {
            format!(" (via proxy {peer})")
        };
        if !self.admission.upgrade_allowed(client) {
            if let Some(unlogged) = self.refusals_logged.upgrade_rate.ready(self.now_ms()) {
                log!(
                    "loop {}: refused an upgrade from {client}{via} with 429: more than {} \
                     upgrades in a second, the --max-upgrade-rate limit ({unlogged} other \
                     refusals since the last such line)",
                    self.sockets.loop_index(),
                    self.admission.rate()
                );
            }
            let response = handshake::response(
                429,
                "Retry-After: 1\r\n",
                "text/plain; charset=utf-8",
                "too many upgrades from this address\n",
            );
            self.sockets
                .finish(slot, &response, CloseReason::UpgradeRate);
            return Err(());
        }
        if self.admission.limit() == 0 {
            return Ok(None);
        }
        match self.admission.admit(client) {
            Ok(()) => Ok(Some(client)),
            Err(open) => {
                if let Some(unlogged) = self.refusals_logged.address_limit.ready(self.now_ms()) {
                    log!(
                        "loop {}: refused an upgrade from {client}{via} with 429: it has {open} \
                         connections open, the --max-connections-per-address limit ({unlogged} \
                         other refusals since the last such line)",
                        self.sockets.loop_index(),
                    );
                }
                let response = handshake::response(
                    429,
                    "",
                    "text/plain; charset=utf-8",
                    "too many connections from this address\n",
                );
                self.sockets
                    .finish(slot, &response, CloseReason::AddressLimit);
                Err(())
            }
        }
    }

    /// With tokens required: what the upgrade's token allows, or 401 with the reason's class
    /// and nothing more (counted by reason, logged once a second at most). `Ok(None)` on an
    /// open server.
    pub(super) fn authenticate(
        &mut self,
        slot: usize,
        credentials: Credentials,
    ) -> Result<Option<Arc<Grant>>, ()> {
        let Some(verifier) = &self.verifier else {
            return Ok(None);
        };
        let verdict = match &credentials {
            Credentials::None => Err(Refusal::Missing),
            Credentials::Conflict => Err(Refusal::Conflict),
            Credentials::Token(token) => verifier.verify(token),
        };
        let why = match verdict {
            Ok(grant) => return Ok(Some(Arc::new(grant))),
            Err(why) => why,
        };
        self.sockets.metrics.auth_refused(why);
        if let Some(unlogged) = self.refusals_logged.auth.ready(self.now_ms()) {
            let peer = self.sockets.conns[slot]
                .fd
                .as_ref()
                .and_then(|fd| sys::peer_addr(fd.as_fd()).ok())
                .map_or_else(|| "a client gone since".to_string(), |a| a.ip().to_string());
            log!(
                "loop {}: refused an upgrade from {peer} with 401: token {why} ({unlogged} other \
                 401s since the last such line; tunegate_auth_refused_total counts them by reason)",
                self.sockets.loop_index(),
            );
        }
        let response = handshake::response(
            401,
            "WWW-Authenticate: Bearer error=\"invalid_token\"\r\n",
            "text/plain; charset=utf-8",
            &format!("unauthorized: {why}\n"),
        );
        self.sockets
            .finish(slot, &response, CloseReason::Unauthorized);
        Err(())
    }
}

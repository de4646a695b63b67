//! The plain-HTTP side of the port: `/healthz` for load balancers and supervisors, `/metrics`
//! for Prometheus, and a 426 for anything else that did not ask to upgrade. Shared by every
//! handler (relay and echo alike).

use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::Shared;
use super::handshake;
use super::metrics::Global;

pub struct Routes {
    shared: Arc<Shared>,
}

impl Routes {
    pub fn new(shared: Arc<Shared>) -> Routes {
        Routes { shared }
    }

    /// The whole HTTP response to a GET of `path` (query ignored).
    pub fn answer(&self, path: &str) -> Vec<u8> {
        let route = path.split('?').next().unwrap_or("");
        let accepting = self.shared.accepting.load(Ordering::Relaxed);
        let bus = &self.shared.bus;
        match route {
            "/healthz" if accepting => {
                let (up, of) = (bus.workers_up(), bus.workers());
                let body = if of > 1 {
                    format!("ok: {up} of {of} workers up\n")
                } else {
                    "ok\n".to_string()
                };
                handshake::response(200, "", "text/plain; charset=utf-8", &body)
            }
            "/healthz" => handshake::response(503, "", "text/plain; charset=utf-8", "draining\n"),
            "/metrics" if !bus.metrics_ready() => handshake::response(
                503,
                "Retry-After: 1\r\n",
                "text/plain; charset=utf-8",
                "this worker just started and waits for the others' counters\n",
            ),
            "/metrics" => {
                let (total, received_by_worker) = super::server_snapshot(&self.shared);
                let body = super::metrics::render(
                    &total,
                    &Global {
                        // Each worker of the unix bus counts the rooms homed on it; with
                        // Redis, a worker counts its own.
                        rooms: if self.shared.config.options.bus.is_some() {
                            bus.rooms()
                        } else {
                            total.rooms.max(0) as u64
                        },
                        accepting,
                        workers_up: bus.workers_up(),
                        workers: bus.workers(),
                        received_by_worker,
                        redis: self.shared.config.options.bus.is_some(),
                    },
                );
                handshake::response(200, "", "text/plain; version=0.0.4; charset=utf-8", &body)
            }
            _ => handshake::upgrade_required(),
        }
    }
}

//! How many worker processes the bundled server runs, and how many event loops each.
//!
//! A process can hold only as many sockets as its RLIMIT_NOFILE, and without CAP_SYS_RESOURCE
//! (many containers; the test machine: hard limit 20000) the limit cannot be raised. So the
//! daemon spreads `target_connections` over enough workers sharing the port (SO_REUSEPORT),
//! keeps one event loop per core in total, and says why in its log and in `tunegate status`.

use serde::{Deserialize, Serialize};

/// Descriptors a worker keeps for everything that is not a client connection (the server's
/// own figure: listeners, epoll, the bus and files).
pub const RESERVED_PER_WORKER: u64 = relay::config::DESCRIPTORS_KEPT;

/// The share of a worker's connections the sizing plans to fill: connections never spread
/// evenly over workers. The kernel spreads them by a hash of address and port, and with
/// `?affinity=ROOM` each room lives on its home, picked by a hash of its name: at a million
/// connections in rooms of 10 over 51 workers (bench/c1m.sh) the fullest worker ran out of
/// descriptors while the average had 1 % to spare. Planning 90 % leaves three standard
/// deviations of a hash's spread over about 2,000 rooms per worker.
pub const FILL_PERCENT: u64 = 90;

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sizing {
    pub workers: usize,
    /// Event loops per worker.
    pub threads: usize,
    /// The RLIMIT_NOFILE each worker runs with (the server raises its soft limit to the hard).
    pub nofile: u64,
    /// Connections one worker can hold: `nofile` minus `RESERVED_PER_WORKER`.
    pub per_worker: u64,
    /// Connections all workers together can hold.
    pub capacity: u64,
    pub target_connections: Option<u64>,
    pub cores: usize,
    /// The sizing in one sentence, for the log and `tunegate status`.
    pub explanation: String,
    /// Set when `target_connections` cannot be held even by the most workers allowed.
    pub shortfall: Option<String>,
}

/// What the operator fixed in the configuration (`None`: size automatically).
#[derive(Clone, Copy, Debug, Default)]
pub struct Fixed {
    pub workers: Option<usize>,
    pub threads: Option<usize>,
}

pub fn size(
    nofile: u64,
    target: Option<u64>,
    cores: usize,
    fixed: Fixed,
    max_workers: usize,
) -> Sizing {
    let cores = cores.max(1);
    let per_worker = nofile.saturating_sub(RESERVED_PER_WORKER).max(1);
    let planned = (per_worker * FILL_PERCENT / 100).max(1);
    let needed = target.map_or(1, |t| t.div_ceil(planned).max(1));
    let (workers, why_workers) = match fixed.workers {
        Some(w) => (w, format!("{w} worker(s) as configured (server.workers)")),
        None => {
            let w = (needed as usize).min(max_workers);
            let why = match target {
                Some(t) => format!(
                    "{w} worker(s): RLIMIT_NOFILE {nofile} leaves {per_worker} connections per worker \
                     ({RESERVED_PER_WORKER} descriptors kept for listeners, epoll, the bus and files), \
                     planned {FILL_PERCENT} % full ({planned}: connections never spread evenly), \
                     and target_connections {t} needs {needed}"
                ),
                None => "1 worker: the profile sets no target_connections".to_string(),
            };
            (w, why)
        }
    };
    let (threads, why_threads) = match fixed.threads {
        Some(t) => (
            t,
            format!("{t} event loop(s) each as configured (server.threads)"),
        ),
        None => {
            let t = (cores / workers).max(1);
            (
                t,
                format!("{t} event loop(s) each, for one loop per core in total ({cores} cores)"),
            )
        }
    };
    let capacity = per_worker.saturating_mul(workers as u64);
    let shortfall = target.filter(|&t| t > capacity).map(|t| {
        format!(
            "target_connections {t} exceeds what {workers} worker(s) can hold ({capacity}); \
             raise RLIMIT_NOFILE (LimitNOFILE= in the unit, needs CAP_SYS_RESOURCE) or lower the target"
        )
    });
    Sizing {
        workers,
        threads,
        nofile,
        per_worker,
        capacity,
        target_connections: target,
        cores,
        explanation: format!("{why_workers}; {why_threads}; capacity {capacity} connections"),
        shortfall,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_low_descriptor_limit_means_more_workers() {
        // This machine: hard limit 20000, no CAP_SYS_RESOURCE, the c100k profile.
        let s = size(20_000, Some(100_000), 2, Fixed::default(), 256);
        assert_eq!((s.workers, s.threads, s.per_worker), (6, 1, 19_744));
        assert_eq!(s.capacity, 118_464);
        assert!(s.shortfall.is_none());
        assert!(s.explanation.contains("needs 6"), "{}", s.explanation);
        // Where the limit is high enough one worker with a loop per core does it.
        let s = size(1_048_576, Some(100_000), 4, Fixed::default(), 256);
        assert_eq!((s.workers, s.threads), (1, 4));
        // No target: one worker.
        let s = size(1024, None, 2, Fixed::default(), 256);
        assert_eq!((s.workers, s.threads), (1, 2));
    }

    #[test]
    fn limits_and_fixed_values_are_reported() {
        let s = size(1024, Some(10_000_000), 2, Fixed::default(), 256);
        assert_eq!(s.workers, 256);
        assert!(s.shortfall.as_deref().unwrap().contains("exceeds"), "{s:?}");
        let s = size(
            20_000,
            Some(100_000),
            8,
            Fixed {
                workers: Some(2),
                threads: None,
            },
            256,
        );
        assert_eq!((s.workers, s.threads), (2, 4));
        assert!(s.shortfall.is_some(), "2 x 19744 < 100000");
        assert!(s.explanation.contains("as configured"));
    }
}

//! Incarnation numbers for the workers the daemon starts: the 12 bits below the node in every
//! connection id a worker hands out (crates/relay/src/id.rs). Every start of every worker gets a number no
//! earlier start got, across worker restarts, reloads and restarts of the daemon itself, so a
//! client holding a dead connection's id can never reach a newcomer with it.
//!
//! The counter lives in `STATE_DIR/incarnation`. Numbers are reserved in blocks: the file is
//! rewritten (atomically) to the end of a block *before* the first number of that block is
//! handed out, so a daemon killed at any instant restarts past everything it handed out. The
//! rest of a block is skipped then; the space wraps after 4,096 numbers (at one block per
//! daemon start, after 256 daemon starts or 4,096 worker starts, whichever comes first).

use std::path::{Path, PathBuf};

use relay::id::INCARNATIONS;
use tuning::host::files;

/// Numbers reserved per write of the counter file.
const BLOCK: u16 = 16;

/// `n + k` in the incarnation space.
fn step(n: u16, k: u16) -> u16 {
    ((u32::from(n) + u32::from(k)) % INCARNATIONS) as u16
}

pub struct Incarnations {
    path: PathBuf,
    next: u16,
    /// Numbers left in the reserved block.
    left: u16,
    /// Why the counter does not survive a restart, once a write failed (said once).
    unsaved: Option<String>,
}

impl Incarnations {
    /// Picks up where the last daemon with this state directory stopped. A missing or damaged
    /// counter starts from the clock's seconds (mod 2^16), far from zero, where a fresh state
    /// directory would otherwise repeat an earlier one's numbers; the second value says so.
    pub fn open(state_dir: &Path) -> (Incarnations, Option<String>) {
        let path = state_dir.join("incarnation");
        let (next, note) = match std::fs::read_to_string(&path) {
            Ok(text) => match text.trim().parse::<u16>() {
                Ok(n) => (step(n, 0), None),
                Err(_) => (
                    clock(),
                    Some(format!(
                        "{} does not hold a number ({:?}); counting worker incarnations from the clock",
                        path.display(),
                        text.trim()
                    )),
                ),
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => (clock(), None),
            Err(e) => (
                clock(),
                Some(format!(
                    "cannot read {}: {e}; counting worker incarnations from the clock",
                    path.display()
                )),
            ),
        };
        let inc = Incarnations {
            path,
            next,
            left: 0,
            unsaved: None,
        };
        (inc, note)
    }

    /// The next number, and a warning (given once) when the counter could not be saved: the
    /// number is still new for this daemon, but a restarted daemon could repeat it.
    pub fn take(&mut self) -> (u16, Option<String>) {
        let mut warning = None;
        if self.left == 0 {
            let end = step(self.next, BLOCK);
            match files::write_atomic(&self.path, format!("{end}\n").as_bytes(), 0o644) {
                Ok(()) => self.unsaved = None,
                Err(e) if self.unsaved.is_none() => {
                    let why = format!("{e:#}");
                    warning = Some(format!(
                        "cannot save the worker incarnation counter: {why}; connection ids stay \
                         unique while this daemon runs, but a restarted daemon may repeat them"
                    ));
                    self.unsaved = Some(why);
                }
                Err(_) => {}
            }
            self.left = BLOCK;
        }
        let n = self.next;
        self.next = step(self.next, 1);
        self.left -= 1;
        (n, warning)
    }
}

fn clock() -> u16 {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    (secs % u64::from(INCARNATIONS)) as u16
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_never_repeat_across_restarts_even_after_a_kill() {
        let d = tempfile::tempdir().unwrap();
        let mut seen = std::collections::HashSet::new();
        for run in 0..5 {
            // Each "daemon" takes a different number of numbers, then vanishes without a word
            // (a kill: nothing is saved on the way out).
            let (mut inc, note) = Incarnations::open(d.path());
            assert!(note.is_none(), "{note:?}");
            for _ in 0..(run * 50 + 1) {
                let (n, warning) = inc.take();
                assert!(warning.is_none());
                assert!(seen.insert(n), "run {run}: {n} handed out twice");
            }
        }
        // The file always names a number past everything handed out.
        let saved: u16 = std::fs::read_to_string(d.path().join("incarnation"))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert!(seen.iter().all(|&n| {
            let ahead = (u32::from(saved) + INCARNATIONS - u32::from(n)) % INCARNATIONS;
            (1..1000).contains(&ahead)
        }));
        assert!(seen.iter().all(|&n| u32::from(n) < INCARNATIONS));
    }

    #[test]
    fn numbers_stay_within_12_bits_and_wrap() {
        let d = tempfile::tempdir().unwrap();
        // A counter from a build with 16-bit incarnations, near the end of the 12-bit space.
        std::fs::write(
            d.path().join("incarnation"),
            format!("{}\n", 3 * 4096 + 4094),
        )
        .unwrap();
        let (mut inc, note) = Incarnations::open(d.path());
        assert!(note.is_none());
        let taken: Vec<u16> = (0..3).map(|_| inc.take().0).collect();
        assert_eq!(taken, [4094, 4095, 0]);
    }

    #[test]
    fn a_damaged_counter_is_said_and_replaced_by_the_clock() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("incarnation"), "garbage").unwrap();
        let (mut inc, note) = Incarnations::open(d.path());
        assert!(note.unwrap().contains("does not hold a number"));
        let (n, _) = inc.take();
        let saved: u16 = std::fs::read_to_string(d.path().join("incarnation"))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        assert_eq!(saved, step(n, BLOCK));
    }

    #[test]
    fn an_unwritable_state_dir_warns_once_and_still_counts() {
        let d = tempfile::tempdir().unwrap();
        let file = d.path().join("not-a-dir");
        std::fs::write(&file, "").unwrap();
        let (mut inc, _) = Incarnations::open(&file);
        let (a, w1) = inc.take();
        assert!(w1.unwrap().contains("cannot save"));
        for _ in 0..BLOCK {
            let (_, w) = inc.take();
            assert!(w.is_none(), "warned twice");
        }
        assert_ne!(inc.take().0, a);
    }
}

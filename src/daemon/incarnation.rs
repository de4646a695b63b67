//! Incarnation numbers for the workers the daemon starts: the high 16 bits of every connection
//! id a worker hands out (crates/relay/src/id.rs). Every start of every worker gets a number no
//! earlier start got, across worker restarts, reloads and restarts of the daemon itself, so a
//! client holding a dead connection's id can never reach a newcomer with it.
//!
//! The counter lives in `STATE_DIR/incarnation`. Numbers are reserved in blocks: the file is
//! rewritten (atomically) to the end of a block *before* the first number of that block is
//! handed out, so a daemon killed at any instant restarts past everything it handed out. The
//! rest of a block is skipped then; the space wraps after 65,536 numbers (at one block per
//! daemon start, after 1,024 daemon starts or 65,536 worker starts, whichever comes first).

use std::path::{Path, PathBuf};

use tuning::host::files;

/// Numbers reserved per write of the counter file.
const BLOCK: u16 = 64;

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
                Ok(n) => (n, None),
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
            let end = self.next.wrapping_add(BLOCK);
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
        self.next = self.next.wrapping_add(1);
        self.left -= 1;
        (n, warning)
    }
}

fn clock() -> u16 {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    (secs % (1 << 16)) as u16
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
        assert!(
            seen.iter()
                .all(|&n| (1..1000).contains(&saved.wrapping_sub(n)))
        );
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
        assert_eq!(saved, n.wrapping_add(BLOCK));
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

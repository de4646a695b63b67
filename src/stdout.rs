//! Command output on stdout that survives its reader going away.
//!
//! `println!` panics when stdout is a closed pipe (`tunegate status --format json | head`
//! printed a Rust panic). A command's output reports what it did; it is not the doing. So when
//! the reader is gone, the rest of the output is dropped and the command still finishes its
//! work — an apply that has begun must reach its read-backs and its journal — and exits with
//! its own code. Rust ignores SIGPIPE, so a closed pipe shows up here as EPIPE.

use std::io::{ErrorKind, Write};
use std::sync::atomic::{AtomicBool, Ordering};

/// Set once a write failed: later output is dropped instead of failing again.
static DROPPING: AtomicBool = AtomicBool::new(false);

/// Writes `text` to stdout and flushes it. A reader that went away (EPIPE) is silent; any
/// other failure (a full disk under a redirect) is said once on stderr.
pub fn write(text: &str) {
    if DROPPING.load(Ordering::Relaxed) {
        return;
    }
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        DROPPING.store(true, Ordering::Relaxed);
        if e.kind() != ErrorKind::BrokenPipe {
            eprintln!("tunegate: cannot write the output to stdout ({e}); the rest is dropped");
        }
    }
}

/// `print!` through [`write`].
#[macro_export]
macro_rules! out {
    ($($arg:tt)*) => { $crate::stdout::write(&format!($($arg)*)) };
}

/// `println!` through [`write`].
#[macro_export]
macro_rules! outln {
    () => { $crate::stdout::write("\n") };
    ($($arg:tt)*) => { $crate::stdout::write(&format!("{}\n", format_args!($($arg)*))) };
}

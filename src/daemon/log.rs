//! One line per event on stderr. When stderr is connected to the journal (systemd sets
//! JOURNAL_STREAM to its device and inode), each line starts with a syslog priority `<N>` so
//! `journalctl -p` filters work; otherwise lines are plain.

use std::io::Write;
use std::os::fd::AsFd;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Level {
    Err = 3,
    Warning = 4,
    Notice = 5,
    Info = 6,
}

pub struct Log {
    journal: bool,
}

impl Log {
    pub fn new() -> Log {
        Log {
            journal: stderr_is_journal(),
        }
    }

    pub fn line(&self, level: Level, message: &str) {
        let text = message.replace('\n', " ");
        let line = if self.journal {
            format!("<{}>{text}\n", level as u8)
        } else {
            format!("tunegate run: {text}\n")
        };
        let _ = std::io::stderr().lock().write_all(line.as_bytes());
    }

    pub fn err(&self, m: &str) {
        self.line(Level::Err, m)
    }
    pub fn warn(&self, m: &str) {
        self.line(Level::Warning, m)
    }
    pub fn notice(&self, m: &str) {
        self.line(Level::Notice, m)
    }
    pub fn info(&self, m: &str) {
        self.line(Level::Info, m)
    }
}

impl Default for Log {
    fn default() -> Log {
        Log::new()
    }
}

fn stderr_is_journal() -> bool {
    let Ok(want) = std::env::var("JOURNAL_STREAM") else {
        return false;
    };
    let Ok(st) = nix::sys::stat::fstat(std::io::stderr().as_fd()) else {
        return false;
    };
    want == format!("{}:{}", st.st_dev, st.st_ino)
}

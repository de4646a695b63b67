//! Sysctl key names: parsing, validation and the two spellings.
//!
//! A key is kept as its path segments under `/proc/sys`, which is the only unambiguous form.
//! Users write keys the way sysctl.d(5) and sysctl(8) accept them:
//!
//! * dotted: `net.core.somaxconn`; a `/` inside a dotted key stands for a literal dot, so
//!   `net.ipv4.conf.eth0/100.forwarding` names the interface `eth0.100`;
//! * slashed: `net/ipv4/conf/eth0.100/forwarding`, where dots are literal.
//!
//! The form is chosen by the first separator, as sysctl.d does. Validation is purely lexical
//! (segments of `[A-Za-z0-9_-]` plus literal dots inside names, never `.` or `..`, never empty),
//! so a key can never climb out of `/proc/sys`; whether it exists is the host module's business.

use std::fmt;
use std::path::PathBuf;

/// Longest key we accept; real keys are far shorter, this only bounds hostile input.
const MAX_KEY_LEN: usize = 255;

/// A validated sysctl key.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SysctlKey {
    segments: Vec<String>,
}

impl SysctlKey {
    /// Parses a key in dotted or slashed form, refusing anything that is not a plain path
    /// below `/proc/sys`.
    pub fn parse(text: &str) -> Result<SysctlKey, String> {
        if text.is_empty() {
            return Err("empty sysctl key".into());
        }
        if text.len() > MAX_KEY_LEN {
            return Err(format!("sysctl key longer than {MAX_KEY_LEN} characters"));
        }
        if text.starts_with('/') {
            return Err(format!(
                "sysctl key {text:?} is an absolute path; write it relative to /proc/sys, e.g. net.core.somaxconn"
            ));
        }
        if text.contains("..") {
            return Err(format!(
                "sysctl key {text:?} contains \"..\": an empty segment, or a path that would leave /proc/sys"
            ));
        }
        let slashed = text.find(['.', '/']).map(|i| &text[i..i + 1]) == Some("/");
        let (separator, literal_dot) = if slashed { ('/', '.') } else { ('.', '/') };
        let mut segments = Vec::new();
        for raw in text.split(separator) {
            if raw.is_empty() {
                return Err(format!(
                    "sysctl key {text:?} has an empty segment (\"{separator}{separator}\" or a leading/trailing \"{separator}\")"
                ));
            }
            let segment: String = raw
                .chars()
                .map(|c| if c == literal_dot { '.' } else { c })
                .collect();
            if segment == "." || segment == ".." || segment.starts_with('.') {
                return Err(format!(
                    "sysctl key {text:?} has the segment {segment:?}, which would leave /proc/sys"
                ));
            }
            if let Some(bad) = segment
                .chars()
                .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.')))
            {
                return Err(format!(
                    "sysctl key {text:?} contains {bad:?}; segments may hold only A-Z a-z 0-9 _ -"
                ));
            }
            segments.push(segment);
        }
        if segments.len() < 2 {
            return Err(format!(
                "sysctl key {text:?} names a directory of /proc/sys, not a setting (e.g. net.core.somaxconn)"
            ));
        }
        Ok(SysctlKey { segments })
    }

    /// The path relative to `/proc/sys`, e.g. `net/core/somaxconn`.
    pub fn relative_path(&self) -> PathBuf {
        self.segments.iter().collect()
    }

    /// The dotted spelling used in sysctl.d files and in every message we print.
    pub fn dotted(&self) -> String {
        self.segments
            .iter()
            .map(|s| s.replace('.', "/"))
            .collect::<Vec<_>>()
            .join(".")
    }
}

impl fmt::Display for SysctlKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(&self.dotted())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dotted_and_slashed_forms_name_the_same_key() {
        let a = SysctlKey::parse("net.core.somaxconn").unwrap();
        let b = SysctlKey::parse("net/core/somaxconn").unwrap();
        assert_eq!(a, b);
        assert_eq!(a.relative_path(), PathBuf::from("net/core/somaxconn"));
        assert_eq!(b.to_string(), "net.core.somaxconn");
    }

    #[test]
    fn interface_names_with_dots_survive_both_forms() {
        let dotted = SysctlKey::parse("net.ipv4.conf.eth0/100.forwarding").unwrap();
        let slashed = SysctlKey::parse("net/ipv4/conf/eth0.100/forwarding").unwrap();
        assert_eq!(dotted, slashed);
        assert_eq!(
            slashed.relative_path(),
            PathBuf::from("net/ipv4/conf/eth0.100/forwarding")
        );
        assert_eq!(slashed.dotted(), "net.ipv4.conf.eth0/100.forwarding");
    }

    #[test]
    fn traversal_and_junk_are_refused() {
        for bad in [
            "",
            "net..core",
            "../etc/passwd",
            "net/../../etc/shadow",
            "net/./core",
            "/proc/sys/net/core/somaxconn",
            "net.core.somaxconn.",
            "net.core.some key",
            "net.core.$x",
            "net.core.so\0max",
            "net",
            "net/.hidden/x",
        ] {
            assert!(SysctlKey::parse(bad).is_err(), "{bad:?} was accepted");
        }
        assert!(SysctlKey::parse(&"a.".repeat(200)).is_err());
    }

    #[test]
    fn dashes_and_underscores_are_fine() {
        let k = SysctlKey::parse("fs.file-max").unwrap();
        assert_eq!(k.relative_path(), PathBuf::from("fs/file-max"));
        SysctlKey::parse("net.ipv4.tcp_max_syn_backlog").unwrap();
    }
}

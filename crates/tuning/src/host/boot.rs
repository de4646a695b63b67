//! The sysctl configuration the next boot will apply, read the way systemd-sysctl reads it
//! (sysctl.d(5)), so preflight can tell a host that passes now from one that will still pass
//! after a reboot.
//!
//! - Directories, highest precedence first: /etc/sysctl.d, /run/sysctl.d,
//!   /usr/local/lib/sysctl.d, /usr/lib/sysctl.d, /lib/sysctl.d (the same directory twice, as
//!   /lib and /usr/lib on a merged-/usr system, counts once). Only `*.conf` files.
//! - A file name in an earlier directory masks the same name in every later one; a name linked
//!   to /dev/null (or empty) masks and sets nothing.
//! - The remaining files are applied in the lexical order of their names, whatever their
//!   directory; a later assignment of a key wins.
//! - `key = value`; `#` and `;` start comments; a leading `-` only says a failed write is not an
//!   error (the key is still set); either `.` or `/` separates the name (the first one decides,
//!   as in the man page); a glob (`net.ipv4.conf.*.rp_filter`) sets every key it matches that no
//!   explicit assignment sets, and `-PATTERN` alone excludes keys from the globs.
//! - /etc/sysctl.conf is not read by systemd-sysctl itself. Debian 12's procps links it in as
//!   /etc/sysctl.d/99-sysctl.conf, so there it counts through that link, like any other file;
//!   where no such link exists, settings in it are not applied at boot, which this module reports
//!   separately (`unread_sysctl_conf`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::tunables::SysctlKey;

/// The directories, highest precedence first, relative to the host root.
pub const DIRS: [&str; 5] = [
    "etc/sysctl.d",
    "run/sysctl.d",
    "usr/local/lib/sysctl.d",
    "usr/lib/sysctl.d",
    "lib/sysctl.d",
];

/// One `key = value` line (or a glob, or a glob exclusion) of a file the boot applies.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Assignment {
    /// The file as found in its directory (a link keeps its own name: 99-sysctl.conf).
    pub file: PathBuf,
    pub line: usize,
    /// The name in /proc/sys's path form (`net/core/somaxconn`), or a glob over that form.
    pub path: String,
    /// None for an exclusion (`-net.ipv4.conf.all.rp_filter` with no value): the keys it names
    /// or matches are left out of every glob assignment.
    pub value: Option<String>,
    pub glob: bool,
}

impl Assignment {
    /// `FILE:LINE`, with where a link points when the file is one (`/etc/sysctl.d/99-sysctl.conf
    /// -> /etc/sysctl.conf`).
    pub fn place(&self) -> String {
        match (std::fs::read_link(&self.file), self.file.canonicalize()) {
            (Ok(_), Ok(target)) => format!(
                "{}:{} (-> {})",
                self.file.display(),
                self.line,
                target.display()
            ),
            _ => format!("{}:{}", self.file.display(), self.line),
        }
    }
}

/// The boot's sysctl configuration.
#[derive(Clone, Debug, Default)]
pub struct BootConfig {
    /// Files applied, in order.
    pub files: Vec<PathBuf>,
    /// Their assignments, in the order applied.
    pub assignments: Vec<Assignment>,
    /// Assignments of /etc/sysctl.conf when no applied file is it: not applied at boot.
    pub unread_sysctl_conf: Vec<Assignment>,
}

impl BootConfig {
    /// Reads the configuration under `root`, with `etc` standing for root/etc/sysctl.d when
    /// given (the `--sysctl-dir` where tunegate's drop-in goes).
    pub fn read(root: &Path, etc: Option<&Path>) -> BootConfig {
        let mut dirs: Vec<PathBuf> = DIRS.iter().map(|d| root.join(d)).collect();
        if let Some(etc) = etc {
            dirs[0] = etc.to_path_buf();
        }
        let mut seen_dirs = Vec::new();
        let mut chosen: BTreeMap<String, PathBuf> = BTreeMap::new();
        for dir in dirs {
            let Ok(real) = dir.canonicalize() else {
                continue;
            };
            if seen_dirs.contains(&real) {
                continue;
            }
            seen_dirs.push(real);
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.ends_with(".conf") && !chosen.contains_key(&name) {
                    chosen.insert(name, e.path());
                }
            }
        }
        let mut config = BootConfig::default();
        let sysctl_conf = root.join("etc/sysctl.conf").canonicalize().ok();
        let mut read_sysctl_conf = false;
        for file in chosen.into_values() {
            let real = file.canonicalize().ok();
            if real.as_deref() == Some(Path::new("/dev/null")) {
                continue; // masked
            }
            read_sysctl_conf |= real.is_some() && real == sysctl_conf;
            config.assignments.extend(parse_file(&file));
            config.files.push(file);
        }
        if !read_sysctl_conf && let Some(conf) = &sysctl_conf {
            config.unread_sysctl_conf = parse_file(conf);
        }
        config
    }

    /// The assignment the boot ends with for `key`: the last explicit one; else the last glob
    /// that matches it and that no exclusion removes.
    pub fn effective(&self, key: &SysctlKey) -> Option<&Assignment> {
        let path = path_of(key);
        if let Some(a) = self
            .assignments
            .iter()
            .rev()
            .find(|a| !a.glob && a.path == path && a.value.is_some())
        {
            return Some(a);
        }
        let excluded = self
            .assignments
            .iter()
            .any(|a| a.value.is_none() && glob_match(&a.path, &path));
        if excluded {
            return None;
        }
        self.assignments
            .iter()
            .rev()
            .find(|a| a.glob && a.value.is_some() && glob_match(&a.path, &path))
    }

    /// What /etc/sysctl.conf says about `key`, when the boot does not read that file.
    pub fn unread(&self, key: &SysctlKey) -> Option<&Assignment> {
        let path = path_of(key);
        self.unread_sysctl_conf
            .iter()
            .rev()
            .find(|a| !a.glob && a.path == path && a.value.is_some())
    }
}

fn path_of(key: &SysctlKey) -> String {
    key.relative_path().to_string_lossy().into_owned()
}

/// One file's assignments; lines that are not assignments are skipped, as systemd-sysctl does
/// (it logs them and goes on).
fn parse_file(file: &Path) -> Vec<Assignment> {
    let Ok(text) = std::fs::read_to_string(file) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        let (name, value) = match line.split_once('=') {
            Some((k, v)) => (k.trim(), Some(v.trim().to_string())),
            None if line.starts_with('-') => (line, None),
            None => continue,
        };
        let name = name.strip_prefix('-').unwrap_or(name).trim();
        if name.is_empty() {
            continue;
        }
        let glob = name.contains(['*', '?', '[']);
        out.push(Assignment {
            file: file.to_path_buf(),
            line: i + 1,
            path: normalise(name),
            value,
            glob,
        });
    }
    out
}

/// sysctl.d's name rule: if the first separator is a slash, the name is already a path; if it
/// is a dot, dots and slashes swap (`net.ipv4.conf.eth0/100.forwarding` ->
/// `net/ipv4/conf/eth0.100/forwarding`).
fn normalise(name: &str) -> String {
    match name.find(['.', '/']) {
        Some(i) if name.as_bytes()[i] == b'.' => name
            .chars()
            .map(|c| match c {
                '.' => '/',
                '/' => '.',
                c => c,
            })
            .collect(),
        _ => name.to_string(),
    }
}

/// fnmatch(3) with no flags, over `*`, `?` and `[...]` classes: `*` also crosses `/`.
fn glob_match(pattern: &str, text: &str) -> bool {
    let (p, t): (Vec<char>, Vec<char>) = (pattern.chars().collect(), text.chars().collect());
    let (mut pi, mut ti) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        let step = match p.get(pi) {
            Some('*') => {
                star = Some((pi, ti));
                pi += 1;
                continue;
            }
            Some('?') => Some(1),
            Some('[') => class(&p[pi..], t[ti]),
            Some(c) if *c == t[ti] => Some(1),
            _ => None,
        };
        match step {
            Some(len) => {
                pi += if p.get(pi) == Some(&'[') { len } else { 1 };
                ti += 1;
            }
            None => match star {
                Some((sp, st)) => {
                    pi = sp + 1;
                    ti = st + 1;
                    star = Some((sp, st + 1));
                }
                None => return false,
            },
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

/// `[...]` at the start of `p` against `c`: Some(length of the class) when it matches.
fn class(p: &[char], c: char) -> Option<usize> {
    let end = p.iter().skip(1).position(|x| *x == ']')? + 1;
    let body = &p[1..end];
    let (negate, body) = match body.first() {
        Some('!' | '^') => (true, &body[1..]),
        _ => (false, body),
    };
    let mut hit = false;
    let mut i = 0;
    while i < body.len() {
        if i + 2 < body.len() && body[i + 1] == '-' {
            hit |= body[i] <= c && c <= body[i + 2];
            i += 3;
        } else {
            hit |= body[i] == c;
            i += 1;
        }
    }
    (hit != negate).then_some(end + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(k: &str) -> SysctlKey {
        SysctlKey::parse(k).unwrap()
    }

    fn write(root: &Path, rel: &str, text: &str) {
        let p = root.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    }

    fn at(c: &BootConfig, k: &str) -> Option<(String, usize, String)> {
        c.effective(&key(k)).map(|a| {
            let name = a.file.file_name().unwrap().to_string_lossy().into_owned();
            (name, a.line, a.value.clone().unwrap())
        })
    }

    #[test]
    fn later_names_win_and_earlier_directories_mask() {
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        write(
            r,
            "usr/lib/sysctl.d/50-default.conf",
            "net.core.somaxconn = 1024\n",
        );
        write(
            r,
            "etc/sysctl.d/60-tunegate.conf",
            "# ours\nnet.core.somaxconn = 65535\n",
        );
        let c = BootConfig::read(r, None);
        assert_eq!(
            at(&c, "net.core.somaxconn"),
            Some(("60-tunegate.conf".into(), 2, "65535".into()))
        );
        // A later name lowers it.
        write(
            r,
            "etc/sysctl.d/99-local.conf",
            "; mine\n-net/core/somaxconn=4096\n",
        );
        let c = BootConfig::read(r, None);
        assert_eq!(
            at(&c, "net.core.somaxconn"),
            Some(("99-local.conf".into(), 2, "4096".into()))
        );
        // The same name in /etc masks /usr/lib's; /run's masks /usr/lib's, not /etc's.
        write(
            r,
            "usr/lib/sysctl.d/99-local.conf",
            "net.core.somaxconn = 7\n",
        );
        write(
            r,
            "run/sysctl.d/60-tunegate.conf",
            "net.core.somaxconn = 8\n",
        );
        let c = BootConfig::read(r, None);
        assert_eq!(at(&c, "net.core.somaxconn").unwrap().2, "4096");
        assert_eq!(c.files.len(), 3, "{:?}", c.files);
        // Linked to /dev/null: masked, sets nothing.
        std::fs::remove_file(r.join("etc/sysctl.d/99-local.conf")).unwrap();
        std::os::unix::fs::symlink("/dev/null", r.join("etc/sysctl.d/99-local.conf")).unwrap();
        let c = BootConfig::read(r, None);
        assert_eq!(at(&c, "net.core.somaxconn").unwrap().2, "65535");
        // --sysctl-dir stands for /etc/sysctl.d: its file masks /run's, and /usr/lib's
        // 99-local.conf, no longer masked by /etc's, comes last.
        write(
            r,
            "elsewhere/60-tunegate.conf",
            "net.core.somaxconn = 100000\n",
        );
        let c = BootConfig::read(r, Some(&r.join("elsewhere")));
        assert_eq!(at(&c, "net.core.somaxconn").unwrap().2, "7");
        let names: Vec<_> = c
            .files
            .iter()
            .map(|f| f.strip_prefix(r).unwrap().to_owned())
            .collect();
        assert_eq!(
            names,
            [
                Path::new("usr/lib/sysctl.d/50-default.conf"),
                Path::new("elsewhere/60-tunegate.conf"),
                Path::new("usr/lib/sysctl.d/99-local.conf")
            ]
        );
    }

    #[test]
    fn names_dots_slashes_globs_and_exclusions() {
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        write(
            r,
            "etc/sysctl.d/10-a.conf",
            "net.ipv4.conf.*.rp_filter = 2\n-net.ipv4.conf.all.rp_filter\n\
             net.ipv4.conf.eth0/100.forwarding = 1\nnet.ipv4.tcp_rmem = 4096\t87380   16777216\n\
             not an assignment\n",
        );
        write(
            r,
            "etc/sysctl.d/20-b.conf",
            "net.ipv4.conf.default.rp_filter = 1\nnet.ipv4.conf.lo.rp_fil[a-z]er = 0\n",
        );
        let c = BootConfig::read(r, None);
        assert_eq!(at(&c, "net.ipv4.conf.eth0.rp_filter").unwrap().2, "2");
        assert_eq!(
            at(&c, "net.ipv4.conf.lo.rp_filter").unwrap().2,
            "0",
            "the later glob"
        );
        assert_eq!(
            at(&c, "net.ipv4.conf.default.rp_filter").unwrap().2,
            "1",
            "explicit beats glob"
        );
        assert_eq!(
            at(&c, "net.ipv4.conf.all.rp_filter"),
            None,
            "excluded from the glob"
        );
        assert_eq!(
            c.effective(&SysctlKey::parse("net/ipv4/conf/eth0.100/forwarding").unwrap())
                .unwrap()
                .line,
            3
        );
        assert_eq!(
            at(&c, "net.ipv4.tcp_rmem").unwrap().2,
            "4096\t87380   16777216"
        );
        assert!(
            glob_match("net/*/x", "net/a/b/x"),
            "* crosses / as fnmatch without flags"
        );
        assert!(!glob_match("net/[!a]", "net/a"));
    }

    #[test]
    fn sysctl_conf_counts_only_through_a_link() {
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        write(r, "etc/sysctl.conf", "#\nnet.core.somaxconn = 65535\n");
        let c = BootConfig::read(r, None);
        assert_eq!(at(&c, "net.core.somaxconn"), None);
        assert_eq!(c.unread(&key("net.core.somaxconn")).unwrap().line, 2);
        // Debian 12's procps link.
        std::fs::create_dir_all(r.join("etc/sysctl.d")).unwrap();
        std::os::unix::fs::symlink("../sysctl.conf", r.join("etc/sysctl.d/99-sysctl.conf"))
            .unwrap();
        let c = BootConfig::read(r, None);
        let a = c.effective(&key("net.core.somaxconn")).unwrap();
        assert!(
            a.place().ends_with("99-sysctl.conf:2 (-> ")
                || a.place().contains("99-sysctl.conf:2 (-> "),
            "{}",
            a.place()
        );
        assert!(c.unread_sysctl_conf.is_empty());
    }
}

//! The only code that reads or writes the host: /proc/sys, the process's rlimits, its
//! capabilities, its network namespace, and the files tunegate owns (journal, sysctl.d drop-in).
//!
//! Every path goes through a root (`/` in production), so unit tests can point the whole module
//! at a fake tree. Syscalls about this process (getrlimit, setrlimit) always act on the real
//! process; tests for them run the real binary.
//!
//! We read and write /proc/sys with plain file I/O rather than the `sysctl` crate: that crate
//! hard-codes `/proc/sys` (no fake tree), turns every `.` into `/` (breaking `eth0.100`), and
//! its `set_value` re-reads without comparing. Read-back comparison happens in `apply`.

pub mod boot;
pub mod files;
pub mod process;
pub mod redis;
pub mod saturation;
pub mod systemd;

use std::fs::OpenOptions;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use anyhow::Context;

use crate::tunables::SysctlKey;

/// CAP_SYS_RESOURCE's bit in the capability sets (linux/capability.h).
const CAP_SYS_RESOURCE: u32 = 24;

/// Longest sysctl value we read; the biggest real ones (e.g. tcp_available_congestion_control)
/// are far shorter.
const MAX_VALUE_LEN: u64 = 64 * 1024;

/// The host as seen from this process, rooted at `root`.
#[derive(Clone, Debug)]
pub struct Host {
    root: PathBuf,
}

/// Whether a sysctl can be written from here, and if not, why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Access {
    Writable,
    ReadOnly(String),
}

impl Host {
    /// The real host.
    pub fn live() -> Host {
        Host { root: "/".into() }
    }

    /// A host rooted somewhere else (a fake tree in tests, `--host-root`).
    pub fn with_root(root: impl Into<PathBuf>) -> Host {
        Host { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn proc_sys(&self) -> PathBuf {
        self.root.join("proc/sys")
    }

    /// The file behind a key.
    pub fn sysctl_path(&self, key: &SysctlKey) -> PathBuf {
        self.proc_sys().join(key.relative_path())
    }

    /// The machine's memory (`MemTotal` of /proc/meminfo), in bytes; `None` where the tree
    /// has no meminfo.
    pub fn mem_total(&self) -> Option<u64> {
        let text = std::fs::read_to_string(self.root.join("proc/meminfo")).ok()?;
        let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
        let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kb * 1024)
    }

    /// Reads a sysctl as the kernel prints it; `Ok(None)` when this kernel (or this network
    /// namespace) has no such key. A path that resolves outside /proc/sys (a symlink planted in
    /// a fake tree) is refused.
    pub fn read_sysctl(&self, key: &SysctlKey) -> anyhow::Result<Option<String>> {
        let path = self.sysctl_path(key);
        let real = match path.canonicalize() {
            Ok(p) => p,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("cannot resolve {}", path.display())),
        };
        let base = self
            .proc_sys()
            .canonicalize()
            .with_context(|| format!("cannot resolve {}", self.proc_sys().display()))?;
        if !real.starts_with(&base) || !real.is_file() {
            anyhow::bail!(
                "{} resolves to {}, which is not a setting under {}",
                path.display(),
                real.display(),
                base.display()
            );
        }
        let mut text = String::new();
        std::fs::File::open(&real)
            .and_then(|f| f.take(MAX_VALUE_LEN).read_to_string(&mut text))
            .with_context(|| format!("cannot read {}", path.display()))?;
        Ok(Some(text))
    }

    /// Whether the key's file can be written by this process: the kernel answers through
    /// faccessat(AT_EACCESS), which knows about read-only mounts, about files the namespace
    /// made read-only (net.core.rmem_max inside a network namespace is mode 0444 even for
    /// root), and about capabilities: a non-root daemon holding CAP_NET_ADMIN may write net
    /// keys. Plain access(2) would check the real uid without capabilities and say no.
    pub fn sysctl_access(&self, key: &SysctlKey) -> Access {
        use nix::fcntl::{AT_FDCWD, AtFlags};
        use nix::unistd::{AccessFlags, faccessat};
        match faccessat(
            AT_FDCWD,
            &self.sysctl_path(key),
            AccessFlags::W_OK,
            AtFlags::AT_EACCESS,
        ) {
            Ok(()) => Access::Writable,
            Err(nix::errno::Errno::EROFS) => {
                Access::ReadOnly("/proc/sys is mounted read-only here (a container?)".into())
            }
            Err(nix::errno::Errno::EACCES | nix::errno::Errno::EPERM) => {
                Access::ReadOnly(if nix::unistd::geteuid().is_root() {
                    "read-only from this network namespace or container".into()
                } else {
                    "needs root (or CAP_NET_ADMIN for net.* keys)".into()
                })
            }
            Err(e) => Access::ReadOnly(format!("not writable: {e}")),
        }
    }

    /// Writes a value in one write(2), as the kernel wants it (a sysctl handler sees each write
    /// separately). Never creates a file: a key that does not exist is an error.
    pub fn write_sysctl(&self, key: &SysctlKey, value: &str) -> io::Result<()> {
        let mut f = OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(self.sysctl_path(key))?;
        let text = format!("{value}\n");
        let n = f.write(text.as_bytes())?;
        if n != text.len() {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                format!("short write: {n} of {} bytes", text.len()),
            ));
        }
        Ok(())
    }

    /// Whether this process sits in the host's initial network namespace, where host-global
    /// network keys live. The kernel registers those keys (net.core.netdev_max_backlog,
    /// net.ipv4.tcp_mem, ...) for the initial namespace only, so their presence is the signal;
    /// /proc/1/ns/net is often unreadable and in a container PID 1 shares our namespace anyway.
    pub fn in_initial_netns(&self) -> bool {
        self.proc_sys().join("net/core/netdev_max_backlog").exists()
    }

    /// This process's network namespace, e.g. `net:[4026531840]`, recorded in the journal so a
    /// revert is never applied to a different namespace than the apply was.
    pub fn netns_id(&self) -> Option<String> {
        std::fs::read_link(self.root.join("proc/self/ns/net"))
            .ok()
            .map(|p| p.to_string_lossy().into_owned())
    }

    /// Whether this process shares PID 1's network namespace: the system's own, the one a
    /// host's or container's services run in. A container's is created anew at each of its
    /// boots, under a new id, so a journal written there must still be this system's after a
    /// reboot (`Journal::belongs_to`). False when /proc/1/ns/net cannot be read.
    pub fn in_system_netns(&self) -> bool {
        let init = std::fs::read_link(self.root.join("proc/1/ns/net")).ok();
        init.is_some() && init.map(|p| p.to_string_lossy().into_owned()) == self.netns_id()
    }

    /// Whether this process holds CAP_SYS_RESOURCE, needed to raise a hard rlimit.
    pub fn has_cap_sys_resource(&self) -> anyhow::Result<bool> {
        let path = self.root.join("proc/self/status");
        let status = <procfs::process::Status as procfs::FromRead>::from_file(&path)
            .with_context(|| format!("cannot read capabilities from {}", path.display()))?;
        Ok(status.capeff & (1 << CAP_SYS_RESOURCE) != 0)
    }

    /// RLIMIT_NOFILE of this process: (soft, hard).
    pub fn nofile(&self) -> anyhow::Result<(u64, u64)> {
        rlimit::getrlimit(rlimit::Resource::NOFILE).context("getrlimit(RLIMIT_NOFILE)")
    }

    /// Sets RLIMIT_NOFILE of this process; inherited by every child it starts.
    pub fn set_nofile(&self, soft: u64, hard: u64) -> io::Result<()> {
        rlimit::setrlimit(rlimit::Resource::NOFILE, soft, hard)
    }
}

/// Bytes per memory page, the unit of tcp_mem.
pub fn page_size() -> u64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .map_or(4096, |v| v as u64)
}

/// Whether we run as root (decides the permission check on profile files).
pub fn running_as_root() -> bool {
    nix::unistd::geteuid().is_root()
}

#[cfg(test)]
pub mod fake {
    //! A fake /proc/sys tree for unit tests.
    use super::*;

    /// What a fresh network namespace on a stock kernel shows, minus the init-only keys.
    pub const NETNS_DEFAULTS: &[(&str, &str)] = &[
        ("net/core/somaxconn", "4096\n"),
        ("net/ipv4/ip_local_port_range", "32768\t60999\n"),
        ("net/ipv4/ip_local_reserved_ports", "\n"),
        ("net/ipv4/tcp_rmem", "4096\t131072\t6291456\n"),
        ("net/ipv4/tcp_wmem", "4096\t16384\t4194304\n"),
        ("net/ipv4/ip_unprivileged_port_start", "1024\n"),
        ("fs/nr_open", "1048576\n"),
        ("fs/file-max", "2000000\n"),
    ];

    /// `NETNS_DEFAULTS` with `extra` added (or overriding).
    pub fn netns_tree(extra: &[(&str, &str)]) -> (tempfile::TempDir, Host) {
        let mut files: Vec<(&str, &str)> = NETNS_DEFAULTS
            .iter()
            .filter(|(k, _)| !extra.iter().any(|(e, _)| e == k))
            .copied()
            .collect();
        files.extend_from_slice(extra);
        tree(&files)
    }

    /// Builds a tree under a temp dir with the given `relative path -> content` files, plus
    /// this process's real /proc/self/status so capability reads work.
    pub fn tree(files: &[(&str, &str)]) -> (tempfile::TempDir, Host) {
        let dir = tempfile::tempdir().unwrap();
        for (rel, content) in files {
            let p = dir.path().join("proc/sys").join(rel);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(&p, content).unwrap();
        }
        std::fs::create_dir_all(dir.path().join("proc/self")).unwrap();
        std::fs::copy("/proc/self/status", dir.path().join("proc/self/status")).unwrap();
        let host = Host::with_root(dir.path());
        (dir, host)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_writes_and_reports_missing_keys() {
        let (_d, host) = fake::tree(&[("net/core/somaxconn", "4096\n")]);
        let key = SysctlKey::parse("net.core.somaxconn").unwrap();
        assert_eq!(host.read_sysctl(&key).unwrap().as_deref(), Some("4096\n"));
        host.write_sysctl(&key, "128").unwrap();
        assert_eq!(host.read_sysctl(&key).unwrap().as_deref(), Some("128\n"));
        let missing = SysctlKey::parse("net.core.nope").unwrap();
        assert_eq!(host.read_sysctl(&missing).unwrap(), None);
        assert!(host.write_sysctl(&missing, "1").is_err());
        assert!(
            !host.sysctl_path(&missing).exists(),
            "a write must not create keys"
        );
    }

    #[test]
    fn symlinks_out_of_proc_sys_are_refused() {
        let (d, host) = fake::tree(&[("net/core/somaxconn", "1\n")]);
        std::fs::write(d.path().join("secret"), "x").unwrap();
        std::os::unix::fs::symlink(
            d.path().join("secret"),
            d.path().join("proc/sys/net/core/evil"),
        )
        .unwrap();
        let key = SysctlKey::parse("net.core.evil").unwrap();
        let e = host.read_sysctl(&key).unwrap_err().to_string();
        assert!(e.contains("not a setting"), "{e}");
    }

    #[test]
    fn initial_namespace_is_told_by_init_only_keys() {
        let (_d, host) = fake::tree(&[("net/core/netdev_max_backlog", "1000\n")]);
        assert!(host.in_initial_netns());
        let (_d, host) = fake::tree(&[("net/core/somaxconn", "1\n")]);
        assert!(!host.in_initial_netns());
    }

    #[test]
    fn this_machine_has_no_cap_sys_resource_or_we_know_it() {
        // Whatever the machine, reading our own capabilities must work.
        Host::live().has_cap_sys_resource().unwrap();
        let (soft, hard) = Host::live().nofile().unwrap();
        assert!(soft <= hard);
    }
}

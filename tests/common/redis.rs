//! Redis servers from Debian's package for the tests of the cross-host bus: a Redis 7 Cluster
//! of 3 masters and 3 replicas on loopback, or a plain server, started by
//! scripts/redis-cluster.sh and stopped when dropped; and `tunegate serve` hosts joined by it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::{bin, eventually, stderr};

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/redis-cluster.sh");

/// A cluster (or server) started by the script, stopped on drop.
pub struct Redis {
    dir: tempfile::TempDir,
    /// Where the servers run: nothing (this namespace), or `ip netns exec NS`.
    prefix: Vec<String>,
    /// The script's environment (TLS, password).
    env: Vec<(String, String)>,
}

impl Redis {
    /// `scripts/redis-cluster.sh ARGS[0] DIR ARGS[1..]`, which must succeed.
    pub fn run(args: &[&str]) -> Redis {
        Redis::run_in(&[], args)
    }

    /// The same, run through `prefix` (e.g. `ip netns exec NS`).
    pub fn run_in(prefix: &[&str], args: &[&str]) -> Redis {
        let redis = Redis {
            dir: tempfile::tempdir().unwrap(),
            prefix: prefix.iter().map(|s| s.to_string()).collect(),
            env: Vec::new(),
        };
        redis.script(args[0], &args[1..]);
        redis
    }

    /// A cluster on `port`.. that speaks only TLS (the files of `tls_files`) and requires
    /// `password`.
    pub fn secure_cluster(port: u16, tls: &Path, password: &str) -> Redis {
        let redis = Redis {
            dir: tempfile::tempdir().unwrap(),
            prefix: Vec::new(),
            env: vec![
                ("REDIS_TLS_DIR".into(), tls.display().to_string()),
                ("REDIS_PASSWORD".into(), password.into()),
            ],
        };
        redis.script("start", &[&port.to_string()]);
        redis
    }

    /// A cluster of 3 masters and 3 replicas on `port`..`port + 5`.
    pub fn cluster(port: u16) -> Redis {
        Redis::run(&["start", &port.to_string()])
    }

    fn command(&self) -> Command {
        let mut c = match self.prefix.split_first() {
            Some((first, rest)) => {
                let mut c = Command::new(first);
                c.args(rest).arg("bash");
                c
            }
            None => Command::new("bash"),
        };
        c.arg(SCRIPT).envs(self.env.iter().cloned());
        c
    }

    fn script(&self, cmd: &str, args: &[&str]) {
        let out = self
            .command()
            .arg(cmd)
            .arg(self.dir())
            .args(args)
            .output()
            .expect("bash");
        assert!(
            out.status.success(),
            "scripts/redis-cluster.sh {cmd} {args:?} (scripts/deps.sh installs redis-server): {}",
            stderr(&out)
        );
    }

    /// Stops every node and starts it again: the cluster keeps its shape, not its data.
    pub fn restart(&self) {
        self.script("restart", &[]);
    }

    /// Where the script keeps the nodes' files and pid files (`PORT.pid`).
    pub fn dir(&self) -> PathBuf {
        self.dir.path().join("r")
    }

    /// SIGKILLs every node (the whole cluster gone at once); `restart` brings it back.
    pub fn kill_all(&self) {
        for entry in std::fs::read_dir(self.dir()).unwrap().flatten() {
            let name = entry.file_name().to_string_lossy().to_string();
            if let Some(port) = name.strip_suffix(".pid") {
                let pid = self.pid(port.parse().unwrap());
                let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
                if comm.trim() == "redis-server" {
                    let pid = nix::unistd::Pid::from_raw(pid);
                    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
                }
            }
        }
    }

    pub fn pid(&self, port: u16) -> i32 {
        let path = self.dir().join(format!("{port}.pid"));
        std::fs::read_to_string(path)
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }
}

impl Drop for Redis {
    /// Stops the nodes by their pid files, from here rather than through the prefix: the
    /// namespace of `ip netns exec NS` may be gone already (a Netns dropped first), and signals
    /// reach the nodes from any namespace.
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(SCRIPT)
            .arg("stop")
            .arg(self.dir())
            .output();
    }
}

/// A CA and a certificate for 127.0.0.1 it signed (openssl, EC P-256, valid 2 days), for a TLS
/// cluster: ca.crt, redis.crt, redis.key.
pub fn tls_files() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let openssl = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir.path())
            .output()
            .expect("openssl");
        assert!(out.status.success(), "openssl {args:?}: {}", stderr(&out));
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let ca = [
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-days",
        "2",
        "-subj",
        "/CN=tunegate CA",
    ];
    openssl(&[&["req", "-x509"], &ec[..], &ca[..]].concat());
    let csr = [
        "-keyout",
        "redis.key",
        "-out",
        "redis.csr",
        "-subj",
        "/CN=127.0.0.1",
    ];
    openssl(&[&["req"], &ec[..], &csr[..]].concat());
    std::fs::write(
        dir.path().join("san.ext"),
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n",
    )
    .unwrap();
    openssl(&[
        "x509",
        "-req",
        "-in",
        "redis.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "redis.crt",
        "-days",
        "2",
        "-extfile",
        "san.ext",
    ]);
    dir
}

/// One worker process of a "host": `tunegate serve` on its own loopback address, joined to the
/// others through `--bus`; killed when dropped.
pub struct Host {
    child: Child,
    pub addr: SocketAddr,
    log: tempfile::NamedTempFile,
}

impl Host {
    /// Starts `serve --listen ADDR --threads 2 --bus BUS EXTRA...` and waits (10 s) until it
    /// listens.
    pub fn start(addr: &str, bus: &str, extra: &[&str]) -> Host {
        Host::start_with(addr, &[&["--bus", bus], extra].concat())
    }

    /// Starts `serve --listen ADDR --threads 2 ARGS...` (a host of its own when ARGS has no
    /// --bus) and waits (10 s) until it listens.
    pub fn start_with(addr: &str, args: &[&str]) -> Host {
        let log = tempfile::NamedTempFile::new().unwrap();
        let child = Command::new(bin())
            .args(["serve", "--listen", addr, "--threads", "2"])
            .args(args)
            .stdout(Stdio::null())
            .stderr(log.reopen().unwrap())
            .spawn()
            .unwrap();
        let host = Host {
            child,
            addr: addr.parse().unwrap(),
            log,
        };
        eventually(
            Duration::from_secs(10),
            || format!("{addr} to listen: {}", host.log()),
            || host.log().contains("listening on").then_some(()),
        );
        host
    }

    pub fn url(&self) -> String {
        format!("ws://{}/", self.addr)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log.path()).unwrap_or_default()
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

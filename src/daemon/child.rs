//! Starting and stopping the child: the bundled server (this binary re-executed as
//! `tunegate serve`) or the configured command. The child gets its own process group (so a
//! stop reaches everything it started), the daemon's raised RLIMIT_NOFILE by inheritance,
//! the configured user and group, and PR_SET_PDEATHSIG so it dies with the daemon even when
//! the daemon is SIGKILLed.

use std::path::Path;

use anyhow::Context;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

use super::config::Config;
use super::sizing::Sizing;

/// What worker `worker` of `sizing.workers` is told, incarnation aside (a reload compares
/// these to decide which workers to replace).
pub fn server_config(config: &Config, sizing: &Sizing, worker: usize) -> relay::Config {
    let several = sizing.workers > 1;
    relay::Config {
        listen: vec![config.listen],
        worker,
        incarnation: None,
        options: relay::Options {
            threads: Some(sizing.threads),
            workers: several.then_some(sizing.workers),
            bus_dir: several.then(|| config.bus_dir()),
            ..config.server.clone()
        },
    }
}

/// The argv worker `worker` runs, with its `incarnation` (a custom command is one child, run
/// as configured).
pub fn argv(
    config: &Config,
    exe: &Path,
    sizing: &Sizing,
    worker: usize,
    incarnation: Option<u16>,
) -> Vec<String> {
    if let Some(cmd) = &config.child.command {
        return cmd.clone();
    }
    let server = relay::Config {
        incarnation,
        ..server_config(config, sizing, worker)
    };
    let mut v = vec![exe.display().to_string(), "serve".into()];
    v.extend(server.to_args());
    v
}

/// Spawns the child. Must be called from the thread that lives as long as the daemon (the
/// runtime is single-threaded for this reason): PR_SET_PDEATHSIG fires when the *thread* that
/// forked exits, not the process.
pub fn spawn(config: &Config, argv: &[String]) -> anyhow::Result<tokio::process::Child> {
    let mut cmd = tokio::process::Command::new(&argv[0]);
    cmd.args(&argv[1..])
        .process_group(0)
        .kill_on_drop(false)
        .stdin(std::process::Stdio::null());
    if let Some(dir) = &config.child.cwd {
        cmd.current_dir(dir);
    }
    if let Some(group) = &config.child.group {
        let g = nix::unistd::Group::from_name(group)
            .with_context(|| format!("looking up group {group}"))?
            .with_context(|| format!("no group named {group}"))?;
        cmd.gid(g.gid.as_raw());
    }
    if let Some(user) = &config.child.user {
        let u = nix::unistd::User::from_name(user)
            .with_context(|| format!("looking up user {user}"))?
            .with_context(|| format!("no user named {user}"))?;
        if config.child.group.is_none() {
            cmd.gid(u.gid.as_raw());
        }
        // std drops supplementary groups (setgroups(0)) before setuid when it runs as root.
        cmd.uid(u.uid.as_raw());
    }
    let parent = nix::unistd::getpid();
    die_with_parent(&mut cmd, parent);
    cmd.spawn()
        .with_context(|| format!("cannot start {}", argv.join(" ")))
}

/// One of tunegate's two pieces of unsafe code (the other gives the allocator's free pages
/// back: crates/relay/src/heap.rs).
#[allow(unsafe_code)]
fn die_with_parent(cmd: &mut tokio::process::Command, parent: Pid) {
    // SAFETY: `pre_exec` runs the closure in the forked child before exec, where only
    // async-signal-safe operations are allowed. The closure only makes three system calls,
    // prctl(PR_CAP_AMBIENT_CLEAR_ALL), prctl(PR_SET_PDEATHSIG) and getppid(), and builds an
    // io::Error from a raw errno; none of them allocates, takes a lock or touches state shared
    // with other threads. The raw prctl takes plain integers and no pointers.
    unsafe {
        cmd.pre_exec(move || {
            // The daemon's ambient capabilities (CAP_NET_ADMIN, CAP_SYS_RESOURCE under the
            // unit) are not the server's: drop them so exec gives it none. Fails harmlessly
            // with EINVAL on kernels without ambient capabilities.
            nix::libc::prctl(
                nix::libc::PR_CAP_AMBIENT,
                nix::libc::PR_CAP_AMBIENT_CLEAR_ALL as nix::libc::c_ulong,
                0 as nix::libc::c_ulong,
                0 as nix::libc::c_ulong,
                0 as nix::libc::c_ulong,
            );
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL)
                .map_err(|e| std::io::Error::from_raw_os_error(e as i32))?;
            // The daemon may have died between fork and prctl; then nobody would kill us.
            if nix::unistd::getppid() != parent {
                return Err(std::io::Error::from_raw_os_error(
                    nix::errno::Errno::ESRCH as i32,
                ));
            }
            Ok(())
        });
    }
}

/// Sends `sig` to the child's whole process group.
pub fn signal_group(pid: u32, sig: Signal) {
    let _ = killpg(Pid::from_raw(pid as i32), sig);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The `server:` section reaches each worker's command line whole: every key is a
    /// `tunegate serve` flag (relay::Config's own round-trip test covers the parsing back).
    #[test]
    fn the_server_section_reaches_every_worker_with_its_number_and_incarnation() {
        let config = Config::parse(
            "t.yaml",
            "listen: 127.0.0.1:9000\nstatus_file: /run/x/status.json\nserver:\n  \
             ping_interval_ms: 1000\n  max_rooms: 2\n  allowed_origins: [https://a.example]\n",
        )
        .unwrap();
        let sizing = Sizing {
            workers: 3,
            threads: 1,
            ..Sizing::default()
        };
        let several = argv(
            &config,
            Path::new("/usr/bin/tunegate"),
            &sizing,
            2,
            Some(77),
        );
        assert_eq!(
            several.join(" "),
            "/usr/bin/tunegate serve --listen 127.0.0.1:9000 --worker 2 --incarnation 77 \
             --threads 1 --workers 3 --bus-dir /run/x/bus --ping-interval 1000 --max-rooms 2 \
             --allowed-origin https://a.example"
        );
        // One worker needs no bus; a reload compares the argv without the incarnation.
        let one = Sizing {
            workers: 1,
            threads: 2,
            ..Sizing::default()
        };
        assert_eq!(
            argv(&config, Path::new("t"), &one, 0, None)[2..].join(" "),
            "--listen 127.0.0.1:9000 --threads 2 --ping-interval 1000 --max-rooms 2 \
             --allowed-origin https://a.example"
        );
    }
}

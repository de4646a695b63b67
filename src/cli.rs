//! The command line, documented in one place: every flag's help text lives here, and the man
//! page and docs/cli.md follow from it.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use load::LoadArgs;

/// Output format chosen with `--format`: for people (a checklist) or machines (JSON).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Human,
    Json,
}

/// Check and tune a Linux host for very many connections.
///
/// Exit codes: 0 pass / done, 1 a check fails (or still fails after apply), 2 bad usage or bad
/// input (nothing changed), 3 a write failed during apply and was rolled back.
#[derive(Debug, Parser)]
#[command(name = "tunegate", version, about, long_about)]
pub struct Cli {
    /// Treat DIR as the root of the host: /proc/sys is read from DIR/proc/sys. For tests and
    /// for inspecting a fake tree; process limits are always this process's own.
    #[arg(
        long,
        global = true,
        value_name = "DIR",
        env = "TUNEGATE_HOST_ROOT",
        hide = true
    )]
    pub host_root: Option<PathBuf>,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Compare the host with a profile and print a checklist. Changes nothing.
    #[command(after_long_help = PREFLIGHT_MORE)]
    Preflight(CheckArgs),
    /// Raise what the profile asks for (never lowering anything), journaled and verified.
    #[command(after_long_help = APPLY_MORE)]
    Apply(ApplyArgs),
    /// Restore the values the journal recorded before tunegate changed them.
    #[command(after_long_help = REVERT_MORE)]
    Revert(RevertArgs),
    /// List or show profiles.
    #[command(subcommand)]
    Profile(ProfileCommand),
    /// Run the bundled WebSocket relay (rooms, direct messages, heartbeats) in the foreground.
    Serve(relay::Config),
    /// The service: apply the profile, gate on preflight, then start and supervise the server
    /// (or the configured command). What systemd/tunegate.service runs.
    #[command(after_long_help = RUN_MORE)]
    Run(RunArgs),
    /// Open many WebSocket connections to a server, join rooms, publish, and measure: connect
    /// rate and errors, delivery latency (p50/p99/p99.9/max), completeness, disconnects.
    /// A later value of a flag overrides an earlier one (so the command line's win over a
    /// --scenario file's, which go first).
    #[command(args_override_self = true)]
    Load(LoadArgs),
    /// Show the running daemon's state: profile, verdicts, child, restarts, drifts.
    #[command(after_long_help = STATUS_MORE)]
    Status(StatusArgs),
    /// Mint a signed token (JWT) for `serve --auth-secret-file` or `--auth-public-key`: for
    /// operators and tests; applications mint their own with any JWT library.
    #[command(after_long_help = TOKEN_MORE)]
    Token(TokenArgs),
}

const TOKEN_MORE: &str = "\
Prints the token on stdout. Clients pass it as ?token=TOKEN on the upgrade URL or as
`Authorization: Bearer TOKEN`; a connection whose token expires is closed with 4001 unless it
sent {\"op\": \"refresh\", \"token\": NEW} first.

Examples:
  tunegate token --secret-file /etc/tunegate/token.secret --sub alice --rooms call-42 --ttl 1h
  tunegate token --private-key issuer.pem --sub bot --rooms 'team-7/*' --publish team-7/news --send

See also: tunegate-serve(1); docs/security.md.";

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("key").required(true).args(["secret_file", "private_key"])))]
pub struct TokenArgs {
    /// Sign with HS256 and the secret in this file (the file `serve --auth-secret-file` reads).
    #[arg(long, value_name = "FILE")]
    pub secret_file: Option<std::path::PathBuf>,
    /// Sign with this PEM private key: Ed25519 (EdDSA) or RSA (RS256).
    #[arg(long, value_name = "FILE")]
    pub private_key: Option<std::path::PathBuf>,
    /// The user (claim `sub`): shown in the server's logs and to receivers of their messages.
    #[arg(long, value_name = "USER")]
    pub sub: String,
    /// A room the token may join: a name, or a prefix ending in `*` (`team-7/*`; `*` alone is
    /// every room). Repeatable; none: no room.
    #[arg(long = "rooms", value_name = "PATTERN")]
    pub rooms: Vec<String>,
    /// A room the token may publish to (repeatable) [default: the rooms it may join].
    #[arg(long = "publish", value_name = "PATTERN")]
    pub publish: Vec<String>,
    /// The token may send direct messages.
    #[arg(long)]
    pub send: bool,
    /// How long the token is valid: a number with s, m, h or d (`90s`, `30m`, `1h`, `7d`).
    #[arg(long, value_name = "DURATION", default_value = "1h", value_parser = parse_duration)]
    pub ttl: u64,
    /// Not valid before this long from now (claim `nbf`), same units as --ttl.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
    pub not_before: Option<u64>,
}

/// `90s`, `30m`, `1h`, `7d` (or bare seconds) as seconds.
fn parse_duration(s: &str) -> Result<u64, String> {
    let (number, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (90s, 30m, 1h, 7d)"))?;
    let scale = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(format!("{s:?}: the unit must be s, m, h or d")),
    };
    n.checked_mul(scale)
        .ok_or_else(|| format!("{s:?} is too long"))
}

// What `--help` (and so the man pages) add after the options, for the commands an operator
// meets on a host. Kept short: the full story is in /usr/share/doc/tunegate (docs/ in the repo).

const PREFLIGHT_MORE: &str = "\
Exit status: 0 every check passes; 1 a check fails; 2 bad usage or a bad profile (its file,
line, column and key are named).

See also: tunegate-apply(1); docs/profiles.md for the keys and why each matters.";

const APPLY_MORE: &str = "\
Raise-only: a value the host already has above the profile is left alone. The previous values
are journaled (atomically, fsynced) before the first write; every write is read back, and if
one fails every value written in that run is put back. Per-network-namespace keys are written
from here; host-global keys (fs.*, net.core.rmem_max, tcp_mem, ...) only from the host's own
namespace, otherwise reported with the line to use there.

Files: /var/lib/tunegate/journal.json (the journal); /etc/sysctl.d/60-tunegate.conf (--persist:
systemd-sysctl applies it at boot; recent Debian does not read /etc/sysctl.conf).

Exit status: 0 the host passes after the change; 1 something still fails (a host-global key,
the hard RLIMIT_NOFILE without CAP_SYS_RESOURCE); 2 bad input, nothing changed; 3 a write
failed and the run was rolled back.

See also: tunegate-revert(1), tunegate-preflight(1).";

const REVERT_MORE: &str = "\
A key whose value someone changed after tunegate wrote it is left alone and reported (--force
restores it anyway). Keys that cannot be put back stay in the journal. The --persist drop-in
is removed: the one the journal names, and one in --sysctl-dir that carries tunegate's marker
line (an apply killed before it journaled it). Temp files killed runs left are removed.

Exit status: 0 done (or nothing to do); 1 something could not be restored (still journaled);
2 the journal belongs to another network namespace.";

const RUN_MORE: &str = "\
Signals: SIGHUP (systemctl reload) re-reads the configuration and the profile, re-applies, and
replaces the server only if its command line changed (one worker at a time); a bad new
configuration is refused and the running one kept. SIGTERM or SIGINT stops the server (its
clients get Close 1001) and exits 0.

Files: /etc/tunegate/tunegate.yaml (configuration; a missing default file means the defaults);
/var/lib/tunegate/journal.json (what apply changed); /run/tunegate/status.json (read by
tunegate status).

Exit status: 0 stopped by a signal, or the server exited 0; 1 gated in enforce mode, or the
server crashed too often; 2 bad configuration or profile.

See also: tunegate-status(1), tunegate-serve(1); /usr/share/doc/tunegate/daemon.md.";

const STATUS_MORE: &str = "\
Exit status: 0 the daemon runs; 1 it does not (no status file, or its pid is gone).";

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Configuration file (docs/daemon.md). Without this flag a missing
    /// /etc/tunegate/tunegate.yaml means the built-in defaults.
    #[arg(long, value_name = "PATH")]
    pub config: Option<std::path::PathBuf>,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// The status file the daemon writes (status_file in the configuration).
    #[arg(long, value_name = "PATH", env = "TUNEGATE_STATUS_FILE", default_value = crate::daemon::config::DEFAULT_STATUS_FILE)]
    pub status_file: std::path::PathBuf,
    /// Output for people or machines.
    #[arg(long, value_enum, default_value = "human")]
    pub format: Format,
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// A built-in profile name (default, c10k, c100k, c1m, proxy) or a path to a YAML profile.
    #[arg(long, short, default_value = "default", value_name = "NAME|PATH")]
    pub profile: String,

    /// Take the profile and the listen port from `tunegate run`'s configuration file instead,
    /// so the check is the one the service makes (e.g. /etc/tunegate/tunegate.yaml).
    #[arg(long, value_name = "PATH", conflicts_with = "profile")]
    pub config: Option<PathBuf>,

    /// Output for people (a checklist) or machines (JSON, see docs/json.md).
    #[arg(long, value_enum, default_value = "human")]
    pub format: Format,

    /// A port the server will listen on, checked by the port guard in addition to the
    /// profile's listen_ports. Repeatable.
    #[arg(long = "port", value_name = "PORT")]
    pub ports: Vec<u16>,

    /// Also check the Redis Cluster a cross-host bus would use
    /// (redis[s]://[USER@]HOST:PORT[,HOST:PORT...], its seed nodes): reachable, Redis 7.0 or
    /// later, cluster mode, every slot served (finding bus.redis).
    #[arg(long, value_name = "URL")]
    pub bus: Option<String>,

    /// With --bus: a file whose first line is the Redis password (AUTH).
    #[arg(long, value_name = "FILE", requires = "bus")]
    pub bus_password_file: Option<std::path::PathBuf>,

    /// With a rediss:// --bus: the CA certificates (PEM) to trust instead of the system's.
    #[arg(long, value_name = "FILE", requires = "bus")]
    pub bus_ca_file: Option<std::path::PathBuf>,

    /// Also check the user's own server, a systemd service: its RLIMIT_NOFILE (what its main
    /// process got, or what its next start is configured to get), descriptors in use, and the
    /// accept queue of each port it listens on (server.* findings). With apply: write
    /// LimitNOFILE= in a drop-in for it.
    #[arg(long, value_name = "NAME[.service]", conflicts_with = "pid")]
    pub unit: Option<String>,

    /// Also check a running process (and its children) the same way as --unit.
    #[arg(long, value_name = "PID")]
    pub pid: Option<i32>,

    /// The sysctl.d directory standing for /etc/sysctl.d: where apply --persist writes
    /// 60-tunegate.conf, and what is read as /etc/sysctl.d when checking what the next boot
    /// sets (the persist.* findings).
    #[arg(long, value_name = "DIR", env = "TUNEGATE_SYSCTL_DIR", default_value = tuning::apply::DEFAULT_SYSCTL_DIR)]
    pub sysctl_dir: PathBuf,
}

#[derive(Debug, Args)]
pub struct StateArgs {
    /// Where the journal lives.
    #[arg(long, value_name = "DIR", env = "TUNEGATE_STATE_DIR", default_value = tuning::apply::DEFAULT_STATE_DIR)]
    pub state_dir: PathBuf,
}

#[derive(Debug, Args)]
pub struct ApplyArgs {
    #[command(flatten)]
    pub check: CheckArgs,

    /// Print the plan (key, from, to) and change nothing.
    #[arg(long)]
    pub dry_run: bool,

    /// Also write every key of the profile this host can set (at the value that passes, never
    /// below the host's) to a sysctl.d drop-in, so the host still passes after a reboot.
    #[arg(long)]
    pub persist: bool,

    #[command(flatten)]
    pub state: StateArgs,
}

#[derive(Debug, Args)]
pub struct RevertArgs {
    #[command(flatten)]
    pub state: StateArgs,

    /// Where apply --persist wrote its drop-in: a 60-tunegate.conf there that carries
    /// tunegate's marker line is removed even if the journal does not name it.
    #[arg(long, value_name = "DIR", env = "TUNEGATE_SYSCTL_DIR", default_value = tuning::apply::DEFAULT_SYSCTL_DIR)]
    pub sysctl_dir: PathBuf,

    /// Restore even keys someone changed since tunegate wrote them, and even from another
    /// network namespace than the one the journal was written in.
    #[arg(long)]
    pub force: bool,

    /// Output for people or machines.
    #[arg(long, value_enum, default_value = "human")]
    pub format: Format,
}

#[derive(Debug, Subcommand)]
pub enum ProfileCommand {
    /// List the built-in profiles.
    List,
    /// Print a profile resolved (extends applied), each value with the file and line it came from.
    Show {
        /// A built-in profile name or a path.
        #[arg(value_name = "NAME|PATH")]
        name: String,
        /// YAML that loads back as the same profile, or JSON.
        #[arg(long, value_enum, default_value = "yaml")]
        format: ShowFormat,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ShowFormat {
    Yaml,
    Json,
}

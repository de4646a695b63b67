//! The daemon's configuration (docs/daemon.md): YAML, every field optional, defaults good enough
//! that `tunegate run` works with no file at all. Bad input names file, line and field (exit 2).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use tuning::error::ConfigError;

/// Where `tunegate run` looks when `--config` is not given; a missing file means defaults.
pub const DEFAULT_PATH: &str = "/etc/tunegate/tunegate.yaml";
/// Where the running daemon publishes its state for `tunegate status`.
pub const DEFAULT_STATUS_FILE: &str = "/run/tunegate/status.json";

/// How failing checks gate the child.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// `warn` when the child listens on loopback only, `enforce` otherwise (Elasticsearch's
    /// rule: development on loopback, production everywhere else).
    #[default]
    Auto,
    /// Refuse to start the child while any check fails.
    Enforce,
    /// Start it anyway and log each failing check.
    Warn,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum RestartPolicy {
    /// Restart when the child exits with a failure or is killed by a signal.
    #[default]
    OnFailure,
    /// Restart whatever the exit.
    Always,
    /// Never restart: the daemon ends when the child does.
    Never,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Built-in profile name or path.
    pub profile: String,
    pub mode: Mode,
    /// Where the child listens (the bundled server is told; a custom command must match it).
    pub listen: SocketAddr,
    pub child: Child,
    /// The bundled server's options (`relay::Options`: the same names as `tunegate serve`'s
    /// flags); ignored for a custom command. `workers` and `threads` fix the sizing.
    pub server: relay::Options,
    pub restart: Restart,
    /// After SIGTERM to the child, how long before SIGKILL.
    pub stop_grace_ms: u64,
    /// How long the child has to start listening before it counts as failed.
    pub ready_timeout_ms: u64,
    pub drift: Drift,
    /// The saturation watch (docs/daemon.md, "Saturation").
    pub saturation: super::saturation::Settings,
    /// Where the daemon serves its own Prometheus metrics (GET /metrics); none by default.
    pub metrics_listen: Option<SocketAddr>,
    /// Finding ids to ignore in the gate, named one by one (there is no "all").
    pub ignore: Vec<String>,
    pub state_dir: PathBuf,
    pub status_file: PathBuf,
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Child {
    /// The command to run instead of the bundled server, e.g. ["node", "server.js"].
    pub command: Option<Vec<String>>,
    pub user: Option<String>,
    pub group: Option<String>,
    /// Working directory for a custom command.
    pub cwd: Option<PathBuf>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Restart {
    pub policy: RestartPolicy,
    pub initial_backoff_ms: u64,
    pub max_backoff_ms: u64,
    /// This many crashes within `crash_window_s` end the daemon with a failure, so systemd
    /// marks the unit failed instead of restarting a broken child forever.
    pub max_crashes: u32,
    pub crash_window_s: u64,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Drift {
    /// Seconds between re-reads of the profile's keys; 0 turns drift checks off.
    pub interval_s: u64,
    /// Raise drifted keys back (raise-only, journaled) instead of only logging them.
    pub reapply: bool,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            profile: "default".into(),
            mode: Mode::Auto,
            listen: "127.0.0.1:8080".parse().expect("static address"),
            child: Child::default(),
            server: relay::Options::default(),
            restart: Restart::default(),
            stop_grace_ms: 10_000,
            ready_timeout_ms: 30_000,
            drift: Drift::default(),
            saturation: super::saturation::Settings::default(),
            metrics_listen: None,
            ignore: Vec::new(),
            // The environment can move the defaults (tests, packaging); a config file still wins.
            state_dir: std::env::var_os("TUNEGATE_STATE_DIR")
                .map_or_else(|| tuning::apply::DEFAULT_STATE_DIR.into(), PathBuf::from),
            status_file: std::env::var_os("TUNEGATE_STATUS_FILE")
                .map_or_else(|| DEFAULT_STATUS_FILE.into(), PathBuf::from),
        }
    }
}

impl Default for Restart {
    fn default() -> Restart {
        Restart {
            policy: RestartPolicy::OnFailure,
            initial_backoff_ms: 200,
            max_backoff_ms: 30_000,
            max_crashes: 5,
            crash_window_s: 60,
        }
    }
}

impl Default for Drift {
    fn default() -> Drift {
        Drift {
            interval_s: 60,
            reapply: true,
        }
    }
}

impl Config {
    /// Where the bundled server's workers meet.
    pub fn bus_dir(&self) -> PathBuf {
        self.server.bus_dir.clone().unwrap_or_else(|| {
            self.status_file
                .parent()
                .unwrap_or(Path::new("/run/tunegate"))
                .join("bus")
        })
    }

    /// The mode in force after `auto` is resolved.
    pub fn effective_mode(&self) -> Mode {
        match self.mode {
            Mode::Auto if self.listen.ip().is_loopback() => Mode::Warn,
            Mode::Auto => Mode::Enforce,
            m => m,
        }
    }

    /// Loads `path`; with `explicit == false` a missing file means defaults. Refuses files
    /// writable by group or others when `refuse_loose` (we run as root).
    pub fn load(path: &Path, explicit: bool, refuse_loose: bool) -> Result<Config, ConfigError> {
        let label = path.display().to_string();
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => {
                return Ok(Config::default());
            }
            Err(e) => return Err(ConfigError::new(&label, format!("cannot read: {e}"))),
        };
        if refuse_loose {
            use std::os::unix::fs::MetadataExt;
            let mode = std::fs::metadata(path).map(|m| m.mode()).unwrap_or(0);
            if mode & 0o022 != 0 {
                return Err(ConfigError::new(
                    &label,
                    format!(
                        "writable by group or others (mode {:04o}); fix: chmod go-w {label}",
                        mode & 0o7777
                    ),
                ));
            }
        }
        let config = Config::parse(&label, &text)?;
        // Certificates and token keys are files of their own: read now, so a missing or
        // loose one stops the start at the configuration's line rather than in a crash loop
        // of workers.
        if let Err(m) = config.server.certs() {
            let key = if m.contains("--tls-key") && !m.contains("--tls-cert") {
                "tls_key"
            } else {
                "tls_cert"
            };
            return Err(located(
                &label,
                &text,
                &["server", key],
                format!("server.{key}: {m}"),
            ));
        }
        if let Err(m) = relay::auth::Verifier::load(&config.server.key_files()) {
            let key = if config.server.auth_secret_file.is_some() && m.contains("secret") {
                "auth_secret_file"
            } else {
                "auth_public_key"
            };
            return Err(located(
                &label,
                &text,
                &["server", key],
                format!("server.{key}: {m}"),
            ));
        }
        Ok(config)
    }

    pub fn parse(label: &str, text: &str) -> Result<Config, ConfigError> {
        let meaningful = text
            .lines()
            .any(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'));
        let config: Config = if meaningful {
            serde_yaml::from_str(text).map_err(|e| ConfigError::from_yaml(label, &e))?
        } else {
            Config::default()
        };
        config.validate(label, text)?;
        Ok(config)
    }

    fn validate(&self, label: &str, text: &str) -> Result<(), ConfigError> {
        let at = |path: &[&str], message: String| located(label, text, path, message);
        for id in &self.ignore {
            if id == "all" || id == "*" || id.contains('*') {
                return Err(at(
                    &["ignore"],
                    format!(
                        "ignore: {id:?} — checks are ignored one by one by their id, never all at once"
                    ),
                ));
            }
        }
        if let Some(cmd) = &self.child.command
            && cmd.is_empty()
        {
            return Err(at(&["child", "command"], "child.command is empty".into()));
        }
        let sat = &self.saturation;
        if sat.warn_percent == 0 || sat.warn_percent > sat.error_percent || sat.error_percent > 100
        {
            return Err(at(
                &["saturation"],
                "saturation: need 0 < warn_percent <= error_percent <= 100".into(),
            ));
        }
        let r = &self.restart;
        if r.initial_backoff_ms == 0 || r.max_backoff_ms < r.initial_backoff_ms {
            return Err(at(
                &["restart"],
                "restart: need 0 < initial_backoff_ms <= max_backoff_ms".into(),
            ));
        }
        if r.max_crashes == 0 || r.crash_window_s == 0 {
            return Err(at(
                &["restart"],
                "restart: max_crashes and crash_window_s must be above 0".into(),
            ));
        }
        let max_workers = relay::MAX_WORKERS;
        if self
            .server
            .workers
            .is_some_and(|w| w == 0 || w > max_workers)
        {
            return Err(at(
                &["server", "workers"],
                format!(
                    "server.workers must be 1..={max_workers} (or absent: sized automatically)"
                ),
            ));
        }
        let max_threads = relay::id::MAX_LOOPS;
        if self
            .server
            .threads
            .is_some_and(|t| t == 0 || t > max_threads)
        {
            return Err(at(
                &["server", "threads"],
                format!("server.threads must be 1..={max_threads} (or absent: one per core)"),
            ));
        }
        if let Some(url) = &self.server.bus
            && let Err(m) = relay::redis_bus::url::parse(url)
        {
            return Err(at(&["server", "bus"], format!("server.bus: {m}")));
        }
        // The rest is the server's own rule book, the one `tunegate serve` applies to its flags.
        let sample = relay::Config {
            listen: vec![self.listen],
            worker: 0,
            incarnation: Some(0),
            options: relay::Options {
                bus_dir: Some(self.bus_dir()),
                ..self.server.clone()
            },
        };
        if let Err(m) = sample.validate() {
            return Err(at(&["server"], format!("server: {m}")));
        }
        Ok(())
    }
}

/// An error about the key at `path` of the configuration `text`, at its line when it is there.
fn located(label: &str, text: &str, path: &[&str], message: String) -> ConfigError {
    let e = ConfigError::new(label, message);
    match tuning::profile::locate_exact(text, path) {
        Some((l, c)) => e.at(l, c),
        None => e,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_file_means_defaults_and_auto_mode_follows_the_address() {
        let c = Config::load(Path::new("/nonexistent/tunegate.yaml"), false, true).unwrap();
        assert_eq!(c.profile, "default");
        assert_eq!(c.effective_mode(), Mode::Warn, "loopback is development");
        let c = Config::parse("t.yaml", "listen: 0.0.0.0:8080\n").unwrap();
        assert_eq!(c.effective_mode(), Mode::Enforce);
        let c = Config::parse("t.yaml", "listen: 0.0.0.0:8080\nmode: warn\n").unwrap();
        assert_eq!(c.effective_mode(), Mode::Warn);
        assert!(Config::load(Path::new("/nonexistent/x.yaml"), true, true).is_err());
    }

    #[test]
    fn a_loose_or_missing_token_secret_stops_the_start_at_its_line() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let secret = dir.path().join("token.secret");
        std::fs::write(&secret, "0123456789abcdef0123456789abcdef\n").unwrap();
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o644)).unwrap();
        let config = dir.path().join("tunegate.yaml");
        let text = format!(
            "profile: c10k\nserver:\n  max_rooms: 8\n  auth_secret_file: {}\n",
            secret.display()
        );
        std::fs::write(&config, text).unwrap();
        let e = Config::load(&config, true, false).unwrap_err();
        assert_eq!(e.line, Some(4), "{e}");
        assert!(
            e.message.contains("server.auth_secret_file") && e.message.contains("0644"),
            "{e}"
        );
        std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600)).unwrap();
        let c = Config::load(&config, true, false).unwrap();
        assert_eq!(c.server.auth_secret_file.as_deref(), Some(secret.as_path()));
        std::fs::remove_file(&secret).unwrap();
        let e = Config::load(&config, true, false).unwrap_err();
        assert!(e.message.contains("cannot read the token secret"), "{e}");
    }

    #[test]
    fn bad_config_names_line_and_field() {
        let e = Config::parse("t.yaml", "profile: c100k\nlisten: nowhere\n").unwrap_err();
        assert_eq!(e.line, Some(2), "{e}");
        let e = Config::parse("t.yaml", "child:\n  comand: [x]\n").unwrap_err();
        assert!(e.message.contains("unknown field `comand`"), "{e}");
        assert_eq!(e.line, Some(2));
        let e = Config::parse("t.yaml", "mode: strict\n").unwrap_err();
        assert!(e.message.contains("strict"), "{e}");
        let e = Config::parse("t.yaml", "profile: default\nignore: [all]\n").unwrap_err();
        assert_eq!(e.line, Some(2), "{e}");
        assert!(e.message.contains("one by one"), "{e}");
        let e = Config::parse(
            "t.yaml",
            "server:\n  ping_timeout_ms: 9\n  bus: http://h:1\n",
        )
        .unwrap_err();
        assert_eq!(e.line, Some(3), "{e}");
        assert!(
            e.message.contains("server.bus") && e.message.contains("expected redis://"),
            "{e}"
        );
        let e = Config::parse("t.yaml", "server:\n  workers: 0\n").unwrap_err();
        assert_eq!(e.line, Some(2), "{e}");
        assert!(e.message.contains("server.workers"), "{e}");
        let e = Config::parse("t.yaml", "restart:\n  max_crashes: 0\n").unwrap_err();
        assert!(e.message.contains("max_crashes"), "{e}");
    }
}

//! Profiles: what a host should look like to hold a number of connections.
//!
//! A profile is a YAML file (schema in docs/profiles.md) or one of the built-ins embedded from
//! profiles/. `extends` chains are resolved here, child over parent, so everything downstream
//! sees one flat `Profile` in which each setting remembers the file and line that asked for it.

mod locate;
mod parse;

use std::fmt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::error::ConfigError;
use crate::tunables::{SysctlKey, Value};

pub use locate::locate_exact;

/// Built-in profiles, embedded so the binary works with no files installed.
pub const BUILTINS: &[(&str, &str)] = &[
    ("default", include_str!("../../../../profiles/default.yaml")),
    ("c10k", include_str!("../../../../profiles/c10k.yaml")),
    ("c100k", include_str!("../../../../profiles/c100k.yaml")),
    ("c1m", include_str!("../../../../profiles/c1m.yaml")),
    ("proxy", include_str!("../../../../profiles/proxy.yaml")),
];

/// Where a profile came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Origin {
    Builtin(&'static str),
    File(PathBuf),
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Builtin(name) => write!(f, "built-in:{name}"),
            Origin::File(p) => write!(f, "{}", p.display()),
        }
    }
}

/// A file position a setting came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Source {
    pub origin: String,
    pub line: Option<usize>,
    pub column: Option<usize>,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.line, self.column) {
            (Some(l), Some(c)) => write!(f, "{}:{l}:{c}", self.origin),
            _ => f.write_str(&self.origin),
        }
    }
}

impl Source {
    /// A config error at this position.
    pub fn error(&self, message: impl Into<String>) -> ConfigError {
        ConfigError {
            file: self.origin.clone(),
            line: self.line,
            column: self.column,
            message: message.into(),
        }
    }
}

/// One wanted sysctl value.
#[derive(Clone, Debug)]
pub struct Setting {
    pub key: SysctlKey,
    pub value: Value,
    pub source: Source,
}

/// The `proxy:` section: the host proxies `target_connections` to `upstreams` endpoints,
/// connecting out from `source_addresses` addresses.
#[derive(Clone, Debug)]
pub struct Proxy {
    pub upstreams: u32,
    pub source_addresses: u32,
    pub source: Source,
}

/// A resolved profile: `extends` applied, child values over parent values.
#[derive(Clone, Debug)]
pub struct Profile {
    pub name: String,
    pub origin: Origin,
    /// This profile first, then what it extends, up to the root.
    pub chain: Vec<String>,
    pub description: Option<String>,
    pub target_connections: Option<u64>,
    /// The clients of `target_connections` run on this host too (a load test on one machine):
    /// the derived checks count both ends of every connection.
    pub clients_on_host: bool,
    pub listen_ports: Vec<u16>,
    pub proxy: Option<Proxy>,
    /// `boot_persistence: fail`: keys the next boot would lose fail preflight (default: warn).
    pub boot_persistence_fails: bool,
    pub nofile: Option<(u64, Source)>,
    /// In the order the chain wrote them: parent keys first, each overridden in place.
    pub sysctl: Vec<Setting>,
}

/// Loads a profile by built-in name or path. When `refuse_loose` is set (we run as root),
/// files writable by group or others are refused: root must not apply what anyone could edit.
pub fn load(spec: &str, refuse_loose: bool) -> Result<Profile, ConfigError> {
    let origin = resolve(spec, None).map_err(|m| ConfigError::new(spec, m))?;
    build(origin, &mut Vec::new(), refuse_loose)
}

/// The names of the built-in profiles.
pub fn builtin_names() -> impl Iterator<Item = &'static str> {
    BUILTINS.iter().map(|(n, _)| *n)
}

/// A built-in name or a path. Relative paths in `extends` are relative to the extending file;
/// built-ins can only extend built-ins.
fn resolve(spec: &str, from: Option<&Origin>) -> Result<Origin, String> {
    let looks_like_path = spec.contains('/') || spec.ends_with(".yaml") || spec.ends_with(".yml");
    if !looks_like_path && let Some((name, _)) = BUILTINS.iter().find(|(n, _)| *n == spec) {
        return Ok(Origin::Builtin(name));
    }
    let base = match from {
        Some(Origin::Builtin(_)) => {
            return Err(format!(
                "no built-in profile named {spec:?} (built-ins: {})",
                builtin_names().collect::<Vec<_>>().join(", ")
            ));
        }
        Some(Origin::File(p)) => p.parent().map(Path::to_path_buf).unwrap_or_default(),
        None => PathBuf::new(),
    };
    let path = base.join(spec);
    match path.canonicalize() {
        Ok(p) => Ok(Origin::File(p)),
        Err(e) if looks_like_path => Err(format!("cannot open profile {}: {e}", path.display())),
        Err(_) => Err(format!(
            "no built-in profile or file named {spec:?} (built-ins: {})",
            builtin_names().collect::<Vec<_>>().join(", ")
        )),
    }
}

fn read(origin: &Origin, refuse_loose: bool) -> Result<String, ConfigError> {
    match origin {
        Origin::Builtin(name) => Ok(BUILTINS
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, t)| t.to_string())
            .expect("resolve only returns known built-ins")),
        Origin::File(path) => {
            let label = path.display().to_string();
            let meta = std::fs::metadata(path)
                .map_err(|e| ConfigError::new(&label, format!("cannot read: {e}")))?;
            if !meta.is_file() {
                return Err(ConfigError::new(&label, "not a regular file"));
            }
            if refuse_loose && meta.mode() & 0o022 != 0 {
                return Err(ConfigError::new(
                    &label,
                    format!(
                        "profile is writable by group or others (mode {:04o}); running as root, \
                         tunegate will not apply settings anyone could have changed. \
                         Fix: chmod go-w {label}",
                        meta.mode() & 0o7777
                    ),
                ));
            }
            std::fs::read_to_string(path)
                .map_err(|e| ConfigError::new(&label, format!("cannot read: {e}")))
        }
    }
}

fn build(
    origin: Origin,
    stack: &mut Vec<Origin>,
    refuse_loose: bool,
) -> Result<Profile, ConfigError> {
    let text = read(&origin, refuse_loose)?;
    let label = origin.to_string();
    let raw = parse::parse(&label, &text)?;
    let here = |path: &[&str]| {
        let pos = locate_exact(&text, path);
        Source {
            origin: label.clone(),
            line: pos.map(|p| p.0),
            column: pos.map(|p| p.1),
        }
    };

    let mut profile = match &raw.extends {
        None => Profile {
            name: String::new(),
            origin: origin.clone(),
            chain: Vec::new(),
            description: None,
            target_connections: None,
            clients_on_host: false,
            listen_ports: Vec::new(),
            proxy: None,
            boot_persistence_fails: false,
            nofile: None,
            sysctl: Vec::new(),
        },
        Some(spec) => {
            let at = here(&["extends"]);
            let parent = resolve(spec, Some(&origin)).map_err(|m| at.error(m))?;
            stack.push(origin.clone());
            if let Some(i) = stack.iter().position(|o| *o == parent) {
                let mut cycle: Vec<String> = stack[i..].iter().map(|o| o.to_string()).collect();
                cycle.push(parent.to_string());
                return Err(at.error(format!("extends cycle: {}", cycle.join(" -> "))));
            }
            let p = build(parent, stack, refuse_loose)?;
            stack.pop();
            p
        }
    };

    profile.name = match &origin {
        Origin::Builtin(n) => n.to_string(),
        Origin::File(p) => p
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| label.clone()),
    };
    profile.chain.insert(0, profile.name.clone());
    profile.origin = origin;
    if raw.description.is_some() {
        profile.description = raw.description;
    }
    if raw.target_connections.is_some() {
        profile.target_connections = raw.target_connections;
    }
    if let Some(both) = raw.clients_on_host {
        profile.clients_on_host = both;
    }
    if let Some(ports) = raw.listen_ports {
        profile.listen_ports = ports;
    }
    if let Some(p) = raw.proxy {
        profile.proxy = Some(Proxy {
            upstreams: p.upstreams.get(),
            source_addresses: p.source_addresses.get(),
            source: here(&["proxy"]),
        });
    }
    if let Some(b) = raw.boot_persistence {
        profile.boot_persistence_fails = b == parse::BootPersistence::Fail;
    }
    if let Some(n) = raw.limits.nofile {
        profile.nofile = Some((n, here(&["limits", "nofile"])));
    }
    for (key, value) in raw.sysctl.0 {
        let pos = locate::locate(&text, &["sysctl", ""], &|depth, written| {
            depth == 0 && written == "sysctl"
                || depth == 1 && SysctlKey::parse(written).is_ok_and(|k| k == key)
        });
        let source = Source {
            origin: label.clone(),
            line: pos.map(|p| p.0),
            column: pos.map(|p| p.1),
        };
        match profile.sysctl.iter_mut().find(|s| s.key == key) {
            Some(s) => {
                s.value = value;
                s.source = source;
            }
            None => profile.sysctl.push(Setting { key, value, source }),
        }
    }
    Ok(profile)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        p
    }

    #[test]
    fn every_builtin_loads_and_c100k_has_the_articles_values() {
        for name in builtin_names() {
            load(name, true).unwrap_or_else(|e| panic!("{name}: {e}"));
        }
        let p = load("c100k", true).unwrap();
        let get = |k: &str| {
            p.sysctl
                .iter()
                .find(|s| s.key.dotted() == k)
                .map(|s| s.value.to_string())
        };
        assert_eq!(get("net.core.somaxconn").as_deref(), Some("65535"));
        assert_eq!(
            get("net.ipv4.ip_local_port_range").as_deref(),
            Some("1024 65535")
        );
        assert!(get("net.ipv4.tcp_rmem").is_some() && get("net.ipv4.tcp_wmem").is_some());
        assert_eq!(p.target_connections, Some(100_000));
        assert!(p.chain.len() >= 2, "c100k extends something: {:?}", p.chain);
    }

    #[test]
    fn child_overrides_parent_in_place_and_keeps_sources() {
        let dir = tempfile::tempdir().unwrap();
        write(
            dir.path(),
            "base.yaml",
            "target_connections: 10\nsysctl:\n  net.core.somaxconn: 1000\n  net.ipv4.tcp_max_syn_backlog: 2000\n",
        );
        let child = write(
            dir.path(),
            "child.yaml",
            "extends: base.yaml\nsysctl:\n  net/core/somaxconn: 5000\n",
        );
        let p = load(child.to_str().unwrap(), true).unwrap();
        assert_eq!(p.chain, ["child", "base"]);
        assert_eq!(p.target_connections, Some(10));
        assert_eq!(p.sysctl[0].key.dotted(), "net.core.somaxconn");
        assert_eq!(p.sysctl[0].value.to_string(), "5000");
        assert!(p.sysctl[0].source.to_string().ends_with("child.yaml:3:3"));
        assert!(p.sysctl[1].source.to_string().ends_with("base.yaml:4:3"));
    }

    #[test]
    fn extends_cycles_and_missing_targets_name_the_extends_line() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "a.yaml", "# a\nextends: b.yaml\n");
        write(dir.path(), "b.yaml", "extends: a.yaml\n");
        let e = load(dir.path().join("a.yaml").to_str().unwrap(), true).unwrap_err();
        assert!(e.message.contains("extends cycle"), "{e}");
        assert!(e.file.ends_with("b.yaml") && e.line == Some(1), "{e}");

        write(dir.path(), "self.yaml", "extends: self.yaml\n");
        let e = load(dir.path().join("self.yaml").to_str().unwrap(), true).unwrap_err();
        assert!(e.message.contains("extends cycle"), "{e}");

        let m = write(
            dir.path(),
            "m.yaml",
            "target_connections: 1\nextends: nowhere\n",
        );
        let e = load(m.to_str().unwrap(), true).unwrap_err();
        assert_eq!(e.line, Some(2), "{e}");
        assert!(e.message.contains("nowhere"), "{e}");
    }

    #[test]
    fn loose_permissions_are_refused_only_when_asked() {
        let dir = tempfile::tempdir().unwrap();
        let p = write(dir.path(), "p.yaml", "target_connections: 1\n");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o664)).unwrap();
        let e = load(p.to_str().unwrap(), true).unwrap_err();
        assert!(e.message.contains("writable by group or others"), "{e}");
        load(p.to_str().unwrap(), false).unwrap();
    }

    #[test]
    fn unknown_names_list_the_builtins() {
        let e = load("c5k", true).unwrap_err();
        assert!(e.message.contains("c100k"), "{e}");
    }
}

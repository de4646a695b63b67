//! One profile file's text -> `RawProfile`, with every error carrying line and column.
//!
//! serde_yaml attaches the position of the node being deserialised to any error raised while
//! deserialising it. So every check that can be made on one node is made *inside* that node's
//! deserialisation: key syntax in a key seed, value shape in a value seed that knows its key.
//! The error then points at the exact key or value, not at the start of the mapping.

use std::fmt;

use serde::Deserialize;
use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};

use crate::error::ConfigError;
use crate::tunables::{RawValue, SysctlKey, Value, shape_of};

/// A profile file as written, before `extends` is resolved.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawProfile {
    pub description: Option<String>,
    pub extends: Option<String>,
    pub target_connections: Option<u64>,
    /// The clients run on this host too (a load test): each connection is two sockets and
    /// two descriptors here.
    pub clients_on_host: Option<bool>,
    pub listen_ports: Option<Vec<u16>>,
    pub proxy: Option<RawProxy>,
    /// What a key the next boot would lose (persist.missing / persist.overridden) is: `warn`
    /// (the default) or `fail`.
    pub boot_persistence: Option<BootPersistence>,
    #[serde(default)]
    pub limits: RawLimits,
    #[serde(default)]
    pub sysctl: SysctlTable,
}

/// Process limits a profile asks for.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLimits {
    /// RLIMIT_NOFILE, soft and hard.
    pub nofile: Option<u64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BootPersistence {
    Warn,
    Fail,
}

/// A host that proxies its `target_connections` to upstreams (nginx in front of tunegate
/// hosts): one outgoing connection per client, to one of `upstreams`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawProxy {
    /// Upstream endpoints (address:port pairs) the connections are spread over.
    pub upstreams: std::num::NonZeroU32,
    /// Addresses the proxy connects out from (1 unless it uses several with proxy_bind).
    #[serde(default = "one")]
    pub source_addresses: std::num::NonZeroU32,
}

fn one() -> std::num::NonZeroU32 {
    std::num::NonZeroU32::MIN
}

/// The `sysctl:` mapping, in file order, every key and value already validated.
#[derive(Debug, Default)]
pub struct SysctlTable(pub Vec<(SysctlKey, Value)>);

/// Parses one profile's text. `file` is the name errors use.
pub fn parse(file: &str, text: &str) -> Result<RawProfile, ConfigError> {
    let meaningful = text
        .lines()
        .any(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#') && l.trim() != "---");
    if !meaningful {
        return Err(ConfigError::new(
            file,
            "profile is empty; it needs at least one of: extends, target_connections, limits, sysctl",
        ));
    }
    serde_yaml::from_str::<RawProfile>(text).map_err(|e| ConfigError::from_yaml(file, &e))
}

impl<'de> Deserialize<'de> for SysctlTable {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_map(TableVisitor)
    }
}

struct TableVisitor;

impl<'de> Visitor<'de> for TableVisitor {
    type Value = SysctlTable;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a mapping of sysctl keys to values")
    }

    fn visit_unit<E: de::Error>(self) -> Result<SysctlTable, E> {
        Ok(SysctlTable::default())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<SysctlTable, A::Error> {
        let mut entries: Vec<(SysctlKey, Value)> = Vec::new();
        while let Some(key) = map.next_key_seed(KeySeed { seen: &entries })? {
            let value = map.next_value_seed(ValueSeed { key: &key })?;
            entries.push((key, value));
        }
        Ok(SysctlTable(entries))
    }
}

/// Deserialises one sysctl key, refusing bad syntax and duplicates (also across spellings:
/// `net.core.somaxconn` and `net/core/somaxconn` are the same key).
struct KeySeed<'a> {
    seen: &'a [(SysctlKey, Value)],
}

impl<'de> DeserializeSeed<'de> for KeySeed<'_> {
    type Value = SysctlKey;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<SysctlKey, D::Error> {
        d.deserialize_str(self)
    }
}

impl Visitor<'_> for KeySeed<'_> {
    type Value = SysctlKey;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a sysctl key such as net.core.somaxconn")
    }

    fn visit_str<E: de::Error>(self, text: &str) -> Result<SysctlKey, E> {
        let key = SysctlKey::parse(text).map_err(E::custom)?;
        if self.seen.iter().any(|(k, _)| *k == key) {
            return Err(E::custom(format!("sysctl key {key} is given twice")));
        }
        Ok(key)
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<SysctlKey, E> {
        Err(E::custom(format!("{v} is not a sysctl key")))
    }
}

/// Deserialises one value and checks it against its key's shape right away, so the error
/// points at the value.
struct ValueSeed<'a> {
    key: &'a SysctlKey,
}

impl<'de> DeserializeSeed<'de> for ValueSeed<'_> {
    type Value = Value;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
        d.deserialize_any(ValueVisitor { key: self.key })
    }
}

/// Accepts an integer, a string, or a list of integers, and checks it against the key's shape
/// inside the visit call: only errors raised there carry the value's own position.
struct ValueVisitor<'a> {
    key: &'a SysctlKey,
}

impl ValueVisitor<'_> {
    fn finish<E: de::Error>(&self, raw: RawValue) -> Result<Value, E> {
        shape_of(self.key)
            .from_profile(&raw)
            .map_err(|m| E::custom(format!("{}: {m}", self.key)))
    }

    fn reject<E: de::Error>(&self, m: impl fmt::Display) -> Result<Value, E> {
        Err(E::custom(format!("{}: {m}", self.key)))
    }
}

impl<'de> Visitor<'de> for ValueVisitor<'_> {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a number, a string such as \"1024 65535\", or a list of numbers")
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Value, E> {
        self.finish(RawValue::Ints(vec![v as i128]))
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Value, E> {
        self.finish(RawValue::Ints(vec![v as i128]))
    }

    fn visit_u128<E: de::Error>(self, v: u128) -> Result<Value, E> {
        match i128::try_from(v) {
            Ok(v) => self.finish(RawValue::Ints(vec![v])),
            Err(_) => self.reject(format!("{v} is out of range")),
        }
    }

    fn visit_i128<E: de::Error>(self, v: i128) -> Result<Value, E> {
        self.finish(RawValue::Ints(vec![v]))
    }

    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Value, E> {
        self.reject(format!(
            "{v} is not a whole number (or is too large to be one)"
        ))
    }

    fn visit_bool<E: de::Error>(self, v: bool) -> Result<Value, E> {
        self.reject(format!("{v} is not a sysctl value; write 1 or 0 instead"))
    }

    fn visit_unit<E: de::Error>(self) -> Result<Value, E> {
        self.reject("value is missing")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Value, E> {
        self.finish(RawValue::Text(v.to_string()))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut out = Vec::new();
        while let Some(v) = seq.next_element::<i128>()? {
            out.push(v);
        }
        if out.is_empty() {
            return self.reject("empty list");
        }
        self.finish(RawValue::Ints(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> ConfigError {
        parse("p.yaml", text).unwrap_err()
    }

    #[test]
    fn a_full_profile_parses_in_file_order() {
        let p = parse(
            "p.yaml",
            "description: x\ntarget_connections: 100000\nlisten_ports: [8080]\nlimits:\n  nofile: 65536\nsysctl:\n  net.core.somaxconn: 65535\n  net/ipv4/ip_local_port_range: \"1024 65535\"\n  net.ipv4.tcp_rmem: [4096, 87380, 16777216]\n",
        )
        .unwrap();
        assert_eq!(p.limits.nofile, Some(65536));
        let keys: Vec<String> = p.sysctl.0.iter().map(|(k, _)| k.dotted()).collect();
        assert_eq!(
            keys,
            [
                "net.core.somaxconn",
                "net.ipv4.ip_local_port_range",
                "net.ipv4.tcp_rmem"
            ]
        );
    }

    #[test]
    fn errors_point_at_the_offending_node() {
        let e = err(
            "sysctl:\n  net.core.somaxconn: 65535\n  net.ipv4.ip_local_port_range: \"65535 1024\"\n",
        );
        assert_eq!((e.line, e.column), (Some(3), Some(33)), "{e}");
        assert!(e.message.contains("greater than its end"), "{e}");
        assert!(e.message.contains("net.ipv4.ip_local_port_range"), "{e}");

        let e = err("target_connections: 10\nsysctl:\n  ../../etc/passwd: 1\n");
        assert_eq!(e.line, Some(3), "{e}");
        assert!(e.message.contains("leave /proc/sys"), "{e}");

        let e = err("targte_connections: 10\n");
        assert_eq!(e.line, Some(1), "{e}");
        assert!(
            e.message.contains("unknown field `targte_connections`"),
            "{e}"
        );

        let e = err("limits:\n  nofile: 10\n  nproc: 5\n");
        assert_eq!(e.line, Some(3), "{e}");
        assert!(e.message.contains("unknown field `nproc`"), "{e}");
    }

    #[test]
    fn bad_values_are_named() {
        for (text, needle) in [
            (
                "sysctl:\n  net.core.somaxconn: lots\n",
                "not a whole number",
            ),
            (
                "sysctl:\n  net.core.somaxconn: 99999999999999999999999999999999999999999\n",
                "not a whole number",
            ),
            (
                "sysctl:\n  net.core.somaxconn: 4294967296\n",
                "out of range",
            ),
            ("sysctl:\n  net.core.somaxconn: -5\n", "out of range"),
            ("sysctl:\n  net.core.somaxconn: true\n", "write 1 or 0"),
            ("sysctl:\n  net.core.somaxconn:\n", "missing"),
            ("target_connections: -1\n", "invalid"),
            ("target_connections: 99999999999999999999999\n", "invalid"),
            ("listen_ports: [70000]\n", "invalid value"),
            (
                "sysctl:\n  net.core.somaxconn: 1\n  net/core/somaxconn: 2\n",
                "given twice",
            ),
            ("sysctl: [1, 2]\n", "invalid type"),
            ("sysctl:\n  net.ipv4.tcp_rmem: 4096\n", "expected 3 numbers"),
        ] {
            let e = err(text);
            assert!(e.line.is_some(), "{text:?} -> {e}");
            assert!(e.message.contains(needle), "{text:?} -> {e}");
        }
    }

    #[test]
    fn malformed_and_empty_files_are_refused() {
        let e = err("sysctl:\n  net.core.somaxconn: [1,\n");
        assert!(e.line.is_some(), "{e}");
        let e = err("");
        assert!(e.message.contains("empty"), "{e}");
        let e = err("# only a comment\n\n---\n");
        assert!(e.message.contains("empty"), "{e}");
    }
}

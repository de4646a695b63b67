//! What tunegate knows about tunables: key syntax, value shapes and compare rules, and the
//! catalogue of keys that decide how many connections a host can hold. Pure data and pure
//! functions: nothing here touches the host.

pub mod catalogue;
pub mod key;
pub mod value;

pub use catalogue::{CATALOGUE, NOFILE_WHY, Scope, Tunable, lookup};
pub use key::SysctlKey;
pub use value::{PortSet, RawValue, Shape, Value, normalise};

/// The shape of any key: the catalogue's, or exact text for keys we do not know.
pub fn shape_of(key: &SysctlKey) -> Shape {
    lookup(&key.dotted()).map_or(Shape::Text, |t| t.shape)
}

/// The scope of any key. For keys not in the catalogue: `net.*` keys the kernel shows inside a
/// network namespace are that namespace's own (init-only ones are hidden or read-only there,
/// which the host module sees); every other key has one copy for the whole kernel, so it is
/// treated as host-global and never written from inside a namespace.
pub fn scope_of(key: &SysctlKey) -> Scope {
    match lookup(&key.dotted()) {
        Some(t) => t.scope,
        None if key.dotted().starts_with("net.") => Scope::NetNamespace,
        None => Scope::HostGlobal,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_keys_get_a_conservative_scope() {
        let k = |s: &str| SysctlKey::parse(s).unwrap();
        assert_eq!(
            scope_of(&k("net.ipv4.tcp_fin_timeout")),
            Scope::NetNamespace
        );
        assert_eq!(scope_of(&k("vm.swappiness")), Scope::HostGlobal);
        assert_eq!(scope_of(&k("kernel.pid_max")), Scope::HostGlobal);
        assert_eq!(scope_of(&k("net.core.rmem_max")), Scope::HostGlobal);
        assert_eq!(shape_of(&k("vm.swappiness")), Shape::Text);
    }
}

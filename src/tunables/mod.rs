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

/// The scope of any key, `Unknown` for keys not in the catalogue.
pub fn scope_of(key: &SysctlKey) -> Scope {
    lookup(&key.dotted()).map_or(Scope::Unknown, |t| t.scope)
}

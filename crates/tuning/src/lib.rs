//! The tuning engine: what decides how many connections a Linux host can hold, checked and
//! raised from YAML profiles.
//!
//! Data flows one way: `profile` -> `preflight` (reads `host`) -> findings -> `apply` (plan,
//! journal, writes through `host`, read-back) -> `report`. Nothing upstream knows about anything
//! downstream, and nothing here knows the server, the load generator or the daemon exist: this
//! crate depends on none of them (ARCHITECTURE.md).

pub mod apply;
pub mod error;
pub mod host;
pub mod preflight;
pub mod profile;
pub mod report;
pub mod tunables;

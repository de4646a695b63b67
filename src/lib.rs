//! tunegate: check and tune a Linux host for very many connections.
//!
//! The tuning side flows one way: `profile` -> `preflight` (reads `host`) -> findings ->
//! `apply` (plan, journal, writes through `host`) -> `report`. The serving side (`server`) never
//! imports the tuning side, and the load generator (`load`) imports neither: it is a client
//! that speaks the protocol from the outside. See ARCHITECTURE.md.

#![deny(unsafe_code)]

pub mod apply;
pub mod cli;
pub mod commands;
pub mod daemon;
pub mod error;
pub mod host;
pub mod load;
pub mod preflight;
pub mod profile;
pub mod report;
pub mod server;
pub mod stdout;
pub mod tunables;

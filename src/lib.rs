//! tunegate: check and tune a Linux host for very many connections, and run a WebSocket relay
//! once it passes.
//!
//! This package is the command line and the daemon, the only code that joins the workspace's
//! crates: `tuning` (profile -> preflight -> apply -> report, reading and writing the host),
//! `relay` (the bundled server) and `load` (the load generator). Those three know nothing of
//! one another; the crate graph makes that a compiler error. See ARCHITECTURE.md.

pub mod cli;
pub mod commands;
pub mod daemon;
pub mod exit;
pub mod stdout;

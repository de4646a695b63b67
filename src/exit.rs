//! Exit codes, documented in docs/cli.md; scripts rely on them.

use tuning::error::{ConfigError, UsageError};

/// Everything passed / the command did what it was asked.
pub const OK: u8 = 0;
/// At least one check fails (preflight), or something is still failing after apply.
pub const FAIL: u8 = 1;
/// Bad usage or bad input (profile, key, value, flags); nothing was changed.
pub const USAGE: u8 = 2;
/// A write failed during apply or revert; what had been written was restored.
pub const ROLLED_BACK: u8 = 3;

/// The exit code an error deserves: 2 for bad input from any crate, 1 for everything else.
pub fn code_for(err: &anyhow::Error) -> u8 {
    if err.chain().any(|e| {
        e.is::<ConfigError>()
            || e.is::<UsageError>()
            || e.is::<load::BadArguments>()
            || e.is::<relay::BadUsage>()
    }) {
        USAGE
    } else {
        FAIL
    }
}

//! The errors that mean "bad input, nothing changed" (the command line maps them to exit code
//! 2). Everything else travels as `anyhow::Error` with context.

use std::fmt;

/// Bad input: a profile, key or value we refuse. Always names the file, and the line, column
/// and key where we know them. Raised before anything changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: String,
    pub line: Option<usize>,
    pub column: Option<usize>,
    pub message: String,
}

impl ConfigError {
    pub fn new(file: impl Into<String>, message: impl Into<String>) -> ConfigError {
        ConfigError {
            file: file.into(),
            line: None,
            column: None,
            message: message.into(),
        }
    }

    pub fn at(mut self, line: usize, column: usize) -> ConfigError {
        self.line = Some(line);
        self.column = Some(column);
        self
    }
}

impl ConfigError {
    /// A serde_yaml error as ours: its position moved into the `file:line:col` prefix.
    pub fn from_yaml(file: &str, e: &serde_yaml::Error) -> ConfigError {
        let mut message = e.to_string();
        if let Some(i) = message.rfind(" at line ") {
            message.truncate(i);
        }
        let err = ConfigError::new(file, message);
        match e.location() {
            Some(loc) => err.at(loc.line(), loc.column()),
            None => err,
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.line, self.column) {
            (Some(l), Some(c)) => write!(f, "{}:{l}:{c}: {}", self.file, self.message),
            (Some(l), None) => write!(f, "{}:{l}: {}", self.file, self.message),
            _ => write!(f, "{}: {}", self.file, self.message),
        }
    }
}

impl std::error::Error for ConfigError {}

/// A usage problem clap cannot see (a flag combination, a journal from another namespace).
#[derive(Debug)]
pub struct UsageError(pub String);

impl fmt::Display for UsageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsageError {}

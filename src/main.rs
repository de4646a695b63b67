//! The `tunegate` binary: parse the command line, run one command, exit with its code.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    // `load --scenario FILE` puts the file's options in first (they are parsed as flags).
    let argv = match load::scenario::expand(std::env::args_os().collect()) {
        Ok(argv) => argv,
        Err(e) => {
            eprintln!("tunegate: error: {e}");
            return ExitCode::from(2);
        }
    };
    let cli = tunegate::cli::Cli::parse_from(argv);
    match tunegate::commands::dispatch(cli) {
        Ok(code) => ExitCode::from(code),
        Err(err) => {
            eprintln!("tunegate: error: {err:#}");
            ExitCode::from(tunegate::exit::code_for(&err))
        }
    }
}

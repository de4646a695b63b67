//! The `tunegate` binary: parse the command line, run one command, exit with its code.

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = tunegate::cli::Cli::parse();
    match tunegate::commands::dispatch(cli) {
        Ok(code) => ExitCode::from(code),
        Err(err) => {
            eprintln!("tunegate: error: {err:#}");
            ExitCode::from(tunegate::exit::code_for(&err))
        }
    }
}

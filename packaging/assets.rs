//! Generates the man pages and shell completions the Debian package ships, from the clap
//! definitions in src/cli.rs (the one place the command line is documented):
//!
//!     cargo run --release --example assets -- OUT_DIR
//!
//! writes OUT_DIR/man/tunegate.1 and one tunegate-COMMAND.1 per subcommand, and
//! OUT_DIR/completions/{tunegate.bash,_tunegate,tunegate.fish}. packaging/build-deb.sh runs it.

use std::path::{Path, PathBuf};

use clap::CommandFactory;

fn main() -> std::io::Result<()> {
    let out = PathBuf::from(std::env::args_os().nth(1).expect("usage: assets OUT_DIR"));
    let cmd = tunegate::cli::Cli::command();
    let man = out.join("man");
    std::fs::create_dir_all(&man)?;
    write_man(&cmd, "tunegate", &man)?;
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        let name = format!("tunegate-{}", sub.get_name());
        write_man(sub, &name, &man)?;
        for subsub in sub.get_subcommands().filter(|s| !s.is_hide_set()) {
            write_man(subsub, &format!("{name}-{}", subsub.get_name()), &man)?;
        }
    }
    let completions = out.join("completions");
    std::fs::create_dir_all(&completions)?;
    for (shell, file) in [
        (clap_complete::Shell::Bash, "tunegate.bash"),
        (clap_complete::Shell::Zsh, "_tunegate"),
        (clap_complete::Shell::Fish, "tunegate.fish"),
    ] {
        let mut f = std::fs::File::create(completions.join(file))?;
        clap_complete::generate(
            shell,
            &mut tunegate::cli::Cli::command(),
            "tunegate",
            &mut f,
        );
    }
    Ok(())
}

fn write_man(cmd: &clap::Command, name: &str, dir: &Path) -> std::io::Result<()> {
    // clap keeps names as &'static str; this short-lived program can afford to leak them.
    let title: &'static str = Box::leak(name.to_string().into_boxed_str());
    let cmd = cmd.clone().name(title).bin_name(title.replace('-', " "));
    let mut page = Vec::new();
    clap_mangen::Man::new(cmd)
        .section("1")
        .manual("tunegate manual")
        .source(concat!("tunegate ", env!("CARGO_PKG_VERSION")))
        .render(&mut page)?;
    std::fs::write(dir.join(format!("{name}.1")), page)
}

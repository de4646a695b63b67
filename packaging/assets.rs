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
    // `tunegate help CMD` works, but has no page of its own: the pages do not list it.
    let cmd = cmd
        .clone()
        .name(title)
        .bin_name(title.replace('-', " "))
        .disable_help_subcommand(true);
    let man = clap_mangen::Man::new(cmd.clone())
        .section("1")
        .manual("tunegate manual")
        .source(concat!("tunegate ", env!("CARGO_PKG_VERSION")));
    let mut page = Vec::new();
    // clap_mangen's own render() puts the text after the options under one "EXTRA" heading; the
    // standard sections a reader looks for (EXIT STATUS, FILES, SEE ALSO) are made from it here.
    man.render_title(&mut page)?;
    man.render_name_section(&mut page)?;
    man.render_synopsis_section(&mut page)?;
    man.render_description_section(&mut page)?;
    if cmd.get_arguments().any(|a| !a.is_hide_set()) {
        man.render_options_section(&mut page)?;
    }
    if cmd.get_subcommands().any(|s| !s.is_hide_set()) {
        man.render_subcommands_section(&mut page)?;
    }
    if let Some(more) = cmd.get_after_long_help() {
        page.extend_from_slice(sections(&more.to_string()).as_bytes());
    }
    if cmd.get_version().is_some() {
        man.render_version_section(&mut page)?;
    }
    std::fs::write(dir.join(format!("{name}.1")), page)
}

/// Roff sections from a command's after-help text: each paragraph that starts with one of the
/// labels below becomes that section; any other paragraph goes under NOTES.
fn sections(text: &str) -> String {
    const LABELS: [(&str, &str); 4] = [
        ("Signals: ", "SIGNALS"),
        ("Files: ", "FILES"),
        ("Exit status: ", "EXIT STATUS"),
        ("See also: ", "SEE ALSO"),
    ];
    let mut roff = String::new();
    let mut current = "";
    for paragraph in text.split("\n\n").map(str::trim).filter(|p| !p.is_empty()) {
        let (heading, body) = LABELS
            .iter()
            .find_map(|(label, heading)| paragraph.strip_prefix(label).map(|b| (*heading, b)))
            .unwrap_or(("NOTES", paragraph));
        if heading != current {
            roff.push_str(&format!(".SH \"{heading}\"\n"));
            current = heading;
        } else {
            roff.push_str(".PP\n");
        }
        let line = body.split_whitespace().collect::<Vec<_>>().join(" ");
        // Roff: a backslash is an escape, a line starting with . or ' a request, and a bare -
        // may print as a typographic hyphen that breaks a copied command name or flag.
        let line = line.replace('\\', "\\e").replace('-', "\\-");
        if line.starts_with(['.', '\'']) {
            roff.push_str("\\&");
        }
        roff.push_str(&line);
        roff.push('\n');
    }
    roff
}

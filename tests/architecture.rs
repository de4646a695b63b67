//! ARCHITECTURE.md is the map a newcomer reads first, so it must stay true file for file: every
//! source file of every crate is named in its crate's section, and every `.rs` file a section
//! names exists. A file added, moved or removed without the map fails here.

use std::path::{Path, PathBuf};

/// (directory whose files a section covers, how its files are named there, section heading).
/// Root files are named from the repository root (`src/cli.rs`); crate files from their `src/`.
const SECTIONS: &[(&str, &str, &str)] = &[
    ("src", "", "## The crates"),
    ("src/daemon", "src/daemon", "## The daemon"),
    (
        "crates/tuning/src",
        "crates/tuning/src",
        "## The tuning side",
    ),
    (
        "crates/relay/src",
        "crates/relay/src",
        "## The serving side",
    ),
    (
        "crates/load/src",
        "crates/load/src",
        "## The load generator",
    ),
    ("tests", "", "## Tests"),
];

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Every `.rs` file under `dir`, as paths relative to `base` (the repository root for ""),
/// not descending into `skip`.
fn sources(dir: &Path, base: &Path, skip: Option<&Path>, out: &mut Vec<String>) {
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            if Some(path.as_path()) != skip {
                sources(&path, base, skip, out);
            }
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path.strip_prefix(base).unwrap().display().to_string());
        }
    }
}

/// The text of the section that starts with `heading`, up to the next `## `.
fn section<'a>(doc: &'a str, heading: &str) -> &'a str {
    let start = doc
        .find(&format!("\n{heading}"))
        .unwrap_or_else(|| panic!("ARCHITECTURE.md has no section {heading:?}"));
    let rest = &doc[start + 1..];
    let end = rest[3..].find("\n## ").map_or(rest.len(), |i| i + 3);
    &rest[..end]
}

/// Every `...rs` in backticks in `text`.
fn named_files(text: &str) -> Vec<String> {
    text.split('`')
        .skip(1)
        .step_by(2)
        .filter(|t| t.ends_with(".rs") && !t.contains(' '))
        .map(str::to_string)
        .collect()
}

#[test]
fn every_source_file_is_on_the_map_and_the_map_names_no_missing_file() {
    let root = root();
    let doc = std::fs::read_to_string(root.join("ARCHITECTURE.md")).unwrap();
    let mut problems = Vec::new();
    for &(dir, base, heading) in SECTIONS {
        let text = section(&doc, heading);
        let base = root.join(base);
        let skip = (dir == "src").then(|| root.join("src/daemon"));
        let mut files = Vec::new();
        sources(&root.join(dir), &base, skip.as_deref(), &mut files);
        for f in &files {
            if !text.contains(&format!("`{f}`")) {
                problems.push(format!("{heading}: no row for `{f}`"));
            }
        }
        for named in named_files(text) {
            if !base.join(&named).is_file() && !root.join(&named).is_file() {
                problems.push(format!("{heading}: names `{named}`, which does not exist"));
            }
        }
    }
    assert!(
        problems.is_empty(),
        "ARCHITECTURE.md is out of date:\n{}",
        problems.join("\n")
    );
}

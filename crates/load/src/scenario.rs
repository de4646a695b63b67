//! `--scenario FILE`: a run too long for a command line, as YAML. Every key is a `tunegate
//! load` option by its long name (`publish-rate` or `publish_rate`), and `url`; the file's
//! options go before the command line's, so a flag given on the command line wins (the `load`
//! command lets a later value override an earlier one), and repeatable ones (`header`,
//! `fail-if`) add up. A list for a single-value option is joined with commas (`stages`, a
//! `rooms` spread, several targets in `url`). Expanded before the command line is parsed, in
//! every load process alike (the shards re-read the same file).
//!
//! ```yaml
//! url: ws://10.0.0.5:8080/
//! stages: [30s:10000, 5m:10000, 30s:0]
//! rooms: 2:50,10:40,100:10
//! header: ["Origin: https://app.example"]
//! fail-if: [p99<50ms, lost==0]
//! ```

use std::ffi::OsString;
use std::path::Path;

use clap::{Args, Command};

use crate::args::LoadArgs;

/// Options that are not the scenario's to set.
const NOT_IN_A_SCENARIO: &[&str] = &["scenario", "shard", "help"];

/// `argv` with the options of the `load` command's `--scenario FILE` put in after `load`;
/// unchanged without one. Errors name the file, and the line and key when there is one.
pub fn expand(argv: Vec<OsString>) -> Result<Vec<OsString>, String> {
    let Some(at) = argv.iter().position(|a| a == "load") else {
        return Ok(argv);
    };
    let rest = &argv[at + 1..];
    let Some(file) = scenario_file(rest) else {
        return Ok(argv);
    };
    let text = std::fs::read_to_string(&file)
        .map_err(|e| format!("--scenario {}: {e}", file.display()))?;
    let mut tokens = tokens(&file, &text)?;
    if let Some(url) = tokens.url.take()
        && !has_url(rest)
    {
        tokens.options.push(url.into());
    }
    let mut out = argv[..=at].to_vec();
    out.extend(tokens.options);
    out.extend_from_slice(rest);
    Ok(out)
}

/// The `load` command as the binary builds it, for the option names and the trial parse.
fn command() -> Command {
    LoadArgs::augment_args(Command::new("load").args_override_self(true))
}

fn scenario_file(args: &[OsString]) -> Option<std::path::PathBuf> {
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let a = a.to_string_lossy();
        if a == "--scenario" {
            return it.next().map(Into::into);
        }
        if let Some(f) = a.strip_prefix("--scenario=") {
            return Some(f.into());
        }
    }
    None
}

/// Whether the command line names a target itself (then the scenario's `url` is not used).
fn has_url(args: &[OsString]) -> bool {
    let argv = std::iter::once(OsString::from("load")).chain(args.iter().cloned());
    match command().try_get_matches_from(argv) {
        Ok(_) => true,
        Err(e) => e.kind() != clap::error::ErrorKind::MissingRequiredArgument,
    }
}

struct Tokens {
    options: Vec<OsString>,
    url: Option<String>,
}

fn tokens(file: &Path, text: &str) -> Result<Tokens, String> {
    let at = |key: &str| match line_of(text, key) {
        Some(line) => format!("{}:{line}: {key}", file.display()),
        None => format!("{}: {key}", file.display()),
    };
    let doc: serde_yaml::Value =
        serde_yaml::from_str(text).map_err(|e| format!("--scenario {}: {e}", file.display()))?;
    let map = match doc {
        serde_yaml::Value::Mapping(m) => m,
        serde_yaml::Value::Null => serde_yaml::Mapping::new(),
        _ => {
            return Err(format!(
                "--scenario {}: expected a mapping of option: value",
                file.display()
            ));
        }
    };
    let cmd = command();
    let mut out = Tokens {
        options: Vec::new(),
        url: None,
    };
    for (key, value) in &map {
        let Some(key) = key.as_str() else {
            return Err(format!("--scenario {}: a key is not text", file.display()));
        };
        let name = key.replace('_', "-");
        let scalar = |v: &serde_yaml::Value| -> Result<String, String> {
            match v {
                serde_yaml::Value::String(s) => Ok(s.clone()),
                serde_yaml::Value::Number(n) => Ok(n.to_string()),
                serde_yaml::Value::Bool(b) => Ok(b.to_string()),
                _ => Err(format!("{}: expected a value or a list of values", at(key))),
            }
        };
        let values: Vec<String> = match value {
            serde_yaml::Value::Sequence(items) => {
                items.iter().map(&scalar).collect::<Result<_, _>>()?
            }
            v => vec![scalar(v)?],
        };
        if name == "url" {
            out.url = Some(values.join(","));
            continue;
        }
        let arg = cmd
            .get_arguments()
            .filter(|a| !a.is_hide_set())
            .find(|a| a.get_long() == Some(name.as_str()))
            .filter(|_| !NOT_IN_A_SCENARIO.contains(&name.as_str()));
        let Some(arg) = arg else {
            return Err(format!(
                "{}: not an option of tunegate load (docs/load.md lists the keys)",
                at(key)
            ));
        };
        let flag = format!("--{name}");
        if !arg.get_action().takes_values() {
            match value {
                serde_yaml::Value::Bool(true) => out.options.push(flag.into()),
                serde_yaml::Value::Bool(false) => {}
                _ => return Err(format!("{}: expected true or false", at(key))),
            }
        } else if matches!(arg.get_action(), clap::ArgAction::Append) {
            for v in values {
                out.options.extend([flag.clone().into(), v.into()]);
            }
        } else {
            out.options.extend([flag.into(), values.join(",").into()]);
        }
    }
    Ok(out)
}

/// The line (1-based) where `key` starts a mapping entry at the top level.
fn line_of(text: &str, key: &str) -> Option<usize> {
    text.lines()
        .position(|l| {
            l.strip_prefix(key)
                .or_else(|| l.strip_prefix(&format!("\"{key}\"")))
                .is_some_and(|rest| rest.trim_start().starts_with(':'))
        })
        .map(|i| i + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn expanded(yaml: &str, cli: &[&str]) -> Result<Vec<String>, String> {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("run.yaml");
        std::fs::write(&file, yaml).unwrap();
        let mut argv: Vec<OsString> = ["tunegate", "load", "--scenario"]
            .iter()
            .map(Into::into)
            .collect();
        argv.push(file.clone().into());
        argv.extend(cli.iter().map(Into::into));
        let file_s = file.to_string_lossy().to_string();
        let out = expand(argv).map_err(|e| e.replace(&file_s, "FILE"))?;
        let file = file_s;
        Ok(out
            .into_iter()
            .map(|a| a.to_string_lossy().replace(&file, "FILE"))
            .collect())
    }

    #[test]
    fn keys_become_options_before_the_command_lines() {
        let got = expanded(
            "url: ws://127.0.0.1:9/\nstages: [1s:10, 2s:10]\npublish_rate: 2.5\n\
             header: ['Origin: https://a', 'Cookie: x=1']\ndeflate: true\njson: false\n",
            &["--hold", "3"],
        )
        .unwrap();
        assert_eq!(
            got,
            [
                "tunegate",
                "load",
                "--stages",
                "1s:10,2s:10",
                "--publish-rate",
                "2.5",
                "--header",
                "Origin: https://a",
                "--header",
                "Cookie: x=1",
                "--deflate",
                "ws://127.0.0.1:9/",
                "--scenario",
                "FILE",
                "--hold",
                "3",
            ]
        );
        // A target on the command line wins over the file's.
        let got = expanded("url: ws://127.0.0.1:9/\n", &["ws://127.0.0.1:8/"]).unwrap();
        assert!(!got.contains(&"ws://127.0.0.1:9/".to_string()), "{got:?}");
    }

    #[test]
    fn the_command_line_overrides_the_scenario() {
        use clap::FromArgMatches;
        let argv = expanded(
            "url: ws://127.0.0.1:9/\nhold: 5\nfail-if: [lost==0]\n",
            &["--hold", "7", "--fail-if", "p99<1s"],
        )
        .unwrap();
        let m = command().try_get_matches_from(&argv[1..]).unwrap();
        let args = LoadArgs::from_arg_matches(&m).unwrap();
        assert_eq!(args.hold, 7.0);
        assert_eq!(args.fail_if, ["lost==0", "p99<1s"]);
        assert_eq!(args.url, "ws://127.0.0.1:9/");
    }

    #[test]
    fn bad_scenarios_name_the_file_line_and_key() {
        for (yaml, want) in [
            (
                "url: ws://x:1/\npublish-rat: 5\n",
                "FILE:2: publish-rat: not an option",
            ),
            ("shard: 0/1\n", "FILE:1: shard: not an option"),
            ("deflate: 1\n", "FILE:1: deflate: expected true or false"),
            ("hold: {a: 1}\n", "FILE:1: hold: expected a value"),
            ("- a\n- b\n", "FILE: expected a mapping"),
            ("hold: [1\n", "--scenario FILE: "),
        ] {
            let e = expanded(yaml, &[]).unwrap_err();
            assert!(e.contains(want), "{yaml:?}: {e}");
        }
    }
}

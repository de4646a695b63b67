//! systemd/tunegate.service as systemd itself reads it: `systemd-analyze verify` must be clean
//! (no "Unknown key" or any other warning) and `systemd-analyze security --offline=true` must
//! rate its exposure 2.0 or less. Runs without a running systemd.

use std::process::Command;

const UNIT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/systemd/tunegate.service");

/// The unit with ExecStart pointed at the binary under test (verify checks that it exists).
fn unit_copy(dir: &std::path::Path) -> std::path::PathBuf {
    let text = std::fs::read_to_string(UNIT).unwrap();
    assert!(text.contains("ExecStart=/usr/bin/tunegate run"));
    let path = dir.join("tunegate.service");
    std::fs::write(
        &path,
        text.replace("/usr/bin/tunegate", env!("CARGO_BIN_EXE_tunegate")),
    )
    .unwrap();
    path
}

fn analyze(args: &[&str]) -> (bool, String) {
    let out = Command::new("systemd-analyze")
        .args(args)
        .output()
        .expect("systemd-analyze is missing: scripts/deps.sh installs the systemd package");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn verify_is_clean() {
    let dir = tempfile::tempdir().unwrap();
    let unit = unit_copy(dir.path());
    // --man=no: the man page ships with the Debian package, not with the source tree.
    let (ok, text) = analyze(&["verify", "--man=no", unit.to_str().unwrap()]);
    assert!(ok, "{text}");
    assert!(!text.contains("Unknown key"), "{text}");
    assert!(text.trim().is_empty(), "verify printed warnings:\n{text}");
}

#[test]
fn exposure_is_at_most_2_0() {
    let (_, text) = analyze(&["security", "--offline=true", UNIT]);
    let line = text
        .lines()
        .find(|l| l.contains("Overall exposure level"))
        .unwrap_or_else(|| panic!("no exposure line:\n{text}"));
    let figure: f64 = line
        .split(':')
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("cannot read {line:?}"));
    assert!(figure <= 2.0, "exposure {figure} > 2.0:\n{text}");
}

#[test]
fn the_unit_is_type_notify_with_reload_and_limits() {
    let text = std::fs::read_to_string(UNIT).unwrap();
    for line in [
        "Type=notify",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "LimitNOFILE=",
        "WatchdogSec=",
        "NoNewPrivileges=yes",
    ] {
        assert!(text.lines().any(|l| l.starts_with(line)), "missing {line}");
    }
}

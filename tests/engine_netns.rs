//! The tuning engine against the real kernel, inside network namespaces these tests create.
//! The host's own values are snapshotted before and compared after every test.

mod common;

use common::*;
use serde_json::Value;

fn finding<'a>(report: &'a Value, id: &str) -> &'a Value {
    report["findings"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["id"] == id)
        .unwrap_or_else(|| panic!("no finding {id} in {report:#}"))
}

#[test]
fn preflight_c100k_fails_in_a_fresh_namespace_and_names_what_matters() {
    let host = host_snapshot();
    let ns = Netns::new();
    let before = ns.snapshot();
    let out = ns.tunegate(&["preflight", "--profile", "c100k", "--format", "json"]);
    assert_eq!(code(&out), 1, "{}", stderr(&out));
    let r = json(&out);
    assert_eq!(r["schema"], "tunegate.preflight/1");
    assert_eq!(r["summary"]["result"], "fail");
    for id in [
        "sysctl.net.core.somaxconn",
        "sysctl.net.ipv4.ip_local_port_range",
        "sysctl.net.ipv4.tcp_wmem",
        "limits.nofile.hard",
    ] {
        assert_eq!(finding(&r, id)["verdict"], "fail", "{id}");
    }
    // TCP buffers are all listed, whatever their verdict.
    finding(&r, "sysctl.net.ipv4.tcp_rmem");
    finding(&r, "sysctl.net.core.rmem_max");
    assert_eq!(
        finding(&r, "sysctl.net.core.somaxconn")["scope"],
        "net-namespace"
    );
    assert_eq!(finding(&r, "sysctl.net.core.somaxconn")["changeable"], true);
    // Findings come failures first.
    let verdicts: Vec<&str> = r["findings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["verdict"].as_str().unwrap())
        .collect();
    let mut sorted = verdicts.clone();
    sorted.sort_by_key(|v| ["fail", "warn", "pass"].iter().position(|x| x == v));
    assert_eq!(verdicts, sorted);
    // Read-only: nothing moved.
    assert_eq!(ns.snapshot(), before);
    assert_eq!(host_snapshot(), host);

    let human = ns.tunegate(&["preflight", "--profile", "c100k"]);
    let text = stdout(&human);
    assert!(
        text.starts_with("tunegate preflight: profile c100k"),
        "{text}"
    );
    let first_pass = text.find("\nPASS").unwrap();
    assert!(text.rfind("\nFAIL").unwrap() < first_pass, "{text}");
}

/// The proxy host's wall: with the kernel's default range (32768-60999) two upstreams cannot
/// carry 100,000 proxied connections from one nginx address; after `apply --profile proxy`
/// the namespace's range (1024-65535, 8080 reserved) can, as the real kernel reports it.
#[test]
fn a_proxy_host_is_warned_of_upstream_port_exhaustion_until_the_range_is_widened() {
    let host = host_snapshot();
    let ns = Netns::new();
    let dir = tempfile::tempdir().unwrap();
    let mine = profile(
        dir.path(),
        "front.yaml",
        "target_connections: 100000\nproxy:\n  upstreams: 2\n",
    );
    let mine = mine.to_str().unwrap();
    let check = |spec: &str| {
        let out = ns.tunegate(&["preflight", "--profile", spec, "--format", "json"]);
        let r = json(&out);
        finding(&r, "derived.upstream_ports").clone()
    };
    let f = check(mine);
    assert_eq!(f["verdict"], "warn", "{f:#}");
    assert!(
        f["wanted"]
            .as_str()
            .unwrap()
            .contains("28232 ports per pair"),
        "{f:#}"
    );
    assert!(
        f["fix"].as_str().unwrap().contains("at least 5 pairs"),
        "{f:#}"
    );
    assert!(
        f["source"].as_str().unwrap().ends_with("front.yaml:2:1"),
        "{f:#}"
    );
    // The built-in proxy profile plans the wider range, so its preflight already passes it.
    assert_eq!(check("proxy")["verdict"], "pass");
    let out = ns.tunegate(&["apply", "--profile", "proxy"]);
    assert!(code(&out) <= 1, "{}", stderr(&out));
    assert_eq!(ns.read("net/ipv4/ip_local_port_range"), "1024\t65535\n");
    let f = check(mine);
    assert_eq!(f["verdict"], "pass", "{f:#}");
    assert!(
        f["wanted"]
            .as_str()
            .unwrap()
            .contains("64511 ports per pair (1024-65535 after apply, 1 of them reserved)"),
        "{f:#}"
    );
    assert_eq!(host_snapshot(), host);
}

#[test]
fn apply_c100k_passes_every_namespace_finding_and_revert_restores_them() {
    let host = host_snapshot();
    let ns = Netns::new();
    let before = ns.snapshot();

    let dry = ns.tunegate(&["apply", "--profile", "c100k", "--dry-run"]);
    assert_eq!(code(&dry), 0, "{}", stderr(&dry));
    assert!(stdout(&dry).contains("net.core.somaxconn"));
    assert!(stdout(&dry).contains("4096 -> 65535"), "{}", stdout(&dry));
    assert_eq!(ns.snapshot(), before, "--dry-run changed something");

    let out = ns.tunegate(&[
        "apply",
        "--profile",
        "c100k",
        "--persist",
        "--format",
        "json",
    ]);
    // Still failing afterwards: the host-global keys and the hard nofile limit.
    assert_eq!(code(&out), 1, "{}\n{}", stdout(&out), stderr(&out));
    let r = json(&out);
    assert!(r["outcome"]["failure"].is_null());
    let after = &r["after"];
    for f in after["findings"].as_array().unwrap() {
        if f["scope"] == "net-namespace" && f["id"].as_str().unwrap().starts_with("sysctl.") {
            assert_eq!(f["verdict"], "pass", "{f:#}");
        }
    }
    assert_eq!(ns.read("net/core/somaxconn"), "65535\n");
    assert_eq!(ns.read("net/ipv4/ip_local_port_range"), "1024\t65535\n");
    assert_eq!(ns.read("net/ipv4/ip_local_reserved_ports"), "8080\n");

    // Host-global keys: reported precisely, never written from a namespace.
    let rmem = finding(after, "sysctl.net.core.rmem_max");
    assert_eq!(rmem["verdict"], "fail");
    assert!(rmem["blocked_by"].as_str().unwrap().contains("host-global"));
    let hard = finding(after, "limits.nofile.hard");
    if after["context"]["cap_sys_resource"] == false {
        assert!(
            hard["blocked_by"]
                .as_str()
                .unwrap()
                .contains("CAP_SYS_RESOURCE")
        );
        let err = r["outcome"]["nofile"]["hard_error"].as_str().unwrap();
        assert!(err.contains("EPERM"), "{err}");
    }

    let dropin = std::fs::read_to_string(ns.sysctl_dir().join("60-tunegate.conf")).unwrap();
    assert!(dropin.starts_with("# Written by tunegate"));
    assert!(dropin.contains("net.core.somaxconn = 65535\n"), "{dropin}");
    assert!(ns.state_dir().join("journal.json").exists());

    // Applying again changes nothing and keeps the first previous values.
    let again = ns.tunegate(&["apply", "--profile", "c100k", "--format", "json"]);
    assert_eq!(json(&again)["plan"]["steps"].as_array().unwrap().len(), 0);

    let rev = ns.tunegate(&["revert"]);
    assert_eq!(code(&rev), 0, "{}\n{}", stdout(&rev), stderr(&rev));
    assert!(stdout(&rev).contains("journal cleared"));
    assert_eq!(
        ns.snapshot(),
        before,
        "revert did not restore the namespace"
    );
    assert!(!ns.state_dir().join("journal.json").exists());
    assert!(!ns.sysctl_dir().join("60-tunegate.conf").exists());

    let nothing = ns.tunegate(&["revert"]);
    assert_eq!(code(&nothing), 0);
    assert!(stdout(&nothing).contains("nothing to revert"));
    assert_eq!(host_snapshot(), host, "the host's own values changed");
}

/// The drop-in alone makes a host pass after boot, even for a key that was already satisfied by
/// hand at apply time (it was not "raised", so it used to be left out). The "boot" is a second
/// fresh namespace into which the drop-in is loaded with sysctl(8), as systemd-sysctl would.
#[test]
fn persist_writes_the_whole_profile_so_a_fresh_namespace_loading_it_passes() {
    let host = host_snapshot();
    let ns = Netns::new();
    ns.sysctl(&["-w", "net.core.somaxconn=65535"]);
    let out = ns.tunegate(&[
        "apply",
        "--profile",
        "c100k",
        "--persist",
        "--format",
        "json",
    ]);
    assert!(code(&out) <= 1, "{}", stderr(&out));
    let steps = json(&out)["plan"]["steps"].clone();
    assert!(
        steps
            .as_array()
            .unwrap()
            .iter()
            .all(|s| s["key"] != "net.core.somaxconn"),
        "somaxconn was already satisfied: {steps:#}"
    );
    let dropin = ns.sysctl_dir().join("60-tunegate.conf");
    let text = std::fs::read_to_string(&dropin).unwrap();
    assert!(text.contains("net.core.somaxconn = 65535\n"), "{text}");

    let boot = Netns::new();
    boot.sysctl(&["-p", dropin.to_str().unwrap()]);
    let r = json(&boot.tunegate(&["preflight", "--profile", "c100k", "--format", "json"]));
    for f in r["findings"].as_array().unwrap() {
        if f["scope"] == "net-namespace" && f["id"].as_str().unwrap().starts_with("sysctl.") {
            assert_eq!(
                f["verdict"], "pass",
                "after loading the drop-in: {f:#}\n{text}"
            );
        }
    }
    assert_eq!(host_snapshot(), host, "the host's own values changed");
}

/// Five good per-namespace keys with a faulty one inserted at position k; every k.
/// Two real kernel faults alternate: a write the kernel refuses (EINVAL) and one it accepts but
/// ignores (ping_group_range with low > high reads back unchanged).
#[test]
fn a_failure_at_any_step_restores_every_earlier_value() {
    let host = host_snapshot();
    let good = [
        "  net.core.somaxconn: 65535\n",
        "  net.ipv4.tcp_max_syn_backlog: 65535\n",
        "  net.ipv4.ip_local_port_range: \"1024 65535\"\n",
        "  net.ipv4.tcp_wmem: \"4096 65536 16777216\"\n",
        "  net.ipv4.ip_local_reserved_ports: \"3000,6379\"\n",
    ];
    let faults = [
        (
            "net.ipv4.tcp_fin_timeout",
            "  net.ipv4.tcp_fin_timeout: \"soon\"\n",
        ),
        (
            "net.ipv4.ping_group_range",
            "  net.ipv4.ping_group_range: \"5 1\"\n",
        ),
    ];
    let dir = tempfile::tempdir().unwrap();
    for k in 0..=good.len() {
        let (fault_key, fault_line) = faults[k % faults.len()];
        let mut text = String::from("sysctl:\n");
        for (i, line) in good.iter().enumerate() {
            if i == k {
                text.push_str(fault_line);
            }
            text.push_str(line);
        }
        if k == good.len() {
            text.push_str(fault_line);
        }
        let p = profile(dir.path(), &format!("fault{k}.yaml"), &text);
        let ns = Netns::new();
        let before = ns.snapshot();
        let out = ns.tunegate(&["apply", "--profile", p.to_str().unwrap()]);
        let text = stdout(&out);
        assert_eq!(code(&out), 3, "k={k}: {text}\n{}", stderr(&out));
        assert!(
            text.contains(&format!("FAILED    step {} {fault_key}", k + 1)),
            "k={k}: {text}"
        );
        assert_eq!(
            text.matches("\nrestored  ").count(),
            k,
            "k={k}: expected {k} restores: {text}"
        );
        assert_eq!(ns.snapshot(), before, "k={k}: values not restored");
        assert!(
            !ns.state_dir().join("journal.json").exists(),
            "k={k}: journal left behind after a full rollback"
        );
    }
    assert_eq!(host_snapshot(), host);
}

#[test]
fn revert_refuses_a_journal_from_another_namespace() {
    let a = Netns::new();
    let out = a.tunegate(&["apply", "--profile", "c10k"]);
    assert!(
        [0, 1].contains(&code(&out)),
        "{}\n{}",
        stdout(&out),
        stderr(&out)
    );
    assert!(a.state_dir().join("journal.json").exists());
    let b = Netns::new();
    let rev = std::process::Command::new("ip")
        .args(["netns", "exec", &b.name, bin(), "revert"])
        .env("TUNEGATE_STATE_DIR", a.state_dir())
        .output()
        .unwrap();
    assert_eq!(code(&rev), 2, "{}", stdout(&rev));
    assert!(
        stderr(&rev).contains("network namespace"),
        "{}",
        stderr(&rev)
    );
    assert!(a.state_dir().join("journal.json").exists());
    assert_eq!(code(&a.tunegate(&["revert"])), 0);
}

#[test]
fn bad_input_exits_2_names_the_problem_and_changes_nothing() {
    let host = host_snapshot();
    let dir = tempfile::tempdir().unwrap();
    profile(dir.path(), "cyc_a.yaml", "extends: cyc_b.yaml\n");
    profile(
        dir.path(),
        "cyc_b.yaml",
        "target_connections: 5\nextends: cyc_a.yaml\n",
    );
    let cases: &[(&str, &str, &str, &str)] = &[
        (
            "malformed.yaml",
            "sysctl:\n  net.core.somaxconn: [1,\n",
            ":3:",
            "malformed.yaml",
        ),
        (
            "unknown_field.yaml",
            "target_connections: 5\nsysctls: {}\n",
            ":2:1",
            "unknown field `sysctls`",
        ),
        (
            "missing_extends.yaml",
            "extends: ./nowhere.yaml\n",
            ":1:1",
            "nowhere.yaml",
        ),
        (
            "not_a_number.yaml",
            "sysctl:\n  net.core.somaxconn: plenty\n",
            ":2:",
            "not a whole number",
        ),
        (
            "overflow.yaml",
            "sysctl:\n  net.core.somaxconn: 99999999999999999999\n",
            ":2:",
            "out of range",
        ),
        (
            "backwards.yaml",
            "sysctl:\n  net.ipv4.ip_local_port_range: \"60000 2000\"\n",
            ":2:",
            "greater than its end",
        ),
        (
            "traversal.yaml",
            "sysctl:\n  net/../../../etc/shadow: 1\n",
            ":2:3",
            "would leave /proc/sys",
        ),
        ("empty.yaml", "", "empty.yaml", "profile is empty"),
        (
            "no_such_key.yaml",
            "sysctl:\n  net.core.somaxconn: 65535\n  net.core.no_such_key: 1\n",
            ":3:3",
            "does not exist",
        ),
    ];
    for (name, text, position, needle) in cases {
        let p = profile(dir.path(), name, text);
        let ns = Netns::new();
        let before = ns.snapshot();
        for cmd in ["preflight", "apply"] {
            let out = ns.tunegate(&[cmd, "--profile", p.to_str().unwrap()]);
            let err = stderr(&out);
            assert_eq!(code(&out), 2, "{name} {cmd}: {err}{}", stdout(&out));
            assert!(err.contains(name), "{name}: file not named: {err}");
            assert!(
                err.contains(position),
                "{name}: position {position} missing: {err}"
            );
            assert!(err.contains(needle), "{name}: {needle:?} missing: {err}");
        }
        assert_eq!(ns.snapshot(), before, "{name}: something changed");
        assert!(!ns.state_dir().join("journal.json").exists(), "{name}");
    }
    // An extends cycle names the file whose extends closes it.
    let ns = Netns::new();
    let out = ns.tunegate(&[
        "apply",
        "--profile",
        dir.path().join("cyc_a.yaml").to_str().unwrap(),
    ]);
    assert_eq!(code(&out), 2);
    assert!(
        stderr(&out).contains("cyc_b.yaml:2:1: extends cycle"),
        "{}",
        stderr(&out)
    );
    assert_eq!(host_snapshot(), host);
}

#[test]
fn a_profile_others_can_write_is_refused_when_root() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let p = profile(
        dir.path(),
        "loose.yaml",
        "sysctl:\n  net.core.somaxconn: 65535\n",
    );
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o666)).unwrap();
    let ns = Netns::new();
    let before = ns.snapshot();
    let out = ns.tunegate(&["apply", "--profile", p.to_str().unwrap()]);
    assert_eq!(code(&out), 2);
    assert!(
        stderr(&out).contains("writable by group or others"),
        "{}",
        stderr(&out)
    );
    assert_eq!(ns.snapshot(), before);
}

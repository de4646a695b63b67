//! The monitoring files the package ships (packaging/monitoring/): the Prometheus alerting rules
//! pass `promtool check rules` and their unit tests pass `promtool test rules` (Debian's
//! prometheus package, installed by scripts/deps.sh); the Grafana dashboard is well-formed.
//! That every metric they name is one tunegate serves is checked against live pages in
//! tests/daemon.rs (saturation_is_sampled_said_listed_and_served).

mod common;

use std::path::Path;
use std::process::Command;

use common::*;

const DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/packaging/monitoring");

fn promtool(args: &[&str]) -> String {
    let out = Command::new("promtool")
        .args(args)
        .current_dir(DIR)
        .output()
        .expect("promtool (scripts/deps.sh installs the prometheus package)");
    let text = format!("{}{}", stdout(&out), stderr(&out));
    assert!(out.status.success(), "promtool {args:?}: {text}");
    text
}

#[test]
fn the_alerting_rules_are_valid_and_fire_when_they_should() {
    let checked = promtool(&["check", "rules", "tunegate-alerts.yml"]);
    assert!(checked.contains("SUCCESS: 7 rules found"), "{checked}");
    let tested = promtool(&["test", "rules", "tunegate-alerts.test.yml"]);
    assert!(tested.contains("SUCCESS"), "{tested}");
}

#[test]
fn the_dashboard_is_well_formed_and_every_panel_queries_tunegate() {
    let text = std::fs::read_to_string(Path::new(DIR).join("tunegate-dashboard.json")).unwrap();
    let dash: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(dash["uid"], "tunegate-host");
    let panels = dash["panels"].as_array().unwrap();
    assert!(panels.len() >= 10);
    let mut ids: Vec<u64> = panels.iter().map(|p| p["id"].as_u64().unwrap()).collect();
    ids.dedup();
    assert_eq!(ids.len(), panels.len(), "panel ids must be unique");
    for p in panels {
        let targets = p["targets"].as_array().unwrap();
        assert!(!targets.is_empty(), "{p:#}");
        for t in targets {
            let expr = t["expr"].as_str().unwrap();
            assert!(expr.contains("tunegate_"), "{expr}");
            assert_eq!(
                expr.matches('(').count(),
                expr.matches(')').count(),
                "{expr}"
            );
        }
    }
}

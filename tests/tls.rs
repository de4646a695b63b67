//! TLS on the listener (issue 20): `tunegate serve --tls-cert --tls-key` with a CA and a
//! certificate the test makes with openssl, driven by clients we did not write: Python's `ssl`
//! and `websockets` (tests/clients/tls.py), Node's `ws` (tests/clients/tls_ws.js), curl and
//! `openssl s_client`.

mod common;

use std::path::Path;
use std::process::Command;

use common::certs::make_certs;
use common::ws::Server;
use common::{bin, code, python_client, stderr};

fn tls_server(cert: &Path, key: &Path, extra: &[&str]) -> Server {
    let mut args = vec![
        "--tls-cert",
        cert.to_str().unwrap(),
        "--tls-key",
        key.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    Server::start(&args)
}

fn curl(args: &[&str]) -> (bool, String) {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "5"])
        .args(args)
        .output()
        .expect("curl");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &stderr(&out),
    )
}

#[test]
fn wss_and_https_on_one_listener_for_python_node_curl_and_not_below_tls_1_2() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = make_certs(dir.path(), "server");
    let s = tls_server(&cert, &key, &["--threads", "2", "--listen", "[::1]:0"]);
    let line = s.stderr.lock().unwrap().lines().next().unwrap().to_string();
    assert!(line.contains(", tls"), "{line}");
    let port = s.addr.port();
    let ca_s = ca.to_str().unwrap();
    let url = format!("wss://127.0.0.1:{port}/");
    python_client(&[], "tls", &["relay", &url, ca_s], "");

    let (ok, text) = common::node_client("tls_ws", &[&format!("wss://localhost:{port}/"), ca_s]);
    assert!(ok, "{text}");

    // https on the same port: the plain-HTTP side, over TLS 1.2 and 1.3, IPv4 and IPv6.
    for (version, host) in [("--tlsv1.3", "127.0.0.1"), ("--tls-max", "[::1]")] {
        let mut args = vec!["--cacert", ca_s];
        if version == "--tls-max" {
            args.extend(["--tls-max", "1.2"]);
        } else {
            args.push(version);
        }
        let v6_port;
        let target = if host == "[::1]" {
            v6_port = line
                .split("also [::1]:")
                .nth(1)
                .unwrap()
                .trim_end_matches(')')
                .to_string();
            format!("https://[::1]:{v6_port}/healthz")
        } else {
            format!("https://{host}:{port}/healthz")
        };
        args.push(&target);
        let (ok, text) = curl(&args);
        assert!(ok && text.trim() == "ok", "{target}: {text}");
    }
    let (ok, text) = curl(&[
        "--cacert",
        ca_s,
        &format!("https://localhost:{port}/metrics"),
    ]);
    assert!(ok && text.contains("tunegate_websockets_open"), "{text}");

    // TLS 1.1 and plain HTTP are refused, and counted.
    let out = Command::new("openssl")
        .args([
            "s_client",
            "-connect",
            &format!("127.0.0.1:{port}"),
            "-tls1_1",
        ])
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success(), "TLS 1.1 was accepted");
    let (ok, _) = curl(&[&format!("http://127.0.0.1:{port}/healthz")]);
    assert!(!ok, "plain HTTP was answered on a TLS port");
    let (_, metrics) = curl(&[
        "--cacert",
        ca_s,
        &format!("https://127.0.0.1:{port}/metrics"),
    ]);
    let tls_errors: u64 = metrics
        .lines()
        .find(|l| l.starts_with("tunegate_connections_closed_total{reason=\"tls_error\"}"))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap();
    assert!(tls_errors >= 2, "{tls_errors}");
}

#[test]
fn sighup_reloads_the_certificate_without_dropping_a_connection() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, old_cert, old_key) = make_certs(dir.path(), "old");
    let (_, new_cert, new_key) = make_certs(dir.path(), "new");
    let live_cert = dir.path().join("live.pem");
    let live_key = dir.path().join("live.key");
    std::fs::copy(&old_cert, &live_cert).unwrap();
    std::fs::copy(&old_key, &live_key).unwrap();
    let s = tls_server(&live_cert, &live_key, &["--threads", "2"]);
    let url = format!("wss://127.0.0.1:{}/", s.addr.port());
    let p = |p: &Path| p.to_str().unwrap().to_string();
    python_client(
        &[],
        "tls",
        &[
            "reload",
            &url,
            &p(&ca),
            &s.pid().to_string(),
            &p(&live_cert),
            &p(&live_key),
            &p(&new_cert),
            &p(&new_key),
        ],
        "",
    );
    common::eventually_true(
        std::time::Duration::from_secs(5),
        || format!("the reload line in {}", s.stderr.lock().unwrap()),
        || {
            s.stderr
                .lock()
                .unwrap()
                .contains("SIGHUP: reloaded the TLS certificate")
        },
    );
    // A broken file at the next SIGHUP: the certificate in use stays, and says why.
    std::fs::write(&live_key, "not a key\n").unwrap();
    s.signal(nix::sys::signal::Signal::SIGHUP);
    common::eventually_true(
        std::time::Duration::from_secs(5),
        || format!("the refusal in {}", s.stderr.lock().unwrap()),
        || {
            s.stderr
                .lock()
                .unwrap()
                .contains("kept the TLS certificate in use")
        },
    );
    let (ok, text) = curl(&[
        "--cacert",
        &p(&ca),
        &format!("https://127.0.0.1:{}/healthz", s.addr.port()),
    ]);
    assert!(ok && text.trim() == "ok", "{text}");
}

#[test]
fn bad_certificate_files_are_bad_usage_with_the_file_named() {
    let dir = tempfile::tempdir().unwrap();
    let (_, cert, key) = make_certs(dir.path(), "server");
    let missing = dir.path().join("missing.pem");
    let out = Command::new(bin())
        .args(["serve", "--listen", "127.0.0.1:0", "--tls-cert"])
        .arg(&missing)
        .arg("--tls-key")
        .arg(&key)
        .output()
        .unwrap();
    assert_eq!(code(&out), 2, "{}", stderr(&out));
    assert!(stderr(&out).contains("missing.pem"), "{}", stderr(&out));
    // A key that is not the certificate's.
    let (_, _, other_key) = make_certs(dir.path(), "other");
    let out = Command::new(bin())
        .args(["serve", "--listen", "127.0.0.1:0", "--tls-cert"])
        .arg(&cert)
        .arg("--tls-key")
        .arg(&other_key)
        .output()
        .unwrap();
    assert_eq!(code(&out), 2, "{}", stderr(&out));
    let out = Command::new(bin())
        .args(["serve", "--listen", "127.0.0.1:0", "--tls-cert"])
        .arg(&cert)
        .output()
        .unwrap();
    assert_eq!(code(&out), 2, "--tls-cert alone: {}", stderr(&out));
}

/// `tunegate load` over wss:// (IPv4 and IPv6) with `--ca-file`, against a server that also
/// requires tokens: with `--token` every delivery arrives; without, every connect fails 401.
#[test]
fn load_runs_over_wss_with_a_token_and_is_refused_without_one() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = make_certs(dir.path(), "server");
    let secret = dir.path().join("token.secret");
    std::fs::write(&secret, "a-secret-for-the-load-test-0123456789\n").unwrap();
    std::fs::set_permissions(&secret, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let secret_s = secret.to_str().unwrap();
    let s = tls_server(
        &cert,
        &key,
        &[
            "--threads",
            "2",
            "--listen",
            "[::1]:0",
            "--auth-secret-file",
            secret_s,
        ],
    );
    let line = s.stderr.lock().unwrap().lines().next().unwrap().to_string();
    let v6_port = line
        .split("also [::1]:")
        .nth(1)
        .unwrap()
        .trim_end_matches(')');
    let token = common::token(&["--secret-file", secret_s, "--sub", "load", "--rooms", "*"]);
    let ca_s = ca.to_str().unwrap();
    let load = |url: &str, token: Option<&str>| {
        let mut args = vec!["--ca-file", ca_s, "-n", "300", "--rooms", "10:100"];
        args.extend(["--publish-rate", "300", "--publish-seconds", "1"]);
        if let Some(t) = token {
            args.extend(["--token", t]);
        }
        common::load(url, &args)
    };
    for url in [
        format!("wss://127.0.0.1:{}/", s.addr.port()),
        format!("wss://[::1]:{v6_port}/"),
    ] {
        let o = load(&url, Some(&token));
        let r = common::json(&o);
        assert_eq!(code(&o), 0, "{url}: {}\n{r}", stderr(&o));
        assert_eq!(r["opened"], 300, "{r}");
        assert_eq!(r["lost"], 0, "{r}");
        assert_eq!(r["received"], r["expected"], "{r}");
    }
    // A name in the URL, resolved once and the certificate checked against it; the token
    // from a file, the CA through --ca (--ca-file's alias).
    let token_file = dir.path().join("load.token");
    std::fs::write(&token_file, format!("{token}\n")).unwrap();
    let o = common::load(
        &format!("wss://localhost:{}/", s.addr.port()),
        &[
            "--ca",
            ca_s,
            "--token-file",
            token_file.to_str().unwrap(),
            "-n",
            "50",
        ],
    );
    let r = common::json(&o);
    assert_eq!(code(&o), 0, "localhost: {}\n{r}", stderr(&o));
    assert_eq!(r["opened"], 50, "{r}");
    let o = load(&format!("wss://127.0.0.1:{}/", s.addr.port()), None);
    let r = common::json(&o);
    assert_eq!(code(&o), 1, "{r}");
    assert_eq!(r["opened"], 0, "{r}");
    assert!(r.to_string().contains("401"), "{r}");
}

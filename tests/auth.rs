//! Who may connect, join, publish and send (issue 20): `tunegate serve` with signed tokens and
//! abuse limits, driven by clients we did not write (Python `websockets`, tokens minted by
//! PyJWT; tests/clients/auth.py), by our own RFC 6455 client with tokens from `tunegate token`,
//! and checked against /metrics.

mod common;

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::ws::{Server, Ws, http};
use common::{bin, code, python_client, stderr};

/// A 0600 secret file of 40 bytes (and a newline, as an editor would leave it).
fn secret(dir: &Path) -> PathBuf {
    let path = dir.join("token.secret");
    let mut f = std::fs::File::create(&path).unwrap();
    f.write_all(b"tunegate-test-secret-0123456789abcdefgh\n")
        .unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path
}

/// The samples of a labelled metric family: `name{reason="x"} N` as (x, N).
fn by_reason(s: &Server, name: &str) -> Vec<(String, u64)> {
    let (_, body) = s.get("/metrics");
    body.lines()
        .filter_map(|l| l.strip_prefix(&format!("{name}{{reason=\"")))
        .filter_map(|l| {
            let (reason, rest) = l.split_once('"')?;
            Some((reason.to_string(), rest.rsplit(' ').next()?.parse().ok()?))
        })
        .collect()
}

fn reason(s: &Server, name: &str, reason: &str) -> u64 {
    by_reason(s, name)
        .into_iter()
        .find(|(r, _)| r == reason)
        .map_or(0, |(_, n)| n)
}

/// Every bad token refused with 401 and its class, counted by reason; claims enforced for
/// join, count, publish and send; tokens made by PyJWT accepted.
#[test]
fn bad_tokens_are_refused_counted_and_claims_decide_what_a_connection_may_do() {
    let dir = tempfile::tempdir().unwrap();
    let secret = secret(dir.path());
    let s = Server::start(&[
        "--threads",
        "2",
        "--auth-secret-file",
        secret.to_str().unwrap(),
    ]);
    let log = s.stderr.lock().unwrap().clone();
    assert!(!log.contains("open:"), "{log}");
    let url = format!("ws://{}", s.addr);
    python_client(
        &[],
        "auth",
        &["refusals", &url, secret.to_str().unwrap()],
        "",
    );
    for (class, n) in [
        ("missing", 1),
        ("malformed", 1),
        ("signature", 1),
        ("algorithm", 2),
        ("expired", 1),
        ("not_yet_valid", 1),
        ("conflict", 1),
    ] {
        assert_eq!(
            reason(&s, "tunegate_auth_refused_total", class),
            n,
            "{class}"
        );
    }
    assert_eq!(
        reason(&s, "tunegate_connections_closed_total", "unauthorized"),
        8
    );
    assert_eq!(s.metric("tunegate_forbidden_total"), 5);
    // Plain GETs (/healthz, /metrics) need no token: they carry no room traffic.
    assert_eq!(s.get("/healthz").0, 200);
    // The 401s were logged, at most one line a second, with the class and no token.
    let log = s.stderr.lock().unwrap().clone();
    assert!(log.contains("with 401: token missing"), "{log}");
    assert!(
        log.lines().filter(|l| l.contains("with 401")).count() <= 3,
        "{log}"
    );
}

/// `tunegate token` mints what the server accepts (query or header), with the claims given;
/// a secret file others can read stops both with exit 2 and the file named.
#[test]
fn tunegate_token_mints_what_serve_accepts_and_a_loose_secret_is_bad_usage() {
    let dir = tempfile::tempdir().unwrap();
    let secret = secret(dir.path());
    let f = secret.to_str().unwrap();
    let s = Server::start(&["--threads", "1", "--auth-secret-file", f]);
    let token = common::token(&[
        "--secret-file",
        f,
        "--sub",
        "alice",
        "--rooms",
        "call-42",
        "--rooms",
        "team-7/*",
        "--ttl",
        "10m",
    ]);
    let mut ws = Ws::connect_path(s.addr, &format!("/?token={token}"));
    let hello = ws.recv_json();
    assert_eq!(hello["user"], "alice", "{hello}");
    let exp = hello["exp"].as_u64().unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!((now + 590..=now + 601).contains(&exp), "{exp} vs {now}");
    ws.send_json(serde_json::json!({"op": "join", "room": "team-7/x"}));
    assert_eq!(ws.recv_json()["op"], "joined");
    ws.send_json(serde_json::json!({"op": "join", "room": "team-8"}));
    assert_eq!(ws.recv_json()["code"], "forbidden");
    ws.send_json(serde_json::json!({"op": "send", "to": 1, "data": 1}));
    assert_eq!(ws.recv_json()["code"], "forbidden", "no --send");
    // The same token as a Bearer header.
    let key = "dGhlIHNhbXBsZSBub25jZQ==";
    let upgrade = |auth: &str| {
        format!(
            "GET / HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n{auth}\r\n"
        )
    };
    let stream = std::net::TcpStream::connect(s.addr).unwrap();
    let mut ws = Ws::after_upgrade({
        let mut st = stream;
        st.write_all(upgrade(&format!("Authorization: Bearer {token}\r\n")).as_bytes())
            .unwrap();
        st
    })
    .unwrap();
    assert_eq!(ws.recv_json()["user"], "alice");
    let (status, text) = http(s.addr, &upgrade(""));
    assert_eq!(status, 401, "{text}");
    assert!(text.contains("WWW-Authenticate: Bearer"), "{text}");
    assert!(text.ends_with("unauthorized: missing\n"), "{text}");
    // Not yet valid, by --not-before.
    let later = common::token(&["--secret-file", f, "--sub", "bob", "--not-before", "1h"]);
    let (status, text) = http(
        s.addr,
        &upgrade(&format!("Authorization: Bearer {later}\r\n")),
    );
    assert_eq!(
        (status, text.ends_with("not_yet_valid\n")),
        (401, true),
        "{text}"
    );

    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = Command::new(bin())
        .args(["token", "--secret-file", f, "--sub", "x"])
        .output()
        .unwrap();
    assert_eq!(code(&out), 2, "{}", stderr(&out));
    assert!(stderr(&out).contains("mode 0644") && stderr(&out).contains(f));
    let out = Command::new(bin())
        .args(["serve", "--listen", "127.0.0.1:0", "--auth-secret-file", f])
        .output()
        .unwrap();
    assert_eq!(code(&out), 2, "{}", stderr(&out));
    assert!(stderr(&out).contains("must not be readable by group or others"));
    let out = Command::new(bin())
        .args(["token", "--secret-file", f, "--sub", "x", "--rooms", "a*b"])
        .output()
        .unwrap();
    assert_ne!(code(&out), 0);
}

/// A connection whose token ends is closed with 4001 unless it refreshed; an open server says
/// it is open, once, at start.
#[test]
fn an_expired_token_closes_its_connection_unless_refreshed() {
    let dir = tempfile::tempdir().unwrap();
    let secret = secret(dir.path());
    let f = secret.to_str().unwrap();
    let s = Server::start(&[
        "--threads",
        "2",
        "--auth-secret-file",
        f,
        "--auth-leeway",
        "0",
    ]);
    let url = format!("ws://{}", s.addr);
    python_client(&[], "auth", &["expiry", &url, f], "");
    assert_eq!(
        reason(&s, "tunegate_connections_closed_total", "token_expired"),
        1
    );
    assert_eq!(s.metric("tunegate_token_refreshes_total"), 1);
    let log = s.stderr.lock().unwrap().clone();
    assert!(
        log.contains("(user \"a\") with 4001: its token expired"),
        "{log}"
    );

    let open = Server::start(&["--threads", "1"]);
    common::eventually_true(
        std::time::Duration::from_secs(5),
        || format!("the open line in {}", open.stderr.lock().unwrap()),
        || {
            open.stderr
                .lock()
                .unwrap()
                .contains("open: no --auth-secret-file")
        },
    );
}

/// Keys made by openssl, tokens by PyJWT: EdDSA against an Ed25519 public key, RS256 against
/// an RSA one; the other algorithm and the HS256-with-the-public-key forgery are refused.
#[test]
fn pyjwt_tokens_verify_against_ed25519_and_rsa_public_keys() {
    let dir = tempfile::tempdir().unwrap();
    for (alg, genpkey) in [
        ("EdDSA", vec!["-algorithm", "ed25519"]),
        (
            "RS256",
            vec!["-algorithm", "rsa", "-pkeyopt", "rsa_keygen_bits:2048"],
        ),
    ] {
        let private = dir.path().join(format!("{alg}.key"));
        let public = dir.path().join(format!("{alg}.pub"));
        let out = Command::new("openssl")
            .arg("genpkey")
            .args(&genpkey)
            .arg("-out")
            .arg(&private)
            .output()
            .expect("openssl");
        assert!(out.status.success(), "{}", stderr(&out));
        let out = Command::new("openssl")
            .args(["pkey", "-pubout", "-in"])
            .arg(&private)
            .arg("-out")
            .arg(&public)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
        let s = Server::start(&[
            "--threads",
            "1",
            "--auth-public-key",
            public.to_str().unwrap(),
        ]);
        let url = format!("ws://{}", s.addr);
        let (p, q) = (private.to_str().unwrap(), public.to_str().unwrap());
        python_client(&[], "auth", &["public", &url, p, q, alg], "");
        assert_eq!(reason(&s, "tunegate_auth_refused_total", "algorithm"), 2);
        // `tunegate token --private-key` signs with the same key the issuer holds.
        let token = common::token(&["--private-key", p, "--sub", "ops", "--rooms", "*"]);
        let mut ws = Ws::connect_path(s.addr, &format!("/?token={token}"));
        assert_eq!(ws.recv_json()["user"], "ops");
    }
}

/// The per-connection message rate, the per-address upgrade rate and the per-address cap
/// hold under bounded floods from loopback, and are counted.
#[test]
fn rate_limits_and_address_caps_hold_under_a_bounded_flood() {
    let s = Server::start(&[
        "--threads",
        "2",
        "--message-rate",
        "50",
        "--message-burst",
        "20",
        "--max-upgrade-rate",
        "10",
        "--max-connections-per-address",
        "4",
    ]);
    let url = format!("ws://{}", s.addr);
    python_client(&[], "auth", &["flood", &url, "50", "20", "10", "4"], "");
    assert!(s.metric("tunegate_rate_limited_total") >= 10);
    assert_eq!(
        reason(&s, "tunegate_connections_closed_total", "rate_limited"),
        1
    );
    assert!(reason(&s, "tunegate_connections_closed_total", "upgrade_rate") > 0);
    assert_eq!(
        reason(&s, "tunegate_connections_closed_total", "address_limit"),
        1
    );
    let log = s.stderr.lock().unwrap().clone();
    assert!(log.contains("the --max-upgrade-rate limit"), "{log}");
    assert!(log.contains("over --message-rate 50"), "{log}");
}

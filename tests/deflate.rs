//! permessage-deflate (issue 21): `tunegate serve --deflate on` with clients we did not write:
//! Python `websockets` and raw sockets with Python's zlib (tests/clients/deflate.py), Node `ws`
//! (tests/clients/deflate_ws.js). Autobahn|Testsuite groups 12 and 13 run in scripts/test.sh.

mod common;

use common::python_client;
use common::ws::Server;

fn rss_kb(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap()
}

#[test]
fn python_and_node_clients_exchange_compressed_room_messages_beside_one_that_does_not() {
    let s = Server::start(&["--threads", "2", "--deflate", "on"]);
    let url = format!("ws://{}", s.addr);
    python_client(&[], "deflate", &["rooms", &url], "");
    let (ok, text) = common::node_client("deflate_ws", &[&format!("ws://{}/", s.addr)]);
    assert!(ok, "{text}");
    // The server really compressed and inflated (the clients cannot see it per frame).
    assert!(s.metric("tunegate_messages_inflated_total") >= 4);
    assert!(s.metric("tunegate_messages_deflated_total") >= 4);

    // Without --deflate on, nothing is agreed and the same exchange works uncompressed.
    let plain = Server::start(&["--threads", "1"]);
    let (ok, text) = common::node_client("deflate_ws", &[&format!("ws://{}/", plain.addr)]);
    assert!(!ok, "{text}");
    assert!(text.contains("extension not agreed"), "{text}");
}

#[test]
fn a_compression_bomb_is_refused_with_1009_and_the_server_does_not_grow() {
    let s = Server::start(&[
        "--threads",
        "1",
        "--deflate",
        "on",
        "--max-message-size",
        "1048576",
    ]);
    let (host, port) = (s.addr.ip().to_string(), s.addr.port().to_string());
    python_client(&[], "deflate", &["bomb", &host, &port, "2"], "");
    let before = rss_kb(s.pid());
    python_client(&[], "deflate", &["bomb", &host, &port, "20"], "");
    let after = rss_kb(s.pid());
    // 20 bombs of 64 MiB each: what the server kept is its inflate buffer's bounded step,
    // not the bombs.
    assert!(
        after < before + 4096,
        "VmRSS {before} kB -> {after} kB after 20 bombs"
    );
    assert!(
        s.metric("tunegate_connections_closed_total{reason=\"message_too_big\"}") >= 22,
        "{}",
        s.get("/metrics").1
    );
}

/// `tunegate load --deflate`: its connections agree to the extension and inflate what comes
/// compressed (messages padded past the 256-byte threshold), losing nothing; against a server
/// without `--deflate on` every connect fails, and says why.
#[test]
fn load_with_deflate_inflates_every_delivery_and_a_server_without_it_is_named() {
    let s = Server::start(&["--threads", "2", "--deflate", "on"]);
    let run = |addr: std::net::SocketAddr| {
        common::load(
            &format!("ws://{addr}/"),
            &[
                "--deflate",
                "-n",
                "200",
                "--rooms",
                "10:100",
                "--payload",
                "1000",
                "--publish-rate",
                "200",
                "--publish-seconds",
                "1",
            ],
        )
    };
    let o = run(s.addr);
    let r = common::load_whole(&o, 200, "");
    let inflated = r["inflated"].as_u64().unwrap();
    assert!(inflated >= r["received"].as_u64().unwrap(), "{r}");
    let plain = Server::start(&["--threads", "1"]);
    let o = run(plain.addr);
    let r = common::json(&o);
    assert_eq!(common::code(&o), 1, "{r}");
    assert!(
        r.to_string().contains("permessage-deflate not agreed"),
        "{r}"
    );
}

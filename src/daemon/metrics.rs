//! The daemon's own metrics listener (`metrics_listen:`, off by default): the saturation watch's
//! last sample as Prometheus text on `GET /metrics`, whatever the child is (the bundled server
//! or a custom command). Names follow Prometheus's guidelines: base units in the name
//! (`_bytes`), `_total` only on counters, `_ratio` for 0-1 shares; `promtool check metrics`
//! passes on it (tests/daemon.rs).
//!
//! One small HTTP/1.1 exchange per connection (`Connection: close`), the request read with a
//! size cap and a timeout, so a stuck or hostile client costs one task for two seconds.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tuning::host::saturation::{HostSample, Level};

/// The rendered text the listener serves; replaced at each sample.
pub type Page = Arc<Mutex<String>>;

const MAX_REQUEST: usize = 8192;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

/// Starts serving `page` on `addr`; the bound address (port 0 picks one).
pub async fn serve(addr: SocketAddr, page: Page) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            };
            let page = page.clone();
            tokio::spawn(async move {
                let _ = tokio::time::timeout(REQUEST_TIMEOUT, answer(stream, page)).await;
            });
        }
    });
    Ok(bound)
}

async fn answer(mut stream: tokio::net::TcpStream, page: Page) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = stream.read(&mut chunk).await?;
        if n == 0 || buf.len() + n > MAX_REQUEST {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let line = buf.split(|&b| b == b'\r').next().unwrap_or_default();
    let (status, kind, body) = if line.starts_with(b"GET /metrics ") {
        let body = page.lock().map(|p| p.clone()).unwrap_or_default();
        ("200 OK", "text/plain; version=0.0.4; charset=utf-8", body)
    } else {
        (
            "404 Not Found",
            "text/plain; charset=utf-8",
            "tunegate run serves /metrics here\n".to_string(),
        )
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body.as_bytes()).await?;
    stream.shutdown().await
}

/// One family: HELP, TYPE and samples (label text, value).
fn family(s: &mut String, name: &str, kind: &str, help: &str, samples: &[(String, f64)]) {
    if samples.is_empty() {
        return;
    }
    let _ = writeln!(
        s,
        "# HELP tunegate_{name} {help}\n# TYPE tunegate_{name} {kind}"
    );
    for (labels, v) in samples {
        let _ = writeln!(s, "tunegate_{name}{labels} {v}");
    }
}

/// `{k="v",...}` with the values escaped as the text format asks.
fn labels(pairs: &[(&str, &str)]) -> String {
    let inner: Vec<String> = pairs
        .iter()
        .map(|(k, v)| {
            let v = v
                .replace('\\', "\\\\")
                .replace('"', "\\\"")
                .replace('\n', "\\n");
            format!("{k}=\"{v}\"")
        })
        .collect();
    format!("{{{}}}", inner.join(","))
}

/// The page for one sample.
pub fn render(host: &HostSample, levels: &[Level]) -> String {
    let mut s = String::new();
    family(
        &mut s,
        "saturation_ratio",
        "gauge",
        "Share of its limit each watched resource uses (0-1); see the resource's own gauges for the figures.",
        &levels
            .iter()
            .map(|l| (labels(&[("resource", &l.id)]), l.ratio()))
            .collect::<Vec<_>>(),
    );
    process_families(&mut s, levels);
    tcp_families(&mut s, host, levels);
    limit_families(&mut s, host, levels);
    s
}

/// Per server process: descriptors and accept queues.
fn process_families(s: &mut String, levels: &[Level]) {
    let per = |prefix: &str, limit: bool| -> Vec<(String, f64)> {
        levels
            .iter()
            .filter_map(|l| {
                // The whole server's sum is a ratio only: its own figures are the workers'.
                let rest = l.id.strip_prefix(prefix).filter(|r| *r != "server")?;
                let v = if limit { l.limit } else { l.used };
                Some(match rest.rsplit_once('.') {
                    Some((process, port)) if prefix == "accept_queue." => {
                        (labels(&[("process", process), ("port", port)]), v as f64)
                    }
                    _ => (labels(&[("process", rest)]), v as f64),
                })
            })
            .collect()
    };
    family(
        s,
        "process_open_fds",
        "gauge",
        "Descriptors each server process holds.",
        &per("descriptors.", false),
    );
    family(
        s,
        "process_max_fds",
        "gauge",
        "Each server process's soft RLIMIT_NOFILE.",
        &per("descriptors.", true),
    );
    family(
        s,
        "listen_queue_length",
        "gauge",
        "Connections waiting in each server process's fullest accept queue per port.",
        &per("accept_queue.", false),
    );
    family(
        s,
        "listen_queue_limit",
        "gauge",
        "That accept queue's limit: min(listen() backlog, net.core.somaxconn).",
        &per("accept_queue.", true),
    );
}

/// TCP sockets and memory (this network namespace; memory host-wide).
fn tcp_families(s: &mut String, host: &HostSample, levels: &[Level]) {
    let one = |v: u64| vec![(String::new(), v as f64)];
    let by_id = |id: &str| levels.iter().find(|l| l.id == id);
    family(
        s,
        "tcp_sockets",
        "gauge",
        "TCP sockets in this network namespace, by state (/proc/net/sockstat, IPv4 and IPv6 in use).",
        &[
            (labels(&[("state", "inuse")]), host.tcp_inuse as f64),
            (labels(&[("state", "orphan")]), host.tcp_orphans as f64),
            (labels(&[("state", "time_wait")]), host.tcp_time_wait as f64),
        ],
    );
    if let Some(marks) = host.tcp_mem_marks_bytes {
        family(
            s,
            "tcp_memory_bytes",
            "gauge",
            "Memory the kernel's TCP stack holds (host-wide).",
            &one(host.tcp_memory_bytes),
        );
        family(
            s,
            "tcp_mem_threshold_bytes",
            "gauge",
            "net.ipv4.tcp_mem's marks in bytes: low, pressure (buffers start to shrink), high (allocations fail).",
            &[
                (labels(&[("mark", "low")]), marks[0] as f64),
                (labels(&[("mark", "pressure")]), marks[1] as f64),
                (labels(&[("mark", "high")]), marks[2] as f64),
            ],
        );
    }
    if let Some(l) = by_id("tcp_orphans") {
        family(
            s,
            "tcp_max_orphans",
            "gauge",
            "net.ipv4.tcp_max_orphans.",
            &one(l.limit),
        );
    }
    if let Some(l) = by_id("tcp_time_wait") {
        family(
            s,
            "tcp_max_tw_buckets",
            "gauge",
            "net.ipv4.tcp_max_tw_buckets.",
            &one(l.limit),
        );
    }
}

/// Files, conntrack, ephemeral ports and the kernel's drop counters.
fn limit_families(s: &mut String, host: &HostSample, levels: &[Level]) {
    let one = |v: u64| vec![(String::new(), v as f64)];
    let by_id = |id: &str| levels.iter().find(|l| l.id == id);
    let gauge_of =
        |s: &mut String, id: &str, used: &str, limit: &str, help_used: &str, help_limit: &str| {
            if let Some(l) = by_id(id) {
                family(s, used, "gauge", help_used, &one(l.used));
                family(s, limit, "gauge", help_limit, &one(l.limit));
            }
        };
    gauge_of(
        s,
        "files",
        "files_open",
        "files_max",
        "Open files on the host (first field of fs.file-nr).",
        "fs.file-max.",
    );
    gauge_of(
        s,
        "conntrack",
        "conntrack_entries",
        "conntrack_entries_limit",
        "Connection-tracking entries (net.netfilter.nf_conntrack_count).",
        "net.netfilter.nf_conntrack_max.",
    );
    gauge_of(
        s,
        "ephemeral_ports",
        "ephemeral_ports_in_use",
        "ephemeral_ports_usable",
        "Local ports in use towards the busiest (source address, destination) pair.",
        "Ports of net.ipv4.ip_local_port_range not in ip_local_reserved_ports: the most one pair can use.",
    );
    family(
        s,
        "tcp_listen_overflows_total",
        "counter",
        "Times a listener's accept queue was full (TcpExt ListenOverflows).",
        &one(host.drops.listen_overflows),
    );
    family(
        s,
        "tcp_listen_drops_total",
        "counter",
        "Connection requests dropped at listeners (TcpExt ListenDrops).",
        &one(host.drops.listen_drops),
    );
    family(
        s,
        "tcp_backlog_drops_total",
        "counter",
        "Segments dropped because a socket's backlog was full (TcpExt TCPBacklogDrop).",
        &one(host.drops.backlog_drops),
    );
}

//! What a Redis server says about itself, for the preflight check of a cross-host bus: is it
//! reachable, which version, is it a cluster member and is the cluster whole. Read-only
//! commands (`INFO server`, `INFO cluster`, `CLUSTER INFO`, after `AUTH` when the bus has a
//! password) over TCP or TLS with timeouts, in RESP2: a probe, not a client, so it changes
//! nothing on the server.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// How long the probe may take per node: connect, and each answer.
const TIMEOUT: Duration = Duration::from_secs(2);

/// What one node said.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeFacts {
    /// `redis_version` from INFO server, e.g. "7.0.15".
    pub version: String,
    /// `cluster_enabled:1` in INFO (the node runs in cluster mode).
    pub cluster_enabled: bool,
    /// `cluster_state` from CLUSTER INFO ("ok", "fail"), when in cluster mode.
    pub cluster_state: Option<String>,
    /// `cluster_slots_ok` of 16384, when in cluster mode.
    pub slots_ok: Option<u32>,
    /// `cluster_known_nodes`, when in cluster mode.
    pub known_nodes: Option<u32>,
}

/// How to reach the nodes: TLS or not, and who we are to them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Access {
    pub tls: bool,
    /// With TLS: the CA certificates (PEM) to trust instead of the system's.
    pub ca_file: Option<PathBuf>,
    pub username: Option<String>,
    pub password: Option<String>,
}

/// Asks the node at `addr` (HOST:PORT). The error says what went wrong, in a person's words
/// (never the password).
pub fn probe(addr: &str, access: &Access) -> Result<NodeFacts, String> {
    let sock = addr
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {addr}: {e}"))?
        .next()
        .ok_or_else(|| format!("{addr} resolves to no address"))?;
    let tcp = TcpStream::connect_timeout(&sock, TIMEOUT)
        .map_err(|e| format!("cannot connect to {addr}: {e}"))?;
    let _ = tcp.set_read_timeout(Some(TIMEOUT));
    let _ = tcp.set_write_timeout(Some(TIMEOUT));
    let stream: Box<dyn Stream> = match access.tls {
        true => Box::new(tls(addr, tcp, access)?),
        false => Box::new(tcp),
    };
    let mut conn = Conn {
        stream: BufReader::new(stream),
    };
    if let Some(password) = &access.password {
        let mut auth = vec!["AUTH"];
        auth.extend(access.username.as_deref());
        auth.push(password);
        conn.command(&auth)?;
    }
    let info = conn.command(&["INFO", "server"])?;
    let mut facts = NodeFacts {
        version: field(&info, "redis_version").unwrap_or_default(),
        ..NodeFacts::default()
    };
    let cluster = conn.command(&["INFO", "cluster"])?;
    facts.cluster_enabled = field(&cluster, "cluster_enabled").as_deref() == Some("1");
    if facts.cluster_enabled {
        let ci = conn.command(&["CLUSTER", "INFO"])?;
        facts.cluster_state = field(&ci, "cluster_state");
        facts.slots_ok = field(&ci, "cluster_slots_ok").and_then(|v| v.parse().ok());
        facts.known_nodes = field(&ci, "cluster_known_nodes").and_then(|v| v.parse().ok());
    }
    Ok(facts)
}

/// `name:value` from an INFO-style text.
fn field(text: &str, name: &str) -> Option<String> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
        .map(|v| v.trim().to_string())
}

/// A TLS session over `tcp`, checking the node's certificate against the system's roots or
/// the CA file.
fn tls(
    addr: &str,
    tcp: TcpStream,
    access: &Access,
) -> Result<rustls::StreamOwned<rustls::ClientConnection, TcpStream>, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, ServerName};
    let mut roots = rustls::RootCertStore::empty();
    match &access.ca_file {
        Some(path) => {
            let bad = |e: &dyn std::fmt::Display| format!("CA file {}: {e}", path.display());
            for cert in CertificateDer::pem_file_iter(path).map_err(|e| bad(&e))? {
                roots.add(cert.map_err(|e| bad(&e))?).map_err(|e| bad(&e))?;
            }
        }
        None => {
            roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
        }
    }
    if roots.is_empty() {
        return Err("no CA certificate to check the node's TLS certificate against".into());
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS setup: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let name = ServerName::try_from(host.to_string())
        .map_err(|_| format!("{host:?} is not a name TLS can check"))?;
    let session = rustls::ClientConnection::new(Arc::new(config), name)
        .map_err(|e| format!("TLS setup: {e}"))?;
    Ok(rustls::StreamOwned::new(session, tcp))
}

/// A byte stream to a node: TCP, or TLS over TCP.
trait Stream: Read + Write {}
impl<T: Read + Write> Stream for T {}

struct Conn {
    stream: BufReader<Box<dyn Stream>>,
}

impl Conn {
    /// Sends one command; its bulk-string answer (an error reply becomes `Err`). Errors name
    /// the command, never its arguments after AUTH.
    fn command(&mut self, args: &[&str]) -> Result<String, String> {
        let mut req = format!("*{}\r\n", args.len());
        for a in args {
            req.push_str(&format!("${}\r\n{a}\r\n", a.len()));
        }
        let said = match args[0] {
            "AUTH" => "AUTH".to_string(),
            _ => args.join(" "),
        };
        let sent = self.stream.get_mut().write_all(req.as_bytes());
        sent.and_then(|()| self.stream.get_mut().flush())
            .map_err(|e| format!("cannot send {said}: {e}"))?;
        let mut line = String::new();
        self.stream
            .read_line(&mut line)
            .map_err(|e| format!("no answer to {said}: {e}"))?;
        let line = line.trim_end();
        match line.as_bytes().first() {
            Some(b'$') => {
                let len: usize = line[1..]
                    .parse()
                    .map_err(|_| format!("a bulk string of length {:?}", &line[1..]))?;
                let mut body = vec![0u8; len + 2];
                self.stream
                    .read_exact(&mut body)
                    .map_err(|e| format!("a short answer to {said}: {e}"))?;
                body.truncate(len);
                String::from_utf8(body).map_err(|_| "an answer that is not text".into())
            }
            Some(b'-') => Err(format!("{said} answered: {}", &line[1..])),
            Some(b'+') => Ok(line[1..].to_string()),
            _ => Err(format!("not a Redis answer: {line:?}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake node that answers the probe's commands with `answers`, in order.
    fn fake(answers: Vec<String>) -> String {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        std::thread::spawn(move || {
            let (s, _) = listener.accept().unwrap();
            let mut r = BufReader::new(s.try_clone().unwrap());
            let mut w = s;
            for a in answers {
                // Each request: *N, then N pairs of lines ($len, the argument).
                let mut line = String::new();
                r.read_line(&mut line).unwrap();
                let n: usize = line.trim()[1..].parse().unwrap();
                for _ in 0..2 * n {
                    line.clear();
                    r.read_line(&mut line).unwrap();
                }
                w.write_all(a.as_bytes()).unwrap();
            }
        });
        addr
    }

    fn bulk(text: &str) -> String {
        format!("${}\r\n{text}\r\n", text.len())
    }

    #[test]
    fn a_cluster_node_reports_version_state_and_slots() {
        let answers = vec![
            bulk("# Server\r\nredis_version:7.0.15\r\nredis_mode:cluster\r\n"),
            bulk("# Cluster\r\ncluster_enabled:1\r\n"),
            bulk("cluster_state:ok\r\ncluster_slots_ok:16384\r\ncluster_known_nodes:6\r\n"),
        ];
        let facts = probe(&fake(answers), &Access::default()).unwrap();
        assert_eq!(
            facts,
            NodeFacts {
                version: "7.0.15".into(),
                cluster_enabled: true,
                cluster_state: Some("ok".into()),
                slots_ok: Some(16384),
                known_nodes: Some(6),
            }
        );
    }

    #[test]
    fn errors_say_what_went_wrong() {
        let e = probe("127.0.0.1:1", &Access::default()).unwrap_err();
        assert!(e.starts_with("cannot connect to 127.0.0.1:1"), "{e}");
        let auth = vec!["-NOAUTH Authentication required.\r\n".to_string()];
        let e = probe(&fake(auth), &Access::default()).unwrap_err();
        assert_eq!(e, "INFO server answered: NOAUTH Authentication required.");
        // A wrong password is named as such, and the password is not repeated.
        let wrong = vec!["-WRONGPASS invalid username-password pair\r\n".to_string()];
        let access = Access {
            password: Some("s3cret".into()),
            ..Access::default()
        };
        let e = probe(&fake(wrong), &access).unwrap_err();
        assert_eq!(e, "AUTH answered: WRONGPASS invalid username-password pair");
    }
}

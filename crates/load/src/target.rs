//! Where the connections go: each target URL parsed once (an IP address, or a name resolved
//! once at start), and how connections are spread over several.

use std::net::SocketAddr;

/// Where to connect: the address, the Host header, the request path, and whether over TLS.
#[derive(Clone, Debug)]
pub struct Target {
    pub addr: SocketAddr,
    pub host: String,
    pub path: String,
    pub tls: bool,
    /// The DNS name the URL gave, if it gave one (TLS checks the certificate against it).
    pub name: Option<String>,
}

impl Target {
    /// `ws://IP:PORT/PATH` (IPv6 as `ws://[::1]:PORT/PATH`); with the MsgPack encoding
    /// `encoding=msgpack` is added to the query, so even the first message (hello) comes as
    /// MsgPack.
    pub fn parse(url: &str, msgpack: bool) -> Result<Target, String> {
        let (rest, tls) = match (url.strip_prefix("ws://"), url.strip_prefix("wss://")) {
            (Some(rest), _) => (rest, false),
            (_, Some(rest)) => (rest, true),
            _ => return Err(format!("{url:?}: only ws:// and wss:// URLs are supported")),
        };
        let (hostport, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        };
        let (addr, name) = match hostport.parse::<SocketAddr>() {
            Ok(addr) => (addr, None),
            Err(_) => resolve(url, hostport, tls)?,
        };
        let mut path = path.to_string();
        if msgpack && !path.contains("encoding=msgpack") {
            path.push(if path.contains('?') { '&' } else { '?' });
            path.push_str("encoding=msgpack");
        }
        Ok(Target {
            addr,
            host: hostport.to_string(),
            path,
            tls,
            name,
        })
    }
}

/// `NAME[:PORT]` (the port 80 or 443 by default) resolved once, here, not per connection: the
/// first IPv4 address the resolver gives, else the first (a name that resolves to 127.0.0.1
/// and ::1, as localhost does, is reached over the one a server on 127.0.0.1 listens on).
fn resolve(url: &str, hostport: &str, tls: bool) -> Result<(SocketAddr, Option<String>), String> {
    use std::net::ToSocketAddrs;
    let (name, port) = match hostport.rsplit_once(':') {
        Some((name, port)) => {
            let port = port
                .parse::<u16>()
                .map_err(|_| format!("{url:?}: {port:?} is not a port"))?;
            (name, port)
        }
        None => (hostport, if tls { 443 } else { 80 }),
    };
    if name.is_empty() || name.starts_with('[') {
        return Err(format!(
            "{url:?}: expected ws://HOST:PORT/PATH (IPv6 as [ADDRESS]:PORT)"
        ));
    }
    let all: Vec<SocketAddr> = (name, port)
        .to_socket_addrs()
        .map_err(|e| format!("{url:?}: {name} does not resolve: {e}"))?
        .collect();
    let addr = all
        .iter()
        .find(|a| a.is_ipv4())
        .or(all.first())
        .copied()
        .ok_or_else(|| format!("{url:?}: {name} resolves to no address"))?;
    Ok((addr, Some(name.to_string())))
}

/// Every target: the hosts of one service (joined by `--bus`). Connections are spread over them
/// as a load balancer would, by a hash of their global index: the same plan in every process,
/// and the members of a room land on hosts independently of one another.
#[derive(Clone, Debug)]
pub struct Targets(Vec<Target>);

impl Targets {
    /// `URL[,URL...]`, each as `Target::parse` takes it.
    pub fn parse(urls: &str, msgpack: bool) -> Result<Targets, String> {
        let all = urls
            .split(',')
            .map(|u| Target::parse(u.trim(), msgpack))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Targets(all))
    }

    /// The target of connection `global`.
    pub fn of(&self, global: u64) -> &Target {
        let h = global.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32;
        &self.0[(h % self.0.len() as u64) as usize]
    }

    /// Whether any target is wss://.
    pub fn tls(&self) -> bool {
        self.0.iter().any(|t| t.tls)
    }

    /// Whether every target is on IPv4 loopback (source addresses are then spread over
    /// 127.0.0.2 onwards, `--source`; IPv6 loopback is the one address ::1).
    pub fn loopback(&self) -> bool {
        self.0
            .iter()
            .all(|t| t.addr.is_ipv4() && t.addr.ip().is_loopback())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets() {
        let t = Target::parse("ws://127.0.0.1:8080/chat", false).unwrap();
        assert_eq!(t.addr, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(
            (t.host.as_str(), t.path.as_str()),
            ("127.0.0.1:8080", "/chat")
        );
        let t = Target::parse("ws://127.0.0.1:8080", true).unwrap();
        assert_eq!(t.path, "/?encoding=msgpack");
        assert!(Target::parse("wss://127.0.0.1:1/", false).unwrap().tls);
        assert!(!Target::parse("ws://127.0.0.1:1/", false).unwrap().tls);
        assert!(Target::parse("http://127.0.0.1:1/", false).is_err());
        // A name resolves once, to IPv4 first; the Host header and TLS keep the name.
        let t = Target::parse("ws://localhost:1/", false).unwrap();
        assert_eq!(t.addr, "127.0.0.1:1".parse().unwrap());
        assert_eq!(
            (t.host.as_str(), t.name.as_deref()),
            ("localhost:1", Some("localhost"))
        );
        assert_eq!(
            Target::parse("wss://localhost/", false)
                .unwrap()
                .addr
                .port(),
            443
        );
        let e = Target::parse("ws://no-such-host.invalid:1/", false).unwrap_err();
        assert!(e.contains("no-such-host.invalid does not resolve"), "{e}");
        let e = Target::parse("ws://localhost:http/", false).unwrap_err();
        assert!(e.contains("\"http\" is not a port"), "{e}");
        let t = Targets::parse("ws://[::1]:8080/x", false).unwrap();
        assert_eq!(t.of(0).addr, "[::1]:8080".parse().unwrap());
        assert_eq!(
            t.of(0).host,
            "[::1]:8080",
            "the Host header keeps the brackets"
        );
        assert!(!t.loopback(), "no source spreading over IPv6 loopback");
    }

    #[test]
    fn several_targets_share_the_connections_like_a_balancer() {
        let t = Targets::parse("ws://127.0.0.11:9101/,ws://127.0.0.12:9101/", false).unwrap();
        assert!(t.loopback());
        let on_first = (0..10_000u64)
            .filter(|&i| t.of(i).addr.ip().to_string() == "127.0.0.11")
            .count();
        assert!((4_500..5_500).contains(&on_first), "{on_first}");
        // Consecutive connections (one room, with --rooms N) do not all land on one host.
        let hosts: std::collections::HashSet<_> = (0..10).map(|i| t.of(i).addr).collect();
        assert_eq!(hosts.len(), 2);
        assert!(Targets::parse("ws://127.0.0.1:1/,http://x", false).is_err());
    }
}

//! The `--bus` value: `redis://[USER@]HOST:PORT[,HOST:PORT...]` (`rediss://` for TLS), seed
//! nodes of a Redis Cluster (any few of its nodes; the rest of the topology is discovered from
//! them).

/// Where the cluster is, and who we are to it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Seeds {
    pub nodes: Vec<(String, u16)>,
    pub username: Option<String>,
    /// `rediss://`: every connection, to the seeds and to the nodes they name, is TLS.
    pub tls: bool,
}

/// Parses a `--bus` value; the error says what is wrong in the flag's terms.
pub fn parse(url: &str) -> Result<Seeds, String> {
    let bad = |why: &str| format!("--bus {url:?}: {why}");
    let (rest, tls) = if let Some(rest) = url.strip_prefix("redis://") {
        (rest, false)
    } else if let Some(rest) = url.strip_prefix("rediss://") {
        (rest, true)
    } else {
        return Err(bad(
            "expected redis://HOST:PORT[,HOST:PORT...] (or rediss:// for TLS)",
        ));
    };
    let (username, hosts) = match rest.rsplit_once('@') {
        Some((user, _)) if user.contains(':') => {
            return Err(bad(
                "a password does not belong in the URL (it would show in ps and in the \
                 configuration); put it in a file and pass --bus-password-file",
            ));
        }
        Some((user, hosts)) if !user.is_empty() => (Some(user.to_string()), hosts),
        Some(_) => return Err(bad("empty user name before @")),
        None => (None, rest),
    };
    let hosts = hosts.trim_end_matches('/');
    let mut nodes = Vec::new();
    for seed in hosts.split(',') {
        let (host, port) = seed
            .rsplit_once(':')
            .ok_or_else(|| bad(&format!("seed {seed:?} has no :PORT")))?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let port: u16 = port
            .parse()
            .ok()
            .filter(|&p| p > 0)
            .ok_or_else(|| bad(&format!("seed {seed:?}: the port must be 1..=65535")))?;
        if host.is_empty() {
            return Err(bad(&format!("seed {seed:?} has no host")));
        }
        nodes.push((host.to_string(), port));
    }
    Ok(Seeds {
        nodes,
        username,
        tls,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_users_and_ipv6_parse() {
        let s = parse("redis://127.0.0.1:7000,127.0.0.1:7001").unwrap();
        assert_eq!(
            s.nodes,
            vec![("127.0.0.1".into(), 7000), ("127.0.0.1".into(), 7001)]
        );
        assert_eq!((s.username, s.tls), (None, false));
        let s = parse("rediss://relay@[::1]:7000/").unwrap();
        assert_eq!(s.nodes, vec![("::1".into(), 7000)]);
        assert_eq!(s.username.as_deref(), Some("relay"));
        assert!(s.tls);
    }

    #[test]
    fn bad_values_say_what_is_wrong() {
        for (url, says) in [
            ("http://h:1", "expected redis://"),
            ("redis://u:secret@h:1", "--bus-password-file"),
            ("redis://h", "no :PORT"),
            ("redis://h:0", "1..=65535"),
            ("redis://h:1,:2", "no host"),
            ("redis://@h:1", "empty user"),
        ] {
            let e = parse(url).unwrap_err();
            assert!(e.contains(says), "{url}: {e}");
        }
    }
}

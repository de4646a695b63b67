//! Who is at the other end of a connection, and whether one more connection from there is
//! admitted.
//!
//! Behind nginx every connection comes from the proxy's address, so the client's own address
//! has to come from the headers the proxy adds (`X-Forwarded-For`, `X-Real-IP`). Those headers
//! are just text any client can send, so they are believed only from peers the operator named
//! with `--trusted-proxy`; from anyone else they are ignored (and counted, because a proxy
//! that was forgotten in that list makes every client look like the proxy).
//!
//! `X-Forwarded-For` is read from the right: each proxy appends the address it saw, so the
//! rightmost entry that is not a trusted proxy is the first hop nobody trusted vouched for, the
//! client. Entries to its left were written by the client itself and are never used. Without a
//! usable `X-Forwarded-For` (nginx's `X-Real-IP $remote_addr` alone), `X-Real-IP` is taken.
//!
//! The per-address limit counts open WebSocket connections per client address in one worker
//! process (all its loops share one table). IPv6 clients count per /64: one host can hold a
//! whole /64, so counting single addresses would limit nothing.

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::str::FromStr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use super::limits::{Bucket, Clock};

/// Entries of `X-Forwarded-For` kept (the rightmost ones): more hops than this in front of a
/// server is not a deployment, and the request's size is bounded anyway.
const MAX_HOPS: usize = 16;

/// An address or a network: `ADDR` or `ADDR/BITS`, IPv4 or IPv6.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Cidr {
    net: IpAddr,
    bits: u8,
}

impl Cidr {
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.net, ip.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => prefix(&net.octets(), &ip.octets(), self.bits),
            (IpAddr::V6(net), IpAddr::V6(ip)) => prefix(&net.octets(), &ip.octets(), self.bits),
            _ => false,
        }
    }
}

/// Whether the first `bits` bits of `a` and `b` agree.
fn prefix(a: &[u8], b: &[u8], bits: u8) -> bool {
    let (whole, rest) = ((bits / 8) as usize, bits % 8);
    if a[..whole] != b[..whole] {
        return false;
    }
    rest == 0 || (a[whole] ^ b[whole]) >> (8 - rest) == 0
}

impl FromStr for Cidr {
    type Err = String;

    fn from_str(s: &str) -> Result<Cidr, String> {
        let (addr, bits) = match s.split_once('/') {
            Some((a, b)) => (a, Some(b)),
            None => (s, None),
        };
        let net: IpAddr = addr.parse().map_err(|_| {
            format!("`{s}` is not an address or network (ADDR or ADDR/BITS, e.g. 10.0.0.5 or 10.0.0.0/24)")
        })?;
        let net = net.to_canonical();
        let max = if net.is_ipv4() { 32 } else { 128 };
        let bits = match bits {
            None => max,
            Some(b) => match b.parse::<u8>() {
                Ok(n) if n <= max => n,
                _ => return Err(format!("`{s}`: the prefix length must be 0..={max}")),
            },
        };
        if mask(net, bits) != net {
            return Err(format!(
                "`{s}` has bits set below its /{bits} prefix; write the network (for example {})",
                Cidr {
                    net: mask(net, bits),
                    bits
                }
            ));
        }
        Ok(Cidr { net, bits })
    }
}

/// `ip` with every bit below the first `bits` cleared.
fn mask(ip: IpAddr, bits: u8) -> IpAddr {
    match ip {
        IpAddr::V4(a) => {
            let m = u32::MAX.checked_shl(32 - u32::from(bits)).unwrap_or(0);
            IpAddr::V4((u32::from(a) & m).into())
        }
        IpAddr::V6(a) => {
            let m = u128::MAX.checked_shl(128 - u32::from(bits)).unwrap_or(0);
            IpAddr::V6((u128::from(a) & m).into())
        }
    }
}

impl TryFrom<String> for Cidr {
    type Error = String;
    fn try_from(s: String) -> Result<Cidr, String> {
        s.parse()
    }
}

impl From<Cidr> for String {
    fn from(c: Cidr) -> String {
        c.to_string()
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let max = if self.net.is_ipv4() { 32 } else { 128 };
        if self.bits == max {
            write!(f, "{}", self.net)
        } else {
            write!(f, "{}/{}", self.net, self.bits)
        }
    }
}

/// The forwarding headers of one upgrade request, as parsed (no address believed yet).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Forwarded {
    /// `X-Forwarded-For` entries of every such header in order, leftmost first (at most the
    /// rightmost `MAX_HOPS`); `None` for an entry that is not an address (`unknown`, garbage).
    pub chain: Vec<Option<IpAddr>>,
    /// `X-Real-IP`: absent, or present and maybe an address.
    pub real_ip: Option<Option<IpAddr>>,
}

impl Forwarded {
    pub fn is_empty(&self) -> bool {
        self.chain.is_empty() && self.real_ip.is_none()
    }

    /// Adds one `X-Forwarded-For` header's comma-separated entries.
    pub fn add_forwarded_for(&mut self, value: &[u8]) {
        for entry in value.split(|&b| b == b',') {
            self.chain.push(entry_addr(entry));
        }
        if self.chain.len() > MAX_HOPS {
            self.chain.drain(..self.chain.len() - MAX_HOPS);
        }
    }

    pub fn set_real_ip(&mut self, value: &[u8]) {
        self.real_ip = Some(entry_addr(value));
    }
}

/// One entry: `1.2.3.4`, `2001:db8::1`, and the forms some proxies write with a port,
/// `1.2.3.4:5678` and `[2001:db8::1]:443`.
fn entry_addr(raw: &[u8]) -> Option<IpAddr> {
    let s = std::str::from_utf8(raw).ok()?.trim();
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Some(ip.to_canonical());
    }
    if let Ok(sa) = s.parse::<SocketAddr>() {
        return Some(sa.ip().to_canonical());
    }
    s.strip_prefix('[')?
        .strip_suffix(']')?
        .parse::<Ipv6Addr>()
        .ok()
        .map(|a| IpAddr::V6(a).to_canonical())
}

/// Where a connection's client address came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// The TCP peer itself (no proxy, or a trusted proxy that forwarded nothing usable).
    Peer,
    /// A trusted proxy's header.
    Forwarded,
    /// The peer is not trusted and sent forwarding headers: they were ignored.
    Ignored,
}

/// The client address of a connection from `peer` that sent `fwd`, trusting `trusted`.
pub fn resolve(peer: IpAddr, trusted: &[Cidr], fwd: &Forwarded) -> (IpAddr, Source) {
    let peer = peer.to_canonical();
    let is_trusted = |ip: IpAddr| trusted.iter().any(|c| c.contains(ip));
    if !is_trusted(peer) {
        let source = if fwd.is_empty() {
            Source::Peer
        } else {
            Source::Ignored
        };
        return (peer, source);
    }
    // Right to left: skip the trusted hops; the first other address is the client. An entry
    // that is not an address ends the walk: what is left of it cannot be attributed.
    let mut last_trusted = None;
    for entry in fwd.chain.iter().rev() {
        match entry {
            Some(ip) if is_trusted(*ip) => last_trusted = Some(*ip),
            Some(ip) => return (*ip, Source::Forwarded),
            None => break,
        }
    }
    if let Some(ip) = last_trusted {
        // Every hop was a trusted proxy: the leftmost one is as far as anyone vouched.
        return (ip, Source::Forwarded);
    }
    match fwd.real_ip {
        Some(Some(ip)) => (ip, Source::Forwarded),
        _ => (peer, Source::Peer),
    }
}

/// The key an address is counted under: itself for IPv4, its /64 for IPv6.
pub fn limit_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        v4 @ IpAddr::V4(_) => v4,
        v6 => mask(v6, 64),
    }
}

/// Addresses with an upgrade-rate bucket before the table is first pruned of full buckets; it
/// is pruned again whenever it doubles, so a flood from ever new addresses costs the addresses
/// of about the last second, and each upgrade amortised O(1).
const RATE_TABLE_PRUNE_AT: usize = 4096;

/// Each address's upgrade-rate bucket.
#[derive(Debug, Default)]
struct UpgradeRates {
    buckets: HashMap<IpAddr, Bucket>,
    prune_at: usize,
}

/// What every loop of one process consults at an upgrade: the trusted proxies, the open
/// connections per client address when a limit is set, and each address's upgrade rate.
#[derive(Debug, Default)]
pub struct Admission {
    trusted: Vec<Cidr>,
    /// 0: no limit (and no table).
    limit: u32,
    open: Mutex<HashMap<IpAddr, u32>>,
    /// Upgrades per second per address; 0: no limit (and no table).
    rate: u32,
    upgrades: Mutex<UpgradeRates>,
    clock: Clock,
    told_ignored: AtomicBool,
}

impl Admission {
    pub fn new(trusted: Vec<Cidr>, limit: u32, rate: u32) -> Admission {
        Admission {
            trusted,
            limit,
            rate,
            ..Admission::default()
        }
    }

    /// Whether upgrades need the peer's address at all (otherwise no getpeername is spent).
    pub fn needs_peer(&self) -> bool {
        self.limit > 0 || self.rate > 0 || !self.trusted.is_empty()
    }

    pub fn rate(&self) -> u32 {
        self.rate
    }

    /// One more upgrade from `client`, if its rate allows (always, without a rate). The
    /// table forgets an address once its bucket is full again.
    pub fn upgrade_allowed(&self, client: IpAddr) -> bool {
        if self.rate == 0 {
            return true;
        }
        let now = self.clock.now_ms();
        let mut table = self.upgrades.lock().unwrap_or_else(|p| p.into_inner());
        if table.buckets.len() >= table.prune_at.max(RATE_TABLE_PRUNE_AT) {
            let rate = self.rate;
            table.buckets.retain(|_, b| !b.is_full(rate, rate, now));
            table.prune_at = 2 * table.buckets.len();
        }
        table
            .buckets
            .entry(limit_key(client))
            .or_insert_with(|| Bucket::full(self.rate, now))
            .take(self.rate, self.rate, now)
    }

    pub fn limit(&self) -> u32 {
        self.limit
    }

    pub fn trusted(&self) -> &[Cidr] {
        &self.trusted
    }

    /// True the first time only: the one log line about ignored forwarding headers.
    pub fn first_ignored(&self) -> bool {
        !self.told_ignored.swap(true, Ordering::Relaxed)
    }

    /// Counts one more connection from `client`, or says how many it already has when that is
    /// the limit. Without a limit, always admits (and counts nothing).
    pub fn admit(&self, client: IpAddr) -> Result<(), u32> {
        if self.limit == 0 {
            return Ok(());
        }
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let n = open.entry(limit_key(client)).or_insert(0);
        if *n >= self.limit {
            return Err(*n);
        }
        *n += 1;
        Ok(())
    }

    /// One connection `admit` counted has ended.
    pub fn release(&self, client: IpAddr) {
        if self.limit == 0 {
            return;
        }
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let key = limit_key(client);
        if let Some(n) = open.get_mut(&key) {
            *n -= 1;
            if *n == 0 {
                open.remove(&key);
            }
        }
    }

    /// Client addresses (IPv6: /64s) holding at least one connection: the tests' view that an
    /// address with nothing open is forgotten, so the table never outgrows the connections.
    #[cfg(test)]
    fn addresses(&self) -> usize {
        self.open.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn cidrs(list: &[&str]) -> Vec<Cidr> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    fn fwd(xff: &[&str], real: Option<&str>) -> Forwarded {
        let mut f = Forwarded::default();
        for h in xff {
            f.add_forwarded_for(h.as_bytes());
        }
        if let Some(r) = real {
            f.set_real_ip(r.as_bytes());
        }
        f
    }

    #[test]
    fn networks_parse_print_and_match() {
        let c: Cidr = "10.1.0.0/16".parse().unwrap();
        assert!(c.contains(ip("10.1.200.3")));
        assert!(!c.contains(ip("10.2.0.1")));
        assert!(
            c.contains(ip("::ffff:10.1.0.9")),
            "v4-mapped peers match v4 networks"
        );
        assert_eq!(c.to_string(), "10.1.0.0/16");
        assert_eq!(
            "127.0.0.1".parse::<Cidr>().unwrap().to_string(),
            "127.0.0.1"
        );
        let c6: Cidr = "2001:db8::/32".parse().unwrap();
        assert!(c6.contains(ip("2001:db8:ffff::1")));
        assert!(!c6.contains(ip("2001:db9::1")));
        assert!(!c6.contains(ip("10.0.0.1")));
        assert!("0.0.0.0/0".parse::<Cidr>().unwrap().contains(ip("8.8.8.8")));
        assert!(
            "10.0.0.0/12"
                .parse::<Cidr>()
                .unwrap()
                .contains(ip("10.15.255.255"))
        );
        assert!(
            !"10.0.0.0/12"
                .parse::<Cidr>()
                .unwrap()
                .contains(ip("10.16.0.0"))
        );
        for bad in ["10.0.0.1/33", "nginx", "10.0.0.1/", "::1/129", "10.0.0.0/x"] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad}");
        }
        let e = "10.0.0.5/24".parse::<Cidr>().unwrap_err();
        assert!(e.contains("10.0.0.0/24"), "{e}");
    }

    #[test]
    fn headers_from_an_untrusted_peer_are_ignored() {
        let t = cidrs(&["127.0.0.1"]);
        let f = fwd(&["9.9.9.9"], Some("9.9.9.9"));
        assert_eq!(
            resolve(ip("127.0.0.7"), &t, &f),
            (ip("127.0.0.7"), Source::Ignored)
        );
        assert_eq!(
            resolve(ip("127.0.0.7"), &[], &Forwarded::default()),
            (ip("127.0.0.7"), Source::Peer)
        );
    }

    #[test]
    fn the_rightmost_untrusted_hop_is_the_client() {
        let t = cidrs(&["127.0.0.1", "10.0.0.0/8"]);
        let peer = ip("127.0.0.1");
        // What nginx sends for a client that forged its own header.
        let f = fwd(&["6.6.6.6, 203.0.113.9"], Some("203.0.113.9"));
        assert_eq!(
            resolve(peer, &t, &f),
            (ip("203.0.113.9"), Source::Forwarded)
        );
        // Two proxies of ours (10.x, then the peer): both skipped.
        let f = fwd(&["6.6.6.6", "198.51.100.4, 10.0.0.3"], None);
        assert_eq!(
            resolve(peer, &t, &f),
            (ip("198.51.100.4"), Source::Forwarded)
        );
        // Only trusted hops: the leftmost one.
        let f = fwd(&["10.0.0.8, 10.0.0.3"], None);
        assert_eq!(resolve(peer, &t, &f), (ip("10.0.0.8"), Source::Forwarded));
        // Ports and brackets as some proxies write them.
        let f = fwd(&["[2001:db8::7]:443"], None);
        assert_eq!(
            resolve(peer, &t, &f),
            (ip("2001:db8::7"), Source::Forwarded)
        );
        let f = fwd(&["198.51.100.4:5000"], None);
        assert_eq!(
            resolve(peer, &t, &f),
            (ip("198.51.100.4"), Source::Forwarded)
        );
    }

    #[test]
    fn garbage_stops_the_walk_and_x_real_ip_is_the_fallback() {
        let t = cidrs(&["127.0.0.1"]);
        let peer = ip("127.0.0.1");
        let f = fwd(&["198.51.100.4, unknown"], Some("203.0.113.1"));
        assert_eq!(
            resolve(peer, &t, &f),
            (ip("203.0.113.1"), Source::Forwarded)
        );
        let f = fwd(&["198.51.100.4, unknown"], None);
        assert_eq!(resolve(peer, &t, &f), (peer, Source::Peer));
        let f = fwd(&[], Some("203.0.113.1"));
        assert_eq!(
            resolve(peer, &t, &f),
            (ip("203.0.113.1"), Source::Forwarded)
        );
        let f = fwd(&[], Some("not-an-address"));
        assert_eq!(resolve(peer, &t, &f), (peer, Source::Peer));
    }

    #[test]
    fn the_limit_counts_per_address_and_per_ipv6_64() {
        let a = Admission::new(Vec::new(), 2, 0);
        assert_eq!(a.admit(ip("198.51.100.1")), Ok(()));
        assert_eq!(a.admit(ip("198.51.100.1")), Ok(()));
        assert_eq!(a.admit(ip("198.51.100.1")), Err(2));
        assert_eq!(a.admit(ip("198.51.100.2")), Ok(()));
        a.release(ip("198.51.100.1"));
        assert_eq!(a.admit(ip("198.51.100.1")), Ok(()));
        assert_eq!(a.admit(ip("2001:db8:1:2::1")), Ok(()));
        assert_eq!(a.admit(ip("2001:db8:1:2:ffff::9")), Ok(()));
        assert_eq!(a.admit(ip("2001:db8:1:2::3")), Err(2), "the same /64");
        assert_eq!(a.admit(ip("2001:db8:1:3::1")), Ok(()));
        assert_eq!(a.addresses(), 4);
        for _ in 0..2 {
            a.release(ip("2001:db8:1:2::1"));
        }
        assert_eq!(
            a.addresses(),
            3,
            "an address with nothing open is forgotten"
        );
        let none = Admission::new(Vec::new(), 0, 0);
        for _ in 0..100 {
            assert_eq!(none.admit(ip("198.51.100.1")), Ok(()));
        }
        assert_eq!(none.addresses(), 0);
        assert!((0..100).all(|_| none.upgrade_allowed(ip("198.51.100.1"))));
    }

    #[test]
    fn the_upgrade_rate_is_per_address_and_per_ipv6_64_and_forgets_quiet_addresses() {
        let a = Admission::new(Vec::new(), 0, 3);
        assert!(a.needs_peer());
        assert!((0..3).all(|_| a.upgrade_allowed(ip("198.51.100.1"))));
        assert!(
            !a.upgrade_allowed(ip("198.51.100.1")),
            "a 4th in the same second"
        );
        assert!(
            a.upgrade_allowed(ip("198.51.100.2")),
            "another address has its own"
        );
        assert!((0..3).all(|_| a.upgrade_allowed(ip("2001:db8:1:2::1"))));
        assert!(!a.upgrade_allowed(ip("2001:db8:1:2::99")), "the same /64");
        // Floods from ever new addresses: the table is pruned of full buckets as it doubles,
        // so the first flood's addresses are forgotten during the second, a second later.
        let flood = |base: u32| {
            for i in 0..3 * RATE_TABLE_PRUNE_AT as u32 {
                let addr = IpAddr::from(std::net::Ipv4Addr::from(base + i));
                assert!(a.upgrade_allowed(addr));
            }
        };
        flood(0x0A00_0000);
        std::thread::sleep(std::time::Duration::from_millis(1100));
        assert!(
            a.upgrade_allowed(ip("198.51.100.1")),
            "refilled after a second"
        );
        flood(0x0B00_0000);
        let table = a.upgrades.lock().unwrap();
        assert!(!table.buckets.contains_key(&ip("10.0.0.0")));
        assert!(
            table.buckets.len() <= 3 * RATE_TABLE_PRUNE_AT + 1,
            "{}",
            table.buckets.len()
        );
    }

    proptest! {
        #[test]
        fn any_header_bytes_resolve_to_the_peer_or_an_address_they_contain(
            xff in proptest::collection::vec(any::<u8>(), 0..200),
            real in proptest::collection::vec(any::<u8>(), 0..60),
        ) {
            let t = cidrs(&["127.0.0.1"]);
            let mut f = Forwarded::default();
            f.add_forwarded_for(&xff);
            f.set_real_ip(&real);
            prop_assert!(f.chain.len() <= MAX_HOPS);
            let (got, _) = resolve(ip("127.0.0.1"), &t, &f);
            let listed = f.chain.iter().flatten().any(|a| *a == got);
            prop_assert!(got == ip("127.0.0.1") || listed || f.real_ip == Some(Some(got)));
        }

        #[test]
        fn a_network_contains_exactly_the_addresses_sharing_its_prefix(
            a in any::<u32>(), b in any::<u32>(), bits in 0u8..=32,
        ) {
            let net = mask(IpAddr::V4(a.into()), bits);
            let c: Cidr = format!("{net}/{bits}").parse().unwrap();
            let shift = 32 - u32::from(bits);
            let same = a.checked_shr(shift).unwrap_or(0) == b.checked_shr(shift).unwrap_or(0);
            prop_assert_eq!(c.contains(IpAddr::V4(b.into())), same);
        }
    }
}

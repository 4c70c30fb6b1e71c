//! Who a client is by address: the peer of its connection, or, behind a
//! trusted proxy, the address that proxy says it forwards for.
//!
//! `X-Forwarded-For` is believed only from `[limits] trusted_proxies`: from
//! anyone else it would let a client pick any address it likes, and with it
//! a fresh set of limits per request. Behind trusted proxies the client is
//! the right-most address that is not itself a trusted proxy (each proxy
//! appends the address it received from, so everything to the left of that
//! could be made up by the client).
//!
//! An address is a limiter key as IPv4 as is and IPv6 by its /64: a single
//! host is routinely given a whole /64, so keying by full IPv6 addresses
//! would give one attacker 2^64 identities.

use std::{
    net::IpAddr,
    sync::atomic::{AtomicBool, Ordering},
};

use ipnet::IpNet;

/// An address as the limits key it: IPv4 as is, IPv6 by its /64. Never 0
/// or 1 (what [`Peer`] uses for exempt peers and proxies).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct AddrKey(u64);

impl AddrKey {
    pub fn of(ip: IpAddr) -> AddrKey {
        match ip.to_canonical() {
            // No IPv6 source address starts with 0xff (multicast), so IPv4
            // keys never meet a /64's.
            IpAddr::V4(v4) => AddrKey(0xFFFF_FFFF_0000_0000 | u64::from(u32::from(v4))),
            // ::/64 and 0:0:0:1::/64 hold no source address but ::1, which
            // takes the key of 0:0:0:2::/64 (not a source address either).
            IpAddr::V6(v6) => AddrKey(((u128::from(v6) >> 64) as u64).max(2)),
        }
    }

    pub fn get(self) -> u64 {
        self.0
    }
}

/// What the front door knows of a connection's peer from the moment it is
/// accepted, kept for the connection's life: one word (every HTTP
/// connection's task holds it). Exempt (in `[limits] exempt` and not a trusted
/// proxy: never limited), a trusted proxy (its requests are keyed by their
/// `X-Forwarded-For`; its own, without one, are not limited: it is trusted),
/// or any other client, keyed by its address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Peer(u64);

impl Peer {
    pub const EXEMPT: Peer = Peer(0);
    pub const PROXY: Peer = Peer(1);

    pub fn addr(key: AddrKey) -> Peer {
        Peer(key.0)
    }

    pub fn is_proxy(self) -> bool {
        self == Peer::PROXY
    }

    /// The client of a connection with no proxy in front (MQTT over TCP):
    /// `None` when not limited.
    pub fn client(self) -> Option<AddrKey> {
        (self.0 > 1).then_some(AddrKey(self.0))
    }
}

/// The trusted proxies and exempt addresses, from `[limits]`.
#[derive(Debug)]
pub struct AddressPolicy {
    trusted: Vec<IpNet>,
    exempt: Vec<IpNet>,
    /// `X-Forwarded-For` from an untrusted peer is worth one warning, not
    /// one per request.
    warned: AtomicBool,
}

impl AddressPolicy {
    pub fn new(trusted: &[String], exempt: &[String]) -> Result<Self, String> {
        Ok(AddressPolicy {
            trusted: parse_all("trusted_proxies", trusted)?,
            exempt: parse_all("exempt", exempt)?,
            warned: AtomicBool::new(false),
        })
    }

    fn is_exempt(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.exempt.iter().any(|n| n.contains(&ip))
    }

    fn is_trusted(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.trusted.iter().any(|n| n.contains(&ip))
    }

    /// Classifies a connection's peer once, when it is accepted.
    pub fn peer(&self, ip: IpAddr) -> Peer {
        if self.is_trusted(ip) {
            Peer::PROXY
        } else if self.is_exempt(ip) {
            Peer::EXEMPT
        } else {
            Peer::addr(AddrKey::of(ip))
        }
    }

    /// The client behind one request on a connection from `peer`, given the
    /// request's `X-Forwarded-For` (every such header, in order): `None`
    /// when that client is exempt.
    pub fn client(&self, peer: Peer, forwarded_for: &[&[u8]]) -> Option<AddrKey> {
        if !peer.is_proxy() {
            return peer.client();
        }
        // Right to left over every listed hop: the first one that is not a
        // trusted proxy is the client. A hop that does not parse ends the
        // walk (nothing to its left can be trusted): the last trusted one
        // made the request, as a request with no header at all.
        let hops = forwarded_for.iter().rev().flat_map(|h| h.rsplit(|b| *b == b','));
        for hop in hops {
            let ip = parse_hop(hop)?;
            if !self.is_trusted(ip) {
                return (!self.is_exempt(ip)).then(|| AddrKey::of(ip));
            }
        }
        None
    }

    /// Called when a request from an untrusted peer carries
    /// `X-Forwarded-For`: warns the first time. (Herald behind a proxy that
    /// is not listed limits every client behind it as one address.)
    pub fn untrusted_forwarding(&self, from: impl FnOnce() -> Option<IpAddr>) {
        if self.warned.swap(true, Ordering::Relaxed) {
            return;
        }
        let from = from().map_or_else(|| "a peer".to_owned(), |ip| ip.to_string());
        tracing::warn!(
            "X-Forwarded-For arrived from {from}, which is not in [limits] trusted_proxies: it is ignored, and \
             limits apply to that peer's own address. If Herald runs behind a proxy, list the proxy's address in \
             [limits] trusted_proxies (HERALD_LIMITS_TRUSTED_PROXIES). This is said once."
        );
    }
}

/// `10.0.0.0/8`, `::1/128`, or a bare address (one host).
fn parse_all(key: &str, list: &[String]) -> Result<Vec<IpNet>, String> {
    list.iter()
        .map(|s| {
            let s = s.trim();
            s.parse::<IpNet>()
                .or_else(|_| s.parse::<IpAddr>().map(IpNet::from))
                .map(|n| match n {
                    // An IPv4 network written in IPv6 form (::ffff:a.b.c.d/n)
                    // matches the IPv4 addresses it means.
                    IpNet::V6(v6) if v6.addr().to_ipv4_mapped().is_some() && v6.prefix_len() >= 96 => {
                        let v4 = v6.addr().to_ipv4_mapped().expect("checked");
                        IpNet::V4(ipnet::Ipv4Net::new(v4, v6.prefix_len() - 96).expect("a prefix of at most 32"))
                    }
                    n => n.trunc(),
                })
                .map_err(|_| format!("[limits] {key}: '{s}' is not an address or a CIDR like 10.0.0.0/8"))
        })
        .collect()
}

/// One `X-Forwarded-For` entry: `1.2.3.4`, `2001:db8::1`, `[2001:db8::1]:443`
/// or `1.2.3.4:5678`.
fn parse_hop(hop: &[u8]) -> Option<IpAddr> {
    let s = std::str::from_utf8(hop).ok()?.trim();
    if let Ok(ip) = s.parse() {
        return Some(ip);
    }
    if let Some(rest) = s.strip_prefix('[') {
        return rest.split_once(']')?.0.parse().ok();
    }
    let (host, port) = s.rsplit_once(':')?;
    port.parse::<u16>().ok()?;
    host.parse::<std::net::Ipv4Addr>().ok().map(IpAddr::V4)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn policy(trusted: &[&str], exempt: &[&str]) -> AddressPolicy {
        let v = |l: &[&str]| l.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        AddressPolicy::new(&v(trusted), &v(exempt)).unwrap()
    }

    #[test]
    fn ipv6_is_keyed_by_its_64_and_ipv4_as_is() {
        assert_eq!(AddrKey::of(ip("2001:db8:1:2::1")), AddrKey::of(ip("2001:db8:1:2:ffff::9")));
        assert_ne!(AddrKey::of(ip("2001:db8:1:2::1")), AddrKey::of(ip("2001:db8:1:3::1")));
        assert_ne!(AddrKey::of(ip("10.0.0.1")), AddrKey::of(ip("10.0.0.2")));
        assert_eq!(AddrKey::of(ip("::ffff:10.0.0.1")), AddrKey::of(ip("10.0.0.1")), "IPv4-mapped is IPv4");
    }

    #[test]
    fn exempt_and_trusted_peers() {
        let p = policy(&["10.1.0.0/16"], &["127.0.0.0/8", "::1/128"]);
        assert_eq!(p.peer(ip("127.0.0.2")), Peer::EXEMPT);
        assert_eq!(p.peer(ip("::1")), Peer::EXEMPT);
        assert_eq!(p.peer(ip("::ffff:127.0.0.1")), Peer::EXEMPT);
        assert_eq!(p.peer(ip("192.0.2.7")), Peer::addr(AddrKey::of(ip("192.0.2.7"))));
        assert_eq!(p.peer(ip("10.1.2.3")), Peer::PROXY);
        assert_eq!(std::mem::size_of::<Peer>(), 8, "one word in every HTTP connection's task");
        assert!(AddressPolicy::new(&["nonsense".into()], &[]).unwrap_err().contains("nonsense"));
        // A bare address is one host; a sloppy CIDR is its network.
        let p = policy(&["10.0.0.9"], &["192.168.1.77/24"]);
        assert!(p.peer(ip("10.0.0.9")).is_proxy());
        assert_eq!(p.peer(ip("10.0.0.10")), Peer::addr(AddrKey::of(ip("10.0.0.10"))));
        assert_eq!(p.peer(ip("192.168.1.3")), Peer::EXEMPT);
    }

    #[test]
    fn forwarded_for_is_believed_from_trusted_proxies_only() {
        let p = policy(&["10.0.0.0/8"], &["127.0.0.0/8"]);
        let key = |s: &str| Some(AddrKey::of(ip(s)));
        let proxy = p.peer(ip("10.0.0.1"));
        // The right-most untrusted hop, across headers and entries.
        assert_eq!(p.client(proxy, &[b"198.51.100.4"]), key("198.51.100.4"));
        assert_eq!(p.client(proxy, &[b"6.6.6.6, 198.51.100.4, 10.0.0.2"]), key("198.51.100.4"));
        assert_eq!(p.client(proxy, &[b"6.6.6.6", b"198.51.100.4 , 10.9.9.9"]), key("198.51.100.4"));
        assert_eq!(p.client(proxy, &[b"[2001:db8::5]:443"]), key("2001:db8::5"));
        assert_eq!(p.client(proxy, &[b"203.0.113.9:5678"]), key("203.0.113.9"));
        // Exempt clients behind the proxy stay exempt.
        assert_eq!(p.client(proxy, &[b"127.0.0.1"]), None);
        // No header, only proxies, or garbage: the (trusted) proxy itself.
        assert_eq!(p.client(proxy, &[]), None);
        assert_eq!(p.client(proxy, &[b"10.0.0.3"]), None);
        assert_eq!(p.client(proxy, &[b"6.6.6.6, unknown"]), None);
        // From anyone else the header changes nothing.
        let direct = p.peer(ip("192.0.2.1"));
        assert_eq!(p.client(direct, &[b"6.6.6.6"]), key("192.0.2.1"));
        assert_eq!(p.client(Peer::EXEMPT, &[b"6.6.6.6"]), None);
    }
}

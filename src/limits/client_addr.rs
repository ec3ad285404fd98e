//! Which address a request comes from.
//!
//! By default it is the TCP peer. Behind a load balancer every peer is the
//! balancer, so the operator may list the proxies it trusts
//! (`CELLGATE_TRUSTED_PROXIES`): only for a peer on that list is
//! `X-Forwarded-For` read, from the right, skipping the trusted proxies it
//! names, and the first address that is not one of them is the client. A
//! client can write anything in that header, so it is never read for a
//! peer that is not trusted.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use http::HeaderMap;
use ipnet::IpNet;

/// The networks whose `X-Forwarded-For` is believed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustedProxies(Vec<IpNet>);

impl TrustedProxies {
    /// Trusts nobody: the peer address is the client.
    pub fn none() -> Self {
        TrustedProxies(Vec::new())
    }

    /// Parses addresses (`10.0.0.7`, `::1`) and networks (`10.0.0.0/8`,
    /// `fd00::/8`); every entry that is neither is named in the error.
    pub fn parse(entries: &[String]) -> Result<Self, Vec<String>> {
        let mut nets = Vec::new();
        let mut bad = Vec::new();
        for entry in entries {
            let entry = entry.trim();
            let parsed = entry
                .parse::<IpNet>()
                .or_else(|_| entry.parse::<IpAddr>().map(IpNet::from));
            match parsed {
                Ok(net) => nets.push(net.trunc()),
                Err(_) => bad.push(entry.to_string()),
            }
        }
        if bad.is_empty() {
            Ok(TrustedProxies(nets))
        } else {
            Err(bad)
        }
    }

    /// Whether any proxy is trusted.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn trusts(&self, ip: IpAddr) -> bool {
        self.0.iter().any(|net| net.contains(&ip))
    }

    /// The client's address for a request from `peer` with `headers`.
    pub fn client(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        let mut client = peer.to_canonical();
        if !self.trusts(client) {
            return client;
        }
        let hops: Vec<&str> = headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .collect();
        for hop in hops.into_iter().rev() {
            let Some(ip) = parse_hop(hop) else {
                // Garbage past a trusted proxy: the proxy is all we know.
                break;
            };
            client = ip;
            if !self.trusts(ip) {
                break;
            }
        }
        client
    }
}

/// One `X-Forwarded-For` entry: an address, maybe with a port
/// (`1.2.3.4:5678`, `[::1]:5678`).
fn parse_hop(hop: &str) -> Option<IpAddr> {
    let hop = hop.trim();
    if let Ok(ip) = hop.parse::<IpAddr>() {
        return Some(ip.to_canonical());
    }
    hop.parse::<SocketAddr>()
        .ok()
        .map(|s| s.ip().to_canonical())
}

/// The rate-limit key of an address: itself for IPv4, its /64 for IPv6
/// (one subscriber usually holds a whole /64, so counting single IPv6
/// addresses would let one client mint millions of keys).
pub fn rate_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V4(v4) => IpAddr::V4(v4),
        IpAddr::V6(v6) => {
            let bits = u128::from(v6) & (u128::MAX << 64);
            IpAddr::V6(Ipv6Addr::from(bits))
        }
    }
}

#[cfg(test)]
mod tests {
    use http::HeaderValue;

    use super::*;

    fn proxies(entries: &[&str]) -> TrustedProxies {
        let entries: Vec<String> = entries.iter().map(|s| s.to_string()).collect();
        TrustedProxies::parse(&entries).unwrap()
    }

    fn forwarded(values: &[&str]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for v in values {
            headers.append("x-forwarded-for", HeaderValue::from_str(v).unwrap());
        }
        headers
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn without_trusted_proxies_the_header_is_ignored() {
        let none = TrustedProxies::none();
        let headers = forwarded(&["203.0.113.9"]);
        assert_eq!(none.client(ip("10.0.0.1"), &headers), ip("10.0.0.1"));
    }

    #[test]
    fn a_peer_that_is_not_trusted_cannot_forge_its_address() {
        let lb = proxies(&["10.0.0.0/8"]);
        let headers = forwarded(&["203.0.113.9"]);
        assert_eq!(lb.client(ip("198.51.100.4"), &headers), ip("198.51.100.4"));
    }

    #[test]
    fn the_rightmost_untrusted_hop_is_the_client() {
        let lb = proxies(&["10.0.0.0/8", "192.168.1.5"]);
        // The client wrote a fake first entry; the proxies appended the rest.
        let headers = forwarded(&["1.1.1.1, 203.0.113.9", "192.168.1.5"]);
        assert_eq!(lb.client(ip("10.1.2.3"), &headers), ip("203.0.113.9"));
    }

    #[test]
    fn ports_brackets_and_mapped_addresses_are_understood() {
        let lb = proxies(&["::1"]);
        assert_eq!(
            lb.client(ip("::1"), &forwarded(&["203.0.113.9:4711"])),
            ip("203.0.113.9")
        );
        assert_eq!(
            lb.client(ip("::1"), &forwarded(&["[2001:db8::7]:443"])),
            ip("2001:db8::7")
        );
        let v4 = proxies(&["127.0.0.1"]);
        assert_eq!(
            v4.client(ip("::ffff:127.0.0.1"), &forwarded(&["::ffff:203.0.113.9"])),
            ip("203.0.113.9")
        );
    }

    #[test]
    fn garbage_or_a_missing_header_leaves_the_last_trusted_hop() {
        let lb = proxies(&["10.0.0.0/8"]);
        assert_eq!(lb.client(ip("10.0.0.2"), &HeaderMap::new()), ip("10.0.0.2"));
        let headers = forwarded(&["203.0.113.9, unknown, 10.0.0.9"]);
        assert_eq!(lb.client(ip("10.0.0.2"), &headers), ip("10.0.0.9"));
    }

    #[test]
    fn every_bad_entry_is_named() {
        let entries = ["10.0.0.0/8", "ten", "::1", "1.2.3.4/40"].map(String::from);
        assert_eq!(
            TrustedProxies::parse(&entries).unwrap_err(),
            vec!["ten".to_string(), "1.2.3.4/40".to_string()]
        );
    }

    #[test]
    fn ipv6_clients_are_counted_by_their_slash_64() {
        assert_eq!(rate_key(ip("2001:db8:1:2:aaaa::1")), ip("2001:db8:1:2::"));
        assert_eq!(rate_key(ip("203.0.113.9")), ip("203.0.113.9"));
        assert_eq!(rate_key(ip("::ffff:203.0.113.9")), ip("203.0.113.9"));
    }
}

//! CIDRs in rules ("10.0.0.0/8", "fd00::/8", a bare address is a host), and the
//! IPv4-mapped view the datapath matches on.
use ipnet::{IpNet, Ipv6Net};
use serde::{Deserialize, Serialize};
use std::{
    fmt,
    net::{IpAddr, Ipv6Addr},
};

/// An IPv4 or IPv6 network without host bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(try_from = "String", into = "String")]
pub struct Cidr(pub IpNet);

impl TryFrom<String> for Cidr {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        Cidr::parse(&s)
    }
}

impl Cidr {
    pub fn parse(s: &str) -> Result<Self, String> {
        let (a, p) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = a.trim().parse().map_err(|_| format!("`{s}` is not a valid CIDR (bad address `{a}`)"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let bad_prefix = || format!("`{s}` is not a valid CIDR (prefix must be 0-{max})");
        let prefix = match p {
            Some(p) => p.trim().parse::<u8>().map_err(|_| bad_prefix())?,
            None => max,
        };
        let net = IpNet::new(addr, prefix).map_err(|_| bad_prefix())?;
        // Reject host bits: "10.0.0.1/8" is almost always a typo for a host or a net.
        if net.trunc() != net {
            return Err(format!("`{s}` has host bits set (did you mean {}?)", net.trunc()));
        }
        Ok(Cidr(net))
    }

    pub fn prefix(&self) -> u8 {
        self.0.prefix_len()
    }

    /// The network as the datapath sees it: IPv6, IPv4 as IPv4-mapped.
    pub fn mapped(&self) -> Ipv6Net {
        match self.0 {
            IpNet::V6(n) => n,
            // A v4 prefix is at most 32, so the mapped one is at most 128: never fails.
            IpNet::V4(n) => Ipv6Net::new(n.network().to_ipv6_mapped(), n.prefix_len() + 96).unwrap_or_default(),
        }
    }

    /// Whether an address in the datapath's mapped form is inside.
    pub fn contains(&self, a: &[u8; 16]) -> bool {
        self.mapped().contains(&Ipv6Addr::from(*a))
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl From<Cidr> for String {
    fn from(c: Cidr) -> String {
        c.to_string()
    }
}

pub fn to_mapped(a: IpAddr) -> [u8; 16] {
    match a {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidrs_parse_and_refuse_bad_values() {
        assert_eq!(Cidr::parse("10.0.0.0/8").unwrap().prefix(), 8);
        assert_eq!(Cidr::parse("::1").unwrap().prefix(), 128);
        assert_eq!(Cidr::parse("::1").unwrap().to_string(), "::1/128");
        assert!(Cidr::parse("10.0.0.0/33").unwrap_err().contains("prefix must be 0-32"));
        assert!(Cidr::parse("fd00::/129").unwrap_err().contains("prefix must be 0-128"));
        assert!(Cidr::parse("10.0.0.300/8").unwrap_err().contains("bad address"));
        let e = Cidr::parse("10.0.0.1/8").unwrap_err();
        assert!(e.contains("host bits") && e.contains("did you mean 10.0.0.0/8"), "{e}");
    }

    #[test]
    fn v4_networks_map_into_the_v6_space() {
        let c = Cidr::parse("10.1.0.0/16").unwrap();
        assert_eq!(c.mapped().prefix_len(), 112);
        assert!(c.contains(&to_mapped("10.1.2.3".parse().unwrap())));
        assert!(!c.contains(&to_mapped("10.2.0.1".parse().unwrap())));
        assert!(Cidr::parse("::/0").unwrap().contains(&to_mapped("127.0.0.1".parse().unwrap())));
    }
}

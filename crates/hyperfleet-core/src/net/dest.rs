//! Where guests may send packets: the destinations the `hyperfleet` table
//! drops even for machines with egress.
//!
//! Masqueraded egress makes a guest's packets look like the host's, so
//! without this a guest reaches everything the host can: a cloud's metadata
//! service at 169.254.169.254 (credentials), the host's LAN, other tenants'
//! services on private addresses. The table therefore drops, from guests:
//! - link-local `169.254.0.0/16`, always;
//! - the private ranges of RFC 1918 and RFC 6598 (shared address space) and
//!   the networks the host has addresses in — unless the operator allows a
//!   range (`--guest-allow-net`), since some deployments do want guests on a
//!   private service network.
//!
//! The guests' nameservers stay reachable on port 53 when they live on such
//! a network (a typical home router or cloud VPC resolver), or DNS would
//! break for every machine.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr};
use std::str::FromStr;

use futures_util::TryStreamExt;
use rtnetlink::packet_route::address::AddressAttribute;

use super::tap::{connect, nl_err, TapError};

/// An IPv4 network in CIDR form with no host bits set, e.g. `10.0.0.0/8`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Cidr {
    pub base: Ipv4Addr,
    pub prefix: u8,
}

impl Cidr {
    /// The network `ip/prefix` belongs to (host bits cleared).
    pub fn containing(ip: Ipv4Addr, prefix: u8) -> Cidr {
        let prefix = prefix.min(32);
        Cidr {
            base: Ipv4Addr::from(u32::from(ip) & mask(prefix)),
            prefix,
        }
    }

    /// Whether `other` lies wholly inside this network.
    pub fn covers(&self, other: &Cidr) -> bool {
        self.prefix <= other.prefix
            && u32::from(other.base) & mask(self.prefix) == u32::from(self.base)
    }
}

fn mask(prefix: u8) -> u32 {
    if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(prefix))
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.base, self.prefix)
    }
}

impl FromStr for Cidr {
    type Err = String;

    /// `a.b.c.d/n` (n from 0 to 32) or a bare address (a /32).
    fn from_str(s: &str) -> Result<Self, String> {
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let base: Ipv4Addr = addr.trim().parse().map_err(|_| {
            format!("'{addr}' is not an IPv4 address (expected CIDR such as 10.1.0.0/16)")
        })?;
        let prefix: u8 = match prefix {
            None => 32,
            Some(p) => p
                .trim()
                .parse()
                .ok()
                .filter(|p| *p <= 32)
                .ok_or_else(|| format!("'{p}' is not a prefix length from 0 to 32"))?,
        };
        let net = Cidr::containing(base, prefix);
        if net.base != base {
            return Err(format!("{s} has host bits set; did you mean {net}?"));
        }
        Ok(net)
    }
}

/// Link-local: cloud metadata services live here. Never reachable.
pub const LINK_LOCAL: Cidr = Cidr {
    base: Ipv4Addr::new(169, 254, 0, 0),
    prefix: 16,
};

/// RFC 1918 private networks and RFC 6598 shared address space (carrier
/// NAT, also used by some clouds for internal services).
pub const PRIVATE: [Cidr; 4] = [
    Cidr {
        base: Ipv4Addr::new(10, 0, 0, 0),
        prefix: 8,
    },
    Cidr {
        base: Ipv4Addr::new(100, 64, 0, 0),
        prefix: 10,
    },
    Cidr {
        base: Ipv4Addr::new(172, 16, 0, 0),
        prefix: 12,
    },
    Cidr {
        base: Ipv4Addr::new(192, 168, 0, 0),
        prefix: 16,
    },
];

/// What the table keeps guests from, once the host's networks are known.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DestPolicy {
    /// Dropped unless in `allowed` (disjoint, sorted).
    pub blocked: Vec<Cidr>,
    /// The operator's exceptions (disjoint, sorted).
    pub allowed: Vec<Cidr>,
    /// Guests' nameservers: port 53 to them is let through for machines
    /// with egress even when they sit in a blocked network.
    pub nameservers: Vec<Ipv4Addr>,
}

impl DestPolicy {
    /// The policy for a host with addresses in `host_nets`.
    pub fn new(host_nets: &[Cidr], allowed: &[Cidr], nameservers: &[Ipv4Addr]) -> DestPolicy {
        let blocked = PRIVATE
            .iter()
            .chain(host_nets.iter().filter(|n| !is_loopback(n)))
            .copied()
            .collect::<Vec<_>>();
        let mut nameservers = nameservers.to_vec();
        nameservers.sort();
        nameservers.dedup();
        DestPolicy {
            blocked: disjoint(blocked),
            allowed: disjoint(allowed.to_vec()),
            nameservers,
        }
    }
}

fn is_loopback(n: &Cidr) -> bool {
    Cidr::containing(Ipv4Addr::new(127, 0, 0, 0), 8).covers(n)
}

/// The networks of `nets` not inside another one, sorted. CIDR blocks either
/// nest or do not overlap, so what is left is disjoint (nftables refuses
/// overlapping elements in an interval set).
pub fn disjoint(mut nets: Vec<Cidr>) -> Vec<Cidr> {
    // Widest first within the same base, so a covering block comes first.
    nets.sort_by_key(|n| (n.base, n.prefix));
    nets.dedup();
    let mut out: Vec<Cidr> = Vec::with_capacity(nets.len());
    for n in nets {
        if !out.iter().any(|o| o.covers(&n)) {
            out.push(n);
        }
    }
    out
}

/// The IPv4 networks the host has addresses in (every interface, read over
/// netlink each time the table is rebuilt, so a changed address is picked up
/// by the next rebuild).
pub async fn host_networks() -> Result<Vec<Cidr>, TapError> {
    let h = connect()?;
    let mut addrs = h.address().get().execute();
    let mut out = Vec::new();
    while let Some(msg) = addrs
        .try_next()
        .await
        .map_err(|e| nl_err("listing the host's addresses".into(), e))?
    {
        for a in &msg.attributes {
            if let AddressAttribute::Local(IpAddr::V4(ip))
            | AddressAttribute::Address(IpAddr::V4(ip)) = a
            {
                out.push(Cidr::containing(*ip, msg.header.prefix_len));
            }
        }
    }
    Ok(disjoint(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(s: &str) -> Cidr {
        s.parse().unwrap()
    }

    #[test]
    fn cidrs_parse_strictly() {
        assert_eq!(c("10.1.0.0/16").to_string(), "10.1.0.0/16");
        assert_eq!(c("192.0.2.7").to_string(), "192.0.2.7/32");
        assert_eq!(c("0.0.0.0/0").prefix, 0);
        assert!("10.1.0.1/16"
            .parse::<Cidr>()
            .unwrap_err()
            .contains("did you mean 10.1.0.0/16"));
        "10.1.0.0/33".parse::<Cidr>().expect_err("10.1.0.0/33");
        "ten/8".parse::<Cidr>().expect_err("ten/8");
        "::1/128".parse::<Cidr>().expect_err("::1/128");
    }

    #[test]
    fn covering_is_by_prefix_and_base() {
        assert!(c("10.0.0.0/8").covers(&c("10.250.0.0/24")));
        assert!(c("10.0.0.0/8").covers(&c("10.0.0.0/8")));
        assert!(!c("10.250.0.0/24").covers(&c("10.0.0.0/8")));
        assert!(!c("172.16.0.0/12").covers(&c("172.32.0.0/16")));
        assert!(c("0.0.0.0/0").covers(&c("203.0.113.0/24")));
    }

    #[test]
    fn nested_networks_collapse_into_the_widest() {
        let d = disjoint(vec![
            c("10.250.0.0/24"),
            c("192.0.2.0/24"),
            c("10.0.0.0/8"),
            c("192.0.2.0/24"),
            c("192.0.2.5/32"),
        ]);
        assert_eq!(d, vec![c("10.0.0.0/8"), c("192.0.2.0/24")]);
    }

    #[test]
    fn the_policy_blocks_private_and_host_networks_but_not_loopback() {
        let p = DestPolicy::new(
            &[c("127.0.0.0/8"), c("203.0.113.0/24"), c("10.250.0.0/24")],
            &[c("10.9.0.0/16")],
            &[Ipv4Addr::new(10, 0, 0, 2), Ipv4Addr::new(10, 0, 0, 2)],
        );
        assert_eq!(
            p.blocked,
            vec![
                c("10.0.0.0/8"),
                c("100.64.0.0/10"),
                c("172.16.0.0/12"),
                c("192.168.0.0/16"),
                c("203.0.113.0/24"),
            ]
        );
        assert_eq!(p.allowed, vec![c("10.9.0.0/16")]);
        assert_eq!(p.nameservers, vec![Ipv4Addr::new(10, 0, 0, 2)]);
    }
}

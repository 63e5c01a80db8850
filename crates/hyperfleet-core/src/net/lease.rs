//! Address arithmetic of network leases: which /30 block a machine gets and
//! everything that derives from it (gateway, guest IP, MAC, TAP name).
//!
//! Pure functions; the store's writer calls [`pick_block`] inside the
//! transaction that records the lease, so two machines can never be given
//! the same block, and a crash before the commit gives nobody anything.

use std::collections::HashSet;
use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

use crate::store::NetLease;

/// Each machine gets a /30: network, gateway (host end), guest, broadcast.
pub const BLOCK_PREFIX: u8 = 30;
const BLOCK_SIZE: u32 = 4;

/// An IPv4 subnet, e.g. `172.30.0.0/16`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Subnet {
    pub base: Ipv4Addr,
    pub prefix: u8,
}

impl Subnet {
    /// How many /30 blocks fit.
    pub fn blocks(&self) -> u32 {
        1u32 << (32 - u32::from(self.prefix) - 2)
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        let mask = if self.prefix == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(self.prefix))
        };
        u32::from(ip) & mask == u32::from(self.base)
    }
}

impl fmt::Display for Subnet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        super::dest::Cidr::containing(self.base, self.prefix).fmt(f)
    }
}

impl FromStr for Subnet {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if !s.contains('/') {
            return Err(format!(
                "'{s}' is not a subnet in CIDR form (e.g. 172.30.0.0/16)"
            ));
        }
        let net: super::dest::Cidr = s.parse()?;
        if !(8..=29).contains(&net.prefix) {
            return Err(format!(
                "the prefix length must be between 8 and 29 (each machine takes a /30), got {}",
                net.prefix
            ));
        }
        Ok(Subnet {
            base: net.base,
            prefix: net.prefix,
        })
    }
}

/// The lease of block `block` of `subnet`, with TAP names `<tap_prefix><8 hex digits of the guest IP>`
/// (at most 15 characters, the kernel's limit, for prefixes of up to 7).
pub fn lease_for(subnet: Subnet, tap_prefix: &str, block: u32) -> NetLease {
    let first = u32::from(subnet.base) + block * BLOCK_SIZE;
    let gateway = Ipv4Addr::from(first + 1);
    let ip = Ipv4Addr::from(first + 2);
    let o = ip.octets();
    NetLease {
        block,
        ip,
        gateway,
        prefix_len: BLOCK_PREFIX,
        // Locally administered unicast (02), 0x68 ('h'), then the guest IP:
        // unique wherever the IP is.
        mac: format!("02:68:{:02x}:{:02x}:{:02x}:{:02x}", o[0], o[1], o[2], o[3]),
        tap: format!("{tap_prefix}{:08x}", u32::from(ip)),
    }
}

/// Whether `name` is a TAP device this naming scheme makes.
pub fn is_our_tap(tap_prefix: &str, name: &str) -> bool {
    name.strip_prefix(tap_prefix)
        .is_some_and(|rest| rest.len() == 8 && rest.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// The next free block at or after `cursor` (wrapping around), so that a
/// released address is reused only after every other one was handed out:
/// a late packet or a stale ARP entry for a deleted machine never reaches
/// the next one. `None` when every block is taken.
pub fn pick_block(taken: &HashSet<u32>, cursor: u32, blocks: u32) -> Option<u32> {
    (0..blocks)
        .map(|i| (cursor.wrapping_add(i)) % blocks)
        .find(|b| !taken.contains(b))
}

/// The longest TAP prefix that keeps names within IFNAMSIZ - 1 (15).
pub const TAP_PREFIX_MAX: usize = 7;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subnets_parse_and_refuse_nonsense() {
        let s: Subnet = "172.30.0.0/16".parse().unwrap();
        assert_eq!(s.blocks(), 16384);
        assert!(s.contains("172.30.255.2".parse().unwrap()));
        assert!(!s.contains("172.31.0.2".parse().unwrap()));
        assert!("172.30.0.1/16"
            .parse::<Subnet>()
            .unwrap_err()
            .contains("172.30.0.0/16"));
        "172.30.0.0/30"
            .parse::<Subnet>()
            .expect_err("172.30.0.0/30");
        "172.30.0.0".parse::<Subnet>().expect_err("172.30.0.0");
        "nope/16".parse::<Subnet>().expect_err("nope/16");
    }

    #[test]
    fn leases_derive_from_the_block() {
        let s: Subnet = "172.30.0.0/16".parse().unwrap();
        let l = lease_for(s, "hf", 0);
        assert_eq!(l.gateway, Ipv4Addr::new(172, 30, 0, 1));
        assert_eq!(l.ip, Ipv4Addr::new(172, 30, 0, 2));
        assert_eq!(l.mac, "02:68:ac:1e:00:02");
        assert_eq!(l.tap, "hfac1e0002");
        let l = lease_for(s, "hf", 16383);
        assert_eq!(l.ip, Ipv4Addr::new(172, 30, 255, 254));
        assert_eq!(l.gateway, Ipv4Addr::new(172, 30, 255, 253));
        assert!(is_our_tap("hf", &l.tap));
        assert!(!is_our_tap("hf", "hfoo0"));
        assert!(!is_our_tap("hf", "eth0"));
        assert!(lease_for(s, "hfxxxxx", 5).tap.len() <= 15);
    }

    #[test]
    fn picking_skips_taken_blocks_and_wraps() {
        let taken: HashSet<u32> = [0, 1, 3].into_iter().collect();
        assert_eq!(pick_block(&taken, 0, 4), Some(2));
        assert_eq!(pick_block(&taken, 3, 4), Some(2));
        assert_eq!(pick_block(&HashSet::new(), 7, 8), Some(7));
        let all: HashSet<u32> = (0..4).collect();
        assert_eq!(pick_block(&all, 1, 4), None);
    }
}

//! The `refresh` operation's messages: a new identity for a guest restored from a memory image
//! (snapshot, fork, template), or just the clock and fresh entropy after a resume.
//!
//! This module owns the request and report shapes, their validation (shared by the client,
//! which refuses an invalid request before sending it, and the agent, which checks again) and
//! the small value types they use ([`MacAddr`], the hex encoding of entropy). Protocol
//! version 2 added the operation.

use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::messages::RemoteError;

/// The protocol version that introduced `refresh`.
pub const REFRESH_PROTOCOL_VERSION: u32 = 2;
/// Most entropy bytes one request may carry.
pub const MAX_ENTROPY: usize = 512;
/// Entropy the reference constructors send (512 bits, twice what the kernel's CRNG needs).
pub const DEFAULT_ENTROPY: usize = 64;
/// Most DNS servers one request may set.
pub const MAX_DNS: usize = 8;
/// Earliest clock a request may set (2020-01-01T00:00:00Z): an earlier one is a host bug.
pub const MIN_CLOCK_UNIX_NS: u64 = 1_577_836_800_000_000_000;

/// Host → agent: what to renew. Every part is optional; the agent does the given parts in a
/// fixed order (clock, entropy, sessions, MAC, address, route, DNS, hostname, machine id, boot
/// id), goes on after a failed part, and reports each part. Sending the same request twice
/// is harmless. `Debug` shows the entropy's length, never its bytes (requests get logged).
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefreshRequest {
    /// The host's wall clock (nanoseconds since the Unix epoch), taken just before sending;
    /// the guest sets `CLOCK_REALTIME` to it.
    #[serde(default)]
    pub clock_unix_ns: Option<u64>,
    /// Random bytes from the host (hex in JSON), mixed into the kernel RNG with full credit,
    /// followed by a forced reseed, so the output of two clones differs at once.
    #[serde(default, with = "hex_bytes", skip_serializing_if = "Vec::is_empty")]
    pub entropy: Vec<u8>,
    /// Kill every `exec` still running that started before this request (in any session),
    /// and answer only once they are reaped.
    #[serde(default)]
    pub drop_sessions: bool,
    /// The interface's new MAC, address, gateway and DNS servers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<NetworkIdentity>,
    /// New hostname: `sethostname`, `/etc/hostname`, and the old name's lines in `/etc/hosts`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// New `/etc/machine-id`: 32 lowercase hex digits, not all zero.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub machine_id: Option<String>,
    /// New boot id (a lowercase UUID) shown at `/proc/sys/kernel/random/boot_id`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_id: Option<String>,
}

impl fmt::Debug for RefreshRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RefreshRequest")
            .field("clock_unix_ns", &self.clock_unix_ns)
            .field("entropy", &format_args!("<{} bytes>", self.entropy.len()))
            .field("drop_sessions", &self.drop_sessions)
            .field("network", &self.network)
            .field("hostname", &self.hostname)
            .field("machine_id", &self.machine_id)
            .field("boot_id", &self.boot_id)
            .finish()
    }
}

/// The new network configuration of one interface.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkIdentity {
    /// Interface name (default `eth0`).
    #[serde(default = "default_iface")]
    pub iface: String,
    pub address: Ipv4Addr,
    pub prefix_len: u8,
    /// Default gateway; without one the default route is removed.
    #[serde(default)]
    pub gateway: Option<Ipv4Addr>,
    /// New hardware address; the current one is kept when absent.
    #[serde(default)]
    pub mac: Option<MacAddr>,
    /// Nameservers written to `/etc/resolv.conf`; the file is left alone when empty.
    #[serde(default)]
    pub dns: Vec<Ipv4Addr>,
}

fn default_iface() -> String {
    "eth0".into()
}

impl NetworkIdentity {
    /// `address/prefix_len` on `eth0`, everything else unset.
    pub fn new(address: Ipv4Addr, prefix_len: u8) -> NetworkIdentity {
        NetworkIdentity {
            iface: default_iface(),
            address,
            prefix_len,
            gateway: None,
            mac: None,
            dns: Vec::new(),
        }
    }

    pub fn validate(&self) -> Result<(), String> {
        if !valid_iface(&self.iface) {
            return Err(format!("interface name {:?} is invalid", self.iface));
        }
        if self.prefix_len > 32 {
            return Err(format!(
                "prefix length {} is more than 32 bits",
                self.prefix_len
            ));
        }
        let a = self.address;
        if a.is_unspecified() || a.is_multicast() || a.is_broadcast() || a.is_loopback() {
            return Err(format!("{a} cannot be an interface address"));
        }
        if let Some(g) = self.gateway {
            if g == a || g.is_unspecified() || g.is_multicast() || g.is_broadcast() {
                return Err(format!("{g} cannot be the gateway of {a}"));
            }
        }
        if let Some(m) = self.mac {
            m.validate()?;
        }
        if self.dns.len() > MAX_DNS {
            return Err(format!(
                "{} DNS servers given, at most {MAX_DNS} allowed",
                self.dns.len()
            ));
        }
        Ok(())
    }
}

impl RefreshRequest {
    /// What the host sends after every resume from suspend: its clock and 64 random bytes.
    pub fn resume() -> std::io::Result<RefreshRequest> {
        Ok(RefreshRequest {
            clock_unix_ns: Some(unix_now_ns()),
            entropy: host_entropy(DEFAULT_ENTROPY)?,
            ..RefreshRequest::default()
        })
    }

    /// The start of what the host sends to a new machine restored from a memory image: clock,
    /// entropy and `drop_sessions`; add the identity with the builder methods.
    pub fn new_machine() -> std::io::Result<RefreshRequest> {
        Ok(RefreshRequest {
            drop_sessions: true,
            ..RefreshRequest::resume()?
        })
    }

    pub fn network(mut self, n: NetworkIdentity) -> Self {
        self.network = Some(n);
        self
    }

    pub fn hostname(mut self, h: impl Into<String>) -> Self {
        self.hostname = Some(h.into());
        self
    }

    pub fn machine_id(mut self, id: impl Into<String>) -> Self {
        self.machine_id = Some(id.into());
        self
    }

    pub fn boot_id(mut self, id: impl Into<String>) -> Self {
        self.boot_id = Some(id.into());
        self
    }

    /// Sets `clock_unix_ns` to the host's clock now (call right before sending when the
    /// request was built a while ago).
    pub fn stamp_clock(mut self) -> Self {
        self.clock_unix_ns = Some(unix_now_ns());
        self
    }

    /// Checks every field; the message names the first bad one.
    pub fn validate(&self) -> Result<(), String> {
        if let Some(ns) = self.clock_unix_ns {
            if ns < MIN_CLOCK_UNIX_NS {
                return Err(format!(
                    "clock {ns} ns since the epoch is before 2020; the host clock is wrong"
                ));
            }
        }
        if self.entropy.len() > MAX_ENTROPY {
            return Err(format!(
                "{} entropy bytes given, at most {MAX_ENTROPY} allowed",
                self.entropy.len()
            ));
        }
        if let Some(n) = &self.network {
            n.validate()?;
        }
        if let Some(h) = &self.hostname {
            validate_hostname(h)?;
        }
        if let Some(m) = &self.machine_id {
            validate_machine_id(m)?;
        }
        if let Some(b) = &self.boot_id {
            validate_boot_id(b)?;
        }
        Ok(())
    }
}

/// The host's wall clock in nanoseconds since the Unix epoch (0 before 1970).
pub fn unix_now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// `n` bytes from the host's `/dev/urandom`.
pub fn host_entropy(n: usize) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut buf = vec![0u8; n];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut buf)?;
    Ok(buf)
}

/// A new random machine id (32 lowercase hex digits) from the host's `/dev/urandom`.
pub fn random_machine_id() -> std::io::Result<String> {
    Ok(to_hex(&host_entropy(16)?))
}

/// A new random (version 4) UUID for a boot id, from the host's `/dev/urandom`.
pub fn random_boot_id() -> std::io::Result<String> {
    let mut b = host_entropy(16)?;
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h = to_hex(&b);
    Ok(format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    ))
}

/// A hostname the kernel and resolvers accept: 1–64 bytes of letters, digits, `-` and `.`,
/// labels not empty and not starting or ending with `-`.
pub fn validate_hostname(h: &str) -> Result<(), String> {
    let ok = !h.is_empty()
        && h.len() <= 64
        && h.split('.').all(|label| {
            !label.is_empty()
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        });
    if ok {
        Ok(())
    } else {
        Err(format!(
            "hostname {h:?} is invalid (1-64 letters, digits, '-' and '.')"
        ))
    }
}

/// 32 lowercase hex digits, not all zero (the format of `machine-id(5)`).
pub fn validate_machine_id(m: &str) -> Result<(), String> {
    if m.len() == 32 && is_lower_hex(m) && m.bytes().any(|b| b != b'0') {
        Ok(())
    } else {
        Err(format!(
            "machine id {m:?} is invalid (32 lowercase hex digits, not all zero)"
        ))
    }
}

/// A lowercase UUID, `8-4-4-4-12` hex digits, like the kernel's boot ids.
pub fn validate_boot_id(b: &str) -> Result<(), String> {
    let parts: Vec<&str> = b.split('-').collect();
    let shape = parts.iter().map(|p| p.len()).collect::<Vec<_>>() == [8, 4, 4, 4, 12];
    if shape && parts.iter().all(|p| is_lower_hex(p)) {
        Ok(())
    } else {
        Err(format!(
            "boot id {b:?} is invalid (a lowercase UUID, 8-4-4-4-12 hex digits)"
        ))
    }
}

fn is_lower_hex(s: &str) -> bool {
    s.bytes()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

fn valid_iface(name: &str) -> bool {
    // IFNAMSIZ is 16 including the terminating NUL.
    !name.is_empty()
        && name.len() < 16
        && name != "."
        && name != ".."
        && !name.bytes().any(|b| b == b'/' || b == b':' || b <= b' ')
}

fn to_hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn from_hex(s: &str) -> Result<Vec<u8>, String> {
    if s.len() % 2 != 0 {
        return Err("odd number of hex digits".into());
    }
    (0..s.len())
        .step_by(2)
        .map(|i| {
            s.get(i..i + 2)
                .filter(|d| d.bytes().all(|b| b.is_ascii_hexdigit()))
                .and_then(|d| u8::from_str_radix(d, 16).ok())
                .ok_or_else(|| format!("{:?} is not hex", &s[i..]))
        })
        .collect()
}

/// Serde adapter: bytes as a hex string.
mod hex_bytes {
    use super::*;

    pub(super) fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&to_hex(v))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        from_hex(&s).map_err(serde::de::Error::custom)
    }
}

/// An Ethernet address; `52:54:00:12:34:56` in JSON and in `Debug`.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct MacAddr(pub [u8; 6]);

impl fmt::Debug for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl MacAddr {
    /// A unicast address that is not all zero.
    pub fn validate(&self) -> Result<(), String> {
        if self.0 == [0; 6] {
            return Err("MAC address 00:00:00:00:00:00 is invalid".into());
        }
        if self.0[0] & 1 != 0 {
            return Err(format!(
                "MAC address {self} is a multicast address, not a unicast one"
            ));
        }
        Ok(())
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

impl FromStr for MacAddr {
    type Err = String;

    fn from_str(s: &str) -> Result<MacAddr, String> {
        let bad = || format!("{s:?} is not a MAC address (six hex bytes separated by ':')");
        let mut out = [0u8; 6];
        let mut parts = s.split(':');
        for o in &mut out {
            let p = parts.next().ok_or_else(bad)?;
            if p.len() != 2 || !p.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(bad());
            }
            *o = u8::from_str_radix(p, 16).map_err(|_| bad())?;
        }
        if parts.next().is_some() {
            return Err(bad());
        }
        Ok(MacAddr(out))
    }
}

impl Serialize for MacAddr {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for MacAddr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<MacAddr, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Agent → host: what a refresh did, one entry per part that was asked for, in the order done.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefreshReport {
    pub steps: Vec<RefreshStep>,
    /// `/proc/sys/kernel/random/boot_id` as the guest reads it afterwards.
    #[serde(default)]
    pub boot_id: Option<String>,
    /// How far the guest clock was moved (new minus old), when it was set.
    #[serde(default)]
    pub clock_step_ns: Option<i64>,
    /// How many running `exec` operations were killed.
    #[serde(default)]
    pub sessions_dropped: u32,
    /// Time the agent spent on the request.
    #[serde(default)]
    pub duration_ms: u64,
}

impl RefreshReport {
    /// The parts that failed.
    pub fn failures(&self) -> impl Iterator<Item = &RefreshStep> {
        self.steps.iter().filter(|s| s.error.is_some())
    }

    /// Whether every part that was asked for succeeded.
    pub fn is_ok(&self) -> bool {
        self.failures().next().is_none()
    }

    /// The entry of one part, if it was asked for.
    pub fn step(&self, kind: RefreshStepKind) -> Option<&RefreshStep> {
        self.steps.iter().find(|s| s.step == kind)
    }
}

/// The outcome of one part of a refresh.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefreshStep {
    pub step: RefreshStepKind,
    /// Why it failed; `None` when it succeeded.
    #[serde(default)]
    pub error: Option<RemoteError>,
    /// What was done, for logs and events ("clock moved by +3.200 s").
    #[serde(default)]
    pub detail: String,
}

/// The parts of a refresh, in the order the agent does them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RefreshStepKind {
    /// `clock_settime(CLOCK_REALTIME)`.
    Clock,
    /// `RNDADDENTROPY` (credited) then `RNDRESEEDCRNG`.
    Entropy,
    /// Running `exec` operations killed.
    Sessions,
    /// `SIOCSIFHWADDR` with the interface down.
    Mac,
    /// Address and netmask (the interface goes down and up, which flushes the neighbour cache).
    Address,
    /// The default route replaced (or removed).
    Route,
    /// `/etc/resolv.conf`.
    Dns,
    /// `sethostname`, `/etc/hostname`, `/etc/hosts`.
    Hostname,
    /// `/etc/machine-id`.
    MachineId,
    /// A file bind-mounted over `/proc/sys/kernel/random/boot_id`.
    BootId,
    /// A part named by a newer agent.
    #[serde(other)]
    Unknown,
}

impl RefreshStepKind {
    pub fn as_str(self) -> &'static str {
        match self {
            RefreshStepKind::Clock => "clock",
            RefreshStepKind::Entropy => "entropy",
            RefreshStepKind::Sessions => "sessions",
            RefreshStepKind::Mac => "mac",
            RefreshStepKind::Address => "address",
            RefreshStepKind::Route => "route",
            RefreshStepKind::Dns => "dns",
            RefreshStepKind::Hostname => "hostname",
            RefreshStepKind::MachineId => "machine_id",
            RefreshStepKind::BootId => "boot_id",
            RefreshStepKind::Unknown => "unknown",
        }
    }
}

impl fmt::Display for RefreshStepKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::messages::{ErrorCode, Reply, Request, Response};
    use serde_json::json;

    fn full() -> RefreshRequest {
        RefreshRequest {
            clock_unix_ns: Some(1_700_000_000_123_456_789),
            entropy: vec![0, 1, 0xab, 0xff],
            drop_sessions: true,
            network: Some(NetworkIdentity {
                iface: "eth0".into(),
                address: Ipv4Addr::new(10, 0, 2, 16),
                prefix_len: 24,
                gateway: Some(Ipv4Addr::new(10, 0, 2, 2)),
                mac: Some("52:54:00:ab:cd:ef".parse().unwrap()),
                dns: vec![Ipv4Addr::new(10, 0, 2, 3)],
            }),
            hostname: Some("vm2".into()),
            machine_id: Some("0123456789abcdef0123456789abcdef".into()),
            boot_id: Some("01234567-89ab-4def-8123-456789abcdef".into()),
        }
    }

    #[test]
    fn request_wire_shape_round_trips() {
        let r = Request::Refresh(full());
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(
            v,
            json!({"op":"refresh","clock_unix_ns":1_700_000_000_123_456_789u64,
                   "entropy":"0001abff","drop_sessions":true,
                   "network":{"iface":"eth0","address":"10.0.2.16","prefix_len":24,
                              "gateway":"10.0.2.2","mac":"52:54:00:ab:cd:ef","dns":["10.0.2.3"]},
                   "hostname":"vm2","machine_id":"0123456789abcdef0123456789abcdef",
                   "boot_id":"01234567-89ab-4def-8123-456789abcdef"})
        );
        assert_eq!(serde_json::from_value::<Request>(v).unwrap(), r);
        // The clock-only form is small, and everything else defaults.
        let resume = RefreshRequest {
            clock_unix_ns: Some(5),
            entropy: vec![7; 2],
            ..RefreshRequest::default()
        };
        let v = serde_json::to_value(Request::Refresh(resume.clone())).unwrap();
        assert_eq!(
            v,
            json!({"op":"refresh","clock_unix_ns":5,"entropy":"0707","drop_sessions":false})
        );
        assert_eq!(
            serde_json::from_value::<Request>(
                json!({"op":"refresh","clock_unix_ns":5,"entropy":"0707"})
            )
            .unwrap(),
            Request::Refresh(resume)
        );
        let n: NetworkIdentity =
            serde_json::from_value(json!({"address":"10.1.1.1","prefix_len":30})).unwrap();
        assert_eq!(n, NetworkIdentity::new(Ipv4Addr::new(10, 1, 1, 1), 30));
        // Logs never show the entropy.
        let shown = format!("{:?}", Request::Refresh(full()));
        assert!(shown.contains("entropy: <4 bytes>"), "{shown}");
        assert!(!shown.contains("[0, 1, 171, 255]"), "{shown}");
        assert!(shown.contains("mac: Some(52:54:00:ab:cd:ef)"), "{shown}");
    }

    #[test]
    fn malformed_fields_are_refused_by_the_parser() {
        for bad in [
            json!({"op":"refresh","entropy":"abc"}),
            json!({"op":"refresh","entropy":"zz"}),
            json!({"op":"refresh","entropy":"+f"}),
            json!({"op":"refresh","network":{"address":"10.0.0.300","prefix_len":24}}),
            json!({"op":"refresh","network":{"address":"10.0.0.3","prefix_len":24,"mac":"52:54:00:ab:cd"}}),
            json!({"op":"refresh","network":{"address":"10.0.0.3","prefix_len":24,"mac":"52:54:00:ab:cd:ef:01"}}),
            json!({"op":"refresh","network":{"address":"10.0.0.3","prefix_len":24,"mac":"5254.00ab.cdef"}}),
            json!({"op":"refresh","clock_unix_ns":-1}),
        ] {
            assert!(
                serde_json::from_value::<Request>(bad.clone()).is_err(),
                "{bad} parsed"
            );
        }
    }

    #[test]
    fn validation() {
        full().validate().unwrap();
        RefreshRequest::default().validate().unwrap();
        let mut r = full();
        r.clock_unix_ns = Some(MIN_CLOCK_UNIX_NS - 1);
        assert!(r.validate().unwrap_err().contains("before 2020"));
        let with = |f: &dyn Fn(&mut RefreshRequest)| {
            let mut r = full();
            f(&mut r);
            r.validate()
        };
        let net = |f: &dyn Fn(&mut NetworkIdentity)| {
            with(&|r: &mut RefreshRequest| f(r.network.as_mut().unwrap()))
        };
        assert!(with(&|r| r.entropy = vec![1; MAX_ENTROPY + 1])
            .unwrap_err()
            .contains("entropy"));
        with(&|r| r.entropy = vec![1; MAX_ENTROPY]).unwrap();
        for h in ["", "-a", "a-", "a..b", "a b", "ä", &"x".repeat(65), "a_b"] {
            let h = h.to_string();
            assert!(with(&|r| r.hostname = Some(h.clone())).is_err(), "{h:?}");
        }
        for h in ["a", "vm-1", "vm1.example.com", &"x".repeat(64)] {
            let h = h.to_string();
            with(&|r| r.hostname = Some(h.clone())).unwrap();
        }
        for m in [
            "0123456789ABCDEF0123456789ABCDEF",
            "0123456789abcdef0123456789abcde",
            "00000000000000000000000000000000",
            "0123456789abcdef0123456789abcdeg",
        ] {
            assert!(validate_machine_id(m).is_err(), "{m}");
        }
        for b in [
            "01234567-89ab-4def-8123-456789abcde",
            "0123456789ab4def8123456789abcdef",
            "01234567-89AB-4def-8123-456789abcdef",
            "01234567-89ab-4def-8123-456789abcdef-",
        ] {
            assert!(validate_boot_id(b).is_err(), "{b}");
        }
        assert!(net(&|n| n.prefix_len = 33).unwrap_err().contains("prefix"));
        assert!(net(&|n| n.iface = "a/b".into()).is_err());
        assert!(net(&|n| n.iface = "x".repeat(16)).is_err());
        assert!(net(&|n| n.iface = String::new()).is_err());
        net(&|n| n.iface = "x".repeat(15)).unwrap();
        assert!(net(&|n| n.address = Ipv4Addr::UNSPECIFIED).is_err());
        assert!(net(&|n| n.address = Ipv4Addr::new(224, 0, 0, 1)).is_err());
        assert!(net(&|n| n.gateway = Some(n.address)).is_err());
        assert!(net(&|n| n.mac = Some(MacAddr([1, 2, 3, 4, 5, 6])))
            .unwrap_err()
            .contains("multicast"));
        assert!(net(&|n| n.mac = Some(MacAddr([0; 6]))).is_err());
        assert!(net(&|n| n.dns = vec![Ipv4Addr::LOCALHOST; MAX_DNS + 1]).is_err());
    }

    #[test]
    fn generated_ids_are_valid() {
        let a = random_boot_id().unwrap();
        validate_boot_id(&a).unwrap();
        assert_eq!(&a[14..15], "4", "{a}");
        assert_ne!(a, random_boot_id().unwrap());
        validate_machine_id(&random_machine_id().unwrap()).unwrap();
        let r = RefreshRequest::new_machine()
            .unwrap()
            .hostname("vm9")
            .machine_id(random_machine_id().unwrap())
            .boot_id(a);
        r.validate().unwrap();
        assert!(r.drop_sessions);
        assert_eq!(r.entropy.len(), DEFAULT_ENTROPY);
        let now = unix_now_ns();
        let t = r.clock_unix_ns.unwrap();
        assert!(t <= now && now - t < 60_000_000_000);
        let resume = RefreshRequest::resume().unwrap();
        assert!(!resume.drop_sessions && resume.network.is_none() && resume.hostname.is_none());
        assert_eq!(
            MacAddr([0x52, 0x54, 0, 0xab, 0xcd, 0xef]).to_string(),
            "52:54:00:ab:cd:ef"
        );
        assert_eq!(
            "52:54:00:AB:CD:EF".parse::<MacAddr>().unwrap(),
            MacAddr([0x52, 0x54, 0, 0xab, 0xcd, 0xef])
        );
    }

    #[test]
    fn report_wire_shape_round_trips() {
        let rep = RefreshReport {
            steps: vec![
                RefreshStep {
                    step: RefreshStepKind::Clock,
                    error: None,
                    detail: "clock moved by +3.000 s".into(),
                },
                RefreshStep {
                    step: RefreshStepKind::Entropy,
                    error: Some(RemoteError::new(
                        ErrorCode::PermissionDenied,
                        "RNDADDENTROPY: Operation not permitted (os error 1)",
                    )),
                    detail: String::new(),
                },
            ],
            boot_id: Some("b".into()),
            clock_step_ns: Some(3_000_000_000),
            sessions_dropped: 0,
            duration_ms: 4,
        };
        let resp = Response::Ok(Reply::Refreshed(rep.clone()));
        let v = serde_json::to_value(&resp).unwrap();
        assert_eq!(
            v,
            json!({"ok":{"type":"refreshed","steps":[
                {"step":"clock","error":null,"detail":"clock moved by +3.000 s"},
                {"step":"entropy","error":{"code":"permission_denied",
                 "message":"RNDADDENTROPY: Operation not permitted (os error 1)"},"detail":""}],
                "boot_id":"b","clock_step_ns":3_000_000_000i64,"sessions_dropped":0,"duration_ms":4}})
        );
        assert_eq!(serde_json::from_value::<Response>(v).unwrap(), resp);
        assert!(!rep.is_ok());
        assert_eq!(rep.failures().count(), 1);
        assert!(rep.step(RefreshStepKind::Clock).unwrap().error.is_none());
        assert!(rep.step(RefreshStepKind::Mac).is_none());
        // Parts named by newer agents still parse.
        let r: RefreshReport =
            serde_json::from_value(json!({"steps":[{"step":"vmgenid"}]})).unwrap();
        assert_eq!(r.steps[0].step, RefreshStepKind::Unknown);
        assert!(r.is_ok());
    }
}

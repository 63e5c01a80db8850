//! Machine networking on the host: leases, TAP devices and the `hyperfleet`
//! nftables table.
//!
//! Each machine gets a /30 of the configured subnet ([`lease`]): the host end
//! of a point-to-point link on the machine's own TAP device is the guest's
//! gateway. Point-to-point rather than a bridge because then every packet a
//! guest sends is routed by the host, where one nftables table decides it:
//! guests share no layer-2 segment, so there is nothing to filter at the
//! bridge level and no ARP spoofing between them (docs/networking.md).
//!
//! The machine run owns the lifecycle: the lease is committed before the TAP
//! is made ([`tap`]), the TAP exists while a VMM does, and the table
//! ([`nft`]) is rebuilt from the store's leases whenever they change. A VMM
//! that runs in a network namespace of its own (jailed Firecracker) gets its
//! TAP inside one, linked to the host by a veth named like the TAP
//! ([`netns`]), so the host side looks the same to the table.

pub mod dest;
pub mod lease;
pub mod netns;
pub mod nft;
pub mod tap;

use std::net::Ipv4Addr;
use std::path::PathBuf;

pub use lease::Subnet;

/// Networking settings of the daemon (`--subnet`, `--tap-prefix`, `--dns`, `--nft`).
#[derive(Debug, Clone)]
pub struct NetConfig {
    pub subnet: Subnet,
    /// TAP devices are named `<prefix><guest IP in hex>`; the orphan sweep
    /// removes devices of this shape that no lease names.
    pub tap_prefix: String,
    /// Nameservers written into guests' resolv.conf.
    pub dns: Vec<Ipv4Addr>,
    /// The `nft` binary (Debian's nftables).
    pub nft_binary: PathBuf,
    /// The nftables table (family `inet`) Hyperfleet owns.
    pub table: String,
    /// Private or host networks guests may reach nonetheless
    /// (`--guest-allow-net`; [`dest`]).
    pub allow_nets: Vec<dest::Cidr>,
}

impl NetConfig {
    pub fn new(subnet: Subnet) -> Self {
        NetConfig {
            subnet,
            tap_prefix: "hf".into(),
            dns: default_dns(),
            nft_binary: PathBuf::from("nft"),
            table: "hyperfleet".into(),
            allow_nets: Vec::new(),
        }
    }

    /// What a backend needs for a machine holding `lease`.
    pub fn guest(&self, lease: &crate::store::NetLease) -> GuestNet {
        GuestNet {
            tap: lease.tap.clone(),
            mac: lease.mac.clone(),
            ip: lease.ip,
            gateway: lease.gateway,
            prefix_len: lease.prefix_len,
            dns: self.dns.clone(),
        }
    }
}

/// The host's nameservers from /etc/resolv.conf, minus loopback ones (a
/// guest cannot use the host's local resolver: it cannot reach the host),
/// or 1.1.1.1 when none is left.
pub fn default_dns() -> Vec<Ipv4Addr> {
    let text = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    let found = nameservers(&text);
    if found.is_empty() {
        vec![Ipv4Addr::new(1, 1, 1, 1)]
    } else {
        found
    }
}

fn nameservers(resolv_conf: &str) -> Vec<Ipv4Addr> {
    resolv_conf
        .lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|v| v.trim().parse::<Ipv4Addr>().ok())
        .filter(|ip| !ip.is_loopback() && !ip.is_unspecified())
        .collect()
}

/// A machine's network as its VMM and guest see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestNet {
    pub tap: String,
    pub mac: String,
    pub ip: Ipv4Addr,
    pub gateway: Ipv4Addr,
    pub prefix_len: u8,
    pub dns: Vec<Ipv4Addr>,
}

impl GuestNet {
    /// The guest agent's kernel command-line keys (`hf.ip`, `hf.gw`,
    /// `hf.dns`), with a leading space.
    pub fn kernel_args(&self) -> String {
        let mut s = format!(
            " hf.ip={}/{} hf.gw={}",
            self.ip, self.prefix_len, self.gateway
        );
        if !self.dns.is_empty() {
            let dns: Vec<String> = self.dns.iter().map(|d| d.to_string()).collect();
            s.push_str(&format!(" hf.dns={}", dns.join(",")));
        }
        s
    }
}

/// Errors of host networking.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("the subnet {0} has no free /30 left for another machine; delete machines or configure a larger --subnet")]
    Exhausted(Subnet),
    #[error(transparent)]
    Tap(#[from] tap::TapError),
    #[error("updating the nftables table '{table}' failed: {source}")]
    Rules {
        table: String,
        #[source]
        source: std::io::Error,
    },
    #[error("preparing the host for machine networking failed: {what}: {source}")]
    Host {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("recording the network lease failed: {0}")]
    Store(#[from] crate::store::StoreError),
    #[error("reading the machines' network leases failed: {0}")]
    ReadLeases(#[source] crate::store::StoreError),
}

/// The host side of machine networking, shared by every machine run.
pub struct Network {
    pub config: NetConfig,
    /// Serialises table rebuilds, so the last one always reflects the
    /// latest leases.
    rules: tokio::sync::Mutex<()>,
}

impl Network {
    pub fn new(config: NetConfig) -> Self {
        Network {
            config,
            rules: tokio::sync::Mutex::new(()),
        }
    }

    /// Once at startup: IPv4 forwarding on (guests' traffic is routed by the
    /// host), and the tools and devices networking needs are there.
    pub async fn prepare_host(&self) -> Result<(), NetError> {
        let host = |what: &str, source| NetError::Host {
            what: what.to_string(),
            source,
        };
        tokio::fs::metadata("/dev/net/tun")
            .await
            .map_err(|e| host("/dev/net/tun is missing (load the tun module)", e))?;
        // Per network namespace: this enables routing in the daemon's own.
        tokio::fs::write("/proc/sys/net/ipv4/ip_forward", "1\n")
            .await
            .map_err(|e| host("enabling net.ipv4.ip_forward (needs root)", e))?;
        Ok(())
    }

    /// Takes (or returns the existing) lease of machine `id`, committed
    /// before anything on the host uses it.
    pub async fn lease(
        &self,
        store: &crate::store::Store,
        id: &str,
    ) -> Result<crate::store::NetLease, NetError> {
        let subnet = self.config.subnet;
        let prefix = self.config.tap_prefix.clone();
        let id = id.to_string();
        let lease = store
            .write(move |ctx| {
                ctx.take_lease(&id, |taken, cursor| {
                    lease::pick_block(taken, cursor, subnet.blocks())
                        .map(|b| lease::lease_for(subnet, &prefix, b))
                })
            })
            .await?;
        lease.ok_or(NetError::Exhausted(subnet))
    }

    /// Makes the machine's TAP device (idempotent).
    pub async fn ensure_tap(
        &self,
        lease: &crate::store::NetLease,
        owner: Option<u32>,
    ) -> Result<(), NetError> {
        tap::ensure(&lease.tap, lease.gateway, lease.prefix_len, owner).await?;
        Ok(())
    }

    /// Makes the machine's network namespace, its veth link to the host and
    /// the TAP inside it (idempotent): for VMMs that run in a namespace.
    pub async fn ensure_tap_in_netns(
        &self,
        lease: &crate::store::NetLease,
        owner: Option<u32>,
    ) -> Result<(), NetError> {
        netns::ensure_link(&lease.tap, lease.ip).await?;
        netns::ensure_tap(&lease.tap, lease.gateway, lease.prefix_len, owner).await?;
        Ok(())
    }

    /// Removes a machine's TAP device, or the host end of its namespace's
    /// veth link and the namespace (idempotent).
    pub async fn remove_tap(&self, name: &str) -> Result<(), NetError> {
        tap::remove(name).await?;
        netns::remove(&netns::name_for(name))?;
        Ok(())
    }

    /// Rebuilds the nftables table from the leases in the store.
    pub async fn sync_rules(&self, store: &crate::store::Store) -> Result<(), NetError> {
        self.sync_rules_excluding(store, None).await
    }

    /// Rebuilds the table leaving out machine `exclude` (one being deleted:
    /// its rules go before its record does, so a finished delete has
    /// released everything).
    pub async fn sync_rules_excluding(
        &self,
        store: &crate::store::Store,
        exclude: Option<&str>,
    ) -> Result<(), NetError> {
        let _one_at_a_time = self.rules.lock().await;
        // Read under the lock: a later rebuild sees at least these leases.
        let mut machines: Vec<nft::RuleMachine> = store
            .leased_machines()
            .map_err(NetError::ReadLeases)?
            .iter()
            .filter(|m| Some(m.id.as_str()) != exclude)
            .filter_map(|m| {
                m.network.as_ref().map(|l| nft::RuleMachine {
                    tap: l.tap.clone(),
                    ip: l.ip,
                    egress: m.spec.egress,
                })
            })
            .collect();
        machines.sort_by_key(|m| m.ip);
        let policy = if machines.is_empty() {
            dest::DestPolicy::default()
        } else {
            // Read every time: the host's addresses may have changed.
            let host_nets = dest::host_networks().await?;
            dest::DestPolicy::new(&host_nets, &self.config.allow_nets, &self.config.dns)
        };
        let script = nft::render(&self.config.table, &machines, &policy);
        nft::apply(&self.config.nft_binary, &script)
            .await
            .map_err(|source| NetError::Rules {
                table: self.config.table.clone(),
                source,
            })
    }

    /// TAP devices of Hyperfleet's naming that no machine needs now: no
    /// lease names them, or their machine has no VMM and none is being
    /// spawned. Run at startup, before the machine runs.
    pub async fn sweep(&self, store: &crate::store::Store) -> Result<Vec<String>, NetError> {
        let prefix = self.config.tap_prefix.clone();
        let ours = tap::list(|n| lease::is_our_tap(&prefix, n)).await?;
        let needed: std::collections::HashSet<String> = store
            .leased_machines()
            .map_err(NetError::ReadLeases)?
            .iter()
            .filter(|m| {
                m.vmm.is_some() || m.current_step.as_deref() == Some(crate::store::steps::SPAWN)
            })
            .filter_map(|m| m.network.as_ref().map(|l| l.tap.clone()))
            .collect();
        let mut removed = Vec::new();
        for name in ours {
            if !needed.contains(&name) {
                tracing::warn!(tap = %name, "removing a TAP device no running machine owns");
                tap::remove(&name).await?;
                removed.push(name);
            }
        }
        for ns in netns::list(&prefix) {
            if netns::tap_of(&ns).is_some_and(|t| !needed.contains(t)) {
                tracing::warn!(netns = %ns, "removing a network namespace no running machine owns");
                netns::remove(&ns)?;
                removed.push(ns);
            }
        }
        Ok(removed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nameservers_skip_loopback() {
        let conf = "# x\nnameserver 127.0.0.53\nnameserver 10.0.0.2\nnameserver ::1\nsearch lan\n";
        assert_eq!(nameservers(conf), vec![Ipv4Addr::new(10, 0, 0, 2)]);
    }

    #[test]
    fn kernel_args_carry_the_lease() {
        let g = GuestNet {
            tap: "hfac1e0002".into(),
            mac: "02:68:ac:1e:00:02".into(),
            ip: Ipv4Addr::new(172, 30, 0, 2),
            gateway: Ipv4Addr::new(172, 30, 0, 1),
            prefix_len: 30,
            dns: vec![Ipv4Addr::new(1, 1, 1, 1), Ipv4Addr::new(9, 9, 9, 9)],
        };
        assert_eq!(
            g.kernel_args(),
            " hf.ip=172.30.0.2/30 hf.gw=172.30.0.1 hf.dns=1.1.1.1,9.9.9.9"
        );
    }
}

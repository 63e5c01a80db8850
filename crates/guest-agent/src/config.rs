//! Boot configuration: `hf.*` keys from the kernel command line and an optional file.
//!
//! The host passes everything the guest needs on the kernel command line (`hf.ip=…`). The same
//! keys may also come from `/etc/hyperfleet/agent.conf` (one `key=value` per line, `#` starts a
//! comment, the `hf.` prefix optional), for images that bake settings in; the command line
//! wins. Recognised keys:
//!
//! | key | meaning |
//! |---|---|
//! | `hf.modules=a,b,c` | kernel modules to load, in this order (dependencies first via `modules.dep`) |
//! | `hf.hostname=name` | hostname |
//! | `hf.ip=172.30.0.2/30` | IPv4 address/prefix of `hf.iface` |
//! | `hf.gw=172.30.0.1` | default gateway |
//! | `hf.dns=1.1.1.1,8.8.8.8` | nameservers written to `/etc/resolv.conf` |
//! | `hf.iface=eth0` | interface to configure (default `eth0`) |
//! | `hf.mtu=1500` | MTU of that interface |
//! | `hf.root=/dev/vda` | switch to this disk as root filesystem |
//! | `hf.rootfstype=ext4`, `hf.rootflags=…`, `hf.rootro=1` | how to mount it |
//! | `hf.agent_port=hf.agent` | name of the virtio-serial port for the agent channel |
//! | `hf.vsock_port=1024` | listen on this AF_VSOCK port instead, when `/dev/vsock` exists |
//! | `hf.log=debug` | log level (`error`, `warn`, `info`, `debug`) |

use std::net::Ipv4Addr;

pub(crate) const CONFIG_FILE: &str = "/etc/hyperfleet/agent.conf";
pub(crate) const DEFAULT_PORT_NAME: &str = "hf.agent";

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Config {
    pub modules: Vec<String>,
    pub hostname: Option<String>,
    pub ip: Option<(Ipv4Addr, u8)>,
    pub gw: Option<Ipv4Addr>,
    pub dns: Vec<Ipv4Addr>,
    pub iface: String,
    pub mtu: Option<u32>,
    pub root: Option<String>,
    pub rootfstype: String,
    pub rootflags: Option<String>,
    pub root_ro: bool,
    pub agent_port: String,
    pub vsock_port: Option<u32>,
    pub log: Option<String>,
    /// Keys that were present but could not be understood, for the log.
    pub invalid: Vec<String>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            modules: Vec::new(),
            hostname: None,
            ip: None,
            gw: None,
            dns: Vec::new(),
            iface: "eth0".into(),
            mtu: None,
            root: None,
            rootfstype: "ext4".into(),
            rootflags: None,
            root_ro: false,
            agent_port: DEFAULT_PORT_NAME.into(),
            vsock_port: None,
            log: None,
            invalid: Vec::new(),
        }
    }
}

impl Config {
    /// Builds the configuration from the config file's text (if any), then the command line.
    pub(crate) fn parse(cmdline: &str, file: Option<&str>) -> Config {
        let mut c = Config::default();
        if let Some(f) = file {
            for line in f.lines() {
                let line = line.split('#').next().unwrap_or("").trim();
                if let Some((k, v)) = line.split_once('=') {
                    let k = k.trim();
                    let k = k.strip_prefix("hf.").unwrap_or(k);
                    c.set(k, v.trim());
                }
            }
        }
        for word in cmdline.split_whitespace() {
            if let Some((k, v)) = word.split_once('=') {
                if let Some(k) = k.strip_prefix("hf.") {
                    c.set(k, v);
                }
            }
        }
        c
    }

    fn set(&mut self, key: &str, v: &str) {
        let ok = match key {
            "modules" => {
                self.modules = v
                    .split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(String::from)
                    .collect();
                true
            }
            "hostname" => {
                self.hostname = Some(v.to_string());
                !v.is_empty()
            }
            "ip" => match parse_cidr(v) {
                Some(x) => {
                    self.ip = Some(x);
                    true
                }
                None => false,
            },
            "gw" => v.parse().map(|g| self.gw = Some(g)).is_ok(),
            "dns" => {
                let parsed: Result<Vec<Ipv4Addr>, _> = v
                    .split(',')
                    .filter(|s| !s.is_empty())
                    .map(str::parse)
                    .collect();
                parsed.map(|d| self.dns = d).is_ok()
            }
            "iface" => {
                self.iface = v.to_string();
                !v.is_empty() && v.len() < libc::IFNAMSIZ
            }
            "mtu" => v.parse().map(|m| self.mtu = Some(m)).is_ok(),
            "root" => {
                self.root = (!v.is_empty()).then(|| v.to_string());
                true
            }
            "rootfstype" => {
                self.rootfstype = v.to_string();
                true
            }
            "rootflags" => {
                self.rootflags = Some(v.to_string());
                true
            }
            "rootro" => {
                self.root_ro = matches!(v, "1" | "true" | "yes");
                true
            }
            "agent_port" => {
                self.agent_port = v.to_string();
                true
            }
            "vsock_port" => v.parse().map(|p| self.vsock_port = Some(p)).is_ok(),
            "log" => {
                self.log = Some(v.to_string());
                true
            }
            _ => true, // Unknown keys belong to newer agents or other tools.
        };
        if !ok {
            self.invalid.push(format!("hf.{key}={v}"));
        }
    }
}

fn parse_cidr(v: &str) -> Option<(Ipv4Addr, u8)> {
    let (a, p) = v.split_once('/').unwrap_or((v, "32"));
    let p: u8 = p.parse().ok()?;
    (p <= 32).then_some(())?;
    Some((a.parse().ok()?, p))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_and_file() {
        let file = "# baked in\nmodules = virtio_ring,virtio\nhf.hostname=fromfile\nlog=debug\n";
        let c = Config::parse(
            "console=ttyS0 quiet hf.hostname=vm1 hf.ip=172.30.0.2/30 hf.gw=172.30.0.1 \
             hf.dns=1.1.1.1,8.8.8.8 hf.root=/dev/vda hf.vsock_port=1024 hf.mtu=abc hf.future=1",
            Some(file),
        );
        assert_eq!(c.modules, vec!["virtio_ring", "virtio"]);
        assert_eq!(c.hostname.as_deref(), Some("vm1"));
        assert_eq!(c.ip, Some((Ipv4Addr::new(172, 30, 0, 2), 30)));
        assert_eq!(c.gw, Some(Ipv4Addr::new(172, 30, 0, 1)));
        assert_eq!(
            c.dns,
            vec![Ipv4Addr::new(1, 1, 1, 1), Ipv4Addr::new(8, 8, 8, 8)]
        );
        assert_eq!(c.root.as_deref(), Some("/dev/vda"));
        assert_eq!(c.rootfstype, "ext4");
        assert_eq!(c.vsock_port, Some(1024));
        assert_eq!(c.agent_port, DEFAULT_PORT_NAME);
        assert_eq!(c.log.as_deref(), Some("debug"));
        assert_eq!(c.invalid, vec!["hf.mtu=abc"]);
        assert_eq!(
            parse_cidr("10.0.0.1"),
            Some((Ipv4Addr::new(10, 0, 0, 1), 32))
        );
        assert_eq!(parse_cidr("10.0.0.1/33"), None);
    }
}

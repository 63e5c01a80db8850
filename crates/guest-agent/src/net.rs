//! Guest networking from the command line: loopback up, one IPv4 interface, default route,
//! resolv.conf; and [`renew`], the same interface given a new MAC, address, route and DNS by
//! a `refresh` after a restore into a new machine.
//!
//! Deliberately the classic `ioctl` interface (SIOCSIFADDR, SIOCSIFNETMASK, SIOCSIFFLAGS,
//! SIOCSIFHWADDR, SIOCADDRT, SIOCDELRT) rather than netlink: it is a handful of fixed-size
//! structs, needs no crate, and covers exactly what a guest with one static address needs.

use std::ffi::CStr;
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::time::{Duration, Instant};

use hyperfleet_agent_proto::{MacAddr, NetworkIdentity, RefreshStepKind, RemoteError};

use crate::config::Config;
use crate::{info, warn};

/// `struct rtentry` from `<linux/route.h>` (libc does not export it for glibc targets).
#[repr(C)]
struct RtEntry {
    rt_pad1: libc::c_ulong,
    rt_dst: libc::sockaddr,
    rt_gateway: libc::sockaddr,
    rt_genmask: libc::sockaddr,
    rt_flags: libc::c_ushort,
    rt_pad2: libc::c_short,
    rt_pad3: libc::c_ulong,
    rt_pad4: *mut libc::c_void,
    rt_metric: libc::c_short,
    rt_dev: *mut libc::c_char,
    rt_mtu: libc::c_ulong,
    rt_window: libc::c_ulong,
    rt_irtt: libc::c_ushort,
}

/// Netmask of a prefix length.
pub(crate) fn prefix_to_mask(prefix: u8) -> Ipv4Addr {
    let bits = if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(prefix.min(32)))
    };
    Ipv4Addr::from(bits)
}

fn sockaddr_in(a: Ipv4Addr) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(a).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr have the same size (16 bytes) and sockaddr is plain
    // bytes; this is the conversion the socket API is designed around.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

struct Ctl(OwnedFd);

impl Ctl {
    fn new() -> io::Result<Ctl> {
        // SAFETY: plain socket creation; the result is checked.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a new descriptor owned by nobody else.
        Ok(Ctl(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    fn ifreq(name: &str) -> io::Result<libc::ifreq> {
        if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains('\0') {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "bad interface name",
            ));
        }
        // SAFETY: ifreq is plain old data; all-zero is valid.
        let mut r: libc::ifreq = unsafe { std::mem::zeroed() };
        for (d, s) in r.ifr_name.iter_mut().zip(name.bytes()) {
            *d = s as libc::c_char;
        }
        Ok(r)
    }

    fn ioctl<T>(&self, req: libc::c_ulong, arg: &mut T) -> io::Result<()> {
        // SAFETY: every request used in this module takes a pointer to the struct type the
        // caller passes (ifreq or rtentry), which lives for the duration of the call.
        let rc = unsafe { libc::ioctl(self.0.as_raw_fd(), req, arg as *mut T) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn up(&self, name: &str) -> io::Result<()> {
        self.set_up(name, true)
    }

    fn set_up(&self, name: &str, up: bool) -> io::Result<()> {
        let mut r = Ctl::ifreq(name)?;
        self.ioctl(libc::SIOCGIFFLAGS, &mut r)?;
        // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
        let flags = unsafe { r.ifr_ifru.ifru_flags };
        let bits = (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
        r.ifr_ifru.ifru_flags = if up { flags | bits } else { flags & !bits };
        self.ioctl(libc::SIOCSIFFLAGS, &mut r)
    }

    /// Fails with `NotFound` when the interface does not exist (in this network namespace).
    fn check_exists(&self, name: &str) -> io::Result<()> {
        let mut r = Ctl::ifreq(name)?;
        match self.ioctl(libc::SIOCGIFINDEX, &mut r) {
            Err(e) if e.raw_os_error() == Some(libc::ENODEV) => Err(io::Error::new(
                io::ErrorKind::NotFound,
                "no such network interface",
            )),
            other => other,
        }
    }

    fn hwaddr(&self, name: &str) -> io::Result<MacAddr> {
        let mut r = Ctl::ifreq(name)?;
        self.ioctl(libc::SIOCGIFHWADDR, &mut r)?;
        // SAFETY: SIOCGIFHWADDR filled the hwaddr member of the union.
        let sa = unsafe { r.ifr_ifru.ifru_hwaddr };
        let mut mac = [0u8; 6];
        for (d, s) in mac.iter_mut().zip(sa.sa_data) {
            *d = s as u8;
        }
        Ok(MacAddr(mac))
    }

    fn set_hwaddr(&self, name: &str, mac: MacAddr) -> io::Result<()> {
        let mut r = Ctl::ifreq(name)?;
        // SAFETY: sockaddr is plain old data; all-zero is valid.
        let mut sa: libc::sockaddr = unsafe { std::mem::zeroed() };
        sa.sa_family = libc::ARPHRD_ETHER;
        for (d, s) in sa.sa_data.iter_mut().zip(mac.0) {
            *d = s as libc::c_char;
        }
        r.ifr_ifru.ifru_hwaddr = sa;
        self.ioctl(libc::SIOCSIFHWADDR, &mut r)
    }

    fn set_addr(&self, name: &str, addr: Ipv4Addr, prefix: u8) -> io::Result<()> {
        let mut r = Ctl::ifreq(name)?;
        r.ifr_ifru.ifru_addr = sockaddr_in(addr);
        self.ioctl(libc::SIOCSIFADDR, &mut r)?;
        let mut r = Ctl::ifreq(name)?;
        r.ifr_ifru.ifru_netmask = sockaddr_in(prefix_to_mask(prefix));
        self.ioctl(libc::SIOCSIFNETMASK, &mut r)
    }

    fn set_mtu(&self, name: &str, mtu: u32) -> io::Result<()> {
        let mut r = Ctl::ifreq(name)?;
        r.ifr_ifru.ifru_mtu = mtu as libc::c_int;
        self.ioctl(libc::SIOCSIFMTU, &mut r)
    }

    fn default_route(&self, gw: Ipv4Addr, dev: &CStr) -> io::Result<()> {
        self.route(libc::SIOCADDRT, Some(gw), dev)
    }

    /// Removes the default route through `dev`; `Ok(false)` when there was none.
    fn del_default_route(&self, dev: &CStr) -> io::Result<bool> {
        match self.route(libc::SIOCDELRT, None, dev) {
            Ok(()) => Ok(true),
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => Ok(false),
            Err(e) => Err(e),
        }
    }

    fn route(&self, req: libc::c_ulong, gw: Option<Ipv4Addr>, dev: &CStr) -> io::Result<()> {
        let mut rt = RtEntry {
            rt_pad1: 0,
            rt_dst: sockaddr_in(Ipv4Addr::UNSPECIFIED),
            rt_gateway: sockaddr_in(gw.unwrap_or(Ipv4Addr::UNSPECIFIED)),
            rt_genmask: sockaddr_in(Ipv4Addr::UNSPECIFIED),
            rt_flags: libc::RTF_UP | if gw.is_some() { libc::RTF_GATEWAY } else { 0 },
            rt_pad2: 0,
            rt_pad3: 0,
            rt_pad4: std::ptr::null_mut(),
            rt_metric: 0,
            // The kernel only reads the device name during the ioctl.
            rt_dev: dev.as_ptr() as *mut libc::c_char,
            rt_mtu: 0,
            rt_window: 0,
            rt_irtt: 0,
        };
        self.ioctl(req, &mut rt)
    }
}

/// Brings up `lo` and, when configured, the guest interface. Failures are logged, not fatal:
/// a guest without network is still reachable through the agent channel.
pub(crate) fn configure(cfg: &Config) {
    let ctl = match Ctl::new() {
        Ok(c) => c,
        Err(e) => {
            warn!("network: cannot create control socket: {e}");
            return;
        }
    };
    // The kernel assigns 127.0.0.1/8 to lo when it comes up.
    if let Err(e) = ctl.up("lo") {
        warn!("network: bringing up lo: {e}");
    }
    let Some((ip, prefix)) = cfg.ip else { return };
    let dev = &cfg.iface;
    let t0 = Instant::now();
    while !Path::new("/sys/class/net").join(dev).exists() {
        if t0.elapsed() > Duration::from_secs(5) {
            warn!("network: interface {dev} did not appear (is virtio_net loaded?)");
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let res = ctl
        .set_addr(dev, ip, prefix)
        .and_then(|_| match cfg.mtu {
            Some(m) => ctl.set_mtu(dev, m),
            None => Ok(()),
        })
        .and_then(|_| ctl.up(dev));
    if let Err(e) = res {
        warn!("network: configuring {dev} as {ip}/{prefix}: {e}");
        return;
    }
    info!("network: {dev} is {ip}/{prefix}");
    if let Some(gw) = cfg.gw {
        let cdev = match std::ffi::CString::new(dev.as_str()) {
            Ok(c) => c,
            Err(_) => return,
        };
        match ctl.default_route(gw, &cdev) {
            Ok(()) => info!("network: default route via {gw}"),
            Err(e) => warn!("network: default route via {gw}: {e}"),
        }
    }
    if !cfg.dns.is_empty() {
        if let Err(e) = write_resolv_conf(&cfg.dns) {
            warn!("network: writing /etc/resolv.conf: {e}");
        }
    }
}

fn write_resolv_conf(dns: &[Ipv4Addr]) -> io::Result<()> {
    let text: String = dns.iter().map(|d| format!("nameserver {d}\n")).collect();
    let _ = std::fs::create_dir_all("/etc");
    std::fs::write("/etc/resolv.conf", text)
}

/// The outcome of one part of [`renew`]: what was done, or why it failed.
pub(crate) type Part = (RefreshStepKind, Result<String, RemoteError>);

/// Gives `n.iface` a new identity: interface down (which flushes its neighbour cache and the
/// routes through it), new MAC, new address and netmask, up, default route, resolv.conf. Goes
/// on after a failed part; returns one entry per part (MAC only when asked for, DNS only when
/// servers are given).
pub(crate) fn renew(n: &NetworkIdentity) -> Vec<Part> {
    let dev = n.iface.as_str();
    let fail = |what: &str, e: &io::Error| RemoteError::io(&format!("{what} of {dev}"), e);
    let mut parts = Vec::new();
    let ctl = Ctl::new().and_then(|c| c.check_exists(dev).map(|()| c));
    match &ctl {
        Err(e) => {
            if n.mac.is_some() {
                parts.push((RefreshStepKind::Mac, Err(fail("hardware address", e))));
            }
            parts.push((RefreshStepKind::Address, Err(fail("address", e))));
            parts.push((RefreshStepKind::Route, Err(fail("default route", e))));
        }
        Ok(ctl) => {
            // Down first: some drivers refuse a new MAC on a running interface, and going down
            // drops the neighbour entries and routes of the old identity.
            let down = ctl.set_up(dev, false);
            if let Some(mac) = n.mac {
                let old = ctl
                    .hwaddr(dev)
                    .map(|m| m.to_string())
                    .unwrap_or_else(|e| e.to_string());
                let r = match &down {
                    Err(e) => Err(fail("taking down", e)),
                    Ok(()) => ctl
                        .set_hwaddr(dev, mac)
                        .map(|()| format!("{dev} hardware address {mac} (was {old})"))
                        .map_err(|e| fail("hardware address", &e)),
                };
                parts.push((RefreshStepKind::Mac, r));
            }
            let (ip, prefix) = (n.address, n.prefix_len);
            let r = ctl
                .set_addr(dev, ip, prefix)
                .map_err(|e| fail("address", &e))
                .and_then(|()| ctl.up(dev).map_err(|e| fail("bringing up", &e)))
                .and_then(|()| {
                    down.as_ref().map_err(|e| fail("taking down", e))?;
                    Ok(format!("{dev} is {ip}/{prefix}, neighbour cache flushed"))
                });
            parts.push((RefreshStepKind::Address, r));
            let r = match std::ffi::CString::new(dev) {
                Err(_) => Err(RemoteError::new(
                    hyperfleet_agent_proto::ErrorCode::InvalidArgument,
                    "interface name contains NUL",
                )),
                Ok(cdev) => ctl
                    .del_default_route(&cdev)
                    .map_err(|e| fail("removing the default route", &e))
                    .and_then(|_| match n.gateway {
                        Some(gw) => ctl
                            .default_route(gw, &cdev)
                            .map(|()| format!("default route via {gw}"))
                            .map_err(|e| fail(&format!("default route via {gw}"), &e)),
                        None => Ok("no default route".to_string()),
                    }),
            };
            parts.push((RefreshStepKind::Route, r));
        }
    }
    if !n.dns.is_empty() {
        let r = write_resolv_conf(&n.dns)
            .map(|()| {
                let list: Vec<String> = n.dns.iter().map(|d| d.to_string()).collect();
                format!("/etc/resolv.conf: nameserver {}", list.join(", "))
            })
            .map_err(|e| RemoteError::io("/etc/resolv.conf", &e));
        parts.push((RefreshStepKind::Dns, r));
    }
    parts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks() {
        assert_eq!(prefix_to_mask(30), Ipv4Addr::new(255, 255, 255, 252));
        assert_eq!(prefix_to_mask(0), Ipv4Addr::new(0, 0, 0, 0));
        assert_eq!(prefix_to_mask(32), Ipv4Addr::new(255, 255, 255, 255));
        assert_eq!(prefix_to_mask(8), Ipv4Addr::new(255, 0, 0, 0));
        assert_eq!(std::mem::size_of::<RtEntry>(), 120);
    }
}

//! Guest networking from the command line: loopback up, one IPv4 interface, default route,
//! resolv.conf.
//!
//! Deliberately the classic `ioctl` interface (SIOCSIFADDR, SIOCSIFNETMASK, SIOCSIFFLAGS,
//! SIOCADDRT) rather than netlink: it is a handful of fixed-size structs, needs no crate, and
//! covers exactly what a guest with one static address needs.

use std::ffi::CStr;
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::time::{Duration, Instant};

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
        let mut r = Ctl::ifreq(name)?;
        self.ioctl(libc::SIOCGIFFLAGS, &mut r)?;
        // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
        let flags = unsafe { r.ifr_ifru.ifru_flags };
        r.ifr_ifru.ifru_flags = flags | (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
        self.ioctl(libc::SIOCSIFFLAGS, &mut r)
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
        let mut rt = RtEntry {
            rt_pad1: 0,
            rt_dst: sockaddr_in(Ipv4Addr::UNSPECIFIED),
            rt_gateway: sockaddr_in(gw),
            rt_genmask: sockaddr_in(Ipv4Addr::UNSPECIFIED),
            rt_flags: libc::RTF_UP | libc::RTF_GATEWAY,
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
        self.ioctl(libc::SIOCADDRT, &mut rt)
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
        let text: String = cfg
            .dns
            .iter()
            .map(|d| format!("nameserver {d}\n"))
            .collect();
        let _ = std::fs::create_dir_all("/etc");
        if let Err(e) = std::fs::write("/etc/resolv.conf", text) {
            warn!("network: writing /etc/resolv.conf: {e}");
        }
    }
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

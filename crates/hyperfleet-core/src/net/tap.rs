//! TAP devices: made persistent with the TUN driver's ioctls, configured and
//! removed through rtnetlink.
//!
//! The kernel has no netlink call that creates a TAP device (the tun driver
//! refuses `RTM_NEWLINK`), so creation is the one `TUNSETIFF` + `TUNSETPERSIST`
//! pair every tool uses; everything after that (address, link up, delete,
//! listing) goes through netlink. Nothing here shells out.
//!
//! Every function is idempotent: `ensure` on a configured device changes
//! nothing, `remove` of a missing device succeeds.

use std::ffi::CString;
use std::io;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use futures_util::TryStreamExt;
use rtnetlink::packet_route::link::{InfoKind, LinkAttribute, LinkInfo, LinkMessage};
use rtnetlink::{Handle, LinkUnspec};

/// A TAP operation failed; `what` says which and on which device.
#[derive(Debug, thiserror::Error)]
#[error("{what}: {source}")]
pub struct TapError {
    pub what: String,
    #[source]
    pub source: io::Error,
}

fn err(what: impl Into<String>, source: io::Error) -> TapError {
    TapError {
        what: what.into(),
        source,
    }
}

pub(crate) fn nl_err(what: String, e: rtnetlink::Error) -> TapError {
    let source = match e {
        rtnetlink::Error::NetlinkError(m) => m.to_io(),
        other => io::Error::other(other.to_string()),
    };
    err(what, source)
}

/// The raw errno of a netlink failure, if it carried one.
fn nl_errno(e: &rtnetlink::Error) -> Option<i32> {
    match e {
        rtnetlink::Error::NetlinkError(m) => Some(m.raw_code().abs()),
        _ => None,
    }
}

/// Whether a netlink failure is errno `code`.
pub(crate) fn errno_is(e: &rtnetlink::Error, code: i32) -> bool {
    nl_errno(e) == Some(code)
}

/// A netlink connection on the current network namespace, driven by a task
/// that ends when the handle is dropped.
pub(crate) fn connect() -> Result<Handle, TapError> {
    let (conn, handle, _) =
        rtnetlink::new_connection().map_err(|e| err("opening a netlink socket", e))?;
    tokio::spawn(conn);
    Ok(handle)
}

/// How long an attach waits out a busy TAP device (see [`attach`]).
const ATTACH_BUSY_FOR: std::time::Duration = std::time::Duration::from_millis(500);

/// Opens `/dev/net/tun` and attaches it to TAP device `name` (creating a
/// non-persistent one if there is none) with `flags` (`IFF_*`): the file
/// descriptor a VMM moves the device's frames through.
pub(crate) fn attach(name: &str, flags: libc::c_short) -> Result<OwnedFd, TapError> {
    let what = |step: &str| format!("{step} for TAP device {name}");
    let path = c"/dev/net/tun";
    // SAFETY: `path` is a valid NUL-terminated string; open has no other
    // preconditions.
    let fd = unsafe { libc::open(path.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(err(
            what("opening /dev/net/tun"),
            io::Error::last_os_error(),
        ));
    }
    // SAFETY: `fd` was just returned by open and is owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    let cname = CString::new(name).map_err(|_| {
        err(
            what("naming the device"),
            io::Error::from(io::ErrorKind::InvalidInput),
        )
    })?;
    let bytes = cname.as_bytes_with_nul();
    if bytes.len() > ifr.ifr_name.len() {
        return Err(err(
            what("naming the device"),
            io::Error::other("the name is longer than 15 characters"),
        ));
    }
    for (dst, src) in ifr.ifr_name.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    ifr.ifr_ifru.ifru_flags = flags;
    // A single-queue TAP takes one descriptor at a time. A child the daemon
    // forked for another machine holds a copy of every descriptor until it
    // execs (close-on-exec acts only then), so an attach made just before
    // that fork — the device's creation, or this machine's previous attach
    // — can make this one fail with EBUSY for those few milliseconds. It is
    // retried for a while; a device another live process holds stays busy
    // and fails with the error.
    let deadline = std::time::Instant::now() + ATTACH_BUSY_FOR;
    loop {
        let mut req = ifr;
        // SAFETY: TUNSETIFF reads and writes an ifreq, which `req` is; `fd` is open.
        if unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETIFF, &mut req) } == 0 {
            return Ok(fd);
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EBUSY) || std::time::Instant::now() >= deadline {
            return Err(err(what("TUNSETIFF"), e));
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
}

/// Makes a persistent TAP device `name` owned by `owner` (when given), so a
/// VMM can attach to it later by name and the device outlives the daemon.
pub(crate) fn create_persistent(name: &str, owner: Option<u32>) -> Result<(), TapError> {
    let what = |step: &str| format!("{step} for TAP device {name}");
    let fd = attach(name, (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short)?;
    if let Some(uid) = owner {
        // SAFETY: TUNSETOWNER takes the uid by value; `fd` is attached.
        if unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETOWNER, libc::c_ulong::from(uid)) } < 0 {
            return Err(err(what("TUNSETOWNER"), io::Error::last_os_error()));
        }
    }
    // SAFETY: TUNSETPERSIST takes a flag by value; `fd` is attached.
    if unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETPERSIST, 1 as libc::c_ulong) } < 0 {
        return Err(err(what("TUNSETPERSIST"), io::Error::last_os_error()));
    }
    Ok(())
}

async fn link(h: &Handle, name: &str) -> Result<Option<LinkMessage>, TapError> {
    let mut links = h.link().get().match_name(name.to_string()).execute();
    match links.try_next().await {
        Ok(m) => Ok(m),
        Err(e) if nl_errno(&e) == Some(libc::ENODEV) => Ok(None),
        Err(e) => Err(nl_err(format!("looking up device {name}"), e)),
    }
}

pub(crate) async fn link_index(h: &Handle, name: &str) -> Result<Option<u32>, TapError> {
    Ok(link(h, name).await?.map(|m| m.header.index))
}

/// Whether device `name` exists and is a veth (the host end of a machine
/// namespace's link) rather than a TAP.
pub(crate) async fn is_veth(h: &Handle, name: &str) -> Result<bool, TapError> {
    Ok(link(h, name).await?.is_some_and(|m| {
        m.attributes.iter().any(|a| {
            matches!(a, LinkAttribute::LinkInfo(infos)
                if infos.contains(&LinkInfo::Kind(InfoKind::Veth)))
        })
    }))
}

/// Makes sure TAP device `name` exists, carries `gateway/prefix_len` (the
/// host end of the machine's point-to-point link; the kernel derives the
/// connected route) and is up.
pub async fn ensure(
    name: &str,
    gateway: Ipv4Addr,
    prefix_len: u8,
    owner: Option<u32>,
) -> Result<(), TapError> {
    let h = connect()?;
    if is_veth(&h, name).await? {
        // The host end of a machine namespace's link, left by a jailed run.
        remove(name).await?;
    }
    let index = match link_index(&h, name).await? {
        Some(i) => i,
        None => {
            let n = name.to_string();
            tokio::task::spawn_blocking(move || create_persistent(&n, owner))
                .await
                .map_err(|e| err(format!("creating TAP device {name}"), io::Error::other(e)))??;
            link_index(&h, name).await?.ok_or_else(|| {
                err(
                    format!("finding TAP device {name} after creating it"),
                    io::Error::from(io::ErrorKind::NotFound),
                )
            })?
        }
    };
    // The same MAC every time the machine's TAP is made: a guest resumed
    // from memory still has the gateway's MAC in its ARP cache, and with a
    // new random one it could not answer for ~5 s (until its neighbour
    // entry went through DELAY and PROBE): measured on wakes.
    h.link()
        .set(
            LinkUnspec::new_with_index(index)
                .address(tap_mac(gateway).to_vec())
                .build(),
        )
        .execute()
        .await
        .map_err(|e| nl_err(format!("setting the MAC address of {name}"), e))?;
    address_up(&h, name, index, gateway, prefix_len).await
}

/// The host end's MAC of the link whose host address is `gateway`
/// (locally administered, unicast; the guest's own is `02:68:<its IP>`).
pub(crate) fn tap_mac(gateway: Ipv4Addr) -> [u8; 6] {
    let o = gateway.octets();
    [0x02, 0x67, o[0], o[1], o[2], o[3]]
}

/// Gives device `name` (at `index`) the address `ip/prefix_len` (the kernel
/// derives the connected route) and brings it up. Idempotent.
pub(crate) async fn address_up(
    h: &Handle,
    name: &str,
    index: u32,
    ip: Ipv4Addr,
    prefix_len: u8,
) -> Result<(), TapError> {
    match h
        .address()
        .add(index, IpAddr::V4(ip), prefix_len)
        .execute()
        .await
    {
        Ok(()) => {}
        Err(e) if nl_errno(&e) == Some(libc::EEXIST) => {}
        Err(e) => return Err(nl_err(format!("adding {ip}/{prefix_len} to {name}"), e)),
    }
    h.link()
        .set(LinkUnspec::new_with_index(index).up().build())
        .execute()
        .await
        .map_err(|e| nl_err(format!("bringing {name} up"), e))?;
    Ok(())
}

/// Deletes TAP device `name`; a missing device is not an error.
pub async fn remove(name: &str) -> Result<(), TapError> {
    let h = connect()?;
    let Some(index) = link_index(&h, name).await? else {
        return Ok(());
    };
    match h.link().del(index).execute().await {
        Ok(()) => Ok(()),
        Err(e) if nl_errno(&e) == Some(libc::ENODEV) => Ok(()),
        Err(e) => Err(nl_err(format!("deleting TAP device {name}"), e)),
    }
}

/// Names of every network device in this namespace for which `keep`
/// returns true.
pub async fn list(keep: impl Fn(&str) -> bool) -> Result<Vec<String>, TapError> {
    let h = connect()?;
    let mut links = h.link().get().execute();
    let mut out = Vec::new();
    while let Some(msg) = links
        .try_next()
        .await
        .map_err(|e| nl_err("listing network devices".into(), e))?
    {
        if let Some(name) = link_name(&msg) {
            if keep(&name) {
                out.push(name);
            }
        }
    }
    Ok(out)
}

fn link_name(msg: &LinkMessage) -> Option<String> {
    msg.attributes.iter().find_map(|a| match a {
        LinkAttribute::IfName(n) => Some(n.clone()),
        _ => None,
    })
}

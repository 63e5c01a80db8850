//! Per-machine network namespaces, for VMMs that run in one (jailed
//! Firecracker): the namespace itself, the veth pair that links it to the
//! daemon's namespace, and the addresses and routes on both ends.
//!
//! A machine's namespace is `/run/netns/hfns-<daemon netns>-<TAP name>`,
//! bind-mounted there as `ip netns add` does (so `ip netns exec` works on
//! it); `<daemon netns>` is the inode of the daemon's own network namespace
//! in hex, so daemons in different namespaces (each with its own TAP names
//! and table) never share or sweep each other's; daemons sharing a namespace
//! have different TAP prefixes, and the startup sweep takes only namespaces
//! of its own prefix's TAPs ([`list`]). Inside it the machine's TAP
//! is [`INNER_TAP`] with the guest's gateway as today, and the namespace
//! routes between it and [`UPLINK`]. The uplink's peer on the host is named
//! like the machine's TAP, so the nftables table's per-machine rules (which
//! match that name) apply to it unchanged:
//!
//! ```text
//! host:  <tap> (veth) 169.254.0.1/30      route <guest ip>/32 via 169.254.0.2 dev <tap>
//!          |
//! netns: uplink0 (veth) 169.254.0.2/30    default via 169.254.0.1; ip_forward = 1
//!        tap0 (TAP) <gateway>/30          the guest is on the other end
//! ```
//!
//! Every namespace uses the same link addresses: each lives on its own veth,
//! and the host's routes name the device. The host reaches the guest (the
//! proxy) from 169.254.0.1. Nothing here shells out: the namespace is made
//! with `unshare` + a bind mount from a thread of its own, devices and routes
//! through rtnetlink (a netlink socket opened inside a namespace stays bound
//! to it), the TAP with the TUN ioctls from a thread inside the namespace.

use std::ffi::{CStr, CString};
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use rtnetlink::packet_route::link::{InfoData, InfoVeth};
use rtnetlink::{Handle, LinkMessageBuilder, LinkUnspec, LinkVeth, RouteMessageBuilder};

use super::tap::{self, TapError};

/// Where named network namespaces are bind-mounted (as by `ip netns`).
pub(crate) const NETNS_DIR: &str = "/run/netns";
/// Every machine namespace's name starts with this.
pub(crate) const PREFIX: &str = "hfns-";
/// The machine's TAP device inside its namespace.
pub(crate) const INNER_TAP: &str = "tap0";
/// The namespace's end of the veth pair.
pub(crate) const UPLINK: &str = "uplink0";
/// The host's end of every machine's veth link.
pub(crate) const HOST_LINK: Ipv4Addr = Ipv4Addr::new(169, 254, 0, 1);
/// The namespace's end of every machine's veth link.
pub(crate) const NS_LINK: Ipv4Addr = Ipv4Addr::new(169, 254, 0, 2);
const LINK_PREFIX: u8 = 30;
/// `statfs` type of a namespace file (`NSFS_MAGIC`).
const NSFS_MAGIC: i64 = 0x6e73_6673;

fn err(what: impl Into<String>, source: io::Error) -> TapError {
    TapError {
        what: what.into(),
        source,
    }
}

/// The daemon's own network namespace, as the hex inode that scopes its
/// machine namespaces' names.
fn own_scope() -> String {
    std::fs::metadata("/proc/thread-self/ns/net")
        .map(|m| format!("{:x}", m.ino()))
        .unwrap_or_else(|_| "0".into())
}

/// The namespace name of the machine whose TAP is `tap`.
pub(crate) fn name_for(tap: &str) -> String {
    format!("{PREFIX}{}-{tap}", own_scope())
}

/// The namespace path of the machine whose TAP is `tap` (for `--netns`).
pub(crate) fn path_for(tap: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(name_for(tap))
}

/// The TAP name of a machine namespace of this daemon's, else None.
pub(crate) fn tap_of(ns_name: &str) -> Option<&str> {
    let scope = format!("{PREFIX}{}-", own_scope());
    ns_name.strip_prefix(scope.as_str())
}

/// This daemon's machine namespaces (by name): see [`ours`].
pub(crate) fn list(tap_prefix: &str) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(NETNS_DIR) else {
        return Vec::new();
    };
    ours(
        entries
            .flatten()
            .filter_map(|e| e.file_name().into_string().ok()),
        tap_prefix,
    )
}

/// The names of this daemon's machine namespaces: in its scope, and for a
/// TAP of its own naming (`tap_prefix`). Two daemons sharing a network
/// namespace share the scope but not the prefix (nor the nftables table),
/// so neither sweeps the other's.
fn ours(names: impl IntoIterator<Item = String>, tap_prefix: &str) -> Vec<String> {
    names
        .into_iter()
        .filter(|n| tap_of(n).is_some_and(|tap| super::lease::is_our_tap(tap_prefix, tap)))
        .collect()
}

/// Whether `path` is a mounted namespace file (not a leftover placeholder
/// of a creation cut short).
fn is_mounted_ns(path: &Path) -> bool {
    let Ok(c) = CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    // SAFETY: statfs is plain old data; all-zero is a valid value.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is NUL-terminated and `st` is a valid statfs to write.
    let rc = unsafe { libc::statfs(c.as_ptr(), &mut st) };
    rc == 0 && st.f_type as i64 == NSFS_MAGIC
}

fn cstr(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a path with a NUL byte"))
}

fn check(rc: libc::c_int) -> io::Result<()> {
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Makes `/run/netns` a shared mount point, as `ip netns add` does, so that
/// namespace mounts propagate to mount namespaces made later.
fn share_netns_dir() -> io::Result<()> {
    std::fs::create_dir_all(NETNS_DIR)?;
    let dir = cstr(Path::new(NETNS_DIR))?;
    let shared = || mount(c"none", &dir, libc::MS_SHARED | libc::MS_REC);
    match shared() {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            // Not a mount point yet: bind it onto itself first.
            mount(&dir, &dir, libc::MS_BIND | libc::MS_REC)?;
            shared()
        }
        Err(e) => Err(e),
    }
}

/// `mount(src, target, "none", flags, NULL)`: binds and propagation changes.
fn mount(src: &CStr, target: &CStr, flags: libc::c_ulong) -> io::Result<()> {
    let none = c"none";
    // SAFETY: valid NUL-terminated strings that outlive the call; no data
    // argument.
    check(unsafe {
        libc::mount(
            src.as_ptr(),
            target.as_ptr(),
            none.as_ptr(),
            flags,
            std::ptr::null(),
        )
    })
}

/// Runs `f` on a thread of its own inside the namespace at `path` (a fresh
/// thread, so the caller's and the runtime's threads never change
/// namespace).
fn inside<T: Send + 'static>(
    path: &Path,
    f: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    let ns = std::fs::File::open(path)?;
    std::thread::spawn(move || {
        // SAFETY: setns on an open namespace file; it moves only this
        // thread, which ends when `f` returns.
        check(unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) })?;
        f()
    })
    .join()
    .map_err(|_| io::Error::other("a thread inside the namespace panicked"))?
}

/// Creates the named namespace (idempotent: an existing one is kept, a
/// placeholder left by a creation cut short is completed). Returns whether
/// it was created now.
pub(crate) fn add(name: &str) -> Result<bool, TapError> {
    let path = Path::new(NETNS_DIR).join(name);
    if is_mounted_ns(&path) {
        return Ok(false);
    }
    let what = format!("creating the network namespace {}", path.display());
    {
        // One at a time: two runs racing here could stack two bind mounts.
        static SHARING: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let _one = SHARING
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        share_netns_dir().map_err(|e| err(format!("{what} (sharing {NETNS_DIR})"), e))?;
    }
    std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| err(what.clone(), e))?;
    let target = cstr(&path).map_err(|e| err(what.clone(), e))?;
    std::thread::spawn(move || -> io::Result<()> {
        // SAFETY: unshare moves only this thread, which ends below, into a
        // new network namespace.
        check(unsafe { libc::unshare(libc::CLONE_NEWNET) })?;
        mount(c"/proc/thread-self/ns/net", &target, libc::MS_BIND)
    })
    .join()
    .map_err(|_| {
        err(
            what.clone(),
            io::Error::other("the namespace thread panicked"),
        )
    })?
    .map_err(|e| err(what, e))?;
    Ok(true)
}

/// Removes the named namespace (unmounts and unlinks it; the kernel frees
/// it, and the devices in it, once no process is in it). Idempotent.
pub(crate) fn remove(name: &str) -> Result<(), TapError> {
    let path = Path::new(NETNS_DIR).join(name);
    let what = format!("removing the network namespace {}", path.display());
    let c = cstr(&path).map_err(|e| err(what.clone(), e))?;
    // SAFETY: a valid NUL-terminated path.
    if let Err(e) = check(unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) }) {
        // EINVAL: not mounted (a placeholder); ENOENT: gone already.
        if !matches!(e.raw_os_error(), Some(libc::EINVAL) | Some(libc::ENOENT)) {
            return Err(err(what, e));
        }
    }
    crate::util::absent_ok(std::fs::remove_file(&path)).map_err(|e| err(what, e))
}

/// Runs blocking work (threads that change namespace, mounts) off the
/// runtime's threads.
async fn off_runtime<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, TapError> + Send + 'static,
) -> Result<T, TapError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| err("a namespace task", io::Error::other(e)))?
}

/// A netlink connection inside the namespace at `path`.
fn connect_inside(path: &Path) -> Result<Handle, TapError> {
    // The socket registers with the runtime's reactor: enter it there.
    let rt = tokio::runtime::Handle::current();
    let (conn, handle, _) = inside(path, move || {
        let _in_runtime = rt.enter();
        rtnetlink::new_connection()
    })
    .map_err(|e| err(format!("opening a netlink socket in {}", path.display()), e))?;
    tokio::spawn(conn);
    Ok(handle)
}

/// Makes sure machine `tap`'s namespace, veth link and routes exist (the
/// TAP inside is [`ensure_tap`]'s). Idempotent.
pub(crate) async fn ensure_link(tap: &str, guest: Ipv4Addr) -> Result<(), TapError> {
    let name = name_for(tap);
    let path = Path::new(NETNS_DIR).join(&name);
    let fresh = off_runtime({
        let (name, path) = (name.clone(), path.clone());
        move || {
            let fresh = add(&name)?;
            // Routing between the TAP and the uplink (a per-namespace
            // setting, written from a thread inside it).
            inside(&path, || {
                std::fs::write("/proc/sys/net/ipv4/ip_forward", "1\n")
            })
            .map_err(|e| err(format!("enabling ip_forward in {name}"), e))?;
            Ok(fresh)
        }
    })
    .await?;
    let host = tap::connect()?;
    let existing = tap::link_index(&host, tap).await?;
    if existing.is_some() && (fresh || !tap::is_veth(&host, tap).await?) {
        // A device of that name from before (a TAP of an unjailed run, or a
        // veth whose namespace is gone) is not this namespace's.
        tap::remove(tap).await?;
    }
    let host_index =
        match tap::link_index(&host, tap).await? {
            Some(i) => i,
            None => {
                let ns = std::fs::File::open(&path)
                    .map_err(|e| err(format!("opening {}", path.display()), e))?;
                let peer = LinkMessageBuilder::<LinkUnspec>::new()
                    .name(UPLINK.to_string())
                    .setns_by_fd(ns.as_raw_fd())
                    .build();
                let msg = LinkVeth::new(tap, UPLINK)
                    .set_info_data(InfoData::Veth(InfoVeth::Peer(peer)))
                    .build();
                host.link().add(msg).execute().await.map_err(|e| {
                    tap::nl_err(format!("creating the veth pair {tap}/{UPLINK}"), e)
                })?;
                tap::link_index(&host, tap).await?.ok_or_else(|| {
                    err(
                        format!("finding {tap} after creating it"),
                        io::Error::from(io::ErrorKind::NotFound),
                    )
                })?
            }
        };
    tap::address_up(&host, tap, host_index, HOST_LINK, LINK_PREFIX).await?;

    let inner = connect_inside(&path)?;
    let uplink = tap::link_index(&inner, UPLINK).await?.ok_or_else(|| {
        err(
            format!("finding {UPLINK} in {name}"),
            io::Error::from(io::ErrorKind::NotFound),
        )
    })?;
    tap::address_up(&inner, UPLINK, uplink, NS_LINK, LINK_PREFIX).await?;
    if let Some(lo) = tap::link_index(&inner, "lo").await? {
        inner
            .link()
            .set(LinkUnspec::new_with_index(lo).up().build())
            .execute()
            .await
            .map_err(|e| tap::nl_err(format!("bringing lo up in {name}"), e))?;
    }
    let default = RouteMessageBuilder::<Ipv4Addr>::new()
        .gateway(HOST_LINK)
        .output_interface(uplink)
        .build();
    add_route(&inner, default, &format!("the default route in {name}")).await?;
    let to_guest = RouteMessageBuilder::<Ipv4Addr>::new()
        .destination_prefix(guest, 32)
        .gateway(NS_LINK)
        .output_interface(host_index)
        .build();
    add_route(&host, to_guest, &format!("the route to {guest} via {tap}")).await
}

async fn add_route(
    h: &Handle,
    msg: rtnetlink::packet_route::route::RouteMessage,
    what: &str,
) -> Result<(), TapError> {
    match h.route().add(msg).execute().await {
        Ok(()) => Ok(()),
        Err(e) if tap::errno_is(&e, libc::EEXIST) => Ok(()),
        Err(e) => Err(tap::nl_err(format!("adding {what}"), e)),
    }
}

/// Makes sure the TAP inside machine `tap`'s namespace exists, owned by
/// `owner`, with the guest's gateway, and up. Idempotent.
pub(crate) async fn ensure_tap(
    tap: &str,
    gateway: Ipv4Addr,
    prefix_len: u8,
    owner: Option<u32>,
) -> Result<(), TapError> {
    let path = path_for(tap);
    let inner = connect_inside(&path)?;
    let index = match tap::link_index(&inner, INNER_TAP).await? {
        Some(i) => i,
        None => {
            let p = path.clone();
            off_runtime(move || {
                inside(&p, move || {
                    tap::create_persistent(INNER_TAP, owner)
                        .map_err(|e| io::Error::other(e.to_string()))
                })
                .map_err(|e| err(format!("creating {INNER_TAP} in {}", p.display()), e))
            })
            .await?;
            tap::link_index(&inner, INNER_TAP).await?.ok_or_else(|| {
                err(
                    format!("finding {INNER_TAP} after creating it"),
                    io::Error::from(io::ErrorKind::NotFound),
                )
            })?
        }
    };
    tap::address_up(&inner, INNER_TAP, index, gateway, prefix_len).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_scoped_to_this_namespace_and_lead_back_to_the_tap() {
        let name = name_for("hfac1e0002");
        assert!(name.starts_with(PREFIX), "{name}");
        assert!(name.ends_with("-hfac1e0002"), "{name}");
        assert_eq!(tap_of(&name), Some("hfac1e0002"));
        assert_eq!(path_for("hfac1e0002"), Path::new(NETNS_DIR).join(&name));
        // Another daemon's namespace (another scope) and foreign names are
        // not ours.
        assert_eq!(tap_of("hfns-1-hfac1e0002"), None);
        assert_eq!(tap_of("hfac1e0002"), None);
        assert_eq!(tap_of("vmms"), None);
    }

    #[test]
    fn a_daemon_lists_only_the_namespaces_of_its_own_taps() {
        let mine = name_for("hfac1e0002");
        let names = [
            mine.clone(),
            // Another daemon in the same namespace, with prefix `hfb`.
            name_for("hfbac1e0006"),
            // Another daemon in another namespace, with the same prefix.
            "hfns-1-hfac1e000a".to_string(),
            // Not a TAP of the naming scheme.
            name_for("hfzz"),
            "vmms".to_string(),
        ];
        assert_eq!(ours(names.clone(), "hf"), vec![mine]);
        assert_eq!(ours(names, "hfb"), vec![name_for("hfbac1e0006")]);
    }

    #[test]
    fn removing_a_namespace_that_does_not_exist_succeeds() {
        remove(&name_for("hfnothere0")).unwrap();
    }
}

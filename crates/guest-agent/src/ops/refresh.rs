//! `refresh`: a new identity for a guest whose memory was restored into a new machine, or a
//! fresh clock and entropy after a resume.
//!
//! Parts run in a fixed order, each reported on its own, and a failed part does not stop the
//! next: clock (`clock_settime`), entropy (`RNDADDENTROPY` credited, then `RNDRESEEDCRNG`, so
//! two clones' `/dev/urandom` differ at once), running exec sessions (killed and reaped), the
//! network ([`crate::net::renew`]), hostname, `/etc/machine-id` (on a read-only root, a file
//! under `/run` bind-mounted over it, as systemd does), and the boot id. The
//! kernel's `/proc/sys/kernel/random/boot_id` cannot be written, so the agent writes the new
//! id to [`BOOT_ID_FILE`] and bind-mounts that file over it (once; later refreshes rewrite the
//! same file in place, so the mount keeps showing it). Every part is idempotent; refreshes
//! run one at a time.

use std::io;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::Path;
use std::time::{Duration, Instant};

use hyperfleet_agent_proto::{
    ErrorCode, RefreshReport, RefreshRequest, RefreshStep, RefreshStepKind, RemoteError, Reply,
    MAX_ENTROPY,
};

use crate::session::Services;
use crate::{debug, info, warn};

/// The file bind-mounted over [`PROC_BOOT_ID`]; `/run` is a tmpfs, so it goes with the boot.
pub(crate) const BOOT_ID_FILE: &str = "/run/hyperfleet/boot_id";
/// The file bind-mounted over [`MACHINE_ID`] when the root file system is read-only.
const MACHINE_ID_FILE: &str = "/run/hyperfleet/machine-id";
const PROC_BOOT_ID: &str = "/proc/sys/kernel/random/boot_id";
const MACHINE_ID: &str = "/etc/machine-id";
const HOSTNAME_FILE: &str = "/etc/hostname";
const HOSTS_FILE: &str = "/etc/hosts";
/// How long a refresh waits for dropped exec sessions to be reaped.
const DROP_WAIT: Duration = Duration::from_secs(5);

/// `RNDADDENTROPY` = `_IOW('R', 0x03, int[2])` from `<linux/random.h>` (not in libc).
const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
/// `RNDRESEEDCRNG` = `_IO('R', 0x07)`.
const RNDRESEEDCRNG: libc::c_ulong = 0x5207;

/// `struct rand_pool_info` with room for the most entropy a request may carry.
#[repr(C)]
struct RandPoolInfo {
    entropy_count: libc::c_int,
    buf_size: libc::c_int,
    buf: [u8; MAX_ENTROPY],
}

pub(super) async fn refresh(req: RefreshRequest, svc: &Services) -> Result<Reply, RemoteError> {
    let received = Instant::now();
    req.validate()
        .map_err(|m| RemoteError::new(ErrorCode::InvalidArgument, m))?;
    let _one_at_a_time = svc.refresh_lock.lock().await;
    let mut report = RefreshReport::default();
    let push = |report: &mut RefreshReport, step, r: Result<String, RemoteError>| {
        let (error, detail) = match r {
            Ok(d) => (None, d),
            Err(e) => (Some(e), String::new()),
        };
        match &error {
            Some(e) => warn!("refresh: {step}: {e}"),
            None => debug!(
                "refresh: {step} done at {} ms: {detail}",
                received.elapsed().as_millis()
            ),
        }
        report.steps.push(RefreshStep {
            step,
            error,
            detail,
        });
    };
    if let Some(ns) = req.clock_unix_ns {
        let r = set_clock(ns, received).map(|step_ns| {
            report.clock_step_ns = Some(step_ns);
            format!("clock moved by {:+.3} s", step_ns as f64 / 1e9)
        });
        push(&mut report, RefreshStepKind::Clock, r);
    }
    if !req.entropy.is_empty() {
        let r = add_entropy(&req.entropy);
        push(&mut report, RefreshStepKind::Entropy, r);
    }
    if req.drop_sessions {
        let (n, left) = svc.execs.drop_all(DROP_WAIT).await;
        report.sessions_dropped = u32::try_from(n).unwrap_or(u32::MAX);
        let r = if left == 0 {
            Ok(format!("{n} running exec sessions killed"))
        } else {
            Err(RemoteError::new(
                ErrorCode::Io,
                format!(
                    "{left} of {n} exec sessions were still ending after {} s",
                    DROP_WAIT.as_secs()
                ),
            ))
        };
        push(&mut report, RefreshStepKind::Sessions, r);
    }
    if let Some(n) = &req.network {
        for (step, r) in crate::net::renew(n) {
            push(&mut report, step, r);
        }
    }
    if let Some(h) = &req.hostname {
        let r = set_hostname(h);
        push(&mut report, RefreshStepKind::Hostname, r);
    }
    if let Some(m) = &req.machine_id {
        let r = set_machine_id(m);
        push(&mut report, RefreshStepKind::MachineId, r);
    }
    if let Some(b) = &req.boot_id {
        let r = set_boot_id(b);
        push(&mut report, RefreshStepKind::BootId, r);
    }
    report.boot_id = std::fs::read_to_string(PROC_BOOT_ID)
        .ok()
        .map(|s| s.trim().to_string());
    report.duration_ms = received.elapsed().as_millis() as u64;
    info!(
        "refresh: {} parts in {} ms, {} failed",
        report.steps.len(),
        report.duration_ms,
        report.failures().count()
    );
    Ok(Reply::Refreshed(report))
}

fn realtime_ns() -> i128 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_REALTIME, &mut ts) };
    i128::from(ts.tv_sec) * 1_000_000_000 + i128::from(ts.tv_nsec)
}

/// Sets `CLOCK_REALTIME` to the host's time plus the time since the request arrived; returns
/// how far the clock moved.
fn set_clock(host_ns: u64, received: Instant) -> Result<i64, RemoteError> {
    let target = i128::from(host_ns) + received.elapsed().as_nanos() as i128;
    let ts = libc::timespec {
        tv_sec: (target / 1_000_000_000) as libc::time_t,
        tv_nsec: (target % 1_000_000_000) as libc::c_long,
    };
    let before = realtime_ns();
    // SAFETY: clock_settime reads the timespec we own.
    let rc = unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) };
    if rc != 0 {
        return Err(RemoteError::io(
            "clock_settime(CLOCK_REALTIME)",
            &io::Error::last_os_error(),
        ));
    }
    Ok(i64::try_from(target - before).unwrap_or(i64::MAX))
}

/// Mixes `bytes` into the kernel's input pool, credited in full, then forces the CRNG to
/// reseed from it (without the reseed, clones would keep their shared CRNG state until the
/// kernel's next scheduled reseed, up to a minute later).
fn add_entropy(bytes: &[u8]) -> Result<String, RemoteError> {
    let f = std::fs::File::open("/dev/urandom")
        .map_err(|e| RemoteError::io("opening /dev/urandom", &e))?;
    let mut info = RandPoolInfo {
        // Lengths are at most MAX_ENTROPY (validated), so both fit in c_int.
        entropy_count: (bytes.len() * 8) as libc::c_int,
        buf_size: bytes.len() as libc::c_int,
        buf: [0; MAX_ENTROPY],
    };
    info.buf[..bytes.len()].copy_from_slice(bytes);
    let fd = std::os::fd::AsRawFd::as_raw_fd(&f);
    // SAFETY: RNDADDENTROPY reads a rand_pool_info whose buf holds buf_size bytes; `info` is
    // that struct (buf_size <= its buffer) and outlives the call.
    let rc = unsafe { libc::ioctl(fd, RNDADDENTROPY, &info as *const RandPoolInfo) };
    if rc != 0 {
        return Err(RemoteError::io(
            "ioctl RNDADDENTROPY",
            &io::Error::last_os_error(),
        ));
    }
    // SAFETY: RNDRESEEDCRNG takes no argument.
    let rc = unsafe { libc::ioctl(fd, RNDRESEEDCRNG, 0) };
    if rc != 0 {
        return Err(RemoteError::io(
            "ioctl RNDRESEEDCRNG",
            &io::Error::last_os_error(),
        ));
    }
    Ok(format!(
        "{} bytes mixed into the kernel RNG and credited, CRNG reseeded",
        bytes.len()
    ))
}

/// `sethostname`, `/etc/hostname` (when `/etc` exists) and the old name's entries in an
/// existing `/etc/hosts`. Tries all three; the error is the first failure.
fn set_hostname(new: &str) -> Result<String, RemoteError> {
    let old = crate::sysinfo::uname().nodename;
    let mut first_err = None;
    let mut done = Vec::new();
    match crate::init::sethostname(new) {
        Ok(()) => done.push(format!("hostname {new} (was {old})")),
        Err(e) => first_err = Some(RemoteError::io("sethostname", &e)),
    }
    if Path::new("/etc").is_dir() {
        match std::fs::write(HOSTNAME_FILE, format!("{new}\n")) {
            Ok(()) => done.push(format!("{HOSTNAME_FILE} written")),
            Err(e) if read_only(&e) => done.push(format!(
                "{HOSTNAME_FILE} left alone (read-only file system)"
            )),
            Err(e) => {
                first_err.get_or_insert(RemoteError::io(HOSTNAME_FILE, &e));
            }
        }
    }
    match std::fs::read_to_string(HOSTS_FILE) {
        Ok(text) => {
            if let Some(updated) = rewrite_hosts(&text, &old, new) {
                match std::fs::write(HOSTS_FILE, updated) {
                    Ok(()) => done.push(format!("{HOSTS_FILE} updated")),
                    Err(e) if read_only(&e) => {
                        done.push(format!("{HOSTS_FILE} left alone (read-only file system)"))
                    }
                    Err(e) => {
                        first_err.get_or_insert(RemoteError::io(HOSTS_FILE, &e));
                    }
                }
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => {
            first_err.get_or_insert(RemoteError::io(HOSTS_FILE, &e));
        }
    }
    match first_err {
        Some(e) => Err(e),
        None => Ok(done.join(", ")),
    }
}

/// `/etc/hosts` with every name `old` replaced by `new`, and a `127.0.1.1 new` line added
/// when no line names `new` afterwards; `None` when nothing changes. `localhost` names are
/// never replaced, comments and spacing are kept.
pub(crate) fn rewrite_hosts(text: &str, old: &str, new: &str) -> Option<String> {
    let replace = !old.is_empty() && old != new && !old.starts_with("localhost") && old != "(none)";
    let mut out = String::with_capacity(text.len() + new.len() + 16);
    let mut names_new = false;
    for line in text.split_inclusive('\n') {
        let (body, rest) = match line.find('#') {
            Some(i) => line.split_at(i),
            None => {
                let i = line.trim_end_matches(['\n', '\r']).len();
                line.split_at(i)
            }
        };
        let mut word_index = 0;
        let mut i = 0;
        let bytes = body.as_bytes();
        while i < bytes.len() {
            let start = i;
            if bytes[i].is_ascii_whitespace() {
                while i < bytes.len() && bytes[i].is_ascii_whitespace() {
                    i += 1;
                }
                out.push_str(&body[start..i]);
                continue;
            }
            while i < bytes.len() && !bytes[i].is_ascii_whitespace() {
                i += 1;
            }
            let word = &body[start..i];
            // The first word of a line is the address; names follow.
            if word_index > 0 && replace && word == old {
                out.push_str(new);
                names_new = true;
            } else {
                names_new |= word_index > 0 && word == new;
                out.push_str(word);
            }
            word_index += 1;
        }
        out.push_str(rest);
    }
    if !names_new {
        if !out.is_empty() && !out.ends_with('\n') {
            out.push('\n');
        }
        out.push_str(&format!("127.0.1.1\t{new}\n"));
    }
    (out != text).then_some(out)
}

/// Writes `id` and a newline to `path`, readable by everyone (like systemd's machine-id).
fn write_id_file(path: &Path, id: &str) -> io::Result<()> {
    std::fs::write(path, format!("{id}\n"))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o444))
}

fn read_only(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::EROFS)
}

/// Writes `/etc/machine-id`; on a read-only root file system, shows a file under `/run` there
/// instead (like systemd does), which later refreshes write through.
fn set_machine_id(id: &str) -> Result<String, RemoteError> {
    match write_id_file(Path::new(MACHINE_ID), id) {
        Ok(()) => Ok(format!("{MACHINE_ID} is {id}")),
        Err(e) if read_only(&e) && Path::new(MACHINE_ID).exists() => {
            show_over(MACHINE_ID_FILE, MACHINE_ID, id, false)?;
            Ok(format!(
                "{MACHINE_ID} is {id} ({MACHINE_ID_FILE} bind-mounted over it: read-only file system)"
            ))
        }
        Err(e) => Err(RemoteError::io(MACHINE_ID, &e)),
    }
}

/// Makes `/proc/sys/kernel/random/boot_id`, which the kernel does not let anyone write, read
/// `id`.
fn set_boot_id(id: &str) -> Result<String, RemoteError> {
    if show_over(BOOT_ID_FILE, PROC_BOOT_ID, id, true)? {
        Ok(format!(
            "{BOOT_ID_FILE} bind-mounted on {PROC_BOOT_ID}, which reads {id}"
        ))
    } else {
        Ok(format!("{PROC_BOOT_ID} reads {id}"))
    }
}

/// Makes `target` read `id` and a newline: writes them to `src` (under `/run`) and, unless
/// `target` already shows that file, bind-mounts `src` over `target` (read-only with
/// `read_only`). Returns whether it mounted. `src` is rewritten in place, never replaced: a
/// bind mount shows the inode it was made with, so a second call reuses the first mount.
fn show_over(src: &str, target: &str, id: &str, read_only: bool) -> Result<bool, RemoteError> {
    let file = Path::new(src);
    if let Some(dir) = file.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| RemoteError::io(&dir.display().to_string(), &e))?;
    }
    let line = format!("{id}\n");
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(file)
        .and_then(|f| {
            f.write_all_at(line.as_bytes(), 0)?;
            f.set_len(line.len() as u64)?;
            f.set_permissions(std::fs::Permissions::from_mode(0o444))
        })
        .map_err(|e| RemoteError::io(src, &e))?;
    let shows = || {
        std::fs::read_to_string(target)
            .map(|s| s.trim() == id)
            .unwrap_or(false)
    };
    if shows() {
        return Ok(false);
    }
    bind_mount(src, target, read_only)
        .map_err(|e| RemoteError::io(&format!("bind-mounting {src} on {target}"), &e))?;
    if !shows() {
        return Err(RemoteError::new(
            ErrorCode::Io,
            format!("{target} does not read the new id after the bind mount"),
        ));
    }
    Ok(true)
}

/// `mount --bind src target`, then with `read_only` (best effort) a read-only remount.
fn bind_mount(src: &str, target: &str, read_only: bool) -> io::Result<()> {
    let c = |s: &str| {
        std::ffi::CString::new(s)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains NUL"))
    };
    let (src, target) = (c(src)?, c(target)?);
    // SAFETY: both paths are valid NUL-terminated strings that outlive the call; a bind mount
    // takes no file system type or data.
    let rc = unsafe {
        libc::mount(
            src.as_ptr(),
            target.as_ptr(),
            std::ptr::null(),
            libc::MS_BIND,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    if !read_only {
        return Ok(());
    }
    // SAFETY: as above; a remount names only the target.
    let rc = unsafe {
        libc::mount(
            std::ptr::null(),
            target.as_ptr(),
            std::ptr::null(),
            libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        crate::debug!(
            "remounting {} read-only: {}",
            target.to_string_lossy(),
            io::Error::last_os_error()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_rewrite() {
        let debian = "127.0.0.1\tlocalhost\n127.0.1.1\tvm1.example vm1\n\n# The following lines are desirable for IPv6\n::1     localhost ip6-localhost ip6-loopback\n";
        let got = rewrite_hosts(debian, "vm1", "vm2").unwrap();
        assert_eq!(
            got,
            "127.0.0.1\tlocalhost\n127.0.1.1\tvm1.example vm2\n\n# The following lines are desirable for IPv6\n::1     localhost ip6-localhost ip6-loopback\n"
        );
        // Idempotent: the second refresh changes nothing.
        assert_eq!(rewrite_hosts(&got, "vm2", "vm2"), None);
        // No line names the old host: one is added, once.
        let plain = "127.0.0.1 localhost";
        let got = rewrite_hosts(plain, "localhost", "vm3").unwrap();
        assert_eq!(got, "127.0.0.1 localhost\n127.0.1.1\tvm3\n");
        assert_eq!(rewrite_hosts(&got, "vm3", "vm3"), None);
        // Comments and the address column are never touched.
        let tricky = "vm1 vm1 # vm1\n10.0.0.1 vm1x vm1\n";
        assert_eq!(
            rewrite_hosts(tricky, "vm1", "vm2").unwrap(),
            "vm1 vm2 # vm1\n10.0.0.1 vm1x vm2\n"
        );
        assert_eq!(
            rewrite_hosts("", "(none)", "vm4").unwrap(),
            "127.0.1.1\tvm4\n"
        );
    }

    #[test]
    fn entropy_struct_layout() {
        assert_eq!(std::mem::size_of::<RandPoolInfo>(), 8 + MAX_ENTROPY);
        assert_eq!(std::mem::offset_of!(RandPoolInfo, buf), 8);
    }
}

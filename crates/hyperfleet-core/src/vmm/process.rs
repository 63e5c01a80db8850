//! Process identity and control for VMMs that outlive the daemon.
//!
//! A pid alone is not an identity: after a VMM exits, the pid can be reused.
//! We identify a process by pid + its start time (field 22 of
//! `/proc/PID/stat`) + the host's boot id, and we signal and wait through a
//! pidfd opened *after* checking that identity, so a signal can never reach
//! a different process.

use std::fs;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use tokio::io::unix::AsyncFd;

use crate::store::VmmIdentity;

/// Whether the process a record points at is still that process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Liveness {
    Alive,
    Gone,
    /// The host could not say (e.g. EMFILE opening `/proc`): neither alive
    /// nor gone. Callers that wait keep waiting; the machine run backs off.
    Unknown,
}

/// The host's boot id; identities from another boot are never alive.
pub(crate) fn boot_id() -> io::Result<String> {
    Ok(fs::read_to_string("/proc/sys/kernel/random/boot_id")?
        .trim()
        .to_string())
}

struct Stat {
    state: char,
    start_time: u64,
}

fn read_stat(pid: i32) -> io::Result<Stat> {
    let raw = fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name (field 2) is in parentheses and may contain spaces or
    // parentheses itself; everything after the *last* ')' is well-formed.
    let after = raw
        .rfind(')')
        .map(|i| &raw[i + 1..])
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "malformed /proc stat"))?;
    let fields: Vec<&str> = after.split_whitespace().collect();
    // fields[0] is field 3 (state); start time is field 22 → index 19.
    let state = fields
        .first()
        .and_then(|s| s.chars().next())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "no state in /proc stat"))?;
    let start_time = fields
        .get(19)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "no start time in /proc stat"))?;
    Ok(Stat { state, start_time })
}

/// The identity of a live process.
pub(crate) fn identity_of(pid: i32) -> io::Result<VmmIdentity> {
    let stat = read_stat(pid)?;
    Ok(VmmIdentity {
        pid,
        start_time: stat.start_time,
        boot_id: boot_id()?,
    })
}

/// Is the recorded process still alive (and not a zombie)? `Unknown` when
/// the host could not be asked; [`probe_checked`] says why.
pub(crate) fn probe(id: &VmmIdentity) -> Liveness {
    probe_checked(id).unwrap_or(Liveness::Unknown)
}

/// Like [`probe`], with the reason when the host could not be asked. Only a
/// process that provably is not the recorded one is `Gone`: another boot,
/// no such pid, a different start time, a zombie. Any other failure to
/// read (out of file descriptors, a malformed stat) is an error, never a
/// guess: a live VMM taken for gone would be spawned a second time.
pub(crate) fn probe_checked(id: &VmmIdentity) -> io::Result<Liveness> {
    if boot_id()? != id.boot_id {
        return Ok(Liveness::Gone);
    }
    match read_stat(id.pid) {
        Ok(s) if s.start_time == id.start_time && s.state != 'Z' && s.state != 'X' => {
            Ok(Liveness::Alive)
        }
        Ok(_) => Ok(Liveness::Gone),
        Err(e) if no_such_process(&e) => Ok(Liveness::Gone),
        Err(e) => Err(e),
    }
}

/// The error reading `/proc/PID/…` gives once the process is gone.
fn no_such_process(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::ESRCH)
}

/// Spawns `cmd` in its own session, detached from the daemon's process group
/// and terminal, so that signals to the daemon (including SIGKILL of its
/// group) never reach it. The daemon reaps it while it lives; after a daemon
/// restart, init does.
pub(crate) fn spawn_detached(mut cmd: Command, log: &Path) -> io::Result<VmmIdentity> {
    let out = fs::OpenOptions::new().create(true).append(true).open(log)?;
    let err = out.try_clone()?;
    cmd.stdin(Stdio::null()).stdout(out).stderr(err);
    // SAFETY: the closure runs in the forked child before exec and only calls
    // setsid(2), which is async-signal-safe and touches no shared state.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn()?;
    let pid = child.id() as i32;
    let identity = identity_of(pid);
    // Reap the child when it exits so it never lingers as a zombie while the
    // daemon lives. A blocking wait on a dedicated thread costs nothing.
    std::thread::Builder::new()
        .name(format!("hf-reap-{pid}"))
        .spawn(move || {
            let _ = child.wait();
        })?;
    identity
}

fn pidfd_open(pid: i32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1;
    // it has no memory-safety preconditions.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the syscall returned a fresh file descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Opens a pidfd for `id`, or `None` when the process is already gone.
fn open_verified(id: &VmmIdentity) -> io::Result<Option<OwnedFd>> {
    let fd = match pidfd_open(id.pid) {
        Ok(fd) => fd,
        Err(e) if e.raw_os_error() == Some(libc::ESRCH) => return Ok(None),
        Err(e) => return Err(e),
    };
    // The identity check after opening closes the reuse race: if the pid was
    // reused before pidfd_open, the start time differs now.
    match probe_checked(id)? {
        Liveness::Alive => Ok(Some(fd)),
        Liveness::Gone | Liveness::Unknown => Ok(None),
    }
}

/// Sends `signal` to the process if it is still the recorded one.
pub(crate) fn signal(id: &VmmIdentity, signal: i32) -> io::Result<()> {
    let Some(fd) = open_verified(id)? else {
        return Ok(());
    };
    // SAFETY: pidfd_send_signal with a valid pidfd, a signal number, a null
    // siginfo and no flags; no memory is passed.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            fd.as_raw_fd(),
            signal,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if rc < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ESRCH) {
            return Ok(());
        }
        return Err(e);
    }
    Ok(())
}

/// Waits until the process is gone; `false` if it still lives at the deadline.
pub(crate) async fn wait_gone(id: &VmmIdentity, timeout: Duration) -> io::Result<bool> {
    let Some(fd) = open_verified(id)? else {
        return Ok(true);
    };
    // SAFETY: `fd` is an open pidfd owned by the OwnedFd we move into the
    // AsyncFd; it stays open, and its raw value unchanged, until the AsyncFd
    // (and with it the OwnedFd) is dropped at the end of this function.
    let afd = unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }
        .map_err(|e| e.into_parts().1)?;
    // A pidfd becomes readable when the process exits.
    let exited = tokio::time::timeout(timeout, afd.readable()).await;
    match exited {
        Ok(Ok(_)) => Ok(true),
        Ok(Err(e)) => Err(e),
        Err(_) => Ok(probe_checked(id)? == Liveness::Gone),
    }
}

/// SIGKILL and wait for the process to be gone.
pub(crate) async fn kill(id: &VmmIdentity) -> io::Result<()> {
    signal(id, libc::SIGKILL)?;
    if wait_gone(id, Duration::from_secs(10)).await? {
        Ok(())
    } else {
        Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("process {} survived SIGKILL for 10 s", id.pid),
        ))
    }
}

/// Live processes whose command line contains `marker` (a machine's
/// directory path), other than ourselves. Used to find a VMM that a crashed
/// daemon spawned but never recorded, and by the orphan sweep.
pub(crate) fn find_by_marker(marker: &str) -> Vec<VmmIdentity> {
    find_by_marker_checked(marker).unwrap_or_else(|e| {
        tracing::error!(error = %e, "cannot list processes; treating none as found");
        Vec::new()
    })
}

/// Like [`find_by_marker`], but an error when `/proc` could not be read
/// (e.g. out of file descriptors) rather than "none found": a caller that
/// decides from "none" (was a VMM spawned before the crash?) must not
/// decide from a failure. Processes that end while being looked at are
/// simply not found.
pub(crate) fn find_by_marker_checked(marker: &str) -> io::Result<Vec<VmmIdentity>> {
    let me = std::process::id() as i32;
    let mut out = Vec::new();
    for e in fs::read_dir("/proc")? {
        let e = e?;
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if pid == me {
            continue;
        }
        let cmdline = match fs::read(format!("/proc/{pid}/cmdline")) {
            Ok(c) => c,
            Err(e) if no_such_process(&e) => continue,
            Err(e) => return Err(e),
        };
        if cmdline
            .split(|b| *b == 0)
            .any(|arg| contains(arg, marker.as_bytes()))
        {
            let id = match identity_of(pid) {
                Ok(id) => id,
                Err(e) if no_such_process(&e) => continue,
                Err(e) => return Err(e),
            };
            if probe_checked(&id)? == Liveness::Alive {
                out.push(id);
            }
        }
    }
    Ok(out)
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && hay.windows(needle.len()).any(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_identity_is_alive_and_a_changed_start_time_is_not() {
        let me = identity_of(std::process::id() as i32).unwrap();
        assert_eq!(probe(&me), Liveness::Alive);
        let reused = VmmIdentity {
            start_time: me.start_time + 1,
            ..me.clone()
        };
        assert_eq!(probe(&reused), Liveness::Gone);
        let other_boot = VmmIdentity {
            boot_id: "not-this-boot".into(),
            ..me
        };
        assert_eq!(probe(&other_boot), Liveness::Gone);
    }

    #[test]
    fn a_pid_that_does_not_exist_is_gone_not_unknown() {
        let me = identity_of(std::process::id() as i32).unwrap();
        // Above pid_max (at most 2^22 on Linux): no such process.
        let absent = VmmIdentity {
            pid: i32::MAX,
            ..me
        };
        assert_eq!(probe_checked(&absent).unwrap(), Liveness::Gone);
    }

    #[tokio::test]
    async fn detached_child_is_found_by_marker_and_killed() {
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("marker-arg");
        let mut cmd = Command::new("sleep");
        cmd.arg("30").arg0(marker.to_str().unwrap());
        let id = spawn_detached(cmd, &dir.path().join("log")).unwrap();
        assert_eq!(probe(&id), Liveness::Alive);
        let found = find_by_marker(marker.to_str().unwrap());
        assert_eq!(found, vec![id.clone()]);
        assert!(!wait_gone(&id, Duration::from_millis(50)).await.unwrap());
        kill(&id).await.unwrap();
        assert_eq!(probe(&id), Liveness::Gone);
        // Signalling a gone process is not an error.
        signal(&id, libc::SIGTERM).unwrap();
    }
}

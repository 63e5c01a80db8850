//! `start_main`: the machine's main process (an OCI image's entrypoint and command).
//!
//! This module owns the one main process of a boot: resolving its user (`name`, `uid`,
//! `name:group`, `uid:gid` against the guest's `/etc/passwd` and `/etc/group`), starting it
//! with its whole environment, working directory and credentials, its output on the console,
//! and what happens when it ends: the agent writes
//! [`MAIN_EXITED_LINE`](hyperfleet_agent_proto::MAIN_EXITED_LINE) with its exit code to the
//! console and powers the guest off, which the host reads as "the main process exited".
//!
//! The process is started at most once per boot (the state lives in the agent's memory, so a
//! guest restored from a memory image keeps it too): a repeated request answers with what
//! the first one started.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::fd::AsFd;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use hyperfleet_agent_proto::{
    ErrorCode, MainProcessRequest, MainStarted, PowerAction, RemoteError, Reply, MAIN_EXITED_LINE,
    MAIN_STARTED_LINE,
};

use crate::reaper::decode_status;
use crate::session::Services;
use crate::{info, warn};

/// `PATH` when the request sets none (Docker's default).
const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// How long the agent waits after the main process ended before powering off: the answer to
/// `start_main` of a process that ends at once must reach the host first.
const POWER_OFF_GRACE: Duration = Duration::from_millis(300);

/// The main process of this boot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum MainState {
    NotStarted,
    /// Started (or failed to start: `pid` None); so it stays for the rest of
    /// the boot, whether the process still runs or not.
    Started {
        pid: Option<u32>,
    },
}

/// The agent-wide slot of the main process.
pub(crate) struct MainSlot(Mutex<MainState>);

impl MainSlot {
    pub(crate) fn new() -> MainSlot {
        MainSlot(Mutex::new(MainState::NotStarted))
    }
}

/// Credentials the process runs with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Credentials {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups (the user's groups in `/etc/group`).
    pub groups: Vec<u32>,
    /// The user's home directory from `/etc/passwd`, if the user is listed there.
    pub home: Option<String>,
}

/// One `/etc/passwd` entry: name, uid, gid, home.
type PasswdEntry = (String, u32, u32, String);

fn parse_passwd(text: &str) -> Vec<PasswdEntry> {
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            if f.len() < 6 {
                return None;
            }
            Some((
                f[0].to_string(),
                f[2].parse().ok()?,
                f[3].parse().ok()?,
                f[5].to_string(),
            ))
        })
        .collect()
}

/// `/etc/group` entries: name, gid, members.
fn parse_group(text: &str) -> Vec<(String, u32, Vec<String>)> {
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            if f.len() < 4 {
                return None;
            }
            let members = f[3]
                .split(',')
                .filter(|m| !m.is_empty())
                .map(String::from)
                .collect();
            Some((f[0].to_string(), f[2].parse().ok()?, members))
        })
        .collect()
}

/// Resolves `spec` (`user`, `uid`, `user:group`, `uid:gid`; empty: root) against the text of
/// `/etc/passwd` and `/etc/group` (None when the file is absent), as container runtimes do:
/// a numeric uid not in passwd runs with gid 0 (or the given gid), a name must be listed.
pub(crate) fn resolve_user(
    spec: &str,
    passwd: Option<&str>,
    group: Option<&str>,
) -> Result<Credentials, String> {
    let users = passwd.map(parse_passwd).unwrap_or_default();
    let groups = group.map(parse_group).unwrap_or_default();
    let (u, g) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let u = if u.is_empty() { "0" } else { u };
    let (uid, mut gid, home, name) = match u.parse::<u32>() {
        Ok(uid) => match users.iter().find(|e| e.1 == uid) {
            Some(e) => (uid, e.2, Some(e.3.clone()), Some(e.0.clone())),
            None => (uid, 0, None, None),
        },
        Err(_) => {
            let Some(e) = users.iter().find(|e| e.0 == u) else {
                return Err(if passwd.is_none() {
                    format!("user {u:?} cannot be looked up: the image has no /etc/passwd")
                } else {
                    format!("no user {u:?} in /etc/passwd")
                });
            };
            (e.1, e.2, Some(e.3.clone()), Some(e.0.clone()))
        }
    };
    let explicit_group = match g.filter(|g| !g.is_empty()) {
        None => false,
        Some(g) => {
            gid = match g.parse::<u32>() {
                Ok(n) => n,
                Err(_) => match groups.iter().find(|e| e.0 == g) {
                    Some(e) => e.1,
                    None => {
                        return Err(if group.is_none() {
                            format!("group {g:?} cannot be looked up: the image has no /etc/group")
                        } else {
                            format!("no group {g:?} in /etc/group")
                        })
                    }
                },
            };
            true
        }
    };
    let mut supplementary = vec![gid];
    if !explicit_group {
        if let Some(name) = &name {
            for (_, id, members) in &groups {
                if members.iter().any(|m| m == name) && !supplementary.contains(id) {
                    supplementary.push(*id);
                }
            }
        }
    }
    Ok(Credentials {
        uid,
        gid,
        groups: supplementary,
        home,
    })
}

/// The exit code a shell would report for a wait status: the code, or 128 + the signal.
pub(crate) fn exit_code(status: i32) -> (i32, Option<String>) {
    match decode_status(status) {
        (Some(c), _) => (c, None),
        (None, Some(s)) => (128 + s, Some(format!("killed by signal {s}"))),
        (None, None) => (255, Some(format!("unknown wait status {status:#x}"))),
    }
}

/// The console line that says the main process ended.
pub(crate) fn exited_line(code: i32, why: Option<&str>) -> String {
    match why {
        Some(w) => format!("{MAIN_EXITED_LINE}{code}: {w}\n"),
        None => format!("{MAIN_EXITED_LINE}{code}\n"),
    }
}

/// Writes `line` to the console (the agent's stderr) in one write.
fn console(line: &str) {
    let _ = std::io::stderr().write_all(line.as_bytes());
}

pub(crate) async fn start_main(
    req: MainProcessRequest,
    svc: &Services,
) -> Result<Reply, RemoteError> {
    let Some(program) = req.argv.first().filter(|p| !p.is_empty()).cloned() else {
        return Err(RemoteError::new(
            ErrorCode::InvalidArgument,
            "argv must name a program",
        ));
    };
    let mut state = svc.main.0.lock().unwrap_or_else(|p| p.into_inner());
    if let MainState::Started { pid } = *state {
        return Ok(Reply::MainStarted(MainStarted { pid, already: true }));
    }
    let started = spawn(&program, &req, svc);
    let pid = match started {
        Ok(pid) => Some(pid),
        Err((code, why)) => {
            warn!("main process {program:?} cannot start: {why}");
            let power = svc.power.clone();
            let line = exited_line(code, Some(&format!("cannot start {program}: {why}")));
            tokio::spawn(async move {
                tokio::time::sleep(POWER_OFF_GRACE).await;
                console(&line);
                let _ = power.send(PowerAction::Poweroff);
            });
            None
        }
    };
    *state = MainState::Started { pid };
    Ok(Reply::MainStarted(MainStarted {
        pid,
        already: false,
    }))
}

/// Starts the process and the task that reports its end; on failure, the exit code a shell
/// would give (127 not found, 126 otherwise) and why.
fn spawn(program: &str, req: &MainProcessRequest, svc: &Services) -> Result<u32, (i32, String)> {
    let creds = match req.user.as_deref().filter(|u| !u.is_empty()) {
        None => Credentials {
            uid: 0,
            gid: 0,
            groups: vec![0],
            home: Some("/root".into()),
        },
        Some(u) => resolve_user(
            u,
            std::fs::read_to_string("/etc/passwd").ok().as_deref(),
            std::fs::read_to_string("/etc/group").ok().as_deref(),
        )
        .map_err(|e| (126, e))?,
    };
    let mut env: BTreeMap<String, String> = req.env.clone();
    env.entry("PATH".into())
        .or_insert_with(|| DEFAULT_PATH.into());
    env.entry("HOME".into())
        .or_insert_with(|| creds.home.clone().unwrap_or_else(|| "/".into()));
    let cwd = req
        .cwd
        .clone()
        .filter(|c| !c.is_empty())
        .unwrap_or("/".into());
    if !Path::new(&cwd).is_dir() {
        // Container runtimes create a missing working directory.
        std::fs::create_dir_all(&cwd)
            .map_err(|e| (126, format!("creating working directory {cwd}: {e}")))?;
        let _ = std::os::unix::fs::chown(&cwd, Some(creds.uid), Some(creds.gid));
    }
    let out = std::io::stderr()
        .as_fd()
        .try_clone_to_owned()
        .map_err(|e| (126, format!("duplicating the console: {e}")))?;
    let err = out
        .try_clone()
        .map_err(|e| (126, format!("duplicating the console: {e}")))?;
    let mut cmd = Command::new(program);
    cmd.args(&req.argv[1..])
        .env_clear()
        .envs(&env)
        .current_dir(&cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::from(out))
        .stderr(Stdio::from(err))
        .process_group(0);
    if creds.uid != 0 || creds.gid != 0 || creds.groups != [0] {
        let Credentials {
            uid, gid, groups, ..
        } = creds.clone();
        let groups: Vec<libc::gid_t> = groups;
        // SAFETY: the closure runs in the child between fork and exec and only makes the
        // async-signal-safe setgroups/setgid/setuid syscalls on memory allocated before the
        // fork (groups); errors are returned as io::Error from errno, allocation-free.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setgroups(groups.len(), groups.as_ptr()) != 0
                    || libc::setgid(gid) != 0
                    || libc::setuid(uid) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
    let (child, exit_rx) = svc.reaper.spawn(&mut cmd).map_err(|e| {
        let code = if e.kind() == std::io::ErrorKind::NotFound {
            127
        } else {
            126
        };
        (code, e.to_string())
    })?;
    let pid = child.id();
    drop(child);
    console(&format!(
        "{MAIN_STARTED_LINE} (pid {pid}): {}\n",
        req.argv.join(" ")
    ));
    info!("main process {program:?} started as pid {pid}");
    let power = svc.power.clone();
    tokio::spawn(async move {
        // The reaper never drops a registered sender without sending.
        let status = exit_rx.await.unwrap_or(0);
        let (code, why) = exit_code(status);
        console(&exited_line(code, why.as_deref()));
        tokio::time::sleep(POWER_OFF_GRACE).await;
        let _ = power.send(PowerAction::Poweroff);
    });
    Ok(pid)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\n\
                          app:x:1000:1000:App:/home/app:/bin/sh\n\
                          nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n";
    const GROUP: &str = "root:x:0:\napp:x:1000:\nstaff:x:50:app,other\nnogroup:x:65534:\n";

    #[test]
    fn users_resolve_by_name_or_number() {
        let c = resolve_user("app", Some(PASSWD), Some(GROUP)).unwrap();
        assert_eq!((c.uid, c.gid), (1000, 1000));
        assert_eq!(c.groups, vec![1000, 50]);
        assert_eq!(c.home.as_deref(), Some("/home/app"));
        let c = resolve_user("1000", Some(PASSWD), Some(GROUP)).unwrap();
        assert_eq!((c.uid, c.gid), (1000, 1000));
        let c = resolve_user("app:nogroup", Some(PASSWD), Some(GROUP)).unwrap();
        assert_eq!((c.uid, c.gid, c.groups), (1000, 65534, vec![65534]));
        // Numbers need no files.
        let c = resolve_user("4242:77", None, None).unwrap();
        assert_eq!((c.uid, c.gid, c.home), (4242, 77, None));
        let c = resolve_user("4242", None, None).unwrap();
        assert_eq!((c.uid, c.gid), (4242, 0));
        // Names must be listed.
        let e = resolve_user("ghost", Some(PASSWD), Some(GROUP)).unwrap_err();
        assert!(e.contains("no user"), "{e}");
        let e = resolve_user("app", None, None).unwrap_err();
        assert!(e.contains("no /etc/passwd"), "{e}");
        let e = resolve_user("app:ghosts", Some(PASSWD), Some(GROUP)).unwrap_err();
        assert!(e.contains("no group"), "{e}");
    }

    #[test]
    fn exit_codes_follow_the_shell() {
        assert_eq!(exit_code(3 << 8), (3, None));
        assert_eq!(exit_code(9), (137, Some("killed by signal 9".into())));
        assert_eq!(
            exited_line(3, None),
            "hyperfleet: main process exited with code 3\n"
        );
        assert_eq!(
            exited_line(137, Some("killed by signal 9")),
            "hyperfleet: main process exited with code 137: killed by signal 9\n"
        );
    }
}

//! Waiting for exit, idle timeouts and wake on request (issue 12), with the
//! stub backend: a guest that powers itself off ends `stopped` with its
//! reason, a crash still ends `failed`.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use common::{Daemon, Sandbox};
use serde_json::json;

/// Sends one command to the stand-in VMM of machine `id` (its protocol:
/// crates/testvmm) and returns the answer.
fn testvmm_command(sb: &Sandbox, id: &str, line: &str) -> String {
    let sock = sb.machines_dir().join(id).join("vmm.sock");
    let mut s = UnixStream::connect(&sock).unwrap();
    writeln!(s, "{line}").unwrap();
    let mut answer = String::new();
    BufReader::new(s).read_line(&mut answer).unwrap();
    answer.trim().to_string()
}

#[test]
fn a_guest_that_powers_off_ends_stopped_with_its_reason_and_a_crash_ends_failed() {
    let sb = Sandbox::new();
    let d = Daemon::start(&sb);
    let m = d.create(json!({"name": "job"}));
    let id = m["id"].as_str().unwrap().to_string();
    let r = d.call("POST", "/machines/job/start", None);
    assert_eq!(r.body["status"], "running", "{}", r.body);
    assert!(r.body["exit_reason"].is_null(), "{}", r.body);

    // The guest powers itself off: waiting for `stopped` sees it.
    assert_eq!(testvmm_command(&sb, &id, "GUEST_POWEROFF"), "OK");
    let r = d.call("GET", "/machines/job/wait?status=stopped&timeout=10", None);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["status"], "stopped");
    assert_eq!(r.body["desired_status"], "stopped", "{}", r.body);
    assert_eq!(r.body["exit_reason"], "guest powered off", "{}", r.body);
    assert!(r.body["error_message"].is_null(), "{}", r.body);
    // It stays stopped: nothing boots it again.
    std::thread::sleep(Duration::from_millis(500));
    assert!(sb.vmm_pids_of(&id).is_empty());
    let r = d.call("GET", "/machines/job", None);
    assert_eq!(r.body["status"], "stopped");
    let ev = d.call("GET", "/machines/job/events", None);
    assert!(
        ev.body.to_string().contains("guest powered off"),
        "the events say so: {}",
        ev.body
    );

    // A new start clears the reason; a VMM killed from outside is a failure.
    let r = d.call("POST", "/machines/job/start", None);
    assert_eq!(r.body["status"], "running", "{}", r.body);
    assert!(r.body["exit_reason"].is_null(), "{}", r.body);
    let pid = sb.vmm_pids_of(&id)[0];
    // SAFETY: kill(2) of the stand-in VMM this test's daemon started.
    unsafe {
        libc::kill(pid, libc::SIGKILL);
    }
    let r = d.call("GET", "/machines/job/wait?status=failed&timeout=10", None);
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.body["exit_reason"].is_null(), "{}", r.body);
    assert!(
        r.body["error_message"]
            .as_str()
            .unwrap_or("")
            .contains("exited without being asked"),
        "{}",
        r.body
    );
}

/// A real QEMU guest running `poweroff -f` ends `stopped` with its reason.
#[test]
fn a_real_guest_that_powers_off_ends_stopped() {
    let Some(assets) = common::guest_assets() else {
        return;
    };
    let sb = Sandbox::new();
    let assets = assets.display().to_string();
    let d = Daemon::start_with(
        &sb,
        &[],
        &[
            "--assets-dir",
            &assets,
            "--default-vmm",
            "qemu",
            "--boot-timeout",
            "120",
        ],
    );
    let m = d.create(json!({"name": "job", "mem_size_mib": 256}));
    let id = m["id"].as_str().unwrap().to_string();
    let r = d.call("POST", "/machines/job/start?timeout=300", None);
    assert_eq!(r.body["status"], "running", "{}\n{}", r.body, d.log());
    // In the background, so that the exec answers before the guest goes.
    let r = d.call(
        "POST",
        "/machines/job/exec",
        Some(json!({"command": ["sh", "-c",
            "(sleep 1; poweroff -f || echo o > /proc/sysrq-trigger) >/dev/null 2>&1 &"]})),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let r = d.call("GET", "/machines/job/wait?status=stopped&timeout=60", None);
    assert_eq!(r.status, 200, "{}\n{}", r.body, d.log());
    assert_eq!(r.body["exit_reason"], "guest powered off", "{}", r.body);
    assert!(common::qemu_pids(&sb.machines_dir().join(&id).display().to_string()).is_empty());
}

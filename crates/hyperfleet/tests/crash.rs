//! Crash safety: the daemon SIGKILLs itself (a real SIGKILL, via the
//! `failpoints` build) at every step boundary of the machine run in turn;
//! a restarted daemon must converge every machine to its desired state with
//! nothing left behind and nothing done twice (never two VMM processes for
//! one machine). Here with the stub backend and machine networking on (each
//! round in a network namespace of its own, so the crash points between
//! lease, TAP and VMM are passed too); the driver is
//! `common/crash.rs`, which tests/firecracker.rs runs with Firecracker.
//! Requires the `failpoints` feature, which the README's test command
//! enables.

mod common;

use std::time::Duration;

use common::crash;
use common::{eventually, killed_by_sigkill, Daemon, Sandbox};
use serde_json::json;

#[test]
fn sigkill_at_every_step_boundary_converges_without_leaks() {
    if !cfg!(feature = "failpoints") {
        panic!("MISSING: this test needs `--features failpoints` (the README's test command passes it)");
    }
    // The stub's VMM runs as the daemon's user: it never leases a uid.
    let points: Vec<&str> = crash::POINTS
        .iter()
        .copied()
        .filter(|p| !hyperfleet_core::failpoint::JAILED_CRASH_POINTS.contains(p))
        .collect();
    crash::run(&crash::Case {
        name: "stub",
        points: &points,
        scenario: crash::FULL_SCENARIO,
        daemon_args: &[],
        network: true,
        create: json!({"name": "crashy", "metadata": {"stub_boot_ms": "30"}}),
        vmm_pids: &|sb, id| sb.vmm_pids_of(id),
        leftovers: &|_| Vec::new(),
    });
}

#[test]
fn recovery_after_a_crash_mid_boot_adopts_instead_of_spawning_again() {
    if !cfg!(feature = "failpoints") {
        panic!("MISSING: this test needs `--features failpoints`");
    }
    let sb = Sandbox::new();
    let mut d = Daemon::start_with(&sb, &[("HYPERFLEET_CRASH_AT", "spawn.after_effect")], &[]);
    let m = d.create(json!({"name": "adopt", "metadata": {"stub_boot_ms": "500"}}));
    let id = m["id"].as_str().unwrap().to_string();
    let _ = crash::act(&d, &id, "start");
    assert!(killed_by_sigkill(
        &d.wait_exit(Duration::from_secs(10)).unwrap()
    ));
    let orphan = sb.vmm_pids_of(&id);
    assert_eq!(orphan.len(), 1, "the VMM outlived the daemon");
    let d = Daemon::start(&sb);
    let r = d.call(
        "GET",
        &format!("/machines/{id}/wait?status=running&timeout=20"),
        None,
    );
    assert_eq!(r.status, 200, "{}\n{}", r.body, d.log());
    assert_eq!(
        sb.vmm_pids_of(&id),
        orphan,
        "the same process was adopted, none spawned"
    );
    let ev = d.call("GET", &format!("/machines/{id}/events"), None);
    assert!(ev.body.to_string().contains("adopt_vmm"), "{}", ev.body);
    d.call("DELETE", &format!("/machines/{id}?force=true"), None);
}

#[test]
fn a_daemon_restart_does_not_reboot_guests_and_sweeps_orphans() {
    let sb = Sandbox::new();
    let mut d = Daemon::start(&sb);
    let m = d.create(json!({"name": "keep-running"}));
    let id = m["id"].as_str().unwrap().to_string();
    d.call("POST", "/machines/keep-running/start", None);
    let pid = sb.vmm_pids_of(&id);
    // A stray directory and process that belong to no machine.
    let stray = sb.machines_dir().join("m0000000000stray");
    std::fs::create_dir_all(&stray).unwrap();
    let mut stray_proc = std::process::Command::new(common::testvmm())
        .arg("--machine-dir")
        .arg(&stray)
        .arg("--socket")
        .arg(stray.join("vmm.sock"))
        .spawn()
        .unwrap();
    eventually("stray VMM up", Duration::from_secs(5), || {
        stray.join("vmm.sock").exists().then_some(())
    });
    // Graceful shutdown leaves VMMs running.
    let status = d.terminate();
    assert!(status.success(), "{status:?}");
    assert_eq!(
        sb.vmm_pids_of(&id),
        pid,
        "SIGTERM of the daemon leaves guests running"
    );
    let d = Daemon::start(&sb);
    let r = d.call("GET", "/machines/keep-running", None);
    assert_eq!(r.body["status"], "running");
    assert_eq!(sb.vmm_pids_of(&id), pid, "re-adopted, not rebooted");
    assert_eq!(
        d.call("POST", "/machines/keep-running/pause", None).body["status"],
        "paused"
    );
    let _ = stray_proc.wait();
    assert!(!stray.exists(), "orphan directory swept");
    assert!(
        sb.vmm_pids_of("m0000000000stray").is_empty(),
        "orphan VMM killed"
    );
    // A VMM that dies behind the daemon's back is noticed.
    let victim = sb.vmm_pids_of(&id)[0];
    // SAFETY: killing the stand-in VMM process this test's daemon started.
    unsafe { libc::kill(victim, libc::SIGKILL) };
    let r = d.call(
        "GET",
        "/machines/keep-running/wait?status=failed&timeout=10",
        None,
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.body["error_message"]
        .as_str()
        .unwrap()
        .contains("exited without being asked"));
    // Start after such a failure boots again.
    assert_eq!(
        d.call("POST", "/machines/keep-running/start", None).body["status"],
        "running"
    );
    assert_eq!(
        d.call("DELETE", "/machines/keep-running?force=true", None)
            .status,
        204
    );
}

#[test]
fn a_second_daemon_on_the_same_data_dir_refuses_to_start() {
    let sb = Sandbox::new();
    let _d = Daemon::start(&sb);
    let out = std::process::Command::new(common::bin())
        .args(["serve", "--port", "0", "--data-dir"])
        .arg(sb.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("already using"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

//! Crash safety: the daemon SIGKILLs itself (a real SIGKILL, via the
//! `failpoints` build) at every step boundary of the machine run in turn;
//! a restarted daemon must converge every machine to its desired state with
//! nothing left behind and nothing done twice (never two VMM processes for
//! one machine). Requires the `failpoints` feature, which the README's test
//! command enables.

mod common;

use std::time::Duration;

use common::netns::NetNs;
use common::{eventually, killed_by_sigkill, Daemon, Sandbox};
use serde_json::json;

/// Every crash point of `hyperfleet_core::failpoint::CRASH_POINTS`.
const POINTS: &[&str] = &[
    "prepare.before_effect",
    "prepare.after_effect",
    "spawn.after_intent",
    "network.after_lease",
    "network.after_tap",
    "spawn.after_effect",
    "spawn.after_commit",
    "ready.after_effect",
    "pause.after_intent",
    "pause.after_effect",
    "resume.after_intent",
    "resume.after_effect",
    "stop.after_intent",
    "stop.after_effect",
    "suspend.after_intent",
    "suspend.after_save",
    "suspend.after_effect",
    "release.after_intent",
    "release.after_effect",
];

/// The scenario passes every point: (request, status it leads to).
const SCENARIO: &[(&str, &str)] = &[
    ("start", "running"),
    ("pause", "paused"),
    ("resume", "running"),
    ("suspend", "suspended"),
    ("resume", "running"),
    ("stop", "stopped"),
    ("delete", "gone"),
];

fn act(d: &Daemon, id: &str, req: &str) -> Result<common::Resp, reqwest::Error> {
    match req {
        "delete" => d.try_call_as(
            &d.key,
            "DELETE",
            &format!("/machines/{id}?timeout=30"),
            None,
        ),
        r => d.try_call_as(
            &d.key,
            "POST",
            &format!("/machines/{id}/{r}?timeout=30"),
            None,
        ),
    }
}

/// Daemon flags for the networked crash test (inside its own namespace).
const NET: &[&str] = &["--network", "on"];

fn assert_single_vmm(sb: &Sandbox, id: &str, ctx: &str) {
    let pids = sb.vmm_pids_of(id);
    assert!(
        pids.len() <= 1,
        "{ctx}: two VMM processes for one machine: {pids:?}"
    );
}

#[test]
fn crash_points_list_matches_the_daemon() {
    assert_eq!(
        POINTS,
        hyperfleet_core_points(),
        "update POINTS in tests/crash.rs"
    );
}

fn hyperfleet_core_points() -> &'static [&'static str] {
    // The test binary cannot link the daemon's feature-gated build, so the
    // list is compared through the source of truth's text.
    let src = include_str!("../../hyperfleet-core/src/failpoint.rs");
    let start = src.find("CRASH_POINTS: &[&str] = &[").unwrap();
    let end = start + src[start..].find("];").unwrap();
    let names: Vec<&'static str> = src[start..end]
        .lines()
        .filter_map(|l| l.trim().strip_prefix('"'))
        .filter_map(|l| l.strip_suffix("\","))
        .collect();
    Box::leak(names.into_boxed_slice())
}

#[test]
fn sigkill_at_every_step_boundary_converges_without_leaks() {
    if !cfg!(feature = "failpoints") {
        panic!("MISSING: this test needs `--features failpoints` (the README's test command passes it)");
    }
    for point in POINTS {
        // Networking on, in a namespace of this point's own: the crash
        // points between lease, TAP and VMM are part of the run.
        let ns = NetNs::new("c");
        ns.enter();
        let sb = Sandbox::new();
        // A machine that is running all along: its lease must survive
        // every crash and never be handed to the other machine.
        let d = Daemon::start_with(&sb, &[], NET);
        d.create(json!({"name": "bystander"}));
        let by = d.call("POST", "/machines/bystander/start", None).body;
        assert_eq!(by["status"], "running", "{by}");
        let by_ip = by["network"]["ip"].as_str().unwrap().to_string();
        let by_tap = by["network"]["tap"].as_str().unwrap().to_string();
        drop(d);
        let mut d = Daemon::start_with(&sb, &[("HYPERFLEET_CRASH_AT", point)], NET);
        let m = d.create(json!({"name": "crashy", "metadata": {"stub_boot_ms": "30"}}));
        let id = m["id"].as_str().unwrap().to_string();
        // Run the scenario until the daemon dies at the armed point.
        let mut done = 0;
        for (req, want) in SCENARIO {
            match act(&d, &id, req) {
                Ok(r) if r.status < 300 => {
                    if *want != "gone" {
                        assert_eq!(r.body["status"], *want, "{point}: {req}");
                    }
                    done += 1;
                }
                Ok(r) => panic!("{point}: {req} answered {} {}", r.status, r.body),
                Err(_) => break,
            }
            assert_single_vmm(&sb, &id, point);
        }
        let status = d.wait_exit(Duration::from_secs(10)).unwrap_or_else(|| {
            panic!(
                "{point}: the crash point was never reached (scenario finished {done} steps)\n{}",
                d.log()
            )
        });
        assert!(
            killed_by_sigkill(&status),
            "{point}: daemon ended with {status:?}, not SIGKILL"
        );
        assert_single_vmm(&sb, &id, point);

        // Restart: the interrupted request is retried (as a client would),
        // then the rest of the scenario runs to the end.
        let d = Daemon::start_with(&sb, &[], NET);
        let now = d.call("GET", &format!("/machines/{id}"), None);
        if let Some(ip) = now.body["network"]["ip"].as_str() {
            assert_ne!(ip, by_ip, "{point}: one address leased twice");
        }
        for (req, want) in &SCENARIO[done..] {
            assert_single_vmm(&sb, &id, point);
            let r = act(&d, &id, req).unwrap();
            // A delete the restarted run already finished: the retry finds nothing.
            if *want == "gone" && r.status == 404 {
                continue;
            }
            assert!(
                r.status < 300,
                "{point}: after restart {req} answered {} {}\n{}",
                r.status,
                r.body,
                d.log()
            );
            if *want != "gone" {
                assert_eq!(r.body["status"], *want, "{point}: after restart {req}");
                let expect = if *want == "running" || *want == "paused" {
                    1
                } else {
                    0
                };
                let pids = sb.vmm_pids_of(&id);
                assert_eq!(
                    pids.len(),
                    expect,
                    "{point}: after {req} the status is {want} but processes are {pids:?}"
                );
            }
        }
        // Nothing left behind.
        assert_eq!(
            d.call("GET", &format!("/machines/{id}"), None).status,
            404,
            "{point}"
        );
        let by = d.call("GET", "/machines/bystander", None).body;
        assert_eq!(
            (by["status"].as_str(), by["network"]["ip"].as_str()),
            (Some("running"), Some(by_ip.as_str())),
            "{point}: the bystander lost its state or its lease"
        );
        assert_eq!(ns.hyperfleet_taps(), vec![by_tap], "{point}: TAP devices");
        let r = d.call("DELETE", "/machines/bystander?force=true", None);
        assert_eq!(r.status, 204, "{point}: {}", r.body);
        assert_eq!(
            ns.hyperfleet_taps(),
            Vec::<String>::new(),
            "{point}: TAP devices left"
        );
        assert!(
            !ns.try_exec(&["nft", "list", "table", "inet", "hyperfleet"]),
            "{point}: the nftables table outlived the machines"
        );
        eventually(
            &format!("{point}: no VMM left"),
            Duration::from_secs(5),
            || sb.vmm_pids().is_empty().then_some(()),
        );
        let leftovers: Vec<_> = std::fs::read_dir(sb.machines_dir()).unwrap().collect();
        assert!(
            leftovers.is_empty(),
            "{point}: machine directories left: {leftovers:?}"
        );
        let log = d.log();
        assert!(
            !log.contains("BUG:"),
            "{point}: the run hit an impossible transition:\n{log}"
        );
    }
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
    let _ = act(&d, &id, "start");
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

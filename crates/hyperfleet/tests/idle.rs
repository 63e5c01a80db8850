//! Waiting for exit, idle timeouts and wake on request (issue 12). With
//! the stub backend: a guest that powers itself off ends `stopped` with its
//! reason, a crash still ends `failed`; a machine with a 2 s idle timeout
//! suspends about 2 s after its last activity and not while calls keep
//! coming, a guest call wakes it, and a daemon restart keeps the timer.
//! A daemon killed mid-wake finishes the wake after its restart. With a
//! real QEMU guest: not idle mid-exec, `poweroff -f` ends `stopped`, and a
//! wake mid-suspend cancels the save and keeps the same VMM.

mod common;

use std::time::{Duration, Instant};

use common::{eventually, Daemon, Sandbox};
use serde_json::json;

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
    assert_eq!(sb.testvmm_command(&id, "GUEST_POWEROFF"), "OK");
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

/// A real QEMU guest is not idle while a command runs in it, and running
/// `poweroff -f` ends `stopped` with its reason.
#[test]
fn a_real_guest_that_powers_off_ends_stopped() {
    let Some(assets) = common::guest_assets() else {
        return;
    };
    let sb = Sandbox::new();
    let d = Daemon::start_qemu(&sb, &assets, &[]);
    let m = d.create(json!({"name": "job", "mem_size_mib": 256, "idle_timeout_seconds": 2}));
    let id = m["id"].as_str().unwrap().to_string();
    let r = d.call("POST", "/machines/job/start?timeout=300", None);
    assert_eq!(r.body["status"], "running", "{}\n{}", r.body, d.log());
    // A command in progress is activity for as long as it runs.
    let r = d.call(
        "POST",
        "/machines/job/exec",
        Some(json!({"command": ["sleep", "4"]})),
    );
    assert_eq!(
        (r.status, &r.body["exit_code"]),
        (200, &json!(0)),
        "{}",
        r.body
    );
    let r = d.call("GET", "/machines/job", None);
    assert_eq!(
        r.body["status"], "running",
        "not suspended mid-exec: {}",
        r.body
    );
    let ev = d.call("GET", "/machines/job/events", None).body.to_string();
    assert!(!ev.contains("idle:"), "{ev}");
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

/// A wake that arrives while a real QEMU machine is `suspending` cancels
/// the save (QEMU `migrate_cancel`, or the RAM copy stopped between
/// chunks) and the same VMM goes on: the exec is answered, the QEMU process
/// is the one from before, the guest's memory is as it was and no memory
/// image is left behind.
#[test]
fn a_wake_mid_suspend_cancels_the_save_and_the_same_vmm_goes_on() {
    let Some(assets) = common::guest_assets() else {
        return;
    };
    let sb = Sandbox::new();
    let d = Daemon::start_qemu(&sb, &assets, &[]);
    let m = d.create(json!({"name": "busy", "mem_size_mib": 1024}));
    let id = m["id"].as_str().unwrap().to_string();
    let r = d.call("POST", "/machines/busy/start?timeout=300", None);
    assert_eq!(r.body["status"], "running", "{}\n{}", r.body, d.log());
    // 700 MiB of touched guest memory: the save takes long enough (the RAM
    // copy and its fsync) for a wake to land in it.
    let r = d.call(
        "POST",
        "/machines/busy/exec",
        Some(json!({"command": ["sh", "-c",
            "mkdir -p /mnt/fill && mount -t tmpfs -o size=800m fill /mnt/fill && \
             dd if=/dev/zero of=/mnt/fill/x bs=1M count=700 2>/dev/null && \
             echo marker > /mnt/fill/marker && cat /proc/sys/kernel/random/boot_id"]})),
    );
    assert_eq!(r.body["exit_code"], 0, "{}", r.body);
    let boot_id = r.body["stdout"].as_str().unwrap().trim().to_string();
    let marker = sb.machines_dir().join(&id).display().to_string();
    let before = common::qemu_pids(&marker);
    assert_eq!(before.len(), 1, "{before:?}");

    let r = d.call("POST", "/machines/busy/suspend?wait=false", None);
    assert_eq!(r.status, 202, "{}", r.body);
    eventually("the save to begin", Duration::from_secs(5), || {
        (status(&d, "busy") == "suspending").then_some(())
    });
    let t0 = Instant::now();
    let r = d.call(
        "POST",
        "/machines/busy/exec",
        Some(json!({"command": ["sh", "-c",
            "cat /mnt/fill/marker /proc/sys/kernel/random/boot_id"]})),
    );
    eprintln!("exec mid-suspend answered after {:?}", t0.elapsed());
    assert_eq!(r.status, 200, "{}\n{}", r.body, d.log());
    assert_eq!(
        r.body["stdout"].as_str().unwrap(),
        format!("marker\n{boot_id}\n"),
        "the guest's memory is as it was"
    );
    assert_eq!(status(&d, "busy"), "running");
    assert_eq!(common::qemu_pids(&marker), before, "the same QEMU goes on");
    let ev = events(&d, "busy");
    assert!(ev.contains("resume requested (wake: a guest call"), "{ev}");
    assert!(ev.contains("the VMM continues"), "{ev}");
    assert!(!ev.contains("restore of"), "no restore: {ev}");
    eprintln!(
        "cancelled {}",
        if ev.contains("save cancelled half-way") {
            "half-way"
        } else {
            "as the save ended"
        }
    );
    let image = sb.machines_dir().join(&id).join("snapshot");
    let left: Vec<_> = std::fs::read_dir(&image)
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "no memory image is kept: {left:?}");
    // And a later suspend still works (nothing of the cancelled save is in
    // the way), restoring on the next exec.
    let r = d.call("POST", "/machines/busy/suspend?timeout=120", None);
    assert_eq!(r.body["status"], "suspended", "{}\n{}", r.body, d.log());
    let r = d.call(
        "POST",
        "/machines/busy/exec",
        Some(json!({"command": ["cat", "/mnt/fill/marker"]})),
    );
    assert_eq!(r.body["stdout"], "marker\n", "{}", r.body);
}

fn status(d: &Daemon, m: &str) -> String {
    d.call("GET", &format!("/machines/{m}"), None).body["status"]
        .as_str()
        .unwrap_or("")
        .to_string()
}

fn events(d: &Daemon, m: &str) -> String {
    d.call("GET", &format!("/machines/{m}/events"), None)
        .body
        .to_string()
}

/// Waits for `m` to be `want`, returning how long that took.
fn until_status(d: &Daemon, m: &str, want: &str, within: Duration) -> Duration {
    let t0 = Instant::now();
    eventually(&format!("{m} to be {want}"), within, || {
        (status(d, m) == want).then_some(())
    });
    t0.elapsed()
}

#[test]
fn an_idle_machine_suspends_after_its_timeout_and_a_guest_call_wakes_it() {
    let sb = Sandbox::new();
    let d = Daemon::start(&sb);
    d.create(json!({"name": "lazy", "idle_timeout_seconds": 2}));
    d.create(json!({"name": "never", "idle_timeout_seconds": 0}));
    let r = d.call("POST", "/machines/never/start", None);
    assert_eq!(r.body["status"], "running", "{}", r.body);
    assert!(r.body["idle_deadline"].is_null(), "0 is never: {}", r.body);
    let r = d.call("POST", "/machines/lazy/start", None);
    assert_eq!(r.body["status"], "running", "{}", r.body);
    assert_eq!(r.body["idle_timeout_seconds"], 2);
    assert!(r.body["last_active_at"].is_string(), "{}", r.body);
    assert!(r.body["idle_deadline"].is_string(), "{}", r.body);

    // Nothing uses it: suspended about 2 s after the start (the last
    // activity), within the timer's half-second tick and the suspend.
    let took = until_status(&d, "lazy", "suspended", Duration::from_secs(10));
    assert!(
        took >= Duration::from_millis(1000) && took <= Duration::from_millis(3500),
        "suspended after {took:?}"
    );
    let ev = events(&d, "lazy");
    assert!(ev.contains("suspend requested (idle: no activity"), "{ev}");
    let r = d.call("GET", "/machines/lazy", None);
    assert!(r.body["idle_deadline"].is_null(), "{}", r.body);
    assert!(r.body["last_active_at"].is_string(), "{}", r.body);

    // A guest call wakes it (the stub has no agent, so the call itself is
    // refused after the wake; the wake is what is tested).
    let t0 = Instant::now();
    let r = d.call(
        "POST",
        "/machines/lazy/exec",
        Some(json!({"command": ["true"]})),
    );
    assert_ne!(r.status, 503, "{}", r.body);
    assert_eq!(status(&d, "lazy"), "running", "woken by the exec");
    eprintln!("wake through exec took {:?}", t0.elapsed());
    let ev = events(&d, "lazy");
    assert!(ev.contains("resume requested (wake: a guest call"), "{ev}");

    // Calls every half second keep it up for well past its timeout.
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(5) {
        d.call(
            "POST",
            "/machines/lazy/exec",
            Some(json!({"command": ["true"]})),
        );
        assert_eq!(status(&d, "lazy"), "running", "suspended while in use");
        std::thread::sleep(Duration::from_millis(500));
    }
    // Then it goes again.
    until_status(&d, "lazy", "suspended", Duration::from_secs(6));
    // Concurrent calls share one wake.
    let handles: Vec<_> = (0..4)
        .map(|_| {
            let (url, key) = (d.url.clone(), d.key.clone());
            std::thread::spawn(move || {
                reqwest::blocking::Client::new()
                    .post(format!("{url}/machines/lazy/exec"))
                    .bearer_auth(key)
                    .json(&json!({"command": ["true"]}))
                    .send()
                    .unwrap()
                    .status()
                    .as_u16()
            })
        })
        .collect();
    for h in handles {
        assert_ne!(h.join().unwrap(), 503);
    }
    assert_eq!(status(&d, "lazy"), "running");
    let ev = events(&d, "lazy");
    assert_eq!(
        ev.matches("resume requested (wake").count(),
        2,
        "one wake per suspension: {ev}"
    );
    // The machine that never idles is still up.
    assert_eq!(status(&d, "never"), "running");
}

#[test]
fn the_server_default_applies_and_a_restart_keeps_the_timer() {
    let sb = Sandbox::new();
    let mut d = Daemon::start_with(&sb, &[], &["--default-idle-timeout", "3"]);
    d.create(json!({"name": "dflt"}));
    let r = d.call("POST", "/machines/dflt/start", None);
    assert_eq!(r.body["status"], "running", "{}", r.body);
    assert!(r.body["idle_timeout_seconds"].is_null());
    assert!(r.body["idle_deadline"].is_string(), "{}", r.body);
    std::thread::sleep(Duration::from_millis(1500));
    // The daemon dies; its successor adopts the VMM, and the restart counts
    // as activity: the machine is suspended about 3 s after it.
    d.kill9();
    let d = Daemon::start_with(&sb, &[], &["--default-idle-timeout", "3"]);
    let t0 = Instant::now();
    assert_eq!(status(&d, "dflt"), "running");
    until_status(&d, "dflt", "suspended", Duration::from_secs(10));
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_millis(2000) && took <= Duration::from_millis(5000),
        "suspended {took:?} after the restart"
    );
}

/// A request to the proxy (`proxy.addr`) for port 8080 of machine `id`.
fn via_proxy(d: &Daemon, sb: &Sandbox, id: &str) -> (u16, Option<String>, serde_json::Value) {
    let proxy = std::fs::read_to_string(sb.path().join("proxy.addr")).unwrap();
    let resp = reqwest::blocking::Client::new()
        .get(format!("http://{}/", proxy.trim()))
        .header("host", format!("8080-{id}.localhost"))
        .bearer_auth(&d.key)
        .send()
        .unwrap();
    let status = resp.status().as_u16();
    let retry = resp
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_string());
    (
        status,
        retry,
        resp.json().unwrap_or(serde_json::Value::Null),
    )
}

/// The proxy's wake with the stub (which has no guest port to answer: the
/// woken machine's request then ends at "no network address"; a real
/// guest's answer is tested in network.rs): a request wakes a suspended
/// machine, and a wake that fails answers 503 with `Retry-After`.
#[test]
fn a_proxy_request_wakes_a_suspended_machine_and_a_failed_wake_is_a_503() {
    let sb = Sandbox::new();
    let d = Daemon::start(&sb);
    let m = d.create(json!({"name": "web", "exposed_ports": [8080], "idle_timeout_seconds": 2}));
    let id = m["id"].as_str().unwrap().to_string();
    d.call("POST", "/machines/web/start", None);
    until_status(&d, "web", "suspended", Duration::from_secs(10));
    let (code, _, body) = via_proxy(&d, &sb, &id);
    assert_eq!(status(&d, "web"), "running", "woken: {code} {body}");
    assert!(
        body.to_string().contains("no network address"),
        "{code} {body}"
    );
    assert!(events(&d, "web").contains("resume requested (wake: proxy request)"));

    // Suspended again, its memory image lost: the wake fails.
    until_status(&d, "web", "suspended", Duration::from_secs(10));
    let state = sb.machines_dir().join(&id).join("snapshot").join("state");
    std::fs::remove_file(&state).unwrap();
    let (code, retry, body) = via_proxy(&d, &sb, &id);
    assert_eq!(code, 503, "{body}");
    assert_eq!(retry.as_deref(), Some("5"));
    assert_eq!(body["error"]["code"], "UNAVAILABLE", "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("did not wake"),
        "{body}"
    );
}

/// The daemon dies (SIGKILL at a crash point) while a wake is in flight:
/// the wake's resume was recorded first, so the restarted daemon finishes
/// it and the machine ends running. Needs the `failpoints` build.
#[test]
fn a_daemon_killed_mid_wake_finishes_the_wake_after_its_restart() {
    if !cfg!(feature = "failpoints") {
        panic!("MISSING: this test needs `--features failpoints` (the README's test command passes it)");
    }
    let sb = Sandbox::new();
    let mut d = Daemon::start(&sb);
    d.create(json!({"name": "sleeper"}));
    d.call("POST", "/machines/sleeper/start", None);
    let r = d.call("POST", "/machines/sleeper/suspend", None);
    assert_eq!(r.body["status"], "suspended", "{}", r.body);
    d.terminate();
    // The next daemon dies right after the wake's restore is spawned.
    let mut d = Daemon::start_with(&sb, &[("HYPERFLEET_CRASH_AT", "spawn.after_commit")], &[]);
    let r = d.try_call_as(
        &d.key.clone(),
        "POST",
        "/machines/sleeper/exec",
        Some(json!({"command": ["true"]})),
    );
    assert!(r.is_err(), "the daemon died mid-wake");
    let exit = d
        .wait_exit(Duration::from_secs(10))
        .expect("the daemon died");
    assert!(common::killed_by_sigkill(&exit), "{exit:?}");
    let d = Daemon::start(&sb);
    until_status(&d, "sleeper", "running", Duration::from_secs(10));
    let ev = events(&d, "sleeper");
    assert!(ev.contains("resume requested (wake: a guest call"), "{ev}");
}

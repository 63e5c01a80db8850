//! Persistence policies (issue 12), with the stub backend (a guest adds
//! nothing here; the stand-in's disk and memory image are given real bytes
//! through its `stub_disk_used_bytes` / `stub_memory_bytes` metadata):
//! ephemeral machines go when they idle, stop or power off and are never
//! suspended; the evictor reclaims sticky machines over a tiny
//! `--storage-budget` in order (memory images before machines, lowest
//! priority, least recently active across a restart); a persistent machine
//! over budget makes the next create 507 and loses nothing; PATCH changes
//! the idle deadline and the policy; a daemon SIGKILLed mid-eviction
//! converges.

mod common;

use std::time::Duration;

use common::{eventually, killed_by_sigkill, Daemon, Sandbox};
use serde_json::{json, Value};

const MIB: u64 = 1 << 20;

/// A stub machine whose disk holds `disk` bytes and whose suspend image
/// `memory` bytes more.
fn sized(name: &str, persistence: Value, disk: u64, memory: u64) -> Value {
    json!({
        "name": name,
        "persistence": persistence,
        "metadata": {
            "stub_disk_used_bytes": disk.to_string(),
            "stub_memory_bytes": memory.to_string(),
        },
    })
}

fn status(d: &Daemon, name: &str) -> Option<String> {
    let r = d.call("GET", &format!("/machines/{name}"), None);
    match r.status {
        404 => None,
        200 => Some(r.body["status"].as_str().unwrap_or("").to_string()),
        s => panic!("GET {name}: {s} {}", r.body),
    }
}

fn gone(d: &Daemon, name: &str, within: Duration) {
    eventually(&format!("{name} deleted"), within, || {
        status(d, name).is_none().then_some(())
    });
}

fn act(d: &Daemon, name: &str, action: &str) -> common::Resp {
    d.call("POST", &format!("/machines/{name}/{action}"), None)
}

fn storage(d: &Daemon) -> Value {
    let r = d.call("GET", "/storage", None);
    assert_eq!(r.status, 200, "{}", r.body);
    r.body
}

#[test]
fn ephemeral_machines_go_when_they_idle_stop_or_power_off_and_never_suspend() {
    let sb = Sandbox::new();
    let d = Daemon::start(&sb);
    let eph = json!({"type": "ephemeral"});

    // The policy shows with its defaults filled in; sticky by default.
    let m = d.create(json!({"name": "plain"}));
    assert_eq!(m["persistence"], json!({"type": "sticky", "priority": 5}));

    // Idle: deleted at its timeout instead of suspended.
    d.create(json!({"name": "idler", "persistence": eph, "idle_timeout_seconds": 1}));
    assert_eq!(act(&d, "idler", "start").body["status"], "running");
    gone(&d, "idler", Duration::from_secs(10));

    // Never suspended; a stop deletes it (answered as a delete).
    d.create(json!({"name": "stopper", "persistence": eph}));
    assert_eq!(act(&d, "stopper", "start").body["status"], "running");
    let r = act(&d, "stopper", "suspend");
    assert_eq!(r.status, 409, "{}", r.body);
    assert_eq!(r.code(), "INVALID_STATE");
    assert!(
        r.body.to_string().contains("ephemeral"),
        "the message says why: {}",
        r.body
    );
    assert_eq!(status(&d, "stopper").as_deref(), Some("running"));
    let r = act(&d, "stopper", "stop");
    assert_eq!(r.status, 204, "{}", r.body);
    assert_eq!(status(&d, "stopper"), None);

    // A kill too.
    d.create(json!({"name": "killed", "persistence": eph}));
    act(&d, "killed", "start");
    assert_eq!(act(&d, "killed", "kill").status, 204);
    assert_eq!(status(&d, "killed"), None);

    // A kill escalates the stop that deletes it, as any graceful stop.
    d.create(json!({"name": "stubborn", "persistence": eph,
                    "metadata": {"stub_ignore_poweroff": "true"}}));
    act(&d, "stubborn", "start");
    let r = d.call("POST", "/machines/stubborn/stop?wait=false", None);
    assert_eq!(r.status, 202, "{}", r.body);
    assert_eq!(r.body["desired_status"], "deleting", "{}", r.body);
    let t0 = std::time::Instant::now();
    let r = act(&d, "stubborn", "kill");
    assert_eq!(r.status, 204, "{}", r.body);
    assert!(
        t0.elapsed() < Duration::from_millis(1500),
        "{:?}",
        t0.elapsed()
    );
    assert_eq!(status(&d, "stubborn"), None);

    // A guest that powers itself off: gone, nothing left behind.
    let m = d.create(json!({"name": "job", "persistence": eph}));
    let id = m["id"].as_str().unwrap().to_string();
    act(&d, "job", "start");
    assert_eq!(sb.testvmm_command(&id, "GUEST_POWEROFF"), "OK");
    gone(&d, "job", Duration::from_secs(10));
    assert!(sb.vmm_pids_of(&id).is_empty());
    assert!(!sb.machines_dir().join(&id).exists(), "its files are gone");

    // A sticky machine still suspends and stops as before.
    act(&d, "plain", "start");
    assert_eq!(act(&d, "plain", "suspend").body["status"], "suspended");
    assert_eq!(act(&d, "plain", "stop").body["status"], "stopped");
}

#[test]
fn patch_changes_the_idle_deadline_the_policy_and_the_metadata() {
    let sb = Sandbox::new();
    let d = Daemon::start(&sb);
    d.create(json!({"name": "p", "idle_timeout_seconds": 0, "metadata": {"a": "1"}}));
    let r = act(&d, "p", "start");
    assert_eq!(r.body["status"], "running");
    assert!(r.body["idle_deadline"].is_null(), "never idles: {}", r.body);

    // Invalid updates change nothing.
    for bad in [
        json!({"persistence": {"type": "sticky", "priority": 11}}),
        json!({"idle_timeout_seconds": 604801}),
        json!({"name": "other"}),
        json!({"persistence": {"type": "forever"}}),
    ] {
        let r = d.call("PATCH", "/machines/p", Some(bad.clone()));
        assert_eq!(r.status, 400, "{bad}: {}", r.body);
    }

    let r = d.call(
        "PATCH",
        "/machines/p",
        Some(json!({
            "idle_timeout_seconds": 2,
            "persistence": {"type": "sticky", "priority": 3},
            "metadata": {"b": "2"},
        })),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["idle_timeout_seconds"], 2);
    assert_eq!(
        r.body["persistence"],
        json!({"type": "sticky", "priority": 3})
    );
    assert_eq!(r.body["metadata"], json!({"b": "2"}), "replaced as a whole");
    assert!(r.body["idle_deadline"].is_string(), "re-armed: {}", r.body);
    let ev = d.call("GET", "/machines/p/events", None).body;
    assert!(
        ev["events"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["kind"] == "updated"
                && e["message"]
                    .as_str()
                    .unwrap_or("")
                    .contains("idle timeout 2 s")),
        "{ev}"
    );
    // The new deadline holds: suspended about 2 s later.
    eventually("p suspended for idleness", Duration::from_secs(10), || {
        (status(&d, "p").as_deref() == Some("suspended")).then_some(())
    });

    // Suspended, it cannot become ephemeral; null is the server default.
    let r = d.call(
        "PATCH",
        "/machines/p",
        Some(json!({"persistence": {"type": "ephemeral"}})),
    );
    assert_eq!(r.status, 409, "{}", r.body);
    let r = d.call(
        "PATCH",
        "/machines/p",
        Some(json!({"idle_timeout_seconds": null})),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.body["idle_timeout_seconds"].is_null());
    assert_eq!(r.body["persistence"]["priority"], 3, "left as it was");
    let r = d.call("PATCH", "/machines/nope", Some(json!({})));
    assert_eq!(r.status, 404);
}

#[test]
fn the_evictor_takes_memory_images_first_then_machines_lowest_priority_least_recent_first() {
    let sb = Sandbox::new();
    let mut d = Daemon::start(&sb);
    let sticky = |p: u8| json!({"type": "sticky", "priority": p});
    for (name, p) in [
        ("low-old", sticky(1)),
        ("low-new", sticky(1)),
        ("high", sticky(8)),
        ("keep", json!({"type": "persistent"})),
        ("busy", sticky(0)),
    ] {
        d.create(sized(name, p, MIB, MIB));
        assert_eq!(act(&d, name, "start").body["status"], "running");
    }
    // low-old is the least recently active of the two priority-1 machines.
    for name in ["low-old", "low-new", "high", "keep"] {
        assert_eq!(act(&d, name, "suspend").body["status"], "suspended");
        std::thread::sleep(Duration::from_millis(100));
    }
    let before = eventually("all measured", Duration::from_secs(10), || {
        let s = storage(&d);
        (s["memory_images_bytes"].as_u64().unwrap() >= 4 * MIB).then_some(s)
    });
    assert_eq!(before["budget_source"], "default", "{before}");
    assert_eq!(before["evicted_machines"], 0);
    let r = d.call("GET", "/machines/keep", None);
    assert!(
        r.body["stored_bytes"].as_u64().unwrap() >= 2 * MIB,
        "a machine shows what it holds: {}",
        r.body
    );

    // Restarted over a tiny budget: about 9 MiB stored, 4.5 allowed. The
    // order survives the restart (last activity is persisted).
    d.terminate();
    let budget = (9 * MIB / 2).to_string();
    d = Daemon::start_with(&sb, &[], &["--storage-budget", &budget]);
    gone(&d, "low-new", Duration::from_secs(30));
    let s = eventually("evictions recorded", Duration::from_secs(10), || {
        let s = storage(&d);
        (s["evicted_machines"] == 2).then_some(s)
    });
    let order: Vec<(String, String)> = s["recent_evictions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["machine_name"].as_str().unwrap().to_string(),
                e["what"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let want = [
        ("low-old", "memory_image"),
        ("low-new", "memory_image"),
        ("high", "memory_image"),
        ("low-old", "machine"),
        ("low-new", "machine"),
    ];
    assert_eq!(
        order,
        want.map(|(a, b)| (a.to_string(), b.to_string())),
        "{s}"
    );
    assert_eq!(s["budget_source"], "flag");
    assert!(s["used_bytes"].as_u64().unwrap() <= 9 * MIB / 2, "{s}");
    assert_eq!(status(&d, "low-old"), None);
    assert_eq!(status(&d, "high").as_deref(), Some("stopped"));
    // Stopped: its cached JSON gets the measurement too, without the image.
    let high = d.call("GET", "/machines/high", None).body;
    let held = high["stored_bytes"].as_u64().unwrap();
    assert!((MIB..2 * MIB).contains(&held), "{high}");
    assert_eq!(status(&d, "keep").as_deref(), Some("suspended"));
    assert_eq!(status(&d, "busy").as_deref(), Some("running"));
    let ev = d.call("GET", "/machines/high/events", None).body;
    let evicted: Vec<&Value> = ev["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "evicted")
        .collect();
    assert_eq!(evicted.len(), 1, "{ev}");
    assert!(
        evicted[0]["message"]
            .as_str()
            .unwrap()
            .contains("storage budget"),
        "{ev}"
    );
    let keep = d.call("GET", "/machines/keep/events", None).body;
    assert!(!keep.to_string().contains("evicted"), "{keep}");
    // What was kept still works: the persistent machine resumes.
    assert_eq!(act(&d, "keep", "resume").body["status"], "running");
    // The machine whose image went is stopped, but nobody asked for that:
    // it says why, and a guest call wakes it with a fresh boot (the stub
    // has no agent, so the call itself is refused after the wake).
    assert!(
        high["exit_reason"]
            .as_str()
            .unwrap_or("")
            .starts_with("evicted:"),
        "{high}"
    );
    assert!(high["error_message"].is_null(), "{high}");
    let r = d.call(
        "POST",
        "/machines/high/exec",
        Some(json!({"command": ["true"]})),
    );
    assert_ne!(r.status, 503, "{}", r.body);
    let high = d.call("GET", "/machines/high", None).body;
    assert_eq!(high["status"], "running", "{high}");
    assert!(high["exit_reason"].is_null(), "{high}");
    let ev = d
        .call("GET", "/machines/high/events", None)
        .body
        .to_string();
    assert!(ev.contains("start requested (wake: a guest call"), "{ev}");
}

#[test]
fn a_persistent_machine_over_budget_makes_the_next_create_507_and_loses_nothing() {
    let sb = Sandbox::new();
    let d = Daemon::start_with(&sb, &[], &["--storage-budget", "3M"]);
    d.create(sized(
        "keep",
        json!({"type": "persistent"}),
        2 * MIB,
        2 * MIB,
    ));
    assert_eq!(act(&d, "keep", "start").body["status"], "running");
    assert_eq!(act(&d, "keep", "suspend").body["status"], "suspended");
    let s = eventually("over budget", Duration::from_secs(10), || {
        let s = storage(&d);
        (s["used_bytes"].as_u64().unwrap() > 3 * MIB).then_some(s)
    });
    assert_eq!(s["reclaimable_bytes"], 0, "{s}");
    let held = d.call("GET", "/machines/keep", None).body["stored_bytes"]
        .as_u64()
        .unwrap();

    let r = d.call("POST", "/machines", Some(json!({"name": "more"})));
    assert_eq!(r.status, 507, "{}", r.body);
    assert_eq!(r.code(), "INSUFFICIENT_STORAGE");
    assert!(r.body.to_string().contains("storage budget"), "{}", r.body);
    assert_eq!(status(&d, "more"), None, "nothing was created");

    // Nothing stored was lost: still suspended, same bytes, and it resumes.
    std::thread::sleep(Duration::from_millis(500));
    let m = d.call("GET", "/machines/keep", None).body;
    assert_eq!(m["status"], "suspended", "{m}");
    assert_eq!(m["stored_bytes"].as_u64().unwrap(), held);
    assert_eq!(storage(&d)["evicted_memory_images"], 0);
    assert_eq!(act(&d, "keep", "resume").body["status"], "running");

    // A suspend that would store more is refused the same way.
    let r = act(&d, "keep", "suspend");
    assert_eq!(r.status, 507, "{}", r.body);
    assert_eq!(status(&d, "keep").as_deref(), Some("running"));

    // Room again once it is gone.
    let r = d.call("DELETE", "/machines/keep?force=true", None);
    assert_eq!(r.status, 204, "{}", r.body);
    eventually("room again", Duration::from_secs(10), || {
        let r = d.call("POST", "/machines", Some(json!({"name": "more"})));
        (r.status == 201).then_some(())
    });
}

#[test]
fn a_daemon_killed_in_the_middle_of_an_eviction_converges_after_restart() {
    let sb = Sandbox::new();
    let mut d = Daemon::start(&sb);
    let a = d.create(sized("a", json!({"type": "sticky", "priority": 1}), MIB, 0));
    let a_id = a["id"].as_str().unwrap().to_string();
    d.create(sized("keep", json!({"type": "persistent"}), MIB, 0));
    for name in ["a", "keep"] {
        act(&d, name, "start");
        assert_eq!(act(&d, name, "stop").body["status"], "stopped");
    }
    d.terminate();

    // Over budget: the evictor deletes `a`, and the daemon dies right
    // after the release began.
    let mut d = Daemon::start_with(
        &sb,
        &[("HYPERFLEET_CRASH_AT", "release.after_intent")],
        &["--storage-budget", "1536K"],
    );
    let exit = d
        .wait_exit(Duration::from_secs(30))
        .expect("the daemon crashed at the crash point");
    assert!(killed_by_sigkill(&exit), "{exit:?}");
    assert!(sb.machines_dir().join(&a_id).exists(), "killed mid-release");

    let d = Daemon::start_with(&sb, &[], &["--storage-budget", "1536K"]);
    gone(&d, "a", Duration::from_secs(20));
    eventually("a's files removed", Duration::from_secs(10), || {
        (!sb.machines_dir().join(&a_id).exists()).then_some(())
    });
    assert_eq!(status(&d, "keep").as_deref(), Some("stopped"));
    assert!(sb.vmm_pids().is_empty(), "no VMM left: {:?}", sb.vmm_pids());
    eventually("within budget", Duration::from_secs(10), || {
        let s = storage(&d);
        (s["used_bytes"].as_u64().unwrap() <= 1536 << 10 && s["machines"] == 1).then_some(())
    });
}

/// The CLI (and with it the Rust client): `machines create --persistence
/// --idle-timeout`, `machines update`, and a stop that deletes.
#[test]
fn the_cli_creates_and_updates_policies_and_timeouts() {
    let sb = Sandbox::new();
    let d = Daemon::start(&sb);
    let cli = |args: &[&str]| -> std::process::Output {
        std::process::Command::new(common::bin())
            .args(["--url", &d.url, "--api-key", &d.key])
            .args(args)
            .output()
            .unwrap()
    };
    let json = |args: &[&str]| -> Value {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        let out = cli(&all);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let m = json(&[
        "machines",
        "create",
        "--name",
        "c1",
        "--persistence",
        "sticky:7",
        "--idle-timeout",
        "0",
    ]);
    assert_eq!(m["persistence"], json!({"type": "sticky", "priority": 7}));
    assert_eq!(m["idle_timeout_seconds"], 0);
    let m = json(&[
        "machines",
        "update",
        "c1",
        "--idle-timeout",
        "120",
        "--persistence",
        "persistent",
        "--metadata",
        "team=a",
    ]);
    assert_eq!(m["idle_timeout_seconds"], 120);
    assert_eq!(m["persistence"]["type"], "persistent");
    assert_eq!(m["metadata"], json!({"team": "a"}));
    let m = json(&[
        "machines",
        "update",
        "c1",
        "--idle-timeout",
        "default",
        "--clear-metadata",
    ]);
    assert!(m["idle_timeout_seconds"].is_null(), "{m}");
    assert_eq!(m["metadata"], json!({}));
    let out = cli(&["machines", "update", "c1", "--persistence", "sticky:11"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("priority"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Ephemeral: its stop deletes it, and the CLI says nothing is left.
    json(&["machines", "update", "c1", "--persistence", "ephemeral"]);
    assert!(cli(&["machines", "start", "c1"]).status.success());
    let out = cli(&["machines", "stop", "c1"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(status(&d, "c1"), None);
    // The storage figures, as JSON and as a table.
    let s = json(&["storage"]);
    assert!(s["budget_bytes"].as_u64().unwrap() > 0, "{s}");
    assert_eq!(s["budget_source"], "default");
    let out = cli(&["storage"]);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && table.contains("budget") && table.contains("(default)"),
        "{table}"
    );
}

//! Snapshots, machines made from them, forks and templates with real QEMU
//! guests: memory and disk carry over (a process started before the
//! snapshot goes on running in every copy), each copy takes an identity of
//! its own (address, MAC, hostname, machine id, boot id, RNG, clock), the
//! source keeps running, and a snapshot deleted while in use keeps its
//! files until its last user goes. Runs the daemon with networking on in a
//! network namespace of its own (common/netns.rs). Needs root, QEMU and the
//! guest assets (scripts/test.sh provides them; in CI nothing is skipped).

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::netns::NetNs;
use common::{guest_assets, Daemon, Sandbox};
use serde_json::{json, Value};

/// A namespace with a default route (nothing answers behind it): enough
/// for the daemon's machine networking, and gone with the test.
fn network_namespace() -> NetNs {
    let ns = NetNs::new("s");
    for cmd in [
        "ip link add hfdummy type veth peer name hfdummyp",
        "ip link set hfdummyp up",
        "ip addr add 10.251.0.1/24 dev hfdummy",
        "ip link set hfdummy up",
        "ip route add default via 10.251.0.2",
    ] {
        ns.exec(&cmd.split(' ').collect::<Vec<_>>());
    }
    ns
}

fn sh(d: &Daemon, id: &str, script: &str) -> String {
    let r = d.call(
        "POST",
        &format!("/machines/{id}/exec"),
        Some(json!({"command": ["sh", "-c", script]})),
    );
    assert_eq!(r.status, 200, "{script}: {}", r.body);
    assert_eq!(r.body["exit_code"], 0, "{script}: {}", r.body);
    r.body["stdout"].as_str().unwrap().to_string()
}

fn start(d: &Daemon, name: &str) -> Value {
    let r = d.call("POST", &format!("/machines/{name}/start?timeout=300"), None);
    assert_eq!(r.body["status"], "running", "{}\n{}", r.body, d.log());
    r.body
}

fn events(d: &Daemon, name: &str) -> String {
    d.call("GET", &format!("/machines/{name}/events"), None)
        .body
        .to_string()
}

/// What a guest says about itself: the things that must differ per copy.
fn identity(d: &Daemon, id: &str) -> Vec<String> {
    let out = sh(
        d,
        id,
        "ip -4 -o addr show eth0 | awk '{print $4}'; cat /sys/class/net/eth0/address; hostname; \
         (cat /etc/machine-id 2>/dev/null || echo none); cat /proc/sys/kernel/random/boot_id; \
         head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo",
    );
    out.lines().map(str::to_string).collect()
}

fn guest_clock_skew(d: &Daemon, id: &str) -> f64 {
    let guest: f64 = sh(d, id, "date +%s").trim().parse().unwrap();
    let host = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    (guest - host).abs()
}

#[test]
fn snapshots_and_forks_carry_memory_and_disk_and_give_each_copy_its_own_identity() {
    let Some(assets) = guest_assets() else { return };
    let ns = network_namespace();
    ns.enter();
    let sb = Sandbox::new();
    let d = Daemon::start_qemu(&sb, &assets, &["--network", "on", "--dns", "10.251.0.2"]);
    let src = d.create(json!({"name": "src", "mem_size_mib": 256}));
    let src_id = src["id"].as_str().unwrap().to_string();
    start(&d, "src");

    // A file on disk, and a process whose only copy of the marker is in
    // memory (its environment).
    let marker = format!("mk{}", std::process::id());
    sh(&d, &src_id, &format!("echo {marker} > /root/on-disk"));
    sh(
        &d,
        &src_id,
        &format!("MARKER={marker} setsid sleep 100000 </dev/null >/dev/null 2>&1 &"),
    );
    let holder = "for p in $(pidof sleep); do tr '\\0' '\\n' < /proc/$p/environ; done".to_string();
    assert!(sh(&d, &src_id, &holder).contains(&marker));

    // A snapshot of the running machine: it keeps running.
    let r = d.call(
        "POST",
        "/machines/src/snapshots?timeout=300",
        Some(json!({"name": "snap1"})),
    );
    assert_eq!(r.status, 201, "{}\n{}", r.body, d.log());
    assert_eq!(r.body["status"], "ready");
    assert_eq!(r.body["memory"], true);
    assert!(r.body["pause_ms"].as_f64().is_some(), "{}", r.body);
    let snap_id = r.body["id"].as_str().unwrap().to_string();
    let r = d.call("GET", "/machines/src", None);
    assert_eq!(r.body["status"], "running");
    assert!(events(&d, "src").contains("take_snapshot"));
    // Names are unique per tenant.
    let r = d.call(
        "POST",
        "/machines/src/snapshots",
        Some(json!({"name": "snap1"})),
    );
    assert_eq!(r.status, 409, "{}", r.body);

    // Two machines from it: both see the file and the process.
    let mut copies = Vec::new();
    for name in ["from-a", "from-b"] {
        let m = d.create(json!({"name": name, "snapshot_id": "snap1"}));
        assert_eq!(m["snapshot_id"], snap_id.as_str());
        assert_eq!(m["mem_size_mib"], 256);
        start(&d, name);
        let id = m["id"].as_str().unwrap().to_string();
        assert_eq!(sh(&d, &id, "cat /root/on-disk").trim(), marker);
        assert!(
            sh(&d, &id, &holder).contains(&marker),
            "the process lives on"
        );
        let ev = events(&d, name);
        assert!(
            ev.contains(&format!("restore of snapshot {snap_id}")),
            "{ev}"
        );
        copies.push(id);
    }
    // Sizes must match a snapshot with memory.
    let r = d.call(
        "POST",
        "/machines",
        Some(json!({"snapshot_id": "snap1", "mem_size_mib": 512})),
    );
    assert_eq!(r.status, 409, "{}", r.body);

    // Fork: three running copies of the running source.
    let r = d.call(
        "POST",
        "/machines/src/fork?timeout=300",
        Some(json!({"count": 3})),
    );
    assert_eq!(r.status, 201, "{}\n{}", r.body, d.log());
    let forks: Vec<String> = r.body["machines"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            assert_eq!(m["status"], "running", "{m}");
            m["id"].as_str().unwrap().to_string()
        })
        .collect();
    assert_eq!(forks.len(), 3);
    let pause = r.body["pause_ms"].as_f64().unwrap();
    assert!(pause < 5000.0, "the source paused {pause} ms");
    let r = d.call("GET", "/machines/src", None);
    assert_eq!(r.body["status"], "running", "the source keeps running");
    assert!(sh(&d, &src_id, &holder).contains(&marker));

    let mut ids = vec![identity(&d, &src_id)];
    for id in forks.iter().chain(&copies) {
        assert!(
            sh(&d, id, &holder).contains(&marker),
            "{id}: the process lives on"
        );
        assert!(
            guest_clock_skew(&d, id) <= 1.5,
            "{id}: the clock follows the host"
        );
        ids.push(identity(&d, id));
    }
    // Each line (IP, MAC, hostname, machine id, boot id, random bytes)
    // differs between every two machines.
    for field in 0..6 {
        let values: HashSet<&String> = ids.iter().map(|i| &i[field]).collect();
        assert_eq!(values.len(), ids.len(), "field {field} repeats: {ids:?}");
    }
    // The copy's hostname is its own name, and its address its lease.
    let fork0 = d.call("GET", &format!("/machines/{}", forks[0]), None).body;
    assert_eq!(
        ids[1][0].split('/').next().unwrap(),
        fork0["network"]["ip"].as_str().unwrap()
    );
    assert_eq!(ids[1][2], fork0["name"].as_str().unwrap());

    // Deleting a snapshot in use defers its files.
    let snap_dir = sb.path().join("snapshots").join(&snap_id);
    let r = d.call("DELETE", "/snapshots/snap1", None);
    assert_eq!(r.status, 204, "{}", r.body);
    let r = d.call("GET", &format!("/snapshots/{snap_id}"), None);
    assert_eq!(r.body["status"], "deleting", "{}", r.body);
    assert!(snap_dir.is_dir(), "kept while machines use it");
    let r = d.call("GET", "/snapshots", None);
    assert_eq!(r.body["snapshots"].as_array().unwrap().len(), 0);
    // The copies still work.
    assert_eq!(sh(&d, &copies[0], "echo ok"), "ok\n");
    for id in copies.iter().chain(&forks) {
        let r = d.call("DELETE", &format!("/machines/{id}?force=true"), None);
        assert_eq!(r.status, 204, "{}", r.body);
    }
    // The files go right after the last user's record (its run removes
    // them once the delete is committed).
    let snapshots_dir = sb.path().join("snapshots");
    common::eventually(
        "the snapshots' files to go",
        Duration::from_secs(10),
        || {
            let left = std::fs::read_dir(&snapshots_dir).unwrap().count();
            (left == 0).then_some(())
        },
    );
    assert!(!snap_dir.exists(), "gone with its last user");

    // A stopped machine's snapshot holds its disk only.
    let r = d.call("POST", "/machines/src/stop?timeout=120", None);
    assert_eq!(r.body["status"], "stopped", "{}", r.body);
    let r = d.call("POST", "/machines/src/snapshots?timeout=120", None);
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(r.body["memory"], false);
    let m = d.create(json!({"name": "cold", "snapshot_id": r.body["id"]}));
    start(&d, "cold");
    let id = m["id"].as_str().unwrap();
    assert_eq!(sh(&d, id, "cat /root/on-disk").trim(), marker);
    assert!(events(&d, "cold").contains(", boot"));
    let r = d.call("DELETE", "/machines/cold?force=true", None);
    assert_eq!(r.status, 204);
    let r = d.call("DELETE", "/machines/src?force=true", None);
    assert_eq!(r.status, 204);
    assert!(
        common::qemu_pids(&sb.path().display().to_string()).is_empty(),
        "no QEMU left"
    );
}

#[test]
fn a_machine_created_after_a_template_was_warmed_starts_from_it() {
    let Some(assets) = guest_assets() else { return };
    let sb = Sandbox::new();
    let d = Daemon::start_qemu(&sb, &assets, &[]);
    let r = d.call(
        "POST",
        "/templates?timeout=300",
        Some(json!({"vcpu_count": 1, "mem_size_mib": 256})),
    );
    assert_eq!(r.status, 201, "{}\n{}", r.body, d.log());
    let template = r.body["id"].as_str().unwrap().to_string();
    assert_eq!(r.body["memory"], true);
    // Warming again answers the same template.
    let r = d.call("POST", "/templates", Some(json!({"mem_size_mib": 256})));
    assert_eq!(r.body["id"], template.as_str());
    let r = d.call("GET", "/templates", None);
    assert_eq!(
        r.body["snapshots"][0]["id"],
        template.as_str(),
        "{}",
        r.body
    );
    // The builder machine is gone and was never the tenant's.
    let r = d.call("GET", "/machines", None);
    assert_eq!(r.body["total"], 0, "{}", r.body);

    let m = d.create(json!({"name": "fast", "mem_size_mib": 256}));
    assert_eq!(m["snapshot_id"], template.as_str());
    let id = m["id"].as_str().unwrap().to_string();
    start(&d, "fast");
    let ev = events(&d, "fast");
    assert!(ev.contains(&format!("template {template}")), "{ev}");
    assert!(ev.contains("refresh_identity"), "{ev}");
    assert_eq!(sh(&d, &id, "hostname").trim(), "fast");
    // Another size has no template: it boots.
    d.create(json!({"name": "cold", "mem_size_mib": 320}));
    start(&d, "cold");
    assert!(events(&d, "cold").contains(", boot"));

    // A machine made from a template maps its RAM privately: its first
    // suspend streams RAM, its resume loads it into a file of its own, and
    // from then on it saves the fast way (a flat image). Memory survives
    // both.
    sh(&d, &id, "echo kept > /run/mem-marker");
    for round in 0..2 {
        let r = d.call("POST", "/machines/fast/suspend?timeout=300", None);
        assert_eq!(
            r.body["status"],
            "suspended",
            "{round}: {}\n{}",
            r.body,
            d.log()
        );
        let img = sb.path().join("machines").join(&id).join("snapshot");
        assert_eq!(
            img.join("ram").exists(),
            round == 1,
            "round {round}: a stream image first, a flat one after"
        );
        let r = d.call("POST", "/machines/fast/resume?timeout=300", None);
        assert_eq!(
            r.body["status"],
            "running",
            "{round}: {}\n{}",
            r.body,
            d.log()
        );
        assert_eq!(sh(&d, &id, "cat /run/mem-marker"), "kept\n");
        assert!(
            guest_clock_skew(&d, &id) <= 1.5,
            "the clock is set after a resume"
        );
    }

    // A restart boots from the disk (the template is only the first start).
    let r = d.call("POST", "/machines/fast/restart?timeout=300", None);
    assert_eq!(r.body["status"], "running", "{}", r.body);
    for name in ["fast", "cold"] {
        let r = d.call("DELETE", &format!("/machines/{name}?force=true"), None);
        assert_eq!(r.status, 204);
    }
    let r = d.call("DELETE", &format!("/templates/{template}"), None);
    assert_eq!(r.status, 204, "{}", r.body);
    let snapshots_dir = sb.path().join("snapshots");
    common::eventually(
        "the template's files to go",
        Duration::from_secs(10),
        || (std::fs::read_dir(&snapshots_dir).unwrap().count() == 0).then_some(()),
    );
    assert!(common::qemu_pids(&sb.path().display().to_string()).is_empty());
}

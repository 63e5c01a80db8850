//! The CLI's snapshot, fork and template commands, run as a user runs them
//! (the `hyperfleet` binary with `--url` and `--api-key`) against the real
//! daemon with the stub backend: tables for people, the API's JSON with
//! `--json`, and the server's errors as a failing exit with its message.
//! (The stub backend makes templates too: its builder machine is a stand-in
//! process, snapshotted like any other.)

mod common;

use std::process::{Command, Output};

use common::{Daemon, Sandbox};
use serde_json::Value;

fn run(d: &Daemon, args: &[&str]) -> Output {
    Command::new(common::bin())
        .args(["--url", &d.url, "--api-key", &d.key])
        .args(args)
        .output()
        .unwrap()
}

/// Runs the CLI; it must succeed. Its stdout and stderr.
fn cli(d: &Daemon, args: &[&str]) -> (String, String) {
    let out = run(d, args);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success(),
        "{args:?}: {stderr}\n--- daemon log ---\n{}",
        d.log()
    );
    (String::from_utf8(out.stdout).unwrap(), stderr)
}

fn cli_json(d: &Daemon, args: &[&str]) -> Value {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    let (out, _) = cli(d, &all);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?}: {e}: {out}"))
}

/// Runs the CLI; it must fail. Its stderr.
fn cli_fails(d: &Daemon, args: &[&str]) -> String {
    let out = run(d, args);
    assert!(
        !out.status.success(),
        "{args:?} succeeded: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn cli_snapshots_create_list_get_delete_and_machines_from_them() {
    let sb = Sandbox::new();
    let d = Daemon::start(&sb);
    cli(&d, &["machines", "create", "--name", "src", "--start"]);

    // A table for people: the snapshot's name, status and that it holds memory.
    let (out, _) = cli(&d, &["snapshots", "create", "src", "--name", "snap1"]);
    assert!(out.contains("snap1") && out.contains("ready"), "{out}");
    assert!(out.contains("memory") && out.contains("yes"), "{out}");
    // The JSON is the API's Snapshot.
    let s = cli_json(&d, &["snapshots", "create", "src", "--name", "snap2"]);
    assert_eq!(s["name"], "snap2");
    assert_eq!(s["status"], "ready");
    assert_eq!(s["memory"], true);
    let snap2_id = s["id"].as_str().unwrap().to_string();
    let src_id = d.call("GET", "/api/v1/machines/src", None).body["id"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(s["machine_id"], src_id.as_str());

    // --no-wait answers at once; the snapshot becomes ready on its own.
    let s = cli_json(
        &d,
        &["snapshots", "create", "src", "--name", "snap3", "--no-wait"],
    );
    assert!(s["status"] == "creating" || s["status"] == "ready", "{s}");
    common::eventually("snap3 ready", std::time::Duration::from_secs(30), || {
        (cli_json(&d, &["snapshots", "get", "snap3"])["status"] == "ready").then_some(())
    });

    // list: a row each; get by id and by name.
    let (out, _) = cli(&d, &["snapshots", "list"]);
    let lines: Vec<&str> = out.lines().collect();
    assert!(
        lines[0].starts_with("ID") && lines[0].contains("STATUS"),
        "{out}"
    );
    assert_eq!(lines.len(), 4, "{out}");
    for n in ["snap1", "snap2", "snap3"] {
        assert!(out.contains(n), "{out}");
    }
    let list = cli_json(&d, &["snapshots", "list"]);
    assert_eq!(list["snapshots"].as_array().unwrap().len(), 3);
    assert_eq!(
        cli_json(&d, &["snapshots", "get", &snap2_id])["name"],
        "snap2"
    );
    let (out, _) = cli(&d, &["snapshots", "get", "snap2"]);
    assert!(out.contains(&snap2_id) && out.contains(&src_id), "{out}");

    // machines create --snapshot: the machine names its base and runs.
    let m = cli_json(
        &d,
        &[
            "machines",
            "create",
            "--name",
            "child",
            "--snapshot",
            "snap1",
            "--start",
        ],
    );
    assert_eq!(m["status"], "running", "{m}");
    let snap1_id = cli_json(&d, &["snapshots", "get", "snap1"])["id"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(m["snapshot_id"], snap1_id.as_str());
    let (out, _) = cli(&d, &["machines", "get", "child"]);
    assert!(
        out.lines()
            .any(|l| l.starts_with("snapshot") && l.contains(&snap1_id)),
        "{out}"
    );
    assert_eq!(cli_json(&d, &["snapshots", "get", "snap1"])["used_by"], 1);

    // Deleting a snapshot in use is accepted and deferred; an unused one goes.
    let (out, _) = cli(&d, &["snapshots", "delete", "snap1"]);
    assert!(out.contains("deleted snap1"), "{out}");
    cli(&d, &["snapshots", "delete", &snap2_id]);
    let err = cli_fails(&d, &["snapshots", "get", &snap2_id]);
    assert!(err.contains("NotFound") || err.contains("404"), "{err}");
    let left = cli_json(&d, &["snapshots", "list"]);
    let names: Vec<&str> = left["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["snap3"], "{left}");
    assert_eq!(
        d.call("GET", "/api/v1/machines/child", None).body["status"],
        "running"
    );

    // The server's refusals come back as a failing exit with its message.
    let err = cli_fails(&d, &["snapshots", "create", "src", "--name", "snap3"]);
    assert!(err.starts_with("error:") && err.contains("snap3"), "{err}");
    let err = cli_fails(&d, &["snapshots", "get", "nope"]);
    assert!(err.contains("nope"), "{err}");
    let err = cli_fails(&d, &["machines", "create", "--snapshot", "nope"]);
    assert!(err.contains("nope"), "{err}");
}

#[test]
fn cli_machines_fork_makes_running_copies() {
    let sb = Sandbox::new();
    let d = Daemon::start(&sb);
    cli(&d, &["machines", "create", "--name", "origin", "--start"]);

    // One copy by default: a table row and a note of the pause on stderr.
    let (out, err) = cli(&d, &["machines", "fork", "origin"]);
    let lines: Vec<&str> = out.lines().collect();
    assert!(
        lines[0].starts_with("ID") && lines[0].contains("NAME"),
        "{out}"
    );
    assert_eq!(lines.len(), 2, "{out}");
    assert!(lines[1].contains("running"), "{out}");
    assert!(err.contains("1 copy of origin from snapshot"), "{err}");

    // Named copies, as JSON: the API's fork result.
    let r = cli_json(
        &d,
        &[
            "machines", "fork", "origin", "--name", "f-a", "--name", "f-b",
        ],
    );
    let copies = r["machines"].as_array().unwrap();
    let names: Vec<&str> = copies.iter().map(|m| m["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["f-a", "f-b"]);
    for m in copies {
        assert_eq!(m["status"], "running", "{m}");
        assert_eq!(m["snapshot_id"], r["snapshot_id"]);
    }
    assert!(
        r["snapshot_id"].as_str().is_some_and(|s| !s.is_empty()),
        "{r}"
    );

    // --count, and the source keeps running.
    let r = cli_json(&d, &["machines", "fork", "origin", "--count", "3"]);
    assert_eq!(r["machines"].as_array().unwrap().len(), 3);
    assert_eq!(
        d.call("GET", "/api/v1/machines/origin", None).body["status"],
        "running"
    );
    let all = cli_json(&d, &["machines", "list"]);
    assert_eq!(all["machines"].as_array().unwrap().len(), 7);

    // Refusals: a count out of range, names not matching the count, a
    // source that is not running.
    let err = cli_fails(&d, &["machines", "fork", "origin", "--count", "17"]);
    assert!(err.contains("count"), "{err}");
    let err = cli_fails(
        &d,
        &["machines", "fork", "origin", "--count", "2", "--name", "x"],
    );
    assert!(err.contains("names"), "{err}");
    cli(&d, &["machines", "stop", "origin"]);
    let err = cli_fails(&d, &["machines", "fork", "origin"]);
    assert!(err.starts_with("error:"), "{err}");
}

#[test]
fn cli_templates_warm_list_and_delete() {
    let sb = Sandbox::new();
    let d = Daemon::start(&sb);
    // Warm: a table with the template's key as its name, ready.
    let (out, _) = cli(&d, &["templates", "warm", "--vcpus", "1", "--mem", "256"]);
    assert!(out.contains("ready") && out.contains("256"), "{out}");
    let t = cli_json(&d, &["templates", "warm", "--mem", "256", "--vmm", "stub"]);
    let id = t["id"].as_str().unwrap().to_string();
    assert_eq!(t["status"], "ready");
    assert_eq!(t["memory"], true);
    // Warming the same size again answers the same template.
    let again = cli_json(&d, &["templates", "warm", "--vcpus", "1", "--mem", "256"]);
    assert_eq!(again["id"], id.as_str());

    let list = cli_json(&d, &["templates", "list"]);
    assert_eq!(list["snapshots"].as_array().unwrap().len(), 1, "{list}");
    assert_eq!(list["snapshots"][0]["id"], id.as_str());
    // Listed, a template's name is its key (backend/image/vCPUs/memory).
    let key = list["snapshots"][0]["name"].as_str().unwrap_or_default();
    assert!(key.contains("stub") && key.contains("256"), "{list}");
    let (out, _) = cli(&d, &["templates", "list"]);
    assert!(out.starts_with("ID") && out.contains(&id), "{out}");
    // Templates are not the tenant's snapshots.
    let snaps = cli_json(&d, &["snapshots", "list"]);
    assert_eq!(snaps["snapshots"], serde_json::json!([]));

    // A machine of that size is made from it.
    let m = cli_json(&d, &["machines", "create", "--mem", "256", "--start"]);
    assert_eq!(m["snapshot_id"], id.as_str(), "{m}");
    assert_eq!(m["status"], "running", "{m}");

    let (out, _) = cli(&d, &["templates", "delete", &id]);
    assert!(out.contains(&format!("deleted {id}")), "{out}");
    let list = cli_json(&d, &["templates", "list"]);
    assert_eq!(list["snapshots"], serde_json::json!([]));

    let err = cli_fails(&d, &["templates", "delete", "nope"]);
    assert!(err.starts_with("error:"), "{err}");
    let err = cli_fails(&d, &["templates", "warm", "--vmm", "nonsense"]);
    assert!(err.contains("nonsense"), "{err}");
    let err = cli_fails(&d, &["templates", "warm", "--mem", "1"]);
    assert!(err.contains("mem_size_mib"), "{err}");
}

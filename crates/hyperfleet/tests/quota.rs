//! Tenant quotas and host memory admission against the real daemon (stub
//! backend): quotas set and read over the API, creates refused past each
//! limit, who may change quotas, server-wide defaults, and starts refused
//! while the host's memory budget is full.

mod common;

use common::{Daemon, Sandbox};
use serde_json::{json, Value};

fn key(d: &Daemon, tenant: &str, scopes: &[&str]) -> String {
    let r = d.call(
        "POST",
        "/keys",
        Some(json!({"name": "k", "scopes": scopes, "tenant": tenant})),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    r.body["key"].as_str().unwrap().to_string()
}

fn set_quota(d: &Daemon, tenant: &str, limits: Value) -> Value {
    let r = d.call("PUT", &format!("/tenants/{tenant}/quota"), Some(limits));
    assert_eq!(r.status, 200, "{}", r.body);
    r.body
}

fn create_as(d: &Daemon, key: &str, body: Value) -> common::Resp {
    d.call_as(key, "POST", "/api/v1/machines", Some(body))
}

fn assert_quota_exceeded(r: &common::Resp, parts: &[&str]) {
    assert_eq!((r.status, r.code()), (403, "QUOTA_EXCEEDED"), "{}", r.body);
    let msg = r.body["error"]["message"].as_str().unwrap();
    for p in parts {
        assert!(msg.contains(p), "'{p}' missing from: {msg}");
    }
}

#[test]
fn creates_are_refused_past_each_limit_and_usage_is_reported() {
    let sb = Sandbox::new();
    let d = Daemon::start(&sb);
    let k = key(&d, "acme", &["read", "write"]);
    let q = d.call("GET", "/tenants/acme/quota", None);
    assert_eq!(q.status, 200, "{}", q.body);
    assert_eq!(q.body["default"], true);
    assert_eq!(q.body["limits"]["max_machines"], Value::Null);
    assert_eq!(q.body["usage"]["machines"], 0);

    let q = set_quota(&d, "acme", json!({"max_machines": 2}));
    assert_eq!(q["default"], false);
    assert_eq!(q["limits"]["max_machines"], 2);
    assert_eq!(q["limits"]["max_vcpus"], Value::Null);
    for name in ["a1", "a2"] {
        let r = create_as(
            &d,
            &k,
            json!({"name": name, "vcpu_count": 2, "mem_size_mib": 256}),
        );
        assert_eq!(r.status, 201, "{}", r.body);
    }
    let r = create_as(&d, &k, json!({"name": "a3"}));
    assert_quota_exceeded(
        &r,
        &["'acme'", "quota of 2 machines", "holds 2", "asks for 1"],
    );
    let q = d.call_as(&k, "GET", "/api/v1/tenants/acme/quota", None);
    assert_eq!(q.status, 200, "{}", q.body);
    let u = &q.body["usage"];
    assert_eq!(
        (u["machines"].as_u64(), u["vcpus"].as_u64()),
        (Some(2), Some(4))
    );
    assert_eq!(u["memory_mib"], 512);
    // The stub's disks are 64 MiB each.
    assert_eq!(u["disk_bytes"], 2 * (64 << 20));

    // PUT replaces every limit: the machine count is unlimited again.
    set_quota(&d, "acme", json!({"max_vcpus": 5}));
    let r = create_as(&d, &k, json!({"name": "a3", "vcpu_count": 2}));
    assert_quota_exceeded(&r, &["quota of 5 vCPUs", "holds 4", "asks for 2"]);
    let r = create_as(&d, &k, json!({"name": "a3", "vcpu_count": 1}));
    assert_eq!(r.status, 201, "{}", r.body);

    set_quota(&d, "acme", json!({"max_memory_mib": 1024}));
    let r = create_as(&d, &k, json!({"name": "a4", "mem_size_mib": 512}));
    assert_quota_exceeded(&r, &["quota of 1024 MiB of memory", "asks for 512"]);

    set_quota(&d, "acme", json!({"max_disk_bytes": 4 * (64 << 20) - 1}));
    let r = create_as(&d, &k, json!({"name": "a4", "mem_size_mib": 128}));
    assert_quota_exceeded(&r, &["bytes of disk"]);

    // Deleting a machine gives its share back.
    let r = d.call_as(&k, "DELETE", "/machines/a1", None);
    assert_eq!(r.status, 204, "{}", r.body);
    let r = create_as(&d, &k, json!({"name": "a4", "mem_size_mib": 128}));
    assert_eq!(r.status, 201, "{}", r.body);

    // Unknown fields, limits SQLite cannot keep and malformed tenants are
    // refused.
    let r = d.call(
        "PUT",
        "/tenants/acme/quota",
        Some(json!({"max_vcpus": 1u64 << 63})),
    );
    assert_eq!(
        (r.status, r.code()),
        (400, "VALIDATION_ERROR"),
        "{}",
        r.body
    );
    let r = d.call("PUT", "/tenants/acme/quota", Some(json!({"max_cpus": 1})));
    assert_eq!(r.status, 400, "{}", r.body);
    let r = d.call("GET", "/tenants/NOPE/quota", None);
    assert_eq!(
        (r.status, r.code()),
        (400, "VALIDATION_ERROR"),
        "{}",
        r.body
    );
}

#[test]
fn only_operator_admins_change_quotas_and_other_tenants_are_unaffected() {
    let sb = Sandbox::new();
    let d = Daemon::start(&sb);
    let acme_admin = key(&d, "acme", &["admin"]);
    let acme_reader = key(&d, "acme", &["read"]);
    let r = d.call_as(
        &acme_admin,
        "PUT",
        "/tenants/acme/quota",
        Some(json!({"max_machines": 100})),
    );
    assert_eq!((r.status, r.code()), (403, "FORBIDDEN"), "{}", r.body);
    let r = d.call_as(&acme_admin, "DELETE", "/tenants/acme/quota", None);
    assert_eq!((r.status, r.code()), (403, "FORBIDDEN"), "{}", r.body);
    let r = d.call_as(&acme_reader, "PUT", "/tenants/acme/quota", Some(json!({})));
    assert_eq!((r.status, r.code()), (403, "FORBIDDEN"), "{}", r.body);
    // Its own quota it may read; another tenant's not.
    assert_eq!(
        d.call_as(&acme_reader, "GET", "/tenants/acme/quota", None)
            .status,
        200
    );
    let r = d.call_as(&acme_admin, "GET", "/tenants/default/quota", None);
    assert_eq!((r.status, r.code()), (403, "FORBIDDEN"), "{}", r.body);

    set_quota(&d, "acme", json!({"max_machines": 1}));
    assert_eq!(create_as(&d, &acme_admin, json!({"name": "x"})).status, 201);
    assert_quota_exceeded(
        &create_as(&d, &acme_admin, json!({"name": "y"})),
        &["1 machines"],
    );
    // The operator's own tenant and another tenant have no limit.
    for i in 0..3 {
        d.create(json!({"name": format!("op{i}")}));
    }
    let other = key(&d, "globex", &["write"]);
    for i in 0..3 {
        let r = create_as(&d, &other, json!({"name": format!("g{i}")}));
        assert_eq!(r.status, 201, "{}", r.body);
    }
    // Removing acme's quota puts it back on the (unlimited) defaults.
    let r = d.call("DELETE", "/tenants/acme/quota", None);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["default"], true);
    assert_eq!(create_as(&d, &acme_admin, json!({"name": "y"})).status, 201);
}

#[test]
fn the_default_quota_applies_to_tenants_without_their_own_and_holds_under_concurrency() {
    let sb = Sandbox::new();
    let d = Daemon::start_with(&sb, &[], &["--default-quota-machines", "5"]);
    let q = d.call("GET", "/tenants/default/quota", None);
    assert_eq!(q.body["default"], true, "{}", q.body);
    assert_eq!(q.body["limits"]["max_machines"], 5);
    // Twenty creates at once: the check runs in the transaction that
    // inserts, so exactly five get through.
    let codes: Vec<(u16, String)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..20)
            .map(|i| {
                let d = &d;
                s.spawn(move || {
                    let r = d.call("POST", "/machines", Some(json!({"name": format!("c{i}")})));
                    (r.status, r.code().to_string())
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let created = codes.iter().filter(|(s, _)| *s == 201).count();
    let refused = codes
        .iter()
        .filter(|(s, c)| *s == 403 && c == "QUOTA_EXCEEDED")
        .count();
    assert_eq!((created, refused), (5, 15), "{codes:?}");
    let q = d.call("GET", "/tenants/default/quota", None);
    assert_eq!(q.body["usage"]["machines"], 5);
    // A quota of its own replaces the default.
    set_quota(&d, "default", json!({"max_machines": 6}));
    d.create(json!({"name": "sixth"}));
}

/// MemTotal in MiB, as the daemon reads it.
fn host_mib() -> u64 {
    let info = std::fs::read_to_string("/proc/meminfo").unwrap();
    let line = info.lines().find(|l| l.starts_with("MemTotal:")).unwrap();
    let kb: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kb / 1024
}

fn start(d: &Daemon, name: &str) -> common::Resp {
    d.call("POST", &format!("/machines/{name}/start"), None)
}

#[test]
fn a_start_is_refused_while_the_hosts_memory_is_committed_and_admitted_after_a_stop() {
    let sb = Sandbox::new();
    // A budget of 1536 MiB for guests: one 1024 MiB machine fits, two not.
    let total = host_mib();
    assert!(total > 2048, "the host has {total} MiB");
    let reserve = (total - 1536).to_string();
    let d = Daemon::start_with(&sb, &[], &["--memory-reserve-mib", &reserve]);
    for name in ["a", "b"] {
        d.create(json!({"name": name, "mem_size_mib": 1024}));
    }
    let r = start(&d, "a");
    assert_eq!(r.status, 200, "{}", r.body);
    let r = start(&d, "b");
    assert_eq!(
        (r.status, r.code()),
        (409, "INSUFFICIENT_CAPACITY"),
        "{}",
        r.body
    );
    let msg = r.body["error"]["message"].as_str().unwrap();
    for part in [
        "1024 MiB",
        "hold 1024 MiB",
        "allows 1536 MiB",
        "--memory-overcommit",
    ] {
        assert!(msg.contains(part), "'{part}' missing from: {msg}");
    }
    // Refused before anything was recorded: no new generation for b.
    let b = d.call("GET", "/machines/b", None);
    assert_eq!(b.body["generation"], 1, "{}", b.body);
    // Other requests on the running machine are not capacity checks.
    assert_eq!(d.call("POST", "/machines/a/restart", None).status, 200);

    // Suspended, a machine holds no memory; its resume is checked.
    assert_eq!(d.call("POST", "/machines/a/suspend", None).status, 200);
    let r = start(&d, "b");
    assert_eq!(r.status, 200, "{}", r.body);
    let r = d.call("POST", "/machines/a/resume", None);
    assert_eq!(
        (r.status, r.code()),
        (409, "INSUFFICIENT_CAPACITY"),
        "{}",
        r.body
    );
    assert_eq!(d.call("POST", "/machines/b/stop", None).status, 200);
    let r = d.call("POST", "/machines/a/resume", None);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["status"], "running");
}

#[test]
fn a_tiny_overcommit_refuses_every_start_and_a_bad_one_is_refused_at_startup() {
    let sb = Sandbox::new();
    let d = Daemon::start_with(&sb, &[], &["--memory-overcommit", "0.01"]);
    d.create(json!({"name": "m", "mem_size_mib": 128}));
    let r = start(&d, "m");
    assert_eq!(
        (r.status, r.code()),
        (409, "INSUFFICIENT_CAPACITY"),
        "{}",
        r.body
    );
    drop(d);
    for bad in ["0", "-1", "nan", "x"] {
        let out = std::process::Command::new(common::bin())
            .arg("serve")
            .arg(format!("--memory-overcommit={bad}"))
            .arg("--data-dir")
            .arg(sb.path())
            .output()
            .unwrap();
        assert!(
            !out.status.success(),
            "--memory-overcommit {bad} was accepted"
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("above 0"), "{err}");
    }
}

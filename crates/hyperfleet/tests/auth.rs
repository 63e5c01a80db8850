//! API keys against the real daemon: bootstrap, scopes, tenants, revocation,
//! and `--disable-auth`.

mod common;

use std::os::unix::fs::PermissionsExt;

use common::{Daemon, Sandbox};
use serde_json::json;

fn make_key(d: &Daemon, name: &str, scopes: &[&str], tenant: Option<&str>) -> (String, String) {
    let mut body = json!({"name": name, "scopes": scopes});
    if let Some(t) = tenant {
        body["tenant"] = json!(t);
    }
    let r = d.call("POST", "/api/v1/keys", Some(body));
    assert_eq!(r.status, 201, "{}", r.body);
    (
        r.body["key"].as_str().unwrap().to_string(),
        r.body["id"].as_str().unwrap().to_string(),
    )
}

#[test]
fn first_start_writes_an_admin_key_file_readable_only_by_its_owner() {
    let sb = Sandbox::new();
    let d = Daemon::start(&sb);
    let meta = std::fs::metadata(sb.path().join("admin.key")).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    assert!(d.key.starts_with("hf_") && d.key.len() >= 3 + 32);
    assert!(
        d.log().contains("admin.key"),
        "the log says where the key is"
    );
    // The secret is not stored in the database.
    let db = std::fs::read(sb.path().join("hyperfleet.db")).unwrap();
    let needle = d.key.as_bytes();
    assert!(!db.windows(needle.len()).any(|w| w == needle));
    // A restart does not make another key.
    drop(d);
    let d = Daemon::start(&sb);
    let r = d.call("GET", "/keys", None);
    assert_eq!(r.body["keys"].as_array().unwrap().len(), 1);
}

#[test]
fn missing_malformed_and_unknown_keys_are_refused() {
    let sb = Sandbox::new();
    let d = Daemon::start(&sb);
    for key in ["", "nonsense", "hf_0000", &format!("hf_{}", "f".repeat(64))] {
        let r = d.call_as(key, "GET", "/machines", None);
        assert_eq!((r.status, r.code()), (401, "UNAUTHORIZED"), "key {key:?}");
    }
    let r = d
        .raw()
        .get(format!("{}/machines", d.url))
        .header("authorization", "Basic abc")
        .send()
        .unwrap();
    assert_eq!(r.status(), 401);
}

#[test]
fn scopes_are_enforced() {
    let sb = Sandbox::new();
    let d = Daemon::start(&sb);
    d.create(json!({"name": "s"}));
    let (read, _) = make_key(&d, "reader", &["read"], None);
    let (write, _) = make_key(&d, "writer", &["read", "write"], None);
    assert_eq!(d.call_as(&read, "GET", "/machines/s", None).status, 200);
    let r = d.call_as(&read, "POST", "/machines/s/start", None);
    assert_eq!((r.status, r.code()), (403, "FORBIDDEN"));
    assert!(r.body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("write"));
    assert_eq!(
        d.call_as(&read, "POST", "/machines", Some(json!({})))
            .status,
        403
    );
    assert_eq!(d.call_as(&read, "DELETE", "/machines/s", None).status, 403);
    assert_eq!(
        d.call("GET", "/machines/s", None).body["status"],
        "pending",
        "a refused request changes nothing"
    );
    assert_eq!(
        d.call_as(&write, "POST", "/machines/s/start", None).status,
        200
    );
    assert_eq!(d.call_as(&write, "GET", "/keys", None).status, 403);
    assert_eq!(
        d.call_as(
            &write,
            "POST",
            "/keys",
            Some(json!({"name":"x","scopes":["admin"]}))
        )
        .status,
        403
    );
    d.call("DELETE", "/machines/s?force=true", None);
}

#[test]
fn tenants_never_see_each_other() {
    let sb = Sandbox::new();
    let d = Daemon::start(&sb);
    let (alice, _) = make_key(&d, "alice", &["admin"], Some("alice"));
    let (bob, _) = make_key(&d, "bob", &["read", "write"], Some("bob"));
    let r = d.call_as(
        &alice,
        "POST",
        "/machines",
        Some(json!({"name": "shared-name"})),
    );
    assert_eq!(r.status, 201);
    let alice_id = r.body["id"].as_str().unwrap().to_string();
    // Names are unique per tenant, not globally.
    assert_eq!(
        d.call_as(
            &bob,
            "POST",
            "/machines",
            Some(json!({"name": "shared-name"}))
        )
        .status,
        201
    );
    for path in [
        format!("/machines/{alice_id}"),
        format!("/machines/{alice_id}/events"),
    ] {
        let r = d.call_as(&bob, "GET", &path, None);
        assert_eq!((r.status, r.code()), (404, "NOT_FOUND"), "{path}");
    }
    for (m, p) in [
        ("POST", format!("/machines/{alice_id}/start")),
        ("DELETE", format!("/machines/{alice_id}")),
    ] {
        assert_eq!(d.call_as(&bob, m, &p, None).status, 404);
    }
    let r = d.call_as(&bob, "GET", "/machines", None);
    assert_eq!(r.body["total"], 1);
    assert_ne!(r.body["machines"][0]["id"], alice_id.as_str());
    // A tenant admin manages only its own tenant's keys.
    let r = d.call_as(
        &alice,
        "POST",
        "/keys",
        Some(json!({"name": "x", "scopes": ["read"], "tenant": "bob"})),
    );
    assert_eq!(r.status, 403);
    let r = d.call_as(&alice, "GET", "/keys", None);
    assert!(r.body["keys"]
        .as_array()
        .unwrap()
        .iter()
        .all(|k| k["tenant"] == "alice"));
    assert_eq!(
        d.call_as(&alice, "GET", "/machines/shared-name", None).body["id"],
        alice_id.as_str()
    );
}

#[test]
fn revoked_keys_stop_working_at_once() {
    let sb = Sandbox::new();
    let d = Daemon::start(&sb);
    let (k, id) = make_key(&d, "temp", &["read"], None);
    assert_eq!(d.call_as(&k, "GET", "/machines", None).status, 200);
    assert_eq!(d.call("DELETE", &format!("/keys/{id}"), None).status, 204);
    let r = d.call_as(&k, "GET", "/machines", None);
    assert_eq!(r.status, 401);
    assert!(r.body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("revoked"));
    // Idempotent, and the revocation survives a restart.
    assert_eq!(d.call("DELETE", &format!("/keys/{id}"), None).status, 204);
    drop(d);
    let d = Daemon::start(&sb);
    assert_eq!(d.call_as(&k, "GET", "/machines", None).status, 401);
    assert_eq!(d.call("DELETE", "/keys/key_doesnotexist", None).status, 404);
}

#[test]
fn key_requests_are_validated() {
    let sb = Sandbox::new();
    let d = Daemon::start(&sb);
    for body in [
        json!({"name": "", "scopes": ["read"]}),
        json!({"name": "x", "scopes": []}),
        json!({"name": "x", "scopes": ["root"]}),
        json!({"name": "x", "scopes": ["read"], "expires_in_seconds": 1}),
        json!({"name": "x", "scopes": ["read"], "tenant": "Bad Tenant"}),
    ] {
        let r = d.call("POST", "/keys", Some(body.clone()));
        assert_eq!(
            (r.status, r.code()),
            (400, "VALIDATION_ERROR"),
            "{body}: {}",
            r.body
        );
    }
    let r = d.call(
        "POST",
        "/keys",
        Some(json!({"name": "x", "scopes": ["read"], "expires_in_seconds": 3600})),
    );
    assert_eq!(r.status, 201);
    assert!(r.body["expires_at"].is_string());
}

#[test]
fn disable_auth_lets_anyone_in_and_says_so_loudly() {
    let sb = Sandbox::new();
    let d = Daemon::start_with(&sb, &[], &["--disable-auth"]);
    assert_eq!(
        d.call_as("", "POST", "/machines", Some(json!({"name": "open"})))
            .status,
        201
    );
    assert!(d.log().contains("AUTHENTICATION IS DISABLED"));
}

#[test]
fn machine_secrets_are_shown_only_to_keys_that_may_exec() {
    let sb = Sandbox::new();
    let d = Daemon::start(&sb);
    let (read, _) = make_key(&d, "r", &["read"], None);
    let (write, _) = make_key(&d, "w", &["write"], None);
    let (read_write, _) = make_key(&d, "rw", &["read", "write"], None);
    let (exec, _) = make_key(&d, "x", &["read", "exec"], None);
    let m = d.create(json!({"name": "sec", "env": {"DB_PASSWORD": "s3cret-pw"}}));
    let token = m["access_token"].as_str().unwrap().to_string();
    assert!(token.starts_with("hft_"));
    assert_eq!(m["env"]["DB_PASSWORD"], "s3cret-pw", "admin sees them");
    let redacted = |body: &serde_json::Value, what: &str| {
        let text = body.to_string();
        assert!(
            !text.contains(&token) && !text.contains("s3cret-pw"),
            "{what} leaks a secret: {text}"
        );
    };
    let one = |key: &str| d.call_as(key, "GET", "/machines/sec", None);
    for key in [&read, &read_write] {
        let r = one(key);
        assert_eq!(r.status, 200);
        redacted(&r.body, "GET /machines/{id}");
        assert!(r.body["access_token"].is_null());
        assert_eq!(r.body["env"]["DB_PASSWORD"], "<redacted>");
        let r = d.call_as(key, "GET", "/machines", None);
        assert_eq!(r.status, 200);
        redacted(&r.body, "GET /machines");
        assert_eq!(r.body["machines"][0]["env"]["DB_PASSWORD"], "<redacted>");
        let r = d.call_as(key, "GET", "/machines/sec/wait?status=pending", None);
        assert_eq!(r.status, 200, "{}", r.body);
        redacted(&r.body, "wait");
    }
    // Write-only actions: the create and action answers are redacted too.
    let r = d.call_as(
        &write,
        "POST",
        "/machines",
        Some(json!({"name": "w1", "env": {"TOKEN": "s3cret-pw"}})),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    assert!(r.body["access_token"].is_null());
    assert_eq!(r.body["env"]["TOKEN"], "<redacted>");
    let r = d.call_as(&write, "POST", "/machines/w1/start?wait=false", None);
    assert_eq!(r.status, 202, "{}", r.body);
    redacted(&r.body, "start");
    let r = d.call_as(&write, "POST", "/machines/sec/start", None);
    assert_eq!(r.status, 200, "{}", r.body);
    redacted(&r.body, "start");
    let r = d.call_as(&write, "POST", "/machines/sec/stop", None);
    assert_eq!(r.status, 200, "{}", r.body);
    redacted(&r.body, "stop");
    // Keys that may exec see them.
    let r = one(&exec);
    assert_eq!(r.body["access_token"], token.as_str());
    assert_eq!(r.body["env"]["DB_PASSWORD"], "s3cret-pw");
    let r = d.call_as(&exec, "GET", "/machines", None);
    assert!(r.body.to_string().contains(&token));
}

#[test]
fn the_last_admin_key_cannot_be_revoked() {
    let sb = Sandbox::new();
    let d = Daemon::start(&sb);
    let keys = d.call("GET", "/keys", None);
    let own = keys.body["keys"][0]["id"].as_str().unwrap().to_string();
    let (_, reader) = make_key(&d, "reader", &["read"], None);
    let (alice_admin, alice_id) = make_key(&d, "alice-admin", &["admin"], Some("alice"));
    let r = d.call("DELETE", &format!("/keys/{own}"), None);
    assert_eq!((r.status, r.code()), (409, "CONFLICT"), "{}", r.body);
    assert!(
        r.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("last active admin key"),
        "{}",
        r.body
    );
    // Still works; other keys are revoked as before.
    assert_eq!(d.call("GET", "/keys", None).status, 200);
    assert_eq!(
        d.call("DELETE", &format!("/keys/{reader}"), None).status,
        204
    );
    // A tenant admin cannot see (so cannot revoke) the operator's key, and
    // revoking itself is fine while an operator admin remains.
    let r = d.call_as(&alice_admin, "DELETE", &format!("/keys/{own}"), None);
    assert_eq!(r.status, 404);
    // With a second operator admin, the first may go.
    let (second, _) = make_key(&d, "second", &["admin"], None);
    assert_eq!(
        d.call_as(&second, "DELETE", &format!("/keys/{own}"), None)
            .status,
        204
    );
    let r = d.call_as(&second, "GET", "/keys", None);
    let second_id = r.body["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["name"] == "second")
        .unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();
    let r = d.call_as(&second, "DELETE", &format!("/keys/{second_id}"), None);
    assert_eq!(r.status, 409, "{}", r.body);
    assert_eq!(
        d.call_as(&second, "DELETE", &format!("/keys/{alice_id}"), None)
            .status,
        204
    );
}

//! The web console's server side against the real daemon: `/ui/` serves the
//! embedded files with their content types and the Content-Security-Policy;
//! the tenant-wide event stream (`GET /events`) the machine list watches;
//! and the exec WebSocket's browser authentication (the key as a
//! `Sec-WebSocket-Protocol` entry). The console in a real browser is
//! `scripts/test-ui.sh`.

mod common;

use std::io::{BufRead, BufReader};
use std::sync::mpsc;
use std::time::Duration;

use common::{guest_assets, Daemon, Sandbox};
use serde_json::{json, Value};

fn get(d: &Daemon, path: &str) -> reqwest::blocking::Response {
    d.raw()
        .get(format!("{}{path}", d.url))
        .send()
        .unwrap_or_else(|e| panic!("GET {path}: {e}"))
}

fn header<'a>(r: &'a reqwest::blocking::Response, name: &str) -> &'a str {
    r.headers()
        .get(name)
        .map(|v| v.to_str().unwrap())
        .unwrap_or_else(|| panic!("no {name} header"))
}

/// The relative module paths a console script imports (`from './x.js'`).
fn imports(js: &str) -> Vec<String> {
    js.split("from '")
        .skip(1)
        .filter_map(|s| s.split('\'').next())
        .filter(|p| p.starts_with("./"))
        .map(|p| p.trim_start_matches("./").to_string())
        .collect()
}

#[test]
fn the_console_is_served_with_its_types_and_a_strict_policy() {
    let sb = Sandbox::new();
    let d = Daemon::start(&sb);

    // No key needed for the files; /ui redirects to /ui/.
    let r = get(&d, "/ui");
    assert_eq!(r.status(), 200);
    assert_eq!(r.url().path(), "/ui/");
    let r = get(&d, "/ui/");
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "content-type"), "text/html; charset=utf-8");
    let csp = header(&r, "content-security-policy").to_string();
    for directive in [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "connect-src 'self'",
        "frame-ancestors 'none'",
        "base-uri 'none'",
    ] {
        assert!(csp.contains(directive), "{directive} missing from {csp}");
    }
    assert!(!csp.contains("unsafe") && !csp.contains("http"), "{csp}");
    assert_eq!(header(&r, "x-content-type-options"), "nosniff");
    let etag = header(&r, "etag").to_string();
    let html = r.text().unwrap();
    assert!(
        html.contains(r#"<script type="module" src="app.js"></script>"#),
        "{html}"
    );
    assert!(!html.contains("<style") && !html.contains("style="));

    // Revalidation by ETag.
    let r = d
        .raw()
        .get(format!("{}/ui/", d.url))
        .header("If-None-Match", &etag)
        .send()
        .unwrap();
    assert_eq!(r.status(), 304);
    assert_eq!(header(&r, "etag"), etag);

    // Every module the console loads, following its imports from app.js,
    // is served as JavaScript with the same policy.
    let mut todo = vec!["app.js".to_string()];
    let mut seen = Vec::new();
    while let Some(path) = todo.pop() {
        if seen.contains(&path) {
            continue;
        }
        let r = get(&d, &format!("/ui/{path}"));
        assert_eq!(r.status(), 200, "{path}");
        assert_eq!(
            header(&r, "content-type"),
            "text/javascript; charset=utf-8",
            "{path}"
        );
        assert_eq!(header(&r, "content-security-policy"), csp, "{path}");
        let text = r.text().unwrap();
        for i in imports(&text) {
            let dir = path.rsplit_once('/').map(|(d, _)| format!("{d}/"));
            todo.push(format!("{}{i}", dir.unwrap_or_default()));
        }
        seen.push(path);
    }
    for m in ["api.js", "list.js", "machine.js", "term.js", "keys.js"] {
        assert!(seen.iter().any(|s| s == m), "{m} not imported: {seen:?}");
    }
    assert!(
        seen.iter().any(|s| s == "vendor/xterm/xterm.mjs"),
        "{seen:?}"
    );

    for (path, ty) in [
        ("style.css", "text/css; charset=utf-8"),
        ("vendor/xterm/xterm.css", "text/css; charset=utf-8"),
        ("favicon.svg", "image/svg+xml"),
        ("vendor/xterm/LICENSE", "text/plain; charset=utf-8"),
    ] {
        let r = get(&d, &format!("/ui/{path}"));
        assert_eq!(r.status(), 200, "{path}");
        assert_eq!(header(&r, "content-type"), ty, "{path}");
    }
    let license = get(&d, "/ui/vendor/xterm/LICENSE").text().unwrap();
    assert!(license.contains("The xterm.js authors"), "{license}");

    // Anything else is the API's 404 envelope, not a file.
    for path in ["/ui/nope.js", "/ui/../Cargo.toml", "/ui/%2e%2e/Cargo.toml"] {
        let r = get(&d, path);
        assert_eq!(r.status(), 404, "{path}");
        let body: Value = r.json().unwrap();
        assert_eq!(body["error"]["code"], "NOT_FOUND", "{path}");
    }
}

/// Reads an SSE response on a thread; yields (event, data) pairs.
fn sse(d: &Daemon, key: &str, path: &str) -> mpsc::Receiver<(String, Value)> {
    let r = d
        .raw()
        .get(format!("{}{path}", d.url))
        .bearer_auth(key)
        .header("Accept", "text/event-stream")
        .timeout(Duration::from_secs(120))
        .send()
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(header(&r, "content-type").starts_with("text/event-stream"));
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut event = String::new();
        for line in BufReader::new(r).lines() {
            let Ok(line) = line else { return };
            if let Some(e) = line.strip_prefix("event: ") {
                event = e.to_string();
            } else if let Some(data) = line.strip_prefix("data: ") {
                let v = serde_json::from_str(data).unwrap_or(Value::String(data.into()));
                if tx.send((std::mem::take(&mut event), v)).is_err() {
                    return;
                }
            }
        }
    });
    rx
}

/// The next event of `rx` whose kind is `kind` (others are collected in
/// `seen`), within a deadline.
fn next_kind(
    rx: &mpsc::Receiver<(String, Value)>,
    kind: &str,
    seen: &mut Vec<(String, Value)>,
) -> Value {
    loop {
        let (k, v) = rx
            .recv_timeout(Duration::from_secs(20))
            .unwrap_or_else(|_| panic!("no '{kind}' event; saw {seen:?}"));
        seen.push((k.clone(), v.clone()));
        if k == kind {
            return v;
        }
    }
}

#[test]
fn the_tenant_event_stream_carries_every_machine_of_the_tenant_and_no_other() {
    let sb = Sandbox::new();
    let d = Daemon::start(&sb);
    let r = d.call(
        "POST",
        "/api/v1/keys",
        Some(json!({"name": "acme", "scopes": ["read", "write"], "tenant": "acme"})),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    let acme = r.body["key"].as_str().unwrap().to_string();

    // A machine acme held before the stream opened, and its deletion.
    let before = d.call_as(
        &acme,
        "POST",
        "/api/v1/machines",
        Some(json!({"name": "old"})),
    );
    assert_eq!(before.status, 201);
    let before = before.body["id"].as_str().unwrap().to_string();

    let rx = sse(&d, &acme, "/api/v1/events");
    // Another tenant's machine: never on acme's stream.
    let other = d.create(json!({"name": "not-acme"}));
    let other = other["id"].as_str().unwrap().to_string();
    d.call("POST", &format!("/machines/{other}/start"), None);

    let m = d.call_as(
        &acme,
        "POST",
        "/api/v1/machines",
        Some(json!({"name": "web"})),
    );
    assert_eq!(m.status, 201);
    let id = m.body["id"].as_str().unwrap().to_string();
    let mut seen = Vec::new();
    let created = next_kind(&rx, "created", &mut seen);
    assert_eq!(created["machine_id"], id.as_str());
    let r = d.call_as(&acme, "POST", &format!("/machines/{id}/start"), None);
    assert_eq!(r.status, 200, "{}", r.body);
    loop {
        let t = next_kind(&rx, "transition", &mut seen);
        if t["to_status"] == "running" {
            assert_eq!(t["machine_id"], id.as_str());
            assert!(t["steps"].as_array().is_some_and(|s| !s.is_empty()), "{t}");
            break;
        }
    }
    let r = d.call_as(&acme, "DELETE", &format!("/machines/{before}"), None);
    assert_eq!(r.status, 204, "{}", r.body);
    let deleted = next_kind(&rx, "deleted", &mut seen);
    assert_eq!(deleted["machine_id"], before.as_str());
    assert!(
        seen.iter().all(|(_, v)| v["machine_id"] != other.as_str()),
        "another tenant's event on the stream: {seen:?}"
    );

    // The list form: the tenant's current machines' history, in order.
    let r = d.call_as(&acme, "GET", "/api/v1/events", None);
    assert_eq!(r.status, 200, "{}", r.body);
    let events = r.body["events"].as_array().unwrap();
    assert!(!events.is_empty());
    assert!(
        events.iter().all(|e| e["machine_id"] == id.as_str()),
        "{events:?}"
    );
    let ids: Vec<i64> = events.iter().map(|e| e["id"].as_i64().unwrap()).collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
    let r = d.call_as(
        &acme,
        "GET",
        &format!("/api/v1/events?after={}&limit=1", ids[0]),
        None,
    );
    assert_eq!(r.body["events"].as_array().unwrap().len(), 1);
    assert_eq!(r.body["events"][0]["id"], ids[1]);
    // The operator's admin key sees its own tenant only, like everywhere.
    let r = d.call("GET", "/api/v1/events", None);
    let all = r.body["events"].as_array().unwrap();
    assert!(
        all.iter().all(|e| e["machine_id"] == other.as_str()),
        "{all:?}"
    );

    // Resuming with Last-Event-ID replays what came after it.
    let r = d
        .raw()
        .get(format!("{}/api/v1/events", d.url))
        .bearer_auth(&acme)
        .header("Accept", "text/event-stream")
        .header("Last-Event-ID", ids[0].to_string())
        .timeout(Duration::from_secs(5))
        .send()
        .unwrap();
    let mut lines = BufReader::new(r).lines();
    let first = lines
        .find_map(|l| l.ok()?.strip_prefix("id: ").map(str::to_string))
        .unwrap();
    assert_eq!(first, ids[1].to_string());

    for (q, code) in [
        ("limit=0", 400),
        ("limit=10001", 400),
        ("after=-1", 400),
        ("bogus=1", 400),
    ] {
        let r = d.call_as(&acme, "GET", &format!("/api/v1/events?{q}"), None);
        assert_eq!(r.status, code, "{q}: {}", r.body);
    }
    let r = d
        .raw()
        .get(format!("{}/api/v1/events", d.url))
        .send()
        .unwrap();
    assert_eq!(r.status(), 401);
}

/// A WebSocket upgrade request's status, with these extra headers.
fn upgrade(d: &Daemon, path: &str, headers: &[(&str, &str)]) -> u16 {
    let mut req = d
        .raw()
        .get(format!("{}{path}", d.url))
        .header("Connection", "Upgrade")
        .header("Upgrade", "websocket")
        .header("Sec-WebSocket-Version", "13")
        .header("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ==");
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    req.send().unwrap().status().as_u16()
}

#[test]
fn a_browser_websocket_authenticates_with_the_key_as_a_subprotocol() {
    let sb = Sandbox::new();
    let d = Daemon::start(&sb);
    let m = d.create(json!({"name": "box"}));
    let id = m["id"].as_str().unwrap();
    let r = d.call("POST", &format!("/machines/{id}/start"), None);
    assert_eq!(r.status, 200, "{}", r.body);
    let path = format!("/api/v1/machines/{id}/exec/ws");
    let good = format!("hyperfleet.exec.v1, hyperfleet.bearer.{}", d.key);
    let unknown = format!(
        "hyperfleet.exec.v1, hyperfleet.bearer.hf_{}",
        "0".repeat(64)
    );

    assert_eq!(upgrade(&d, &path, &[]), 401);
    assert_eq!(
        upgrade(&d, &path, &[("Sec-WebSocket-Protocol", &unknown)]),
        401
    );
    assert_eq!(
        upgrade(
            &d,
            &path,
            &[("Sec-WebSocket-Protocol", "hyperfleet.exec.v1")]
        ),
        401
    );
    // Authenticated: the stub machine has no guest agent, so the route's
    // own answer (409), not 401.
    assert_eq!(
        upgrade(&d, &path, &[("Sec-WebSocket-Protocol", &good)]),
        409
    );
    assert_eq!(
        upgrade(
            &d,
            "/api/v1/machines/nope/exec/ws",
            &[("Sec-WebSocket-Protocol", &good)]
        ),
        404
    );
    // Only on WebSocket upgrades: a plain request cannot use it.
    let r = d
        .raw()
        .get(format!("{}/api/v1/machines", d.url))
        .header("Sec-WebSocket-Protocol", &good)
        .send()
        .unwrap();
    assert_eq!(r.status(), 401);
    // The Authorization header still wins over the subprotocol.
    let r = d
        .raw()
        .get(format!("{}{path}", d.url))
        .header("Connection", "Upgrade")
        .header("Upgrade", "websocket")
        .header("Sec-WebSocket-Version", "13")
        .header("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ==")
        .header("Authorization", format!("Bearer hf_{}", "1".repeat(64)))
        .header("Sec-WebSocket-Protocol", &good)
        .send()
        .unwrap();
    assert_eq!(r.status(), 401);
}

/// With a real guest: the browser's handshake completes, the server
/// answers with `hyperfleet.exec.v1` (never the key), and a command runs.
#[test]
fn a_browser_websocket_runs_a_command_in_a_qemu_guest() {
    let Some(assets) = guest_assets() else { return };
    let sb = Sandbox::new();
    let assets = assets.display().to_string();
    let d = Daemon::start_with(
        &sb,
        &[],
        &[
            "--default-vmm",
            "qemu",
            "--assets-dir",
            &assets,
            "--boot-timeout",
            "180",
        ],
    );
    let m = d.create(json!({"name": "term"}));
    let id = m["id"].as_str().unwrap().to_string();
    let r = d.call("POST", &format!("/machines/{id}/start?timeout=200"), None);
    assert_eq!(r.status, 200, "{}", r.body);
    let url = format!(
        "{}/api/v1/machines/{id}/exec/ws",
        d.url.replacen("http://", "ws://", 1)
    );
    let key = d.key.clone();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (protocol, out) = rt.block_on(async move {
        use futures_util::{SinkExt, StreamExt};
        use tokio_tungstenite::tungstenite::{client::IntoClientRequest, Message};
        let mut req = url.into_client_request().unwrap();
        req.headers_mut().insert(
            "Sec-WebSocket-Protocol",
            format!("hyperfleet.exec.v1, hyperfleet.bearer.{key}")
                .parse()
                .unwrap(),
        );
        let (mut ws, resp) = tokio_tungstenite::connect_async(req).await.unwrap();
        let protocol = resp
            .headers()
            .get("Sec-WebSocket-Protocol")
            .map(|v| v.to_str().unwrap().to_string());
        ws.send(Message::text(r#"{"command":["uname","-s"]}"#))
            .await
            .unwrap();
        let mut out = String::new();
        while let Some(Ok(msg)) = ws.next().await {
            let Message::Text(t) = msg else { continue };
            let ev: Value = serde_json::from_str(&t).unwrap();
            match ev["type"].as_str() {
                Some("stdout") => {
                    use base64::Engine;
                    let b = base64::engine::general_purpose::STANDARD
                        .decode(ev["data"].as_str().unwrap())
                        .unwrap();
                    out.push_str(&String::from_utf8_lossy(&b));
                }
                Some("exit") => {
                    assert_eq!(ev["exit_code"], 0, "{ev}");
                    break;
                }
                Some("error") => panic!("{ev}"),
                _ => {}
            }
        }
        (protocol, out)
    });
    assert_eq!(protocol.as_deref(), Some("hyperfleet.exec.v1"));
    assert_eq!(out.trim(), "Linux");
    let r = d.call("DELETE", &format!("/machines/{id}?force=true"), None);
    assert_eq!(r.status, 204, "{}", r.body);
}

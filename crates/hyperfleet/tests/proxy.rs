//! The reverse proxy as the daemon serves it: its listener and `proxy.addr`,
//! the machine JSON's `urls`, the proxy flags, and `machines create
//! --expose` in the CLI, and which credentials and requests each form
//! takes. (Forwarding itself, guests' cookies included, is tested in
//! hyperfleet-core's `proxy::tests` against a local stand-in guest port,
//! and against a real guest in `network.rs`.)

mod common;

use std::process::Command;

use common::{Daemon, Sandbox};
use serde_json::{json, Value};

fn proxy_addr(sb: &Sandbox) -> String {
    std::fs::read_to_string(sb.path().join("proxy.addr"))
        .expect("the daemon writes proxy.addr")
        .trim()
        .to_string()
}

/// A request to the proxy with `Host: host`; status and JSON body.
fn via_proxy(d: &Daemon, proxy: &str, host: &str, path: &str, key: Option<&str>) -> (u16, Value) {
    let auth = key.map(|k| format!("Bearer {k}"));
    let headers: Vec<(&str, &str)> = auth.iter().map(|a| ("authorization", a.as_str())).collect();
    let (status, _, body) = via_proxy_with(d, proxy, host, path, &headers);
    (status, body)
}

/// A request to the proxy with `Host: host` and more headers; status,
/// response headers and JSON body.
fn via_proxy_with(
    d: &Daemon,
    proxy: &str,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, reqwest::header::HeaderMap, Value) {
    let mut r = d
        .raw()
        .get(format!("http://{proxy}{path}"))
        .header("host", host);
    for (k, v) in headers {
        r = r.header(*k, *v);
    }
    let resp = r.send().unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    (status, headers, resp.json().unwrap_or(Value::Null))
}

/// A daemon with its proxy: the proxy's address and its port.
fn daemon_and_proxy(sb: &Sandbox) -> (Daemon, String, String) {
    let d = Daemon::start(sb);
    let proxy = proxy_addr(sb);
    let proxy_port = proxy.rsplit(':').next().unwrap().to_string();
    assert_ne!(proxy_port, "0");
    (d, proxy, proxy_port)
}

#[test]
fn the_daemon_serves_the_proxy_and_lists_each_exposed_ports_url() {
    let sb = Sandbox::new();
    let (d, proxy, proxy_port) = daemon_and_proxy(&sb);

    let m = d.create(json!({"exposed_ports": [8080, 3000]}));
    let id = m["id"].as_str().unwrap();
    assert_eq!(
        m["urls"],
        json!({
            "3000": format!("http://3000-{id}.localhost:{proxy_port}/"),
            "8080": format!("http://8080-{id}.localhost:{proxy_port}/"),
        })
    );
    assert_eq!(m["public"], false);
    assert!(m["access_token"].as_str().unwrap().starts_with("hft_"));
    let got = d.call("GET", &format!("/api/v1/machines/{id}"), None);
    assert_eq!(got.body["urls"], m["urls"]);

    // The proxy answers: private without credentials, then not running.
    let host = format!("8080-{id}.localhost:{proxy_port}");
    let (status, body) = via_proxy(&d, &proxy, &host, "/", None);
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (401, Some("UNAUTHORIZED"))
    );
    let (status, body) = via_proxy(&d, &proxy, &host, "/", Some(&d.key));
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (409, Some("INVALID_STATE"))
    );
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("is pending"),
        "{body}"
    );
    // Running, but this daemon runs with networking off: no address.
    let r = d.call("POST", &format!("/api/v1/machines/{id}/start"), None);
    assert_eq!(r.status, 200, "{}", r.body);
    let (status, body) = via_proxy(&d, &proxy, &host, "/", Some(&d.key));
    assert_eq!(status, 409);
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("no network address"),
        "{body}"
    );
    let (status, body) = via_proxy(&d, &proxy, &proxy, "/", None);
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (404, Some("NOT_FOUND"))
    );
}

#[test]
fn the_token_cookie_counts_on_the_host_name_only_and_browser_pages_go_there() {
    let sb = Sandbox::new();
    let (d, proxy, proxy_port) = daemon_and_proxy(&sb);
    let m = d.create(json!({"exposed_ports": [8080]}));
    let id = m["id"].as_str().unwrap();
    let token = m["access_token"].as_str().unwrap();
    let r = d.call("POST", &format!("/api/v1/machines/{id}/start"), None);
    assert_eq!(r.status, 200, "{}", r.body);
    // Networking is off here: a request that gets past the access check
    // ends in 409 "no network address", one that does not in 401.
    let code = |body: &Value| body["error"]["code"].as_str().unwrap_or("").to_string();
    let cookie = format!("hf_token={token}");

    // The machine's own host name honours the cookie.
    let host = format!("8080-{id}.localhost:{proxy_port}");
    let (status, _, body) = via_proxy_with(&d, &proxy, &host, "/", &[("cookie", &cookie)]);
    assert_eq!(
        (status, code(&body).as_str()),
        (409, "INVALID_STATE"),
        "{body}"
    );

    // The path form, one origin for every machine, ignores it ...
    let path = format!("/proxy/{id}/");
    let (status, headers, body) = via_proxy_with(&d, &proxy, &proxy, &path, &[("cookie", &cookie)]);
    assert_eq!(
        (status, code(&body).as_str()),
        (401, "UNAUTHORIZED"),
        "{body}"
    );
    assert!(headers.get("set-cookie").is_none());
    // ... and takes the token on the request itself.
    let (status, _, body) =
        via_proxy_with(&d, &proxy, &proxy, &format!("{path}?hf_token={token}"), &[]);
    assert_eq!(
        (status, code(&body).as_str()),
        (409, "INVALID_STATE"),
        "{body}"
    );

    // A browser opening a page on the path form is told the host-form URL.
    let page = [
        ("sec-fetch-mode", "navigate"),
        ("sec-fetch-dest", "document"),
    ];
    let (status, _, body) = via_proxy_with(
        &d,
        &proxy,
        &proxy,
        &format!("{path}docs?port=8080&hf_token={token}"),
        &page,
    );
    assert_eq!((status, code(&body).as_str()), (403, "FORBIDDEN"), "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains(&format!("http://8080-{id}.localhost:{proxy_port}/docs ")),
        "{message}"
    );
    assert!(!message.contains(token), "{message}");
    // The same browser request on the host name is not refused.
    let (status, _, body) = via_proxy_with(&d, &proxy, &host, "/", &[("cookie", &cookie), page[0]]);
    assert_eq!(status, 409, "{body}");
}

#[test]
fn proxy_flags_shape_the_urls_and_no_proxy_turns_it_off() {
    let sb = Sandbox::new();
    let d = Daemon::start_with(
        &sb,
        &[],
        &[
            "--proxy-domain",
            ".Machines.Example.com.",
            "--proxy-scheme",
            "https",
            "--proxy-public-port",
            "443",
        ],
    );
    let m = d.create(json!({"exposed_ports": [8080], "public": true}));
    let id = m["id"].as_str().unwrap();
    assert_eq!(
        m["urls"],
        json!({"8080": format!("https://8080-{id}.machines.example.com/")})
    );
    assert_eq!(m["public"], true);
    // The configured domain routes (the listener's own port, not 443).
    let proxy = proxy_addr(&sb);
    let host = format!("8080-{id}.machines.example.com");
    let (status, body) = via_proxy(&d, &proxy, &host, "/", None);
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (409, Some("INVALID_STATE"))
    );
    drop(d);

    let sb = Sandbox::new();
    let d = Daemon::start_with(&sb, &[], &["--no-proxy"]);
    let m = d.create(json!({"exposed_ports": [8080]}));
    assert_eq!(m["urls"], json!({}));
    assert!(!sb.path().join("proxy.addr").exists());
}

fn cli(d: &Daemon, args: &[&str]) -> String {
    let out = Command::new(common::bin())
        .args(["--url", &d.url, "--api-key", &d.key])
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn cli_create_exposes_ports_and_prints_their_urls() {
    let sb = Sandbox::new();
    let d = Daemon::start(&sb);
    let proxy_port = proxy_addr(&sb).rsplit(':').next().unwrap().to_string();

    let out = cli(
        &d,
        &[
            "machines", "create", "--name", "web", "--expose", "8080", "--expose", "3000",
        ],
    );
    let m = d.call("GET", "/api/v1/machines/web", None).body;
    let id = m["id"].as_str().unwrap();
    let token = m["access_token"].as_str().unwrap();
    for port in ["8080", "3000"] {
        let url = format!("http://{port}-{id}.localhost:{proxy_port}/");
        assert!(
            out.contains(&format!("url {port}")) && out.contains(&url),
            "{out}"
        );
    }
    assert!(out.contains(token) && out.contains("?hf_token="), "{out}");
    let got = cli(&d, &["machines", "get", "web"]);
    assert!(
        got.contains(&format!("http://8080-{id}.localhost:{proxy_port}/")),
        "{got}"
    );

    // --public and --no-egress; --json stays the plain machine JSON.
    let out = cli(
        &d,
        &[
            "--json",
            "machines",
            "create",
            "--name",
            "pub",
            "--expose",
            "80",
            "--public",
            "--no-egress",
        ],
    );
    let m: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(m["public"], true);
    assert_eq!(m["network"]["egress"], false);
    assert_eq!(m["exposed_ports"], json!([80]));
    let id = m["id"].as_str().unwrap();
    assert_eq!(
        m["urls"]["80"],
        format!("http://80-{id}.localhost:{proxy_port}/")
    );
    let out = cli(&d, &["machines", "get", "pub"]);
    assert!(
        out.contains("public: no credentials needed") && !out.contains("hft_"),
        "{out}"
    );
    assert!(out.contains("(no egress)"), "{out}");
}

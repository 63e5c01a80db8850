//! Machine networking with real QEMU guests: leases, TAP devices, the
//! nftables isolation and egress rules, and the reverse proxy.
//!
//! Each test runs the daemon inside network namespaces of its own (see
//! common/netns.rs): `host` stands for the machine's host (the daemon, its
//! TAPs and its nftables table live there) and `inet` for the internet,
//! joined to `host` by a veth pair (10.250.0.0/24, `inet` being the host's
//! default gateway at 10.250.0.2), with a small HTTP server on port 8000 of
//! a public-looking address behind that gateway (198.51.100.7, a
//! documentation range), of the gateway itself and of a cloud-metadata-like
//! 169.254.169.254, and on port 53 of the gateway (the guests' resolver).
//! Nothing touches the real
//! host's interfaces; the namespaces go away with everything in them even
//! when a test fails. Needs root, QEMU and the guest assets (scripts/test.sh
//! provides all three; in CI nothing is skipped).

mod common;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::PathBuf;
use std::time::Duration;

use common::netns::NetNs;
use common::{eventually, guest_assets, Daemon, Sandbox};
use serde_json::{json, Value};

/// "The internet": beyond the host's gateway.
const INET_IP: &str = "198.51.100.7";
/// The host's gateway, on a private network the host has an address in.
const GATEWAY_IP: &str = "10.250.0.2";
/// Where clouds serve instance metadata (and credentials).
const METADATA_IP: &str = "169.254.169.254";
const INET_PORT: u16 = 8000;
/// The guests' nameserver (`--dns`) listens here too.
const DNS_PORT: u16 = 53;

/// The guest-side servers (scripts/build-agent.sh builds them static).
fn guest_testkit() -> PathBuf {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../target/x86_64-unknown-linux-gnu/release/hf-guest-testkit");
    assert!(
        p.is_file(),
        "MISSING: {} (scripts/build-agent.sh builds it; scripts/test.sh runs that)",
        p.display()
    );
    p
}

/// The host namespace with an "internet" namespace behind its default route.
struct World {
    host: NetNs,
    _inet: NetNs,
}

impl World {
    fn new() -> World {
        let host = NetNs::new("h");
        let inet = NetNs::new("i");
        let veth = format!("{}v", host.name);
        host.exec(&[
            "ip", "link", "add", &veth, "type", "veth", "peer", "name", "up0", "netns", &inet.name,
        ]);
        host.exec(&["ip", "addr", "add", "10.250.0.1/24", "dev", &veth]);
        host.exec(&["ip", "link", "set", &veth, "up"]);
        host.exec(&["ip", "route", "add", "default", "via", GATEWAY_IP]);
        inet.exec(&[
            "ip",
            "addr",
            "add",
            &format!("{GATEWAY_IP}/24"),
            "dev",
            "up0",
        ]);
        inet.exec(&["ip", "link", "set", "up0", "up"]);
        for ip in [INET_IP, METADATA_IP] {
            inet.exec(&["ip", "addr", "add", &format!("{ip}/32"), "dev", "lo"]);
        }
        // The "internet" server: a thread of this test process inside `inet`.
        let (tx, rx) = std::sync::mpsc::channel();
        let inet_name = inet.name.clone();
        std::thread::spawn(move || {
            common::netns::enter(&inet_name);
            let l = TcpListener::bind(("0.0.0.0", INET_PORT)).expect("bind the internet server");
            let dns = TcpListener::bind((GATEWAY_IP, DNS_PORT)).expect("bind the resolver port");
            tx.send(()).unwrap();
            // Both answer the same way: what is measured is whether a guest gets through.
            std::thread::spawn(move || serve_internet(dns));
            serve_internet(l);
        });
        rx.recv_timeout(Duration::from_secs(10))
            .expect("internet server up");
        World { host, _inet: inet }
    }
}

fn serve_internet(l: TcpListener) {
    for s in l.incoming() {
        let Ok(mut s) = s else { continue };
        let mut buf = [0u8; 1024];
        let _ = s.read(&mut buf);
        let _ = s.write_all(
            b"HTTP/1.0 200 OK\r\nContent-Length: 11\r\nConnection: close\r\n\r\ninternet-ok",
        );
    }
}

fn exec(d: &Daemon, id: &str, script: &str) -> Value {
    let r = d.call(
        "POST",
        &format!("/machines/{id}/exec"),
        Some(json!({"command": ["sh", "-c", script], "timeout": 30})),
    );
    assert_eq!(r.status, 200, "exec {script}: {}", r.body);
    r.body
}

fn exec_ok(d: &Daemon, id: &str, script: &str) -> String {
    let out = exec(d, id, script);
    assert_eq!(out["exit_code"], 0, "{script}: {out}");
    out["stdout"].as_str().unwrap().to_string()
}

/// An HTTP GET from inside the guest (busybox `nc`: the image's static
/// busybox `wget` crashes resolving the service name); Some(body) when an
/// HTTP answer came back.
fn guest_fetch(d: &Daemon, id: &str, url: &str) -> Option<String> {
    let rest = url.strip_prefix("http://").expect("http URL");
    let (hostport, path) = rest.split_once('/').unwrap_or((rest, ""));
    let (host, port) = hostport.split_once(':').unwrap_or((hostport, "80"));
    let out = exec(
        d,
        id,
        &format!(
            "printf 'GET /{path} HTTP/1.0\\r\\nHost: {host}\\r\\n\\r\\n' | nc -w 4 {host} {port}"
        ),
    );
    let text = out["stdout"].as_str().unwrap_or_default();
    if !text.starts_with("HTTP/1.") {
        return None;
    }
    Some(
        text.split_once("\r\n\r\n")
            .map(|(_, b)| b)
            .unwrap_or("")
            .to_string(),
    )
}

fn start_daemon(sb: &Sandbox, assets: &std::path::Path) -> Daemon {
    let assets = assets.display().to_string();
    Daemon::start_with(
        sb,
        &[],
        &[
            "--assets-dir",
            &assets,
            "--default-vmm",
            "qemu",
            "--network",
            "on",
            "--boot-timeout",
            "180",
            // Listening everywhere: the firewall, not the bind address, is
            // what must keep guests away from the API.
            "--host",
            "0.0.0.0",
            "--dns",
            GATEWAY_IP,
        ],
    )
}

/// Writes an executable file (mode 0755) into the guest.
fn put_executable(d: &Daemon, id: &str, path: &str, bytes: Vec<u8>) {
    let r = d
        .raw()
        .put(format!(
            "{}/machines/{id}/files?path={path}&mode=493",
            d.url
        ))
        .bearer_auth(&d.key)
        .body(bytes)
        .send()
        .unwrap();
    assert_eq!(r.status(), 201, "{path}: {}", r.text().unwrap_or_default());
}

fn port_of(addr_file: &std::path::Path) -> u16 {
    let s = std::fs::read_to_string(addr_file).unwrap();
    s.trim().rsplit(':').next().unwrap().parse().unwrap()
}

#[test]
fn guests_are_isolated_get_egress_by_spec_and_are_reachable_from_the_host() {
    let Some(assets) = guest_assets() else { return };
    let world = World::new();
    world.host.enter();
    let sb = Sandbox::new();
    let d = start_daemon(&sb, &assets);
    let api_port = port_of(&sb.path().join("api.addr"));

    let a = d.create(json!({"name": "ga", "exposed_ports": [8080]}));
    let b = d.create(json!({"name": "gb", "exposed_ports": [8080], "network": {"egress": false}}));
    let (ida, idb) = (a["id"].as_str().unwrap(), b["id"].as_str().unwrap());
    assert_eq!(a["network"]["egress"], true);
    assert_eq!(b["network"]["egress"], false);
    assert!(
        a["network"]["ip"].is_null(),
        "no lease before the first start: {a}"
    );
    for id in [ida, idb] {
        let r = d.call("POST", &format!("/machines/{id}/start?wait=false"), None);
        assert_eq!(r.status, 202, "{}", r.body);
    }
    let mut net = Vec::new();
    for id in [ida, idb] {
        let r = d.call(
            "GET",
            &format!("/machines/{id}/wait?status=running&timeout=300"),
            None,
        );
        assert_eq!(r.status, 200, "{}\n{}", r.body, d.log());
        net.push(r.body["network"].clone());
    }
    let ip = |i: usize| net[i]["ip"].as_str().unwrap().to_string();
    let gw = |i: usize| net[i]["gateway"].as_str().unwrap().to_string();
    assert_ne!(ip(0), ip(1), "distinct addresses: {net:?}");
    let t = world.host.hyperfleet_taps();
    for n in &net {
        assert!(t.contains(&n["tap"].as_str().unwrap().to_string()), "{t:?}");
    }

    // The guest got its address, route and resolver from the command line.
    let addr = exec_ok(
        &d,
        ida,
        "ip -4 -o addr show eth0; ip route; cat /etc/resolv.conf",
    );
    assert!(addr.contains(&format!("{}/30", ip(0))), "{addr}");
    assert!(addr.contains(&format!("default via {}", gw(0))), "{addr}");
    assert!(addr.contains(&format!("nameserver {GATEWAY_IP}")), "{addr}");

    for (id, name) in [(ida, "ga"), (idb, "gb")] {
        exec_ok(
            &d,
            id,
            &format!("mkdir -p /srv && echo hello-from-{name} > /srv/index.html && httpd -p 8080 -h /srv"),
        );
    }
    // The host reaches each guest's port.
    for (i, name) in [(0, "ga"), (1, "gb")] {
        let body = eventually("guest httpd answers", Duration::from_secs(20), || {
            d.raw()
                .get(format!("http://{}:8080/", ip(i)))
                .send()
                .ok()
                .and_then(|r| r.text().ok())
        });
        assert_eq!(body.trim(), format!("hello-from-{name}"));
    }
    // The guest-side client works (so the refusals below mean something).
    assert_eq!(
        guest_fetch(&d, ida, &format!("http://{INET_IP}:{INET_PORT}/")).as_deref(),
        Some("internet-ok")
    );
    // Guests never reach each other, in either direction.
    assert_eq!(
        guest_fetch(&d, ida, &format!("http://{}:8080/", ip(1))),
        None
    );
    assert_eq!(
        guest_fetch(&d, idb, &format!("http://{}:8080/", ip(0))),
        None
    );
    // Nor the host's own services: the API listens on every address, and
    // the host itself reaches it on the guest link's address.
    let health = format!("http://{}:{api_port}/health", gw(0));
    assert_eq!(d.raw().get(&health).send().unwrap().status(), 200);
    for (id, i) in [(ida, 0), (idb, 1)] {
        for host_ip in [gw(i), "10.250.0.1".to_string()] {
            assert_eq!(
                guest_fetch(&d, id, &format!("http://{host_ip}:{api_port}/health")),
                None,
                "a guest reached the API on {host_ip}"
            );
        }
    }
    // Egress as the spec says: masqueraded out of the host's default route.
    assert_eq!(
        guest_fetch(&d, ida, &format!("http://{INET_IP}:{INET_PORT}/")).as_deref(),
        Some("internet-ok")
    );
    assert_eq!(
        guest_fetch(&d, idb, &format!("http://{INET_IP}:{INET_PORT}/")),
        None,
        "a machine with egress false reached the internet"
    );
    // Egress is the internet only: never link-local (cloud metadata), nor
    // private networks and the host's own (here 10.250.0.0/24, also RFC
    // 1918), except the guests' resolver on port 53 for machines with egress.
    for (url, why) in [
        (
            format!("http://{METADATA_IP}:{INET_PORT}/"),
            "the metadata address",
        ),
        (
            format!("http://{GATEWAY_IP}:{INET_PORT}/"),
            "the host's private network",
        ),
    ] {
        assert_eq!(guest_fetch(&d, ida, &url), None, "a guest reached {why}");
    }
    let resolver = format!("http://{GATEWAY_IP}:{DNS_PORT}/");
    assert_eq!(
        guest_fetch(&d, ida, &resolver).as_deref(),
        Some("internet-ok"),
        "the guests' nameserver must stay reachable on port 53"
    );
    assert_eq!(guest_fetch(&d, idb, &resolver), None);

    // Suspend gives the TAP back; resume restores the guest's memory (httpd
    // still running) on the same lease and a new TAP of the same name.
    let r = d.call(
        "POST",
        &format!("/machines/{ida}/suspend?timeout=300"),
        None,
    );
    assert_eq!(r.body["status"], "suspended", "{}", r.body);
    let tap_a = net[0]["tap"].as_str().unwrap().to_string();
    assert!(!world.host.hyperfleet_taps().contains(&tap_a));
    let r = d.call("POST", &format!("/machines/{ida}/resume?timeout=300"), None);
    assert_eq!(r.body["status"], "running", "{}\n{}", r.body, d.log());
    assert_eq!(r.body["network"], net[0], "the lease survives suspend");
    let body = eventually("httpd after resume", Duration::from_secs(20), || {
        d.raw()
            .get(format!("http://{}:8080/", ip(0)))
            .send()
            .ok()
            .and_then(|r| r.text().ok())
    });
    assert_eq!(body.trim(), "hello-from-ga");

    // Deleting releases everything: TAPs, rules, leases.
    for id in [ida, idb] {
        let r = d.call("DELETE", &format!("/machines/{id}?force=true"), None);
        assert_eq!(r.status, 204, "{}", r.body);
    }
    assert_eq!(world.host.hyperfleet_taps(), Vec::<String>::new());
    assert!(
        !world
            .host
            .try_exec(&["nft", "list", "table", "inet", "hyperfleet"]),
        "the nftables table outlived the last machine"
    );
}

#[test]
fn the_proxy_serves_exposed_ports_by_host_name_and_path_with_websockets() {
    let Some(assets) = guest_assets() else { return };
    let testkit = guest_testkit();
    let world = World::new();
    world.host.enter();
    let sb = Sandbox::new();
    let d = start_daemon(&sb, &assets);
    let proxy_port = port_of(&sb.path().join("proxy.addr"));

    let m = d.create(json!({"name": "web", "exposed_ports": [8080, 9000, 9001]}));
    let id = m["id"].as_str().unwrap().to_string();
    assert_eq!(
        m["urls"]["8080"],
        format!("http://8080-{id}.localhost:{proxy_port}/"),
        "{m}"
    );
    let r = d.call("POST", "/machines/web/start?timeout=300", None);
    assert_eq!(r.body["status"], "running", "{}\n{}", r.body, d.log());
    exec_ok(
        &d,
        &id,
        "mkdir -p /srv/sub /srv/cgi-bin && echo proxied > /srv/index.html && echo deep > /srv/sub/x.txt && httpd -p 8080 -h /srv",
    );
    put_executable(&d, &id, "/bin/testkit", std::fs::read(&testkit).unwrap());
    exec_ok(
        &d,
        &id,
        "setsid /bin/testkit ws-echo 9000 >/dev/null 2>&1 &",
    );

    let proxy = format!("http://127.0.0.1:{proxy_port}");
    let get = |host: &str, path: &str, key: Option<&str>| {
        let mut rq = d.raw().get(format!("{proxy}{path}")).header("Host", host);
        if let Some(k) = key {
            rq = rq.bearer_auth(k);
        }
        let r = rq.send().unwrap();
        let s = r.status().as_u16();
        (s, r.text().unwrap())
    };
    // By host name (id and name), and by path.
    let host = format!("8080-{id}.localhost");
    let (s, body) = eventually("httpd via the proxy", Duration::from_secs(20), || {
        let r = get(&host, "/", Some(&d.key));
        (r.0 == 200).then_some(r)
    });
    assert_eq!((s, body.trim()), (200, "proxied"));
    let (s, body) = get("8080-web.localhost", "/sub/x.txt", Some(&d.key));
    assert_eq!((s, body.trim()), (200, "deep"));
    let (s, body) = get(
        &format!("127.0.0.1:{proxy_port}"),
        &format!("/proxy/{id}/sub/x.txt?port=8080"),
        Some(&d.key),
    );
    assert_eq!((s, body.trim()), (200, "deep"));
    // Credentials are needed for a machine that is not public; the access
    // token works instead of a key.
    assert_eq!(get(&host, "/", None).0, 401);
    let token = m["access_token"].as_str().unwrap();
    let (s, body) = get(&host, &format!("/?hf_token={token}"), None);
    assert_eq!((s, body.trim()), (200, "proxied"));
    // A guest's cookies stay within its own host name: one for a parent
    // domain (every machine) is dropped, and the path form passes none.
    let cgi = r"#!/bin/sh
printf 'Content-Type: text/plain\r\nSet-Cookie: own=1; Path=/\r\nSet-Cookie: x=1; Domain=localhost\r\n\r\ncookies\n'
";
    put_executable(&d, &id, "/srv/cgi-bin/cookies", cgi.into());
    let set_cookies = |host: &str, path: &str| {
        let r = d
            .raw()
            .get(format!("{proxy}{path}"))
            .header("Host", host)
            .bearer_auth(&d.key)
            .send()
            .unwrap();
        let cookies: Vec<String> = r
            .headers()
            .get_all("set-cookie")
            .iter()
            .map(|v| v.to_str().unwrap().to_string())
            .collect();
        (r.status().as_u16(), cookies, r.text().unwrap())
    };
    let (s, cookies, body) = set_cookies(&host, "/cgi-bin/cookies");
    assert_eq!((s, body.trim()), (200, "cookies"));
    assert_eq!(cookies, ["own=1; Path=/"]);
    let (s, cookies, body) = set_cookies(
        &format!("127.0.0.1:{proxy_port}"),
        &format!("/proxy/{id}/cgi-bin/cookies?port=8080"),
    );
    assert_eq!((s, body.trim()), (200, "cookies"));
    assert_eq!(cookies, Vec::<String>::new());

    // A port that is not exposed is refused; an exposed port nobody listens
    // on is a 502 that says so.
    let (s, body) = get(&format!("22-{id}.localhost"), "/", Some(&d.key));
    assert_eq!(s, 404, "{body}");
    let (s, body) = get(&format!("9001-{id}.localhost"), "/", Some(&d.key));
    assert_eq!(s, 502, "{body}");
    assert!(body.contains("9001"), "{body}");

    // A WebSocket echo through the proxy.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let key = d.key.clone();
    let echoed = rt.block_on(async move {
        use futures_util::{SinkExt, StreamExt};
        use tokio_tungstenite::tungstenite::{client::IntoClientRequest, Message};
        let mut req = format!("ws://9000-{id}.localhost:{proxy_port}/")
            .into_client_request()
            .unwrap();
        req.headers_mut()
            .insert("Authorization", format!("Bearer {key}").parse().unwrap());
        let mut last = None;
        // The echo server may still be starting: retry for a while.
        for _ in 0..40 {
            let stream = tokio::net::TcpStream::connect(("127.0.0.1", proxy_port))
                .await
                .unwrap();
            match tokio_tungstenite::client_async(req.clone(), stream).await {
                Ok((mut ws, _)) => {
                    ws.send(Message::text("ping through the proxy"))
                        .await
                        .unwrap();
                    let got = ws.next().await.unwrap().unwrap();
                    ws.close(None).await.ok();
                    return got.into_text().unwrap().to_string();
                }
                Err(e) => last = Some(e.to_string()),
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        panic!("no WebSocket through the proxy: {last:?}");
    });
    assert_eq!(echoed, "ping through the proxy");

    let r = d.call("DELETE", "/machines/web?force=true", None);
    assert_eq!(r.status, 204);
    assert_eq!(world.host.hyperfleet_taps(), Vec::<String>::new());
}

/// Idle timeout and wake with a real guest (issue 12, docs/api.md "Idle
/// machines"): the guest's own traffic keeps it up, nothing suspends it,
/// a request through the proxy to the suspended machine waits for the wake
/// and gets the guest's answer, and a quiet WebSocket held open through
/// the proxy keeps it up until it closes.
#[test]
fn an_idle_guest_is_suspended_and_a_proxied_request_wakes_it_and_is_answered() {
    let Some(assets) = guest_assets() else { return };
    let world = World::new();
    world.host.enter();
    let sb = Sandbox::new();
    let d = start_daemon(&sb, &assets);
    let proxy_port = port_of(&sb.path().join("proxy.addr"));
    let m =
        d.create(json!({"name": "nap", "exposed_ports": [8080, 9000], "idle_timeout_seconds": 3}));
    let id = m["id"].as_str().unwrap().to_string();
    let r = d.call("POST", "/machines/nap/start?timeout=300", None);
    assert_eq!(r.body["status"], "running", "{}\n{}", r.body, d.log());
    let status = || d.call("GET", "/machines/nap", None).body["status"].clone();
    // The guest talks to the internet for a while: its TAP's traffic is
    // activity, so it stays up well past its timeout.
    exec_ok(
        &d,
        &id,
        &format!(
            "mkdir -p /srv && echo awake > /srv/index.html && httpd -p 8080 -h /srv && \
             (i=0; while [ $i -lt 16 ]; do printf 'GET / HTTP/1.0\\r\\n\\r\\n' | nc -w 2 {INET_IP} {INET_PORT} >/dev/null; sleep 0.5; i=$((i+1)); done) >/dev/null 2>&1 &"
        ),
    );
    let t0 = std::time::Instant::now();
    while t0.elapsed() < Duration::from_secs(6) {
        assert_eq!(status(), "running", "suspended while the guest talks");
        std::thread::sleep(Duration::from_millis(300));
    }
    // Then it goes quiet and is suspended.
    eventually("the idle guest suspended", Duration::from_secs(60), || {
        (status() == "suspended").then_some(())
    });
    // A request through the proxy waits for the wake and is answered.
    let t0 = std::time::Instant::now();
    let r = d
        .raw()
        .get(format!("http://127.0.0.1:{proxy_port}/"))
        .header("Host", format!("8080-{id}.localhost"))
        .bearer_auth(&d.key)
        .send()
        .unwrap();
    let took = t0.elapsed();
    let code = r.status().as_u16();
    assert_eq!(
        (code, r.text().unwrap().trim()),
        (200, "awake"),
        "{}",
        d.log()
    );
    eprintln!("wake through the proxy: first answer after {took:?}");
    assert_eq!(status(), "running");
    let ev = d.call("GET", "/machines/nap/events", None).body.to_string();
    assert!(ev.contains("suspend requested (idle"), "{ev}");
    assert!(
        ev.contains("resume requested (wake: proxy request)"),
        "{ev}"
    );

    // A quiet WebSocket held open through the proxy keeps it up; once it
    // closes, the machine idles again.
    put_executable(
        &d,
        &id,
        "/bin/testkit",
        std::fs::read(guest_testkit()).unwrap(),
    );
    exec_ok(
        &d,
        &id,
        "setsid /bin/testkit ws-echo 9000 >/dev/null 2>&1 &",
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (key, wid) = (d.key.clone(), id.clone());
    let ws = rt.block_on(async move {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        let mut req = format!("ws://9000-{wid}.localhost:{proxy_port}/")
            .into_client_request()
            .unwrap();
        req.headers_mut()
            .insert("Authorization", format!("Bearer {key}").parse().unwrap());
        for _ in 0..40 {
            let stream = tokio::net::TcpStream::connect(("127.0.0.1", proxy_port))
                .await
                .unwrap();
            if let Ok((ws, _)) = tokio_tungstenite::client_async(req.clone(), stream).await {
                return ws;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        panic!("no WebSocket through the proxy");
    });
    let t0 = std::time::Instant::now();
    while t0.elapsed() < Duration::from_secs(7) {
        assert_eq!(status(), "running", "suspended with a WebSocket open");
        std::thread::sleep(Duration::from_millis(300));
    }
    drop(ws);
    eventually(
        "suspended after the WebSocket closed",
        Duration::from_secs(60),
        || (status() == "suspended").then_some(()),
    );
}

/// Wake latency through the proxy (scripts/bench-idle.sh runs it; ignored in
/// the suite): the time to the first byte of a request to a suspended
/// machine, p50 and p99 over `HF_BENCH_N` wakes (default 20), beside the
/// floor measured in the same run: the same machine resumed through the API
/// and then asked the same request.
#[test]
#[ignore = "a benchmark: scripts/bench-idle.sh"]
fn bench_wake_latency_through_the_proxy() {
    let Some(assets) = guest_assets() else { return };
    let n: usize = std::env::var("HF_BENCH_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let world = World::new();
    world.host.enter();
    let sb = Sandbox::new();
    let d = start_daemon(&sb, &assets);
    let proxy_port = port_of(&sb.path().join("proxy.addr"));
    let m = d.create(json!({"name": "bench", "exposed_ports": [8080], "idle_timeout_seconds": 0}));
    let id = m["id"].as_str().unwrap().to_string();
    let r = d.call("POST", "/machines/bench/start?timeout=300", None);
    assert_eq!(r.body["status"], "running", "{}\n{}", r.body, d.log());
    exec_ok(
        &d,
        &id,
        "mkdir -p /srv && echo awake > /srv/index.html && httpd -p 8080 -h /srv",
    );
    let get = || {
        let t0 = std::time::Instant::now();
        let r = d
            .raw()
            .get(format!("http://127.0.0.1:{proxy_port}/"))
            .header("Host", format!("8080-{id}.localhost"))
            .bearer_auth(&d.key)
            .send()
            .unwrap();
        let took = t0.elapsed();
        let code = r.status().as_u16();
        (code == 200)
            .then_some(took)
            .ok_or_else(|| format!("{code} after {took:?}: {}", r.text().unwrap_or_default()))
    };
    eventually("httpd via the proxy", Duration::from_secs(20), || {
        get().ok()
    });
    let answered = || eventually("an answer", Duration::from_secs(30), || get().ok());
    let get = || get().unwrap_or_else(|e| panic!("{e}\n{}", d.log()));
    let suspend = || {
        let r = d.call("POST", "/machines/bench/suspend?timeout=300", None);
        assert_eq!(r.body["status"], "suspended", "{}", r.body);
    };
    let (mut wake, mut floor) = (Vec::new(), Vec::new());
    for i in 0..n {
        suspend();
        wake.push(get());
        eprintln!("wake {i}: {:?}", wake[i]);
        suspend();
        let t0 = std::time::Instant::now();
        let r = d.call("POST", "/machines/bench/resume?timeout=300", None);
        assert_eq!(r.body["status"], "running", "{}", r.body);
        // The restored guest's port may take a moment (docs/benchmarks.md).
        answered();
        floor.push(t0.elapsed());
    }
    let pct = |v: &mut Vec<Duration>, p: f64| {
        v.sort();
        let i = ((v.len() as f64 - 1.0) * p).round() as usize;
        v[i].as_secs_f64() * 1e3
    };
    let (w50, w99) = (pct(&mut wake, 0.5), pct(&mut wake, 0.99));
    let (f50, f99) = (pct(&mut floor, 0.5), pct(&mut floor, 0.99));
    println!(
        "wake through the proxy ({n} wakes): p50 {w50:.0} ms, p99 {w99:.0} ms; \
         floor (API resume, then the same request): p50 {f50:.0} ms, p99 {f99:.0} ms; \
         p50 ratio {:.2}",
        w50 / f50
    );
}

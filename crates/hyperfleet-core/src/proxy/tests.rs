//! The proxy end to end: a real store in a temporary directory, the proxy
//! on 127.0.0.1, and an axum server on 127.0.0.1 playing the guest port
//! (machines get a lease whose address is 127.0.0.1).

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::ws::{WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::http::{HeaderMap, Request, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get};
use axum::Router;
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Empty, StreamBody};
use hyper::body::{Frame, Incoming};
use hyperfleet_api::{CreateMachineRequest, MachineStatus, Scope, VmmKind};
use serde_json::{json, Value};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Notify};
use tokio_stream::wrappers::ReceiverStream;
use tokio_tungstenite::tungstenite::Message;

use super::server::ProxyServer;
use super::Proxy;
use crate::config::ProxyConfig;
use crate::lifecycle::table::Desired;
use crate::store::{MachineRecord, NetLease, Store};

const DOMAIN: &str = "machines.test";
const CONNECT_TIMEOUT: Duration = Duration::from_millis(400);
/// Bounds every wait, so a proxy that buffers fails instead of hanging.
const PATIENCE: Duration = Duration::from_secs(20);

/// The guest port's side: signals for the streaming tests.
#[derive(Clone, Default)]
struct Guest {
    /// The guest saw the first chunk of an upload.
    upload_started: Arc<Notify>,
    /// The test lets the guest send the rest of a download.
    download_release: Arc<Notify>,
}

const CHUNK: usize = 64 << 10;
const CHUNKS: usize = 128; // 8 MiB

async fn echo(req: Request<Body>) -> axum::Json<Value> {
    let mut headers = serde_json::Map::new();
    for name in req.headers().keys() {
        let values: Vec<Value> = req
            .headers()
            .get_all(name)
            .iter()
            .map(|v| Value::from(v.to_str().unwrap_or("<binary>")))
            .collect();
        headers.insert(name.to_string(), Value::Array(values));
    }
    axum::Json(json!({
        "method": req.method().as_str(),
        "path": req.uri().path(),
        "query": req.uri().query(),
        "headers": headers,
    }))
}

/// One chunk, then the rest once the test says so.
async fn download(State(g): State<Guest>) -> Response {
    let (tx, rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(4);
    tokio::spawn(async move {
        let chunk = Bytes::from(vec![7u8; CHUNK]);
        if tx.send(Ok(chunk.clone())).await.is_err() {
            return;
        }
        g.download_release.notified().await;
        for _ in 1..CHUNKS {
            if tx.send(Ok(chunk.clone())).await.is_err() {
                return;
            }
        }
    });
    Body::from_stream(ReceiverStream::new(rx)).into_response()
}

/// Counts the bytes of a streamed upload, announcing the first chunk.
async fn upload(State(g): State<Guest>, body: Body) -> String {
    let mut stream = body.into_data_stream();
    let mut n = 0usize;
    while let Some(chunk) = stream.next().await {
        let Ok(chunk) = chunk else {
            return "error".into();
        };
        if n == 0 && !chunk.is_empty() {
            g.upload_started.notify_one();
        }
        n += chunk.len();
    }
    n.to_string()
}

/// Sets a cookie of its own host, one for a parent domain, and one named
/// like the proxy's token cookie.
async fn set_cookies() -> Response {
    let mut resp = "cookies".into_response();
    for c in [
        "own=1; Path=/; HttpOnly",
        "x=1; Domain=localhost",
        "y=2; Path=/; Domain=.machines.test",
        "hf_token=hft_fixed; Path=/",
    ] {
        resp.headers_mut()
            .append("set-cookie", c.parse().expect("a valid header value"));
    }
    resp
}

async fn ws(up: WebSocketUpgrade) -> Response {
    up.on_upgrade(|mut socket: WebSocket| async move {
        while let Some(Ok(msg)) = socket.recv().await {
            if socket.send(msg).await.is_err() {
                break;
            }
        }
    })
}

async fn spawn_guest() -> (SocketAddr, Guest) {
    let guest = Guest::default();
    let app = Router::new()
        .route("/download", get(download))
        .route("/upload", any(upload))
        .route("/ws", get(ws))
        .route("/set-cookies", get(set_cookies))
        .fallback(echo)
        .with_state(guest.clone());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (addr, guest)
}

struct Env {
    _dir: tempfile::TempDir,
    store: Store,
    proxy: ProxyServer,
    /// The guest port: a server on 127.0.0.1.
    port: u16,
    guest: Guest,
}

async fn env() -> Env {
    env_with(false).await
}

async fn env_with(auth_disabled: bool) -> Env {
    env_capped(auth_disabled, 1024).await
}

async fn env_capped(auth_disabled: bool, max_connections: usize) -> Env {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("hyperfleet.db")).unwrap();
    let mut config = ProxyConfig::new(SocketAddr::from(([127, 0, 0, 1], 0)));
    config.domain = DOMAIN.into();
    config.connect_timeout = CONNECT_TIMEOUT;
    let listener = TcpListener::bind(config.listen).await.unwrap();
    let proxy = ProxyServer::spawn(
        listener,
        Proxy::new(store.clone(), &config, auth_disabled),
        max_connections,
    )
    .unwrap();
    let (addr, guest) = spawn_guest().await;
    Env {
        _dir: dir,
        store,
        proxy,
        port: addr.port(),
        guest,
    }
}

/// A machine as the proxy finds it: `running`, its lease at 127.0.0.1.
fn machine(tenant: &str, name: &str, ports: &[u16], public: bool) -> MachineRecord {
    let req = CreateMachineRequest {
        name: Some(name.into()),
        exposed_ports: ports.iter().map(|p| u32::from(*p)).collect(),
        public: Some(public),
        ..Default::default()
    };
    let (name, mut spec) = crate::validate::validate_create(req, VmmKind::Stub).unwrap();
    spec.access_token = Some(crate::util::random_id("hft_", 32));
    let mut rec = MachineRecord::new(
        crate::util::new_machine_id(),
        tenant,
        name.unwrap(),
        spec,
        crate::util::now_ms(),
    );
    rec.status = MachineStatus::Running;
    rec.desired = Desired::Running;
    rec.prepared = true;
    rec.network = Some(NetLease {
        block: 0,
        ip: Ipv4Addr::LOCALHOST,
        gateway: Ipv4Addr::LOCALHOST,
        prefix_len: 30,
        mac: "02:00:00:00:00:01".into(),
        tap: "hftest0".into(),
    });
    rec
}

impl Env {
    async fn put(&self, rec: MachineRecord) -> MachineRecord {
        let stored = rec.clone();
        self.store
            .write(move |ctx| ctx.put_machine(stored))
            .await
            .unwrap();
        rec
    }

    /// A public machine exposing the guest port.
    async fn public(&self, name: &str) -> MachineRecord {
        self.put(machine("default", name, &[self.port], true)).await
    }

    async fn private(&self, tenant: &str, name: &str) -> MachineRecord {
        self.put(machine(tenant, name, &[self.port], false)).await
    }

    async fn key(&self, tenant: &str, scopes: &[Scope]) -> String {
        let (secret, rec) = crate::auth::new_key("t", tenant, scopes.to_vec(), None);
        self.store
            .write(move |ctx| ctx.insert_key(rec))
            .await
            .unwrap();
        secret
    }

    fn host(&self, m: &MachineRecord) -> String {
        format!(
            "{}-{}.{DOMAIN}:{}",
            self.port,
            m.id,
            self.proxy.local_addr().port()
        )
    }

    /// One request to the proxy on a connection of its own.
    async fn send<B>(&self, req: Request<B>) -> Response<Incoming>
    where
        B: hyper::body::Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let stream = TcpStream::connect(self.proxy.local_addr()).await.unwrap();
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .unwrap();
        tokio::spawn(conn);
        tokio::time::timeout(PATIENCE, sender.send_request(req))
            .await
            .expect("the proxy answered in time")
            .unwrap()
    }

    /// GET `path` with `Host: host` and extra headers; the status, headers
    /// and body as JSON (or as a string when it is not JSON).
    async fn get(&self, host: &str, path: &str, headers: &[(&str, &str)]) -> Answer {
        let mut req = Request::get(path).header("host", host);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let resp = self.send(req.body(Empty::<Bytes>::new()).unwrap()).await;
        let (parts, body) = resp.into_parts();
        let bytes = body.collect().await.unwrap().to_bytes();
        let body = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()));
        Answer {
            status: parts.status,
            headers: parts.headers,
            body,
        }
    }

    /// GET `/` with `Authorization: Bearer <key>`.
    async fn get_as(&self, host: &str, key: &str) -> Answer {
        let auth = format!("Bearer {key}");
        self.get(host, "/", &[("authorization", &auth)]).await
    }

    /// Starts the guest's `/download`: one chunk, the rest once released.
    async fn download(&self, host: &str) -> Response<Incoming> {
        let req = Request::get("/download").header("host", host);
        self.send(req.body(Empty::<Bytes>::new()).unwrap()).await
    }

    /// GET through the path form (any Host).
    async fn get_path(&self, path: &str, headers: &[(&str, &str)]) -> Answer {
        self.get(&self.proxy.local_addr().to_string(), path, headers)
            .await
    }
}

struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    body: Value,
}

impl Answer {
    /// Asserts an error answer: status, code, and a part of the message.
    #[track_caller]
    fn expect_error(&self, status: StatusCode, code: &str, part: &str) {
        assert_eq!((self.status, self.code()), (status, code), "{}", self.body);
        assert!(self.message().contains(part), "{}", self.message());
    }

    fn code(&self) -> &str {
        self.body["error"]["code"].as_str().unwrap_or("")
    }
    fn message(&self) -> &str {
        self.body["error"]["message"].as_str().unwrap_or("")
    }
    /// What the guest saw of one request header (echo route).
    fn seen(&self, header: &str) -> Vec<String> {
        self.body["headers"][header]
            .as_array()
            .map(|a| a.iter().map(|v| v.as_str().unwrap().to_string()).collect())
            .unwrap_or_default()
    }
}

#[tokio::test]
async fn host_routing_reaches_the_guest_port_by_id_or_name_with_forwarded_headers() {
    let e = env().await;
    let m = e.public("web").await;
    let host = e.host(&m);
    let a = e.get(&host, "/hello/world?a=1&port=9", &[]).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.body);
    assert_eq!(a.body["path"], "/hello/world");
    // In the host form `port` is the application's parameter.
    assert_eq!(a.body["query"], "a=1&port=9");
    assert_eq!(a.seen("host"), std::slice::from_ref(&host));
    assert_eq!(a.seen("x-forwarded-host"), std::slice::from_ref(&host));
    assert_eq!(a.seen("x-forwarded-for"), ["127.0.0.1"]);
    assert_eq!(a.seen("x-forwarded-proto"), ["http"]);
    assert!(a.seen("x-forwarded-prefix").is_empty());

    // By name, upper case, and under `localhost` whatever the domain.
    let proxy_port = e.proxy.local_addr().port();
    for host in [
        format!("{}-WEB.{DOMAIN}:{proxy_port}", e.port),
        format!("{}-web.localhost:{proxy_port}", e.port),
        format!("{}-{}.localhost", e.port, m.id),
    ] {
        let a = e.get(&host, "/x", &[]).await;
        assert_eq!(a.status, StatusCode::OK, "{host}: {}", a.body);
        assert_eq!(a.body["path"], "/x");
    }
    // A client's own X-Forwarded-For is kept and extended.
    let a = e.get(&host, "/", &[("x-forwarded-for", "192.0.2.7")]).await;
    assert_eq!(a.seen("x-forwarded-for"), ["192.0.2.7, 127.0.0.1"]);
}

#[tokio::test]
async fn path_routing_strips_the_prefix_and_the_port_parameter() {
    let e = env().await;
    let m = e.public("web").await;
    let a = e
        .get_path(
            &format!("/proxy/{}/api/v1?port={}&q=a%20b", m.id, e.port),
            &[],
        )
        .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.body);
    assert_eq!(a.body["path"], "/api/v1");
    assert_eq!(a.body["query"], "q=a%20b");
    assert_eq!(a.seen("x-forwarded-prefix"), [format!("/proxy/{}", m.id)]);

    // One exposed port: `?port=` may be left out; by name too.
    let a = e.get_path("/proxy/web/only", &[]).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.body);
    assert_eq!(a.body["path"], "/only");
    assert_eq!(a.body["query"], Value::Null);
    let a = e.get_path("/proxy/web", &[]).await;
    assert_eq!(
        (a.status, a.body["path"].as_str()),
        (StatusCode::OK, Some("/"))
    );

    // Several: it must be said which.
    let two = e
        .put(machine("default", "two", &[e.port, 3000], true))
        .await;
    let a = e.get_path("/proxy/two/", &[]).await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST);
    assert_eq!(a.code(), "VALIDATION_ERROR");
    assert!(a.message().contains("?port="), "{}", a.message());
    let a = e
        .get_path(&format!("/proxy/{}/?port={}", two.id, e.port), &[])
        .await;
    assert_eq!(a.status, StatusCode::OK);
    let a = e.get_path("/proxy/two/?port=http", &[]).await;
    assert_eq!(
        (a.status, a.code()),
        (StatusCode::BAD_REQUEST, "VALIDATION_ERROR")
    );
}

/// At the connection cap a new client waits (in the listen backlog) and is
/// served once a connection closes; nothing is refused.
#[tokio::test]
async fn at_the_connection_cap_a_new_client_waits_for_a_slot() {
    let e = env_capped(false, 2).await;
    let addr = e.proxy.local_addr();
    let silent_a = tokio::net::TcpStream::connect(addr).await.unwrap();
    let _silent_b = tokio::net::TcpStream::connect(addr).await.unwrap();
    let third = tokio::spawn(raw_get_elsewhere(addr));
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert!(!third.is_finished(), "served past the cap of 2");
    drop(silent_a);
    let answer = tokio::time::timeout(std::time::Duration::from_secs(5), third)
        .await
        .expect("served once a slot freed")
        .unwrap();
    assert!(answer.starts_with("HTTP/1.1 404"), "{answer}");
}

/// A plain `GET /` for a host the proxy serves nothing at, on a connection
/// of its own: the raw answer (a 404 once the proxy takes the connection).
async fn raw_get_elsewhere(addr: SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut c = TcpStream::connect(addr).await.unwrap();
    c.write_all(b"GET / HTTP/1.1\r\nHost: elsewhere\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    c.read_to_end(&mut answer).await.unwrap();
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test]
async fn other_addresses_get_a_404_that_explains_both_forms() {
    let e = env().await;
    for path in ["/", "/api/v1/machines", "/proxy/"] {
        let a = e.get_path(path, &[]).await;
        assert_eq!(a.status, StatusCode::NOT_FOUND, "{path}");
        assert_eq!(a.code(), "NOT_FOUND");
        assert!(
            a.message()
                .contains("<port>-<machine id or name>.<proxy domain>")
                && a.message().contains("/proxy/<machine id or name>/"),
            "{}",
            a.message()
        );
        assert_eq!(a.headers["content-type"], "application/json");
    }
}

#[tokio::test]
async fn ports_not_exposed_are_404_and_stopped_or_unaddressed_machines_409() {
    let e = env().await;
    let m = e.public("web").await;
    let a = e
        .get_path(&format!("/proxy/{}/?port=8081", m.id), &[])
        .await;
    assert_eq!((a.status, a.code()), (StatusCode::NOT_FOUND, "NOT_FOUND"));
    assert_eq!(
        a.message(),
        format!(
            "port 8081 is not exposed by machine '{}' (exposed: {})",
            m.id, e.port
        )
    );
    let none = e.put(machine("default", "none", &[], true)).await;
    let a = e.get_path(&format!("/proxy/{}/", none.id), &[]).await;
    assert_eq!(a.status, StatusCode::NOT_FOUND);
    assert!(a.message().contains("exposes no ports"), "{}", a.message());

    let mut stopped = machine("default", "stopped", &[e.port], true);
    stopped.status = MachineStatus::Stopped;
    let stopped = e.put(stopped).await;
    let a = e.get(&e.host(&stopped), "/", &[]).await;
    a.expect_error(
        StatusCode::CONFLICT,
        "INVALID_STATE",
        "is stopped, not running",
    );

    let mut unaddressed = machine("default", "nonet", &[e.port], true);
    unaddressed.network = None;
    let unaddressed = e.put(unaddressed).await;
    let a = e.get(&e.host(&unaddressed), "/", &[]).await;
    a.expect_error(StatusCode::CONFLICT, "INVALID_STATE", "no network address");
}

#[tokio::test]
async fn a_refused_guest_port_is_a_502_with_a_clear_body() {
    let e = env().await;
    // A port that was free a moment ago: nothing listens there.
    let closed = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let m = e.put(machine("default", "web", &[closed], true)).await;
    let a = e.get_path(&format!("/proxy/{}/", m.id), &[]).await;
    assert_eq!(
        (a.status, a.code()),
        (StatusCode::BAD_GATEWAY, "BAD_GATEWAY")
    );
    assert!(
        a.message().starts_with(&format!(
            "machine '{}' port {closed} refused the connection",
            m.id
        )),
        "{}",
        a.message()
    );
}

#[tokio::test]
async fn a_guest_port_that_never_accepts_is_a_504_after_the_connect_timeout() {
    let e = env().await;
    // A listener that never accepts, its backlog filled: further SYNs are
    // dropped, so a connect hangs as it would to a wedged guest.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::from(([127, 0, 0, 1], 0))).unwrap();
    let listener = socket.listen(1).unwrap();
    let addr = listener.local_addr().unwrap();
    let mut held = Vec::new();
    loop {
        match tokio::time::timeout(Duration::from_millis(200), TcpStream::connect(addr)).await {
            Ok(Ok(s)) => held.push(s),
            _ => break,
        }
        assert!(held.len() < 64, "the backlog never filled");
    }
    let m = e.put(machine("default", "web", &[addr.port()], true)).await;
    let t0 = std::time::Instant::now();
    let a = e.get_path(&format!("/proxy/{}/", m.id), &[]).await;
    assert_eq!(
        (a.status, a.code()),
        (StatusCode::GATEWAY_TIMEOUT, "TIMEOUT")
    );
    assert!(
        a.message()
            .contains("did not accept the connection within 400 ms"),
        "{}",
        a.message()
    );
    assert!(t0.elapsed() >= CONNECT_TIMEOUT);
}

#[tokio::test]
async fn private_machines_need_a_key_of_their_tenant_with_exec() {
    let e = env().await;
    let m = e.private("default", "web").await;
    let host = e.host(&m);

    let a = e.get(&host, "/", &[]).await;
    assert_eq!(
        (a.status, a.code()),
        (StatusCode::UNAUTHORIZED, "UNAUTHORIZED")
    );
    // An absent machine looks the same to a caller without credentials.
    let absent = e
        .get(&format!("{}-nosuch.{DOMAIN}", e.port), "/", &[])
        .await;
    assert_eq!(absent.status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        absent.message().replace("nosuch", "X"),
        a.message().replace(&m.id, "X")
    );

    let exec = e.key("default", &[Scope::Exec]).await;
    let a = e.get_as(&host, &exec).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.body);
    assert!(
        a.seen("authorization").is_empty(),
        "the key reached the guest"
    );
    let admin = e.key("default", &[Scope::Admin]).await;
    let a = e.get_as(&host, &admin).await;
    assert_eq!(a.status, StatusCode::OK);

    let read = e.key("default", &[Scope::Read, Scope::Write]).await;
    let a = e.get_as(&host, &read).await;
    a.expect_error(StatusCode::FORBIDDEN, "FORBIDDEN", "'exec' scope");

    // Another tenant's key, even an admin's: as if the machine were absent.
    let other = e.key("acme", &[Scope::Admin]).await;
    let a = e.get_as(&host, &other).await;
    assert_eq!((a.status, a.code()), (StatusCode::NOT_FOUND, "NOT_FOUND"));
    assert_eq!(a.message(), format!("machine '{}' not found", m.id));

    let a = e
        .get(&host, "/", &[("authorization", "Bearer hf_0000")])
        .await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED);
    assert!(
        a.message().starts_with("unknown API key"),
        "{}",
        a.message()
    );
}

#[tokio::test]
async fn the_access_token_works_as_a_query_parameter_that_sets_a_cookie() {
    let e = env().await;
    let m = e.private("default", "web").await;
    let token = m.spec.access_token.clone().unwrap();
    let host = e.host(&m);

    let a = e.get(&host, &format!("/p?x=1&hf_token={token}"), &[]).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.body);
    assert_eq!(a.body["query"], "x=1", "the token reached the guest");
    assert_eq!(
        a.headers["set-cookie"],
        format!("hf_token={token}; Path=/; HttpOnly; SameSite=Lax")
    );

    // The path form takes the token on each request and sets no cookie:
    // there a cookie would reach every machine's pages.
    let a = e
        .get_path(&format!("/proxy/{}/p?hf_token={token}", m.id), &[])
        .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.body);
    assert_eq!(a.body["query"], Value::Null, "the token reached the guest");
    assert!(a.headers.get("set-cookie").is_none());

    // The cookie alone; the guest keeps its own cookies and never sees ours.
    let cookie = format!("session=abc; hf_token={token}; theme=dark");
    let a = e.get(&host, "/", &[("cookie", &cookie)]).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.body);
    assert_eq!(a.seen("cookie"), ["session=abc; theme=dark"]);
    assert!(a.headers.get("set-cookie").is_none());

    // A wrong token, or another machine's, is refused.
    let other = e.private("default", "other").await;
    let a = e
        .get(&e.host(&other), &format!("/?hf_token={token}"), &[])
        .await;
    a.expect_error(
        StatusCode::UNAUTHORIZED,
        "UNAUTHORIZED",
        "does not grant access",
    );
    let a = e
        .get(&e.host(&other), "/", &[("cookie", "hf_token=hft_wrong")])
        .await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn the_path_form_ignores_the_token_cookie_and_carries_no_cookies() {
    let e = env().await;
    let m = e.private("default", "web").await;
    let token = m.spec.access_token.clone().unwrap();
    let cookie = format!("sid=abc; hf_token={token}");

    // The host form honours the cookie; the path form, the shared origin,
    // does not, whatever page made the browser send it.
    let a = e.get(&e.host(&m), "/", &[("cookie", &cookie)]).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.body);
    assert_eq!(a.seen("cookie"), ["sid=abc"]);
    let path = format!("/proxy/{}/", m.id);
    let a = e.get_path(&path, &[("cookie", &cookie)]).await;
    a.expect_error(StatusCode::UNAUTHORIZED, "UNAUTHORIZED", "never on /proxy/");

    // With a key or the query token it passes, and the guest gets no
    // cookie at all: only other services of the same host name set any.
    let key = e.key("default", &[Scope::Exec]).await;
    let auth = format!("Bearer {key}");
    let a = e
        .get_path(&path, &[("cookie", &cookie), ("authorization", &auth)])
        .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.body);
    assert!(a.seen("cookie").is_empty(), "{:?}", a.seen("cookie"));
    let a = e
        .get_path(
            &format!("{path}?hf_token={token}"),
            &[("cookie", "sid=abc")],
        )
        .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.body);
    assert!(a.seen("cookie").is_empty(), "{:?}", a.seen("cookie"));
}

#[tokio::test]
async fn guests_set_only_cookies_of_their_own_host_and_none_on_the_path_form() {
    let e = env().await;
    let m = e.private("default", "web").await;
    let token = m.spec.access_token.clone().unwrap();
    let set_cookies = |a: &Answer| -> Vec<String> {
        a.headers
            .get_all("set-cookie")
            .iter()
            .map(|v| v.to_str().unwrap().to_string())
            .collect()
    };

    // The host form: the guest's host-only cookie passes; those for a
    // parent domain (every machine) and a fake token cookie do not. The
    // proxy's own cookie follows, scoped to this host.
    let a = e
        .get(&e.host(&m), &format!("/set-cookies?hf_token={token}"), &[])
        .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.body);
    assert_eq!(
        set_cookies(&a),
        [
            "own=1; Path=/; HttpOnly".to_string(),
            format!("hf_token={token}; Path=/; HttpOnly; SameSite=Lax"),
        ]
    );
    assert!(a.headers.get("content-security-policy").is_none());

    // The path form: no cookie at all, and a sandboxed answer.
    let a = e
        .get_path(
            &format!("/proxy/{}/set-cookies?hf_token={token}", m.id),
            &[],
        )
        .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.body);
    assert_eq!(set_cookies(&a), Vec::<String>::new());
    assert_eq!(a.headers["content-security-policy"], "sandbox");
}

#[tokio::test]
async fn browser_pages_on_the_path_form_are_sent_to_the_host_form() {
    let e = env().await;
    let m = e.public("web").await;
    let proxy_port = e.proxy.local_addr().port();
    let page = [
        ("sec-fetch-mode", "navigate"),
        ("sec-fetch-dest", "document"),
    ];

    let a = e
        .get_path(
            &format!("/proxy/web/app/x?port={}&q=1&hf_token=hft_x", e.port),
            &page,
        )
        .await;
    a.expect_error(
        StatusCode::FORBIDDEN,
        "FORBIDDEN",
        &format!(
            "open the machine at its own host name instead: http://{}-web.{DOMAIN}:{proxy_port}/app/x?q=1 ",
            e.port
        ),
    );
    assert!(!a.message().contains("hft_x"), "{}", a.message());
    // No port named: the URL says where it goes. A machine that does not
    // exist gets the same answer (nothing is looked up).
    let a = e.get_path("/proxy/nosuch/", &page).await;
    a.expect_error(
        StatusCode::FORBIDDEN,
        "FORBIDDEN",
        &format!("http://<port>-nosuch.{DOMAIN}:{proxy_port}/ "),
    );
    // A frame too.
    let a = e
        .get_path(
            &format!("/proxy/{}/", m.id),
            &[("sec-fetch-dest", "iframe")],
        )
        .await;
    assert_eq!(a.status, StatusCode::FORBIDDEN, "{}", a.body);

    // A script's fetch() and API clients pass; so do pages on the host form.
    let fetch = [("sec-fetch-mode", "cors"), ("sec-fetch-dest", "empty")];
    let a = e.get_path("/proxy/web/api", &fetch).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.body);
    let a = e.get(&e.host(&m), "/", &page).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.body);
}

#[tokio::test]
async fn behind_https_the_cookie_is_secure_and_host_urls_use_the_public_scheme_and_port() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("hyperfleet.db")).unwrap();
    let mut config = ProxyConfig::new(SocketAddr::from(([127, 0, 0, 1], 0)));
    config.domain = DOMAIN.into();
    config.public_scheme = "https".into();
    config.public_port = Some(443);
    let proxy = Proxy::new(store, &config, false);
    assert_eq!(
        proxy.token_cookie("hft_x").unwrap(),
        "hf_token=hft_x; Path=/; HttpOnly; SameSite=Lax; Secure"
    );
    let route =
        super::route::parse(Some("10.0.0.1:4000"), "/proxy/web/a?port=8080", DOMAIN).unwrap();
    let e = proxy.page_on_path_form(&route, Some("10.0.0.1:4000"));
    assert!(
        e.message
            .contains(&format!("instead: https://8080-web.{DOMAIN}/a ")),
        "{}",
        e.message
    );
    config.public_port = Some(8443);
    let proxy = Proxy::new(proxy.store.clone(), &config, false);
    let e = proxy.page_on_path_form(&route, None);
    assert!(
        e.message
            .contains(&format!("instead: https://8080-web.{DOMAIN}:8443/a ")),
        "{}",
        e.message
    );
}

#[tokio::test]
async fn public_machines_pass_and_the_applications_own_credentials_reach_the_guest() {
    let e = env().await;
    let m = e.public("web").await;
    let a = e
        .get(
            &e.host(&m),
            "/",
            &[("authorization", "Bearer app-jwt"), ("cookie", "sid=1")],
        )
        .await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(a.seen("authorization"), ["Bearer app-jwt"]);
    assert_eq!(a.seen("cookie"), ["sid=1"]);

    // With auth off, private machines pass too.
    let open = env_with(true).await;
    let m = open.private("default", "web").await;
    let a = open.get(&open.host(&m), "/", &[]).await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.body);
}

#[tokio::test]
async fn a_name_used_by_several_tenants_needs_the_id_a_key_or_a_token() {
    let e = env().await;
    let a1 = e.private("default", "shared").await;
    let b1 = e.private("acme", "shared").await;
    let shared = format!("{}-shared.{DOMAIN}", e.port);

    let a = e.get(&shared, "/", &[]).await;
    a.expect_error(StatusCode::NOT_FOUND, "NOT_FOUND", "address it by its id");

    let acme = e.key("acme", &[Scope::Exec]).await;
    let a = e.get_as(&shared, &acme).await;
    assert_eq!(a.status, StatusCode::OK, "the key's tenant decides");

    let token = b1.spec.access_token.clone().unwrap();
    let a = e.get(&shared, &format!("/?hf_token={token}"), &[]).await;
    assert_eq!(a.status, StatusCode::OK, "the token decides");

    let a = e.get(&e.host(&a1), "/", &[]).await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED, "by id it is found");
}

#[tokio::test]
async fn large_bodies_stream_both_ways_without_buffering() {
    let e = env().await;
    let m = e.public("web").await;
    let host = e.host(&m);

    // Download: the first chunk arrives before the guest sends the rest.
    let resp = e.download(&host).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let mut body = resp.into_body();
    let mut got = 0usize;
    while got < CHUNK {
        let frame = tokio::time::timeout(PATIENCE, body.frame())
            .await
            .expect("the first chunk came through before the rest was sent")
            .unwrap()
            .unwrap();
        got += frame.into_data().map_or(0, |d| d.len());
    }
    e.guest.download_release.notify_one();
    while let Some(frame) = tokio::time::timeout(PATIENCE, body.frame()).await.unwrap() {
        got += frame.unwrap().into_data().map_or(0, |d| d.len());
    }
    assert_eq!(got, CHUNK * CHUNKS);

    // Upload: the guest sees the first chunk before the client sends more.
    let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, std::io::Error>>(2);
    let req = Request::post("/upload")
        .header("host", &host)
        .body(StreamBody::new(ReceiverStream::new(rx)))
        .unwrap();
    let started = e.guest.upload_started.clone();
    let feeder = tokio::spawn(async move {
        let chunk = Bytes::from(vec![1u8; CHUNK]);
        tx.send(Ok(Frame::data(chunk.clone()))).await.unwrap();
        tokio::time::timeout(PATIENCE, started.notified())
            .await
            .expect("the guest saw the first chunk while the upload went on");
        for _ in 1..CHUNKS {
            tx.send(Ok(Frame::data(chunk.clone()))).await.unwrap();
        }
    });
    let resp = e.send(req).await;
    assert_eq!(resp.status(), StatusCode::OK);
    let n = resp.into_body().collect().await.unwrap().to_bytes();
    feeder.await.unwrap();
    assert_eq!(n, (CHUNK * CHUNKS).to_string());
}

#[tokio::test]
async fn websockets_are_spliced_through_and_count_as_activity() {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;

    let e = env().await;
    let m = e.private("default", "web").await;
    let key = e.key("default", &[Scope::Exec]).await;
    assert_eq!(e.proxy.activity().last(&m.id), None);

    for host_form in [true, false] {
        let url = if host_form {
            format!("ws://{}/ws", e.host(&m))
        } else {
            format!(
                "ws://{}/proxy/{}/ws?port={}",
                e.proxy.local_addr(),
                m.id,
                e.port
            )
        };
        let mut req = url.into_client_request().unwrap();
        req.headers_mut()
            .insert("authorization", format!("Bearer {key}").parse().unwrap());
        let mut ws = ws_through(&e, req).await;
        for text in ["hello", "through the proxy"] {
            ws.send(Message::text(text)).await.unwrap();
            let echoed = next_message(&mut ws).await;
            assert_eq!(echoed, Message::text(text));
        }
        let big = vec![5u8; 1 << 20];
        ws.send(Message::binary(big.clone())).await.unwrap();
        let echoed = next_message(&mut ws).await;
        assert_eq!(echoed.into_data(), big);
        ws.close(None).await.unwrap();
    }
    assert!(e.proxy.activity().last(&m.id).is_some());
}

/// A spliced WebSocket keeps its connection's place under the cap until it
/// closes: with a cap of 1, a plain request waits for it.
#[tokio::test]
async fn an_upgraded_connection_counts_under_the_cap_until_it_closes() {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let e = env_capped(false, 1).await;
    let m = e.public("web").await;
    let req = format!("ws://{}/ws", e.host(&m))
        .into_client_request()
        .unwrap();
    let mut ws = ws_through(&e, req).await;
    ws.send(Message::text("hi")).await.unwrap();
    assert_eq!(next_message(&mut ws).await, Message::text("hi"));
    let plain = tokio::spawn(raw_get_elsewhere(e.proxy.local_addr()));
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert!(
        !plain.is_finished(),
        "served while the WebSocket held the only place"
    );
    ws.close(None).await.unwrap();
    drop(ws);
    let answer = tokio::time::timeout(PATIENCE, plain)
        .await
        .unwrap()
        .unwrap();
    assert!(answer.starts_with("HTTP/1.1 404"), "{answer}");
}

/// Opens the WebSocket `req` names through the proxy, which must switch
/// protocols.
async fn ws_through(
    e: &Env,
    req: tokio_tungstenite::tungstenite::handshake::client::Request,
) -> tokio_tungstenite::WebSocketStream<TcpStream> {
    let stream = TcpStream::connect(e.proxy.local_addr()).await.unwrap();
    let (ws, resp) = tokio::time::timeout(PATIENCE, tokio_tungstenite::client_async(req, stream))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
    ws
}

async fn next_message<S>(ws: &mut tokio_tungstenite::WebSocketStream<S>) -> Message
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let next = tokio::time::timeout(PATIENCE, ws.next()).await;
    next.expect("the echo came back in time").unwrap().unwrap()
}

#[tokio::test]
async fn each_proxied_request_records_the_machines_activity() {
    let e = env().await;
    let m = e.public("web").await;
    let idle = e.public("idle").await;
    let before = crate::util::now_ms();
    let a = e.get(&e.host(&m), "/", &[]).await;
    assert_eq!(a.status, StatusCode::OK);
    let t = e.proxy.activity().last(&m.id).expect("activity recorded");
    assert!(t >= before && t <= crate::util::now_ms());
    assert_eq!(e.proxy.activity().last(&idle.id), None);
    // Refused requests are no activity.
    let private = e.private("default", "private").await;
    let a = e.get(&e.host(&private), "/", &[]).await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED);
    assert_eq!(e.proxy.activity().last(&private.id), None);
}

#[tokio::test]
async fn shutdown_waits_for_in_flight_requests_and_stops_accepting() {
    let e = env().await;
    let m = e.public("web").await;
    let host = e.host(&m);
    // A download held open by the guest is in flight during the shutdown.
    let resp = e.download(&host).await;
    let addr = e.proxy.local_addr();
    let shutdown = tokio::spawn(e.proxy.shutdown());
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!shutdown.is_finished(), "shutdown waits for the response");
    e.guest.download_release.notify_one();
    let body = tokio::time::timeout(PATIENCE, resp.into_body().collect())
        .await
        .unwrap()
        .unwrap()
        .to_bytes();
    assert_eq!(body.len(), CHUNK * CHUNKS);
    tokio::time::timeout(PATIENCE, shutdown)
        .await
        .unwrap()
        .unwrap();
    assert!(TcpStream::connect(addr).await.is_err(), "still accepting");
}

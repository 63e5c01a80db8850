//! The reverse proxy on `PROXY_PORT`: routes `<port>-<machine>.<domain>`
//! host names and `/proxy/<machine>/…?port=N` paths to exposed guest ports.
//!
//! It owns the path of a proxied request: where it goes (`route`), who may
//! pass (`auth`), the header rewriting (`headers`), the forwarding itself
//! (here: a pooled keep-alive HTTP/1.1 client per guest port, bodies
//! streamed both ways, protocol upgrades spliced), the listener (`server`)
//! and the per-machine last activity (`activity`). docs/networking.md
//! ("Reverse proxy") describes the behaviour.
//!
//! Browsers get one origin per machine: the host form
//! (`<port>-<machine>.<domain>`) is the one for them, with the `hf_token`
//! cookie scoped to that host; the path form (`/proxy/<machine>/…`) serves
//! every machine from the proxy's one origin, so it is for API clients:
//! no cookies either way, no pages for browsers (see `plan` and `headers`).
//!
//! It is hyper, not axum: the client's body is handed to the guest and the
//! guest's body to the client as they are, with no boxing, buffering or
//! router in between.

pub mod activity;
pub(crate) mod auth;
mod error;
pub(crate) mod headers;
pub(crate) mod route;
pub mod server;

#[cfg(test)]
mod tests;

use std::borrow::Cow;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::http::header::{HOST, SET_COOKIE};
use axum::http::uri::{Authority, PathAndQuery, Scheme};
use axum::http::{HeaderValue, Method, Request, Response, StatusCode, Uri, Version};
use bytes::Bytes;
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyperfleet_api::{ErrorCode, MachineStatus};

use crate::config::ProxyConfig;
use crate::store::{CachedMachine, MachineRecord, Store};
use crate::util::error_chain;
use activity::Activity;
use auth::{Credentials, Grant};
pub(crate) use error::ProxyError;
use route::Form;

/// What the proxy answers with: the guest's body as it streams, or a body
/// of the proxy's own (errors).
pub(crate) type ProxyBody = Either<Incoming, Full<Bytes>>;

/// Idle keep-alive connections to guests are closed after this long.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// An upgraded (WebSocket) connection counts as activity this often while
/// it stays open, even when quiet: someone holds it.
/// (Often enough for the shortest idle timeout that makes sense, 2 s.)
const UPGRADED_TOUCH_EVERY: Duration = Duration::from_secs(1);

/// The proxy's shared state; one per daemon.
pub struct Proxy {
    store: Store,
    client: Client<HttpConnector, Incoming>,
    domain: String,
    /// `X-Forwarded-Proto`, and the scheme of host-form URLs.
    scheme: HeaderValue,
    /// The port of host-form URLs; None: the one the client used.
    public_port: Option<u16>,
    /// The token cookie gets `Secure` when clients come over HTTPS.
    secure_cookies: bool,
    auth_disabled: bool,
    connect_timeout: Duration,
    activity: Activity,
    /// Resumes a suspended machine for a request (None: such requests are
    /// refused as before).
    waker: Option<Arc<dyn Waker>>,
}

/// Wakes a suspended machine for a proxied request: the lifecycle's
/// `Supervisor::wake`, behind a trait so the proxy needs no supervisor.
pub trait Waker: Send + Sync {
    /// The machine once running, or why it could not be woken.
    fn wake(
        &self,
        machine: Arc<CachedMachine>,
    ) -> futures_util::future::BoxFuture<'static, Result<Arc<CachedMachine>, String>>;
}

/// How long a client is told to wait before retrying after a failed wake.
const WAKE_RETRY_AFTER_SECONDS: u64 = 5;

impl Proxy {
    pub fn new(store: Store, config: &ProxyConfig, auth_disabled: bool) -> Arc<Proxy> {
        Proxy::with_lifecycle(store, config, auth_disabled, Activity::default(), None)
    }

    /// A proxy that records activity in `activity` (shared with the idle
    /// timer) and wakes suspended machines with `waker`.
    pub fn with_lifecycle(
        store: Store,
        config: &ProxyConfig,
        auth_disabled: bool,
        activity: Activity,
        waker: Option<Arc<dyn Waker>>,
    ) -> Arc<Proxy> {
        let mut connector = HttpConnector::new();
        // Small request/response exchanges dominate; Nagle would add a
        // delayed-ACK round to each.
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(config.connect_timeout));
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .build(connector);
        let scheme = HeaderValue::from_str(&config.public_scheme)
            .unwrap_or_else(|_| HeaderValue::from_static("http"));
        Arc::new(Proxy {
            store,
            client,
            domain: config.domain.to_ascii_lowercase(),
            secure_cookies: config.public_scheme.eq_ignore_ascii_case("https"),
            scheme,
            public_port: config.public_port,
            auth_disabled,
            connect_timeout: config.connect_timeout,
            activity,
            waker,
        })
    }

    /// Last activity per machine (for idle auto-suspend).
    pub fn activity(&self) -> &Activity {
        &self.activity
    }

    /// Answers one request: the guest's response, or the error envelope.
    pub(crate) async fn handle(
        &self,
        req: Request<Incoming>,
        peer: SocketAddr,
    ) -> Response<ProxyBody> {
        let resp = match self.forward(req, peer.ip()).await {
            Ok(resp) => resp,
            Err(e) => e.into_response(),
        };
        crate::metrics::proxy_request(resp.status());
        resp
    }

    async fn forward(
        &self,
        mut req: Request<Incoming>,
        client_ip: IpAddr,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        if req.method() == Method::CONNECT {
            return Err(ProxyError::new(
                ErrorCode::MethodNotAllowed,
                "the Hyperfleet proxy does not tunnel CONNECT requests",
            ));
        }
        let mut plan = match self.plan(&req) {
            // A suspended machine is woken and the request goes on.
            Err(ProxyError {
                wake: Some(m),
                message,
                ..
            }) => {
                let Some(waker) = &self.waker else {
                    return Err(ProxyError::new(ErrorCode::InvalidState, message));
                };
                if let Err(why) = waker.wake(m).await {
                    let mut e = ProxyError::new(ErrorCode::Unavailable, why);
                    e.retry_after = Some(WAKE_RETRY_AFTER_SECONDS);
                    return Err(e);
                }
                let plan = self.plan(&req)?;
                // A guest restored from memory may take a moment before its
                // port answers again (its network comes back with a new
                // TAP): the held request waits for it rather than failing.
                wait_for_port(plan.target).await;
                plan
            }
            other => other?,
        };
        let id = &plan.machine.rec.id;
        self.activity.touch(id);

        let upgrade = headers::is_upgrade(req.headers());
        let client_side = upgrade.then(|| hyper::upgrade::on(&mut req));
        // The connection's place under the cap: an upgraded one keeps it.
        let slot = req.extensions_mut().remove::<server::ConnSlot>();
        let path_and_query = match plan.path_and_query.take() {
            Some(pq) => pq,
            None => req
                .uri()
                .path_and_query()
                .cloned()
                .unwrap_or_else(|| PathAndQuery::from_static("/")),
        };
        *req.uri_mut() = guest_uri(plan.target, path_and_query)?;
        // The guest hop is HTTP/1.1 whatever the client spoke.
        *req.version_mut() = Version::HTTP_11;
        let fwd = headers::Forwarded {
            client_ip,
            proto: &self.scheme,
            prefix: plan.prefix.as_deref(),
        };
        headers::prepare_request(req.headers_mut(), upgrade, &fwd);

        let mut resp = self
            .client
            .request(req)
            .await
            .map_err(|e| self.upstream_error(&e, &plan))?;

        let switched = resp.status() == StatusCode::SWITCHING_PROTOCOLS;
        match (switched, client_side) {
            (true, Some(client_side)) => {
                let guest_side = hyper::upgrade::on(&mut resp);
                tokio::spawn(splice(
                    client_side,
                    guest_side,
                    self.activity.clone(),
                    id.clone(),
                    slot,
                ));
            }
            (true, None) => {
                return Err(ProxyError::new(
                    ErrorCode::BadGateway,
                    format!(
                        "machine '{id}' port {} switched protocols on a request that asked for no upgrade",
                        plan.port
                    ),
                ))
            }
            (false, _) => {}
        }
        let dropped = headers::prepare_response(resp.headers_mut(), switched, plan.form());
        if dropped > 0 {
            tracing::debug!(
                machine = %id,
                port = plan.port,
                dropped,
                "proxy: dropped guest cookies that would reach beyond the machine's origin"
            );
        }
        if let Some(cookie) = plan.set_cookie.take() {
            resp.headers_mut().append(SET_COOKIE, cookie);
        }
        Ok(resp.map(Either::Left))
    }

    /// Everything decided before the guest is contacted: route, access,
    /// port, state and address.
    fn plan(&self, req: &Request<Incoming>) -> Result<Plan, ProxyError> {
        let host = req
            .uri()
            .host()
            .or_else(|| req.headers().get(HOST).and_then(|v| v.to_str().ok()));
        let original = req.uri().path_and_query().map_or("/", |p| p.as_str());
        let route = route::parse(host, original, &self.domain).map_err(|e| match e {
            route::RouteError::NoRoute => ProxyError::new(ErrorCode::NotFound, e.to_string()),
            route::RouteError::BadPort(_) => {
                ProxyError::new(ErrorCode::ValidationError, e.to_string())
            }
        })?;
        if let Form::Path { .. } = route.form {
            if headers::is_browser_page_request(req.headers()) {
                return Err(self.page_on_path_form(&route, host));
            }
        }
        let creds = Credentials::new(req.headers(), route.token, route.form == Form::Host);
        let (machine, grant) =
            auth::authorize(&self.store, &route.machine, &creds, self.auth_disabled)?;
        let rec = &machine.rec;
        let port = pick_port(rec, route.port)?;
        if rec.status != MachineStatus::Running {
            let mut e = ProxyError::new(
                ErrorCode::InvalidState,
                format!(
                    "machine '{}' is {}, not running: its ports are reachable only while it runs",
                    rec.id, rec.status
                ),
            );
            if self.waker.is_some()
                && matches!(
                    rec.status,
                    MachineStatus::Suspended | MachineStatus::Suspending
                )
            {
                e.wake = Some(machine.clone());
            }
            return Err(e);
        }
        let Some(lease) = &rec.network else {
            return Err(ProxyError::new(
                ErrorCode::InvalidState,
                format!(
                    "machine '{}' has no network address: the daemon runs with networking off, \
                     or the machine has not started since networking was turned on",
                    rec.id
                ),
            ));
        };
        let prefix = match route.form {
            Form::Host => None,
            Form::Path { prefix } => Some(prefix.to_string()),
        };
        // Only on the machine's own host: on the path form the cookie would
        // reach every machine's pages, and it is not read there anyway.
        let set_cookie = match (grant, &rec.spec.access_token, route.form) {
            (Grant::QueryToken, Some(token), Form::Host) => Some(self.token_cookie(token)?),
            _ => None,
        };
        let path_and_query = match route.path_and_query {
            // Borrowed: the original, unchanged (see `route::parse`).
            Cow::Borrowed(_) => None,
            Cow::Owned(changed) => Some(PathAndQuery::try_from(changed).map_err(|e| {
                ProxyError::new(
                    ErrorCode::ValidationError,
                    format!("the request path cannot be forwarded: {e}"),
                )
            })?),
        };
        Ok(Plan {
            target: SocketAddr::new(IpAddr::V4(lease.ip), port),
            port,
            path_and_query,
            prefix,
            set_cookie,
            machine,
        })
    }

    /// `Set-Cookie` for a token that came as `?hf_token=` on a machine's
    /// host name: no `Domain`, so the browser sends it to that host only,
    /// never to another machine's.
    fn token_cookie(&self, token: &str) -> Result<HeaderValue, ProxyError> {
        let secure = if self.secure_cookies { "; Secure" } else { "" };
        HeaderValue::try_from(format!(
            "{}={token}; Path=/; HttpOnly; SameSite=Lax{secure}",
            auth::TOKEN_COOKIE
        ))
        .map_err(|e| ProxyError::internal("cannot build the access-token cookie", e))
    }

    /// The refusal of a browser page on the path form, naming the machine's
    /// host-form URL. Nothing is looked up: the URL is built from the address
    /// alone, so the answer is the same whether the machine exists or not.
    fn page_on_path_form(&self, route: &route::Route<'_>, host: Option<&str>) -> ProxyError {
        let scheme = self.scheme.to_str().unwrap_or("http");
        // The port clients use: configured, else the one this client used.
        let port = self.public_port.or_else(|| {
            host.and_then(|h| h.rsplit_once(':'))
                .and_then(|(_, p)| p.parse::<u16>().ok())
        });
        let port = match (scheme, port) {
            (_, None) | ("http", Some(80)) | ("https", Some(443)) => String::new(),
            (_, Some(p)) => format!(":{p}"),
        };
        let guest_port = route
            .port
            .map_or_else(|| "<port>".to_string(), |p| p.to_string());
        let path = route.path_and_query.as_ref();
        ProxyError::new(
            ErrorCode::Forbidden,
            format!(
                "the path form /proxy/<machine>/… is for API clients: it serves every machine from \
                 one browser origin, so it does not serve pages to browsers; open the machine at \
                 its own host name instead: {scheme}://{guest_port}-{}.{}{port}{path} \
                 (add ?hf_token=<access token> once if it is not public)",
                route.machine, self.domain
            ),
        )
    }

    /// The answer when the guest could not be reached or broke off.
    fn upstream_error(&self, e: &hyper_util::client::legacy::Error, plan: &Plan) -> ProxyError {
        let (id, port) = (&plan.machine.rec.id, plan.port);
        let io_kind = io_error_kind(e);
        tracing::debug!(machine = %id, port, error = %error_chain(e), "proxy: guest port failed");
        if e.is_connect() {
            return match io_kind {
                Some(std::io::ErrorKind::TimedOut) => ProxyError::new(
                    ErrorCode::Timeout,
                    format!(
                        "machine '{id}' port {port} did not accept the connection within {} ms",
                        self.connect_timeout.as_millis()
                    ),
                ),
                Some(std::io::ErrorKind::ConnectionRefused) => ProxyError::new(
                    ErrorCode::BadGateway,
                    format!(
                        "machine '{id}' port {port} refused the connection: nothing listens there \
                         (is the application listening on 0.0.0.0:{port}, not only 127.0.0.1, \
                         inside the guest?)"
                    ),
                ),
                _ => ProxyError::new(
                    ErrorCode::BadGateway,
                    format!(
                        "machine '{id}' port {port} cannot be reached: {}",
                        error_chain(e)
                    ),
                ),
            };
        }
        ProxyError::new(
            ErrorCode::BadGateway,
            format!(
                "machine '{id}' port {port} closed the connection or answered with a broken response: {}",
                error_chain(e)
            ),
        )
    }
}

/// A request's destination, decided.
struct Plan {
    machine: Arc<CachedMachine>,
    target: SocketAddr,
    port: u16,
    /// None: the original path and query, unchanged.
    path_and_query: Option<PathAndQuery>,
    /// The path form's `/proxy/<machine>`.
    prefix: Option<String>,
    set_cookie: Option<HeaderValue>,
}

impl Plan {
    fn form(&self) -> Form<'_> {
        match &self.prefix {
            Some(prefix) => Form::Path { prefix },
            None => Form::Host,
        }
    }
}

/// The guest port a request may reach: one of the exposed ports, or the
/// only one when the path form names none.
fn pick_port(rec: &MachineRecord, asked: Option<u16>) -> Result<u16, ProxyError> {
    let exposed = &rec.spec.exposed_ports;
    let list = || {
        if exposed.is_empty() {
            "none".to_string()
        } else {
            exposed
                .iter()
                .map(u32::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        }
    };
    match asked {
        Some(p) if exposed.contains(&u32::from(p)) => Ok(p),
        Some(p) => Err(ProxyError::new(
            ErrorCode::NotFound,
            format!(
                "port {p} is not exposed by machine '{}' (exposed: {})",
                rec.id,
                list()
            ),
        )),
        None => match exposed.as_slice() {
            // Validation keeps exposed ports within 1–65535.
            [only] => u16::try_from(*only).map_err(|_| {
                ProxyError::internal("an exposed port is out of range", format!("{only}"))
            }),
            [] => Err(ProxyError::new(
                ErrorCode::NotFound,
                format!("machine '{}' exposes no ports", rec.id),
            )),
            _ => Err(ProxyError::new(
                ErrorCode::ValidationError,
                format!(
                    "machine '{}' exposes several ports ({}): say which with ?port=N",
                    rec.id,
                    list()
                ),
            )),
        },
    }
}

/// How long a request that woke its machine waits for the guest's port.
const WAKE_PORT_WAIT: Duration = Duration::from_secs(20);

/// Waits until `target` accepts a TCP connection, or [`WAKE_PORT_WAIT`]
/// passes (the forward then fails as it would have).
async fn wait_for_port(target: SocketAddr) {
    let deadline = tokio::time::Instant::now() + WAKE_PORT_WAIT;
    let t0 = std::time::Instant::now();
    while tokio::time::Instant::now() < deadline {
        let attempt = tokio::time::timeout(
            Duration::from_millis(500),
            tokio::net::TcpStream::connect(target),
        );
        if let Ok(Ok(_)) = attempt.await {
            tracing::debug!(%target, waited = ?t0.elapsed(), "proxy: woken guest's port answers");
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn guest_uri(target: SocketAddr, path_and_query: PathAndQuery) -> Result<Uri, ProxyError> {
    let authority = Authority::try_from(target.to_string())
        .map_err(|e| ProxyError::internal("cannot make the guest address a URI", e))?;
    let mut parts = axum::http::uri::Parts::default();
    parts.scheme = Some(Scheme::HTTP);
    parts.authority = Some(authority);
    parts.path_and_query = Some(path_and_query);
    Uri::from_parts(parts).map_err(|e| ProxyError::internal("cannot make the guest URI", e))
}

/// Joins the two halves of an upgraded connection once both switched, and
/// copies bytes both ways until either side closes.
async fn splice(
    client: hyper::upgrade::OnUpgrade,
    guest: hyper::upgrade::OnUpgrade,
    activity: Activity,
    id: String,
    // Dropped when the tunnel closes: until then it counts under the cap.
    _slot: Option<server::ConnSlot>,
) {
    let (client, guest) = match tokio::try_join!(client, guest) {
        Ok(both) => both,
        Err(e) => {
            tracing::debug!(machine = %id, error = %e, "proxy: an upgrade did not complete");
            return;
        }
    };
    let (mut client, mut guest) = (TokioIo::new(client), TokioIo::new(guest));
    let copy = tokio::io::copy_bidirectional(&mut client, &mut guest);
    tokio::pin!(copy);
    let mut tick = tokio::time::interval(UPGRADED_TOUCH_EVERY);
    loop {
        tokio::select! {
            r = &mut copy => {
                if let Err(e) = r {
                    tracing::debug!(machine = %id, error = %e, "proxy: an upgraded connection ended with an error");
                }
                break;
            }
            _ = tick.tick() => activity.touch(&id),
        }
    }
    activity.touch(&id);
}

fn io_error_kind(e: &(dyn std::error::Error + 'static)) -> Option<std::io::ErrorKind> {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            return Some(io.kind());
        }
        cur = err.source();
    }
    None
}

//! The daemon's Prometheus metrics: the one registry, every metric in it,
//! and the small recording functions the rest of the daemon calls (one line
//! at each place something worth counting happens). `GET /metrics`
//! (`http::metrics`) renders it in the Prometheus text format;
//! docs/api.md ("Metrics") lists every metric with its labels.
//!
//! The registry is process-wide, like the log subscriber: one daemon runs
//! per process, and a global spares every module that records something a
//! handle to thread through. Recording is cheap — an atomic add, or a
//! read-locked map lookup by a label set of `&'static str`s and numbers
//! (nothing allocated) plus a histogram's short mutex — so it sits on the
//! hot paths (every API and proxy request, every store commit). Values that
//! the daemon already keeps (machines per status, VMMs recorded) are read at
//! scrape time instead of being kept twice.
//!
//! Labels never carry ids or names: routes are the matched templates
//! (`/machines/{id}`), so the number of series stays bounded whatever the
//! clients send.

use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::{LazyLock, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::extract::MatchedPath;
use axum::http::{Method, Request, StatusCode};
use axum::response::Response;
use hyperfleet_api::{MachineStatus, VmmKind};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tower::{Layer, Service};

use crate::store::{read_lock, write_lock, EventRecord, Store, StoreError};

/// The `Content-Type` of [`render`]'s output (Prometheus text format 0.0.4).
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// Buckets (seconds) of the API's request latency: a cached `GET` takes
/// tens of microseconds, a waiting action up to its deadline.
const API_BUCKETS: [f64; 16] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
    30.0, 120.0,
];
/// Buckets (seconds) of machine steps: from a recorded decision (0) and a
/// signal to a guest boot under TCG or a large memory image saved.
const STEP_BUCKETS: [f64; 14] = [
    0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];
/// Buckets (seconds) of a store commit (one fsynced transaction).
const COMMIT_BUCKETS: [f64; 12] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 2.0,
];
/// Buckets of a commit's batch size (write closures per transaction; the
/// writer takes at most 1024).
const BATCH_BUCKETS: [f64; 11] = [
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0,
];

type HistogramFamily<S> = Family<S, Histogram, fn() -> Histogram>;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusLabels {
    status: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TransitionLabels {
    from: &'static str,
    to: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StepLabels {
    step: &'static str,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    method: &'static str,
    route: &'static str,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    method: &'static str,
    route: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CodeLabels {
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VmmLabels {
    vmm: &'static str,
}

/// Every metric, registered once in `registry`.
struct Metrics {
    registry: Registry,
    machines: Family<StatusLabels, Gauge>,
    vmm_processes: Family<VmmLabels, Gauge>,
    transitions: Family<TransitionLabels, Counter>,
    steps: HistogramFamily<StepLabels>,
    http_requests: Family<RequestLabels, Counter>,
    http_duration: HistogramFamily<RouteLabels>,
    proxy_requests: Family<CodeLabels, Counter>,
    proxy_received: Counter,
    proxy_sent: Counter,
    store_commit: Histogram,
    store_batch: Histogram,
    store_failed: Counter,
    storage_budget: Gauge,
    storage_stored: Family<KindLabels, Gauge>,
    evictions: Family<KindLabels, Counter>,
    /// Route templates seen, leaked once each so labels are `&'static str`
    /// (bounded: they come from the router's table, never from clients).
    routes: RwLock<HashSet<&'static str>>,
}

fn histograms<S: Clone + std::hash::Hash + Eq>(buckets: fn() -> Histogram) -> HistogramFamily<S> {
    Family::new_with_constructor(buckets)
}

impl Metrics {
    fn new() -> Metrics {
        let mut r = Registry::with_prefix("hyperfleet");
        let m = Metrics {
            machines: Family::default(),
            vmm_processes: Family::default(),
            transitions: Family::default(),
            steps: histograms(|| Histogram::new(STEP_BUCKETS)),
            http_requests: Family::default(),
            http_duration: histograms(|| Histogram::new(API_BUCKETS)),
            proxy_requests: Family::default(),
            proxy_received: Counter::default(),
            proxy_sent: Counter::default(),
            store_commit: Histogram::new(COMMIT_BUCKETS),
            store_batch: Histogram::new(BATCH_BUCKETS),
            store_failed: Counter::default(),
            storage_budget: Gauge::default(),
            storage_stored: Family::default(),
            evictions: Family::default(),
            routes: RwLock::new(HashSet::new()),
            registry: Registry::default(),
        };
        r.register(
            "machines",
            "Machines by observed status (every tenant)",
            m.machines.clone(),
        );
        r.register_with_unit(
            "storage_budget",
            "The storage budget (--storage-budget) that machines, memory images and snapshots \
             count against",
            Unit::Bytes,
            m.storage_budget.clone(),
        );
        r.register_with_unit(
            "storage_stored",
            "What the data directory holds, by kind (machines, memory_images, snapshots count \
             against the budget; images do not), as last measured",
            Unit::Bytes,
            m.storage_stored.clone(),
        );
        r.register(
            "storage_evictions",
            "What the storage evictor reclaimed since the daemon started, by kind",
            m.evictions.clone(),
        );
        r.register(
            "vmm_processes",
            "VMM processes the daemon holds (machines with a VMM recorded), by backend",
            m.vmm_processes.clone(),
        );
        r.register(
            "machine_transitions",
            "Committed status changes of machines, by old and new status",
            m.transitions.clone(),
        );
        r.register_with_unit(
            "step_duration",
            "Duration of the machine runs' steps, by step and outcome",
            Unit::Seconds,
            m.steps.clone(),
        );
        r.register(
            "http_requests",
            "API requests answered, by method, route template and status",
            m.http_requests.clone(),
        );
        r.register_with_unit(
            "http_request_duration",
            "API request latency until the response head, by method and route template",
            Unit::Seconds,
            m.http_duration.clone(),
        );
        r.register(
            "proxy_requests",
            "Requests through the reverse proxy, by the status answered",
            m.proxy_requests.clone(),
        );
        r.register_with_unit(
            "proxy_received",
            "Bytes read from proxy clients (requests, upgraded connections)",
            Unit::Bytes,
            m.proxy_received.clone(),
        );
        r.register_with_unit(
            "proxy_sent",
            "Bytes written to proxy clients (responses, upgraded connections)",
            Unit::Bytes,
            m.proxy_sent.clone(),
        );
        r.register_with_unit(
            "store_commit_duration",
            "Duration of a store write transaction, from its start to the fsynced commit",
            Unit::Seconds,
            m.store_commit.clone(),
        );
        r.register(
            "store_commit_batch_size",
            "Write requests (closures) per store transaction",
            m.store_batch.clone(),
        );
        r.register(
            "store_commit_failures",
            "Store transactions that failed to begin or commit",
            m.store_failed.clone(),
        );
        Metrics { registry: r, ..m }
    }

    /// `path` as a `&'static str`, interned.
    fn route(&self, path: &str) -> &'static str {
        if let Some(r) = read_lock(&self.routes).get(path) {
            return r;
        }
        let mut routes = write_lock(&self.routes);
        if let Some(r) = routes.get(path) {
            return r;
        }
        let leaked: &'static str = Box::leak(path.to_owned().into_boxed_str());
        routes.insert(leaked);
        leaked
    }
}

static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

/// The registry in the Prometheus text format, with the values read at
/// scrape time (machines per status, VMM processes) taken from `store`,
/// and the storage accounting's from `storage`.
pub fn render(
    store: &Store,
    storage: &crate::lifecycle::storage::Storage,
) -> Result<String, StoreError> {
    let m = &*METRICS;
    m.storage_budget.set(bytes_value(storage.budget()));
    let t = storage.totals();
    for (kind, n) in [
        ("machines", t.machines),
        ("memory_images", t.memory_images),
        ("snapshots", t.snapshots),
        ("images", t.images),
    ] {
        m.storage_stored
            .get_or_create(&KindLabels { kind })
            .set(bytes_value(n));
    }
    for (kind, n) in [
        ("memory_image", &storage.evicted_images),
        ("machine", &storage.evicted_machines),
    ] {
        // The evictor counts in its own atomics; the counter catches up.
        let c = m.evictions.get_or_create(&KindLabels { kind });
        let now = n.load(std::sync::atomic::Ordering::Relaxed);
        if now > c.get() {
            c.inc_by(now - c.get());
        }
    }
    let counts = store.status_counts();
    for status in MachineStatus::ALL {
        let n = counts.iter().find(|(s, _)| *s == status).map_or(0, |c| c.1);
        m.machines
            .get_or_create(&StatusLabels {
                status: status.as_str(),
            })
            .set(gauge_value(n));
    }
    let vmms = store.vmm_counts()?;
    for kind in [VmmKind::Qemu, VmmKind::Firecracker, VmmKind::Stub] {
        let n = vmms.iter().find(|(k, _)| *k == kind).map_or(0, |c| c.1);
        m.vmm_processes
            .get_or_create(&VmmLabels { vmm: kind.as_str() })
            .set(gauge_value(n));
    }
    let mut out = String::with_capacity(16 * 1024);
    // Writing into a String cannot fail; an Err here would be the encoder's
    // own bug, shown rather than hidden.
    if let Err(e) = prometheus_client::encoding::prometheus_text::encode(&mut out, &m.registry) {
        out.push_str(&format!("# encoding failed: {e}\n"));
    }
    Ok(out)
}

fn gauge_value(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

fn bytes_value(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// A committed event: counts the status changes (`transition` events).
/// The store's writer calls it once per event it publishes.
pub(crate) fn event_committed(ev: &EventRecord) {
    if ev.kind != "transition" {
        return;
    }
    if let (Some(from), Some(to)) = (ev.from_status, ev.to_status) {
        METRICS
            .transitions
            .get_or_create(&TransitionLabels {
                from: from.as_str(),
                to: to.as_str(),
            })
            .inc();
    }
}

/// A machine run's step finished (`outcome` `ok` or `failed`) after
/// `duration_ms`. The step protocol calls it where a step's timing is made.
pub(crate) fn step_done(step: &'static str, outcome: &'static str, duration_ms: f64) {
    METRICS
        .steps
        .get_or_create(&StepLabels { step, outcome })
        .observe(duration_ms / 1000.0);
}

/// A store write transaction of `jobs` write closures ended after
/// `elapsed`, committed or not.
pub(crate) fn store_commit(jobs: usize, elapsed: Duration, committed: bool) {
    let m = &*METRICS;
    if committed {
        m.store_commit.observe(elapsed.as_secs_f64());
        // Exact below 2^53: a batch is at most 1024.
        m.store_batch.observe(jobs as f64);
    } else {
        m.store_failed.inc();
    }
}

/// The proxy answered a request with `status`.
pub(crate) fn proxy_request(status: StatusCode) {
    METRICS
        .proxy_requests
        .get_or_create(&CodeLabels {
            status: status.as_u16(),
        })
        .inc();
}

/// The API layer: counts each request by method, route template and
/// status, and times it until its response head. Installed once on the
/// router (`Router::layer`, so it runs after routing and sees the matched
/// route). A plain tower layer rather than `middleware::from_fn`, which
/// boxes the inner service and the future of every request.
#[derive(Clone, Copy, Debug, Default)]
pub struct TrackApi;

impl<S> Layer<S> for TrackApi {
    type Service = TrackedApi<S>;
    fn layer(&self, inner: S) -> TrackedApi<S> {
        TrackedApi { inner }
    }
}

/// A route's service under [`TrackApi`].
#[derive(Clone, Debug)]
pub struct TrackedApi<S> {
    inner: S,
}

impl<S, B> Service<Request<B>> for TrackedApi<S>
where
    S: Service<Request<B>, Response = Response>,
{
    type Response = Response;
    type Error = S::Error;
    type Future = Tracked<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let t0 = Instant::now();
        let route = match req.extensions().get::<MatchedPath>() {
            // One label for `/api/v1/x` and `/x`: the same route.
            Some(p) => METRICS.route(p.as_str().strip_prefix("/api/v1").unwrap_or(p.as_str())),
            None => "unmatched",
        };
        let method = method_label(req.method());
        Tracked {
            inner: self.inner.call(req),
            t0,
            method,
            route,
        }
    }
}

pin_project_lite::pin_project! {
    /// The response future of a tracked request: records it once the
    /// response head is ready.
    pub struct Tracked<F> {
        #[pin]
        inner: F,
        t0: Instant,
        method: &'static str,
        route: &'static str,
    }
}

impl<F, E> Future for Tracked<F>
where
    F: Future<Output = Result<Response, E>>,
{
    type Output = Result<Response, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let out = std::task::ready!(this.inner.poll(cx));
        if let Ok(resp) = &out {
            let (method, route) = (*this.method, *this.route);
            let m = &*METRICS;
            m.http_requests
                .get_or_create(&RequestLabels {
                    method,
                    route,
                    status: resp.status().as_u16(),
                })
                .inc();
            m.http_duration
                .get_or_create(&RouteLabels { method, route })
                .observe(this.t0.elapsed().as_secs_f64());
        }
        Poll::Ready(out)
    }
}

fn method_label(m: &Method) -> &'static str {
    match *m {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::PATCH => "PATCH",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

/// A proxy client connection that counts the bytes read from and written
/// to it (including after an upgrade: hyper hands the same connection to
/// the WebSocket splice).
pub(crate) struct CountedIo<T> {
    inner: T,
    received: Counter,
    sent: Counter,
}

impl<T> CountedIo<T> {
    pub(crate) fn new(inner: T) -> Self {
        CountedIo {
            inner,
            received: METRICS.proxy_received.clone(),
            sent: METRICS.proxy_sent.clone(),
        }
    }
}

fn count(c: &Counter, n: usize) {
    if n > 0 {
        c.inc_by(u64::try_from(n).unwrap_or(u64::MAX));
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for CountedIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let res = Pin::new(&mut self.inner).poll_read(cx, buf);
        count(&self.received, buf.filled().len().saturating_sub(before));
        res
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for CountedIo<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let res = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = &res {
            count(&self.sent, *n);
        }
        res
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let res = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = &res {
            count(&self.sent, *n);
        }
        res
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_are_interned_once() {
        let a = METRICS.route("/machines/{id}");
        let b = METRICS.route(&String::from("/machines/{id}"));
        assert!(std::ptr::eq(a, b));
    }

    #[test]
    fn steps_and_transitions_show_in_the_text_format() {
        step_done("spawn_vmm", "ok", 12.0);
        let mut ev = EventRecord::new("m1", "transition");
        ev.from_status = Some(MachineStatus::Starting);
        ev.to_status = Some(MachineStatus::Running);
        event_committed(&ev);
        let mut out = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut out, &METRICS.registry).unwrap();
        assert!(out.contains(
            "hyperfleet_step_duration_seconds_bucket{step=\"spawn_vmm\",outcome=\"ok\",le=\"0.05\"}"
        ), "{out}");
        assert!(
            out.contains("hyperfleet_machine_transitions_total{from=\"starting\",to=\"running\"}"),
            "{out}"
        );
        // Metrics without labels show from the start; families once used.
        assert!(
            out.contains("\nhyperfleet_proxy_sent_bytes_total "),
            "{out}"
        );
        assert!(out.contains("# TYPE hyperfleet_store_commit_duration_seconds histogram"));
    }
}

//! The API's listener: accepts connections up to a cap, serves each with
//! hyper's HTTP/1.1 server (keep-alive, upgrades for the exec WebSocket)
//! under a header-read timeout and an idle timeout, and stops with the
//! daemon within a deadline.
//!
//! Why not `axum::serve`: it keeps a connection that never sends a byte
//! forever and accepts without bound, so a flood of idle connections used
//! up the file descriptors the machine runs need, left thousands of
//! sockets in CLOSE-WAIT and made the daemon deaf to `/health` and SIGTERM
//! (issue 13). Here every connection holds a slot of a semaphore sized well
//! below the fd limit; at the cap a new client makes room by closing the
//! connection idle longest (when every connection is busy, it waits and
//! later clients wait in the kernel's backlog), and the timeouts make sure
//! slots free up without new clients too.

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Router;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;
use tower::ServiceExt;

/// How the API listener bounds its connections (`--api-*` flags).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ApiLimits {
    /// A request's headers must arrive within this long once the server
    /// waits for them: on a new connection and between keep-alive requests.
    pub header_timeout: Duration,
    /// A connection with no request in progress (handled, or its response
    /// being sent) and no byte moving for this long is closed, and so is one
    /// whose peer has not read what it was sent for this long.
    pub idle_timeout: Duration,
    /// Connections served at once; at the cap a new client makes room by
    /// closing the connection idle longest.
    pub max_connections: usize,
}

impl Default for ApiLimits {
    fn default() -> Self {
        ApiLimits {
            header_timeout: Duration::from_secs(15),
            idle_timeout: Duration::from_secs(60),
            max_connections: 4096,
        }
    }
}

/// The connection cap the daemon uses: the configured one, but never more
/// than a quarter of the file-descriptor limit, so VMM sockets, pidfds,
/// logs and SQLite always have room (at least 16, for tiny limits).
pub fn connection_cap(configured: usize, fd_limit: u64) -> usize {
    let budget = usize::try_from(fd_limit / 4).unwrap_or(usize::MAX).max(16);
    configured.clamp(1, budget)
}

/// The running API server.
pub struct ApiServer {
    addr: SocketAddr,
    stop: watch::Sender<bool>,
    accept: JoinHandle<()>,
}

impl ApiServer {
    /// Serves `app` on `listener` until [`ApiServer::shutdown`].
    pub fn spawn(listener: TcpListener, app: Router, limits: ApiLimits) -> io::Result<ApiServer> {
        let addr = listener.local_addr()?;
        let (stop, stopped) = watch::channel(false);
        let accept = tokio::spawn(accept_loop(listener, app, limits, stopped));
        Ok(ApiServer { addr, stop, accept })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting, asks every connection to finish its in-flight
    /// request, and returns once all have closed. Callers bound it with a
    /// deadline: long-polls may hold a connection for minutes.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let _ = self.accept.await;
        // Every connection task holds a receiver; closed() resolves when the
        // last one is gone.
        self.stop.closed().await;
    }
}

/// Accept errors that concern one connection only (it went away before we
/// took it): take the next one at once.
fn per_connection(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionRefused
            | io::ErrorKind::Interrupted
    )
}

/// Warns at most once per this long about the same condition, so a flood
/// does not turn into a flood of log lines.
const WARN_EVERY: Duration = Duration::from_secs(10);
/// The pause after an accept error such as EMFILE: long enough not to spin,
/// short enough that service resumes as soon as descriptors free up.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

async fn accept_loop(
    listener: TcpListener,
    app: Router,
    limits: ApiLimits,
    mut stopped: watch::Receiver<bool>,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let live = Arc::new(Live::default());
    let mut warn = crate::util::AtMostEvery::new(WARN_EVERY);
    loop {
        let accepted = tokio::select! {
            _ = stopped.changed() => break,
            a = listener.accept() => a,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) if per_connection(&e) => continue,
            Err(e) => {
                // Out of file descriptors (EMFILE/ENFILE) or memory: the
                // listener itself is fine; wait for resources to free up
                // instead of spinning, but stay responsive to shutdown.
                if warn.due() {
                    tracing::warn!(error = %e, "API: accepting a connection failed; backing off");
                }
                tokio::select! {
                    _ = stopped.changed() => break,
                    _ = tokio::time::sleep(ACCEPT_BACKOFF) => {}
                }
                continue;
            }
        };
        let slot = match slots.clone().try_acquire_owned() {
            Ok(slot) => slot,
            Err(_) => {
                // At the cap, a client is waiting: make room by closing
                // the connection idle longest (a flood's silent sockets go
                // first, so /health still gets in). With every connection
                // busy, it waits for one to finish; more clients wait in
                // the backlog meanwhile.
                let evicted = live.evict_idlest();
                if warn.due() {
                    tracing::warn!(
                        max_connections = limits.max_connections,
                        evicted,
                        "API: at the connection cap; closing idle connections to make room"
                    );
                }
                tokio::select! {
                    _ = stopped.changed() => break,
                    slot = slots.clone().acquire_owned() => match slot {
                        Ok(slot) => slot,
                        // Never closed while this loop holds it.
                        Err(_) => break,
                    },
                }
            }
        };
        tokio::spawn(serve_connection(
            stream,
            peer,
            slot,
            live.clone(),
            app.clone(),
            limits,
            stopped.clone(),
        ));
    }
}

/// The connections being served, for eviction at the cap.
#[derive(Default)]
struct Live {
    next: AtomicU64,
    conns: std::sync::Mutex<std::collections::HashMap<u64, Arc<Activity>>>,
}

impl Live {
    fn conns(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<u64, Arc<Activity>>> {
        // A panic while holding it leaves a map that is still right.
        self.conns.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn add(self: &Arc<Self>, a: Arc<Activity>) -> Registered {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        self.conns().insert(id, a);
        Registered {
            live: self.clone(),
            id,
        }
    }

    /// Asks the connection idle longest (no handler running) to close, and
    /// forgets it so the next eviction picks another. Whether there was one.
    fn evict_idlest(&self) -> bool {
        let mut conns = self.conns();
        let idlest = conns
            .iter()
            .filter_map(|(id, a)| a.idle_for().map(|d| (d, *id)))
            .max();
        match idlest.and_then(|(_, id)| conns.remove(&id)) {
            Some(a) => {
                a.evict.notify_one();
                true
            }
            None => false,
        }
    }
}

/// Removes a connection from [`Live`] when its task ends.
struct Registered {
    live: Arc<Live>,
    id: u64,
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.live.conns().remove(&self.id);
    }
}

/// When a connection last moved a byte and how many requests it is
/// handling, for the idle timeout.
struct Activity {
    start: Instant,
    last_ms: AtomicU64,
    /// Requests whose handler runs or whose response body is still being
    /// sent (a quiet event or log stream is not idle).
    busy: AtomicUsize,
    /// When a write first found the socket full (ms since `start`, plus
    /// one; 0: not blocked): the peer stopped reading.
    blocked_ms: AtomicU64,
    /// Signalled to close the connection to make room at the cap.
    evict: tokio::sync::Notify,
}

impl Activity {
    fn new() -> Self {
        Activity {
            start: Instant::now(),
            last_ms: AtomicU64::new(0),
            busy: AtomicUsize::new(0),
            blocked_ms: AtomicU64::new(0),
            evict: tokio::sync::Notify::new(),
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn touch(&self) {
        self.last_ms.store(self.now_ms(), Ordering::Relaxed);
    }

    fn wrote(&self) {
        self.blocked_ms.store(0, Ordering::Relaxed);
        self.touch();
    }

    fn write_blocked(&self) {
        let now = self.now_ms().saturating_add(1);
        let _ = self
            .blocked_ms
            .compare_exchange(0, now, Ordering::Relaxed, Ordering::Relaxed);
    }

    /// How long the connection has been idle; `None` while a request is
    /// handled or its response sent (a long-poll or a quiet stream
    /// legitimately sends nothing for minutes).
    fn idle_for(&self) -> Option<Duration> {
        if self.busy.load(Ordering::Relaxed) > 0 {
            return None;
        }
        let last = Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
        Some(self.start.elapsed().saturating_sub(last))
    }

    /// How long a write has been waiting for the peer to read, if one is.
    fn stalled_for(&self) -> Option<Duration> {
        match self.blocked_ms.load(Ordering::Relaxed) {
            0 => None,
            since => Some(
                self.start
                    .elapsed()
                    .saturating_sub(Duration::from_millis(since - 1)),
            ),
        }
    }

    /// Whether the idle timeout ends the connection: nothing handled and
    /// nothing moving, or a peer that stopped reading what is sent.
    fn expired(&self, timeout: Duration) -> bool {
        self.idle_for().is_some_and(|d| d >= timeout)
            || self.stalled_for().is_some_and(|d| d >= timeout)
    }
}

/// Counts a request as in progress until dropped: when its response body
/// ended, or the handler's future was cancelled.
struct Busy(Arc<Activity>);

impl Busy {
    fn new(a: &Arc<Activity>) -> Self {
        a.busy.fetch_add(1, Ordering::Relaxed);
        Busy(a.clone())
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.busy.fetch_sub(1, Ordering::Relaxed);
        self.0.touch();
    }
}

/// A response body that keeps its request counted as busy until the last
/// frame is sent (or the body is dropped).
struct Tracked {
    inner: axum::body::Body,
    busy: Option<Busy>,
}

impl hyper::body::Body for Tracked {
    type Data = axum::body::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_frame(cx);
        if matches!(r, Poll::Ready(None) | Poll::Ready(Some(Err(_)))) {
            this.busy = None;
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// The socket, noting every byte that moves. It also holds the
/// connection's slot, so a connection upgraded to a WebSocket keeps
/// counting against the cap until its socket closes.
struct Watched {
    inner: TcpStream,
    activity: Arc<Activity>,
    _slot: OwnedSemaphorePermit,
}

impl Watched {
    fn note_write(&self, r: &Poll<io::Result<usize>>) {
        match r {
            Poll::Ready(Ok(n)) if *n > 0 => self.activity.wrote(),
            Poll::Pending => self.activity.write_blocked(),
            Poll::Ready(_) => {}
        }
    }
}

impl AsyncRead for Watched {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            this.activity.touch();
        }
        r
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write(cx, buf);
        this.note_write(&r);
        r
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        this.note_write(&r);
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

async fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    slot: OwnedSemaphorePermit,
    live: Arc<Live>,
    app: Router,
    limits: ApiLimits,
    mut stopped: watch::Receiver<bool>,
) {
    // Responses are written whole or streamed; Nagle would only delay them.
    let _ = stream.set_nodelay(true);
    let activity = Arc::new(Activity::new());
    let _registered = live.add(activity.clone());
    let io = Watched {
        inner: stream,
        activity: activity.clone(),
        _slot: slot,
    };
    let requests = activity.clone();
    let service = service_fn(move |req: hyper::Request<Incoming>| {
        let busy = Busy::new(&requests);
        let app = app.clone();
        async move {
            let resp = match app.oneshot(req).await {
                Ok(r) => r,
                Err(never) => match never {},
            };
            Ok::<_, Infallible>(resp.map(|inner| Tracked {
                inner,
                busy: Some(busy),
            }))
        }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .serve_connection(TokioIo::new(io), service)
        .with_upgrades();
    tokio::pin!(conn);
    let mut check = tokio::time::interval((limits.idle_timeout / 4).max(Duration::from_millis(50)));
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let result = loop {
        tokio::select! {
            r = conn.as_mut() => break r,
            _ = stopped.changed() => {
                conn.as_mut().graceful_shutdown();
                break conn.await;
            }
            _ = activity.evict.notified() => {
                // Idle when picked; a request that began since is cut, as
                // a reset connection would, and its client retries.
                tracing::debug!(%peer, "API: closing an idle connection to make room");
                break Ok(());
            }
            _ = check.tick() => {
                if activity.expired(limits.idle_timeout) {
                    tracing::debug!(%peer, "API: closing an idle connection");
                    break Ok(());
                }
            }
        }
    };
    if let Err(e) = result {
        tracing::debug!(%peer, error = %e, "API: a client connection ended with an error");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cap_leaves_three_quarters_of_the_fds_to_the_machines() {
        assert_eq!(connection_cap(4096, 1_048_576), 4096);
        assert_eq!(connection_cap(4096, 8192), 2048);
        assert_eq!(connection_cap(4096, 1024), 256);
        assert_eq!(connection_cap(4096, 20), 16);
        assert_eq!(connection_cap(0, 1024), 1);
    }

    #[test]
    fn eviction_picks_the_connection_idle_longest_and_never_a_busy_one() {
        use std::future::Future;
        let live = Arc::new(Live::default());
        let old = Arc::new(Activity::new());
        std::thread::sleep(Duration::from_millis(30));
        let busy_and_older = Arc::new(Activity::new());
        let _b = Busy::new(&busy_and_older);
        let young = Arc::new(Activity::new());
        young.touch();
        let r1 = live.add(old.clone());
        let _r2 = live.add(busy_and_older.clone());
        let _r3 = live.add(young.clone());
        assert!(live.evict_idlest());
        // The old one was told (a stored permit: notified() is ready).
        let waker = futures_util::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        assert!(std::pin::pin!(old.evict.notified())
            .poll(&mut cx)
            .is_ready());
        assert!(live.evict_idlest());
        assert!(std::pin::pin!(young.evict.notified())
            .poll(&mut cx)
            .is_ready());
        // Only the busy one is left: nothing to evict.
        assert!(!live.evict_idlest());
        drop(r1);
        assert_eq!(live.conns().len(), 1);
    }

    #[test]
    fn a_peer_that_stops_reading_expires_even_mid_response() {
        let a = Arc::new(Activity::new());
        let _busy = Busy::new(&a);
        assert!(!a.expired(Duration::ZERO), "busy and not blocked");
        a.write_blocked();
        std::thread::sleep(Duration::from_millis(20));
        a.write_blocked();
        assert!(a.stalled_for().unwrap() >= Duration::from_millis(20));
        assert!(a.expired(Duration::from_millis(20)));
        a.wrote();
        assert_eq!(a.stalled_for(), None);
        assert!(!a.expired(Duration::ZERO));
    }

    #[test]
    fn a_busy_connection_is_never_idle() {
        let a = Arc::new(Activity::new());
        std::thread::sleep(Duration::from_millis(20));
        assert!(a.idle_for().unwrap() >= Duration::from_millis(20));
        let busy = Busy::new(&a);
        assert_eq!(a.idle_for(), None);
        drop(busy);
        assert!(a.idle_for().unwrap() < Duration::from_millis(20));
    }
}

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
//! below the fd limit; at the cap the loop stops accepting (new clients wait
//! in the kernel's backlog) until a slot frees, and the timeouts make sure
//! slots do free.

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
    /// A connection with no request being handled and no byte moving either
    /// way for this long is closed (dead peers, clients that stopped reading
    /// a response or an event stream).
    pub idle_timeout: Duration,
    /// Connections served at once; more wait in the listen backlog.
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
    let mut last_warn: Option<Instant> = None;
    let mut should_warn = move || {
        let now = Instant::now();
        let due = last_warn.is_none_or(|t| now.duration_since(t) >= WARN_EVERY);
        if due {
            last_warn = Some(now);
        }
        due
    };
    loop {
        if slots.available_permits() == 0 && should_warn() {
            tracing::warn!(
                max_connections = limits.max_connections,
                "API: at the connection cap; new connections wait until one closes"
            );
        }
        let permit = tokio::select! {
            _ = stopped.changed() => break,
            p = slots.clone().acquire_owned() => match p {
                Ok(p) => p,
                // Never closed while this loop holds it.
                Err(_) => break,
            },
        };
        let accepted = tokio::select! {
            _ = stopped.changed() => break,
            a = listener.accept() => a,
        };
        match accepted {
            Ok((stream, peer)) => {
                tokio::spawn(serve_connection(
                    stream,
                    peer,
                    permit,
                    app.clone(),
                    limits,
                    stopped.clone(),
                ));
            }
            Err(e) if per_connection(&e) => {}
            Err(e) => {
                // Out of file descriptors (EMFILE/ENFILE) or memory: the
                // listener itself is fine; wait for resources to free up
                // instead of spinning, but stay responsive to shutdown.
                if should_warn() {
                    tracing::warn!(error = %e, "API: accepting a connection failed; backing off");
                }
                tokio::select! {
                    _ = stopped.changed() => break,
                    _ = tokio::time::sleep(ACCEPT_BACKOFF) => {}
                }
            }
        }
    }
}

/// When a connection last moved a byte and how many requests it is
/// handling, for the idle timeout.
struct Activity {
    start: Instant,
    last_ms: AtomicU64,
    busy: AtomicUsize,
}

impl Activity {
    fn new() -> Self {
        Activity {
            start: Instant::now(),
            last_ms: AtomicU64::new(0),
            busy: AtomicUsize::new(0),
        }
    }

    fn touch(&self) {
        let ms = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    /// How long the connection has been idle; `None` while a handler runs
    /// (a long-poll legitimately sends nothing for minutes).
    fn idle_for(&self) -> Option<Duration> {
        if self.busy.load(Ordering::Relaxed) > 0 {
            return None;
        }
        let last = Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
        Some(self.start.elapsed().saturating_sub(last))
    }
}

/// Counts a request as in progress until dropped (also when the handler's
/// future is cancelled).
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

/// The socket, noting every byte that moves. It also holds the
/// connection's slot, so a connection upgraded to a WebSocket keeps
/// counting against the cap until its socket closes.
struct Watched {
    inner: TcpStream,
    activity: Arc<Activity>,
    _slot: OwnedSemaphorePermit,
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
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            this.activity.touch();
        }
        r
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            this.activity.touch();
        }
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
    app: Router,
    limits: ApiLimits,
    mut stopped: watch::Receiver<bool>,
) {
    // Responses are written whole or streamed; Nagle would only delay them.
    let _ = stream.set_nodelay(true);
    let activity = Arc::new(Activity::new());
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
            let resp = app.oneshot(req).await;
            drop(busy);
            Ok::<_, Infallible>(match resp {
                Ok(r) => r,
                Err(never) => match never {},
            })
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
            _ = check.tick() => {
                if activity.idle_for().is_some_and(|d| d >= limits.idle_timeout) {
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

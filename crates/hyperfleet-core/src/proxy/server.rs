//! The proxy's listener: accepts connections, serves each with hyper's
//! HTTP/1.1 server (keep-alive, upgrades), prunes the activity table, and
//! shuts down gracefully with the daemon.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;

use super::activity::Activity;
use super::Proxy;
use crate::util::AtMostEvery;

/// A client must send a request's headers within this long (slow-loris
/// protection); it also bounds how long an idle keep-alive connection stays.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// How often activity entries of deleted machines are dropped.
const PRUNE_EVERY: Duration = Duration::from_secs(60);
/// At most one warning about the same condition (the connection cap,
/// failing accepts) per this long.
const WARN_EVERY: Duration = Duration::from_secs(10);

/// The most client connections the proxy serves at once for a process
/// allowed `fd_limit` open files: half of them, as each proxied connection
/// also holds one to the guest (the API keeps a quarter, the rest is the
/// machines' and the store's), and at least 16.
pub fn connection_cap(fd_limit: u64) -> usize {
    usize::try_from(fd_limit / 4).unwrap_or(usize::MAX).max(16)
}

/// A client connection's place under the connection cap, shared by the
/// connection and, once it is upgraded, by its splice to the guest: an
/// upgraded connection counts until the tunnel closes. It reaches the
/// handler as a request extension.
#[derive(Clone)]
pub(crate) struct ConnSlot(
    // Held for its drop, which gives the place back; never read.
    #[allow(dead_code)] Arc<OwnedSemaphorePermit>,
);

/// The running proxy.
pub struct ProxyServer {
    addr: SocketAddr,
    proxy: Arc<Proxy>,
    stop: watch::Sender<bool>,
    accept: JoinHandle<()>,
}

impl ProxyServer {
    /// Serves `proxy` on `listener` until [`ProxyServer::shutdown`], at
    /// most `max_connections` client connections at a time: past that, new
    /// clients wait in the listen backlog until one closes (a flood of
    /// silent connections lasts at most the header timeout each), so the
    /// proxy cannot take the descriptors the machines need.
    pub(crate) fn spawn(
        listener: TcpListener,
        proxy: Arc<Proxy>,
        max_connections: usize,
    ) -> std::io::Result<ProxyServer> {
        let addr = listener.local_addr()?;
        let (stop, stopped) = watch::channel(false);
        let accept = tokio::spawn(accept_loop(
            listener,
            proxy.clone(),
            max_connections.max(1),
            stopped,
        ));
        Ok(ProxyServer {
            addr,
            proxy,
            stop,
            accept,
        })
    }

    pub(crate) fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Last proxied activity per machine.
    pub fn activity(&self) -> &Activity {
        self.proxy.activity()
    }

    /// Stops accepting, lets each connection finish its in-flight request,
    /// and returns once every connection has closed. Upgraded (WebSocket)
    /// connections are not waited for; they end with the process.
    pub(crate) async fn shutdown(self) {
        let _ = self.stop.send(true);
        let _ = self.accept.await;
        // Every connection task holds a receiver; closed() resolves when the
        // last one is gone.
        self.stop.closed().await;
    }
}

async fn accept_loop(
    listener: TcpListener,
    proxy: Arc<Proxy>,
    max_connections: usize,
    mut stopped: watch::Receiver<bool>,
) {
    let slots = Arc::new(Semaphore::new(max_connections));
    let mut prune = tokio::time::interval(PRUNE_EVERY);
    let mut cap_warn = AtMostEvery::new(WARN_EVERY);
    let mut accept_warn = AtMostEvery::new(WARN_EVERY);
    loop {
        // A slot first: at the cap, nothing more is accepted until a
        // connection ends.
        let slot = match slots.clone().try_acquire_owned() {
            Ok(slot) => slot,
            Err(_) => {
                if cap_warn.due() {
                    tracing::warn!(
                        max_connections,
                        "proxy: at the connection cap; new clients wait until a connection closes"
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
        tokio::select! {
            _ = stopped.changed() => break,
            _ = prune.tick() => {
                let store = &proxy.store;
                // A read error keeps the entry: only a deletion drops it.
                proxy.activity.retain(|id| store.get_by_id(id).map_or(true, |m| m.is_some()));
            }
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    tokio::spawn(serve_connection(stream, peer, proxy.clone(), slot, stopped.clone()));
                }
                Err(e) => {
                    // Out of file descriptors and the like: back off instead
                    // of spinning; the listener itself stays good.
                    if accept_warn.due() {
                        tracing::warn!(error = %e, "proxy: accepting a connection failed; backing off");
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }
}

async fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    proxy: Arc<Proxy>,
    // Held while hyper serves the connection, and by an upgraded
    // connection's splice for as long as the tunnel lasts.
    slot: OwnedSemaphorePermit,
    mut stopped: watch::Receiver<bool>,
) {
    // Responses are written whole or streamed; Nagle would only delay them.
    let _ = stream.set_nodelay(true);
    let slot = ConnSlot(Arc::new(slot));
    let service = service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
        let proxy = proxy.clone();
        req.extensions_mut().insert(slot.clone());
        async move { Ok::<_, Infallible>(proxy.handle(req, peer).await) }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .serve_connection(
            TokioIo::new(crate::metrics::CountedIo::new(stream)),
            service,
        )
        .with_upgrades();
    tokio::pin!(conn);
    let result = tokio::select! {
        r = conn.as_mut() => r,
        _ = stopped.changed() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = result {
        tracing::debug!(%peer, error = %e, "proxy: a client connection ended with an error");
    }
}

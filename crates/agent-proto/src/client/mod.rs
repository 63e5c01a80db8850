//! The host-side async client: one connection to one agent, many concurrent operations.
//!
//! This module owns the host end of a session: the handshake (with resync) and the
//! connection's shared state. The rest is split by concern:
//!
//! - [`ops`]: the operations callers use (exec, files, stat, power…);
//! - `flow`: one stream's handle and per-stream flow control in both directions;
//! - [`handles`]: what long operations hand back ([`ExecHandle`], [`ExecStdin`],
//!   [`FileReader`]);
//! - `tasks`: the background reader that demultiplexes frames to streams and the writer
//!   that serialises outgoing frames.
//!
//! Memory stays bounded without relying on the caller: the agent may only send as many data
//! bytes on a stream as the client granted (initially [`INITIAL_WINDOW`]), and the client only
//! grants more when the caller takes a chunk out of the handle. Uploads wait for the agent's
//! grants the same way. Dropping a handle before its operation finished sends `Cancel`.

mod flow;
pub mod handles;
pub mod ops;
mod tasks;

use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio::task::JoinHandle;

use crate::error::Error;
use crate::frame::{Frame, Kind, FLUSH_LEN, INITIAL_WINDOW};
use crate::messages::*;
use crate::writer::Outgoing;
use flow::StreamHandle;
pub use handles::{ExecHandle, ExecStdin, FileReader};
pub use ops::{ExecOutput, OutputSink};

/// How [`AgentClient::connect_with`] performs the handshake.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// Give up when no matching `HelloReply` arrived within this time. A guest that is still
    /// booting answers once its agent is up, so callers waiting for boot pass a long timeout.
    pub handshake_timeout: Duration,
    /// Resend the hello this often while waiting (the first resend is preceded by a flush that
    /// completes any half frame the agent may be stuck in).
    pub retry_interval: Duration,
    /// Identification sent in the hello, for the agent's log.
    pub client_name: String,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        ConnectOptions {
            handshake_timeout: Duration::from_secs(10),
            retry_interval: Duration::from_millis(500),
            client_name: format!("hyperfleet-host/{}", env!("CARGO_PKG_VERSION")),
        }
    }
}

/// A byte range of a file for [`AgentClient::read_file`] (HTTP `Range` maps onto it).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ByteRange {
    pub offset: u64,
    /// At most this many bytes; to the end of the file when `None`.
    pub length: Option<u64>,
}

/// One piece of a running process's life.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecEvent {
    Stdout(Bytes),
    Stderr(Bytes),
    Exit(ExecStatus),
}

/// Connection to one agent. Cheap to clone; the connection closes when the last clone and the
/// last handle created from it are dropped.
#[derive(Clone)]
pub struct AgentClient {
    conn: Arc<Conn>,
}

struct Conn {
    shared: Arc<Shared>,
    tasks: Vec<JoinHandle<()>>,
    reply: HelloReply,
    protocol_version: u32,
}

impl Drop for Conn {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// What the reader routes to one stream.
enum Inbound {
    Event(Event),
    Data(Kind, Bytes),
    Response(Response),
    Closed,
}

/// The reader's view of one open stream.
struct StreamEntry {
    tx: mpsc::UnboundedSender<Inbound>,
    /// Credit the agent granted us for host → agent data.
    send_credit: Arc<Semaphore>,
    /// Bytes the agent may still send us before we grant more.
    recv_budget: Arc<AtomicI64>,
}

/// What the handles and the background tasks of one connection share.
struct Shared {
    out: mpsc::UnboundedSender<Outgoing>,
    streams: Mutex<HashMap<u32, StreamEntry>>,
    next_id: AtomicU32,
    closed: AtomicBool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, HashMap<u32, StreamEntry>> {
        // A panic while holding this lock cannot leave the map inconsistent (every critical
        // section is a single insert/remove/lookup), so a poisoned lock is still usable.
        self.streams.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn send(&self, f: Frame) -> Result<(), Error> {
        self.out.send(Outgoing::Frame(f)).map_err(|_| Error::Closed)
    }

    fn send_json<T: serde::Serialize>(&self, kind: Kind, stream: u32, v: &T) -> Result<(), Error> {
        let payload = serde_json::to_vec(v)
            .map_err(|e| Error::InvalidRequest(format!("cannot encode message: {e}")))?;
        self.send(Frame::new(kind, stream, payload))
    }

    fn close_all(&self) {
        let mut map = self.lock();
        self.closed.store(true, Ordering::SeqCst);
        for (_, e) in map.drain() {
            e.send_credit.close();
            let _ = e.tx.send(Inbound::Closed);
        }
    }
}

fn random_nonce() -> u64 {
    // RandomState is seeded from the OS; good enough to tell our hello reply from stale ones.
    let mut h = RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.finish()
}

impl AgentClient {
    /// Performs the handshake over `stream` with default options and starts the background
    /// tasks (which need a running tokio runtime).
    pub async fn connect<S>(stream: S) -> Result<AgentClient, Error>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        AgentClient::connect_with(stream, ConnectOptions::default()).await
    }

    /// Performs the handshake over `stream`: sends `SYNC`+`Hello`, discards everything until
    /// the matching `HelloReply`, resends (after a one-time flush) every `retry_interval`.
    pub async fn connect_with<S>(stream: S, opts: ConnectOptions) -> Result<AgentClient, Error>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (rd, wr) = tokio::io::split(stream);
        let (out_tx, out_rx) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            out: out_tx,
            streams: Mutex::new(HashMap::new()),
            next_id: AtomicU32::new(1),
            closed: AtomicBool::new(false),
        });
        let nonce = random_nonce();
        let (hs_tx, mut hs_rx) = oneshot::channel();
        let writer = tokio::spawn(tasks::writer_loop(wr, out_rx));
        let reader = tokio::spawn(tasks::reader_loop(rd, shared.clone(), Some((nonce, hs_tx))));
        let mut conn = Conn {
            shared: shared.clone(),
            tasks: vec![writer, reader],
            reply: HelloReply {
                nonce,
                protocol_version: None,
                error: None,
                agent: AgentInfo {
                    agent_version: String::new(),
                    min_protocol_version: 0,
                    max_protocol_version: 0,
                    kernel_release: String::new(),
                    kernel_version: String::new(),
                    machine: String::new(),
                    hostname: String::new(),
                    uptime_ms: 0,
                    pid1: false,
                    boot_id: None,
                },
            },
            protocol_version: 0,
        };
        let hello = Hello {
            protocol_version: PROTOCOL_VERSION,
            min_protocol_version: MIN_PROTOCOL_VERSION,
            nonce,
            client: opts.client_name.clone(),
        };
        let deadline = tokio::time::Instant::now() + opts.handshake_timeout;
        let mut attempt = 0u32;
        let reply = loop {
            if attempt == 1 {
                shared
                    .out
                    .send(Outgoing::Raw(Bytes::from(vec![0u8; FLUSH_LEN])))
                    .map_err(|_| Error::Closed)?;
            }
            shared.send_json(Kind::Hello, 0, &hello)?;
            attempt += 1;
            let next = (tokio::time::Instant::now() + opts.retry_interval).min(deadline);
            tokio::select! {
                r = &mut hs_rx => break r.map_err(|_| Error::Closed)??,
                _ = tokio::time::sleep_until(next) => {
                    if tokio::time::Instant::now() >= deadline {
                        return Err(Error::HandshakeTimeout(opts.handshake_timeout));
                    }
                }
            }
        };
        match reply.protocol_version {
            Some(v) if (MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION).contains(&v) => {
                conn.protocol_version = v;
            }
            _ => {
                return Err(Error::VersionMismatch {
                    agent_min: reply.agent.min_protocol_version,
                    agent_max: reply.agent.max_protocol_version,
                    client_min: MIN_PROTOCOL_VERSION,
                    client_max: PROTOCOL_VERSION,
                })
            }
        }
        conn.reply = reply;
        Ok(AgentClient {
            conn: Arc::new(conn),
        })
    }

    /// What the agent said about itself in its hello reply.
    pub fn agent_info(&self) -> &AgentInfo {
        &self.conn.reply.agent
    }

    /// The negotiated protocol version.
    pub fn protocol_version(&self) -> u32 {
        self.conn.protocol_version
    }

    /// Whether the connection has ended (every further call fails with [`Error::Closed`]).
    pub fn is_closed(&self) -> bool {
        self.conn.shared.closed.load(Ordering::SeqCst)
    }

    fn open(&self, req: &Request) -> Result<StreamHandle, Error> {
        let shared = &self.conn.shared;
        let (tx, rx) = mpsc::unbounded_channel();
        let send_credit = Arc::new(Semaphore::new(INITIAL_WINDOW as usize));
        let recv_budget = Arc::new(AtomicI64::new(i64::from(INITIAL_WINDOW)));
        let id = {
            let mut map = shared.lock();
            if shared.closed.load(Ordering::SeqCst) {
                return Err(Error::Closed);
            }
            let mut id = shared.next_id.fetch_add(1, Ordering::Relaxed);
            while id == 0 || map.contains_key(&id) {
                id = shared.next_id.fetch_add(1, Ordering::Relaxed);
            }
            map.insert(
                id,
                StreamEntry {
                    tx,
                    send_credit: send_credit.clone(),
                    recv_budget: recv_budget.clone(),
                },
            );
            id
        };
        let handle = StreamHandle {
            conn: self.conn.clone(),
            id,
            rx,
            send_credit,
            recv_budget,
            done: false,
        };
        shared.send_json(Kind::Request, id, req)?;
        Ok(handle)
    }

    /// Runs a request that has no data phase; `on_event` sees intermediate events.
    async fn call(&self, req: &Request, mut on_event: impl FnMut(Event)) -> Result<Reply, Error> {
        let mut s = self.open(req)?;
        loop {
            match s.recv().await {
                Inbound::Event(e) => on_event(e),
                Inbound::Data(..) => {
                    return Err(Error::Protocol(
                        "unexpected data on a control stream".into(),
                    ))
                }
                Inbound::Response(Response::Ok(r)) => return Ok(r),
                Inbound::Response(Response::Error(e)) => return Err(Error::from_remote(e)),
                Inbound::Closed => return Err(Error::Closed),
            }
        }
    }
}

fn unexpected(r: &Reply) -> Error {
    Error::Protocol(format!("unexpected reply {r:?}"))
}

fn early_end(inb: Inbound) -> Error {
    match inb {
        Inbound::Response(Response::Error(e)) => Error::from_remote(e),
        Inbound::Response(Response::Ok(r)) => unexpected(&r),
        Inbound::Closed => Error::Closed,
        Inbound::Event(e) => Error::Protocol(format!("unexpected event {e:?}")),
        Inbound::Data(k, _) => Error::Protocol(format!("unexpected {k:?} frame")),
    }
}

#[cfg(test)]
mod tests;

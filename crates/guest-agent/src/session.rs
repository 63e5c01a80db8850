//! The agent end of one protocol session over one byte stream.
//!
//! This module owns framing on the agent side: reading and resynchronising the byte stream,
//! the hello/version handshake, the table of live operations (one per stream id), routing of
//! data/credit/cancel frames to them, and the single writer task that serialises their frames
//! (through the frame writer shared with the host client, `agent_proto::writer`).
//!
//! A stream can outlive a host connection (a virtio-serial port), so a new `Hello` on the same
//! stream restarts the session in place: every operation of the previous session is cancelled
//! and their late frames are dropped by the writer (each frame carries the session epoch it was
//! produced in). Bytes that do not decode are skipped until the next sync marker.

use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::{Bytes, BytesMut};
use hyperfleet_agent_proto::writer::{write_queue, Outgoing};
use hyperfleet_agent_proto::{
    ErrorCode, Frame, FrameDecoder, Hello, HelloReply, Kind, PowerAction, RemoteError, Request,
    Response, INITIAL_WINDOW, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::sync::{mpsc, watch, Semaphore};

use crate::reaper::Reaper;
use crate::{debug, info, warn};

/// Upper bound on the credit a host may hand out for one stream; more is a protocol error
/// (and would overflow the semaphore).
const MAX_CREDIT: usize = 1 << 30;

/// What sessions share: the process reaper, the power-request channel to `main`, the running
/// exec operations of every session, the lock that runs refreshes one at a time, and the
/// machine's main process.
pub(crate) struct Services {
    pub reaper: Arc<Reaper>,
    pub power: mpsc::UnboundedSender<PowerAction>,
    pub pid1: bool,
    pub execs: Arc<crate::ops::exec::ExecTable>,
    pub refresh_lock: tokio::sync::Mutex<()>,
    pub main: crate::ops::main_process::MainSlot,
}

/// Why a session ended.
#[derive(Debug)]
pub(crate) enum End {
    /// The peer closed the stream.
    Eof,
    /// Reading or writing failed.
    Io(io::Error),
}

/// How a stream was served.
#[derive(Debug)]
pub(crate) struct Served {
    pub end: End,
    /// Whether a host said hello on it (a serial port reopened while no host is connected
    /// ends immediately, without one).
    pub greeted: bool,
}

/// Sends frames to the writer, tagged with the session epoch they belong to.
#[derive(Clone)]
pub(crate) struct Out {
    tx: mpsc::UnboundedSender<(u64, Frame)>,
    epoch: u64,
}

impl Out {
    pub(crate) fn send(&self, f: Frame) {
        // A closed writer means the session is over; the op will notice through cancellation.
        let _ = self.tx.send((self.epoch, f));
    }

    pub(crate) fn json<T: serde::Serialize>(&self, kind: Kind, stream: u32, v: &T) {
        match serde_json::to_vec(v) {
            Ok(p) => self.send(Frame::new(kind, stream, p)),
            // Our own message types always serialise; log rather than crash if one does not.
            Err(e) => warn!("cannot encode {kind:?} message: {e}"),
        }
    }
}

/// Host → agent input of one operation.
pub(crate) enum OpIn {
    Data(Bytes),
    Eof,
}

/// The shareable output side of an operation.
pub(crate) struct OpIo {
    pub id: u32,
    out: Out,
    send_credit: Arc<Semaphore>,
    recv_budget: Arc<AtomicI64>,
}

/// The output side ended (cancelled, or the session is gone).
#[derive(Debug)]
pub(crate) struct Closed;

impl OpIo {
    pub(crate) fn event(&self, ev: &hyperfleet_agent_proto::Event) {
        self.out.json(Kind::Event, self.id, ev);
    }

    /// Sends a data frame once the host granted enough credit.
    pub(crate) async fn send_data(&self, kind: Kind, data: Bytes) -> Result<(), Closed> {
        if data.is_empty() {
            return Ok(());
        }
        // Data chunks are at most CHUNK_SIZE, so the count fits in u32.
        let permit = self
            .send_credit
            .acquire_many(data.len() as u32)
            .await
            .map_err(|_| Closed)?;
        permit.forget();
        self.out.send(Frame::new(kind, self.id, data));
        Ok(())
    }

    /// Tells the host it may send `n` more bytes (we consumed that much).
    pub(crate) fn grant(&self, n: usize) {
        if n == 0 {
            return;
        }
        self.recv_budget.fetch_add(n as i64, Ordering::SeqCst);
        self.out.send(Frame::credit(self.id, n as u32));
    }
}

/// Everything an operation gets: output, input and a cancellation signal.
pub(crate) struct Op {
    pub io: OpIo,
    pub inbound: mpsc::UnboundedReceiver<OpIn>,
    pub cancel: watch::Receiver<bool>,
}

/// Resolves when the operation is cancelled (by `Cancel`, a new hello, or the end of the
/// session).
pub(crate) async fn cancelled(rx: &mut watch::Receiver<bool>) {
    // An error means the sender is gone, which only happens when the session dropped the op.
    let _ = rx.wait_for(|c| *c).await;
}

struct OpEntry {
    epoch: u64,
    inbound: mpsc::UnboundedSender<OpIn>,
    send_credit: Arc<Semaphore>,
    recv_budget: Arc<AtomicI64>,
    cancel: watch::Sender<bool>,
}

impl OpEntry {
    fn cancel(&self) {
        let _ = self.cancel.send(true);
        self.send_credit.close();
    }
}

type OpTable = Arc<Mutex<HashMap<u32, OpEntry>>>;

fn lock(t: &OpTable) -> MutexGuard<'_, HashMap<u32, OpEntry>> {
    // Each critical section is a single map operation; a poisoned table is still consistent.
    t.lock().unwrap_or_else(|p| p.into_inner())
}

struct Session {
    svc: Arc<Services>,
    ops: OpTable,
    tx: mpsc::UnboundedSender<(u64, Frame)>,
    epoch: Arc<AtomicU64>,
    version: Option<u32>,
    greeted: bool,
}

/// Serves one byte stream until it ends. Sends `Ready` first.
pub(crate) async fn serve<S>(stream: S, svc: Arc<Services>) -> Served
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let (mut rd, wr) = tokio::io::split(stream);
    let (tx, rx) = mpsc::unbounded_channel();
    let epoch = Arc::new(AtomicU64::new(0));
    let mut writer = tokio::spawn(writer_loop(wr, rx, epoch.clone()));
    let mut s = Session {
        svc: svc.clone(),
        ops: Arc::new(Mutex::new(HashMap::new())),
        tx,
        epoch,
        version: None,
        greeted: false,
    };
    s.out()
        .json(Kind::Ready, 0, &crate::sysinfo::agent_info(svc.pid1));

    let mut dec = FrameDecoder::new();
    let mut buf = BytesMut::with_capacity(256 * 1024);
    let end = 'outer: loop {
        loop {
            match dec.decode(&mut buf) {
                Ok(Some(f)) => s.dispatch(f),
                Ok(None) => break,
                Err(e) => warn!("{e}; discarding input until the next sync marker"),
            }
        }
        if buf.capacity() - buf.len() < 32 * 1024 {
            buf.reserve(128 * 1024);
        }
        tokio::select! {
            r = rd.read_buf(&mut buf) => match r {
                Ok(0) => break 'outer End::Eof,
                Ok(_) => {}
                Err(e) => break 'outer End::Io(e),
            },
            r = &mut writer => break 'outer match r {
                Ok(Err(e)) => End::Io(e),
                _ => End::Eof,
            },
        }
    };
    if dec.discarded() > 0 {
        debug!(
            "session discarded {} bytes while resynchronising",
            dec.discarded()
        );
    }
    s.reset();
    writer.abort();
    Served {
        end,
        greeted: s.greeted,
    }
}

impl Session {
    fn out(&self) -> Out {
        Out {
            tx: self.tx.clone(),
            epoch: self.epoch.load(Ordering::SeqCst),
        }
    }

    /// Cancels every operation of the current epoch and starts a new one.
    fn reset(&mut self) {
        let mut ops = lock(&self.ops);
        for (_, e) in ops.drain() {
            e.cancel();
        }
        self.epoch.fetch_add(1, Ordering::SeqCst);
    }

    fn dispatch(&mut self, f: Frame) {
        match f.kind {
            Kind::Hello => self.hello(&f.payload),
            Kind::Request => self.request(f.stream, &f.payload),
            Kind::Data => {
                let ops = lock(&self.ops);
                if let Some(e) = ops.get(&f.stream) {
                    let len = f.payload.len() as i64;
                    if e.recv_budget.fetch_sub(len, Ordering::SeqCst) < len {
                        warn!(
                            "stream {} exceeded its flow-control credit; cancelling it",
                            f.stream
                        );
                        e.cancel();
                    } else {
                        let _ = e.inbound.send(OpIn::Data(f.payload));
                    }
                }
            }
            Kind::Eof => {
                if let Some(e) = lock(&self.ops).get(&f.stream) {
                    let _ = e.inbound.send(OpIn::Eof);
                }
            }
            Kind::Credit => {
                match f.credit_amount() {
                    Ok(n) => {
                        if let Some(e) = lock(&self.ops).get(&f.stream) {
                            if e.send_credit.available_permits() + n as usize > MAX_CREDIT {
                                warn!("stream {} was granted more than {MAX_CREDIT} bytes; cancelling it", f.stream);
                                e.cancel();
                            } else {
                                e.send_credit.add_permits(n as usize);
                            }
                        }
                    }
                    Err(e) => warn!("{e}"),
                }
            }
            Kind::Cancel => {
                if let Some(e) = lock(&self.ops).get(&f.stream) {
                    debug!("stream {} cancelled by the host", f.stream);
                    e.cancel();
                }
            }
            Kind::HelloReply
            | Kind::Ready
            | Kind::Event
            | Kind::Response
            | Kind::Stdout
            | Kind::Stderr => warn!("ignoring agent-only {:?} frame from the host", f.kind),
        }
    }

    fn hello(&mut self, payload: &[u8]) {
        let h: Hello = match serde_json::from_slice(payload) {
            Ok(h) => h,
            Err(e) => {
                warn!("ignoring malformed hello: {e}");
                return;
            }
        };
        self.reset();
        self.greeted = true;
        let lo = h.min_protocol_version.max(MIN_PROTOCOL_VERSION);
        let hi = h.protocol_version.min(PROTOCOL_VERSION);
        self.version = (lo <= hi).then_some(hi);
        let error = match self.version {
            Some(v) => {
                info!("session started by {:?}, protocol version {v}", h.client);
                None
            }
            None => {
                let msg = format!(
                    "host speaks protocol versions {} to {}, agent {} to {}",
                    h.min_protocol_version,
                    h.protocol_version,
                    MIN_PROTOCOL_VERSION,
                    PROTOCOL_VERSION
                );
                warn!("{msg}");
                Some(msg)
            }
        };
        let reply = HelloReply {
            nonce: h.nonce,
            protocol_version: self.version,
            error,
            agent: crate::sysinfo::agent_info(self.svc.pid1),
        };
        self.out().json(Kind::HelloReply, 0, &reply);
    }

    fn request(&mut self, id: u32, payload: &[u8]) {
        let out = self.out();
        let fail = |code, msg: String| {
            out.json(
                Kind::Response,
                id,
                &Response::Error(RemoteError::new(code, msg)),
            )
        };
        if self.version.is_none() {
            return fail(ErrorCode::Protocol, "no session: send a hello first".into());
        }
        if id == 0 {
            return fail(ErrorCode::Protocol, "stream id 0 is reserved".into());
        }
        let req: Request = match serde_json::from_slice(payload) {
            Ok(r) => r,
            Err(e) => {
                return fail(
                    ErrorCode::InvalidArgument,
                    format!("malformed request: {e}"),
                )
            }
        };
        let mut ops = lock(&self.ops);
        if ops.contains_key(&id) {
            drop(ops);
            return fail(
                ErrorCode::Protocol,
                format!("stream {id} is already in use"),
            );
        }
        let (in_tx, in_rx) = mpsc::unbounded_channel();
        let (cancel_tx, cancel_rx) = watch::channel(false);
        let send_credit = Arc::new(Semaphore::new(INITIAL_WINDOW as usize));
        let recv_budget = Arc::new(AtomicI64::new(i64::from(INITIAL_WINDOW)));
        let epoch = out.epoch;
        ops.insert(
            id,
            OpEntry {
                epoch,
                inbound: in_tx,
                send_credit: send_credit.clone(),
                recv_budget: recv_budget.clone(),
                cancel: cancel_tx,
            },
        );
        drop(ops);
        let op = Op {
            io: OpIo {
                id,
                out: out.clone(),
                send_credit,
                recv_budget,
            },
            inbound: in_rx,
            cancel: cancel_rx,
        };
        let table = self.ops.clone();
        let svc = self.svc.clone();
        tokio::spawn(async move {
            debug!("stream {id}: {req:?}");
            let resp = match crate::ops::run(op, req, &svc).await {
                Ok(r) => Response::Ok(r),
                Err(e) => Response::Error(e),
            };
            debug!("stream {id} done: {resp:?}");
            out.json(Kind::Response, id, &resp);
            let mut t = lock(&table);
            if t.get(&id).is_some_and(|e| e.epoch == epoch) {
                t.remove(&id);
            }
        });
    }
}

/// Writes the session's frames, dropping those of operations from an earlier session on the
/// same stream (their epoch is older than the current one).
async fn writer_loop<W: AsyncWrite + Unpin>(
    wr: W,
    mut rx: mpsc::UnboundedReceiver<(u64, Frame)>,
    epoch: Arc<AtomicU64>,
) -> io::Result<()> {
    write_queue(wr, &mut rx, |(e, f)| {
        (e >= epoch.load(Ordering::SeqCst)).then_some(Outgoing::Frame(f))
    })
    .await
}

//! The host-side async client: one connection to one agent, many concurrent operations.
//!
//! This module owns the host end of a session: the handshake (with resync), a background
//! reader task that demultiplexes frames to per-stream channels, a writer task that serialises
//! outgoing frames, and per-stream flow control in both directions.
//!
//! Memory stays bounded without relying on the caller: the agent may only send as many data
//! bytes on a stream as the client granted (initially [`INITIAL_WINDOW`]), and the client only
//! grants more when the caller takes a chunk out of the handle. Uploads wait for the agent's
//! grants the same way. Dropping a handle before its operation finished sends `Cancel`.

use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufWriter, ReadBuf};
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio::task::JoinHandle;

use crate::error::Error;
use crate::frame::{Frame, FrameDecoder, Kind, CHUNK_SIZE, FLUSH_LEN, INITIAL_WINDOW, SYNC};
use crate::messages::*;

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

/// Result of [`AgentClient::exec_collect`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecOutput {
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub timed_out: bool,
    /// Output beyond the cap was dropped (the process still ran to completion).
    pub truncated: bool,
    pub duration_ms: u64,
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

enum Outgoing {
    Frame(Frame),
    Raw(Bytes),
}

enum Inbound {
    Event(Event),
    Data(Kind, Bytes),
    Response(Response),
    Closed,
}

struct StreamEntry {
    tx: mpsc::UnboundedSender<Inbound>,
    /// Credit the agent granted us for host → agent data.
    send_credit: Arc<Semaphore>,
    /// Bytes the agent may still send us before we grant more.
    recv_budget: Arc<AtomicI64>,
}

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
        let writer = tokio::spawn(writer_loop(wr, out_rx));
        let reader = tokio::spawn(reader_loop(rd, shared.clone(), Some((nonce, hs_tx))));
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
        let recv_budget = Arc::new(AtomicI64::new(INITIAL_WINDOW as i64));
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

    /// Round trip to the agent; returns the measured latency.
    pub async fn ping(&self) -> Result<Duration, Error> {
        let t = Instant::now();
        match self.call(&Request::Ping, |_| {}).await? {
            Reply::Pong { .. } => Ok(t.elapsed()),
            other => Err(unexpected(&other)),
        }
    }

    /// Starts a process. Returns once the agent reports it running (or fails: a missing
    /// program is an [`Error::Remote`] with code `not_found`).
    pub async fn exec(&self, req: ExecRequest) -> Result<ExecHandle, Error> {
        if req.argv.is_empty() || req.argv[0].is_empty() {
            return Err(Error::InvalidRequest("argv must name a program".into()));
        }
        let wants_stdin = req.stdin;
        let mut s = self.open(&Request::Exec(req))?;
        let pid = loop {
            match s.recv().await {
                Inbound::Event(Event::Started { pid }) => break pid,
                Inbound::Event(_) => {}
                Inbound::Data(..) => {
                    return Err(Error::Protocol("process output before its start".into()))
                }
                Inbound::Response(Response::Error(e)) => return Err(Error::from_remote(e)),
                Inbound::Response(Response::Ok(r)) => return Err(unexpected(&r)),
                Inbound::Closed => return Err(Error::Closed),
            }
        };
        let stdin = wants_stdin.then(|| ExecStdin {
            sender: s.sender(),
            closed: false,
        });
        Ok(ExecHandle {
            stream: s,
            pid,
            stdin,
            finished: false,
        })
    }

    /// Runs a process to completion and collects its output, keeping at most `cap` bytes of
    /// each of stdout and stderr (`truncated` tells when more was produced). Stdin is empty.
    pub async fn exec_collect(&self, req: ExecRequest, cap: usize) -> Result<ExecOutput, Error> {
        self.exec_collect_with_stdin(req, None::<&[u8]>, cap).await
    }

    /// Like [`AgentClient::exec_collect`], feeding `stdin` (when given) to the process.
    pub async fn exec_collect_with_stdin<R>(
        &self,
        mut req: ExecRequest,
        stdin: Option<R>,
        cap: usize,
    ) -> Result<ExecOutput, Error>
    where
        R: AsyncRead + Unpin,
    {
        req.stdin = stdin.is_some();
        let mut h = self.exec(req).await?;
        let writer = h.take_stdin();
        let feed = async {
            if let (Some(mut w), Some(r)) = (writer, stdin) {
                // The process may exit without reading all of its input; that is its business.
                match w.copy_from(r).await {
                    Ok(()) | Err(Error::StreamFinished) => {}
                    Err(e) => return Err(e),
                }
                w.close();
            }
            Ok(())
        };
        let collect = async {
            let mut out = ExecOutput {
                exit_code: None,
                signal: None,
                stdout: Vec::new(),
                stderr: Vec::new(),
                timed_out: false,
                truncated: false,
                duration_ms: 0,
            };
            while let Some(ev) = h.next_event().await? {
                match ev {
                    ExecEvent::Stdout(b) => {
                        append_capped(&mut out.stdout, &b, cap, &mut out.truncated)
                    }
                    ExecEvent::Stderr(b) => {
                        append_capped(&mut out.stderr, &b, cap, &mut out.truncated)
                    }
                    ExecEvent::Exit(st) => {
                        out.exit_code = st.exit_code;
                        out.signal = st.signal;
                        out.timed_out = st.timed_out;
                        out.truncated |= st.output_cut;
                        out.duration_ms = st.duration_ms;
                    }
                }
            }
            Ok::<_, Error>(out)
        };
        let (fed, out) = tokio::join!(feed, collect);
        let out = out?;
        fed?;
        Ok(out)
    }

    /// Uploads `reader` to `path` in the guest; returns the number of bytes written. Memory use
    /// is bounded by the flow-control window whatever the file size.
    pub async fn write_file<R>(
        &self,
        path: &str,
        options: WriteOptions,
        mut reader: R,
    ) -> Result<u64, Error>
    where
        R: AsyncRead + Unpin,
    {
        let mut s = self.open(&Request::WriteFile(WriteFileRequest {
            path: path.to_string(),
            options,
        }))?;
        let sender = s.sender();
        loop {
            let mut buf = BytesMut::with_capacity(CHUNK_SIZE);
            let n = reader.read_buf(&mut buf).await.map_err(Error::Source)?;
            if n == 0 {
                break;
            }
            tokio::select! {
                biased;
                inb = s.recv() => return Err(early_end(inb)),
                r = sender.send_data(Kind::Data, buf.freeze()) => match r {
                    Ok(()) => {}
                    // The agent answered (with an error) while we waited for credit.
                    Err(Error::StreamFinished) => return Err(early_end(s.recv().await)),
                    Err(e) => return Err(e),
                },
            }
        }
        sender.send_eof()?;
        loop {
            match s.recv().await {
                Inbound::Response(Response::Ok(Reply::Written { bytes })) => return Ok(bytes),
                Inbound::Event(_) => {}
                other => return Err(early_end(other)),
            }
        }
    }

    /// Opens `path` in the guest for streaming download. Fails up front (e.g. `not_found`)
    /// before any data flows, so an HTTP handler can choose its status code.
    pub async fn read_file(
        &self,
        path: &str,
        range: Option<ByteRange>,
    ) -> Result<FileReader, Error> {
        let range = range.unwrap_or_default();
        let mut s = self.open(&Request::ReadFile(ReadFileRequest {
            path: path.to_string(),
            offset: range.offset,
            length: range.length,
        }))?;
        loop {
            match s.recv().await {
                Inbound::Event(Event::Opened {
                    size,
                    offset,
                    length,
                }) => {
                    return Ok(FileReader {
                        stream: s,
                        size,
                        offset,
                        length,
                        received: 0,
                        pending: Bytes::new(),
                        done: false,
                    })
                }
                Inbound::Event(_) => {}
                other => return Err(early_end(other)),
            }
        }
    }

    /// Metadata of `path` (following symlinks).
    pub async fn stat(&self, path: &str) -> Result<FileStat, Error> {
        self.stat_with(path, false).await
    }

    /// Metadata of `path`; with `no_follow` a symlink describes itself.
    pub async fn stat_with(&self, path: &str, no_follow: bool) -> Result<FileStat, Error> {
        let req = Request::Stat(StatRequest {
            path: path.to_string(),
            no_follow,
        });
        match self.call(&req, |_| {}).await? {
            Reply::Stat(st) => Ok(st),
            other => Err(unexpected(&other)),
        }
    }

    /// Entries of the directory `path` (without `.` and `..`), in the order the guest returns.
    pub async fn list(&self, path: &str) -> Result<Vec<DirEntry>, Error> {
        let mut entries = Vec::new();
        let req = Request::ListDir(ListDirRequest {
            path: path.to_string(),
        });
        match self
            .call(&req, |e| {
                if let Event::Entries { entries: batch } = e {
                    entries.extend(batch);
                }
            })
            .await?
        {
            Reply::Listed { .. } => Ok(entries),
            other => Err(unexpected(&other)),
        }
    }

    /// Removes a file, symlink or empty directory; with `recursive`, a whole tree.
    pub async fn remove(&self, path: &str, recursive: bool) -> Result<(), Error> {
        let req = Request::Remove(RemoveRequest {
            path: path.to_string(),
            recursive,
        });
        match self.call(&req, |_| {}).await? {
            Reply::Removed => Ok(()),
            other => Err(unexpected(&other)),
        }
    }

    /// Creates a directory; with `parents`, like `mkdir -p`.
    pub async fn mkdir(&self, path: &str, parents: bool, mode: Option<u32>) -> Result<(), Error> {
        let req = Request::Mkdir(MkdirRequest {
            path: path.to_string(),
            parents,
            mode,
        });
        match self.call(&req, |_| {}).await? {
            Reply::Created => Ok(()),
            other => Err(unexpected(&other)),
        }
    }

    /// Asks the guest to sync, unmount and power off. Returns when the agent acknowledged;
    /// the connection then ends.
    pub async fn poweroff(&self) -> Result<(), Error> {
        self.power(PowerAction::Poweroff).await
    }

    /// Asks the guest to sync, unmount and reboot.
    pub async fn reboot(&self) -> Result<(), Error> {
        self.power(PowerAction::Reboot).await
    }

    async fn power(&self, action: PowerAction) -> Result<(), Error> {
        match self
            .call(&Request::Power(PowerRequest { action }), |_| {})
            .await?
        {
            Reply::Power => Ok(()),
            other => Err(unexpected(&other)),
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

fn append_capped(dst: &mut Vec<u8>, src: &[u8], cap: usize, truncated: &mut bool) {
    let room = cap.saturating_sub(dst.len());
    if src.len() > room {
        *truncated = true;
    }
    dst.extend_from_slice(&src[..src.len().min(room)]);
}

/// The host end of one stream. Dropping it before the final response cancels the operation.
struct StreamHandle {
    conn: Arc<Conn>,
    id: u32,
    rx: mpsc::UnboundedReceiver<Inbound>,
    send_credit: Arc<Semaphore>,
    recv_budget: Arc<AtomicI64>,
    done: bool,
}

impl StreamHandle {
    async fn recv(&mut self) -> Inbound {
        std::future::poll_fn(|cx| self.poll_recv(cx)).await
    }

    fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Inbound> {
        if self.done {
            return Poll::Ready(Inbound::Closed);
        }
        let inb = match self.rx.poll_recv(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Some(i)) => i,
            Poll::Ready(None) => Inbound::Closed,
        };
        if matches!(inb, Inbound::Response(_) | Inbound::Closed) {
            self.done = true;
        }
        Poll::Ready(inb)
    }

    /// Gives the agent `n` more bytes of credit (the caller consumed that much).
    fn grant(&self, n: usize) {
        if n == 0 || self.done {
            return;
        }
        self.recv_budget.fetch_add(n as i64, Ordering::SeqCst);
        // A closed connection is reported by the next recv; nothing to do here.
        let _ = self
            .conn
            .shared
            .send(Frame::credit(self.id, n.min(u32::MAX as usize) as u32));
    }

    fn sender(&self) -> DataSender {
        DataSender {
            conn: self.conn.clone(),
            id: self.id,
            credit: self.send_credit.clone(),
        }
    }
}

impl Drop for StreamHandle {
    fn drop(&mut self) {
        let removed = self.conn.shared.lock().remove(&self.id).is_some();
        if removed && !self.done {
            let _ = self
                .conn
                .shared
                .send(Frame::new(Kind::Cancel, self.id, Bytes::new()));
        }
    }
}

/// Sends data frames on one stream within the credit the agent granted.
#[derive(Clone)]
struct DataSender {
    conn: Arc<Conn>,
    id: u32,
    credit: Arc<Semaphore>,
}

impl DataSender {
    async fn send_data(&self, kind: Kind, mut data: Bytes) -> Result<(), Error> {
        while !data.is_empty() {
            let n = data.len().min(CHUNK_SIZE);
            let chunk = data.split_to(n);
            // n <= CHUNK_SIZE fits in u32.
            let permit = self
                .credit
                .acquire_many(n as u32)
                .await
                .map_err(|_| Error::StreamFinished)?;
            permit.forget();
            self.conn.shared.send(Frame::new(kind, self.id, chunk))?;
        }
        Ok(())
    }

    fn send_eof(&self) -> Result<(), Error> {
        self.conn
            .shared
            .send(Frame::new(Kind::Eof, self.id, Bytes::new()))
    }
}

/// A running process started by [`AgentClient::exec`].
pub struct ExecHandle {
    stream: StreamHandle,
    pid: u32,
    stdin: Option<ExecStdin>,
    finished: bool,
}

impl ExecHandle {
    /// The process id in the guest (also its process group id).
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The process's stdin, when the request set `stdin: true`. Dropping or closing it sends EOF.
    pub fn take_stdin(&mut self) -> Option<ExecStdin> {
        self.stdin.take()
    }

    /// The next piece of output, or the exit status; `Ok(None)` after the exit was returned.
    /// Output is flow-controlled: a process whose output nobody takes blocks on its pipe.
    pub async fn next_event(&mut self) -> Result<Option<ExecEvent>, Error> {
        if self.finished {
            return Ok(None);
        }
        loop {
            match self.stream.recv().await {
                Inbound::Data(kind, b) => {
                    self.stream.grant(b.len());
                    return Ok(Some(match kind {
                        Kind::Stderr => ExecEvent::Stderr(b),
                        _ => ExecEvent::Stdout(b),
                    }));
                }
                Inbound::Event(_) => {}
                Inbound::Response(Response::Ok(Reply::Exec(st))) => {
                    self.finished = true;
                    return Ok(Some(ExecEvent::Exit(st)));
                }
                Inbound::Response(Response::Ok(r)) => {
                    self.finished = true;
                    return Err(unexpected(&r));
                }
                Inbound::Response(Response::Error(e)) => {
                    self.finished = true;
                    return Err(Error::from_remote(e));
                }
                Inbound::Closed => {
                    self.finished = true;
                    return Err(Error::Closed);
                }
            }
        }
    }

    /// Asks the agent to kill the process group; [`ExecHandle::next_event`] then ends with
    /// [`Error::Cancelled`] once the process is gone.
    pub fn cancel(&self) -> Result<(), Error> {
        if self.finished {
            return Ok(());
        }
        self.stream
            .conn
            .shared
            .send(Frame::new(Kind::Cancel, self.stream.id, Bytes::new()))
    }

    /// Waits for the exit status, discarding output.
    pub async fn wait(mut self) -> Result<ExecStatus, Error> {
        while let Some(ev) = self.next_event().await? {
            if let ExecEvent::Exit(st) = ev {
                return Ok(st);
            }
        }
        Err(Error::Protocol("exec stream ended without a status".into()))
    }
}

/// The stdin of a running process.
pub struct ExecStdin {
    sender: DataSender,
    closed: bool,
}

impl ExecStdin {
    /// Sends bytes, waiting for flow-control credit. Fails with [`Error::StreamFinished`] once
    /// the process has exited.
    pub async fn write(&mut self, data: impl Into<Bytes>) -> Result<(), Error> {
        if self.closed {
            return Err(Error::StreamFinished);
        }
        self.sender.send_data(Kind::Data, data.into()).await
    }

    /// Streams everything from `reader`.
    pub async fn copy_from<R: AsyncRead + Unpin>(&mut self, mut reader: R) -> Result<(), Error> {
        loop {
            let mut buf = BytesMut::with_capacity(CHUNK_SIZE);
            if reader.read_buf(&mut buf).await.map_err(Error::Source)? == 0 {
                return Ok(());
            }
            self.write(buf.freeze()).await?;
        }
    }

    /// Sends EOF.
    pub fn close(mut self) {
        self.eof();
    }

    fn eof(&mut self) {
        if !self.closed {
            self.closed = true;
            let _ = self.sender.send_eof();
        }
    }
}

impl Drop for ExecStdin {
    fn drop(&mut self) {
        self.eof();
    }
}

/// A file being downloaded by [`AgentClient::read_file`]: an [`AsyncRead`], or chunk by chunk
/// with [`FileReader::next_chunk`].
pub struct FileReader {
    stream: StreamHandle,
    size: u64,
    offset: u64,
    length: u64,
    received: u64,
    pending: Bytes,
    done: bool,
}

impl FileReader {
    /// Size of the whole file.
    pub fn file_size(&self) -> u64 {
        self.size
    }

    /// Offset of the first byte that will be delivered.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// Number of bytes that will be delivered in total.
    pub fn len(&self) -> u64 {
        self.length
    }

    pub fn is_empty(&self) -> bool {
        self.length == 0
    }

    /// The next chunk, `Ok(None)` at the end. Do not mix with `AsyncRead` reads.
    pub async fn next_chunk(&mut self) -> Result<Option<Bytes>, Error> {
        if !self.pending.is_empty() {
            return Ok(Some(std::mem::take(&mut self.pending)));
        }
        std::future::poll_fn(|cx| self.poll_chunk(cx)).await
    }

    fn poll_chunk(&mut self, cx: &mut Context<'_>) -> Poll<Result<Option<Bytes>, Error>> {
        loop {
            if self.done {
                return Poll::Ready(Ok(None));
            }
            let inb = match self.stream.poll_recv(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(i) => i,
            };
            match inb {
                Inbound::Data(_, b) => {
                    self.stream.grant(b.len());
                    self.received += b.len() as u64;
                    if !b.is_empty() {
                        return Poll::Ready(Ok(Some(b)));
                    }
                }
                Inbound::Event(_) => {}
                Inbound::Response(Response::Ok(Reply::Read { bytes })) => {
                    self.done = true;
                    if bytes != self.received {
                        return Poll::Ready(Err(Error::Protocol(format!(
                            "agent reported {bytes} bytes read but sent {}",
                            self.received
                        ))));
                    }
                }
                other => {
                    self.done = true;
                    return Poll::Ready(Err(early_end(other)));
                }
            }
        }
    }
}

impl AsyncRead for FileReader {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.pending.is_empty() {
            match this.poll_chunk(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(None)) => return Poll::Ready(Ok(())),
                Poll::Ready(Ok(Some(b))) => this.pending = b,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(io::Error::other(e))),
            }
        }
        let n = this.pending.len().min(buf.remaining());
        buf.put_slice(&this.pending.split_to(n));
        Poll::Ready(Ok(()))
    }
}

async fn writer_loop<W: AsyncWrite + Unpin>(wr: W, mut rx: mpsc::UnboundedReceiver<Outgoing>) {
    let mut w = BufWriter::with_capacity(64 * 1024, wr);
    while let Some(first) = rx.recv().await {
        let mut next = Some(first);
        while let Some(o) = next.take() {
            if write_outgoing(&mut w, o).await.is_err() {
                return;
            }
            next = rx.try_recv().ok();
        }
        if w.flush().await.is_err() {
            return;
        }
    }
}

async fn write_outgoing<W: AsyncWrite + Unpin>(w: &mut W, o: Outgoing) -> io::Result<()> {
    match o {
        Outgoing::Raw(b) => w.write_all(&b).await,
        Outgoing::Frame(f) => {
            let h = f
                .header()
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
            if f.kind.is_synced() {
                w.write_all(&SYNC).await?;
            }
            w.write_all(&h).await?;
            w.write_all(&f.payload).await
        }
    }
}

type Handshake = (u64, oneshot::Sender<Result<HelloReply, Error>>);

async fn reader_loop<R: AsyncRead + Unpin>(
    mut rd: R,
    shared: Arc<Shared>,
    mut hs: Option<Handshake>,
) {
    let mut dec = FrameDecoder::resyncing();
    let mut buf = BytesMut::with_capacity(128 * 1024);
    let err: Option<Error> = 'outer: loop {
        loop {
            match dec.decode(&mut buf) {
                Ok(Some(f)) => {
                    if let Err(e) = dispatch(&shared, &mut hs, f) {
                        break 'outer Some(e);
                    }
                }
                Ok(None) => break,
                // Until the handshake completes, anything may precede our reply: keep scanning.
                Err(_) if hs.is_some() => {}
                Err(e) => break 'outer Some(Error::Frame(e)),
            }
        }
        if buf.capacity() - buf.len() < 16 * 1024 {
            buf.reserve(64 * 1024);
        }
        match rd.read_buf(&mut buf).await {
            Ok(0) => break None,
            Ok(_) => {}
            Err(e) => break Some(Error::Io(e)),
        }
    };
    if let Some((_, tx)) = hs.take() {
        let _ = tx.send(Err(err.unwrap_or(Error::Closed)));
    }
    shared.close_all();
}

fn dispatch(shared: &Shared, hs: &mut Option<Handshake>, f: Frame) -> Result<(), Error> {
    if let Some((nonce, _)) = hs {
        // Before our reply, only a matching HelloReply matters; the rest is stale.
        if f.kind == Kind::HelloReply {
            if let Ok(r) = serde_json::from_slice::<HelloReply>(&f.payload) {
                if r.nonce == *nonce {
                    if let Some((_, tx)) = hs.take() {
                        let _ = tx.send(Ok(r));
                    }
                }
            }
        }
        return Ok(());
    }
    match f.kind {
        Kind::HelloReply | Kind::Ready => Ok(()),
        Kind::Event => {
            let ev: Event = serde_json::from_slice(&f.payload).map_err(|source| Error::Decode {
                what: "event",
                source,
            })?;
            route(shared, f.stream, Inbound::Event(ev), false);
            Ok(())
        }
        Kind::Response => {
            let r: Response =
                serde_json::from_slice(&f.payload).map_err(|source| Error::Decode {
                    what: "response",
                    source,
                })?;
            route(shared, f.stream, Inbound::Response(r), true);
            Ok(())
        }
        Kind::Data | Kind::Stdout | Kind::Stderr => {
            let map = shared.lock();
            if let Some(e) = map.get(&f.stream) {
                let len = f.payload.len() as i64;
                if e.recv_budget.fetch_sub(len, Ordering::SeqCst) < len {
                    return Err(Error::Protocol(format!(
                        "stream {} sent data beyond its flow-control credit",
                        f.stream
                    )));
                }
                let _ = e.tx.send(Inbound::Data(f.kind, f.payload));
            }
            Ok(())
        }
        Kind::Credit => {
            let n = f.credit_amount().map_err(Error::Frame)?;
            if let Some(e) = shared.lock().get(&f.stream) {
                e.send_credit.add_permits(n as usize);
            }
            Ok(())
        }
        Kind::Hello | Kind::Request | Kind::Eof | Kind::Cancel => Err(Error::Protocol(format!(
            "agent sent a host-only {:?} frame",
            f.kind
        ))),
    }
}

fn route(shared: &Shared, stream: u32, inb: Inbound, last: bool) {
    let mut map = shared.lock();
    if last {
        if let Some(e) = map.remove(&stream) {
            e.send_credit.close();
            let _ = e.tx.send(inb);
        }
    } else if let Some(e) = map.get(&stream) {
        let _ = e.tx.send(inb);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::DuplexStream;

    fn info() -> AgentInfo {
        AgentInfo {
            agent_version: "test".into(),
            min_protocol_version: 1,
            max_protocol_version: 1,
            kernel_release: "6.1".into(),
            kernel_version: String::new(),
            machine: "x86_64".into(),
            hostname: String::new(),
            uptime_ms: 1,
            pid1: false,
            boot_id: None,
        }
    }

    async fn next_frame(s: &mut DuplexStream, dec: &mut FrameDecoder, buf: &mut BytesMut) -> Frame {
        loop {
            if let Ok(Some(f)) = dec.decode(buf) {
                return f;
            }
            let n = s.read_buf(buf).await.unwrap();
            assert!(n > 0, "host closed");
        }
    }

    async fn write(s: &mut DuplexStream, f: Frame) {
        s.write_all(&f.to_bytes().unwrap()).await.unwrap();
    }

    fn json(kind: Kind, stream: u32, v: &impl serde::Serialize) -> Frame {
        Frame::new(kind, stream, serde_json::to_vec(v).unwrap())
    }

    /// A scripted agent: answers the hello with `version`, after writing some stale bytes.
    type Scripted = JoinHandle<(DuplexStream, FrameDecoder, BytesMut)>;

    async fn fake_agent(version: Option<u32>) -> (DuplexStream, Scripted) {
        let (host, mut agent) = tokio::io::duplex(1 << 20);
        // Stale output of an earlier session: must be ignored by the handshake.
        write(&mut agent, Frame::new(Kind::Stdout, 1, &b"old"[..])).await;
        agent.write_all(b"\x01\x02garbage").await.unwrap();
        write(
            &mut agent,
            json(
                Kind::HelloReply,
                0,
                &HelloReply {
                    nonce: 12345,
                    protocol_version: Some(1),
                    error: None,
                    agent: info(),
                },
            ),
        )
        .await;
        let mut dec = FrameDecoder::new();
        let mut buf = BytesMut::new();
        let task = tokio::spawn(async move {
            let f = next_frame(&mut agent, &mut dec, &mut buf).await;
            assert_eq!(f.kind, Kind::Hello);
            let h: Hello = serde_json::from_slice(&f.payload).unwrap();
            let reply = HelloReply {
                nonce: h.nonce,
                protocol_version: version,
                error: version.is_none().then(|| "no overlap".to_string()),
                agent: info(),
            };
            write(&mut agent, json(Kind::HelloReply, 0, &reply)).await;
            (agent, dec, buf)
        });
        (host, task)
    }

    #[tokio::test]
    async fn handshake_ignores_stale_bytes_and_checks_version() {
        let (host, task) = fake_agent(Some(1)).await;
        let c = AgentClient::connect(host).await.unwrap();
        let (mut agent, mut dec, mut buf) = task.await.unwrap();
        assert_eq!(c.protocol_version(), 1);
        assert_eq!(c.agent_info().agent_version, "test");
        // A ping round trip through the scripted agent.
        let ping = tokio::spawn({
            let c = c.clone();
            async move { c.ping().await }
        });
        let f = next_frame(&mut agent, &mut dec, &mut buf).await;
        assert_eq!(f.kind, Kind::Request);
        let req: Request = serde_json::from_slice(&f.payload).unwrap();
        assert_eq!(req, Request::Ping);
        write(
            &mut agent,
            json(
                Kind::Response,
                f.stream,
                &Response::Ok(Reply::Pong { uptime_ms: 5 }),
            ),
        )
        .await;
        ping.await.unwrap().unwrap();

        let (host, _task) = fake_agent(None).await;
        let e = AgentClient::connect(host).await.err().unwrap();
        assert!(matches!(e, Error::VersionMismatch { .. }), "{e:?}");
    }

    #[tokio::test]
    async fn handshake_times_out_and_retries_with_flush() {
        let (host, mut agent) = tokio::io::duplex(4 << 20);
        let opts = ConnectOptions {
            handshake_timeout: Duration::from_millis(300),
            retry_interval: Duration::from_millis(100),
            ..ConnectOptions::default()
        };
        let e = AgentClient::connect_with(host, opts).await.err().unwrap();
        assert!(matches!(e, Error::HandshakeTimeout(_)), "{e:?}");
        // What the silent agent received: hellos, and one flush of zeros before the retries.
        let mut got = Vec::new();
        agent.read_to_end(&mut got).await.unwrap();
        let zeros = got.iter().filter(|b| **b == 0).count();
        assert!(zeros >= FLUSH_LEN, "{zeros}");
        let mut dec = FrameDecoder::new();
        let mut b = BytesMut::from(&got[..]);
        let mut hellos = 0;
        loop {
            match dec.decode(&mut b) {
                Ok(Some(f)) => {
                    assert_eq!(f.kind, Kind::Hello);
                    hellos += 1;
                }
                Ok(None) => break,
                Err(_) => {}
            }
        }
        assert!(hellos >= 2, "{hellos}");
    }

    #[tokio::test]
    async fn data_beyond_credit_closes_the_connection() {
        let (host, task) = fake_agent(Some(1)).await;
        let c = AgentClient::connect(host).await.unwrap();
        let (mut agent, mut dec, mut buf) = task.await.unwrap();
        let reader = tokio::spawn({
            let c = c.clone();
            async move { c.read_file("/f", None).await.map(|_| ()) }
        });
        let f = next_frame(&mut agent, &mut dec, &mut buf).await;
        write(
            &mut agent,
            json(
                Kind::Event,
                f.stream,
                &Event::Opened {
                    size: 1 << 30,
                    offset: 0,
                    length: 1 << 30,
                },
            ),
        )
        .await;
        reader.await.unwrap().unwrap();
        // The reader was dropped (cancel sent), but a misbehaving agent keeps sending on a
        // fresh stream beyond the window; the client must refuse rather than buffer.
        let reader2 = {
            let c = c.clone();
            tokio::spawn(async move {
                let mut r = c.read_file("/g", None).await?;
                tokio::time::sleep(Duration::from_secs(5)).await;
                r.next_chunk().await
            })
        };
        let id = loop {
            let f = next_frame(&mut agent, &mut dec, &mut buf).await;
            if f.kind == Kind::Request {
                break f.stream;
            }
        };
        write(
            &mut agent,
            json(
                Kind::Event,
                id,
                &Event::Opened {
                    size: 1 << 30,
                    offset: 0,
                    length: 1 << 30,
                },
            ),
        )
        .await;
        for _ in 0..(INITIAL_WINDOW as usize / CHUNK_SIZE + 1) {
            write(
                &mut agent,
                Frame::new(Kind::Data, id, vec![0u8; CHUNK_SIZE]),
            )
            .await;
        }
        let t0 = Instant::now();
        while !c.is_closed() {
            assert!(t0.elapsed() < Duration::from_secs(3));
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        reader2.abort();
        assert!(matches!(c.ping().await, Err(Error::Closed)));
    }
}

//! `exec`: run a process in its own process group, stream its stdio, enforce its timeout.
//!
//! Output is flow-controlled end to end: a pump only reads the pipe when it holds credit, so a
//! host that stops reading makes the process block on a full pipe instead of making the agent
//! buffer. Timeouts and cancellation kill the whole process group with SIGKILL, and the answer
//! is only sent after the process has been reaped.
//!
//! Every running exec is also listed in the agent-wide [`ExecTable`], so a `refresh` with
//! `drop_sessions` can end those of any session (a guest restored from a memory image still
//! has the exec operations of the machine it was copied from).

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use hyperfleet_agent_proto::{
    ErrorCode, Event, ExecRequest, ExecStatus, Kind, RemoteError, Reply, CHUNK_SIZE,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio::sync::{watch, Notify};

use crate::reaper::{decode_status, Reaper};
use crate::session::{cancelled, Op, OpIn, OpIo};
use crate::{debug, warn};

/// After the process exits, output still arriving is forwarded; once the pipes have been idle
/// this long (descendants holding them open), the rest is cut off.
const DRAIN_IDLE: Duration = Duration::from_millis(1000);

/// The exec operations running in the agent, across sessions, in start order.
pub(crate) struct ExecTable {
    next: AtomicU64,
    live: Mutex<HashMap<u64, watch::Sender<bool>>>,
    ended: Notify,
}

/// An exec's entry in the [`ExecTable`]; removed when dropped (the operation has answered).
pub(crate) struct ExecEntry {
    table: Arc<ExecTable>,
    seq: u64,
    dropped: watch::Receiver<bool>,
}

impl Drop for ExecEntry {
    fn drop(&mut self) {
        self.table.lock().remove(&self.seq);
        self.table.ended.notify_waiters();
    }
}

impl ExecTable {
    pub(crate) fn new() -> Arc<ExecTable> {
        Arc::new(ExecTable {
            next: AtomicU64::new(0),
            live: Mutex::new(HashMap::new()),
            ended: Notify::new(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<u64, watch::Sender<bool>>> {
        // Every critical section is one map operation: a poisoned map is still consistent.
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn register(self: &Arc<Self>) -> ExecEntry {
        let (tx, rx) = watch::channel(false);
        // Numbered and listed under one lock, so `drop_all` never sees a number unlisted.
        let seq = {
            let mut live = self.lock();
            let seq = self.next.fetch_add(1, Ordering::SeqCst);
            live.insert(seq, tx);
            seq
        };
        ExecEntry {
            table: self.clone(),
            seq,
            dropped: rx,
        }
    }

    /// Kills every exec registered so far, like a `Cancel` from its host, and waits up to
    /// `max` until they have answered (their processes reaped). Returns how many were running
    /// and how many had not ended in time.
    pub(crate) async fn drop_all(&self, max: Duration) -> (usize, usize) {
        let victims: Vec<u64> = {
            let live = self.lock();
            let mark = self.next.load(Ordering::SeqCst);
            let v: Vec<u64> = live.keys().copied().filter(|s| *s < mark).collect();
            for s in &v {
                if let Some(tx) = live.get(s) {
                    let _ = tx.send(true);
                }
            }
            v
        };
        let deadline = tokio::time::Instant::now() + max;
        loop {
            let ended = self.ended.notified();
            let left = {
                let live = self.lock();
                victims.iter().filter(|s| live.contains_key(s)).count()
            };
            if left == 0 {
                return (victims.len(), 0);
            }
            if tokio::time::timeout_at(deadline, ended).await.is_err() {
                return (victims.len(), left);
            }
        }
    }
}

pub(super) async fn exec(
    op: Op,
    req: ExecRequest,
    reaper: &Reaper,
    table: &Arc<ExecTable>,
) -> Result<Reply, RemoteError> {
    let Op {
        io,
        mut inbound,
        mut cancel,
    } = op;
    // Registered before the spawn, so a refresh that starts later always sees this exec.
    let entry = table.register();
    let mut dropped = entry.dropped.clone();
    let Some(program) = req.argv.first().filter(|p| !p.is_empty()) else {
        return Err(RemoteError::new(
            ErrorCode::InvalidArgument,
            "argv must name a program",
        ));
    };
    if let Some(cwd) = &req.cwd {
        match std::fs::metadata(cwd) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                return Err(RemoteError::new(
                    ErrorCode::NotADirectory,
                    format!("working directory {cwd} is not a directory"),
                ))
            }
            Err(e) => return Err(RemoteError::io(&format!("working directory {cwd}"), &e)),
        }
    }
    let mut cmd = Command::new(program);
    cmd.args(&req.argv[1..]);
    if req.clear_env {
        cmd.env_clear();
    }
    cmd.envs(&req.env);
    if let Some(cwd) = &req.cwd {
        cmd.current_dir(cwd);
    }
    cmd.stdin(if req.stdin {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .process_group(0);

    let started = Instant::now();
    let (mut child, exit_rx) = reaper
        .spawn(&mut cmd)
        .map_err(|e| RemoteError::io(&format!("cannot start {program}"), &e))?;
    let pid = child.id();
    io.event(&Event::Started { pid });
    debug!("stream {}: started {program} as pid {pid}", io.id);

    let stdout = child.stdout.take().map(OwnedFd::from);
    let stderr = child.stderr.take().map(OwnedFd::from);
    let stdin = child.stdin.take().map(OwnedFd::from);
    let last_activity = Arc::new(AtomicU64::new(0));

    let outputs = async {
        tokio::join!(
            pump(&io, Kind::Stdout, stdout, &last_activity, started),
            pump(&io, Kind::Stderr, stderr, &last_activity, started)
        )
    };
    let feed = feed_stdin(&io, &mut inbound, stdin);
    tokio::pin!(outputs, feed, exit_rx);

    let deadline = req
        .timeout_ms
        .map(|ms| tokio::time::Instant::now() + Duration::from_millis(ms));
    let mut status = None;
    let mut outputs_done = false;
    let mut feed_done = false;
    let mut timed_out = false;
    let mut was_cancelled = false;
    let mut killed = false;
    let mut output_cut = false;
    let mut drain_tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        if status.is_some() && outputs_done {
            break;
        }
        tokio::select! {
            st = &mut exit_rx, if status.is_none() => {
                // The reaper never drops a registered sender without sending.
                status = Some(st.unwrap_or(0));
                last_activity.store(started.elapsed().as_millis() as u64, Ordering::Relaxed);
            }
            _ = &mut outputs, if !outputs_done => outputs_done = true,
            _ = &mut feed, if !feed_done => feed_done = true,
            _ = sleep_until_opt(deadline), if !killed && status.is_none() => {
                debug!("stream {}: pid {pid} timed out", io.id);
                kill_group(pid);
                timed_out = true;
                killed = true;
            }
            _ = cancelled_or_dropped(&mut cancel, &mut dropped), if !killed => {
                debug!("stream {}: pid {pid} cancelled", io.id);
                if status.is_none() {
                    kill_group(pid);
                }
                was_cancelled = true;
                killed = true;
            }
            _ = drain_tick.tick(), if status.is_some() && !outputs_done => {
                let idle = started.elapsed().as_millis() as u64
                    - last_activity.load(Ordering::Relaxed);
                if idle >= DRAIN_IDLE.as_millis() as u64 || was_cancelled {
                    warn!("stream {}: pid {pid} exited but its output pipes stay open; cutting output", io.id);
                    output_cut = true;
                    break;
                }
            }
        }
    }
    let duration_ms = started.elapsed().as_millis() as u64;
    if was_cancelled {
        let why = if *dropped.borrow() {
            "cancelled: a refresh of the guest's identity dropped the sessions that were running"
        } else {
            "cancelled"
        };
        return Err(RemoteError::new(ErrorCode::Cancelled, why));
    }
    let (exit_code, signal) = decode_status(status.unwrap_or(0));
    Ok(Reply::Exec(ExecStatus {
        exit_code,
        signal,
        timed_out,
        output_cut,
        duration_ms,
    }))
}

/// Resolves when the host cancels the operation or a refresh drops it.
async fn cancelled_or_dropped(
    cancel: &mut watch::Receiver<bool>,
    dropped: &mut watch::Receiver<bool>,
) {
    tokio::select! {
        _ = cancelled(cancel) => {}
        _ = cancelled(dropped) => {}
    }
}

async fn sleep_until_opt(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

fn kill_group(pgid: u32) {
    // SAFETY: kill has no memory-safety preconditions. The group id is our child's pid, which
    // has not been reaped yet (callers check), so it cannot have been reused.
    let rc = unsafe { libc::kill(-(pgid as libc::pid_t), libc::SIGKILL) };
    if rc != 0 {
        debug!("kill(-{pgid}): {}", std::io::Error::last_os_error());
    }
}

/// Forwards one output pipe to the host within the stream's credit.
async fn pump(io: &OpIo, kind: Kind, fd: Option<OwnedFd>, activity: &AtomicU64, t0: Instant) {
    let Some(fd) = fd else { return };
    let mut rx = match pipe::Receiver::from_owned_fd(fd) {
        Ok(r) => r,
        Err(e) => {
            warn!("stream {}: cannot watch {kind:?} pipe: {e}", io.id);
            return;
        }
    };
    loop {
        let mut buf = BytesMut::with_capacity(CHUNK_SIZE);
        match rx.read_buf(&mut buf).await {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) => {
                warn!("stream {}: reading {kind:?}: {e}", io.id);
                return;
            }
        }
        activity.store(t0.elapsed().as_millis() as u64, Ordering::Relaxed);
        if io.send_data(kind, buf.freeze()).await.is_err() {
            return;
        }
    }
}

/// Writes host data to the process's stdin; closes it on `Eof`. Data arriving after the
/// process stopped reading is consumed (and credited) so the host never waits forever.
async fn feed_stdin(
    io: &OpIo,
    inbound: &mut tokio::sync::mpsc::UnboundedReceiver<OpIn>,
    fd: Option<OwnedFd>,
) {
    let mut tx = match fd.map(pipe::Sender::from_owned_fd).transpose() {
        Ok(t) => t,
        Err(e) => {
            warn!("stream {}: cannot watch stdin pipe: {e}", io.id);
            None
        }
    };
    while let Some(m) = inbound.recv().await {
        match m {
            OpIn::Data(b) => {
                if let Some(w) = tx.as_mut() {
                    if let Err(e) = w.write_all(&b).await {
                        debug!("stream {}: stdin closed by the process: {e}", io.id);
                        tx = None;
                    }
                }
                io.grant(b.len());
            }
            OpIn::Eof => tx = None,
        }
    }
}

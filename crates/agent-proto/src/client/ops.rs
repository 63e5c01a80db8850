//! The operations of [`AgentClient`]: processes, files, directories, power and identity
//! refresh, each one stream of the connection.

use std::time::{Duration, Instant};

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt};

use super::handles::{ExecHandle, FileReader};
use super::{early_end, unexpected, AgentClient, ByteRange, ExecEvent, Inbound};
use crate::error::Error;
use crate::frame::{Kind, CHUNK_SIZE};
use crate::messages::*;
use crate::refresh::{RefreshReport, RefreshRequest, REFRESH_PROTOCOL_VERSION};

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

/// Where [`AgentClient::exec_collect_into`] puts a process's output as it arrives. The sink
/// decides what to keep: output keeps flowing (and the process keeps running) whatever it
/// drops, so a sink bounds memory by keeping less, never by blocking.
pub trait OutputSink {
    fn stdout(&mut self, chunk: &[u8]);
    fn stderr(&mut self, chunk: &[u8]);
}

/// Keeps the first `cap` bytes of each of stdout and stderr.
struct Capped {
    cap: usize,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    truncated: bool,
}

impl OutputSink for Capped {
    fn stdout(&mut self, chunk: &[u8]) {
        append_capped(&mut self.stdout, chunk, self.cap, &mut self.truncated);
    }
    fn stderr(&mut self, chunk: &[u8]) {
        append_capped(&mut self.stderr, chunk, self.cap, &mut self.truncated);
    }
}

fn append_capped(dst: &mut Vec<u8>, src: &[u8], cap: usize, truncated: &mut bool) {
    let room = cap.saturating_sub(dst.len());
    if src.len() > room {
        *truncated = true;
    }
    dst.extend_from_slice(&src[..src.len().min(room)]);
}

impl AgentClient {
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
        Ok(ExecHandle::new(s, pid, wants_stdin))
    }

    /// Runs a process to completion and collects its output, keeping at most `cap` bytes of
    /// each of stdout and stderr (`truncated` tells when more was produced). Stdin is empty.
    pub async fn exec_collect(&self, req: ExecRequest, cap: usize) -> Result<ExecOutput, Error> {
        self.exec_collect_with_stdin(req, None::<&[u8]>, cap).await
    }

    /// Like [`AgentClient::exec_collect`], feeding `stdin` (when given) to the process.
    pub async fn exec_collect_with_stdin<R>(
        &self,
        req: ExecRequest,
        stdin: Option<R>,
        cap: usize,
    ) -> Result<ExecOutput, Error>
    where
        R: AsyncRead + Unpin,
    {
        let mut sink = Capped {
            cap,
            stdout: Vec::new(),
            stderr: Vec::new(),
            truncated: false,
        };
        let st = self.exec_collect_into(req, stdin, &mut sink).await?;
        Ok(ExecOutput {
            exit_code: st.exit_code,
            signal: st.signal,
            stdout: sink.stdout,
            stderr: sink.stderr,
            timed_out: st.timed_out,
            truncated: sink.truncated || st.output_cut,
            duration_ms: st.duration_ms,
        })
    }

    /// Runs a process to completion, feeding `stdin` (when given) and handing its output to
    /// `sink` as it arrives; returns the exit status.
    pub async fn exec_collect_into<R, S>(
        &self,
        mut req: ExecRequest,
        stdin: Option<R>,
        sink: &mut S,
    ) -> Result<ExecStatus, Error>
    where
        R: AsyncRead + Unpin,
        S: OutputSink,
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
            while let Some(ev) = h.next_event().await? {
                match ev {
                    ExecEvent::Stdout(b) => sink.stdout(&b),
                    ExecEvent::Stderr(b) => sink.stderr(&b),
                    ExecEvent::Exit(st) => return Ok(st),
                }
            }
            Err(Error::Protocol("exec stream ended without a status".into()))
        };
        let (fed, st) = tokio::join!(feed, collect);
        let st = st?;
        fed?;
        Ok(st)
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
                }) => return Ok(FileReader::new(s, size, offset, length)),
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

    /// Gives the guest a new identity or just a fresh clock and entropy (see
    /// [`RefreshRequest`]: [`RefreshRequest::resume`] after a resume,
    /// [`RefreshRequest::new_machine`] plus the identity after a restore into a new machine).
    /// The report lists each part that was asked for with its error, if any: a failed part
    /// does not stop the others, so check [`RefreshReport::is_ok`]. Fails up front with
    /// [`Error::InvalidRequest`] for an invalid request and [`Error::AgentTooOld`] for an
    /// agent that speaks protocol version 1.
    pub async fn refresh(&self, req: RefreshRequest) -> Result<RefreshReport, Error> {
        req.validate().map_err(Error::InvalidRequest)?;
        self.require_version("refresh", REFRESH_PROTOCOL_VERSION)?;
        match self.call(&Request::Refresh(req), |_| {}).await? {
            Reply::Refreshed(r) => Ok(r),
            other => Err(unexpected(&other)),
        }
    }

    /// Starts the machine's main process (see [`MainProcessRequest`]); idempotent within a
    /// boot. Fails up front with [`Error::AgentTooOld`] for an agent older than protocol
    /// version 3 and [`Error::InvalidRequest`] for an empty `argv`.
    pub async fn start_main(&self, req: MainProcessRequest) -> Result<MainStarted, Error> {
        if req.argv.first().is_none_or(|a| a.is_empty()) {
            return Err(Error::InvalidRequest("argv must name a program".into()));
        }
        self.require_version("start_main", MAIN_PROTOCOL_VERSION)?;
        match self.call(&Request::StartMain(req), |_| {}).await? {
            Reply::MainStarted(s) => Ok(s),
            other => Err(unexpected(&other)),
        }
    }

    /// [`Error::AgentTooOld`] unless the negotiated version is at least `needed`.
    fn require_version(&self, what: &'static str, needed: u32) -> Result<(), Error> {
        if self.protocol_version() < needed {
            return Err(Error::AgentTooOld {
                what,
                needed,
                negotiated: self.protocol_version(),
            });
        }
        Ok(())
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

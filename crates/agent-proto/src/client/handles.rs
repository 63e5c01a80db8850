//! What long operations hand back to the caller: a running process ([`ExecHandle`]) with its
//! stdin ([`ExecStdin`]), and a file being downloaded ([`FileReader`]).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, ReadBuf};

use super::flow::{DataSender, StreamHandle};
use super::{early_end, unexpected, ExecEvent, Inbound};
use crate::error::Error;
use crate::frame::{Frame, Kind, CHUNK_SIZE};
use crate::messages::*;

/// A running process started by [`AgentClient::exec`].
pub struct ExecHandle {
    stream: StreamHandle,
    pid: u32,
    stdin: Option<ExecStdin>,
    finished: bool,
}

impl ExecHandle {
    pub(super) fn new(stream: StreamHandle, pid: u32, wants_stdin: bool) -> ExecHandle {
        let stdin = wants_stdin.then(|| ExecStdin {
            sender: stream.sender(),
            closed: false,
        });
        ExecHandle {
            stream,
            pid,
            stdin,
            finished: false,
        }
    }

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
    pub(super) fn new(stream: StreamHandle, size: u64, offset: u64, length: u64) -> FileReader {
        FileReader {
            stream,
            size,
            offset,
            length,
            received: 0,
            pending: Bytes::new(),
            done: false,
        }
    }

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

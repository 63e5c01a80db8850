//! The connection's background tasks: the writer that serialises outgoing frames (the shared
//! [`crate::writer`]) and the reader that decodes incoming frames and routes them to their
//! streams, enforcing the receive budget.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tokio::sync::{mpsc, oneshot};

use super::{Inbound, Shared};
use crate::error::Error;
use crate::frame::{Frame, FrameDecoder, Kind};
use crate::messages::*;
use crate::writer::{write_queue, Outgoing};

/// Writes queued frames until the connection closes or a write fails; either way the reader
/// notices the end and closes every stream.
pub(super) async fn writer_loop<W: AsyncWrite + Unpin>(
    wr: W,
    mut rx: mpsc::UnboundedReceiver<Outgoing>,
) {
    let _ = write_queue(wr, &mut rx, Some).await;
}

pub(super) type Handshake = (u64, oneshot::Sender<Result<HelloReply, Error>>);

pub(super) async fn reader_loop<R: AsyncRead + Unpin>(
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

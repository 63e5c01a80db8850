//! Writing frames to a byte stream: the one implementation the host client and the guest agent
//! share.
//!
//! Each side has a single writer task fed by a queue, so frames of concurrent operations never
//! interleave. [`write_queue`] drains that queue into a buffered writer and flushes only when
//! the queue is momentarily empty, so a burst of small frames (credits, events) costs one
//! write system call rather than one each.

use std::io;

use bytes::Bytes;
use tokio::io::{AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::sync::mpsc;

use crate::frame::{Frame, SYNC};

/// Buffer of the writer: a whole data frame (64 KiB payload) fits.
const WRITE_BUFFER: usize = 64 * 1024;

/// What a writer task puts on the wire.
#[derive(Debug)]
pub enum Outgoing {
    /// A frame, preceded by [`SYNC`] for the kinds that carry it.
    Frame(Frame),
    /// Bytes outside any frame (the zero flush that completes a half frame before a resend).
    Raw(Bytes),
}

/// Writes one frame (with its sync marker when its kind has one).
pub async fn write_frame<W: AsyncWrite + Unpin>(w: &mut W, f: &Frame) -> io::Result<()> {
    let h = f
        .header()
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    if f.kind.is_synced() {
        w.write_all(&SYNC).await?;
    }
    w.write_all(&h).await?;
    w.write_all(&f.payload).await
}

async fn write_outgoing<W: AsyncWrite + Unpin>(w: &mut W, o: &Outgoing) -> io::Result<()> {
    match o {
        Outgoing::Raw(b) => w.write_all(b).await,
        Outgoing::Frame(f) => write_frame(w, f).await,
    }
}

/// Writes everything queued on `rx` to `wr` until the queue closes (`Ok`) or a write fails.
/// `select` turns a queued item into what to write, or `None` to drop it (the agent drops
/// frames of a session that has since been replaced).
pub async fn write_queue<W, T>(
    wr: W,
    rx: &mut mpsc::UnboundedReceiver<T>,
    mut select: impl FnMut(T) -> Option<Outgoing>,
) -> io::Result<()>
where
    W: AsyncWrite + Unpin,
{
    let mut w = BufWriter::with_capacity(WRITE_BUFFER, wr);
    while let Some(first) = rx.recv().await {
        let mut next = Some(first);
        while let Some(item) = next.take() {
            if let Some(o) = select(item) {
                write_outgoing(&mut w, &o).await?;
            }
            next = rx.try_recv().ok();
        }
        w.flush().await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{FrameDecoder, Kind};
    use bytes::BytesMut;

    #[tokio::test]
    async fn queued_frames_arrive_in_order_with_sync_and_skips() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        tx.send(Outgoing::Frame(Frame::new(Kind::Hello, 0, &b"{}"[..])))
            .unwrap();
        tx.send(Outgoing::Frame(Frame::new(
            Kind::Stdout,
            7,
            &b"dropped"[..],
        )))
        .unwrap();
        tx.send(Outgoing::Frame(Frame::new(Kind::Data, 3, &b"abc"[..])))
            .unwrap();
        tx.send(Outgoing::Raw(Bytes::from_static(b"\0\0"))).unwrap();
        drop(tx);
        let mut out = Vec::new();
        write_queue(&mut out, &mut rx, |o| match &o {
            Outgoing::Frame(f) if f.stream == 7 => None,
            _ => Some(o),
        })
        .await
        .unwrap();
        assert!(
            out.starts_with(&SYNC),
            "hello is preceded by the sync marker"
        );
        assert!(out.ends_with(b"\0\0"), "raw bytes are written as they are");
        let mut dec = FrameDecoder::resyncing();
        let mut buf = BytesMut::from(&out[..out.len() - 2]);
        let mut got = Vec::new();
        while let Ok(Some(f)) = dec.decode(&mut buf) {
            got.push((f.kind, f.stream, f.payload.to_vec()));
        }
        assert_eq!(
            got,
            vec![
                (Kind::Hello, 0, b"{}".to_vec()),
                (Kind::Data, 3, b"abc".to_vec())
            ]
        );
    }
}
